"""Linear interpolation on regular grids: the one place the library resamples arrays (numpy and scipy only).

Convention: integer indices are sample centres (voxel or low-res cell centres). Two grids that cover the same
extent with ``n`` and ``m`` samples per axis (a 128^3 model region and its 32^3 low-res logits, say) see the
same point at index ``x`` of the first and :func:`rescale_index` ``(x, m / n) = (x + 0.5) * m / n - 0.5`` of
the second: the ``align_corners=False`` placement of torch's ``interpolate``.

Border: a position between a border sample and the grid's edge takes the border sample's value (clamped, as
torch's upsample does); how far beyond the border a position still counts as inside is the caller's choice
(``extend`` of :func:`trilinear`, validity masks elsewhere).

Resampling a whole volume onto another grid in physical space is SimpleITK's job
(:func:`SAM3DSegmentLib.io.volumes.resample_like`); this module serves the arrays of the model's regions.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["rescale_index", "nearest_index", "linear_taps", "linear_matrix", "resize_matrix", "interp_axis",
           "resize", "trilinear"]


def rescale_index(x, scale: float):
    """Index ``x`` of one grid -> the continuous index of the same point on a grid spanning the same extent
    with ``scale`` times as many samples per axis (``align_corners=False``)."""
    return (x + 0.5) * scale - 0.5


def nearest_index(coord, n: int) -> np.ndarray:
    """The sample nearest to each continuous position on a 0..n-1 axis (halves round up; clamped)."""
    return np.clip(np.floor(np.asarray(coord) + 0.5), 0, n - 1).astype(int)


def linear_taps(coord, n: int, weight_dtype=np.float32) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """2-tap linear weights for continuous positions ``coord`` on a 0..n-1 axis, positions clamped to
    [0, n-1]: the value at ``coord`` is ``(1 - w) * a[lo] + w * a[hi]``. Returns ``(lo, hi, w)``."""
    c = np.clip(np.asarray(coord, dtype=np.float64), 0.0, n - 1.0)
    lo = np.minimum(np.floor(c).astype(np.int64), max(n - 2, 0))
    hi = np.minimum(lo + 1, n - 1)
    w = (c - lo).astype(weight_dtype)
    return lo, hi, w


def linear_matrix(coord, n: int, dtype=np.float32) -> np.ndarray:
    """Dense ``(len(coord), n)`` matrix of the 2-tap linear weights of :func:`linear_taps`: ``matrix @ a``
    interpolates a length-``n`` axis ``a`` at ``coord`` (apply one per axis for separable resampling)."""
    lo, hi, w = linear_taps(coord, n, weight_dtype=dtype)
    mat = np.zeros((len(lo), n), dtype=dtype)
    rows = np.arange(len(lo))
    np.add.at(mat, (rows, lo), 1.0 - w)
    np.add.at(mat, (rows, hi), w)
    return mat


def resize_matrix(n_out: int, n_in: int, dtype=np.float32) -> np.ndarray:
    """``(n_out, n_in)`` matrix resizing an axis of ``n_in`` samples to ``n_out`` (``align_corners=False``)."""
    return linear_matrix(rescale_index(np.arange(n_out, dtype=np.float64), n_in / n_out), n_in, dtype)


def interp_axis(arr: np.ndarray, axis: int, coord, valid: Optional[np.ndarray] = None) -> np.ndarray:
    """Linear interpolation of ``arr`` along ``axis`` at positions ``coord`` (clamped at the border);
    positions where ``valid`` is False give 0."""
    lo, hi, w = linear_taps(coord, arr.shape[axis])
    a = np.take(arr, lo, axis=axis)
    b = np.take(arr, hi, axis=axis)
    shape = [1] * arr.ndim
    shape[axis] = len(lo)
    out = a + (b - a) * w.reshape(shape)
    if valid is not None and not valid.all():
        out *= valid.reshape(shape).astype(out.dtype)
    return out


def _torch_linear_taps(n: int, size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The taps torch's CPU linear kernel uses to resize ``n`` samples to ``size`` (``align_corners=False``):
    source position ``scale * (dst + 0.5) - 0.5`` with ``scale = n / size`` in float32 and one rounding
    (a fused multiply-add), clamped at 0; ``lo = min(floor(pos), n - 1)``, ``hi = min(lo + 1, n - 1)``,
    ``w = min(pos - lo, 1)`` (float32). Returns ``(lo, hi, w)``."""
    scale = np.float64(np.float32(n) / np.float32(size))
    dst = np.arange(size, dtype=np.float64) + 0.5
    pos = np.maximum((scale * dst - 0.5).astype(np.float32), np.float32(0.0))
    lo = np.minimum(np.floor(pos).astype(np.int64), n - 1)
    hi = np.minimum(lo + 1, n - 1)
    w = np.minimum(pos - lo.astype(np.float32), np.float32(1.0)).astype(np.float32)
    return lo, hi, w


def resize(arr: np.ndarray, shape: Union[int, Sequence[int]]) -> np.ndarray:
    """Separable linear resize (trilinear for 3D) to ``shape`` (an int: the same size on every axis) with
    ``align_corners=False``: torch's ``F.interpolate(mode="trilinear", align_corners=False)``; float32.

    Rounded as torch's CPU kernel rounds (:func:`_torch_linear_taps`; last axis first, each 2-tap step
    ``fma(a, 1 - w, round(b * w))``, the fused multiply-add emulated in float64): bit for bit equal to
    torch's 1D and 3D kernels on x86 builds with FMA (checked with torch 2.13 on AVX512 in
    ``Testing/test_reference_torchio.py``); torch's 2D kernel rounds differently (a few float32 ulps apart). Reference
    mode needs the bits: the sign of every upsampled logit decides the reference's next random click.
    """
    out = np.asarray(arr, dtype=np.float32)
    sizes = [int(shape)] * out.ndim if np.isscalar(shape) else [int(v) for v in shape]
    if len(sizes) != out.ndim:
        raise ValueError(f"resize to {tuple(sizes)}: give one size per axis of the {out.ndim}D array")
    for axis in reversed(range(out.ndim)):
        lo, hi, w = _torch_linear_taps(out.shape[axis], sizes[axis])
        taps = [1] * out.ndim
        taps[axis] = len(lo)
        w = w.reshape(taps)
        a_w = np.take(out, lo, axis=axis).astype(np.float64)
        a_w *= np.float32(1.0) - w  # exact in float64: a product of two float32
        a_w += np.take(out, hi, axis=axis) * w  # + round(b * w): the fma, emulated in float64
        out = a_w.astype(np.float32)
    return out


def trilinear(arr: np.ndarray, coords, extend: float = np.inf, outside: float = 0.0,
              dtype=np.float32) -> np.ndarray:
    """Trilinear samples of a 3D array at continuous indices ``coords`` (3, N), in the array's axis order.

    Positions within ``extend`` of the border samples take the clamped value; further out ``outside``.
    ``dtype``: the precision of the result (scipy interpolates in double precision and rounds to it).
    """
    from scipy import ndimage

    c = np.asarray(coords, dtype=np.float64)
    out = ndimage.map_coordinates(arr, c, order=1, mode="nearest", output=dtype)
    if np.isfinite(extend):
        n = np.asarray(arr.shape, dtype=np.float64)[:, None]
        inside = np.all((c >= -extend) & (c <= n - 1 + extend), axis=0)
        out[~inside] = outside
    return out
