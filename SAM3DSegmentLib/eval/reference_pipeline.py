"""The SAM-Med3D reference pipeline's grid steps, re-implemented exactly (the steps of "reference mode").

This is NOT the path our tool uses (see :mod:`SAM3DSegmentLib.inference.regions`); it reproduces what the
reference inference code (``validate_paired_img_gt`` in ``utils/infer_utils.py`` of
github.com/uni-medical/SAM-Med3D, run with torchio 0.20 and nibabel 5) computes, quirks and rounding
included, so benchmarks, tests and reference mode (:mod:`SAM3DSegmentLib.eval.reference_mode`: the
clicks and the whole run) can compare against it. Written from the documented behaviour of
torchio/nibabel/SimpleITK (facts only); every step below was checked against torchio 0.20.23 itself
(``Testing/test_reference_torchio.py``).

1. ``Resample(1.5)`` (torchio 0.20): the image header goes through torchio's RAS affine, so the input
   spacing is the norm of each affine column (a spacing stored as 1.5 in an oblique header can come back
   as 1.4999999999999998). Output size ``floor(n * old_spacing / 1.5)`` per axis (singleton axes stay
   1), same directions, and the CENTRE of the image kept: the physical midpoint of the first and last
   voxel centres is the midpoint of the new grid. SimpleITK linear (image) / nearest (labels), default
   value 0, output pixel type = input pixel type, so integer images get interpolated values truncated
   toward zero. A 256x256x108 scan at 0.957x0.957x1.5 mm gives 163x163x108, and 107 slices when the
   slice spacing reads 1.4999999999999998.
2. ``ToCanonical`` (nibabel 5 ``io_orientation``): the nearest rotation to the direction matrix (polar
   decomposition); input axes taken in order of their largest absolute cosine (stable), each assigned to
   the RAS axis it points along most, that RAS axis then removed. Permute / flip the voxel axes
   accordingly (no interpolation; an oblique volume keeps its rotation in the affine).
3. ``CropOrPad(128, mask_name="label")``: the label's bounding box ``[first, last + 1)`` per axis, centre
   ``(first + last + 1) / 2``, moved down by half a voxel when exactly one of "target size even" and
   "centre on a voxel boundary" holds; the crop begins at ``centre - 128 / 2`` (negative: zero padding).
   Without a label voxel torchio centres on the volume: crop begins at ``ceil((n - 128) / 2)`` where
   ``n > 128`` and ``-ceil((128 - n) / 2)`` where ``n < 128``. The ROI affine moves the origin by the
   padding first (``-pad``) and then by the crop, as torchio's ``Pad`` then ``Crop`` do.
4. ``ZNormalization(masking_method=x > 0)``: the crop minus the mean, divided by the (unbiased) standard
   deviation of its voxels > 0, in float32 (statistics accumulated in float64 here; torch's float32
   reductions agree to about 1e-7 relative); no spread there is an error, as in torchio.
5. (The clicks and the model: :mod:`SAM3DSegmentLib.eval.reference_mode`.)
6. Paste-back: low-res logits (32^3) -> trilinear (align_corners=False) to 128^3, rounded as torch's CPU
   kernel rounds it (:func:`SAM3DSegmentLib.core.interp.resize`) -> ``sigmoid > 0.5`` ->
   nearest-neighbour resampling of the 128^3 ROI mask (with its ROI affine) onto the original grid (0
   outside the ROI).

Axis conventions: the model arrays are ``(a, b, c)`` = the canonical resampled volume's NIfTI
``(i, j, k)`` order; ``roi_to_ras`` maps ``(a, b, c, 1)`` to RAS. Our ``Volume`` arrays are
``[k, j, i]``. Masks returned on the volume grid are ``[k, j, i]``. No torch here.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from ..core.geometry import GeometryError, Volume, apply_affine

__all__ = ["reference_resample", "reference_orientation", "reference_canonical", "reference_grid",
           "torchio_crop_begin", "torchio_mask_centre", "reference_crop_or_pad", "reference_roi_affine",
           "reference_znorm", "reference_crop", "reference_model_input", "reference_upsampled_mask",
           "reference_paste_back", "reference_paste_mask"]


# ------------------------------------------------------------------------------- 1. resample
def reference_resample(volume: Volume, spacing: float = 1.5, interpolation: str = "linear",
                       keep_integer_type: bool = True) -> Volume:
    """torchio 0.20 ``Resample(spacing)`` (module docstring, step 1).

    ``keep_integer_type=False`` resamples a float32 copy (no truncation of integer images).
    """
    import SimpleITK as sitk

    # Volume.to_sitk derives spacing (column norms), directions and origin from ijk_to_ras with the
    # same float arithmetic as torchio's affine -> SimpleITK conversion.
    src = volume.to_sitk()
    if not keep_integer_type and interpolation == "linear":
        src = sitk.Cast(src, sitk.sitkFloat32)
    old_spacing = np.array(src.GetSpacing(), dtype=float)
    new_spacing = np.array(3 * (float(spacing),), dtype=float)
    old_size = np.array(src.GetSize())
    first_lps = np.array(src.GetOrigin(), dtype=float)
    last_lps = np.array(src.TransformIndexToPhysicalPoint((old_size - 1).tolist()), dtype=float)
    centre_lps = (last_lps + first_lps) / 2
    new_size = np.floor(old_size * old_spacing / new_spacing)
    new_size[old_size == 1] = 1
    if np.any(new_size < 1):
        axis = "ijk"[int(np.argmin(new_size))]
        raise GeometryError(f"the volume is thinner than one {spacing} mm voxel along {axis} "
                            f"({old_size.tolist()} voxels of {old_spacing.tolist()} mm): the reference "
                            "resampling leaves no voxel; give a larger volume")
    direction = np.asarray(src.GetDirection(), dtype=float).reshape(3, 3)
    half_extent = (new_size - 1) / 2 * new_spacing
    origin_lps = (centre_lps - direction @ half_extent).tolist()
    f = sitk.ResampleImageFilter()
    f.SetSize(new_size.astype(int).tolist())
    f.SetOutputSpacing(new_spacing.tolist())
    f.SetOutputDirection(src.GetDirection())
    f.SetOutputOrigin(origin_lps)
    f.SetInterpolator({"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}[interpolation])
    f.SetDefaultPixelValue(0.0)
    f.SetOutputPixelType(src.GetPixelID())
    out = f.Execute(src)
    return Volume.from_sitk(out, **volume.meta)


# ----------------------------------------------------------------------------- 2. canonical
def reference_orientation(ijk_to_ras: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``(perm, signs)``: RAS axis ``r`` is volume axis ``perm[r]`` times ``signs[r]`` (nibabel 5
    ``io_orientation`` rule, module docstring step 2)."""
    rzs = np.asarray(ijk_to_ras, dtype=np.float64)[:3, :3]
    zooms = np.sqrt(np.sum(rzs * rzs, axis=0))
    zooms[zooms == 0] = 1
    u, s, vt = np.linalg.svd(rzs / zooms, full_matrices=False)
    keep = s > s.max() * 3 * np.finfo(s.dtype).eps
    r = u[:, keep] @ vt[keep]
    perm = np.full(3, -1)
    signs = np.ones(3)
    for axis in np.argsort(np.min(-(r ** 2), axis=0), kind="stable"):
        col = r[:, axis]
        if np.allclose(col, 0):
            raise GeometryError("the volume's axes are degenerate (collinear directions); fix its header")
        ras = int(np.argmax(np.abs(col)))
        perm[ras] = axis
        signs[ras] = -1.0 if col[ras] < 0 else 1.0
        r[ras, :] = 0
    return perm, signs


