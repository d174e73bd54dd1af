"""Device and precision choice (CPU fp32 by default; CUDA and Apple MPS when present)."""
from __future__ import annotations

from typing import Optional

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "half": "float16"}


def available_devices() -> list:
    import torch

    devs = ["cpu"]
    if torch.cuda.is_available():
        devs.insert(0, "cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devs.insert(0, "mps")
    return devs


def default_device() -> str:
    """"cuda" if available, else "mps" if available, else "cpu"."""
    return available_devices()[0]


def resolve_device(name: Optional[str] = None):
    """A ``torch.device`` for "auto"/None, "cpu", "cuda[:N]" or "mps", with a clear error if unavailable."""
    import torch

    if name in (None, "", "auto"):
        return torch.device(default_device())
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {name!r} was requested but this torch ({torch.__version__}) sees no CUDA GPU. "
            "Use --device cpu, or install a CUDA build of torch (in 3D Slicer: the PyTorch extension).")
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise RuntimeError(f"device {name!r} was requested but Apple MPS is not available here; use --device cpu")
    return dev


def resolve_dtype(name: str, device) -> "object":
    """torch dtype for "float32" | "bfloat16" | "float16". float16 needs a GPU; bfloat16 also runs on CPU
    (autocast), see docs/precision.md for the measured deviation."""
    import torch

    key = DTYPES.get(str(name).lower().replace("torch.", ""))
    if key is None:
        raise ValueError(f"unknown precision {name!r}; choose float32, bfloat16 or float16")
    dtype = getattr(torch, key)
    dev_type = torch.device(device).type if not isinstance(device, torch.device) else device.type
    if dtype == torch.float16 and dev_type == "cpu":
        raise ValueError("float16 inference is only supported on a GPU; use float32 (or bfloat16) on the CPU")
    return dtype
