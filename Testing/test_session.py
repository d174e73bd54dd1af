"""The interactive engine (SAM3DSegmentLib.inference.session) with stub backends: undo/redo, objects, caching, prompts.

The stub is a test double of the MODEL only (encode/decode); regions, caching, paste-back and history are
the real engine. Small volumes and a 32^3 model input keep every test well under a second.
"""
from __future__ import annotations

import numpy as np
import pytest

from SAM3DSegmentLib.core.geometry import GeometryError, Volume, make_ijk_to_ras
from SAM3DSegmentLib.inference.session import Click, MaskUpdate, Session, SessionOptions


class BlobBackend:
    """Deterministic stand-in for a promptable model.

    decode -> logits = max((radius - distance to the nearest positive point) / 2 (region voxels),
    previous logits - 0.25), then set very negative near negative points; so the previous mask carries over
    (as with the newest-click protocol) and the mask input matters.
    Every call is recorded.
    """

    name = "blob stub"

    def __init__(self, image_size: int = 32, radius: float = 6.0):
        self.image_size = image_size
        self.low_res_size = image_size // 4
        self.radius = radius
        self.encodes = []
        self.decodes = []

    def encode(self, image):
        assert image.shape == (self.image_size,) * 3 and image.dtype == np.float32
        self.encodes.append(float(image.mean()))
        return {"n": len(self.encodes)}

    def decode(self, embedding, points, labels, mask_logits):
        s = self.low_res_size
        f = self.image_size / s
        self.decodes.append({"points": np.array(points, dtype=np.float64), "labels": np.array(labels),
                             "mask": None if mask_logits is None else np.array(mask_logits), "emb": embedding})
        c = np.arange(s) * f + (f - 1) / 2
        grid = np.stack(np.meshgrid(c, c, c, indexing="ij"), axis=-1)
        out = np.full((s, s, s), -4.0)
        for p, lab in zip(points, labels):
            d = np.linalg.norm(grid - np.asarray(p), axis=-1)
            if lab == 1:
                out = np.maximum(out, (self.radius - d) / 2.0)
        if mask_logits is not None:
            out = np.maximum(out, np.asarray(mask_logits) - 0.25)
        for p, lab in zip(points, labels):
            d = np.linalg.norm(grid - np.asarray(p), axis=-1)
            if lab == 0:
                out = np.where(d < self.radius / 2, -4.0, out)
        return out.astype(np.float32)


def make_volume(shape_ijk=(40, 36, 30), spacing=(2.0, 2.0, 2.5), origin=(-40.0, -30.0, 10.0)):
    rng = np.random.default_rng(0)
    i, j, k = shape_ijk
    arr = (rng.normal(0, 30, size=(k, j, i)) + 40).astype(np.int16)
    return Volume(arr, make_ijk_to_ras(spacing, np.diag([-1.0, 1.0, 1.0]), origin))


def session(prompt_mode="newest", spacing_mm=1.0, extend=False, **kw):
    backend = BlobBackend()
    s = Session(backend, SessionOptions(prompt_mode=prompt_mode, region_size=32, spacing_mm=spacing_mm,
                                        extend=extend, **kw))
    s.set_volume(make_volume())
    s.new_object()
    return s, backend


def centre_ras(vol, ijk):
    return tuple(vol.ijk_to_ras_points(np.asarray(ijk, dtype=float)))


def snapshot(s):
    return s.mask().copy(), s.clicks(), [None if r.logits is None else r.logits.copy()
                                         for r in s._object().regions]


# ---------------------------------------------------------------------------------------------- basics
def test_first_click_segments_around_the_click_and_reports():
    s, b = session()
    p = centre_ras(s.volume, (20, 18, 15))
    u = s.add_click(ras=p)
    assert isinstance(u, MaskUpdate) and u.encoded_regions == 1 and len(b.encodes) == 1
    m = s.mask()
    assert m.dtype == np.uint8 and m.shape == s.volume.array.shape
    assert m[15, 18, 20] == 1 and m.sum() > 10
    assert m[0, 0, 0] == 0
    assert set(u.timings) >= {"encode_s", "decode_s", "paste_s", "total_s"}
    assert u.regions == 1 and not u.truncated
    np.testing.assert_array_equal(u.mask_box, m[u.box])


