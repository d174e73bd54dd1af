"""Slicer-facing defects (issues 8 and 10) on real MRML (PyPI ``slicer-core``), one test per item.

Set-up helpers come from ``test_slicer_bridge`` (same folder): small oblique, anisotropic volumes.
"""
from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (test dependency) is required")
import vtk  # noqa: E402  (installed with slicer-core)

from SAM3DSegmentLib import slicer as sb  # noqa: E402
from SAM3DSegmentLib.core.geometry import GeometryError  # noqa: E402
from test_slicer_bridge import (SHAPE_KJI, add_parent_transform, add_volume, box_of, local_ijk_to_ras,  # noqa: E402
                                rotation, scene)  # noqa: F401  (scene: the fixture)


def world_ijk_to_ras(node):
    return sb.parent_to_world(node) @ local_ijk_to_ras(node)


def labelmap_state(seg, sid):
    """(array copy, ImageToWorld, extent) of a segment's internal labelmap: what 'unchanged' means."""
    img = seg.GetBinaryLabelmapInternalRepresentation(sid)
    m = vtk.vtkMatrix4x4()
    img.GetImageToWorldMatrix(m)
    return np.array(sb.scalars_view(img)), sb.vtk_matrix_to_numpy(m), tuple(img.GetExtent())


def segment_voxels_in_volume(seg, sid, volume):
    """Volume voxels (k, j, i) covered by a segment, computed WITHOUT the bridge or the exporter: every labelmap
    voxel centre -> segmentation frame (ImageToWorld) -> world (segmentation's parent) -> volume ijk."""
    img = seg.GetBinaryLabelmapInternalRepresentation(sid)
    arr = sb.scalars_view(img)
    label = seg.GetSegmentation().GetSegment(sid).GetLabelValue()
    e = img.GetExtent()
    k, j, i = np.nonzero(arr == label)
    if not len(k):
        return np.zeros(SHAPE_KJI, bool)
    m = vtk.vtkMatrix4x4()
    img.GetImageToWorldMatrix(m)
    ijk_h = np.stack([i + e[0], j + e[2], k + e[4], np.ones_like(i)]).astype(float)
    world = sb.parent_to_world(seg) @ sb.vtk_matrix_to_numpy(m) @ ijk_h
    vijk = np.linalg.inv(world_ijk_to_ras(volume)) @ world
    assert np.allclose(vijk[:3], np.round(vijk[:3]), atol=1e-3), "segment voxels are off the volume grid"
    vijk = np.round(vijk[:3]).astype(int)
    out = np.zeros(SHAPE_KJI, bool)
    out[vijk[2], vijk[1], vijk[0]] = True
    return out


def paint_like_segment_editor(seg, name, block_kji_of_reference):
    """A segment the way the Segment Editor stores it: a labelmap on the segmentation's reference geometry."""
    geometry = slicer.vtkOrientedImageData()
    parameter = seg.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    assert slicer.vtkSegmentationConverter.DeserializeImageGeometry(parameter, geometry, True, vtk.VTK_UNSIGNED_CHAR, 1)
    arr = sb.scalars_view(geometry)
    arr[...] = 0
    arr[block_kji_of_reference] = 1
    segment = slicer.vtkSegment()
    segment.SetName(name)
    segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(), geometry)
    seg.GetSegmentation().AddSegment(segment, name)
    return name


# ------------------------------------------------------------------------------------------------ issue 8.1
@pytest.mark.parametrize("where", ["not under a transform", "under the volume's transform",
                                   "under another transform"])
