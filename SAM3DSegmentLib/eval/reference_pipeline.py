"""The SAM-Med3D reference pre/post-processing, re-implemented step by step for parity checks.

This is NOT the path our tool uses (see :mod:`SAM3DSegmentLib.inference.regions`); it reproduces what the
reference inference did (docs/reference/SAM_MED3D.md section 5), including its quirks, so benchmarks and tests can
compare against it. Written from the documented behaviour of torchio/SimpleITK (facts only):

1. ``Resample(1.5)`` (torchio): output size ``ceil(n * old_spacing / 1.5)`` per axis (singleton axes
   stay 1), same directions, origin at the input's continuous index ``0.5 * (1.5 / old_spacing - 1)``
   (the first voxel's outer corner is kept), SimpleITK linear (image) / nearest (labels), output pixel
   type = input pixel type, so integer images get interpolated values truncated toward zero.
2. ``ToCanonical``: permute / flip the voxel axes so they point most nearly to +R, +A, +S (no
   interpolation; an oblique volume keeps its rotation in the affine).
3. ``CropOrPad(128)`` centred on a voxel: crop index ``64`` (``S // 2``) is that voxel; padding is 0.
   With a mask, torchio takes the bounding box ``[first, last + 1)`` per axis, centre
   ``(first + last + 1) / 2``, and for an even target moves a non-integer centre down by half a voxel:
   the centre voxel is ``floor((first + last + 1) / 2)`` (:func:`torchio_mask_centre`).
4. ``ZNormalization(masking_method=x > 0)``: the whole crop minus the mean, divided by the (unbiased,
   torch default) standard deviation of its voxels > 0, in float32; no spread there is an error.
5. Paste-back: low-res logits (32^3) -> ``interpolate(size=128, mode="trilinear",
   align_corners=False)`` -> ``sigmoid > 0.5`` -> nearest-neighbour resampling of the 128^3 ROI mask
   (with its ROI affine) onto the original grid (0 outside the ROI).

Axis conventions: the model arrays are ``(a, b, c)`` = the canonical resampled volume's NIfTI
``(i, j, k)`` order; ``roi_to_ras`` maps ``(a, b, c, 1)`` to RAS. Our ``Volume`` arrays are
``[k, j, i]``. The returned mask of :func:`reference_paste_back` is ``[k, j, i]`` on the volume grid.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from ..core.geometry import Volume, closest_canonical_axes

__all__ = ["reference_resample", "reference_canonical", "reference_crop_or_pad", "reference_znorm",
           "torchio_mask_centre", "reference_crop", "reference_model_input", "reference_paste_back",
           "reference_upsampled_mask"]


def reference_resample(volume: Volume, spacing: float = 1.5, interpolation: str = "linear",
                       keep_integer_type: bool = True) -> Volume:
    """torchio ``Resample(spacing)`` semantics (see the module docstring, step 1)."""
    import SimpleITK as sitk

    src = volume.to_sitk()
    if not keep_integer_type and interpolation == "linear":
        src = sitk.Cast(src, sitk.sitkFloat32)
    old_spacing = np.asarray(src.GetSpacing(), dtype=np.float64)
    new_spacing = np.full(3, float(spacing))
    old_size = np.asarray(src.GetSize())
    new_size = np.ceil(old_size * old_spacing / new_spacing).astype(np.int64)
    new_size[old_size == 1] = 1
    origin_index = 0.5 * (new_spacing / old_spacing - 1.0)
    origin_lps = src.TransformContinuousIndexToPhysicalPoint(origin_index.tolist())
    f = sitk.ResampleImageFilter()
    f.SetSize([int(v) for v in new_size])
    f.SetOutputSpacing(new_spacing.tolist())
    f.SetOutputDirection(src.GetDirection())
    f.SetOutputOrigin(origin_lps)
    f.SetInterpolator({"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}[interpolation])
    f.SetDefaultPixelValue(0.0)
    f.SetOutputPixelType(src.GetPixelID())
    out = f.Execute(src)
    return Volume.from_sitk(out, **volume.meta)


def reference_canonical(volume: Volume) -> Volume:
    """Permute / flip the axes to the closest RAS-canonical order (nibabel ``as_closest_canonical``)."""
    perm, signs = closest_canonical_axes(volume.directions)
    arr_ijk = volume.array.transpose(2, 1, 0)  # (i, j, k)
    n = np.asarray(volume.shape_ijk)
    # new axis r = old axis perm[r], reversed when signs[r] < 0
    arr = arr_ijk.transpose(perm)
    f = np.zeros((4, 4))
    f[3, 3] = 1.0
    for r in range(3):
        if signs[r] < 0:
            arr = np.flip(arr, axis=r)
            f[perm[r], r] = -1.0
            f[perm[r], 3] = n[perm[r]] - 1.0
        else:
            f[perm[r], r] = 1.0
    return Volume(np.ascontiguousarray(arr.transpose(2, 1, 0)), volume.ijk_to_ras @ f, dict(volume.meta))


def torchio_mask_centre(mask_abc: np.ndarray) -> np.ndarray:
    """The voxel torchio ``CropOrPad(mask_name=...)`` puts at index ``S // 2`` for an even ``S``."""
    idx = np.nonzero(mask_abc)
    if len(idx[0]) == 0:
        raise ValueError("empty mask: torchio falls back to the volume centre")
    first = np.array([ax.min() for ax in idx])
    last = np.array([ax.max() for ax in idx])
    return np.floor((first + last + 1) / 2.0).astype(np.int64)


