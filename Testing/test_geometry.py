"""Geometry acceptance: clicks land where they should on oblique, LPS-flipped, anisotropic volumes;
phantoms and the real sample data are where they claim to be in physical (RAS) space.

Frames: ``Volume.array[k, j, i]``; RAS mm; region arrays ``[a, b, c]`` (see SAM3DSegmentLib.inference.regions).
"""
from __future__ import annotations

import numpy as np
import pytest

from SAM3DSegmentLib.data import phantoms as P
from SAM3DSegmentLib.core.geometry import GeometryError, Volume
from SAM3DSegmentLib.inference.regions import Region, model_input, sample_volume

OBLIQUE = P.oblique_rotation((12.0, -8.0, 25.0))

# (name, directions, spacing, flip) — all with a non-zero origin
GEOMETRIES = [
    ("axial_aniso", None, (0.7, 0.7, 5.0), ""),
    ("axial_aniso_lps", None, (0.7, 0.7, 5.0), "ij"),
    ("oblique_aniso", OBLIQUE, (0.7, 0.7, 5.0), ""),
    ("oblique_aniso_lps", OBLIQUE, (0.7, 0.7, 5.0), "ij"),
    ("oblique_k_flipped", OBLIQUE, (0.9, 0.8, 2.5), "k"),
    ("sagittal_storage", P.oblique_rotation((0, 90, 0)) @ P.oblique_rotation((90, 0, 0)), (1.0, 0.8, 3.0), "ij"),
]


def _sphere(directions, spacing, flip, radius=15.0, centre=(21.3, -37.9, 64.2)):
    image, mask = P.sphere_phantom((120, 110, 24), spacing, directions, origin=None, centre_ras=None,
                                   radius_mm=radius, hu_inside=80, hu_background=-200, noise=5, seed=3)
    # move the grid so that its centre sits at a non-trivial RAS point (non-zero origin)
    shift = np.eye(4)
    shift[:3, 3] = centre
    image = Volume(image.array, shift @ image.ijk_to_ras)
    mask = Volume(mask.array, shift @ mask.ijk_to_ras)
    if flip:
        image, mask = P.flip_axes(image, flip), P.flip_axes(mask, flip)
    return image, mask, np.asarray(centre, dtype=np.float64)


