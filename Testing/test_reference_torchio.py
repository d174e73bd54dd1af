"""Reference mode == the reference's own pipeline, checked against torchio 0.20.23 itself (test-only oracle).

SAM-Med3D's inference (``validate_paired_img_gt``) runs torchio ``Resample(1.5)`` -> ``ToCanonical`` ->
``CropOrPad(128, mask_name="label")`` -> ``ZNormalization(x > 0)``, random clicks from numpy's global
state seeded with 233, ALL clicks so far + previous logits per step, and a torchio nearest-neighbour
paste-back. The cases are real-scan-like: sizes where ``n * spacing / 1.5`` is not an integer (a
256x256x108 head CT at 0.957x0.957x1.5 mm), a slice spacing stored as 1.4999999999999998, oblique
direction cosines whose column norms carry float noise, LPS-flipped and axis-permuted storage.

Frames: our arrays ``[k, j, i]``; torchio tensors ``(C, i, j, k)``; model arrays ``[a, b, c]``.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from SAM3DSegmentLib import phantoms as P
from SAM3DSegmentLib.geometry import Volume, make_ijk_to_ras
from SAM3DSegmentLib.reference_pipeline import (reference_canonical, reference_orientation, reference_preprocess,
                                                reference_resample, reference_validate, torchio_crop_begin)

torch = pytest.importorskip("torch")
tio = pytest.importorskip("torchio")
if not tio.__version__.startswith("0.20."):
    pytest.skip(f"the oracle is torchio 0.20 (the reference's); found {tio.__version__}", allow_module_level=True)

LPS = np.diag([-1.0, -1.0, 1.0])
#: i -> -A, j -> +S, k -> -R: every axis permuted, two reversed
PERMUTED = np.array([[0.0, 0.0, -1.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
#: A small oblique tilt whose direction columns times 1.5 have a norm of 1.4999999999999998
TILT = P.oblique_rotation((0.3, -0.2, 0.1))

# name: (shape_ijk, spacing, directions)
GRIDS = {
    "head_ct_lps": ((256, 256, 108), (0.957, 0.957, 1.5), LPS),
    "slice_spacing_1.4999999999999998": ((256, 256, 108), (0.957, 0.957, 1.4999999999999998), LPS),
    "oblique_float_noise": ((256, 256, 108), (0.957, 0.957, 1.5), TILT @ LPS),
    "oblique_12deg_permuted": ((150, 160, 60), (0.8, 0.8, 2.5), P.oblique_rotation((12, -8, 25)) @ PERMUTED),
    "lps_all_flipped_fine": ((97, 131, 41), (0.7, 0.7, 1.2), np.diag([-1.0, -1.0, -1.0])),
}


def _volume(name, seed=0):
    shape, spacing, directions = GRIDS[name]
    arr = np.random.default_rng(seed).integers(-1000, 1000, size=shape[::-1]).astype(np.int16)
    return Volume(arr, make_ijk_to_ras(spacing, directions, (118.3, 104.9, -61.7)))


def _tio(volume: Volume, array=None, cls=None):
    a = volume.array if array is None else np.asarray(array)
    tensor = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 1, 0))[None])
    return (cls or tio.ScalarImage)(tensor=tensor, affine=volume.ijk_to_ras.copy())


def _tio_preprocess(image: Volume, target: np.ndarray, size: int = 128):
    """torchio's steps as validate_paired_img_gt runs them: (canonical subject, cropped subject, input)."""
    subject = tio.Subject(image=_tio(image), label=_tio(image, target.astype(np.uint8), tio.LabelMap))
    canonical = tio.ToCanonical()(tio.Resample(1.5)(subject))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # empty label: torchio warns and centres
        cropped = tio.CropOrPad(mask_name="label", target_shape=(size,) * 3)(canonical)
    x = tio.ZNormalization(masking_method=lambda t: t > 0)(cropped.image.data)[0].numpy()
    return canonical, cropped, x