def test_existing_segmentation_is_written_through_transforms_and_never_moved(scene, where):
    volume = add_volume(scene)
    vol_t, _ = add_parent_transform(scene, volume, deg=35.0, shift=(80.0, -10.0, 25.0))
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "user segmentation")
    seg.CreateDefaultDisplayNodes()
    if where == "under the volume's transform":
        seg.SetAndObserveTransformNodeID(vol_t.GetID())
    elif where == "under another transform":
        add_parent_transform(scene, seg, deg=-20.0, shift=(-5.0, 30.0, 7.0))
    # the Segment Editor way: reference geometry from the CT (as the segmentation sees it), then paint
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    old = paint_like_segment_editor(seg, "liver", box_of(4, 12, 10, 30, 10, 40))
    parent_before = seg.GetTransformNodeID()
    old_before = labelmap_state(seg, old)
    old_voxels = segment_voxels_in_volume(seg, old, volume)
    assert old_voxels.sum() == 8 * 20 * 30  # it lies on the CT grid in world space

    seg2, sid = sb.prepare_target(scene, volume, seg, None)
    assert seg2 is seg and seg.GetTransformNodeID() == parent_before, "the user's segmentation was re-parented"
    assert all(np.array_equal(a, b) for a, b in zip(labelmap_state(seg, old), old_before)), "existing segment moved"

    new = np.zeros(SHAPE_KJI, np.uint8)
    new[8:16, 20:40, 30:50] = 1  # overlaps the existing segment: "overwrite all" takes those voxels
    box = box_of(0, 20, 0, 48, 0, 64)
    report = sb.write_mask_to_segment(seg, sid, new[box], box, volume)
    assert report["changed_voxels"] == int(new.sum())
    assert np.array_equal(segment_voxels_in_volume(seg, sid, volume), new > 0)
    assert np.array_equal(segment_voxels_in_volume(seg, old, volume), old_voxels & ~(new > 0))
    # read_segment (used by the NIfTI export) sees the same voxels through the transforms
    assert np.array_equal(sb.read_segment(seg, sid, volume), new)
    assert seg.GetTransformNodeID() == parent_before


def test_segmentation_on_another_grid_is_refused_before_anything_changes(scene):
    volume = add_volume(scene)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "made before the CT was moved")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)  # geometry taken BEFORE the transform
    old = paint_like_segment_editor(seg, "liver", box_of(4, 12, 10, 30, 10, 40))
    add_parent_transform(scene, volume, deg=35.0, shift=(80.0, -10.0, 25.0))  # now the CT moves away
    before = labelmap_state(seg, old)
    with pytest.raises(GeometryError, match="another voxel grid.*nothing was changed.*Create new segmentation"):
        sb.prepare_target(scene, volume, seg, None)
    assert seg.GetTransformNodeID() is None
    assert seg.GetSegmentation().GetNumberOfSegments() == 1  # no target segment was added
    assert all(np.array_equal(a, b) for a, b in zip(labelmap_state(seg, old), before))
    # and a new segmentation for the moved volume lands on its grid, under its transform
    created, sid = sb.prepare_target(scene, volume, None, None)
    assert created.GetTransformNodeID() == volume.GetTransformNodeID()
    mask = np.ones((2, 3, 4), np.uint8)
    sb.write_mask_to_segment(created, sid, mask, box_of(5, 7, 6, 9, 7, 11), volume)
    expected = np.zeros(SHAPE_KJI, bool)
    expected[5:7, 6:9, 7:11] = True
    assert np.array_equal(segment_voxels_in_volume(created, sid, volume), expected)


# ------------------------------------------------------------------------------------------------ issue 10.3
def test_leaving_a_view_in_place_mode_is_not_a_click(scene):
    """The markups widget removes its preview point when the mouse leaves a view (PointRemovedEvent)."""
    from test_slicer_bridge import hover_then_click

    pos = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "pos")
    neg = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "neg")
    for n in (pos, neg):
        n.CreateDefaultDisplayNodes()
    calls = []
    obs = sb.MarkupsObserver([pos, neg], lambda reason, n, i: calls.append((reason, n.GetName())))
    try:
        idx = hover_then_click(pos, [(0, 20, 50), (1, 21, 51)], define=False)  # hovering
        pos.RemoveNthControlPoint(idx)  # the mouse leaves the view
        assert calls == []
        hover_then_click(neg, [(3, 3, 3)], define=False)
        neg.RemoveAllControlPoints()  # only a preview there
        assert calls == []
        hover_then_click(pos, [(5, 25, 55)])  # a real click
        preview = hover_then_click(pos, [(6, 26, 56)], define=False)  # hovering for the next one
        pos.RemoveNthControlPoint(preview)  # leaves the view
        assert calls == [("defined", "pos")]
        pos.RemoveNthControlPoint(0)  # the user deletes the clicked point: a change
        assert calls == [("defined", "pos"), ("removed", "pos")]
        hover_then_click(pos, [(7, 27, 57)])
        pos.RemoveAllControlPoints()
        assert calls[-1] == ("removed", "pos") and len(calls) == 4
    finally:
        obs.remove()


