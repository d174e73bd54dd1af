"""Model families and their checkpoints. Names follow the released checkpoints and the SAM paper.

Importing this package does not import torch: the names below are loaded on first use (PEP 562), so the
torch-free parts (``models.checkpoint_file``, ``models.device``) serve the CLI, the weights cache and the
Slicer module without pulling torch in.
"""
from importlib import import_module

_EXPORTS = {
    "SamMed3DConfig": ".sam_med3d.config",
    "SamMed3D": ".sam_med3d.model",
    "build_sam_med3d": ".sam_med3d.model",
    "load_checkpoint": ".checkpoint",
    "save_checkpoint": ".checkpoint",
    "read_checkpoint": ".checkpoint",
    "CheckpointError": ".checkpoint_file",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