def test_voxel_click_equals_ras_click():
    s1, _ = session()
    s2, _ = session()
    s1.add_click(ijk=(12, 20, 9))
    s2.add_click(ras=centre_ras(s2.volume, (12, 20, 9)))
    np.testing.assert_array_equal(s1.mask(), s2.mask())
    assert s1.clicks()[0].ijk == (12.0, 20.0, 9.0)
    np.testing.assert_allclose(s1.clicks()[0].ras, s2.clicks()[0].ras)


def test_prompt_point_is_the_click_in_region_indices():
    s, b = session()
    p = np.array(centre_ras(s.volume, (10, 11, 12))) + [0.3, -0.2, 0.1]
    s.add_click(ras=p)
    region = s.regions()[0]
    np.testing.assert_allclose(region.index_to_ras(b.decodes[0]["points"])[0], p, atol=1e-3)


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs", [dict(ras=(500.0, 0.0, 0.0)), dict(ijk=(40, 0, 0)), dict(ijk=(0, -1, 0)),
                                    dict(ras=(np.nan, 0.0, 20.0))])
def test_click_outside_volume_raises_and_changes_nothing(kwargs):
    s, b = session()
    s.add_click(ijk=(20, 18, 15))
    before = snapshot(s)
    n_enc, n_dec, n_undo = len(b.encodes), len(b.decodes), len(s._object().history.undo)
    with pytest.raises(GeometryError) as err:
        s.add_click(**kwargs)
    assert "outside" in str(err.value) or "finite" in str(err.value)
    after = snapshot(s)
    np.testing.assert_array_equal(before[0], after[0])
    assert before[1] == after[1]
    assert (len(b.encodes), len(b.decodes), len(s._object().history.undo)) == (n_enc, n_dec, n_undo)
    with pytest.raises(GeometryError):
        s.set_clicks([Click(ijk=(20, 18, 15)), Click(**kwargs)])
    np.testing.assert_array_equal(before[0], s.mask())
    assert s.clicks() == before[1]


def test_click_without_volume_is_a_clear_error():
    s = Session(BlobBackend(), SessionOptions(region_size=32))
    with pytest.raises(RuntimeError, match="set_volume"):
        s.add_click(ijk=(1, 1, 1))


def test_region_size_must_match_the_model():
    with pytest.raises(ValueError, match="region_size=32"):
        Session(BlobBackend(), SessionOptions(region_size=128))


def test_options_are_validated():
    with pytest.raises(ValueError, match="prompt_mode"):
        SessionOptions(prompt_mode="latest")
    with pytest.raises(ValueError, match="max_regions"):
        SessionOptions(max_regions=0)


# ---------------------------------------------------------------------------------------------- history
def test_undo_redo_restore_exact_masks_and_logits():
    s, _ = session(spacing_mm=0.6)
    vol = s.volume
    clicks = [((20, 18, 15), True), ((24, 18, 15), True), ((21, 18, 15), False), ((5, 5, 5), True),
              ((34, 30, 25), True)]
    states = [snapshot(s)]
    for ijk, pos in clicks:
        s.add_click(ras=centre_ras(vol, ijk), positive=pos)
        states.append(snapshot(s))
    assert len(s.regions()) >= 2          # far clicks made new regions
    for n in range(len(clicks), 0, -1):   # undo all the way back
        u = s.undo()
        m, c, lg = snapshot(s)
        np.testing.assert_array_equal(m, states[n - 1][0])
        assert c == states[n - 1][1]
        assert len(lg) == len(states[n - 1][2])
        for a, b_ in zip(lg, states[n - 1][2]):
            np.testing.assert_array_equal(a, b_)
        np.testing.assert_array_equal(u.mask_box, m[u.box])
    assert not s.can_undo() and s.mask().sum() == 0
    assert s.undo().mask_box.size == 0   # nothing left: a harmless no-op
    for n in range(1, len(clicks) + 1):   # and redo all the way forward
        s.redo()
        m, c, lg = snapshot(s)
        np.testing.assert_array_equal(m, states[n][0])
        assert c == states[n][1]
        for a, b_ in zip(lg, states[n][2]):
            np.testing.assert_array_equal(a, b_)
    assert not s.can_redo()


