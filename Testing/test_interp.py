"""The one interpolation helper (SAM3DSegmentLib.core.interp) and the box helpers (SAM3DSegmentLib.core.boxes).

Oracles: linear interpolation reproduces an affine function exactly between samples and its border value
beyond them; the separable numpy path and scipy's ``map_coordinates`` are independent implementations that
must agree; torch's ``F.interpolate`` (when installed) for the ``align_corners=False`` resize.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from SAM3DSegmentLib.core import boxes, interp


def _affine(shape, coef=(0.7, -1.3, 2.1), c0=0.4):
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    return (c0 + sum(c * g for c, g in zip(coef, grids))).astype(np.float32)


def test_rescale_index_is_the_align_corners_false_placement():
    # low-res cell u of a 32-cell axis sits at region index (u + 0.5) * 4 - 0.5 of the 128-voxel axis ...
    u = np.arange(32, dtype=np.float64)
    np.testing.assert_array_equal(interp.rescale_index(u, 128 / 32), 4 * u + 1.5)
    # ... and the way back is the inverse map; the grid edges (-0.5, n - 0.5) map onto each other
    np.testing.assert_allclose(interp.rescale_index(interp.rescale_index(u, 4.0), 0.25), u)
    assert interp.rescale_index(-0.5, 0.25) == -0.5 and interp.rescale_index(127.5, 0.25) == 31.5


def test_nearest_index_rounds_halves_up_and_clamps():
    got = interp.nearest_index([-3.0, -0.5, 0.49, 0.5, 1.5, 6.7, 99.0], 7)
    assert got.tolist() == [0, 0, 0, 1, 2, 6, 6]


@pytest.mark.parametrize("n", [1, 2, 5])
def test_linear_matrix_interpolates_and_clamps(n):
    coord = np.linspace(-2.0, n + 1.0, 37)
    mat = interp.linear_matrix(coord, n)
    np.testing.assert_allclose(mat.sum(axis=1), 1.0, atol=1e-6)        # a convex combination everywhere
    a = np.arange(n, dtype=np.float32) * 3.0 - 1.0                     # an affine axis
    np.testing.assert_allclose(mat @ a, np.clip(coord, 0, n - 1) * 3.0 - 1.0, atol=1e-5)
    np.testing.assert_allclose(interp.interp_axis(a, 0, coord), mat @ a, atol=1e-5)
    assert interp.linear_matrix(coord, n, dtype=np.float64).dtype == np.float64


def test_resize_matrix_is_the_separable_resize():
    x = np.random.default_rng(1).normal(size=(6, 6)).astype(np.float64)
    m = interp.resize_matrix(20, 6, dtype=np.float64)
    np.testing.assert_allclose(m @ x @ m.T, interp.resize(x, 20), atol=1e-5)


def test_resize_matches_torch_trilinear_on_any_shape():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(2).normal(size=(5, 8, 3)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x)[None, None], size=(17, 32, 7), mode="trilinear",
                                          align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(interp.resize(x, (17, 32, 7)), ref, atol=1e-5)
    with pytest.raises(ValueError, match="one size per axis"):
        interp.resize(x, (4, 4))


def test_trilinear_is_exact_on_an_affine_field_and_clamps_at_the_border():
    shape = (7, 9, 11)
    arr = _affine(shape)
    rng = np.random.default_rng(5)
    inside = rng.uniform(0, 1, size=(3, 400)) * (np.asarray(shape) - 1)[:, None]
    np.testing.assert_allclose(interp.trilinear(arr, inside), _affine_at(inside), atol=1e-4)
    anywhere = rng.uniform(-3, 14, size=(3, 400))
    clamped = np.clip(anywhere, 0, (np.asarray(shape) - 1)[:, None])
    np.testing.assert_allclose(interp.trilinear(arr, anywhere), _affine_at(clamped), atol=1e-4)
    # beyond half a sample from the border: ``outside``; within it: the clamped value
    edge = interp.trilinear(arr, anywhere, extend=0.5, outside=-7.0)
    out = np.any((anywhere < -0.5) | (anywhere > (np.asarray(shape) - 0.5)[:, None]), axis=0)
    assert out.any() and (~out).any() and np.all(edge[out] == -7.0)
    np.testing.assert_allclose(edge[~out], _affine_at(clamped)[~out], atol=1e-4)
    assert interp.trilinear(arr, anywhere, dtype=np.float64).dtype == np.float64


def _affine_at(coords, coef=(0.7, -1.3, 2.1), c0=0.4):
    return c0 + sum(c * x for c, x in zip(coef, coords))


def test_gather_and_separable_paths_agree_on_random_data():
    """scipy's gather and the numpy taps are independent implementations of the same interpolation."""
    x = np.random.default_rng(3).normal(size=(6, 7, 5)).astype(np.float32)
    size = (13, 9, 11)
    coords = [interp.rescale_index(np.arange(m, dtype=np.float64), n / m) for n, m in zip(x.shape, size)]
    grid = np.stack(np.meshgrid(*coords, indexing="ij"), axis=0).reshape(3, -1)
    np.testing.assert_allclose(interp.trilinear(x, grid).reshape(size), interp.resize(x, size), atol=1e-5)


# ----------------------------------------------------------------------------------------------- boxes
def _brute_bounds(m, margin=0):
    idx = np.argwhere(m)
    if len(idx) == 0:
        return None
    return tuple(slice(max(int(lo) - margin, 0), min(int(hi) + 1 + margin, n))
                 for lo, hi, n in zip(idx.min(axis=0), idx.max(axis=0), m.shape))


def test_mask_bounds_matches_brute_force_for_any_dtype_and_dimension():
    rng = np.random.default_rng(0)
    for _ in range(400):
        shape = tuple(rng.integers(1, 7, rng.integers(1, 5)))
        m = rng.random(shape) < rng.choice([0.0, 0.02, 0.3])
        for dtype in (bool, np.uint8, np.int16, np.float32):
            margin = int(rng.integers(0, 3))
            assert boxes.mask_bounds(m.astype(dtype) * (3 if dtype is not bool else 1), margin) \
                == _brute_bounds(m, margin)


def test_box_algebra():
    a = (slice(0, 4), slice(2, 6), slice(1, 3))
    b = (slice(2, 8), slice(0, 3), slice(2, 9))
    assert boxes.box_union(a, None) == a and boxes.box_union(None, None) is None
    assert boxes.box_union(a, b) == (slice(0, 8), slice(0, 6), slice(1, 9))
    assert boxes.box_intersect(a, b) == (slice(2, 4), slice(2, 3), slice(2, 3))
    assert boxes.box_intersect(a, (slice(4, 5), slice(0, 9), slice(0, 9))) is None       # touching faces
    assert boxes.box_shape(a) == (4, 4, 2) and boxes.box_size(a) == 32
    inner = boxes.box_intersect(a, b)
    assert boxes.absolute(boxes.relative(inner, a), a) == inner
    assert boxes.box_contains(boxes.box_union(a, b), a) and not boxes.box_contains(a, b)
    assert boxes.normalise_box((slice(None, np.int64(3)), slice(1, 2), slice(0, 5))) == (
        slice(0, 3), slice(1, 2), slice(0, 5))
    voxels = [v for v in itertools.product(range(2, 5), range(7, 8), range(0, 3))]
    assert boxes.points_box(voxels) == (slice(2, 5), slice(7, 8), slice(0, 3)) and boxes.points_box([]) is None
