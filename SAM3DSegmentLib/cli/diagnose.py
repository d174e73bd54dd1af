"""A copyable plain-text description of the runtime, for bug reports and "why is it slow?" questions.

:func:`diagnose_report` never raises because something is missing: torch, CUDA, Slicer or the cache
folder may each be absent or broken, and the report says so in its own line. torch is imported inside
functions only (importing this module stays cheap), and Slicer never: its version is read only when this
process already runs inside 3D Slicer.

``sam3d diagnose [--verify]`` prints the report. :func:`recommended_device` picks ``"cuda"``, ``"mps"`` or ``"cpu"`` and carries a warning for CPU.
"""
from __future__ import annotations

import datetime as _dt
import importlib
import os
import platform
import sys
from typing import Any, Dict, List, Optional, Sequence

# The CPU warning and the measured CPU speed it quotes live with the device choice (models/device.py, where the
# engine process picks the device for "auto"); re-exported here for the report and its tests.
from ..models.device import CPU_ENCODE_SECONDS, CPU_LATER_CLICK, CPU_WARNING  # noqa: F401
from .runner import command_main

NO_TORCH_WARNING = ("torch cannot be imported, so the model cannot run here. Install torch (in 3D Slicer: "
                    "the PyTorch extension; elsewhere: pip install torch).")


class DeviceChoice(str):
    """The device name (``"cuda"``, ``"mps"`` or ``"cpu"``; compares equal to that string) with the
    reason for the choice in ``.warning`` (None unless the choice is a slow fallback)."""

    warning: Optional[str]

    def __new__(cls, device: str, warning: Optional[str] = None) -> "DeviceChoice":
        obj = super().__new__(cls, device)
        obj.warning = warning
        return obj


def _import_torch():
    """``(torch module or None, error text or None)``; any failure (ImportError, a DLL error) is caught."""
    try:
        return importlib.import_module("torch"), None
    except BaseException as exc:  # noqa: BLE001 - a broken install may raise anything, even SystemExit
        if isinstance(exc, KeyboardInterrupt):
            raise
        return None, f"{type(exc).__name__}: {exc}"


def _mps_available(torch) -> bool:
    try:
        mps = getattr(torch.backends, "mps", None)
        return bool(mps is not None and mps.is_available())
    except Exception:
        return False


def recommended_device() -> DeviceChoice:
    """``"cuda"`` if torch sees a CUDA device, else ``"mps"`` (Apple GPU), else ``"cpu"`` with a warning."""
    torch, error = _import_torch()
    if torch is None:
        return DeviceChoice("cpu", NO_TORCH_WARNING + f" ({error})")
    try:
        if torch.cuda.is_available():
            return DeviceChoice("cuda")
    except Exception:
        pass
    if _mps_available(torch):
        return DeviceChoice("mps")
    return DeviceChoice("cpu", CPU_WARNING)


def _fmt_gib(n: Optional[float]) -> str:
    return "?" if n is None else f"{n / 1024 ** 3:.2f} GiB"


def _fmt_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.2f} GiB"


def _module_version(name: str) -> str:
    try:
        mod = importlib.import_module(name)
    except BaseException as exc:  # noqa: BLE001
        if isinstance(exc, KeyboardInterrupt):
            raise
        return f"not importable ({type(exc).__name__}: {exc})"
    version = getattr(mod, "__version__", None)
    if version is None and hasattr(mod, "Version"):  # SimpleITK
        try:
            version = mod.Version_VersionString()
        except Exception:
            version = None
    return str(version) if version is not None else "installed (version unknown)"


def _section(title: str) -> List[str]:
    return ["", f"== {title} =="]


def _system_lines() -> List[str]:
    from .. import __version__

    lines = _section("System")
    lines.append(f"OS: {platform.platform()} ({platform.machine() or '?'})")
    lines.append(f"Python: {sys.version.split()[0]} ({platform.python_implementation()}) at {sys.executable}")
    lines.append(f"SAM3DSegmentLib: {__version__} at {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}")
    lines.append(f"CPU cores (os.cpu_count): {os.cpu_count()}")
    return lines


def _library_lines() -> List[str]:
    lines = _section("Libraries")
    lines.append(f"numpy: {_module_version('numpy')}")
    lines.append(f"SimpleITK: {_module_version('SimpleITK')}")
    return lines


def _torch_lines() -> List[str]:
    lines = _section("PyTorch")
    torch, error = _import_torch()
    if torch is None:
        lines.append(f"torch: not importable ({error})")
        lines.append("CUDA available: no (torch missing)")
        lines.append("MPS available: no (torch missing)")
        return lines
    lines.append(f"torch: {getattr(torch, '__version__', '?')} at {os.path.dirname(getattr(torch, '__file__', '') or '')}")
    try:
        lines.append(f"torch CPU threads: {torch.get_num_threads()} intra-op, "
                     f"{torch.get_num_interop_threads()} inter-op")
    except Exception as exc:
        lines.append(f"torch CPU threads: unknown ({exc})")
    try:
        cuda_ok = bool(torch.cuda.is_available())
    except Exception as exc:
        cuda_ok = False
        lines.append(f"CUDA check failed: {type(exc).__name__}: {exc}")
    cuda_build = getattr(getattr(torch, "version", None), "cuda", None)
    lines.append(f"CUDA available: {'yes' if cuda_ok else 'no'} (torch built with CUDA {cuda_build or 'none'})")
    if cuda_ok:
        try:
            lines.append(f"cuDNN: {torch.backends.cudnn.version()}")
        except Exception:
            pass
        try:
            count = torch.cuda.device_count()
        except Exception:
            count = 0
        for i in range(count):
            try:
                props = torch.cuda.get_device_properties(i)
                name, total = props.name, float(props.total_memory)
                cap = f"{props.major}.{props.minor}"
            except Exception as exc:
                lines.append(f"  cuda:{i}: properties unavailable ({exc})")
                continue
            try:
                free, total = (float(v) for v in torch.cuda.mem_get_info(i))
            except Exception:
                free = None
            lines.append(f"  cuda:{i}: {name}, compute capability {cap}, memory {_fmt_gib(free)} free of "
                         f"{_fmt_gib(total)}")
    lines.append(f"MPS available: {'yes' if _mps_available(torch) else 'no'}")
    return lines


