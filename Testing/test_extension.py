"""Objects larger than one model-input region: the 50 %-overlap extension of SAM3DSegmentLib.inference.session.

The backend is an ORACLE test double of the model only: its encode learns which region it is looking at
(through a side channel: a wrapper around ``regions.model_input`` that the engine calls just before
``encode``), and its decode returns the true object's signed-distance-like logits sampled on that region's
low-res grid, ignoring the prompts. Everything around it — region choice, face detection, neighbour
placement, prompting, caching, merging overlapping regions and paste-back — is the real engine. With a
perfect model, the engine must deliver the WHOLE object; without extension it must be cut.
"""
from __future__ import annotations

import numpy as np
import pytest

from SAM3DSegmentLib.inference import regions as regions_module
from SAM3DSegmentLib.core.geometry import Volume, make_ijk_to_ras
from SAM3DSegmentLib.data.phantoms import oblique_rotation
from SAM3DSegmentLib.inference.session import Session, SessionOptions

CENTRE = np.array([5.0, -8.0, 12.0])
SEMI_AXES = np.array([60.0, 55.0, 180.0])   # 360 mm long: almost twice the 192 mm region


def ellipsoid_level(ras: np.ndarray, semi_axes=SEMI_AXES) -> np.ndarray:
    """1 - normalised radius: > 0 inside the ellipsoid, 0 on its surface (RAS mm points (..., 3))."""
    return 1.0 - np.linalg.norm((np.asarray(ras) - CENTRE) / np.asarray(semi_axes), axis=-1)


class OracleBackend:
    """Encode remembers the region (side channel); decode returns the true object on that region's grid."""

    name = "oracle stub"
    image_size = 128
    low_res_size = 32

    def __init__(self, semi_axes=SEMI_AXES):
        self.semi_axes = np.asarray(semi_axes, dtype=float)
        self.speckle = False    # add a false-positive blob touching the region's a=0 face
        self.next_region = None
        self.encodes = 0
        self.decodes = []

    def encode(self, image):
        assert image.shape == (128, 128, 128)
        assert self.next_region is not None, "encode called without model_input"
        region, self.next_region = self.next_region, None
        self.encodes += 1
        return {"region": region}

    def decode(self, embedding, points, labels, mask_logits):
        region = embedding["region"]
        self.decodes.append((region, np.array(points), np.array(labels), np.array(mask_logits)))
        s = self.low_res_size
        f = self.image_size / s
        c = np.arange(s) * f + (f - 1) / 2
        grid = np.stack(np.meshgrid(c, c, c, indexing="ij"), axis=-1).reshape(-1, 3)
        logits = (40.0 * ellipsoid_level(region.index_to_ras(grid), self.semi_axes)).reshape(s, s, s)
        if self.speckle:
            logits[0:2, 14:18, 14:18] = 5.0
        return logits.astype(np.float32)


@pytest.fixture
def oracle(monkeypatch):
    backend = OracleBackend()
    original = regions_module.model_input

    def spy(volume, region, clamp_hu=None):
        backend.next_region = region
        return original(volume, region, clamp_hu=clamp_hu)

    monkeypatch.setattr(regions_module, "model_input", spy)
    return backend


def phantom_volume(directions=None, spacing=(3.0, 3.0, 4.0), semi_axes=SEMI_AXES):
    shape_ijk = (84, 80, 112)        # 252 x 240 x 448 mm: the object fits with margin
    d = np.eye(3) if directions is None else directions
    extent = np.asarray(shape_ijk) * np.asarray(spacing)
    origin = CENTRE - d @ ((extent - np.asarray(spacing)) / 2.0)   # centre the grid on the object
    ijk_to_ras = make_ijk_to_ras(spacing, d, origin)
    i, j, k = (np.arange(n, dtype=float) for n in shape_ijk)
    K, J, I = np.meshgrid(k, j, i, indexing="ij")
    ras = np.stack([I, J, K], axis=-1) @ ijk_to_ras[:3, :3].T + ijk_to_ras[:3, 3]
    truth = (ellipsoid_level(ras, semi_axes) > 0).astype(np.uint8)
    image = np.where(truth > 0, 60, -100).astype(np.int16)   # soft tissue in fat
    return Volume(image, ijk_to_ras), truth


