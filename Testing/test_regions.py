"""Model-input regions: sampling onto the 128^3 RAS-canonical grid, normalisation, footprint, and the
way back (low-res logits -> original voxels), checked against independent oracles (scipy
``map_coordinates``, torch ``interpolate``) and by a no-model round trip of a ground-truth mask.

Frames: ``Volume.array[k, j, i]``; region arrays ``[a, b, c]``; low-res logits ``[a, b, c]`` at s^3.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from SAM3DSegmentLib.data import phantoms as P
from SAM3DSegmentLib.core.geometry import GeometryError, Volume
from SAM3DSegmentLib.eval.reference_pipeline import reference_crop, reference_paste_back
from SAM3DSegmentLib.inference.regions import (OUTSIDE_LOGIT, Region, footprint, logits_to_volume, model_input,
                                     normalize_like_reference, sample_volume)

OBLIQUE = P.oblique_rotation((12.0, -8.0, 25.0))


def _volume(directions=OBLIQUE, spacing=(0.7, 0.7, 5.0), shape=(150, 140, 30), flip="ij", seed=0):
    image, mask = P.sphere_phantom(shape, spacing, directions, origin=(-40.0, 25.0, 110.0),
                                   radius_mm=25.0, hu_inside=70, hu_background=-300, noise=40, seed=seed,
                                   dtype=np.float32)
    if flip:
        image, mask = P.flip_axes(image, flip), P.flip_axes(mask, flip)
    return image, mask


def _oracle_sample(volume: Volume, region: Region) -> np.ndarray:
    """scipy trilinear at the region's voxel centres; 0 beyond half a voxel outside the volume."""
    s = region.size
    idx = np.arange(s, dtype=np.float64)
    grid = np.stack(np.meshgrid(idx, idx, idx, indexing="ij"), axis=0).reshape(3, -1)
    m = volume.ras_to_ijk @ region.region_to_ras
    ijk = m[:3, :3] @ grid + m[:3, 3:4]
    vals = ndimage.map_coordinates(volume.array.astype(np.float32), ijk[::-1], order=1, mode="nearest")
    n = np.asarray(volume.shape_ijk, dtype=np.float64)[:, None]
    vals[~np.all((ijk >= -0.5) & (ijk <= n - 0.5), axis=0)] = 0.0
    return vals.reshape(s, s, s)