def _device_lines() -> List[str]:
    choice = recommended_device()
    lines = [f"Recommended device: {choice}"]
    if choice.warning:
        lines.append(f"Warning: {choice.warning}")
    return lines


def _cache_lines(verify_checksums: bool) -> List[str]:
    from .. import weights

    lines = _section("Model cache")
    try:
        root = weights.cache_dir()
        source = (f"from ${weights.ENV_HOME}" if os.environ.get(weights.ENV_HOME, "").strip()
                  else "platform default")
        lines.append(f"Cache directory: {root} ({source}; {'exists' if root.is_dir() else 'not created yet'})")
        folder = weights.checkpoint_dir()
        lines.append(f"Checkpoints folder: {folder}")
        mirror = os.environ.get(weights.ENV_BASE_URL, "").strip()
        if mirror:
            lines.append(f"Download mirror (${weights.ENV_BASE_URL}): {mirror}")
        rows = weights.list_cache()
        if not rows:
            lines.append("Files: none")
        for row in rows:
            status = row["status"]
            if verify_checksums and not row["path"].name.endswith(".part"):
                entry = weights.REGISTRY.get(row["name"]) if row["name"] else None
                try:
                    rec = weights.verify_cached(row["path"], entry)
                    status = f"sha256 checked now: OK ({rec['sha256'][:16]}..., {rec['verified']})"
                except weights.WeightsError as exc:
                    status = f"sha256 checked now: MISMATCH ({str(exc).splitlines()[0]})"
            label = f" [{row['name']}]" if row["name"] else ""
            lines.append(f"  {row['path'].name}{label}: {_fmt_bytes(row['size'])} ({row['size']} bytes); {status}")
        lines.append("Known models:")
        for entry in weights.iter_registry():
            if entry.bundled:
                path = entry.bundled_path()
                where = f"bundled at {path} ({'present' if path and path.is_file() else 'not in this build'})"
            else:
                target = folder / entry.filename
                where = "cached" if target.is_file() else "not downloaded"
                where += f"; published sha256 {'known' if entry.sha256 else 'unknown (trust on first use)'}"
            lines.append(f"  {entry.name}: {entry.filename}, {entry.architecture}; {where}")
    except Exception as exc:  # the report must still come out
        lines.append(f"Cache inspection failed: {type(exc).__name__}: {exc}")
    return lines


def _slicer_lines() -> List[str]:
    """Slicer's version, read from the ``slicer`` module only when this process already runs inside 3D
    Slicer (which has loaded it); nothing is imported here."""
    lines = _section("3D Slicer")
    slicer = sys.modules.get("slicer")
    if slicer is None:
        lines.append("Not running inside 3D Slicer (no slicer module loaded in this process)")
        return lines
    app = getattr(slicer, "app", None)
    if app is None:
        lines.append("Not running inside 3D Slicer (a 'slicer' module is loaded but has no application)")
        return lines
    for label, attr in (("Slicer version", "applicationVersion"), ("Revision", "repositoryRevision"),
                        ("Main window", "mainWindow")):
        try:
            value = getattr(app, attr)
            value = value() if callable(value) else value
            if attr == "mainWindow":
                value = "yes" if value is not None else "no (headless / --no-main-window)"
            lines.append(f"{label}: {value}")
        except Exception as exc:
            lines.append(f"{label}: unknown ({type(exc).__name__})")
    return lines


def diagnose_report(extra: Optional[Dict[str, Any]] = None, *, verify_checksums: bool = False) -> str:
    """Plain text describing OS, Python, numpy, SimpleITK, torch/CUDA/MPS, the model cache and Slicer.

    ``extra``: additional ``key: value`` lines (e.g. the loaded model and backend) in an "Extra" section.
    ``verify_checksums``: hash the cached checkpoints now (slow for 400 MB files); otherwise the state
    recorded at their last load is shown.
    """
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    lines: List[str] = [f"SAM3DSegment diagnostic report ({now})"]
    for part in (_system_lines, _library_lines, _torch_lines, _device_lines,
                 lambda: _cache_lines(verify_checksums), _slicer_lines):
        try:
            lines.extend(part())
        except Exception as exc:  # noqa: BLE001 - never fail the whole report
            lines.append(f"(section failed: {type(exc).__name__}: {exc})")
    if extra:
        lines.extend(_section("Extra"))
        for key, value in extra.items():
            lines.append(f"{key}: {value}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ command
NAME = "diagnose"
HELP = "print a report of the system, torch, devices and caches"
DESCRIPTION = ("Print a plain-text report of the system, torch, devices and model caches, to copy into a bug "
               "report.")


def configure(p) -> None:
    p.add_argument("--verify", action="store_true",
                   help="hash the cached checkpoints now (slow for 400 MB files; default: show the state "
                        "recorded at their last load)")


def run(args) -> int:
    print(diagnose_report(verify_checksums=args.verify), end="")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``sam3d diagnose`` (``argv`` without the sub-command): the same parser, messages and exit statuses."""
    return command_main(sys.modules[__name__], argv)


if __name__ == "__main__":  # python -m SAM3DSegmentLib.cli.diagnose
    sys.exit(main())