@pytest.mark.parametrize("name,directions,spacing,flip", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
def test_click_at_sphere_centre_lands_in_sphere(name, directions, spacing, flip):
    image, mask, centre = _sphere(directions, spacing, flip)
    assert not np.allclose(image.origin, 0)
    # 1. Volume.ras_to_voxel: the nearest voxel is inside the sphere and within half a voxel.
    i, j, k = image.ras_to_voxel(centre)
    assert mask.array[k, j, i] == 1
    ijk = image.ras_to_ijk_points(centre)
    assert np.all(np.abs(ijk - np.array([i, j, k])) <= 0.5 + 1e-9)
    # 2. Region: the click is the region's centre voxel, and the sampled region has the sphere there.
    region = Region.around(image, centre)
    idx = region.ras_to_index(centre[None])[0]
    np.testing.assert_allclose(idx, [64, 64, 64], atol=1e-9)
    soft = sample_volume(mask.with_array(mask.array.astype(np.float32)), region)
    assert soft[64, 64, 64] > 0.99
    # A click 10 mm off-centre (still inside, along a direction mixing all axes) lands inside too.
    off = centre + np.array([6.0, -5.0, 5.5])
    a, b, c = np.floor(region.ras_to_index(off[None])[0] + 0.5).astype(int)
    assert soft[a, b, c] > 0.5
    # ...and a point 25 mm away (outside the 15 mm sphere) lands outside.
    far = centre + np.array([0.0, 25.0, 0.0])
    a, b, c = np.floor(region.ras_to_index(far[None])[0] + 0.5).astype(int)
    assert soft[a, b, c] < 0.5
    # 3. The normalised image is bright (inside value) at the click and dark at the far point.
    img = model_input(image, region)
    assert img[64, 64, 64] > img[a, b, c] + 1.0


@pytest.mark.parametrize("name,directions,spacing,flip", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
def test_region_axes_are_ras_canonical_and_keep_rotation(name, directions, spacing, flip):
    image, _, centre = _sphere(directions, spacing, flip)
    region = Region.around(image, centre)
    axes = region.region_to_ras[:3, :3] / region.spacing
    # each region axis points most nearly to +R, +A, +S respectively
    for r in range(3):
        assert np.argmax(np.abs(axes[:, r])) == r and axes[r, r] > 0
    # orthonormal, right-handed or not like the volume, parallel to the volume's axes (rotation kept)
    np.testing.assert_allclose(axes.T @ axes, np.eye(3), atol=1e-12)
    cos = np.abs(axes.T @ image.directions)
    np.testing.assert_allclose(np.sort(cos.max(axis=1)), 1.0, atol=1e-12)


def test_region_index_round_trip_and_shift():
    image, _, centre = _sphere(OBLIQUE, (0.7, 0.7, 5.0), "ij")
    region = Region.around(image, centre, size=128, spacing=1.5)
    pts = np.random.default_rng(0).uniform(-100, 100, size=(50, 3)) + centre
    np.testing.assert_allclose(region.index_to_ras(region.ras_to_index(pts)), pts, atol=1e-9)
    moved = region.shifted((64, 0, -32))
    np.testing.assert_allclose(moved.index_to_ras(np.zeros((1, 3))), region.index_to_ras(np.array([[64, 0, -32]])),
                               atol=1e-9)
    np.testing.assert_allclose(moved.region_to_ras[:3, :3], region.region_to_ras[:3, :3])
    np.testing.assert_allclose(np.linalg.norm(moved.centre_ras - region.centre_ras), 1.5 * np.hypot(64, 32))


def test_region_rejects_bad_arguments():
    image, _, centre = _sphere(None, (1, 1, 1), "")
    with pytest.raises(GeometryError, match="finite"):
        Region.around(image, [np.nan, 0, 0])
    with pytest.raises(GeometryError, match="size"):
        Region.around(image, centre, size=1)


def test_click_outside_volume_is_a_clear_error():
    image, _, centre = _sphere(OBLIQUE, (0.7, 0.7, 5.0), "ij")
    with pytest.raises(GeometryError, match="outside the volume"):
        image.ras_to_voxel(centre + np.array([500.0, 0, 0]))


# ------------------------------------------------------------------------------------ phantoms
def test_flip_axes_keeps_every_voxel_in_place():
    image, _ = P.sphere_phantom((30, 20, 10), (0.7, 0.9, 3.0), OBLIQUE, origin=(5, -3, 7), noise=20, seed=1)
    for axes in ("ij", "k", "ijk", "j"):
        flipped = P.flip_axes(image, axes)
        assert flipped.array.shape == image.array.shape
        assert not np.array_equal(flipped.array, image.array)
        rng = np.random.default_rng(2)
        ijk = np.stack([rng.integers(0, n, 40) for n in image.shape_ijk], axis=1)
        ras = image.ijk_to_ras_points(ijk.astype(float))
        for (i, j, k), p in zip(ijk, ras):
            fi, fj, fk = flipped.ras_to_voxel(p)
            assert flipped.array[fk, fj, fi] == image.array[k, j, i]
    lps = P.lps_flipped(image)
    # LPS-stored: i now runs the opposite way in physical space
    assert np.dot(lps.directions[:, 0], image.directions[:, 0]) < -0.99


def test_oblique_rotation_is_a_rotation():
    r = P.oblique_rotation((10, 20, 30))
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    assert np.isclose(np.linalg.det(r), 1.0)
    np.testing.assert_allclose(P.oblique_rotation((0, 0, 90)) @ [1, 0, 0], [0, 1, 0], atol=1e-12)


def test_sphere_phantom_volume_and_position():
    image, mask = P.sphere_phantom((80, 80, 30), (0.7, 0.7, 2.0), OBLIQUE, origin=(-20, 10, 40),
                                   centre_ras=None, radius_mm=12.0)
    vol_mm3 = mask.array.sum() * np.prod(mask.spacing)
    assert abs(vol_mm3 / (4 / 3 * np.pi * 12.0 ** 3) - 1) < 0.05
    idx = np.argwhere(mask.array)[:, ::-1].mean(axis=0)
    np.testing.assert_allclose(mask.ijk_to_ras_points(idx), mask.meta["centre_ras"], atol=0.5)
    assert image.array.dtype == np.int16
    assert np.all(image.array[mask.array == 1] == 60) and np.all(image.array[mask.array == 0] == -100)


def test_ct_body_phantom_objects_hu_and_sizes():
    # Same field of view as the 512x512x300 benchmark phantom, coarser voxels to stay fast.
    image, masks = P.ct_body_phantom((256, 256, 150), (1.6, 1.6, 3.0), noise=0)
    assert image.array.shape == (150, 256, 256) and image.array.dtype == np.int16
    assert image.array.min() == -1000
    expected = {"right_lung": -850, "left_lung": -850, "liver": 55, "spine": 700, "right_kidney": 30,
                "left_kidney": 35, "lesion": 120, "low_contrast_sphere": 60}
    for name, hu in expected.items():
        m = masks[name].array.astype(bool)
        assert m.sum() > 20, name
        assert np.all(image.array[m] == hu), name
    # masks of organs are exclusive; body holds them all
    organs = sum(masks[n].array.astype(int) for n in expected)
    assert organs.max() == 1
    assert np.all(masks["body"].array[organs == 1] == 1)
    # right lung on the patient's right (+R in RAS), spine posterior (-A)
    def centroid(name):
        return masks[name].ijk_to_ras_points(np.argwhere(masks[name].array)[:, ::-1].mean(axis=0))
    assert centroid("right_lung")[0] > 0 > centroid("left_lung")[0]
    assert centroid("spine")[1] < centroid("right_lung")[1]
    # the liver is larger than the model's 192 mm crop (region-extension tests need that)
    liver = np.argwhere(masks["liver"].array)[:, ::-1]
    ras = masks["liver"].ijk_to_ras_points(liver.astype(float))
    assert (ras.max(axis=0) - ras.min(axis=0)).max() > 192


def test_synthetic_case_is_reproducible_and_labelled():
    a_img, a_masks = P.synthetic_case(7, oblique=True)
    b_img, b_masks = P.synthetic_case(7, oblique=True)
    c_img, _ = P.synthetic_case(8)
    assert np.array_equal(a_img.array, b_img.array) and a_img.same_grid(b_img)
    assert not (a_img.array.shape == c_img.array.shape and np.array_equal(a_img.array, c_img.array))
    assert sorted(a_masks) == ["object_1", "object_2", "object_3"]
    total = sum(m.array.astype(int) for m in a_masks.values())
    assert total.max() == 1  # exclusive
    for name, m in a_masks.items():
        assert m.same_grid(a_img) and m.array.dtype == np.uint8
        assert m.array.sum() > 0, name
    assert not np.allclose(np.abs(a_img.directions), np.eye(3))  # oblique
    for seed in range(6):  # objects are placed apart: every label keeps a usable size
        _, masks = P.synthetic_case(seed)
        assert min(int(m.array.sum()) for m in masks.values()) > 200, seed


# --------------------------------------------------------------------------------- sample data
def _centroid_ras(mask: Volume) -> np.ndarray:
    return mask.ijk_to_ras_points(np.argwhere(mask.array)[:, ::-1].mean(axis=0))


def test_sample_chest_ct_and_segments_are_in_place():
    import slicerio

    from SAM3DSegmentLib.data import sample_data

    ct = sample_data.chest_ct()
    assert ct.array.shape == (34, 128, 128)
    np.testing.assert_allclose(ct.spacing, [3.046876, 3.046876, 10.0], atol=1e-4)
    segs = sample_data.chest_segments()
    assert sorted(segs) == sorted(sample_data.CHEST_SEGMENT_NAMES)
    for name, m in segs.items():
        assert m.same_grid(ct), name
        assert m.array.dtype == np.uint8 and m.array.sum() > 500, name
    # The raw segmentation grid coincides with the CT grid (so no resampling shift is possible).
    with sample_data.slicerio_data_file("Segmentation.seg.nrrd") as path:
        raw = slicerio.read_segmentation(path)
    from SAM3DSegmentLib.core.geometry import LPS_TO_RAS
    np.testing.assert_allclose(LPS_TO_RAS @ np.asarray(raw["ijkToLPS"]), ct.ijk_to_ras, atol=1e-4)
    # Anatomy in RAS. RAS = LPS with x and y negated; DICOM PS3.3 C.7.6.2.1.1 defines LPS +x as
    # "increasing to the left hand side of the patient", so RAS +x (R) increases toward the patient's
    # RIGHT: the right lung has the larger R coordinate.
    right, left = _centroid_ras(segs["right lung"]), _centroid_ras(segs["left lung"])
    assert right[0] > left[0] + 50
    for lung in ("right lung", "left lung"):
        assert ct.array[segs[lung].array == 1].mean() < -600  # air-filled
    ribs_hu = ct.array[segs["ribs"].array == 1].mean()
    assert ribs_hu > 100  # bone
    spine = [_centroid_ras(segs[n]) for n in ("cervical vertebral column", "thoracic vertebral column",
                                              "lumbar vertebral column")]
    assert spine[0][2] > spine[1][2] > spine[2][2]  # cervical above thoracic above lumbar (+S)
    assert spine[1][1] < min(right[1], left[1])  # the spine is posterior to the lungs (-A)


def test_mask_bounds_and_spacing_validation():
    from SAM3DSegmentLib.core.geometry import mask_bounds, spacing_mm

    m = np.zeros((5, 6, 7), bool)
    assert mask_bounds(m) is None
    m[1, 2:4, 6] = True
    assert mask_bounds(m) == (slice(1, 2), slice(2, 4), slice(6, 7))
    assert mask_bounds(m, margin=1) == (slice(0, 3), slice(1, 5), slice(5, 7))  # clipped at the array edge
    assert spacing_mm(None).tolist() == [1, 1, 1] and spacing_mm([0.7, 0.7, 5]).tolist() == [0.7, 0.7, 5]
    for bad in ([1, 1], [1, 0, 1], [1, float("nan"), 1]):
        with pytest.raises(ValueError, match="three positive numbers"):
            spacing_mm(bad)
