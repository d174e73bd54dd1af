"""A training process's device, automatic mixed precision, seeds and determinism, and memory figures."""
from __future__ import annotations

import contextlib
import os
import random
from typing import Any, Optional

from .distributed import DistInfo

__all__ = ["resolve_device", "resolve_amp", "autocast", "seed_everything", "memory_report"]


def resolve_device(name: str, info: Optional[DistInfo] = None):
    """``device`` of the config through the one resolver (:func:`SAM3DSegmentLib.models.device.resolve_device`):
    "auto" = this process's GPU (local rank) when CUDA is available, else the CPU (never MPS for training); a
    "cuda" without index is the local rank's GPU."""
    from ..models.device import resolve_device as resolve

    return resolve(name, local_rank=info.local_rank if info else 0, auto_mps=False)


def resolve_amp(amp: str, device) -> Optional[Any]:
    """The autocast dtype (None = full float32). AMP is disabled on CPU."""
    import torch

    if device.type != "cuda" or amp == "off":
        return None
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def autocast(device, dtype):
    """``torch.autocast`` to ``dtype`` on ``device``; a no-op context for ``dtype`` None (float32)."""
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int, threads: int = 0, deterministic: bool = True) -> None:
    """Seed Python, numpy and torch; ``threads`` > 0 sets torch's intra-op threads; ``deterministic`` asks
    torch for deterministic kernels (warning where there is none) and turns off cuDNN autotuning."""
    import numpy as np
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def memory_report(device) -> str:
    """Peak memory so far: CUDA memory on a GPU, else the process's peak resident size."""
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB peak CUDA memory"
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return f"{rss / 1024:.0f} MiB peak process memory"
    except (ImportError, AttributeError):
        return "memory unknown"
