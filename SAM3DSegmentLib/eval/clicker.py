"""Deterministic click simulation for evaluating (and training) interactive segmentation.

The policy is the RITM one that SAM-Med3D's published first click uses, applied at every step:

* no prediction yet (or an empty one that misses the whole object): a POSITIVE click at the deepest
  point of the ground-truth object, i.e. the voxel farthest (in millimetres) from the object's border;
* afterwards: split the error into false negatives ``FN = gt & ~pred`` and false positives
  ``FP = pred & ~gt``; the "larger" error region is the DEEPER one (the larger maximum distance to its
  own border, RITM's criterion; equal depths are broken by the larger voxel count, then in favour of
  FN). The click goes to that region's deepest point: positive in FN, negative in FP.

Distances are Euclidean in millimetres (``scipy.ndimage.distance_transform_edt`` with the voxel
spacing as sampling), so anisotropic CT (e.g. 0.7 x 0.7 x 5 mm) is clicked where a human would click,
not where the voxel grid is thickest. The edge of the array counts as a border (the array is padded
with background), so objects cut by the field of view are clicked inside, away from the cut.

Ties between voxels at the same (maximal) distance are broken deterministically: the voxel closest to
the centroid of all maximal voxels wins, then the first in C (array) order. The same inputs always
give the same click.

Never the same voxel twice: pass the voxels clicked so far as ``avoid``. When the policy above picks one
of them (the model ignored that click, so the error there is unchanged), the clicked voxels are taken
out of both error regions, i.e. they count as border, and the policy runs again: the click goes to the
deepest error voxel that is also far from the earlier clicks, in whichever region is then the deeper
one (the next-best point of the same region, or the other region). Without a repeat the click is the
one the plain policy gives. When every error voxel has been clicked already there is no new click
(None).

Axis orders — be careful:

* :func:`next_click_index` works on any 3D arrays and returns an index in the ARRAY's own axis order;
  ``spacing`` is per array axis (for a 128^3 model crop indexed ``[a, b, c]`` that is (a, b, c)).
* :func:`next_click` takes volume arrays indexed ``[k, j, i]`` (Slicer / SimpleITK / ``Volume.array``
  order) with ``spacing_kji`` per array axis (``Volume.spacing[::-1]``), and returns the voxel as
  ``(i, j, k)`` — the order ``Session.add_click(ijk=...)`` takes.

Requires scipy (bundled with 3D Slicer; a test/eval dependency of the headless package).
"""
from __future__ import annotations

from typing import Iterable, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from ..core.geometry import mask_bounds, spacing_mm

__all__ = ["SimulatedClick", "next_click", "next_click_index", "deepest_point", "error_regions",
           "random_error_click"]


class SimulatedClick(NamedTuple):
    """One simulated click: ``ijk`` = voxel index (order documented by the producing function)."""

    ijk: Tuple[int, int, int]
    positive: bool


