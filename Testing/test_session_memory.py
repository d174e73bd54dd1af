"""Memory per object (issue 9 item 7): masks and undo patches are stored cropped to their boxes, the public
full-grid mask is assembled on request, and Session.memory_bytes() reports the budget."""
from __future__ import annotations

import tracemalloc

import numpy as np

from SAM3DSegmentLib.core.geometry import Volume, make_ijk_to_ras
from SAM3DSegmentLib.inference.session import Click, Session, SessionOptions

from test_session import BlobBackend


def big_session(shape_ijk=(256, 256, 200)):
    arr = np.zeros(shape_ijk[::-1], dtype=np.int16)          # 26 MB of CT, 13 MB per full-grid uint8 mask
    s = Session(BlobBackend(), SessionOptions(region_size=32, spacing_mm=1.0, extend=False))
    s.set_volume(Volume(arr, make_ijk_to_ras((1.0, 1.0, 1.0))))
    return s


def box_voxels(box):
    return int(np.prod([b.stop - b.start for b in box]))


def test_many_objects_on_a_large_volume_cost_their_boxes_not_the_grid():
    s = big_session()
    full = s.volume.array.size
    rng = np.random.default_rng(0)
    n = 14
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for _ in range(n):
        s.new_object()
        centre = rng.integers(20, [236, 236, 180])
        s.add_click(ijk=tuple(int(v) for v in centre))
        s.add_click(ijk=tuple(int(v) for v in centre + 2))
        s.add_click(ijk=tuple(int(v) for v in centre - 1), positive=False)
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    boxes = [s.mask_cropped(oid)[0] for oid in s.object_ids()]
    box_bytes = sum(box_voxels(b) for b in boxes)
    report = s.memory_bytes()
    assert report["objects"] == n and report["full_grid_mask_bytes"] == full
    # the masks take exactly their boxes (uint8), and every number adds up
    assert report["masks"] == box_bytes
    assert report["total"] == report["masks"] + report["history"] + report["logits"]
    # history: three edits per object, each at most a before and an after patch of the object's box
    assert report["history"] <= 2 * 3 * box_bytes
    # what the process really holds (numpy reports its allocations to tracemalloc): within the reported
    # budget plus a small allowance for Python objects, and far below one full-grid mask per object
    assert held <= report["total"] + 200_000 * n, (held, report)
    assert held < 0.1 * n * full
    for oid in s.object_ids():      # the full-grid mask is still there on request, equal to the crop
        m = s.mask(oid)
        box, crop = s.mask_cropped(oid)
        assert m.shape == s.volume.array.shape and int(m.sum()) == int(crop.sum()) > 0
        np.testing.assert_array_equal(m[box], crop)
        outside = m.copy()
        outside[box] = 0
        assert not outside.any()


def test_the_store_shrinks_back_when_the_object_shrinks():
    s = big_session((120, 100, 80))
    s.new_object()
    s.add_click(ijk=(30, 30, 30))
    one = s.memory_bytes()["masks"]
    s.add_click(ijk=(90, 70, 50))                # far away: a second region, the box spans both
    assert s.memory_bytes()["masks"] > 4 * one
    s.set_clicks([Click(ijk=(30, 30, 30))])      # back to the first blob only
    assert s.memory_bytes()["masks"] == one
    s.reset()
    assert s.memory_bytes()["masks"] == 0 and s.mask_cropped()[1].shape == (0, 0, 0)
    s.undo()
    assert s.memory_bytes()["masks"] == one


def test_undo_patches_are_cropped():
    s = big_session((120, 100, 80))
    s.new_object()
    s.add_click(ijk=(30, 30, 30))
    e = s._object().history.undo[-1]
    box, crop = s.mask_cropped()
    assert e.patch_before.crop is None            # nothing before the first click
    assert e.patch_after.nbytes == box_voxels(box) <= box_voxels(e.box)
    np.testing.assert_array_equal(e.mask_after[tuple(slice(b.start - eb.start, b.stop - eb.start)
                                                     for b, eb in zip(box, e.box))], crop)
