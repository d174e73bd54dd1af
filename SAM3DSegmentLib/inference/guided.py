"""Image-guided upsampling: the model's boundary refined on the original voxels, with the CT as the guide.

SAM-Med3D answers on a 32^3 grid over its 192 mm region, one logit per 6 mm cell; interpolating those logits
(``SessionOptions.upsampling="trilinear"``, the reference's own way back) cannot draw anything thinner than
about a cell: 5 mm shells come out blobby, small spheres too big or too small. ``"guided"`` keeps the trilinear
mask and corrects it only near its boundary, where the CT clearly says otherwise:

1. **Band.** Voxels within ``band_mm`` (half a low-res cell: 3 mm) of the trilinear boundary, measured as the
   interpolated logit over its gradient (``L / |grad L|``) on the voxels where ``|L|`` is small enough for that
   to be possible. Nothing farther away changes: the cost is proportional to the boundary's area inside the
   box being drawn, and voxels coarser than the band (3 mm or more on every axis) leave the mask untouched.
2. **Two tissues across the boundary.** For each band voxel, the CT is read inside and outside the trilinear
   boundary along its normal, averaged over the voxels nearest to 0.75, 1 and 1.5 times ``profile_mm`` (a
   third of a cell: 2 mm) away from it: ``mu_in`` and ``mu_out``, the two tissues the boundary separates there. Where they differ by less than ``min_contrast`` noise standard
   deviations (a label boundary without an intensity edge: two vertebrae, a lobe split) nothing changes.
3. **Clear votes only.** A voxel whose intensity lies more than ``dead_zone`` noise standard deviations on
   the ``mu_in`` side of the mid-level ``(mu_in + mu_out) / 2`` (and not past that tissue by more than half
   the contrast and the dead zone twice: a third tissue is no evidence) is put in the mask; one as clearly on
   the ``mu_out`` side is taken out. Voxels in the dead zone (partial-volume voxels at an edge the trilinear
   boundary already follows) keep the trilinear answer, so a smooth organ that the 32^3 grid draws well
   stays as it is instead of picking up noise.
4. **Where the trilinear boundary was wrong.** In the ``block_mm`` blocks where a vote beyond twice the dead
   zone changed a voxel (and in their neighbour blocks), the dead-zone voxels follow the mid-level too: there
   the trilinear boundary is off, and the edge is the better guess.
5. **Clicks.** Within ``click_guard_mm`` of an include click guidance never removes a voxel; within it of an
   exclude click it never adds one. Voxels that no region covers are never added.

The noise standard deviation is estimated on each call from the band (median absolute difference between
neighbouring voxels), so texture makes the refinement more cautious. Figures, and why this design
(profiles and dead zone rather than window statistics, a guided filter or per-voxel intensity decisions):
docs/guided_upsampling.md; benchmarks/bench_guided_upsampling.py measures it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

__all__ = ["GuidedParams", "guided_mask", "gradient_bound", "UPSAMPLING_MODES"]

#: ``SessionOptions.upsampling`` values: the reference's trilinear paste-back, or the image-guided refinement.
UPSAMPLING_MODES = ("trilinear", "guided")


@dataclass(frozen=True)
class GuidedParams:
    """Distances in mm (see the module docstring); ``for_cell`` scales them to a low-res cell size."""

    band_mm: float = 3.0
    profile_mm: float = 2.0
    dead_zone: float = 2.0
    min_contrast: float = 3.0
    block_mm: float = 4.0
    click_guard_mm: float = 3.0

    @classmethod
    def for_cell(cls, cell_mm: float) -> "GuidedParams":
        c = float(cell_mm)
        return cls(band_mm=c / 2.0, profile_mm=c / 3.0, click_guard_mm=c / 2.0)

    def margin_voxels(self, spacing_kji: Sequence[float]) -> np.ndarray:
        """Voxels (per array axis) the refinement reads beyond the voxels it may change."""
        return np.ceil((self.band_mm + self.profile_mm) / np.asarray(spacing_kji, dtype=np.float64)).astype(int) + 2


def _neighbour_noise(guide_flat: np.ndarray, flat: np.ndarray, stride: int, n_axis_last: np.ndarray) -> float:
    """Robust noise standard deviation: 1.4826 * MAD of differences between neighbours along the last axis,
    divided by sqrt(2), on (a subsample of) the band voxels that have a neighbour."""
    sel = flat[n_axis_last < n_axis_last.max()] if n_axis_last.size else flat
    if sel.size > 20000:
        sel = sel[:: sel.size // 20000]
    if sel.size < 8:
        return 1.0
    diff = guide_flat[sel + stride] - guide_flat[sel]
    mad = np.median(np.abs(diff - np.median(diff)))
    return max(float(1.4826 * mad / np.sqrt(2.0)), 1.0)


def gradient_bound(field: np.ndarray, spacing: Sequence[float]) -> float:
    """Bound of the gradient (units of ``field`` per mm) of the trilinear interpolant of ``field`` (a 3D grid of
    ``spacing`` mm per axis) near its zero level: sqrt(3) times the largest step between neighbours of
    opposite signs, per mm. 0 when the field does not change sign between neighbours."""
    f = np.asarray(field, dtype=np.float32)
    best = 0.0
    for ax in range(3):
        if f.shape[ax] < 2:
            continue
        a = np.take(f, range(f.shape[ax] - 1), axis=ax)
        b = np.take(f, range(1, f.shape[ax]), axis=ax)
        cross = (a > 0) != (b > 0)
        if cross.any():
            best = max(best, float(np.abs(a - b)[cross].max()) / float(spacing[ax]))
    return best * float(np.sqrt(3.0))


def guided_mask(logits: np.ndarray, guide: np.ndarray, spacing_kji: Sequence[float],
                params: GuidedParams = GuidedParams(), valid: Optional[np.ndarray] = None,
                clicks_kji: Sequence[Tuple[Sequence[float], bool]] = (),
                grad_bound: Optional[float] = None) -> np.ndarray:
    """The refined mask (bool, the shape of ``logits``) of ``logits > 0`` on a box of the volume.

    ``logits``: float32 ``(k, j, i)`` trilinear logits minus the threshold; ``guide``: the CT on the same box
    (any numeric dtype); ``spacing_kji``: mm per array axis (orthogonal voxel axes); ``valid``: where a region
    covers the voxel (None: everywhere); ``clicks_kji``: ``((k, j, i) continuous index in the box, include)``;
    ``grad_bound``: logits per mm that ``|grad L|`` does not exceed near ``L = 0`` (from the low-res logits,
    :func:`gradient_bound`; None: computed here from ``logits``, a few passes over the box).
    """
    lg = np.asarray(logits, dtype=np.float32)
    plain = lg > 0
    sp = np.asarray(spacing_kji, dtype=np.float64)
    shape = np.asarray(lg.shape)
    if lg.size == 0 or np.all(params.band_mm < sp) or np.all(plain) or not plain.any():
        return plain
    # Clamp the logits: outside-region values (-1e4) and confident extremes must not dominate the gradient.
    lc = np.clip(lg, -50.0, 50.0)
    # 1. band candidates: |L| <= band * (a bound of the gradient near the zero level)
    gmax = gradient_bound(lc, sp) if grad_bound is None else float(grad_bound)
    if not gmax > 0:
        return plain
    flat = np.flatnonzero(np.abs(lc) <= params.band_mm * gmax)
    strides = np.array([shape[1] * shape[2], shape[2], 1])
    coord = np.stack(np.unravel_index(flat, lg.shape)).astype(np.int64)
    lflat = lc.reshape(-1)
    grad = np.empty((3, flat.size), dtype=np.float32)
    for ax in range(3):
        hi = np.minimum(coord[ax] + 1, shape[ax] - 1)
        lo = np.maximum(coord[ax] - 1, 0)
        span = np.maximum(hi - lo, 1) * sp[ax]
        grad[ax] = (lflat[flat + (hi - coord[ax]) * strides[ax]] - lflat[flat - (coord[ax] - lo) * strides[ax]]) / span
    gnorm = np.sqrt((grad ** 2).sum(axis=0))
    dist = lflat[flat] / np.maximum(gnorm, 1e-6)          # signed mm to the trilinear boundary (+ inside)
    keep = np.abs(dist) <= params.band_mm
    if valid is not None:
        keep &= np.asarray(valid).reshape(-1)[flat]
    flat, coord, grad, gnorm, dist = flat[keep], coord[:, keep], grad[:, keep], gnorm[keep], dist[keep]
    if flat.size == 0:
        return plain
    normal = grad / np.maximum(gnorm, 1e-6)                  # unit, towards the inside (mm space)
    gflat = np.asarray(guide).reshape(-1)

    def sample(offset_mm: float) -> np.ndarray:
        """The guide averaged over the voxels nearest to 0.75, 1 and 1.5 times ``offset_mm`` along the normal
        from the trilinear boundary (three voxels: less noise than one, far cheaper than interpolating)."""
        acc = np.zeros(flat.size, dtype=np.float32)
        for f in (0.75, 1.0, 1.5):
            step = (f * offset_mm - dist)[None, :] * normal / sp[:, None]
            q = np.clip(np.rint(coord + step).astype(np.int64), 0, (shape - 1)[:, None])
            acc += gflat[q[0] * strides[0] + q[1] * strides[1] + q[2]]
        return acc / np.float32(3.0)

    mu_in, mu_out = sample(params.profile_mm), sample(-params.profile_mm)
    value = gflat[flat].astype(np.float32)
    noise = _neighbour_noise(gflat.astype(np.float32, copy=False), flat, 1, coord[2])
    contrast = mu_in - mu_out
    side = (value - 0.5 * (mu_in + mu_out)) * np.sign(contrast)   # > 0: the mu_in side
    dead = params.dead_zone * noise
    usable = (np.abs(contrast) >= params.min_contrast * noise) & (np.abs(side) <= np.abs(contrast) / 2 + 2 * dead)
    vote_in = usable & (side > dead)
    vote_out = usable & (side < -dead)
    # 4. blocks where a clear vote changed the trilinear answer: the dead zone follows the mid-level there
    was_in = plain.reshape(-1)[flat]
    strong = usable & (np.abs(side) > 2 * dead)
    changed = strong & ((vote_in & ~was_in) | (vote_out & was_in))
    if changed.any():
        from scipy import ndimage

        bs = np.maximum(np.round(params.block_mm / sp).astype(np.int64), 1)
        block = coord // bs[:, None]
        nb = block.max(axis=1) + 1
        bid = np.ravel_multi_index(tuple(block), tuple(nb))
        hot = np.zeros(int(np.prod(nb)), dtype=bool)
        hot[bid[changed]] = True
        hot = ndimage.binary_dilation(hot.reshape(nb), structure=np.ones((3, 3, 3), bool)).reshape(-1)[bid]
        unsure = hot & usable & ~vote_in & ~vote_out
        vote_in |= unsure & (side > 0)
        vote_out |= unsure & (side <= 0)
    # 5. clicks: no removal near include clicks, no addition near exclude clicks
    for pos, include in clicks_kji:
        d2 = (((coord - np.asarray(pos, dtype=np.float64).reshape(3, 1)) * sp[:, None]) ** 2).sum(axis=0)
        near = d2 <= params.click_guard_mm ** 2
        if include:
            vote_out &= ~near
        else:
            vote_in &= ~near
    out = plain.copy()
    o = out.reshape(-1)
    o[flat[vote_in]] = True
    o[flat[vote_out]] = False
    return out
