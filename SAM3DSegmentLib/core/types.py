"""Plain value types that cross package boundaries: a click going into the engine, a mask update coming out.

The session (:mod:`SAM3DSegmentLib.inference.session`) produces and consumes them; the engine process sends
them over its message layer (:mod:`SAM3DSegmentLib.inference.protocol`) and the Slicer bridge reads their
fields. Numpy only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import numpy as np

from .boxes import Box

__all__ = ["Click", "MaskUpdate"]


@dataclass(frozen=True)
class Click:
    """One click: ``ras`` (R, A, S mm) or ``ijk`` (voxel indices i, j, k of the volume), and its sign.

    Clicks returned by ``Session.clicks`` always carry ``ras`` (and ``ijk`` as given, if any).
    """

    ras: Optional[Tuple[float, float, float]] = None
    positive: bool = True
    ijk: Optional[Tuple[float, float, float]] = None


@dataclass
class MaskUpdate:
    """What one call changed. ``box`` is the (k, j, i) box of the volume grid that may have changed and
    ``mask_box`` the object's mask inside it (uint8 0/1, read-only)."""

    object_id: str
    box: Box
    mask_box: np.ndarray
    encoded_regions: int = 0
    timings: Dict[str, float] = field(default_factory=dict)
    #: Regions the object has after the call.
    regions: int = 0
    #: True when extension wanted more regions than ``max_regions`` (the object is probably cut).
    truncated: bool = False