def _dice(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


# ------------------------------------------------------------------------------ model input
@pytest.mark.parametrize("flip", ["", "ij", "k"])
def test_sample_volume_matches_scipy_oracle(flip):
    image, _ = _volume(flip=flip)
    # off-centre so that part of the region lies outside the volume (zero there)
    centre = image.ijk_to_ras_points(np.array([20.3, 100.7, 3.2]))
    region = Region.around(image, centre, size=64, spacing=1.5)
    ours = sample_volume(image, region)
    oracle = _oracle_sample(image, region)
    assert (oracle == 0).mean() > 0.2  # the region sticks out of the volume
    np.testing.assert_allclose(ours, oracle, atol=2e-3)


def test_general_path_for_a_region_not_aligned_with_the_volume():
    """A region whose axes are rotated relative to the volume exercises the non-separable path."""
    image, _ = _volume(directions=None, flip="")
    base = Region.around(image, image.ijk_to_ras_points(np.array([75.0, 70.0, 15.0])), size=48)
    rot = P.oblique_rotation((20, 0, 30))
    m = base.region_to_ras.copy()
    m[:3, :3] = rot @ m[:3, :3]
    region = Region(m, 48, 1.5)
    np.testing.assert_allclose(sample_volume(image, region), _oracle_sample(image, region), atol=2e-3)
    # logits back through the general path == scipy oracle in the low-res grid
    logits = np.random.default_rng(1).normal(size=(12, 12, 12)).astype(np.float32)
    box = footprint(image, region)
    ours = logits_to_volume(logits, region, image, box)
    kk, jj, ii = np.meshgrid(*[np.arange(s.start, s.stop) for s in box], indexing="ij")
    ijk = np.stack([ii.ravel(), jj.ravel(), kk.ravel()]).astype(np.float64)
    mm = region.ras_to_region @ image.ijk_to_ras
    x = mm[:3, :3] @ ijk + mm[:3, 3:4]
    u = (x + 0.5) * (12 / 48) - 0.5
    oracle = ndimage.map_coordinates(logits, u, order=1, mode="nearest")
    inside = np.all((x >= -0.5) & (x <= 47.5), axis=0)
    oracle[~inside] = OUTSIDE_LOGIT
    assert 0 < inside.mean() < 1
    np.testing.assert_allclose(ours.ravel(), oracle, atol=1e-4)


def test_model_input_normalisation_and_zero_outside():
    image, _ = _volume()
    centre = image.ijk_to_ras_points(np.array([10.0, 10.0, 2.0]))  # near a corner: much padding
    region = Region.around(image, centre, size=64)
    raw = sample_volume(image, region)
    img = model_input(image, region)
    pos = raw > 0
    assert pos.sum() > 100 and (raw == 0).sum() > 1000
    assert abs(img[pos].mean()) < 1e-4
    assert abs(img[pos].std(ddof=1) - 1.0) < 1e-4
    # everything else is shifted/scaled the same way (the reference normalises the whole crop)
    mean, std = raw[pos].mean(dtype=np.float64), raw[pos].std(dtype=np.float64, ddof=1)
    np.testing.assert_allclose(img, (raw - mean) / std, atol=1e-4)
    assert img.dtype == np.float32 and img.shape == (64, 64, 64)


def test_model_input_clamp_equals_clamping_the_volume_first():
    image, _ = _volume()
    image = image.with_array(image.array * 20.0)  # values far beyond +-1000
    region = Region.around(image, image.ijk_to_ras_points(np.array([75.0, 70.0, 15.0])), size=64)
    clamped = model_input(image, region, clamp_hu=(-1000, 1000))
    pre = model_input(image.with_array(np.clip(image.array, -1000, 1000)), region)
    np.testing.assert_allclose(clamped, pre, atol=1e-5)
    assert not np.allclose(clamped, model_input(image, region), atol=1e-2)
    with pytest.raises(GeometryError, match="pair"):
        model_input(image, region, clamp_hu=1000)


def test_normalisation_of_a_crop_without_positive_voxels_does_not_fail():
    out = normalize_like_reference(np.full((4, 4, 4), -5.0, np.float32))
    assert np.all(np.isfinite(out))


# ------------------------------------------------------------------------------- way back
def test_footprint_is_the_bounding_box_of_voxels_inside_the_region():
    image, _ = _volume(shape=(60, 50, 20), spacing=(2.0, 2.5, 4.0))
    region = Region.around(image, image.ijk_to_ras_points(np.array([5.0, 40.0, 10.0])), size=32, spacing=1.5)
    box = footprint(image, region)
    kk, jj, ii = np.meshgrid(*[np.arange(n) for n in image.array.shape], indexing="ij")
    ijk = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1).astype(float)
    x = region.ras_to_index(image.ijk_to_ras_points(ijk))
    inside = region.contains_index(x).reshape(image.array.shape)
    assert inside.any()
    nz = np.argwhere(inside)
    expected = tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(nz.min(axis=0), nz.max(axis=0)))
    assert box == expected
    logits = np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32)
    out = logits_to_volume(logits, region, image)
    assert out.shape == inside[box].shape
    assert np.all(out[~inside[box]] == OUTSIDE_LOGIT) and np.all(out[inside[box]] > OUTSIDE_LOGIT)


@pytest.mark.parametrize("flip", ["", "ij", "ijk"])
def test_logits_to_volume_equals_the_reference_upsample_on_a_matching_grid(flip):
    """On a 1.5 mm volume whose voxels coincide with the region's, our values must equal torch's
    ``interpolate(32 -> 128, trilinear, align_corners=False)`` at those voxels."""
    import torch

    image, _ = _volume(directions=OBLIQUE, spacing=(1.5, 1.5, 1.5), shape=(150, 140, 100), flip=flip)
    centre = image.ijk_to_ras_points(np.array([70.0, 60.0, 50.0]))
    region = Region.around(image, centre)
    logits = np.random.default_rng(3).normal(size=(32, 32, 32)).astype(np.float32)
    up = torch.nn.functional.interpolate(torch.from_numpy(logits)[None, None], size=(128,) * 3,
                                         mode="trilinear", align_corners=False)[0, 0].numpy()
    box = footprint(image, region)
    ours = logits_to_volume(logits, region, image, box)
    kk, jj, ii = np.meshgrid(*[np.arange(s.start, s.stop) for s in box], indexing="ij")
    ijk = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1).astype(float)
    idx = region.ras_to_index(image.ijk_to_ras_points(ijk))
    rounded = np.rint(idx).astype(int)
    np.testing.assert_allclose(idx, rounded, atol=1e-6)  # grids coincide
    np.testing.assert_allclose(ours.ravel(), up[rounded[:, 0], rounded[:, 1], rounded[:, 2]], atol=1e-5)


def test_logits_to_volume_anisotropic_matches_scipy_oracle():
    image, _ = _volume()
    region = Region.around(image, image.ijk_to_ras_points(np.array([70.0, 60.0, 14.0])))
    logits = np.random.default_rng(4).normal(size=(32, 32, 32)).astype(np.float32)
    box = footprint(image, region)
    ours = logits_to_volume(logits, region, image, box)
    kk, jj, ii = np.meshgrid(*[np.arange(s.start, s.stop) for s in box], indexing="ij")
    ijk = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1).astype(float)
    x = region.ras_to_index(image.ijk_to_ras_points(ijk))
    oracle = ndimage.map_coordinates(logits, ((x + 0.5) / 4 - 0.5).T, order=1, mode="nearest")
    inside = region.contains_index(x)
    oracle[~inside] = OUTSIDE_LOGIT
    np.testing.assert_allclose(ours.ravel(), oracle, atol=1e-4)


