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
from pathlib import Path

import numpy as np
import pytest

from SAM3DSegmentLib.core.geometry import Volume, make_ijk_to_ras
from SAM3DSegmentLib.core.interp import resize
from SAM3DSegmentLib.data import phantoms as P
from SAM3DSegmentLib.eval.reference_mode import reference_preprocess, reference_validate
from SAM3DSegmentLib.eval.reference_pipeline import (reference_canonical, reference_orientation, reference_resample,
                                                     torchio_crop_begin)

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


FMA_BUILD = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _torch_resize(x, shape):
    mode = {1: "linear", 3: "trilinear"}[x.ndim]
    return torch.nn.functional.interpolate(torch.from_numpy(x)[None, None], size=shape, mode=mode,
                                           align_corners=False)[0, 0].numpy()


def test_upsampled_logits_round_like_torch():
    """32^3 -> 128^3 trilinear (core.interp.resize, the one upsampler) as torch's CPU kernel rounds it: bit for
    bit on x86 builds with FMA (the sign of every voxel decides the reference's next random click)."""
    rng = np.random.default_rng(1)
    for _ in range(4):
        x = (rng.standard_normal((32, 32, 32)) * 5).astype(np.float32)
        u, t = resize(x, 128), _torch_resize(x, (128,) * 3)
        if FMA_BUILD:
            np.testing.assert_array_equal(u, t)
        else:  # other builds round differently in the last bit
            np.testing.assert_allclose(u, t, rtol=0, atol=1e-5)


@pytest.mark.parametrize("src, dst", [((5, 7, 9), (17, 32, 7)), ((11, 13, 3), (29, 31, 10)),
                                      ((32, 32, 32), (100, 50, 64)), ((9, 9, 9), (4, 5, 3)), ((7,), (23,))])
def test_resize_rounds_like_torch_for_any_ratio(src, dst):
    """Non-power-of-two ratios and downsampling too: torch's float32 source index (one fused rounding) and
    its 2-tap rounding, so resize is torch's linear / trilinear kernel, not an approximation of it."""
    x = (np.random.default_rng(len(src) + sum(dst)).standard_normal(src) * 5).astype(np.float32)
    u, t = resize(x, dst), _torch_resize(x, dst)
    if FMA_BUILD:
        np.testing.assert_array_equal(u, t)
    else:
        np.testing.assert_allclose(u, t, rtol=0, atol=1e-5)


# ------------------------------------------------------------------- the whole reference run
def _ct_case(name="oblique_float_noise", shape=(190, 170, 72)):
    """A CT-like int16 phantom on the named grid's geometry (smaller field of view): a body with two
    labelled organs (label map values 1 and 3)."""
    _, spacing, directions = GRIDS[name]
    m = make_ijk_to_ras(spacing, directions, (118.3, 104.9, -61.7))
    shape_kji = shape[::-1]
    centre = m[:3, :3] @ ((np.asarray(shape) - 1) / 2.0) + m[:3, 3]
    rng = np.random.default_rng(11)
    image = np.full(shape_kji, -1000.0, np.float32)
    labels = np.zeros(shape_kji, np.uint8)
    body = P.ellipsoid_mask(m, shape_kji, P.Ellipsoid(centre, (80.0, 70.0, 50.0))).astype(bool)
    image[body] = 20.0
    for value, hu, offset, semi in ((1, 70.0, (-30, 10, 0), (22.0, 16.0, 18.0)),
                                    (3, 300.0, (35, -15, 8), (9.0, 12.0, 30.0))):
        organ = P.ellipsoid_mask(m, shape_kji, P.Ellipsoid(centre + np.asarray(offset, float), semi,
                                                          P.oblique_rotation((20.0, -10.0, 35.0)))).astype(bool)
        image[organ] = hu
        labels[organ] = value
    image += rng.normal(0.0, 25.0, shape_kji).astype(np.float32)
    return Volume(np.rint(image).astype(np.int16), m), labels


def _oracle_validate(backend, image: Volume, labels: np.ndarray, num_clicks: int, seed: int = 233):
    """validate_paired_img_gt with torchio 0.20 and torch doing every step (the model through ``backend``):
    ``(label map [k, j, i], {value: clicks}, {value: model input})``."""
    import torch.nn.functional as F

    saved = np.random.get_state()
    np.random.seed(seed)  # the reference seeds numpy's global state once per image
    try:
        out = np.zeros(labels.shape, np.uint8)
        clicks, inputs = {}, {}
        for value in sorted(int(v) for v in np.unique(labels) if v != 0):
            _, cropped, x = _tio_preprocess(image, labels == value, backend.image_size)
            inputs[value] = x
            gt = cropped.label.data[0] > 0
            clicks[value] = []
            if not gt.any():
                continue  # the reference returns an empty mask without drawing a click
            emb = backend.encode(x)
            pred = torch.zeros_like(gt)
            prev = None
            for _ in range(num_clicks):
                fn, fp = gt & ~pred, ~gt & pred
                error = fn | fp
                pool = torch.argwhere(error if error.any() else gt)
                point = pool[np.random.randint(len(pool))]
                clicks[value].append((tuple(int(v) for v in point), bool(fn[tuple(point)]) if error.any() else True))
                prev = backend.decode(emb, np.asarray([c[0] for c in clicks[value]], np.float32),
                                      np.asarray([int(c[1]) for c in clicks[value]]), prev)
                up = F.interpolate(torch.from_numpy(np.asarray(prev))[None, None], size=gt.shape,
                                   mode="trilinear", align_corners=False)
                pred = (torch.sigmoid(up) > 0.5)[0, 0]
            roi_mask = tio.LabelMap(tensor=pred[None].float(), affine=cropped.image.affine)
            grid = tio.ScalarImage(tensor=torch.zeros((1,) + image.shape_ijk), affine=image.ijk_to_ras.copy())
            pasted = tio.Resample(target=grid, image_interpolation="nearest")(roi_mask).data[0].numpy()
            out[pasted.transpose(2, 1, 0).astype(np.uint8) == 1] = value
        return out, clicks, inputs
    finally:
        np.random.set_state(saved)


@pytest.fixture(scope="module")
def demo_backend():
    from SAM3DSegmentLib.inference.backends import load_backend

    torch.set_num_threads(2)
    backend, _ = load_backend(None, str(Path(__file__).resolve().parents[1] / "SAM3DSegmentLib" / "resources" /
                                        "demo_model.pt"), "cpu")
    return backend


def _dice(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 1.0 if not (a.any() or b.any()) else 2.0 * (a & b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("grid", ["oblique_float_noise", "oblique_12deg_permuted"])
def test_reference_mode_reproduces_validate_paired_img_gt(demo_backend, grid):
    image, labels = _ct_case(grid)
    expected, clicks, inputs = _oracle_validate(demo_backend, image, labels, num_clicks=3)
    result = reference_validate(demo_backend, image, labels, num_clicks=3)
    assert sorted(result.objects) == [1, 3]
    for value, obj in result.objects.items():
        np.testing.assert_allclose(obj.roi.image, inputs[value], rtol=0, atol=1e-4)
        assert list(zip(obj.points, obj.positive)) == clicks[value]  # the same random clicks, in order
        assert len(obj.points) == 3 and obj.positive[0]  # all clicks so far were fed at step 3
        mine, theirs = result.label_map == value, expected == value
        assert theirs.sum() > 500, (value, theirs.sum())  # the demo model segments something
        assert _dice(mine, theirs) >= 0.999, (value, _dice(mine, theirs))
    assert result.label_map.dtype == np.uint8 and result.label_map.shape == labels.shape