def reference_canonical(volume: Volume) -> Volume:
    """torchio ``ToCanonical``: permute / flip the axes to the closest RAS order (module docstring, 2)."""
    perm, signs = reference_orientation(volume.ijk_to_ras)
    if np.array_equal(perm, [0, 1, 2]) and np.all(signs > 0):
        return Volume(volume.array, volume.ijk_to_ras.copy(), dict(volume.meta))
    arr_ijk = volume.array.transpose(2, 1, 0)  # (i, j, k)
    n = np.asarray(volume.shape_ijk)
    # new axis r = old axis perm[r], reversed when signs[r] < 0; f maps new (a, b, c, 1) to old (i, j, k, 1)
    arr = arr_ijk.transpose(perm)
    f = np.zeros((4, 4))
    f[3, 3] = 1.0
    for r in range(3):
        f[perm[r], r] = signs[r]
        if signs[r] < 0:
            arr = np.flip(arr, axis=r)
            f[perm[r], 3] = n[perm[r]] - 1.0
    return Volume(np.ascontiguousarray(arr.transpose(2, 1, 0)), volume.ijk_to_ras @ f, dict(volume.meta))


def reference_grid(volume: Volume, spacing: float = 1.5, interpolation: str = "linear"
                   ) -> Tuple[np.ndarray, np.ndarray]:
    """Steps 1-2: ``(array [a, b, c] of the canonical resampled volume, its ijk_to_ras)``."""
    canon = reference_canonical(reference_resample(volume, spacing, interpolation, keep_integer_type=True))
    return canon.array.transpose(2, 1, 0), canon.ijk_to_ras