def test_logits_must_be_a_cube():
    image, _ = _volume()
    region = Region.around(image, image.ijk_to_ras_points(np.array([70.0, 60.0, 14.0])))
    with pytest.raises(GeometryError, match="cube"):
        logits_to_volume(np.zeros((32, 32, 16), np.float32), region, image)


def test_region_outside_the_volume_has_an_empty_footprint():
    image, _ = _volume()
    region = Region.around(image, image.ijk_to_ras_points(np.array([75.0, 70.0, 15.0])) + 1000.0)
    box = footprint(image, region)
    out = logits_to_volume(np.zeros((32, 32, 32), np.float32), region, image, box)
    assert out.size == 0
    assert np.all(sample_volume(image, region) == 0)


# ---------------------------------------------------------------------- acceptance round trip
def _pool(x: np.ndarray, f: int = 4) -> np.ndarray:
    s = x.shape[0] // f
    return x.reshape(s, f, s, f, s, f).mean(axis=(1, 3, 5))


@pytest.mark.parametrize("directions,flip", [(None, ""), (OBLIQUE, "ij")], ids=["axial", "oblique_lps"])
def test_mask_round_trip_through_the_region_keeps_dice(directions, flip):
    """No-model round trip of a ground-truth sphere (r = 25 mm) on a 0.7 x 0.7 x 5 mm volume with a
    non-zero origin, clicked at its centre.

    * 128^3 route: mask -> region grid by trilinear sampling (soft occupancy) -> logits = occupancy - 0.5
      at 128^3 -> ``logits_to_volume`` -> > 0. Reference: nearest-neighbour label resampling to 1.5 mm,
      canonical, crop, then nearest-neighbour paste-back. Ours must keep Dice >= 0.99 and beat it.
    * 32^3 route (the model's own bottleneck): the 128^3 occupancy average-pooled 4x4x4 to 32^3, logits =
      occupancy - 0.5, then ``logits_to_volume`` vs the reference's trilinear 32 -> 128 upsample, sigmoid
      > 0.5 and nearest-neighbour paste-back of the same pooled reference crop. Ours must not be worse.
    """
    image, mask = _volume(directions=directions, flip=flip, shape=(240, 240, 30))
    centre = np.asarray(mask.meta["centre_ras"])
    region = Region.around(mask, centre)
    soft = sample_volume(mask.with_array(mask.array.astype(np.float32)), region)
    box = footprint(mask, region)

    def ours(logits):
        out = np.zeros(mask.array.shape, np.uint8)
        out[box] = logits_to_volume(logits, region, mask, box) > 0
        return out

    ours128 = _dice(ours(soft - 0.5), mask.array)
    ours32 = _dice(ours(_pool(soft) - 0.5), mask.array)
    crop, roi_to_ras = reference_crop(mask, centre_ras=centre, interpolation="nearest")
    crop = crop.astype(np.float32)
    ref128 = _dice(reference_paste_back(crop - 0.5, roi_to_ras, mask, size=128), mask.array)
    ref32 = _dice(reference_paste_back(_pool(crop) - 0.5, roi_to_ras, mask, size=128), mask.array)
    print(f"\nround trip Dice (128^3 route) ours {ours128:.4f} reference {ref128:.4f}; "
          f"(32^3 bottleneck) ours {ours32:.4f} reference {ref32:.4f}")
    assert ours128 >= 0.99
    assert ours128 >= ref128
    assert ours32 >= ref32


def test_separable_and_general_paths_agree():
    """A region rotated by 1e-5 rad is not axis-aligned (general path) yet samples nearly the same points."""
    image, _ = _volume()
    region = Region.around(image, image.ijk_to_ras_points(np.array([70.0, 60.0, 14.0])), size=64)
    m = region.region_to_ras.copy()
    m[:3, :3] = P.oblique_rotation((1e-5 * 180 / np.pi, 0, 0)) @ m[:3, :3]
    tilted = Region(m, 64, 1.5)
    np.testing.assert_allclose(sample_volume(image, tilted), sample_volume(image, region), atol=1.0)
    logits = np.random.default_rng(6).normal(size=(16, 16, 16)).astype(np.float32)
    box = footprint(image, region)
    a = logits_to_volume(logits, region, image, box)
    b = logits_to_volume(logits, tilted, image, box)
    both = (a > OUTSIDE_LOGIT) & (b > OUTSIDE_LOGIT)
    assert both.mean() > 0.95
    np.testing.assert_allclose(a[both], b[both], atol=5e-3)  # <= 2 um shift x ~0.3 logit/mm
