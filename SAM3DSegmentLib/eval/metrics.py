"""Overlap and surface metrics for binary 3D masks, in physical units.

The mask functions take two boolean-like 3D arrays on the SAME voxel grid (any axis order) and, for the
surface metrics, ``spacing`` = millimetres per ARRAY axis (for ``Volume.array`` indexed ``[k, j, i]``
pass ``volume.spacing[::-1]``). Distances are Euclidean on that grid, so anisotropic voxels count
correctly (oblique grids too, as long as the axes are orthogonal).

Conventions (stated once, used everywhere):

* **Dice** ``2|P & G| / (|P| + |G|)``. Both empty -> 1.0 (nothing to find, nothing found);
  exactly one empty -> 0.0.
* **Surface** of a mask: its voxels with at least one 6-connected (face) neighbour outside the mask,
  i.e. ``mask & ~erosion(mask)`` with the region beyond the array edge counted as outside.
* **NSD** (normalised surface Dice, Nikolov et al. 2021) at tolerance ``tau`` mm: the fraction of
  surface voxels of both masks that lie within ``tau`` mm of the other mask's surface,
  ``(|{p in S_P : d(p, S_G) <= tau}| + |{g in S_G : d(g, S_P) <= tau}|) / (|S_P| + |S_G|)``,
  with ``d`` the Euclidean distance between voxel centres. Every surface voxel weighs the same (a
  voxel-count approximation of the surface-area-weighted original, as MONAI's ``compute_surface_dice``
  without sub-voxels). Both empty -> 1.0; exactly one empty -> 0.0.
* **HD95**: the 95th percentile of the pooled symmetric surface distances (both directions in one
  sample). Both empty -> 0.0; exactly one empty -> ``inf`` (callers writing JSON turn it into null).

The SegFM challenge's case scores (:func:`multiclass_scores`, :func:`click_auc`, at the end) take two integer
label maps and average the per-class numbers as the challenge does.

Everything is computed inside the bounding box of ``P | G`` (plus one voxel), which gives exactly the
same numbers as the whole array at a fraction of the cost on big CT volumes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

from ..core.boxes import box_union
from ..core.geometry import mask_bounds, spacing_mm

__all__ = ["dice", "surface", "surface_distances", "normalized_surface_dice", "hd95",
           "SegmentationScores", "score"]


def _pair(pred: np.ndarray, gt: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred)
    g = np.asarray(gt)
    if p.ndim != 3 or g.ndim != 3:
        raise ValueError(f"expected two 3D masks, got shapes {p.shape} and {g.shape}")
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {p.shape} differs from ground truth shape {g.shape}: "
                         "resample the prediction onto the ground-truth grid first")
    return p.astype(bool, copy=False), g.astype(bool, copy=False)


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice coefficient of two masks; 1.0 when both are empty, 0.0 when exactly one is."""
    p, g = _pair(pred, gt)
    n_p = int(np.count_nonzero(p))
    n_g = int(np.count_nonzero(g))
    if n_p + n_g == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(p & g)) / float(n_p + n_g)


_FACES = None


def _face_structure() -> np.ndarray:
    global _FACES
    if _FACES is None:
        from scipy import ndimage

        _FACES = ndimage.generate_binary_structure(3, 1)
    return _FACES


def surface(mask: np.ndarray) -> np.ndarray:
    """Boolean surface voxels of ``mask``: in the mask with a face neighbour outside (array edge = outside)."""
    from scipy import ndimage

    m = np.asarray(mask).astype(bool, copy=False)
    if m.ndim != 3:
        raise ValueError(f"expected a 3D mask, got shape {m.shape}")
    return m & ~ndimage.binary_erosion(m, structure=_face_structure(), border_value=0)


def surface_distances(pred: np.ndarray, gt: np.ndarray, spacing: Optional[Sequence[float]] = None
                      ) -> Tuple[np.ndarray, np.ndarray]:
    """``(d_pred_to_gt, d_gt_to_pred)``: for each surface voxel of one mask, the distance (mm) to the
    nearest surface voxel of the other. Empty arrays for an empty mask; when the OTHER mask is empty the
    distances are ``inf``.
    """
    from scipy import ndimage

    p, g = _pair(pred, gt)
    sp = spacing_mm(spacing)
    # One extra voxel each side (clipped at the array edge, where the edge acts as background).
    box = mask_bounds(p | g, margin=1)
    if box is None:
        return np.zeros(0), np.zeros(0)
    p, g = p[box], g[box]
    sp_, sg = surface(p), surface(g)
    # The crop's edge is either the array edge or a voxel outside both masks: erosion inside the crop
    # gives the same surfaces as on the whole array.

    def dist_to(target_surface: np.ndarray, at: np.ndarray) -> np.ndarray:
        n_at = int(np.count_nonzero(at))
        if n_at == 0:
            return np.zeros(0)
        if not target_surface.any():
            return np.full(n_at, np.inf)
        # distance_transform_edt gives, for every non-zero voxel, the distance to the nearest zero one.
        return ndimage.distance_transform_edt(~target_surface, sampling=sp)[at]

    return dist_to(sg, sp_), dist_to(sp_, sg)


def normalized_surface_dice(pred: np.ndarray, gt: np.ndarray, tolerance_mm: float,
                            spacing: Optional[Sequence[float]] = None) -> float:
    """NSD at ``tolerance_mm`` (see module docstring); 1.0 both empty, 0.0 exactly one empty."""
    if not np.isfinite(tolerance_mm) or tolerance_mm < 0:
        raise ValueError(f"NSD tolerance must be a non-negative number of mm, got {tolerance_mm!r}")
    d_pg, d_gp = surface_distances(pred, gt, spacing)
    return _nsd_from(d_pg, d_gp, tolerance_mm)