# ------------------------------------------------------------------------------------ grids
def test_grid_sizes_follow_torchio_020_not_ceil():
    """The issue's head CT: 163x163x108 (not 164), 107 slices with the 1.4999999999999998 spacing and
    with the oblique header whose column norm carries float noise."""
    expected = {"head_ct_lps": (163, 163, 108), "slice_spacing_1.4999999999999998": (163, 163, 107),
                "oblique_float_noise": (163, 163, 107)}
    norm = np.sqrt(np.sum((_volume("oblique_float_noise").ijk_to_ras[:3, :3]) ** 2, axis=0))
    assert norm[2] < 1.5  # the float noise this case is about
    for name, shape in expected.items():
        vol = _volume(name)
        assert reference_resample(vol).shape_ijk == shape, name
        assert tuple(tio.Resample(1.5)(_tio(vol)).spatial_shape) == shape, name


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_resample_and_canonical_equal_torchio(name):
    vol = _volume(name)
    res_t = tio.Resample(1.5)(_tio(vol))
    can_t = tio.ToCanonical()(res_t)
    res = reference_resample(vol)
    can = reference_canonical(res)
    assert res.shape_ijk == tuple(res_t.spatial_shape)
    np.testing.assert_array_equal(res.ijk_to_ras, res_t.affine)  # bit for bit
    assert can.shape_ijk == tuple(can_t.spatial_shape)
    np.testing.assert_array_equal(can.ijk_to_ras, can_t.affine)
    np.testing.assert_array_equal(can.array.transpose(2, 1, 0), can_t.data[0].numpy())  # int16 truncation too
    assert can.array.dtype == np.int16


def test_orientation_rule_equals_nibabel():
    from nibabel.orientations import io_orientation

    rng = np.random.default_rng(5)
    for n in range(300):
        angles = rng.uniform(-50, 50, 3) if n % 3 else rng.choice([-45.0, 45.0, 0.0, 44.9], 3)
        d = P.oblique_rotation(angles) @ np.diag(rng.choice([-1.0, 1.0], 3))[:, rng.permutation(3)]
        m = make_ijk_to_ras(rng.uniform(0.5, 3, 3), d)
        ornt = io_orientation(m)
        perm, signs = reference_orientation(m)
        for axis, (ras, sign) in enumerate(ornt):
            assert perm[int(ras)] == axis and signs[int(ras)] == sign, (angles, ornt, perm, signs)


# --------------------------------------------------------------------- crop offsets, inputs
def _boxes(shape_kji):
    k, j, i = shape_kji
    return {
        "interior": (slice(k // 3, k // 3 + 21), slice(50, 90), slice(10, 30)),       # odd and even extents
        "low_corner": (slice(0, 3), slice(0, 4), slice(0, 5)),                         # padding before
        "high_corner": (slice(k - 3, k), slice(j - 10, j), slice(i - 7, i)),           # padding after
        "single_voxel": (slice(k // 2, k // 2 + 1), slice(j // 2, j // 2 + 1), slice(7, 8)),
        "empty": None,                                                                 # volume centre
    }


@pytest.mark.parametrize("name", ["head_ct_lps", "oblique_float_noise", "oblique_12deg_permuted",
                                  "lps_all_flipped_fine"])
def test_crop_offsets_and_model_inputs_equal_torchio(name):
    vol = _volume(name, seed=1)
    for where, box in _boxes(vol.array.shape).items():
        target = np.zeros(vol.array.shape, bool)
        if box is not None:
            target[box] = True
        canonical, cropped, x = _tio_preprocess(vol, target)
        roi = reference_preprocess(vol, target)
        assert roi.grid_shape == tuple(canonical.spatial_shape), where
        np.testing.assert_array_equal(roi.roi_to_ras, cropped.image.affine, err_msg=where)  # the crop offset
        np.testing.assert_array_equal(roi.label, cropped.label.data[0].numpy(), err_msg=where)
        np.testing.assert_allclose(roi.image, x, rtol=0, atol=1e-4, err_msg=where)
        assert np.abs(roi.image - x).max() < 1e-5  # float32 statistics, one ulp apart at most


def test_crop_begin_rule_equals_torchio_for_odd_and_even_sizes():
    rng = np.random.default_rng(3)
    for n in range(60):
        shape = tuple(int(v) for v in rng.integers(3, 14, 3))
        size = int(rng.integers(4, 10))
        mask = np.zeros(shape, np.uint8)
        if n % 6:
            lo = [int(rng.integers(0, s)) for s in shape]
            hi = [int(rng.integers(a, s)) + 1 for a, s in zip(lo, shape)]
            mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 1
        data = np.arange(np.prod(shape), dtype=np.int32).reshape(shape) + 1
        subject = tio.Subject(image=tio.ScalarImage(tensor=torch.from_numpy(data[None])),
                              label=tio.LabelMap(tensor=torch.from_numpy(mask[None])))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out = tio.CropOrPad(mask_name="label", target_shape=(size,) * 3)(subject).image.data[0].numpy()
        begin = torchio_crop_begin(shape, size, mask)
        first = out[out > 0].min() - 1  # the first source voxel the crop holds
        src = np.array(np.unravel_index(first, shape))
        dst = np.argwhere(out == first + 1)[0]
        np.testing.assert_array_equal(src - dst, begin, err_msg=f"{shape} size {size} mask {mask.any()}")
