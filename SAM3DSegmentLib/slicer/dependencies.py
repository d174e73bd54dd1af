"""Installing the Python packages the module needs, inside Slicer and on the user's request only."""
from __future__ import annotations

import importlib
import importlib.util


def ensure_dependencies(torch_requirement: str = ">=2.1") -> None:
    """Inside Slicer, on the user's request only: torch through the PyTorch extension (picks the CUDA build that
    matches the driver; never pip-installed directly), other packages through ``slicer.packaging.pip_ensure``
    (Slicer 5.12 and newer, feature-detected) or ``slicer.util.pip_install`` on older versions.
    numpy/SimpleITK/vtk come with Slicer and are never installed.

    Whether torch and slicerio are installed is asked with ``importlib.util.find_spec``: neither is imported
    here (importing torch takes seconds and belongs in the engine process)."""
    import slicer

    if importlib.util.find_spec("torch") is None:
        try:
            import PyTorchUtils
        except ImportError:
            raise RuntimeError("Install the 'PyTorch' extension (View > Extensions Manager), restart Slicer, then "
                               "press 'Install dependencies' again") from None
        if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True,
                                                         torchVersionRequirement=torch_requirement) is None:
            raise RuntimeError("PyTorch was not installed; SAM3DSegment needs it to run the model")
    if importlib.util.find_spec("slicerio") is None:
        try:
            packaging = importlib.import_module("slicer.packaging")
        except ImportError:
            packaging = None
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            packaging.pip_ensure("slicerio>=1.0", requester="SAM3DSegment")
        else:
            slicer.util.pip_install("slicerio>=1.0")
