#!/usr/bin/env bash
# Set up a development/CLI environment in ./.venv (CPU torch pinned for our machines).
#   bash scripts/setup.sh            # library + CLI + test dependencies
# Environment: PYTHON (default python3), TORCH_SPEC (default torch==2.13.0), VENV (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 10):
    sys.exit(f"Python >= 3.10 is needed for the test tools (found {sys.version.split()[0]}); set PYTHON=python3.11")
PY
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
EXTRA=()
[ -d /opt/wheels ] && EXTRA+=(--find-links /opt/wheels)   # local wheel cache where a machine has one
"${PIP[@]}" install "${EXTRA[@]}" "$TORCH_SPEC" 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -c "import torch" || { echo "torch failed to install ($TORCH_SPEC)" >&2; exit 1; }
"${PIP[@]}" install "${EXTRA[@]}" -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -c "import SAM3DSegmentLib, SimpleITK, slicerio, medim, slicer, torchio" \
  || { echo "dependency installation failed" >&2; exit 1; }
echo "environment ready: $VENV (torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'))"