def test_removing_a_scripted_or_loaded_point_is_a_change(scene):
    pos = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "pos")
    pos.AddControlPointWorld(vtk.vtkVector3d(1, 2, 3))  # present before the observer (loaded with a scene)
    calls = []
    obs = sb.MarkupsObserver([pos], lambda reason, n, i: calls.append(reason))
    try:
        pos.AddControlPointWorld(vtk.vtkVector3d(4, 5, 6))  # added by a script
        n = len(calls)
        pos.RemoveNthControlPoint(1)
        pos.RemoveNthControlPoint(0)
        assert calls[n:] == ["removed", "removed"]
    finally:
        obs.remove()


# ------------------------------------------------------------------------------------------------ issue 8.2
def test_click_outside_the_volume_is_marked_unused_and_later_clicks_work(scene):
    from SAM3DSegmentLib.inference.session import Session, SessionOptions
    from test_slicer_bridge import _BallBackend

    volume = add_volume(scene)
    add_parent_transform(scene, volume)
    pos, neg = sb.prompt_nodes(scene)
    world = world_ijk_to_ras(volume)
    session = Session(_BallBackend(), SessionOptions(region_size=16, spacing_mm=2.0, extend=False, max_regions=1))
    session.set_volume(sb.volume_from_node(volume))
    session.new_object("a")

    def click(node, ijk):
        node.AddControlPointWorld(vtk.vtkVector3d(*(world @ [*ijk, 1.0])[:3].tolist()))
        messages = sb.reject_points_outside(volume, [pos, neg])
        session.set_clicks([Click(ras=tuple(r), positive=p) for r, p in sb.clicks_from_markups(pos, neg, volume)])
        return messages

    from SAM3DSegmentLib.inference.session import Click

    assert click(pos, (30, 24, 10)) == []
    messages = click(pos, (30, 24, 25))  # k = 25 is beyond the 20 slices: outside
    assert len(messages) == 1 and "outside the volume 'ct'" in messages[0] and "--" not in messages[0]
    assert pos.GetNumberOfControlPoints() == 2 and not pos.GetNthControlPointSelected(1)
    assert len(session.clicks()) == 1  # not sent
    assert click(neg, (10, 10, 5)) == messages  # later clicks work (the grey point is still reported)
    assert [c.positive for c in session.clicks()] == [True, False]
    # dragged back into the image: used again
    pos.SetNthControlPointPositionWorld(1, *(world @ [31.0, 24.0, 12.0, 1.0])[:3].tolist())
    assert sb.reject_points_outside(volume, [pos, neg]) == []
    assert pos.GetNthControlPointSelected(1) and len(sb.clicks_from_markups(pos, neg, volume)) == 3
    # the unused colour differs from the used one
    d = pos.GetDisplayNode()
    assert tuple(d.GetColor()) != tuple(d.GetSelectedColor())


# ------------------------------------------------------------------------------------------------ issue 10.5
def _engine_and_segmentation(scene):
    from SAM3DSegmentLib.inference.session import Session, SessionOptions
    from test_slicer_bridge import _BallBackend, add_segmentation

    volume = add_volume(scene, oblique=False)
    seg, (target, locked, other) = add_segmentation(scene, volume, names=("target", "locked", "other"))
    session = Session(_BallBackend(), SessionOptions(region_size=16, spacing_mm=2.0, extend=False, max_regions=1))
    session.set_volume(sb.volume_from_node(volume))
    oid = session.new_object("target")
    return volume, seg, target, locked, other, session, oid