def test_new_click_after_undo_clears_redo_and_continues_from_restored_logits():
    s, b = session()
    s.add_click(ijk=(20, 18, 15))
    first_logits = s._object().regions[0].logits.copy()
    s.add_click(ijk=(24, 18, 15))
    s.undo()
    assert s.can_redo()
    s.add_click(ijk=(16, 18, 15))
    assert not s.can_redo()
    np.testing.assert_array_equal(b.decodes[-1]["mask"], first_logits)


def test_reset_clears_and_is_undoable():
    s, _ = session()
    s.add_click(ijk=(20, 18, 15))
    s.add_click(ijk=(22, 18, 15))
    m = s.mask().copy()
    u = s.reset()
    assert s.mask().sum() == 0 and s.clicks() == [] and s.region_count() == 0
    assert u.box != (slice(0, 0),) * 3 and u.mask_box.sum() == 0
    s.undo()
    np.testing.assert_array_equal(s.mask(), m)
    assert len(s.clicks()) == 2


def test_objects_are_independent():
    s, _ = session()
    a = s.current_object
    s.add_click(ijk=(10, 10, 10))
    ma = s.mask(a).copy()
    b = s.new_object("other")
    assert s.current_object == b and s.object_name(b) == "other"
    s.add_click(ijk=(30, 25, 20))
    s.add_click(ijk=(28, 25, 20), positive=False)
    np.testing.assert_array_equal(s.mask(a), ma)
    assert s.mask(b)[20, 25, 30] == 1 and s.mask(a)[20, 25, 30] == 0
    s.undo()      # undoes b's last click only
    np.testing.assert_array_equal(s.mask(a), ma)
    s.select_object(a)
    s.reset()
    assert s.mask(a).sum() == 0 and s.mask(b).sum() > 0
    with pytest.raises(KeyError):
        s.select_object("nope")


def test_set_volume_resets_objects_and_changes_key():
    s, _ = session()
    s.add_click(ijk=(10, 10, 10))
    key = s.volume_key
    vol2 = make_volume()
    vol2.array[0, 0, 0] += 1
    assert s.set_volume(vol2) != key
    assert s.mask().sum() == 0 and s.clicks() == []


def test_mask_is_read_only_view():
    s, _ = session()
    s.add_click(ijk=(10, 10, 10))
    with pytest.raises(ValueError):
        s.mask()[0, 0, 0] = 1


# ---------------------------------------------------------------------------------------------- caching
def test_clicks_inside_an_encoded_region_never_reencode():
    s, b = session()   # 32 mm regions at 1 mm; clicks within a few mm of each other
    u = s.add_click(ijk=(20, 18, 15))
    assert u.encoded_regions == 1
    for n, ijk in enumerate([(21, 18, 15), (19, 17, 15), (20, 19, 16), (22, 18, 14)]):
        u = s.add_click(ijk=ijk, positive=bool(n % 2))
        assert u.encoded_regions == 0 and u.timings["encode_s"] == 0.0
    assert len(b.encodes) == 1 and s.region_count() == 1
    assert s.cache.hits == 4


def test_revisiting_a_region_is_free():
    s, b = session(spacing_mm=0.6)   # 19 mm regions: far clicks need new ones
    s.add_click(ijk=(8, 8, 8))
    s.add_click(ijk=(32, 28, 24))
    assert len(b.encodes) == 2 and s.region_count() == 2
    s.add_click(ijk=(8, 9, 8))         # back in the first region
    s.undo(); s.undo(); s.redo()       # history never encodes
    s.set_clicks(s.clicks())           # replay: decode only
    other = s.new_object()
    s.add_click(ijk=(8, 8, 8))         # another object, same region centre: same cache key
    assert len(b.encodes) == 2
    assert s.region_count(other) == 1


