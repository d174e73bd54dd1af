"""Boxes of a voxel grid: a tuple of one ``slice(start, stop)`` per array axis (``(k, j, i)`` for a volume).

Every box here is normalised (integer starts and stops, step 1). ``None`` stands for "no box" (nothing there)
wherever a function returns or accepts ``Optional[Box]``.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple

import numpy as np

__all__ = ["Box", "EMPTY_BOX", "box_union", "box_intersect", "box_shape", "box_size", "box_contains",
           "relative", "absolute", "read_box", "normalise_box", "mask_bounds", "points_box"]

Box = Tuple[slice, slice, slice]
#: A box holding no voxel (what an update that changed nothing reports).
EMPTY_BOX: Box = (slice(0, 0),) * 3


def box_union(a: Optional[Box], b: Optional[Box]) -> Optional[Box]:
    """The smallest box holding both (None when both are None)."""
    if a is None:
        return b
    if b is None:
        return a
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))


def box_intersect(a: Optional[Box], b: Optional[Box]) -> Optional[Box]:
    """The common part of two boxes; None when either is None or they share no voxel."""
    if a is None or b is None:
        return None
    out = tuple(slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(a, b))
    if any(s.stop <= s.start for s in out):
        return None
    return out


def box_shape(box: Box) -> Tuple[int, ...]:
    return tuple(s.stop - s.start for s in box)


def box_size(box: Box) -> int:
    """Number of voxels in the box."""
    return int(np.prod(box_shape(box)))


def box_contains(outer: Box, inner: Box) -> bool:
    return all(o.start <= i.start and i.stop <= o.stop for o, i in zip(outer, inner))


def relative(inner: Box, outer: Box) -> Box:
    """``inner`` in the frame of ``outer`` (to index an array that holds ``outer``)."""
    return tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, outer))


def absolute(inner: Box, outer: Box) -> Box:
    """``inner``, given relative to ``outer``, in ``outer``'s frame (the inverse of :func:`relative`)."""
    return tuple(slice(i.start + o.start, i.stop + o.start) for i, o in zip(inner, outer))


def read_box(array: Optional[np.ndarray], array_box: Optional[Box], box: Box) -> np.ndarray:
    """A new array on ``box`` holding ``array`` (which covers ``array_box``) where the two boxes meet and zero
    elsewhere; all zero when ``array_box`` is None. Keeps ``array``'s dtype (uint8 when there is none)."""
    out = np.zeros(box_shape(box), dtype=np.uint8 if array is None else array.dtype)
    inter = box_intersect(array_box, box)
    if inter is not None:
        out[relative(inter, box)] = array[relative(inter, array_box)]
    return out


def normalise_box(box: Sequence[slice]) -> Box:
    """Integer starts (None -> 0) and stops."""
    return tuple(slice(int(s.start or 0), int(s.stop)) for s in box)


def mask_bounds(mask: np.ndarray, margin: int = 0) -> Optional[Tuple[slice, ...]]:
    """Per array axis, the slice spanning the mask's non-zero voxels, widened by ``margin`` voxels each side
    and clipped to the array; None for an empty mask. Any number of dimensions.

    One pass over the array (an OR-reduction along the last axis), then passes over the reduced array and
    the occupied slabs only: cheap on the large, mostly empty masks of interactive segmentation.
    """
    a = np.asarray(mask)
    if a.ndim == 0:
        raise ValueError("mask_bounds needs an array with at least one axis")
    if a.dtype == bool:
        a = a.view(np.uint8)
    elif a.dtype.kind not in "ui":
        a = (a != 0).view(np.uint8)
    if a.ndim == 1:
        hits = [np.flatnonzero(a)]
    else:
        head = np.bitwise_or.reduce(a, axis=-1) != 0          # occupancy of the first ndim - 1 axes
        hits = [np.flatnonzero(head.any(axis=tuple(b for b in range(head.ndim) if b != axis)))
                for axis in range(head.ndim)]
        if hits[0].size:
            slab = a[hits[0][0]:hits[0][-1] + 1]               # the last axis, over the occupied slab only
            hits.append(np.flatnonzero(np.bitwise_or.reduce(slab.reshape(-1, a.shape[-1]), axis=0)))
    if hits[0].size == 0:
        return None
    return tuple(slice(max(int(h[0]) - margin, 0), min(int(h[-1]) + 1 + margin, n))
                 for h, n in zip(hits, a.shape))


def points_box(points: Iterable[Sequence[int]]) -> Optional[Box]:
    """Bounding box of a collection of integer voxels (one index per axis); None when empty."""
    pts = list(points)
    if not pts:
        return None
    v = np.asarray(pts, dtype=np.int64).reshape(len(pts), -1)
    lo, hi = v.min(axis=0), v.max(axis=0) + 1
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
