"""'Refine selected segment' on real MRML (PyPI ``slicer-core``): ``EngineLink.refine`` seeds the engine's object
from the segment's voxels, clicks then edit the segment, undo and reset return to those voxels, and nothing else in
the scene changes. In-process ``ThreadEngine`` with a stub model (the model's output is a small ball around the
newest click; the session, paste-back and write-back are the real ones)."""
from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (test dependency) is required")

from SAM3DSegmentLib import slicer as sb  # noqa: E402
from SAM3DSegmentLib.core.geometry import GeometryError  # noqa: E402
from test_slicer_bridge import (SHAPE_KJI, add_parent_transform, add_segmentation, add_volume,  # noqa: E402,F401
                                box_of, scene)
from test_slicer_engine_link import finish, link, world_ras  # noqa: E402,F401 (link: fixture)

def segments(seg, volume):
    ids = [seg.GetSegmentation().GetNthSegmentID(n) for n in range(seg.GetSegmentation().GetNumberOfSegments())]
    return {sid: sb.read_segment(seg, sid, volume) for sid in ids}


def region_cover(link, segment_id):
    """bool (k, j, i): the voxels inside the regions of the segment's engine object (the engine's own test)."""
    session = link.engine.engine.session
    oid = link.engine.engine._objects[segment_id]
    obj = session._objects[oid]
    full = (slice(0, SHAPE_KJI[0]), slice(0, SHAPE_KJI[1]), slice(0, SHAPE_KJI[2]))
    return obj.init.covered(obj.regions, full)


def make_scene(scene, name):
    volume = add_volume(scene, name=name)                  # oblique, anisotropic ...
    add_parent_transform(scene, volume)                    # ... under a linear transform
    seg, (target, other) = add_segmentation(scene, volume, names=("liver", "other"))
    organ = np.zeros(SHAPE_KJI, np.uint8)
    organ[2:18, 6:42, 4:60] = 1                            # larger than one 32 mm region
    sb.write_mask_to_segment(seg, target, organ, box_of(0, 20, 0, 48, 0, 64), volume)
    neighbour = np.zeros(SHAPE_KJI, np.uint8)
    neighbour[3:7, 44:48, 2:8] = 1
    sb.write_mask_to_segment(seg, other, neighbour, box_of(0, 20, 0, 48, 0, 64), volume)
    return volume, seg, target, other, organ


def test_refine_seeds_the_object_from_the_segment_and_changes_nothing_in_the_scene(scene, link):
    volume, seg, target, other, organ = make_scene(scene, "refine seed")
    history = sb.SegmentHistory(seg)
    before = segments(seg, volume)
    job = link.refine(volume, seg, target)
    jobs = finish(link)
    assert [(j.context["kind"], j.state) for j in jobs] == [("volume", "done"), ("refine", "done")]
    assert job.context["voxels"] == int(organ.sum())
    assert np.array_equal(link.engine.call("mask", target), organ)
    assert link.engine.call("clicks", target) == []
    after = segments(seg, volume)
    assert all(np.array_equal(before[s], after[s]) for s in before) and not history.can_undo


def test_clicks_edit_the_refined_segment_undo_and_reset_return_to_it(scene, link):
    volume, seg, target, other, organ = make_scene(scene, "refine edit")
    history = sb.SegmentHistory(seg)
    link.refine(volume, seg, target)
    finish(link)
    neighbour = sb.read_segment(seg, other, volume)
    include, exclude = (world_ras(volume, [58, 24, 10]), True), (world_ras(volume, [30, 24, 10]), False)
    for clicks in ([include], [include, exclude]):
        link.sync_clicks(volume, seg, target, clicks)
        (job,) = finish(link)
        link.write_result(job, history)
    edited = sb.read_segment(seg, target, volume)
    assert np.array_equal(edited, link.engine.call("mask", target))
    assert edited[10, 24, 30] == 0 and organ[10, 24, 30] == 1          # the exclude click removed organ voxels
    out = ~region_cover(link, target)
    assert out.sum() > 1000 and np.array_equal(edited[out], organ[out])  # unseen voxels: exactly as before
    assert np.array_equal(sb.read_segment(seg, other, volume), neighbour)   # the other segment: untouched
    for kind in ("undo", "undo"):
        link.edit(kind, seg, target, volume)
        (job,) = finish(link)
        link.write_result(job, history)
    assert np.array_equal(sb.read_segment(seg, target, volume), organ)
    assert np.array_equal(link.engine.call("mask", target), organ) and not history.can_undo
    link.edit("undo", seg, target, volume)                               # nothing before the refine
    (job,) = finish(link)
    assert job.result[2] is False
    link.edit("redo", seg, target, volume)
    link.edit("redo", seg, target, volume)
    for job in finish(link):
        link.write_result(job, history)
    assert np.array_equal(sb.read_segment(seg, target, volume), edited)
    link.edit("reset", seg, target, volume)
    (job,) = finish(link)
    link.write_result(job, history)
    assert np.array_equal(sb.read_segment(seg, target, volume), organ)
    assert np.array_equal(sb.read_segment(seg, other, volume), neighbour)


def test_refining_an_empty_segment_or_during_a_click_is_refused_before_anything_is_queued(scene, link):
    volume, seg, target, other, organ = make_scene(scene, "refine refused")
    empty = sb.ensure_segment(seg, name="empty")
    with pytest.raises(ValueError, match="segment 'empty' is empty: paint or import it first"):
        link.refine(volume, seg, empty)
    assert not link.engine.busy
    link.sync_clicks(volume, seg, target, [(world_ras(volume, [30, 24, 10]), True)])
    with pytest.raises(ValueError, match="still being computed"):
        link.refine(volume, seg, target)
    finish(link)
    link.refine(volume, seg, target)                    # once the click is back, refining works
    assert [j.context["kind"] for j in finish(link)] == ["refine"]
    assert np.array_equal(link.engine.call("mask", target), organ)


def test_a_segmentation_on_another_grid_is_refused(scene, link):
    volume, seg, target, other, organ = make_scene(scene, "refine moved")
    volume.SetSpacing(0.9, 1.3, 2.5)          # the CT's grid changed after the segment was made on it
    with pytest.raises(GeometryError, match="another voxel grid"):
        link.refine(volume, seg, target)
    assert not link.engine.busy