@pytest.mark.parametrize("order", ["change, then no change", "no change, then change"])
def test_undo_redo_stay_in_step_with_the_engine_when_a_click_changes_nothing(scene, order):
    volume, seg, target, locked, other, session, oid = _engine_and_segmentation(scene)
    world = world_ijk_to_ras(volume)
    ras = {name: tuple((world @ [*ijk, 1.0])[:3]) for name, ijk in
           (("p1", (30, 24, 10)), ("p2", (12, 10, 4)))}
    box = box_of(0, 20, 0, 48, 0, 64)
    # "other" lies where the first ball goes: a real change takes voxels from it (exact undo must give them back)
    other_arr = np.zeros(SHAPE_KJI, np.uint8)
    other_arr[6:14, 20:28, 26:34] = 1
    sb.write_mask_to_segment(seg, other, other_arr, box, volume)
    locked_arr = np.zeros(SHAPE_KJI, np.uint8)
    if order == "no change, then change":
        locked_arr[:, :22, :28] = 1  # the ball around p2 lies inside a locked segment: its click changes nothing
        sb.write_mask_to_segment(seg, locked, locked_arr, box, volume)
        sb.set_segment_locked(seg, locked)
        clicks = [("p2", "nothing"), ("p1", "change")]
    else:
        clicks = [("p1", "change"), ("p1", "nothing")]  # the same ball again: nothing changes
    history = sb.SegmentHistory(seg)

    def state():
        return {s: sb.read_segment(seg, s, volume) for s in (target, other, locked)}

    def expected_target():
        return session.mask(oid) & (1 - locked_arr)

    states = [state()]
    for name, effect in clicks:
        update = session.add_click(ras=ras[name], positive=True)
        report = sb.apply_engine_result("clicks", update, True, seg, target, volume, history)
        assert (report["changed_voxels"] > 0) == (effect == "change"), (name, report)
        assert np.array_equal(sb.read_segment(seg, target, volume), expected_target())
        states.append(state())
    assert states[-1][other].sum() < other_arr.sum()  # the change took voxels from "other"
    for n in (1, 0):
        session.undo(oid)
        assert sb.apply_engine_result("undo", None, True, seg, target, volume, history) is not None
        assert np.array_equal(sb.read_segment(seg, target, volume), expected_target()), f"undo to state {n}"
        assert all(np.array_equal(a, states[n][s]) for s, a in state().items()), f"undo to state {n}"
    for n in (1, 2):
        session.redo(oid)
        sb.apply_engine_result("redo", None, True, seg, target, volume, history)
        assert np.array_equal(sb.read_segment(seg, target, volume), expected_target()), f"redo to state {n}"
        assert all(np.array_equal(a, states[n][s]) for s, a in state().items()), f"redo to state {n}"
    assert not history.can_redo and history.can_undo
    # nothing to undo in the engine: nothing happens here either
    assert sb.apply_engine_result("redo", None, False, seg, target, volume, history) is None


def test_history_falls_back_to_the_engine_result_when_its_state_is_gone(scene):
    volume, seg, target, locked, other, session, oid = _engine_and_segmentation(scene)
    history = sb.SegmentHistory(seg)
    ras = tuple((world_ijk_to_ras(volume) @ [30, 24, 10, 1.0])[:3])
    sb.apply_engine_result("clicks", session.add_click(ras=ras), True, seg, target, volume, history)
    history.clear()  # e.g. the module restarted its history
    update = session.undo(oid)
    assert sb.apply_engine_result("undo", update, True, seg, target, volume, history)["changed_voxels"] > 0
    assert not sb.read_segment(seg, target, volume).any()