def test_cache_is_bounded():
    s, b = session(spacing_mm=0.4, cache_size=2)
    for ijk in [(5, 5, 5), (20, 18, 15), (35, 30, 25)]:
        s.add_click(ijk=ijk)
    assert len(s.cache) == 2 and len(b.encodes) == 3
    s.add_click(ijk=(35, 30, 24))   # the newest region is cached
    assert len(b.encodes) == 3
    u = s.add_click(ijk=(5, 5, 6))  # the first region was evicted: encoded again
    assert len(b.encodes) == 4 and u.encoded_regions == 1 and s.region_count() == 3
    assert s.cache.evictions == 2


# ---------------------------------------------------------------------------------------------- prompts
def test_newest_protocol_feeds_only_the_newest_click_and_previous_logits():
    s, b = session("newest")
    s.add_click(ijk=(20, 18, 15))
    s.add_click(ijk=(23, 18, 15), positive=False)
    s.add_click(ijk=(18, 18, 15))
    d0, d1, d2 = b.decodes
    for d in (d0, d1, d2):
        assert d["points"].shape == (1, 3)
    assert d0["mask"] is not None and d0["mask"].shape == (8, 8, 8) and not d0["mask"].any()
    assert list(d1["labels"]) == [0] and list(d2["labels"]) == [1]
    logits0 = s._object().history.undo[0].regions_after[0].logits
    logits1 = s._object().history.undo[1].regions_after[0].logits
    np.testing.assert_array_equal(d1["mask"], logits0)
    np.testing.assert_array_equal(d2["mask"], logits1)
    region = s.regions()[0]
    np.testing.assert_allclose(region.index_to_ras(d1["points"])[0], s.clicks()[1].ras, atol=1e-3)


def test_all_protocol_feeds_every_click_in_the_region():
    s, b = session("all", spacing_mm=0.6)
    s.add_click(ijk=(20, 18, 15))
    s.add_click(ijk=(22, 18, 15), positive=False)
    s.add_click(ijk=(3, 3, 3))        # far away: its own region
    s.add_click(ijk=(19, 18, 15))     # back in the first region
    d = b.decodes
    assert [len(x["points"]) for x in d] == [1, 2, 1, 3]
    assert list(d[1]["labels"]) == [1, 0] and list(d[3]["labels"]) == [1, 0, 1]
    region = s.regions()[0]
    np.testing.assert_allclose(region.index_to_ras(d[3]["points"]), [c.ras for c in
                                                                      np.array(s.clicks())[[0, 1, 3]]], atol=1e-3)
    assert not d[2]["mask"].any()    # a new region starts from zeros
    np.testing.assert_array_equal(d[3]["mask"], s._object().history.undo[1].regions_after[0].logits)


@pytest.mark.parametrize("mode", ["newest", "all"])
def test_set_clicks_equals_the_incremental_result(mode):
    clicks = [Click(ijk=(20, 18, 15)), Click(ijk=(23, 18, 15), positive=False), Click(ijk=(6, 5, 4)),
              Click(ijk=(8, 6, 4)), Click(ijk=(19, 16, 14))]
    s1, _ = session(mode, spacing_mm=0.6)
    for c in clicks:
        s1.add_click(ijk=c.ijk, positive=c.positive)
    s2, b2 = session(mode, spacing_mm=0.6)
    s2.add_click(ijk=(30, 30, 20))            # something to be replaced
    u = s2.set_clicks(clicks)
    np.testing.assert_array_equal(s1.mask(), s2.mask())
    assert s1.clicks() == s2.clicks() and s1.region_count() == s2.region_count()
    for r1, r2 in zip(s1._object().regions, s2._object().regions):
        np.testing.assert_array_equal(r1.logits, r2.logits)
    assert s2.mask()[20, 30, 30] == 0        # the replaced click's blob is gone
    np.testing.assert_array_equal(u.mask_box, s2.mask()[u.box])
    s2.undo()
    assert len(s2.clicks()) == 1 and s2.mask()[20, 30, 30] == 1


