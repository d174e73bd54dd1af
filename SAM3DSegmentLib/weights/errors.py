"""The errors of the weights package, and the one message for a missing helper library."""
from __future__ import annotations

import importlib
from typing import Optional


class WeightsError(RuntimeError):
    """A checkpoint could not be found, fetched or trusted. The message says what to do instead."""


class ChecksumError(WeightsError):
    """A file's sha256 (or size) is not the expected one."""

    def __init__(self, message: str, expected: Optional[str] = None, actual: Optional[str] = None):
        super().__init__(message)
        self.expected = expected
        self.actual = actual


def require(module: str, purpose: str):
    """Import ``module`` (a dependency in pyproject.toml) or raise :class:`WeightsError` saying how to install it.

    The helper libraries are imported on first use, not when the package is imported, so that the 3D Slicer
    module can list the registered models before its dependencies are installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        raise WeightsError(f"The Python package {module!r} is needed to {purpose} but is not installed; install it "
                           f"with `pip install {module}` (inside 3D Slicer: slicer.util.pip_install({module!r}) in "
                           "the Python console).") from None
