"""Model-input regions: the cubic, isotropic, RAS-canonical grid the network sees, and the way back.

Frames and axis orders:

* Volume: ``array[k, j, i]``, ``ijk_to_ras`` (columns = i, j, k directions times spacing).
* Region: an ``S x S x S`` grid (default 128, 1.5 mm) indexed ``(a, b, c)``; ``region_to_ras`` maps
  ``(a, b, c, 1)`` to RAS mm. Its axes are the volume's i/j/k axes permuted and flipped so that a points
  most nearly to +R, b to +A, c to +S (nibabel/torchio ``ToCanonical``); an oblique volume's residual
  rotation is kept in ``region_to_ras``. Model arrays are ``[a, b, c]`` — the reference's NIfTI
  ``(i, j, k)`` crop order — and prompt points are ``(a, b, c)`` continuous indices (integers are voxel
  centres).
* The region is centred on ``centre_ras`` the way torchio ``CropOrPad`` centres an even-sized crop:
  index ``S // 2`` (64 for 128) lies exactly on the centre.
* Low-res logits (``s = S/4`` = 32 per axis) cover the same region; low-res voxel ``u`` sits at region
  index ``(u + 0.5) * S/s - 0.5`` (the ``align_corners=False`` convention of the 32 -> 128 upsample,
  :func:`~SAM3DSegmentLib.core.interp.rescale_index`).

Interpolation: ``model_input`` samples the original voxels ONCE (trilinear) at the region's voxel
centres; ``logits_to_volume`` samples the low-res logits (trilinear, clamped at the border like the
upsample) at the original voxel centres. Axis-aligned geometry (the region axes are the volume axes up
to permutation/flip, e.g. any non-oblique scan, LPS- or RAS-stored) uses separable 1D interpolation;
oblique geometry uses a general trilinear gather. The interpolation itself is :mod:`SAM3DSegmentLib.core.interp`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

from ..core.geometry import GeometryError, Volume, apply_affine, closest_canonical_axes
from ..core.interp import interp_axis, linear_matrix, rescale_index, trilinear

__all__ = ["Region", "model_input", "footprint", "logits_to_volume", "normalize_like_reference",
           "OUTSIDE_LOGIT", "sample_volume"]

#: Logit given to original voxels outside the region (sigmoid ~ 0).
OUTSIDE_LOGIT = -1.0e4


@dataclass(frozen=True, eq=False)
class Region:
    """A cubic model-input grid in physical space (see the module docstring for the frames).

    Immutable; compare two regions with :meth:`same_as` (``==`` is identity).
    """

    region_to_ras: np.ndarray
    size: int = 128
    spacing: float = 1.5

    # ----------------------------------------------------------------- construction
    @classmethod
    def around(cls, volume: Volume, centre_ras: Sequence[float], size: int = 128,
               spacing: float = 1.5) -> "Region":
        """The region of ``size``^3 voxels of ``spacing`` mm with index ``size // 2`` at ``centre_ras``."""
        centre = np.asarray(centre_ras, dtype=np.float64).reshape(3)
        if not np.all(np.isfinite(centre)):
            raise GeometryError(f"region centre must be finite, got {centre.tolist()}")
        if int(size) < 2 or spacing <= 0:
            raise GeometryError(f"region size must be >= 2 voxels and spacing > 0 (got {size}, {spacing})")
        perm, signs = closest_canonical_axes(volume.directions)
        axes = volume.directions[:, perm] * signs[None, :]  # columns: a, b, c directions in RAS
        m = np.eye(4)
        m[:3, :3] = axes * float(spacing)
        m[:3, 3] = centre - m[:3, :3] @ np.full(3, float(int(size) // 2))
        return cls(m, int(size), float(spacing))

    def same_as(self, other: "Region", atol: float = 1e-6) -> bool:
        return (self.size == other.size and abs(self.spacing - other.spacing) <= atol
                and bool(np.allclose(self.region_to_ras, other.region_to_ras, atol=atol)))

    def shifted(self, offset_index: Sequence[float]) -> "Region":
        """Same axes and spacing, moved by ``offset_index`` region voxels (a, b, c)."""
        off = np.asarray(offset_index, dtype=np.float64).reshape(3)
        m = self.region_to_ras.copy()
        m[:3, 3] = m[:3, 3] + m[:3, :3] @ off
        return Region(m, self.size, self.spacing)

    # ----------------------------------------------------------------- coordinates
    @property
    def ras_to_region(self) -> np.ndarray:
        return np.linalg.inv(self.region_to_ras)

    @property
    def shape(self) -> Tuple[int, int, int]:
        return (self.size, self.size, self.size)

    @property
    def centre_ras(self) -> np.ndarray:
        return apply_affine(self.region_to_ras, np.full(3, float(self.size // 2)))

    def ras_to_index(self, points_ras: np.ndarray) -> np.ndarray:
        """(N, 3) RAS -> (N, 3) continuous (a, b, c) region indices (voxel centres are integers)."""
        return apply_affine(self.ras_to_region, np.asarray(points_ras, dtype=np.float64))

    def index_to_ras(self, idx: np.ndarray) -> np.ndarray:
        return apply_affine(self.region_to_ras, np.asarray(idx, dtype=np.float64))

    def contains_index(self, idx: np.ndarray) -> np.ndarray:
        """True where a continuous index lies inside the region's voxels (edge inclusive)."""
        idx = np.asarray(idx, dtype=np.float64)
        return np.all((idx >= -0.5) & (idx <= self.size - 0.5), axis=-1)

    def index_to_volume_ijk(self, volume: Volume) -> np.ndarray:
        """4x4 affine from region (a, b, c) to the volume's continuous (i, j, k)."""
        return volume.ras_to_ijk @ self.region_to_ras


# --------------------------------------------------------------------------- interpolation
def _axis_map(m: np.ndarray, tol: float = 1e-6) -> Optional[np.ndarray]:
    """For a 4x4 affine between two grids, ``col[r]`` = the source axis feeding output row r, if the
    3x3 part is a scaled permutation (axis-aligned); else None."""
    a = np.abs(m[:3, :3])
    col = np.argmax(a, axis=1)
    if len(set(col.tolist())) != 3:
        return None
    for r in range(3):
        off = a[r].copy()
        off[col[r]] = 0.0
        if off.max() > tol * a[r, col[r]]:
            return None
    return col


#: OpenBLAS runs a GEMM single-threaded when M*N*K <= 65536 * GEMM_MULTITHREAD_THRESHOLD (4 by
#: default). On a busy 2-core machine its threaded GEMM stalls for tens of ms waiting for a core, so the
#: paste-back multiplies in row blocks below that size: same result, steady ~1 ms per 0.7 M voxels.
_SINGLE_THREAD_MNK = 65536 * 4


def _matmul_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` (float32, C order) computed in row blocks small enough for single-threaded BLAS."""
    m, k = a.shape
    n = b.shape[1]
    out = np.empty((m, n), dtype=np.float32)
    rows = max(1, _SINGLE_THREAD_MNK // max(1, n * k))
    if rows >= m:
        np.matmul(a, b, out=out)
        return out
    for r0 in range(0, m, rows):
        np.matmul(a[r0:r0 + rows], b, out=out[r0:r0 + rows])
    return out


def sample_volume(volume: Volume, region: Region, clamp: Optional[Tuple[float, float]] = None,
                  outside: float = 0.0) -> np.ndarray:
    """float32 ``[a, b, c]`` trilinear samples of ``volume`` at the region's voxel centres.

    ``outside`` (default zero) outside the volume (beyond half a voxel from its border voxels); ``clamp``
    (lo, hi) is applied to the original voxels before interpolating, as the reference clamps before resampling.
    """
    out = _sample_shifted(volume, region, clamp, float(outside))
    if outside:
        out += np.float32(outside)   # interpolation weights sum to 1 inside: (x - outside) sampled + outside
    return out


def _sample_shifted(volume: Volume, region: Region, clamp: Optional[Tuple[float, float]], shift: float
                    ) -> np.ndarray:
    """:func:`sample_volume` of ``clip(volume) - shift`` (zero outside the volume)."""
    size = region.size
    m = region.index_to_volume_ijk(volume)  # (a,b,c) -> (i,j,k)
    nijk = np.asarray(volume.shape_ijk)
    idx = np.arange(size, dtype=np.float64)
    col = _axis_map(m)
    # Box of source voxels needed (all 8 region corners, +1 for the 2-tap stencil).
    corners = np.array([[x, y, z] for x in (0, size - 1) for y in (0, size - 1) for z in (0, size - 1)], float)
    cijk = apply_affine(m, corners)
    lo = np.clip(np.floor(cijk.min(axis=0)).astype(int) - 1, 0, nijk - 1)
    hi = np.clip(np.ceil(cijk.max(axis=0)).astype(int) + 2, 1, nijk)
    if np.any(cijk.max(axis=0) < -0.5) or np.any(cijk.min(axis=0) > nijk - 0.5):
        return np.zeros((size,) * 3, dtype=np.float32)  # region entirely outside the volume
    sub = volume.array[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]]
    sub = sub.astype(np.float32, copy=True)
    if clamp is not None:
        np.clip(sub, float(clamp[0]), float(clamp[1]), out=sub)
    if shift:
        sub -= np.float32(shift)
    if col is not None:
        # Separable: volume axis v (i=0, j=1, k=2; array axis 2 - v) is fed by region axis col[v].
        out = sub
        for v in np.argsort([sub.shape[2 - v] / size for v in range(3)])[::-1]:  # biggest shrink first
            a_axis = col[v]
            coord = m[v, a_axis] * idx + m[v, 3] - lo[v]
            # validity relative to the WHOLE volume, not the sub-box
            valid = (coord + lo[v] >= -0.5) & (coord + lo[v] <= nijk[v] - 0.5)
            out = interp_axis(out, 2 - v, coord, valid)
        # out axes: array axis 2-v holds region axis col[v]; reorder to (a, b, c)
        region_axis_of_array_axis = [col[2 - ax] for ax in range(3)]
        order = [region_axis_of_array_axis.index(r) for r in range(3)]
        return np.ascontiguousarray(out.transpose(order), dtype=np.float32)
    # General (oblique) case: one trilinear gather at all region voxel centres.
    grid = np.stack(np.meshgrid(idx, idx, idx, indexing="ij"), axis=0).reshape(3, -1)
    ijk = m[:3, :3] @ grid + m[:3, 3:4]
    kji = ijk[::-1] - lo[::-1, None].astype(np.float64)
    # Valid w.r.t. the whole volume: reuse extend with the sub-box offset.
    valid = np.all((ijk >= -0.5) & (ijk <= (nijk - 0.5)[:, None]), axis=0)
    vals = trilinear(sub, kji)
    vals[~valid] = 0.0
    return vals.reshape(size, size, size)


def normalize_like_reference(image: np.ndarray) -> np.ndarray:
    """Z-normalise the WHOLE array with mean / std (unbiased, as torch's ``std``) of its voxels > 0
    (torchio ``ZNormalization(masking_method=lambda x: x > 0)``). No voxel > 0 or zero spread: the
    array is only shifted by the mean (std taken as 1) instead of failing."""
    img = np.asarray(image, dtype=np.float32)
    values = img[img > 0]
    if values.size == 0:
        return img.copy()
    mean = values.mean(dtype=np.float64)
    std = values.std(dtype=np.float64, ddof=1) if values.size > 1 else 0.0
    if not np.isfinite(std) or std == 0:
        std = 1.0
    out = img - np.float32(mean)
    out /= np.float32(std)
    return out


def model_input(volume: Volume, region: Region, clamp_hu: Optional[Tuple[float, float]] = None,
                intensity=None) -> np.ndarray:
    """The network input: float32 ``(S, S, S)`` in ``(a, b, c)`` order.

    One trilinear interpolation from the original grid, optional clamp of the original HU to
    ``clamp_hu = (lo, hi)`` (training used (-1000, 1000)), then:

    * ``intensity`` None (SAM-Med3D): zero outside the volume, z-normalisation over the voxels > 0
      (:func:`normalize_like_reference`);
    * ``intensity`` a :class:`~SAM3DSegmentLib.core.intensity.WindowZNorm` (3DSAM-adapter): clipped to its
      HU window (``clamp_hu``, when given, replaces that window), the window's low end outside the volume
      (as air), then ``(x - mean) / std`` with its dataset statistics.
    """
    if clamp_hu is not None and np.isscalar(clamp_hu):
        raise GeometryError("clamp_hu must be a (low, high) pair, e.g. (-1000, 1000)")
    if intensity is not None:
        if clamp_hu is not None:
            intensity = intensity.replaced(window=clamp_hu)
        lo, hi = intensity.window
        return intensity.apply(sample_volume(volume, region, (lo, hi), outside=lo))
    return normalize_like_reference(sample_volume(volume, region, clamp_hu))


# ---------------------------------------------------------------------------- way back
def footprint(volume: Volume, region: Region) -> Tuple[slice, slice, slice]:
    """``(k, j, i)`` slices of the bounding box of the volume voxels whose centres lie in the region.

    (For an oblique region, some voxels of the box lie outside it; ``logits_to_volume`` marks them.)
    An empty box (region outside the volume) has zero-length slices.
    """
    s = region.size
    corners = np.array([[x, y, z] for x in (-0.5, s - 0.5) for y in (-0.5, s - 0.5) for z in (-0.5, s - 0.5)])
    ijk = apply_affine(volume.ras_to_ijk @ region.region_to_ras, corners)
    eps = 1e-6
    lo = np.ceil(ijk.min(axis=0) - eps).astype(int)
    hi = np.floor(ijk.max(axis=0) + eps).astype(int) + 1
    nijk = np.asarray(volume.shape_ijk)
    lo = np.clip(lo, 0, nijk)
    hi = np.clip(hi, lo, nijk)
    return (slice(int(lo[2]), int(hi[2])), slice(int(lo[1]), int(hi[1])), slice(int(lo[0]), int(hi[0])))


def logits_to_volume(low_res_logits: np.ndarray, region: Region, volume: Volume,
                     box: Optional[Tuple[slice, slice, slice]] = None) -> np.ndarray:
    """Low-res logits ``(s, s, s)`` in ``(a, b, c)`` order -> float32 logits on the volume's ``box``.

    Trilinear in the low-res grid with the ``align_corners=False`` placement and border clamping of the
    reference's 32 -> 128 upsample, evaluated directly at the original voxel centres (no second
    resampling, no nearest-neighbour on a binary mask). Voxels of the box whose centres lie outside the
    region get :data:`OUTSIDE_LOGIT`. Returns an array of the box's shape ``(k, j, i)``; threshold at 0
    for the mask (sigmoid > 0.5).
    """
    logits = np.asarray(low_res_logits, dtype=np.float32)
    if logits.ndim != 3 or len(set(logits.shape)) != 1:
        raise GeometryError(f"low-res logits must be a cube (s, s, s), got shape {logits.shape}")
    if box is None:
        box = footprint(volume, region)
    s = logits.shape[0]
    scale = s / float(region.size)
    nk, nj, ni = (sl.stop - sl.start for sl in box)
    if nk * nj * ni == 0:
        return np.zeros((nk, nj, ni), dtype=np.float32)
    # volume ijk -> region abc -> low-res uvw (rescale_index)
    m = region.ras_to_region @ volume.ijk_to_ras
    start = np.array([box[2].start, box[1].start, box[0].start], dtype=np.float64)
    col = _axis_map(m)  # col[r]: the volume axis (i=0, j=1, k=2) that feeds region axis r
    if col is not None:
        # Region axis r is fed by volume axis col[r] alone: separable. Bring the logits to volume
        # (k, j, i) axis order, then apply one dense 2-tap interpolation matrix per axis with BLAS;
        # the last (largest) product writes the output in C order directly.
        counts = (ni, nj, nk)
        mats, valids = {}, {}
        for r in range(3):
            v = int(col[r])
            t = np.arange(counts[v], dtype=np.float64) + start[v]
            x = m[r, v] * t + m[r, 3]
            valids[v] = (x >= -0.5) & (x <= region.size - 0.5)
            mats[v] = linear_matrix(rescale_index(x, scale), s)
        # logits axes are region axes (a, b, c); array axis for volume axis v is list(col).index(v)
        lk = np.transpose(logits, [list(col).index(v) for v in (2, 1, 0)])  # -> (k, j, i) order
        lk = np.ascontiguousarray(lk).reshape(s, s * s)
        t1 = _matmul_rows(mats[2], lk).reshape(nk, s, s)                        # (nk, s_j, s_i)
        t1 = np.ascontiguousarray(t1.transpose(0, 2, 1)).reshape(nk * s, s)      # (nk * s_i, s_j)
        t2 = _matmul_rows(t1, np.ascontiguousarray(mats[1].T)).reshape(nk, s, nj)
        t2 = np.ascontiguousarray(t2.transpose(0, 2, 1)).reshape(nk * nj, s)     # (nk * nj, s_i)
        res = _matmul_rows(t2, np.ascontiguousarray(mats[0].T)).reshape(nk, nj, ni)
        if not valids[2].all():
            res[~valids[2]] = OUTSIDE_LOGIT
        if not valids[1].all():
            res[:, ~valids[1]] = OUTSIDE_LOGIT
        if not valids[0].all():
            res[:, :, ~valids[0]] = OUTSIDE_LOGIT
        return res
    kk, jj, ii = np.meshgrid(np.arange(nk) + start[2], np.arange(nj) + start[1], np.arange(ni) + start[0],
                             indexing="ij")
    ijk = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=0).astype(np.float64)
    x = m[:3, :3] @ ijk + m[:3, 3:4]
    inside = np.all((x >= -0.5) & (x <= region.size - 0.5), axis=0)
    vals = trilinear(logits, rescale_index(x, scale))
    vals[~inside] = OUTSIDE_LOGIT
    return vals.reshape(nk, nj, ni)