# ------------------------------------------------------------------------------------------------ issue 10.2
def test_first_click_on_a_segmentation_without_segments_keeps_its_point(scene):
    """The segment selector reacts to SegmentAdded synchronously (qMRMLSegmentSelectorWidget); here an observer
    plays the selector and the widget's handler: a user change clears the points."""
    volume = add_volume(scene)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "made with 'Create new'")
    seg.CreateDefaultDisplayNodes()
    pos, neg = sb.prompt_nodes(scene)
    pos.AddControlPointWorld(vtk.vtkVector3d(*(world_ijk_to_ras(volume) @ [30, 24, 10, 1.0])[:3].tolist()))
    target = sb.TargetSegment()
    cleared = []

    def selector(caller, _event):  # the selector selects the first segment of a segmentation that had none
        sid = seg.GetSegmentation().GetNthSegmentID(0)
        if target.selector_changed(sid):
            cleared.append(sid)
            sb.show_clicks(pos, neg, [])

    tag = seg.GetSegmentation().AddObserver(slicer.vtkSegmentation.SegmentAdded, selector)
    try:
        with target.module_change():
            _, sid = sb.prepare_target(scene, volume, seg, None)
        assert target.module_selected(sid) and target.segment_id == sid
        assert cleared == [] and len(sb.clicks_from_markups(pos, neg, volume)) == 1, "the first click vanished"
        # a real user choice of another segment still switches (and clears the points)
        assert target.selector_changed("other") and target.segment_id == "other"
        assert not target.selector_changed("other")
        # without the guard the same mechanism deletes the point (the defect)
        seg.GetSegmentation().RemoveAllSegments()
        target.reset()
        sb.prepare_target(scene, volume, seg, None)
        assert cleared and pos.GetNumberOfControlPoints() == 0
    finally:
        seg.GetSegmentation().RemoveObserver(tag)


# ------------------------------------------------------------------------------------------------ issue 10.4
def test_include_exclude_buttons_follow_esc_and_right_click(scene):
    app = scene._app_logic
    markups = slicer.vtkSlicerMarkupsLogic()
    markups.SetMRMLApplicationLogic(app)
    markups.SetMRMLScene(scene)
    interaction, selection = app.GetInteractionNode(), app.GetSelectionNode()
    pos, neg = sb.prompt_nodes(scene)
    other = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "someone else's list")
    buttons = []
    obs = sb.PlaceModeObserver(interaction, selection, lambda: (pos, neg), lambda inc, exc: buttons.append((inc, exc)))
    try:
        markups.SetActiveList(pos)
        markups.StartPlaceMode(True)  # Include pressed
        assert buttons[-1] == (True, False)
        interaction.SwitchToViewTransformMode()  # Esc / right-click in a view
        assert buttons[-1] == (False, False)
        markups.SetActiveList(neg)
        markups.StartPlaceMode(True)  # Exclude pressed
        assert buttons[-1] == (False, True)
        markups.SetActiveList(other)  # another module places into its own list
        assert buttons[-1] == (False, False)
        n = len(buttons)
        interaction.SwitchToViewTransformMode()
        assert len(buttons) == n  # no change, no call
    finally:
        obs.remove()
    markups.SetActiveList(pos)
    markups.StartPlaceMode(True)
    assert len(buttons) == n  # removed
    interaction.SwitchToViewTransformMode()


# ------------------------------------------------------------------------------------------------ issue 10.6
def test_reading_and_exporting_leave_no_nodes_in_the_scene(scene, tmp_path):
    from test_slicer_bridge import add_segment_with_own_origin, add_segmentation

    volume = add_volume(scene)
    seg, (a,) = add_segmentation(scene, volume, names=("liver",))
    sb.write_mask_to_segment(seg, a, np.ones((3, 4, 5), np.uint8), box_of(2, 5, 3, 7, 4, 9), volume)
    crop = np.ones((2, 2, 2), np.uint8)
    offgrid = add_segment_with_own_origin(seg, volume, "offgrid", (0.5, 0, 0), crop)  # read via the exporter
    users_colors = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "seg_ColorTable")  # a user's node, same name

    def node_ids():
        return {scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes())}

    # The subject hierarchy node is the scene's own singleton (a Slicer application always has it); the
    # exporter creates it on first use, so resolve it first: it is not a node we leak.
    slicer.vtkMRMLSubjectHierarchyNode.ResolveSubjectHierarchy(scene)
    before = node_ids()
    assert sb.read_segment(seg, a, volume).sum() == 60
    assert sb.read_segment(seg, offgrid, volume).any()
    sb.export_nifti(seg, str(tmp_path / "labels.nii.gz"), volume)
    sb.export_nifti(seg, str(tmp_path), volume, segment_ids=[offgrid])
    sb.export_seg_nrrd(seg, str(tmp_path / "s.seg.nrrd"), volume)
    assert node_ids() == before, [scene.GetNodeByID(i).GetName() for i in node_ids() - before]
    assert users_colors.GetScene() is scene