def dice(a, b):
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def run(backend, volume, **opts):
    s = Session(backend, SessionOptions(**opts))
    s.set_volume(volume)
    s.new_object()
    return s, s.add_click(ras=tuple(CENTRE))


def test_object_twice_the_region_is_segmented_whole(oracle):
    volume, truth = phantom_volume()
    s, u = run(oracle, volume, extend=True, max_regions=8)
    d = dice(s.mask(), truth)
    assert d >= 0.98, d
    for tip in (CENTRE + [0, 0, 150.0], CENTRE - [0, 0, 150.0]):
        i, j, k = volume.ras_to_voxel(tip)
        assert s.mask()[k, j, i] == 1
    assert 3 <= s.region_count() <= 8 and u.regions == s.region_count()
    assert not u.truncated and u.timings["max_regions_reached"] is False
    assert u.encoded_regions == s.region_count() == oracle.encodes
    # every extension prompt is one positive point inside the true object, with the previous logits
    for region, points, labels, mask_in in oracle.decodes[1:]:
        assert list(labels) == [1]
        assert ellipsoid_level(region.index_to_ras(points))[0] > 0
        assert (mask_in > 0).any()
    # the update box covers the whole object
    outside = np.ones(truth.shape, bool)
    outside[u.box] = False
    assert not s.mask()[outside].any()


def test_without_extension_the_object_is_cut(oracle):
    volume, truth = phantom_volume()
    s, u = run(oracle, volume, extend=False)
    d = dice(s.mask(), truth)
    assert s.region_count() == 1 and oracle.encodes == 1
    assert d < 0.9, d
    for tip in (CENTRE + [0, 0, 150.0], CENTRE - [0, 0, 150.0]):   # both ends are lost
        i, j, k = volume.ras_to_voxel(tip)
        assert truth[k, j, i] == 1 and s.mask()[k, j, i] == 0
    # what it has is right: the mask lies inside the truth
    assert np.logical_and(s.mask(), truth == 0).sum() <= 0.01 * s.mask().sum()


def test_max_regions_limit_is_reported(oracle):
    volume, truth = phantom_volume()
    s, u = run(oracle, volume, extend=True, max_regions=2)
    assert s.region_count() == 2 and u.truncated and u.timings["max_regions_reached"] is True
    d_cut = dice(s.mask(), truth)
    assert 0.6 < d_cut < 0.98


def test_coarser_spacing_covers_the_object_in_one_region(oracle):
    volume, truth = phantom_volume()
    s, u = run(oracle, volume, extend=True, spacing_mm=3.0)   # 384 mm field of view
    assert s.region_count() == 1
    assert s.regions()[0].spacing == 3.0
    assert dice(s.mask(), truth) >= 0.97


def test_extension_on_an_oblique_volume(oracle):
    volume, truth = phantom_volume(directions=oblique_rotation((12.0, -8.0, 20.0)))
    s, u = run(oracle, volume, extend=True, max_regions=8)
    assert 3 <= s.region_count() <= 8
    assert dice(s.mask(), truth) >= 0.97
    # the dirty-box paste-back missed nothing: rendering all regions everywhere gives the same mask
    full = tuple(slice(0, n) for n in volume.array.shape)
    np.testing.assert_array_equal(s._composer.render(s._object().regions, full), s.mask())