def _as_bool(mask: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.ndim != 3:
        raise ValueError(f"{name} must be a 3D array, got shape {arr.shape}")
    return arr.astype(bool, copy=False)


def deepest_point(mask: np.ndarray, spacing: Optional[Sequence[float]] = None
                  ) -> Tuple[Optional[Tuple[int, int, int]], float]:
    """The voxel of ``mask`` farthest from its border, and that distance in mm.

    ``mask``: 3D bool array; ``spacing``: mm per ARRAY axis. The array edge counts as border.
    Returns ``(index in array axis order, depth_mm)``; ``(None, 0.0)`` for an empty mask. A single
    voxel has depth equal to the smallest spacing (the distance to the nearest background voxel centre).
    """
    from scipy import ndimage

    mask = _as_bool(mask, "mask")
    sp = spacing_mm(spacing)
    box = mask_bounds(mask)
    if box is None:
        return None, 0.0
    # Work in the bounding box padded by one background voxel: the same distances as on the whole
    # array (the nearest background voxel of a True voxel is always within the padded box), far cheaper.
    sub = np.pad(mask[box], 1, mode="constant", constant_values=False)
    dist = ndimage.distance_transform_edt(sub, sampling=sp)
    dmax = float(dist.max())
    cand = np.argwhere(dist >= dmax * (1.0 - 1e-9))  # C-order rows
    if len(cand) > 1:
        centroid = cand.mean(axis=0)
        d2 = (((cand - centroid) * sp) ** 2).sum(axis=1)
        cand = cand[d2 <= d2.min() * (1.0 + 1e-9) + 1e-12]  # stable: argwhere is in C order
    best = cand[0] - 1  # undo the padding
    index = tuple(int(best[a] + box[a].start) for a in range(3))
    return index, dmax  # type: ignore[return-value]


def error_regions(gt_mask: np.ndarray, pred_mask: Optional[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """``(FN, FP)`` boolean arrays: ``gt & ~pred`` and ``pred & ~gt`` (``pred=None`` means empty)."""
    gt = _as_bool(gt_mask, "gt_mask")
    if pred_mask is None:
        return gt.copy(), np.zeros_like(gt)
    pred = _as_bool(pred_mask, "pred_mask")
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}; "
                         "both must be on the same voxel grid")
    return gt & ~pred, pred & ~gt


def _avoid_mask(shape: Tuple[int, ...], avoid: Optional[Iterable[Sequence[int]]]) -> Optional[np.ndarray]:
    """Boolean array marking the ``avoid`` voxels (array axis order) that lie inside ``shape``."""
    if avoid is None:
        return None
    pts = np.asarray([tuple(int(v) for v in p) for p in avoid], dtype=np.int64).reshape(-1, 3)
    pts = pts[np.all((pts >= 0) & (pts < np.asarray(shape)), axis=1)]
    if len(pts) == 0:
        return None
    out = np.zeros(shape, dtype=bool)
    out[pts[:, 0], pts[:, 1], pts[:, 2]] = True
    return out


def _pick(fn: np.ndarray, fp: np.ndarray, spacing) -> Optional[SimulatedClick]:
    """The RITM choice between the two error regions (see the module docstring)."""
    p_fn, d_fn = deepest_point(fn, spacing)
    p_fp, d_fp = deepest_point(fp, spacing)
    if p_fn is None and p_fp is None:
        return None
    if p_fp is None:
        return SimulatedClick(p_fn, True)  # type: ignore[arg-type]
    if p_fn is None:
        return SimulatedClick(p_fp, False)
    if abs(d_fn - d_fp) > 1e-9 * max(d_fn, d_fp):
        positive = d_fn > d_fp
    else:
        positive = int(fn.sum()) >= int(fp.sum())
    return SimulatedClick(p_fn, True) if positive else SimulatedClick(p_fp, False)  # type: ignore[arg-type]


def next_click_index(gt_mask: np.ndarray, pred_mask: Optional[np.ndarray],
                     spacing: Optional[Sequence[float]] = None,
                     avoid: Optional[Iterable[Sequence[int]]] = None) -> Optional[SimulatedClick]:
    """The next corrective click, as an index in the ARRAY's axis order (``spacing`` per array axis).

    ``avoid``: voxels clicked before (array axis order); the click is never one of them (see the module
    docstring). Returns None when there is nothing to correct (prediction equals ground truth, including
    both empty) or when every error voxel is in ``avoid``. An empty ground truth with false positives
    yields a negative click at the deepest false positive.
    """
    fn, fp = error_regions(gt_mask, pred_mask)
    click = _pick(fn, fp, spacing)
    taken = _avoid_mask(fn.shape, avoid)
    if click is None or taken is None or not taken[click.ijk]:
        return click
    return _pick(fn & ~taken, fp & ~taken, spacing)


def next_click(gt_mask: np.ndarray, pred_mask: Optional[np.ndarray],
               spacing_kji: Optional[Sequence[float]] = None,
               avoid_ijk: Optional[Iterable[Sequence[int]]] = None) -> Optional[SimulatedClick]:
    """The next corrective click on a VOLUME grid.

    ``gt_mask``, ``pred_mask``: arrays indexed ``[k, j, i]`` (``pred_mask`` None or all-zero before the
    first click); ``spacing_kji``: mm per array axis, i.e. ``Volume.spacing[::-1]``; ``avoid_ijk``: the
    voxels ``(i, j, k)`` clicked so far (as returned by earlier calls), never clicked again.
    Returns ``SimulatedClick(ijk=(i, j, k), positive)`` — note the REVERSED order, ready for
    ``Session.add_click(ijk=...)`` — or None when the prediction is already perfect (or every error voxel
    was clicked before).
    """
    avoid = None if avoid_ijk is None else [tuple(int(v) for v in p)[::-1] for p in avoid_ijk]
    click = next_click_index(gt_mask, pred_mask, spacing_kji, avoid)
    if click is None:
        return None
    k, j, i = click.ijk
    return SimulatedClick((i, j, k), click.positive)


def random_error_click(gt_mask: np.ndarray, pred_mask: Optional[np.ndarray],
                       rng: np.random.Generator) -> Optional[SimulatedClick]:
    """A click drawn uniformly from the whole error region ``FN | FP`` (the reference's later clicks).

    Index in the array's own axis order; positive when it falls in FN. None when there is no error.
    Used only by the legacy protocol (SAM-Med3D's published numbers); not deterministic unless ``rng``
    is seeded.
    """
    fn, fp = error_regions(gt_mask, pred_mask)
    err = np.flatnonzero((fn | fp).reshape(-1))
    if err.size == 0:
        return None
    flat = int(err[int(rng.integers(err.size))])
    idx = np.unravel_index(flat, fn.shape)
    return SimulatedClick(tuple(int(v) for v in idx), bool(fn.reshape(-1)[flat]))  # type: ignore[arg-type]
