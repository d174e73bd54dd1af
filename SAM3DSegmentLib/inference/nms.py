"""Masks kept as (box, voxels in the box), their IoU, and greedy non-maximum suppression by mask IoU (3D).

A :class:`BoxMask` is a boolean mask stored on the bounding box of its voxels: ``box`` is a tuple of one
``slice`` per array axis of the grid it lives on (``(k, j, i)`` for a volume), ``mask`` the voxels inside.
Two masks are compared only on the same grid; their IoU is computed on the intersection of their boxes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from ..core.boxes import Box, absolute, box_intersect, mask_bounds, relative

__all__ = ["BoxMask", "mask_iou", "nms"]


@dataclass(frozen=True)
class BoxMask:
    """A boolean mask cropped to ``box`` (slices on its grid); ``count`` = its voxels."""

    box: Box
    mask: np.ndarray
    count: int

    @classmethod
    def of(cls, mask: np.ndarray, offset: Sequence[int] = (0, 0, 0)) -> Optional["BoxMask"]:
        """The non-zero part of ``mask`` (whose voxel ``[0, 0, 0]`` is at ``offset`` of the grid) cropped to its
        bounding box; None when empty."""
        m = np.asarray(mask, dtype=bool)
        sl = mask_bounds(m)
        if sl is None:
            return None
        crop = np.ascontiguousarray(m[sl])
        return cls(absolute(sl, tuple(slice(int(o), int(o)) for o in offset)), crop, int(np.count_nonzero(crop)))

    def full(self, shape: Sequence[int]) -> np.ndarray:
        """The mask on a whole grid of ``shape`` (uint8)."""
        out = np.zeros(tuple(int(v) for v in shape), dtype=np.uint8)
        out[self.box] = self.mask
        return out


def mask_iou(a: BoxMask, b: BoxMask) -> float:
    """Intersection over union of two masks on the same grid."""
    inter_box = box_intersect(a.box, b.box)
    if inter_box is None:
        return 0.0
    inter = int(np.count_nonzero(a.mask[relative(inter_box, a.box)] & b.mask[relative(inter_box, b.box)]))
    union = a.count + b.count - inter
    return inter / union if union else 0.0


def nms(masks: Sequence[BoxMask], order: Sequence[int], iou_threshold: float) -> List[int]:
    """Greedy non-maximum suppression: walk ``order`` (indices into ``masks``, best first) and keep a mask
    unless its IoU with an already kept one exceeds ``iou_threshold``. Returns the kept indices in order."""
    if not 0.0 <= float(iou_threshold) <= 1.0:
        raise ValueError(f"the NMS IoU threshold must be in [0, 1], got {iou_threshold}")
    kept: List[int] = []
    lo = np.zeros((0, 3), dtype=np.int64)
    hi = np.zeros((0, 3), dtype=np.int64)
    for n in order:
        m = masks[n]
        mlo = np.array([s.start for s in m.box])
        mhi = np.array([s.stop for s in m.box])
        near = np.flatnonzero(np.all((lo < mhi) & (hi > mlo), axis=1)) if kept else []
        if any(mask_iou(m, masks[kept[k]]) > iou_threshold for k in near):
            continue
        kept.append(int(n))
        lo = np.vstack([lo, mlo])
        hi = np.vstack([hi, mhi])
    return kept
