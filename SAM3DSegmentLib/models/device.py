"""Device and precision choice (CPU fp32 by default; CUDA and Apple MPS when present)."""
from __future__ import annotations

from typing import Optional

#: Measured CPU speed of the full-size model (2 torch threads): the "Summary" table of docs/benchmarks.md
#: holds the measurements; Testing/test_first_hour_docs.py checks that these quote it exactly.
CPU_ENCODE_SECONDS = "0.76 s"
CPU_LATER_CLICK = "21–38 ms"
CPU_WARNING = ("No CUDA or Apple MPS GPU is available to torch: the model runs on the CPU. Measured with the "
               f"full SAM-Med3D model on 2 CPU threads: {CPU_ENCODE_SECONDS} to encode each new 128^3 region, "
               f"{CPU_LATER_CLICK} per later click inside it (docs/benchmarks.md); objects spanning several "
               "regions and slower or busy CPUs take a multiple of that. Install a CUDA build of torch "
               "(Slicer: PyTorch extension) on a machine with an NVIDIA GPU for interactive speed.")

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


def resolve_device(name: Optional[str] = None, local_rank: Optional[int] = None, auto_mps: bool = True):
    """The one device resolver: a ``torch.device`` for "auto"/None, "cpu", "cuda[:N]" or "mps", with a clear
    error if unavailable. ``local_rank`` (distributed training): "auto" and an index-less "cuda" mean that
    process's GPU. ``auto_mps=False``: "auto" never picks Apple MPS (training: no AMP/DDP there)."""
    import torch

    if name in (None, "", "auto"):
        auto = default_device()
        if auto == "mps" and not auto_mps:
            auto = "cuda" if torch.cuda.is_available() else "cpu"
        name = auto
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {name!r} was requested but this torch ({torch.__version__}) sees no CUDA GPU. "
            "Use --device cpu, or install a CUDA build of torch (in 3D Slicer: the PyTorch extension).")
    if dev.type == "cuda" and dev.index is None and local_rank is not None:
        dev = torch.device("cuda", local_rank)
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise RuntimeError(f"device {name!r} was requested but Apple MPS is not available here; use --device cpu")
    return dev


def device_warning(device) -> Optional[str]:
    """:data:`CPU_WARNING` for a CPU device (a string or ``torch.device``), else None (no torch import)."""
    return CPU_WARNING if str(device).split(":")[0] == "cpu" else None


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


def autocast_for(device, dtype):
    """The context a model runs in at ``dtype`` on ``device``: nothing for float32, else ``torch.autocast``."""
    import contextlib

    import torch

    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


#: glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_allocator_tuned: Optional[bool] = None


def tune_cpu_allocator(mmap_threshold_mb: int = 64, trim_threshold_mb: int = 256) -> bool:
    """Keep the encoder's 5–13 MB temporaries in glibc's heap instead of fresh ``mmap`` pages.

    By default glibc serves those blocks with ``mmap`` and returns them on free, so every encode faults
    in (and the kernel zeroes) about 250 MB of pages: ~10 % of a 128³ CPU encode on 2 threads
    (docs/benchmarks.md). Raising the mmap and trim thresholds lets freed blocks be reused; blocks above
    ``mmap_threshold_mb`` (whole CT volumes) are still mapped and returned, and at most
    ``trim_threshold_mb`` of free heap is kept. Process-wide, so it is applied once, only on Linux with glibc,
    and not at all when ``SAM3D_NO_MALLOC_TUNING=1``. Returns whether the setting is active.
    """
    global _allocator_tuned
    if _allocator_tuned is not None:
        return _allocator_tuned
    import os
    import sys

    _allocator_tuned = False
    if not sys.platform.startswith("linux") or os.environ.get("SAM3D_NO_MALLOC_TUNING", "") not in ("", "0"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        ok = (libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold_mb) << 20) == 1
              and libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold_mb) << 20) == 1)
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        ok = False
    _allocator_tuned = ok
    return ok


def describe_device(device) -> str:
    """"cuda:0 (NVIDIA H200)", "cpu (16 threads)" or "mps": what a server reports as its device."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    if dev.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(dev)


def set_threads(n: Optional[int]) -> None:
    """Use ``n`` intra-op CPU threads in torch (None or 0: leave torch's choice)."""
    if n:
        import torch

        torch.set_num_threads(int(n))