def test_update_box_covers_every_changed_voxel():
    s, _ = session(spacing_mm=0.6)
    steps = [lambda: s.add_click(ijk=(20, 18, 15)), lambda: s.add_click(ijk=(24, 18, 15)),
             lambda: s.add_click(ijk=(21, 18, 15), positive=False), lambda: s.add_click(ijk=(30, 26, 22)),
             lambda: s.undo(), lambda: s.redo(), lambda: s.set_clicks([Click(ijk=(5, 30, 5))]),
             lambda: s.reset(), lambda: s.undo()]
    for step in steps:
        before = s.mask().copy()
        u = step()
        after = s.mask()
        outside = np.ones(after.shape, bool)
        outside[u.box] = False
        assert not (before != after)[outside].any()
        np.testing.assert_array_equal(u.mask_box, after[u.box])


def test_mask_is_a_pure_function_of_the_regions():
    """The incremental paste-back (dirty boxes only) equals rendering the final regions everywhere."""
    s, _ = session(spacing_mm=0.6)
    for ijk, pos in [((20, 18, 15), True), ((26, 18, 15), True), ((14, 18, 15), True), ((22, 18, 15), False)]:
        s.add_click(ijk=ijk, positive=pos)
    assert s.region_count() >= 2
    full = tuple(slice(0, n) for n in s.volume.array.shape)
    np.testing.assert_array_equal(s._composer.render(s._object().regions, full), s.mask())


def test_coarser_spacing_gives_a_larger_field_of_view():
    s, b = session(spacing_mm=3.0)   # 96 mm region covers the whole 80 mm volume
    s.add_click(ijk=(20, 18, 15))
    s.add_click(ijk=(2, 2, 2))
    s.add_click(ijk=(38, 34, 28))
    assert s.region_count() == 1 and len(b.encodes) == 1
    assert s.regions()[0].spacing == 3.0
    assert s.mask()[28, 34, 38] == 1 and s.mask()[2, 2, 2] == 1


# ---------------------------------------------------------------------------------------------- real model
def test_real_tiny_model_end_to_end():
    import torch

    from SAM3DSegmentLib.inference.backends import LocalBackend
    from SAM3DSegmentLib.models import SamMed3DConfig, build_sam_med3d

    torch.manual_seed(0)
    model = build_sam_med3d(SamMed3DConfig.tiny())
    backend = LocalBackend(model)
    s = Session(backend, SessionOptions(region_size=backend.image_size, spacing_mm=1.5, extend=True,
                                        max_regions=2))
    s.set_volume(make_volume())
    s.new_object()
    u1 = s.add_click(ijk=(20, 18, 15))
    u2 = s.add_click(ijk=(22, 18, 15), positive=False)
    assert u1.encoded_regions == 1 and u2.encoded_regions == 0
    logits = s._object().regions[0].logits
    assert logits.shape == (backend.low_res_size,) * 3 and np.isfinite(logits).all()
    m = s.mask()
    assert m.shape == s.volume.array.shape and set(np.unique(m)) <= {0, 1}
    np.testing.assert_array_equal(u2.mask_box, m[u2.box])
    s.undo()
    np.testing.assert_array_equal(s.mask()[u1.box], u1.mask_box)


def test_history_is_bounded_by_entries_and_memory():
    s, _ = session(history_limit=3)
    for n in range(6):
        s.add_click(ijk=(10 + n, 18, 15))
    assert len(s._object().history.undo) == 3
    s2, _ = session(history_mb=1e-6)     # any patch exceeds the budget: only the newest entry is kept
    for n in range(4):
        s2.add_click(ijk=(10 + 2 * n, 18, 15))
    assert len(s2._object().history.undo) == 1
    m3 = s2._object().history.undo[0].mask_before.copy()
    s2.undo()
    u = s2._object().history.redo[0]
    np.testing.assert_array_equal(s2.mask()[u.box], m3)
    assert len(s2.clicks()) == 3 and not s2.can_undo()