def _nsd_from(d_pg: np.ndarray, d_gp: np.ndarray, tolerance_mm: float) -> float:
    n = d_pg.size + d_gp.size
    if n == 0:
        return 1.0
    if d_pg.size == 0 or d_gp.size == 0:
        return 0.0
    tol = tolerance_mm + 1e-9  # a voxel exactly at the tolerance counts as inside
    return float((np.count_nonzero(d_pg <= tol) + np.count_nonzero(d_gp <= tol)) / n)


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Optional[Sequence[float]] = None) -> float:
    """95th percentile of the pooled symmetric surface distances (mm); 0.0 both empty, inf one empty."""
    d_pg, d_gp = surface_distances(pred, gt, spacing)
    return _hd95_from(d_pg, d_gp)


def _hd95_from(d_pg: np.ndarray, d_gp: np.ndarray) -> float:
    if d_pg.size + d_gp.size == 0:
        return 0.0
    if d_pg.size == 0 or d_gp.size == 0:
        return float("inf")
    return float(np.percentile(np.concatenate([d_pg, d_gp]), 95))


@dataclass(frozen=True)
class SegmentationScores:
    """Dice, NSD at ``tolerance_mm`` and HD95 (mm) of one prediction."""

    dice: float
    nsd: float
    hd95: float
    tolerance_mm: float


def score(pred: np.ndarray, gt: np.ndarray, spacing: Optional[Sequence[float]] = None,
          tolerance_mm: float = 2.0) -> SegmentationScores:
    """All three metrics at once (the surface distances are computed once)."""
    d_pg, d_gp = surface_distances(pred, gt, spacing)
    return SegmentationScores(dice=dice(pred, gt), nsd=_nsd_from(d_pg, d_gp, tolerance_mm),
                              hd95=_hd95_from(d_pg, d_gp), tolerance_mm=float(tolerance_mm))


# --------------------------------------------------------------------- SegFM challenge metrics
__all__ += ["SEGFM_NSD_DICE_GATE", "CaseScores", "multiclass_scores", "click_auc"]

#: The challenge computes the surface Dice of a case only when its mean Dice is above this (else NSD = 0).
SEGFM_NSD_DICE_GATE = 0.2


@dataclass(frozen=True)
class CaseScores:
    """Multi-class scores of one label map: ``dice`` / ``nsd`` = means over the classes (``nsd`` is 0.0 when
    ``dice`` is not above the gate, as the challenge); ``per_class`` = ``{label: (dice, nsd)}``, the per-class
    NSD computed whatever the gate."""

    dice: float
    nsd: float
    per_class: dict


def multiclass_scores(gt: np.ndarray, seg: np.ndarray, classes: Sequence[int],
                      spacing: Optional[Sequence[float]] = None, tolerance_mm: float = 2.0,
                      nsd_dice_gate: float = SEGFM_NSD_DICE_GATE) -> CaseScores:
    """Dice and NSD at ``tolerance_mm`` of each class of two integer label maps on the same grid (``spacing``
    per array axis), averaged over ``classes`` (the classes present in ``gt``, as the challenge). Each class is
    scored on the bounding box of its voxels in both maps (exactly the numbers of the whole array)."""
    from scipy import ndimage

    g = np.asarray(gt)
    s = np.asarray(seg)
    if g.shape != s.shape or g.ndim != 3:
        raise ValueError(f"expected two 3D label maps of one shape, got {g.shape} and {s.shape}")
    if g.dtype.kind not in "iub" or s.dtype.kind not in "iub":
        raise ValueError("label maps must hold integers")
    g = g.view(np.uint8) if g.dtype.kind == "b" else g
    s = s.view(np.uint8) if s.dtype.kind == "b" else s
    classes = [int(c) for c in classes]
    if not classes:
        raise ValueError("no classes to score (the ground truth holds no foreground)")
    if min(classes) < 1:
        raise ValueError(f"classes must be positive label values (0 is background), got {classes}")
    top = max(classes)
    g_boxes = ndimage.find_objects(g, max_label=top)
    s_boxes = ndimage.find_objects(s, max_label=top)
    per_class = {}
    for c in classes:
        box = box_union(g_boxes[c - 1], s_boxes[c - 1])
        if box is None:   # in neither map: a perfect "nothing"
            per_class[c] = (1.0, 1.0)
            continue
        gc, sc = g[box] == c, s[box] == c
        per_class[c] = (dice(sc, gc), normalized_surface_dice(sc, gc, tolerance_mm, spacing))
    mean_dice = float(np.mean([v[0] for v in per_class.values()]))
    mean_nsd = float(np.mean([v[1] for v in per_class.values()])) if mean_dice > nsd_dice_gate else 0.0
    return CaseScores(dice=mean_dice, nsd=mean_nsd, per_class=per_class)


def click_auc(values: Sequence[float]) -> float:
    """Area under a per-click score curve: the trapezoid rule with unit spacing between click steps (5 steps of
    scores in 0..1 give at most 4.0), as the challenge's DSC_AUC and NSD_AUC."""
    from scipy.integrate import trapezoid

    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size < 2:
        raise ValueError(f"an area under the click curve needs at least 2 click steps, got {v.size}")
    return float(trapezoid(v, dx=1.0))