def reference_crop_or_pad(arr_abc: np.ndarray, centre_index: Sequence[int], size: int = 128,
                          pad_value: float = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Crop / pad ``arr_abc`` (any 3D axis order) to ``size``^3 with ``centre_index`` at ``size // 2``;
    padding is ``pad_value`` (torchio: 0) in ``arr_abc``'s dtype.

    Returns ``(crop, begin)``: crop index ``x`` is source index ``begin + x``.
    """
    c = np.asarray(centre_index, dtype=np.int64).reshape(3)
    begin = c - size // 2
    out = np.full((size,) * 3, pad_value, dtype=arr_abc.dtype)
    src_lo = np.maximum(begin, 0)
    src_hi = np.minimum(begin + size, np.asarray(arr_abc.shape))
    if np.all(src_hi > src_lo):
        dst_lo = src_lo - begin
        dst_hi = src_hi - begin
        out[dst_lo[0]:dst_hi[0], dst_lo[1]:dst_hi[1], dst_lo[2]:dst_hi[2]] = \
            arr_abc[src_lo[0]:src_hi[0], src_lo[1]:src_hi[1], src_lo[2]:src_hi[2]]
    return out, begin


def reference_znorm(crop: np.ndarray) -> np.ndarray:
    """torchio ``ZNormalization(masking_method=lambda x: x > 0)`` as the reference ran it: the numbers of
    :func:`~SAM3DSegmentLib.inference.regions.normalize_like_reference` (the whole crop minus the mean,
    divided by the unbiased standard deviation of its voxels > 0), but failing, as torchio does, when those
    voxels have no spread."""
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
    voxel there, rounding half up), or the grid centre. ``interpolation="nearest"`` for label maps.
    """
    canon = reference_canonical(reference_resample(volume, spacing, interpolation, keep_integer_type))
    arr_abc = canon.array.transpose(2, 1, 0)
    if centre_index is None:
        if centre_ras is not None:
            ijk = canon.ras_to_ijk_points(np.asarray(centre_ras, dtype=np.float64).reshape(3))
            centre_index = np.floor(ijk + 0.5).astype(np.int64)
        else:
            centre_index = np.asarray(arr_abc.shape) // 2
    crop, begin = reference_crop_or_pad(arr_abc, centre_index, size)
    roi_to_ras = canon.ijk_to_ras.copy()
    roi_to_ras[:3, 3] = canon.ijk_to_ras_points(begin.astype(np.float64))
    return crop, roi_to_ras


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
    return reference_znorm(crop.astype(np.float32)), roi_to_ras


def reference_upsampled_mask(low_res_logits: np.ndarray, size: int = 128) -> np.ndarray:
    """32^3 logits -> trilinear (align_corners=False) ``size``^3 -> sigmoid > 0.5, uint8 ``[a, b, c]``.

    The upsample is :func:`SAM3DSegmentLib.core.interp.resize` (torch's ``interpolate`` to within 1e-5) and
    ``sigmoid > 0.5`` is ``logits > 0``: the two differ only where float32 sigmoid rounds a logit within
    about 1e-7 of zero to exactly 0.5.
    """
    from ..core.interp import resize

    return (resize(low_res_logits, size) > 0).astype(np.uint8)


def reference_paste_back(low_res_logits: np.ndarray, roi_to_ras: np.ndarray, volume: Volume,
                         size: int = 128) -> np.ndarray:
    """Reference paste-back: uint8 mask ``[k, j, i]`` on ``volume``'s grid (see step 5)."""
    from ..io import resample_like

    mask_abc = reference_upsampled_mask(low_res_logits, size)
    roi = Volume(np.ascontiguousarray(mask_abc.transpose(2, 1, 0)), roi_to_ras)
    return resample_like(roi, volume, "nearest").array.astype(np.uint8)
