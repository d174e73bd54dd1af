"""Image-guided upsampling: the model's boundary refined on the original voxels, with the CT as the guide.

SAM-Med3D answers on a 32^3 grid over its 192 mm region, one logit per 6 mm cell; interpolating those logits
(``SessionOptions.upsampling="trilinear"``, the reference's own way back) cannot draw anything thinner than
about a cell: 5 mm shells come out blobby, small spheres too big or too small. ``"guided"`` keeps the trilinear
mask and corrects it only near its boundary, where the CT clearly says otherwise:

1. **Band.** Voxels within ``band_mm`` (half a low-res cell: 3 mm) of the trilinear boundary, measured as the
   interpolated logit over its gradient (``L / |grad L|``), among the voxels where ``|L|`` is at most
   ``band_mm`` times the largest per-axis gradient of the low-res logits across their zero level (where the
   gradient is oblique to the voxel axes the band can be narrower, down to ``band_mm / sqrt(3)``). Nothing farther away changes: the cost is proportional to the boundary's area inside the
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

Cost: proportional to the boundary's area (a 100 mm ball at 0.8 x 0.8 x 1.5 mm: about 30000 band candidates,
~20-26 ms measured on a busy 2-core VM); more than ``max_band_cells`` candidates leave the trilinear mask (bounded time).

The noise standard deviation is estimated on each call from the band (median absolute difference between
neighbouring voxels), so texture makes the refinement more cautious. Figures and limits:
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
    #: at most this many band candidates (sampled voxels near the boundary, before the distance test) per call;
    #: beyond it the mask stays trilinear, so that a boundary everywhere (a noisy model answer) cannot stall a
    #: click: 400000 is about twice the band of a 120 x 104 x 92 mm shell at 1 x 1 x 1.25 mm voxels
    max_band_cells: int = 400_000

    @classmethod
    def for_cell(cls, cell_mm: float) -> "GuidedParams":
        c = float(cell_mm)
        return cls(band_mm=c / 2.0, profile_mm=c / 3.0, click_guard_mm=c / 2.0)

    def margin_voxels(self, spacing_kji: Sequence[float]) -> np.ndarray:
        """Voxels (per array axis) the refinement reads beyond the voxels it may change."""
        return np.ceil((self.band_mm + self.profile_mm) / np.asarray(spacing_kji, dtype=np.float64)).astype(int) + 2


def _neighbour_noise(guide_flat: np.ndarray, flat: np.ndarray) -> float:
    """Robust noise standard deviation of the guide: 1.4826 * MAD / sqrt(2) of the differences between the
    voxels ``flat`` (a subsample of at most 20000) and their next neighbours along the last axis; at least 1."""
    sel = flat[:: max(1, flat.size // 20000)]
    if sel.size < 8:
        return 1.0
    diff = guide_flat[sel + 1].astype(np.float32) - guide_flat[sel]
    mad = np.median(np.abs(diff - np.median(diff)))
    return max(float(1.4826 * mad / np.sqrt(2.0)), 1.0)


def gradient_bound(field: np.ndarray, spacing: Sequence[float]) -> float:
    """Bound of the gradient (units of ``field`` per mm) of the trilinear interpolant of ``field`` (a 3D grid of
    ``spacing`` mm per axis) near its zero level, along any one axis: the largest step between neighbours of
    opposite signs, per mm (an oblique gradient can be up to sqrt(3) times larger). 0 when the field does not
    change sign between neighbours."""
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
    return best


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
    gmax = gradient_bound(lg, sp) if grad_bound is None else float(grad_bound)
    if lg.size == 0 or np.all(params.band_mm < sp) or not gmax > 0:
        return plain
    from scipy import ndimage

    # 1. band, found on every ``step``-th voxel per axis (2 where voxels are at most half the band, else 1):
    # candidates |L| <= (band + the step's half-diagonal) * (gradient bound), then |L| / |grad L| (the gradient by
    # central differences, one-sided at the box's faces, of the logits clamped to +-50 so that outside-region
    # values (-1e4) and confident extremes do not dominate it); each such voxel stands for its step block
    nk, nj, ni = lg.shape
    step = np.where(2.0 * sp <= params.band_mm, 2, 1).astype(np.int64)
    reach = 0.5 * float(np.linalg.norm((step - 1) * sp))
    lim = np.float32((params.band_mm + reach) * gmax)
    coarse = lg[::step[0], ::step[1], ::step[2]]
    cflat = np.flatnonzero((coarse >= -lim) & (coarse <= lim))
    if cflat.size == 0 or cflat.size > params.max_band_cells:
        return plain
    ck, cj, ci = np.unravel_index(cflat, coarse.shape)
    k, j, i = ck * step[0], cj * step[1], ci * step[2]
    cand = (k * nj + j) * ni + i
    lflat = lg.reshape(-1)
    g = []
    for c, size, stride, h in ((k, nk, nj * ni, sp[0]), (j, nj, ni, sp[1]), (i, ni, 1, sp[2])):
        up, down = np.minimum(c + 1, size - 1) - c, c - np.maximum(c - 1, 0)
        hi = np.clip(lflat[cand + up * stride], -50.0, 50.0)
        lo = np.clip(lflat[cand - down * stride], -50.0, 50.0)
        g.append((hi - lo) / (np.maximum(up + down, 1) * np.float32(h)).astype(np.float32))
    gn = np.sqrt(g[0] * g[0] + g[1] * g[1] + g[2] * g[2])
    np.maximum(gn, np.float32(1e-6), out=gn)
    dist = lflat[cand] / gn                          # signed mm to the trilinear boundary (+ inside)
    sel = np.flatnonzero(np.abs(dist) <= params.band_mm + reach)
    if sel.size == 0:
        return plain
    cand, k, j, i, dist = cand[sel], k[sel], j[sel], i[sel], dist[sel]
    n = [g[a][sel] / gn[sel] for a in range(3)]      # unit normal towards the inside, mm space
    # 2. patches: blocks of ``block_mm`` per side, split by the normal's main direction (the two faces of a
    # thin shell are two patches); per patch its mean boundary point and normal, and the two tissues read
    # along that normal at 0.75, 1 and 1.5 x profile_mm on either side (trilinear)
    bs = np.maximum(np.round(params.block_mm / sp).astype(np.int64), 1)
    nb = np.array([(nk - 1) // bs[0] + 1, (nj - 1) // bs[1] + 1, (ni - 1) // bs[2] + 1])
    an = [np.abs(v) for v in n]
    axis = np.where(an[0] >= an[1], np.where(an[0] >= an[2], 0, 2), np.where(an[1] >= an[2], 1, 2))
    main = np.where(axis == 0, n[0], np.where(axis == 1, n[1], n[2]))
    block = ((k // bs[0]) * nb[1] + j // bs[1]) * nb[2] + i // bs[2]
    key = block * 6 + axis * 2 + (main > 0)
    nkeys = int(np.prod(nb)) * 6
    core = (np.abs(dist) <= params.band_mm).astype(np.float32)   # patch statistics: band voxels only
    cnt = np.bincount(key, weights=core, minlength=nkeys)
    active = np.flatnonzero(cnt)
    cnt = cnt[active]
    bpt = [np.bincount(key, weights=core * (c - dist * n[a] / sp[a]), minlength=nkeys)[active] / cnt
           for a, c in enumerate((k, j, i))]
    bn = np.stack([np.bincount(key, weights=core * n[a], minlength=nkeys)[active] for a in range(3)])
    bn /= np.maximum(np.sqrt((bn ** 2).sum(axis=0)), 1e-6)
    guide_c = np.ascontiguousarray(guide)
    guide_flat = guide_c.reshape(-1)
    noise = _neighbour_noise(guide_flat, cand[i < ni - 1])

    def tissue(sign: float) -> np.ndarray:
        pts = np.concatenate([np.stack(bpt) + (sign * f * params.profile_mm) * bn / sp[:, None]
                              for f in (0.75, 1.0, 1.5)], axis=1)
        vals = ndimage.map_coordinates(guide_c, pts, output=np.float32, order=1, mode="nearest")
        return vals.reshape(3, -1).mean(axis=0)

    table = np.zeros((2, nkeys), dtype=np.float32)
    table[0, active], table[1, active] = tissue(1.0), tissue(-1.0)
    # every voxel of each step block: its distance moves by the offset along the normal
    if np.any(step > 1):
        off = np.stack(np.meshgrid(*(np.arange(v) for v in step), indexing="ij")).reshape(3, -1)
        dd = dist[:, None] + np.stack(n, axis=1) @ (off * sp[:, None]).astype(np.float32)
        inside = np.abs(dd) <= np.float32(params.band_mm)
        for a, (c, size) in enumerate(((k, nk), (j, nj), (i, ni))):
            edge = np.flatnonzero(c + step[a] - 1 >= size)   # blocks cut by the box's far face
            if edge.size:
                inside[edge] &= c[edge, None] + off[a][None, :] < size
        rows, cols = np.nonzero(inside)
        cand = cand[rows] + ((off[0] * nj + off[1]) * ni + off[2])[cols]
        key, block = key[rows], block[rows]
    mu_in, mu_out = table[0, key], table[1, key]
    value = guide_flat[cand].astype(np.float32)
    contrast = mu_in - mu_out
    side = (value - 0.5 * (mu_in + mu_out)) * np.sign(contrast)   # > 0: the mu_in side
    dead = params.dead_zone * noise
    usable = (np.abs(contrast) >= params.min_contrast * noise) & (np.abs(side) <= np.abs(contrast) / 2 + 2 * dead)
    vote_in = usable & (side > dead)
    vote_out = usable & (side < -dead)
    # 4. blocks where a clear vote changed the trilinear answer: the dead zone follows the mid-level there
    was_in = plain.reshape(-1)[cand]
    strong = usable & (np.abs(side) > 2 * dead)
    changed = strong & ((vote_in & ~was_in) | (vote_out & was_in))
    if changed.any():
        hot = np.zeros(int(np.prod(nb)), dtype=bool)
        hot[block[changed]] = True
        hot = ndimage.binary_dilation(hot.reshape(nb), structure=np.ones((3, 3, 3), bool)).reshape(-1)[block]
        unsure = hot & usable & ~vote_in & ~vote_out
        vote_in |= unsure & (side > 0)
        vote_out |= unsure & (side <= 0)
    out = plain.copy()
    o = out.reshape(-1)
    o[cand[vote_in]] = True
    o[cand[vote_out]] = False
    # 5. clicks: within the guard of an include click no voxel of the trilinear mask is removed, within that of
    # an exclude click none outside it is added
    r = params.click_guard_mm / sp
    for pos, include in clicks_kji:
        q = np.asarray(pos, dtype=np.float64).reshape(3)
        lo = np.maximum(np.floor(q - r), 0).astype(int)
        hi = np.minimum(np.ceil(q + r).astype(int) + 1, lg.shape)
        if np.any(hi <= lo):
            continue
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        kk, jj, ii = (((np.arange(a, b) - q[x]) * sp[x]) ** 2 for x, (a, b) in enumerate(zip(lo, hi)))
        near = (kk[:, None, None] + jj[None, :, None] + ii[None, None, :]) <= params.click_guard_mm ** 2
        if include:
            out[box] |= plain[box] & near
        else:
            out[box] &= plain[box] | ~near
    return out
