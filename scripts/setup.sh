#!/usr/bin/env bash
# Set up a development/CLI environment in ./.venv: torch (TORCH_SPEC, default torch==2.13.0), then this
# package in editable mode with its test dependencies.
#   bash scripts/setup.sh                                                          # torch from the package index
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh     # CPU-only torch
# Which torch build a plain `pip install torch==2.13.0` brings depends on the platform: on Linux x86-64 the
# package index (PyPI) serves the CUDA build, which pulls several GB of NVIDIA libraries; on macOS and
# Windows it is the CPU (macOS: MPS) build. TORCH_INDEX_URL points pip at another index for torch alone,
# e.g. PyTorch's CPU-only wheels above. Where a machine has a local wheel folder (/opt/wheels on ours, or
# WHEELS=DIR), pip also looks there first, so an offline machine installs whatever torch build it holds.
# Environment: PYTHON (default python3), TORCH_SPEC (default torch==2.13.0), TORCH_INDEX_URL (default:
# none, the package index), WHEELS (default /opt/wheels when it exists), VENV (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
WHEELS=${WHEELS:-/opt/wheels}
"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 10):
    sys.exit(f"Python >= 3.10 is needed for the test tools (found {sys.version.split()[0]}); set PYTHON=python3.11")
PY
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
EXTRA=()
[ -d "$WHEELS" ] && EXTRA+=(--find-links "$WHEELS")   # local wheel folder where a machine has one
TORCH_EXTRA=()
[ -n "$TORCH_INDEX_URL" ] && TORCH_EXTRA+=(--index-url "$TORCH_INDEX_URL")
if [ -n "$TORCH_INDEX_URL" ]; then
  echo "installing $TORCH_SPEC from $TORCH_INDEX_URL${EXTRA[*]:+ (and $WHEELS)}"
else
  echo "installing $TORCH_SPEC from the package index${EXTRA[*]:+ (and $WHEELS)}; on Linux x86-64 that is" \
       "the CUDA build (several GB) - for CPU-only set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"
fi
"${PIP[@]}" install "${EXTRA[@]}" "${TORCH_EXTRA[@]}" "$TORCH_SPEC" 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -W ignore -c "import torch" || { echo "torch failed to install ($TORCH_SPEC)" >&2; exit 1; }  # numpy comes next: no warning
"${PIP[@]}" install "${EXTRA[@]}" -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -c "import SAM3DSegmentLib, SimpleITK, slicerio, medim, slicer, matplotlib, torchio" \
  || { echo "dependency installation failed" >&2; exit 1; }
echo "environment ready: $VENV (torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__, "CUDA " + str(torch.version.cuda) if torch.version.cuda else "CPU-only")'))"
