"""One prompt's low-res logits -> an instance: its mask on the region's grid, its stability, its mask on the input grid.

Frames: the region grid is treated as a volume whose array is indexed ``[c, b, a]`` (the reverse of the region's
``(a, b, c)`` axes, as a volume's ``[k, j, i]``), so that :func:`regions.logits_to_volume` upsamples the logits
onto it exactly as it pastes them onto the input grid (trilinear, ``align_corners=False``, border clamped).

Steps (cheap first; each failure is a named rejection counted by the generator):

1. ``empty``: no low-res cell around the prompt is above ``threshold - offset``.
2. ``too_large``: the low-res estimate of the mask's volume (its 26-connected cells holding the prompt,
   counted at ``threshold - offset``) exceeds ``slack`` times ``max_volume_ml`` (the exact check is step 6);
   the rejection carries those cells.
3. ``prompt_outside_mask``: on the region grid (128^3, 1.5 mm for SAM-Med3D) the prompt's voxel is not in the
   mask at ``threshold``. The instance is the 26-connected part of the mask holding the prompt.
4. Stability score (segment-anything's definition, on the region grid): voxels above ``threshold + offset``
   divided by voxels above ``threshold - offset``, both counted in the 26-connected part at
   ``threshold - offset`` that holds the prompt.
5. Paste-back onto the input grid over the instance's box only; the instance there is the 26-connected part
   holding the prompt's voxel (else the largest part); ``vanishes`` when nothing is left (an object smaller
   than the input grid's voxels).
6. The generator then filters by score and volume and suppresses duplicates (:mod:`.nms`).

``cut_by_region``: the instance reaches a face of its region where the volume continues (the region saw only
part of the object: objects larger than the regions' overlap margin).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np

from . import regions as _regions
from ..core.geometry import Volume
from .nms import BoxMask

__all__ = ["RegionMask", "Rejection", "region_grid", "region_mask", "cut_inside_volume", "paste_instance"]

_FULL = np.ones((3, 3, 3), dtype=bool)   # 26-connectivity


@dataclass(frozen=True)
class RegionMask:
    """An instance on its region's grid (``mask``: array order ``[c, b, a]``), its stability score, the
    low-res volume estimate (ml) and whether the region cut it."""

    mask: BoxMask
    stability: float
    lowres_ml: float
    cut_by_region: bool


@dataclass(frozen=True)
class Rejection:
    """Why a prompt gave no instance (``reason``: a step's name) and, for ``too_large``, the mask's low-res cells
    (``[c, b, a]`` bool, 32^3 for SAM-Med3D): the generator skips later prompts that fall inside them."""

    reason: str
    cells: Optional[np.ndarray] = None


def region_grid(region) -> Volume:
    """The region's voxel grid as a :class:`Volume` (array ``[c, b, a]``, zeros; no memory held)."""
    s = int(region.size)
    return Volume(np.broadcast_to(np.zeros((), dtype=np.uint8), (s, s, s)), region.region_to_ras)


def _component_at(mask: np.ndarray, at: Tuple[int, int, int]) -> Optional[np.ndarray]:
    from scipy import ndimage

    if not mask[at]:
        return None
    labels, _ = ndimage.label(mask, structure=_FULL)
    return labels == labels[at]


def region_mask(logits: np.ndarray, region, volume: Volume, prompt_abc: np.ndarray, threshold: float = 0.0,
                offset: float = 1.0, max_volume_ml: Optional[float] = None,
                slack: float = 2.0) -> Union[RegionMask, "Rejection"]:
    """Steps 1-4 of the module docstring for one prompt (``prompt_abc``: continuous region index (a, b, c)) in
    ``region`` of ``volume``. Returns the :class:`RegionMask` or a :class:`Rejection`."""
    from scipy import ndimage

    lo_thr, hi_thr = threshold - offset, threshold + offset
    size = int(region.size)
    s = logits.shape[0]
    f = size / s
    p = np.clip(np.floor(np.asarray(prompt_abc, dtype=np.float64)[::-1] + 0.5), 0, size - 1).astype(int)  # (c, b, a)
    lt = np.asarray(logits, dtype=np.float32).transpose(2, 1, 0)          # low-res, [c, b, a]
    loose_cells = lt > lo_thr
    q = (p + 0.5) / f - 0.5
    near = np.unique(np.clip(np.stack([np.floor(q), np.floor(q) + 1]), 0, s - 1).astype(int), axis=0)
    cells = [tuple(int(v) for v in c) for c in np.array(np.meshgrid(*near.T, indexing="ij")).reshape(3, -1).T]
    if not any(loose_cells[c] for c in cells):
        return Rejection("empty")
    labels, _ = ndimage.label(loose_cells, structure=_FULL)
    seeds = {int(labels[c]) for c in cells} - {0}
    comp = np.isin(labels, list(seeds))
    cell_ml = (f * region.spacing) ** 3 / 1000.0
    lowres_ml = float(comp.sum()) * cell_ml
    if max_volume_ml is not None and lowres_ml > slack * float(max_volume_ml):
        return Rejection("too_large", comp)
    nz = [np.flatnonzero(comp.any(axis=tuple(b for b in range(3) if b != a))) for a in range(3)]
    lo = np.array([max(0, int((n[0] - 1) * f)) for n in nz])
    hi = np.array([min(size, int((n[-1] + 2) * f)) for n in nz])
    lo, hi = np.minimum(lo, p), np.maximum(hi, p + 1)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    up = _regions.logits_to_volume(logits, region, region_grid(region), box=box)
    at = tuple(int(v) for v in p - lo)
    if not up[at] > threshold:
        return Rejection("prompt_outside_mask")
    loose = _component_at(up > lo_thr, at)
    stability = float(np.count_nonzero(loose & (up > hi_thr))) / float(max(np.count_nonzero(loose), 1))
    inst = _component_at(loose & (up > threshold), at)
    bm = BoxMask.of(inst, offset=lo)
    return RegionMask(bm, stability, lowres_ml, cut_inside_volume(bm, region, volume))


def cut_inside_volume(bm: BoxMask, region, volume: Volume) -> bool:
    """True when the mask (region grid, ``[c, b, a]``) reaches a face of the region beyond which the volume
    continues: some mask voxel on that face has its outside neighbour inside the volume."""
    size = int(region.size)
    for axis in range(3):
        sl = bm.box[axis]
        for face, step in ((0, -1), (size - 1, 1)):
            if not sl.start <= face < sl.stop:
                continue
            layer = np.take(bm.mask, face - sl.start, axis=axis)
            pts = np.argwhere(layer)
            if pts.size == 0:
                continue
            others = [a for a in range(3) if a != axis]
            cba = np.zeros((len(pts), 3))
            cba[:, axis] = face + step
            for col, a in enumerate(others):
                cba[:, a] = pts[:, col] + bm.box[a].start
            ras = region.index_to_ras(cba[:, ::-1])
            if volume.contains_ijk(volume.ras_to_ijk_points(ras)).any():
                return True
    return False


def paste_instance(logits: np.ndarray, region, volume: Volume, rmask: BoxMask, prompt_ras: np.ndarray,
                   threshold: float = 0.0) -> Optional[BoxMask]:
    """Step 5: the instance on the input grid (``[k, j, i]`` box), or None when nothing is left there."""
    from scipy import ndimage

    cba_lo = np.array([s.start for s in rmask.box], dtype=np.float64) - 1.0
    cba_hi = np.array([s.stop - 1 for s in rmask.box], dtype=np.float64) + 1.0
    corners = np.array([[a, b, c] for a in (cba_lo[2], cba_hi[2]) for b in (cba_lo[1], cba_hi[1])
                        for c in (cba_lo[0], cba_hi[0])])
    ijk = volume.ras_to_ijk_points(region.index_to_ras(corners))
    n = np.asarray(volume.shape_ijk)
    lo = np.clip(np.floor(ijk.min(axis=0)).astype(int), 0, n)
    hi = np.clip(np.ceil(ijk.max(axis=0)).astype(int) + 1, 0, n)
    if np.any(hi <= lo):
        return None
    box = (slice(int(lo[2]), int(hi[2])), slice(int(lo[1]), int(hi[1])), slice(int(lo[0]), int(hi[0])))
    mask = _regions.logits_to_volume(logits, region, volume, box=box) > threshold
    if not mask.any():
        return None
    labels, count = ndimage.label(mask, structure=_FULL)
    pv = np.floor(volume.ras_to_ijk_points(np.asarray(prompt_ras, dtype=np.float64))[::-1] + 0.5).astype(int)
    rel = pv - np.array([b.start for b in box])
    keep = 0
    if np.all(rel >= 0) and np.all(rel < mask.shape):
        keep = int(labels[tuple(rel)])
    if keep == 0:
        keep = int(np.argmax(np.bincount(labels.ravel())[1:]) + 1) if count else 0
    if keep == 0:
        return None
    return BoxMask.of(labels == keep, offset=[b.start for b in box])
