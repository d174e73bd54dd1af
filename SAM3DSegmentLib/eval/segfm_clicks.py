"""The click simulator of the CVPR 2025 interactive 3D segmentation challenge (SegFM), for one class.

Given the class's ground truth and the current prediction (both on the case grid, any axis order):

1. the error is every voxel where they differ (missed and extra voxels together);
2. its 26-connected components (``scipy.ndimage.label``); the largest by voxel count is clicked (equal sizes:
   the component met first in C order, as ``argmax`` over the component sizes does);
3. inside it, the Euclidean distance transform in VOXEL units (no spacing, as the challenge), computed on the
   component's bounding box padded with zeros by 25 % of its size per axis (at least one voxel), so the box
   edge counts as background;
4. the click is a voxel of maximal distance; when several share the maximum, one is drawn with a FRESH
   ``numpy.random.RandomState(seed)`` (seed 42) among them in C order: the challenge re-seeds numpy's global
   generator with 42 before every draw, so the same inputs always give the same click;
5. foreground (positive) if that voxel is in the ground truth, else background.

No error: no click (None). The returned index is in the arrays' own axis order ((z, y, x) for the challenge's
(D, H, W) arrays).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import numpy as np

__all__ = ["SegFMClick", "SEED", "PAD_FRACTION", "largest_error_component", "padded_edt", "segfm_click"]

#: The seed of the challenge's tie-break draw.
SEED = 42
#: Zero padding of the error component's box, as a fraction of its size per axis (at least one voxel).
PAD_FRACTION = 0.25

_CONN26 = np.ones((3, 3, 3), dtype=bool)


class SegFMClick(NamedTuple):
    """``index``: the voxel (array axis order); ``positive``: foreground click; ``depth``: its distance
    transform value (voxels); ``component_voxels``: size of the error component it lies in."""

    index: Tuple[int, int, int]
    positive: bool
    depth: float
    component_voxels: int


def _as_bool(a, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 3:
        raise ValueError(f"{name} must be a 3D mask, got shape {arr.shape}")
    return arr.astype(bool, copy=False)


def largest_error_component(gt: np.ndarray, pred: np.ndarray) -> Optional[Tuple[Tuple[slice, ...], np.ndarray]]:
    """``(box, mask)``: the largest 26-connected component of ``gt != pred`` as a bool mask on its bounding
    box ``box`` (slices into the arrays); None when the prediction is exact."""
    from scipy import ndimage

    g, p = _as_bool(gt, "gt"), _as_bool(pred, "pred")
    if g.shape != p.shape:
        raise ValueError(f"prediction shape {p.shape} differs from ground truth shape {g.shape}")
    error = g != p
    if not error.any():
        return None
    labels, n = ndimage.label(error, structure=_CONN26)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    largest = int(np.argmax(sizes))          # first of equal sizes = the component met first in C order
    box = ndimage.find_objects(labels, max_label=largest)[largest - 1]
    return box, labels[box] == largest


def padded_edt(component: np.ndarray, pad_fraction: float = PAD_FRACTION) -> np.ndarray:
    """Distance (voxels) of every voxel of ``component`` (a bool mask on its bounding box) to the nearest voxel
    outside it, with the box zero-padded by ``pad_fraction`` of its size per axis (at least 1 voxel)."""
    from scipy import ndimage

    comp = np.asarray(component, dtype=bool)
    pad = np.maximum((np.asarray(comp.shape) * pad_fraction).astype(int), 1)
    padded = np.pad(comp, [(int(v), int(v)) for v in pad])
    dist = ndimage.distance_transform_edt(padded)
    return dist[tuple(slice(int(v), int(v) + s) for v, s in zip(pad, comp.shape))]


def segfm_click(gt: np.ndarray, pred: np.ndarray, seed: int = SEED) -> Optional[SegFMClick]:
    """The challenge's next click for one class (see the module docstring); None when ``pred == gt``."""
    found = largest_error_component(gt, pred)
    if found is None:
        return None
    box, comp = found
    dist = padded_edt(comp)
    best = dist.max()
    candidates = np.argwhere(dist == best)           # C order, as numpy.argwhere on the full array
    pick = candidates[np.random.RandomState(seed).choice(len(candidates))]
    index = tuple(int(b.start + v) for b, v in zip(box, pick))
    positive = bool(np.asarray(gt)[index])
    return SegFMClick(index=index, positive=positive, depth=float(best), component_voxels=int(comp.sum()))