# ---------------------------------------------------------------------------- 3. crop or pad
def torchio_crop_begin(shape_abc: Sequence[int], size: int = 128,
                       mask_abc: Optional[np.ndarray] = None) -> np.ndarray:
    """Where torchio ``CropOrPad(size, mask_name=...)`` starts its crop, per axis (int64; negative =
    zero padding before the first voxel). Volume-centred when ``mask_abc`` is None or empty."""
    shape = np.asarray(shape_abc, dtype=np.int64).reshape(3)
    mask = None if mask_abc is None else np.asarray(mask_abc)
    if mask is None or not mask.any():
        crop = np.maximum(shape - size, 0)
        pad = np.maximum(size - shape, 0)
        return (np.ceil(crop / 2) - np.ceil(pad / 2)).astype(np.int64)
    begin = np.zeros(3, dtype=np.int64)
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        centre = (int(hit[0]) + int(hit[-1]) + 1) / 2
        if (size % 2 == 0) != (centre % 1 == 0):
            centre -= 0.5
        begin[axis] = int(centre - size / 2)
    return begin


def torchio_mask_centre(mask_abc: np.ndarray) -> np.ndarray:
    """The voxel torchio ``CropOrPad(mask_name=...)`` puts at index ``S // 2`` for an even ``S``:
    ``floor((first + last + 1) / 2)`` of the mask's bounding box."""
    idx = np.nonzero(mask_abc)
    if len(idx[0]) == 0:
        raise ValueError("empty mask: torchio falls back to the volume centre (torchio_crop_begin)")
    first = np.array([ax.min() for ax in idx])
    last = np.array([ax.max() for ax in idx])
    return np.floor((first + last + 1) / 2.0).astype(np.int64)


def _crop_at(arr_abc: np.ndarray, begin: np.ndarray, size: int, pad_value: float = 0) -> np.ndarray:
    out = np.full((size,) * 3, pad_value, dtype=arr_abc.dtype)
    src_lo = np.maximum(begin, 0)
    src_hi = np.minimum(begin + size, np.asarray(arr_abc.shape))
    if np.all(src_hi > src_lo):
        dst_lo = src_lo - begin
        dst_hi = src_hi - begin
        out[dst_lo[0]:dst_hi[0], dst_lo[1]:dst_hi[1], dst_lo[2]:dst_hi[2]] = \
            arr_abc[src_lo[0]:src_hi[0], src_lo[1]:src_hi[1], src_lo[2]:src_hi[2]]
    return out


def reference_crop_or_pad(arr_abc: np.ndarray, centre_index: Optional[Sequence[int]] = None, size: int = 128,
                          pad_value: float = 0, begin: Optional[Sequence[int]] = None
                          ) -> Tuple[np.ndarray, np.ndarray]:
    """Crop / pad ``arr_abc`` (any 3D axis order) to ``size``^3 starting at ``begin``, or with
    ``centre_index`` at ``size // 2`` (``begin = centre_index - size // 2``); padding is ``pad_value``
    (torchio: 0) in ``arr_abc``'s dtype.

    Returns ``(crop, begin)``: crop index ``x`` is source index ``begin + x``.
    """
    if begin is None:
        if centre_index is None:
            raise ValueError("give centre_index or begin")
        b = np.asarray(centre_index, dtype=np.int64).reshape(3) - size // 2
    else:
        b = np.asarray(begin, dtype=np.int64).reshape(3)
    return _crop_at(arr_abc, b, size, pad_value), b


def reference_roi_affine(canon_ijk_to_ras: np.ndarray, shape_abc: Sequence[int], begin: Sequence[int],
                         size: int = 128) -> np.ndarray:
    """The ROI affine torchio's ``Pad`` then ``Crop`` leave (module docstring, step 3)."""
    m = np.array(canon_ijk_to_ras, dtype=np.float64)
    b = np.asarray(begin, dtype=np.int64).reshape(3)
    shape = np.asarray(shape_abc, dtype=np.int64).reshape(3)
    pad_ini, crop_ini = np.maximum(-b, 0), np.maximum(b, 0)
    end = b + size
    if np.any(pad_ini > 0) or np.any(end > shape):  # torchio pads when either side needs it
        m[:3, 3] = apply_affine(m, -pad_ini)
    if np.any(crop_ini > 0) or np.any(end < shape):
        m[:3, 3] = apply_affine(m, crop_ini)
    return m