def test_later_clicks_and_undo_after_extension(oracle):
    volume, truth = phantom_volume()
    s, u1 = run(oracle, volume, extend=True, max_regions=8)
    n, m1 = s.region_count(), s.mask().copy()
    tip = CENTRE + [0.0, 0.0, 150.0]              # a click in the extension region near the tip
    u2 = s.add_click(ras=tuple(tip))
    assert u2.encoded_regions == 0 and s.region_count() == n   # reuses the cached neighbour region
    np.testing.assert_array_equal(s.mask(), m1)   # the oracle answer is unchanged
    s.undo()
    s.undo()
    assert s.region_count() == 0 and s.mask().sum() == 0
    s.redo()
    np.testing.assert_array_equal(s.mask(), m1)
    assert oracle.encodes == n


def test_small_object_does_not_extend(oracle):
    oracle.semi_axes = np.array([40.0, 30.0, 50.0])
    volume, truth = phantom_volume(semi_axes=oracle.semi_axes)
    s, u = run(oracle, volume, extend=True, max_regions=8)
    assert s.region_count() == 1 and oracle.encodes == 1
    assert dice(s.mask(), truth) >= 0.98


def test_overlap_merge_is_a_tent_weighted_average(oracle):
    """Inside the overlap of two regions the mask is sum(w*l)/sum(w) > 0 with tent weights."""
    volume, truth = phantom_volume()
    s, _ = run(oracle, volume, extend=True, max_regions=8)
    obj = s._object()
    r0, r1 = obj.regions[0], obj.regions[1]
    # a box in the overlap of the first two regions
    from SAM3DSegmentLib.core.boxes import box_intersect as _box_intersect
    box = _box_intersect(r0.box, r1.box)
    assert box is not None
    l0 = regions_module.logits_to_volume(r0.logits, r0.region, volume, box=box)
    l1 = regions_module.logits_to_volume(r1.logits, r1.region, volume, box=box)
    w0, w1 = s._composer.voxel_weights(r0, box), s._composer.voxel_weights(r1, box)
    others = [r for r in obj.regions[2:] if _box_intersect(r.box, box) is not None]
    num, den = w0 * l0 + w1 * l1, w0 + w1
    for r in others:
        w = s._composer.voxel_weights(r, box)
        num = num + w * regions_module.logits_to_volume(r.logits, r.region, volume, box=box)
        den = den + w
    expected = ((num > 0) & (den > 0)).astype(np.uint8)
    np.testing.assert_array_equal(s.mask()[box], expected)
    # weights: positive inside, largest at the region centre, tiny near the faces
    assert (w0 >= 0).all() and w0.max() <= 1.0


def test_speckles_touching_a_face_do_not_extend(oracle):
    """Only the object (positive cells connected to the click) drives the extension, not a stray blob."""
    oracle.semi_axes = np.array([40.0, 30.0, 50.0])
    oracle.speckle = True
    volume, truth = phantom_volume(semi_axes=oracle.semi_axes)
    s, u = run(oracle, volume, extend=True, max_regions=8)
    assert s.region_count() == 1 and oracle.encodes == 1
    blob = s.regions()[0].index_to_ras(np.array([[2.0, 64.0, 64.0]]))[0]   # the speckle is in the mask...
    i, j, k = volume.ras_to_voxel(blob)
    assert s.mask()[k, j, i] == 1
    oracle.semi_axes = SEMI_AXES                                           # ...but a long object still grows
    volume, truth = phantom_volume()
    s, u = run(oracle, volume, extend=True, max_regions=8)
    assert s.region_count() >= 3 and dice(s.mask(), truth) >= 0.97


def test_a_face_filled_by_the_mask_is_a_leak_not_an_object(oracle):
    oracle.semi_axes = np.array([400.0, 400.0, 400.0])     # "everything positive": fills every face
    volume, _ = phantom_volume(semi_axes=oracle.semi_axes)
    s, u = run(oracle, volume, extend=True, max_regions=8)
    assert s.region_count() == 1
    s2, u2 = run(oracle, volume, extend=True, max_regions=3, extend_max_face_fill=1.0)   # guard off
    assert s2.region_count() == 3 and u2.truncated