# -------------------------------------------------------------------------------- 4. z-norm
def reference_znorm(crop: np.ndarray) -> np.ndarray:
    """torchio ``ZNormalization(masking_method=lambda x: x > 0)`` as the reference ran it: the numbers of
    :func:`~SAM3DSegmentLib.inference.regions.normalize_like_reference` (the whole crop minus the mean,
    divided by the unbiased standard deviation of its voxels > 0, float32), but failing, as torchio does,
    when those voxels have no spread (RuntimeError)."""
    from ..inference.regions import normalize_like_reference

    values = np.asarray(crop)[np.asarray(crop) > 0]
    if values.size < 2 or np.all(values == values.flat[0]):
        raise RuntimeError("Standard deviation is 0 for masked values (the reference fails here)")
    return normalize_like_reference(crop)


def reference_crop(volume: Volume, centre_ras: Optional[Sequence[float]] = None,
                   centre_index: Optional[Sequence[int]] = None, size: int = 128, spacing: float = 1.5,
                   interpolation: str = "linear", keep_integer_type: bool = True
                   ) -> Tuple[np.ndarray, np.ndarray]:
    """Steps 1-3 (resample, canonical, crop/pad): ``(crop [a, b, c] in the resampled dtype, roi_to_ras)``.

    Centre: ``centre_index`` (a, b, c) in the canonical resampled grid, or ``centre_ras`` (its nearest
    voxel there, rounding half up), each placed at ``size // 2``; else torchio's volume-centred crop.
    ``interpolation="nearest"`` for label maps.
    """
    canon = reference_canonical(reference_resample(volume, spacing, interpolation, keep_integer_type))
    arr_abc = canon.array.transpose(2, 1, 0)
    if centre_index is None and centre_ras is not None:
        ijk = canon.ras_to_ijk_points(np.asarray(centre_ras, dtype=np.float64).reshape(3))
        centre_index = np.floor(ijk + 0.5).astype(np.int64)
    if centre_index is None:
        begin = torchio_crop_begin(arr_abc.shape, size)
    else:
        begin = np.asarray(centre_index, dtype=np.int64).reshape(3) - size // 2
    crop, begin = reference_crop_or_pad(arr_abc, size=size, begin=begin)
    return crop, reference_roi_affine(canon.ijk_to_ras, arr_abc.shape, begin, size)


def reference_model_input(volume: Volume, centre_ras: Optional[Sequence[float]] = None,
                          centre_index: Optional[Sequence[int]] = None, size: int = 128,
                          spacing: float = 1.5, clamp_hu: Optional[Tuple[float, float]] = None,
                          keep_integer_type: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """The reference's network input and its ROI affine: ``(image float32 (S,S,S) [a,b,c], roi_to_ras)``.

    See :func:`reference_crop` for the centre. ``clamp_hu`` (training only) clamps the original voxels
    first. ``keep_integer_type=False`` turns off the integer truncation quirk of step 1.
    """
    vol = volume
    if clamp_hu is not None:
        vol = volume.with_array(np.clip(volume.array, clamp_hu[0], clamp_hu[1]).astype(volume.array.dtype))
    crop, roi_to_ras = reference_crop(vol, centre_ras, centre_index, size, spacing, "linear",
                                      keep_integer_type)
    return reference_znorm(crop), roi_to_ras


# ---------------------------------------------------------------------------- 6. paste-back
def reference_upsampled_mask(low_res_logits: np.ndarray, size: int = 128) -> np.ndarray:
    """32^3 logits -> trilinear (align_corners=False) ``size``^3 -> sigmoid > 0.5, uint8 ``[a, b, c]``.

    The upsample is :func:`SAM3DSegmentLib.core.interp.resize`, which rounds as torch's CPU kernel does (bit
    for bit on x86 builds with FMA), so the ``> 0`` decisions, and with them the reference's random clicks,
    are torch's. ``sigmoid > 0.5`` is ``logits > 0``: the two differ only where float32 sigmoid rounds a
    logit within about 1e-7 of zero to exactly 0.5.
    """
    from ..core.interp import resize

    return (resize(low_res_logits, size) > 0).astype(np.uint8)


def reference_paste_back(low_res_logits: np.ndarray, roi_to_ras: np.ndarray, volume: Volume,
                         size: int = 128) -> np.ndarray:
    """Reference paste-back: uint8 mask ``[k, j, i]`` on ``volume``'s grid (see step 6)."""
    return reference_paste_mask(reference_upsampled_mask(low_res_logits, size), roi_to_ras, volume)


def reference_paste_mask(mask_abc: np.ndarray, roi_to_ras: np.ndarray, volume: Volume) -> np.ndarray:
    """A 0/1 ``[a, b, c]`` ROI mask resampled (nearest neighbour) onto ``volume``'s grid: uint8 ``[k, j, i]``."""
    from ..io import resample_like

    roi = Volume(np.ascontiguousarray(np.asarray(mask_abc, dtype=np.uint8).transpose(2, 1, 0)), roi_to_ras)
    return resample_like(roi, volume, "nearest").array.astype(np.uint8)
