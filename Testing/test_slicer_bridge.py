"""SAM3DSegmentLib.slicer on real MRML (PyPI ``slicer-core``: Slicer's own C++ libraries, no GUI).

Volumes are small (64 x 48 x 20 voxels) and oblique/anisotropic on purpose: orientation and spacing mistakes
show up as wrong voxels.
"""
from __future__ import annotations

import os
import sys
import types

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (test dependency) is required")
import vtk  # noqa: E402  (installed with slicer-core)

from SAM3DSegmentLib import slicer as sb  # noqa: E402
from SAM3DSegmentLib.core.geometry import GeometryError, Volume  # noqa: E402

SHAPE_KJI = (20, 48, 64)


def rotation(axis, deg):
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    i, j = [(1, 2), (0, 2), (0, 1)][axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


@pytest.fixture(scope="module")
def scene():
    sc = slicer.vtkMRMLScene()
    sb.segmentations_logic(sc)  # once per process (registers the converter rules)
    app = slicer.vtkMRMLApplicationLogic()
    app.SetMRMLScene(sc)
    sc._app_logic = app  # keep alive
    return sc


def add_volume(scene, name="ct", oblique=True, seed=0):
    rng = np.random.default_rng(seed)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    img = vtk.vtkImageData()
    img.SetDimensions(SHAPE_KJI[2], SHAPE_KJI[1], SHAPE_KJI[0])
    img.AllocateScalars(vtk.VTK_SHORT, 1)
    arr = sb.scalars_view(img)
    arr[...] = rng.integers(-1000, 1000, size=SHAPE_KJI)
    node.SetAndObserveImageData(img)
    node.SetSpacing(0.8, 1.3, 2.5)
    node.SetOrigin(-20.0, 15.0, 40.0)
    if oblique:
        d = rotation(2, 25) @ rotation(0, -15) @ np.diag([-1.0, 1.0, 1.0])  # columns: i, j, k directions
        node.SetIJKToRASDirections(*d.reshape(-1).tolist())
    return node


def add_parent_transform(scene, node, deg=30.0, shift=(12.0, -7.0, 30.0)):
    tnode = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "T")
    m = np.eye(4)
    m[:3, :3] = rotation(1, deg) @ rotation(2, 10)
    m[:3, 3] = shift
    tnode.SetMatrixTransformToParent(sb.numpy_to_vtk_matrix(m))
    node.SetAndObserveTransformNodeID(tnode.GetID())
    return tnode, m


def local_ijk_to_ras(node):
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return sb.vtk_matrix_to_numpy(m)


def add_segmentation(scene, volume, names=("a",)):
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    if volume.GetParentTransformNode() is not None:
        seg.SetAndObserveTransformNodeID(volume.GetParentTransformNode().GetID())
    ids = [sb.ensure_segment(seg, name=n) for n in names]
    return seg, ids


def box_of(k0, k1, j0, j1, i0, i1):
    return (slice(k0, k1), slice(j0, j1), slice(i0, i1))


def ball(shape, centre, radius):
    k, j, i = np.indices(shape)
    return ((k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2 <= radius ** 2).astype(np.uint8)


def full(box, mask_box):
    out = np.zeros(SHAPE_KJI, np.uint8)
    out[box] = mask_box
    return out


# ------------------------------------------------------------------------------------------------ volume
def test_volume_from_node_copies_array_and_folds_parent_transform(scene):
    node = add_volume(scene)
    _, m = add_parent_transform(scene, node)
    world = sb.volume_from_node(node)
    local = sb.volume_from_node(node, frame="volume")
    assert np.array_equal(world.array, sb.scalars_view(node.GetImageData()))
    assert not np.shares_memory(world.array, sb.scalars_view(node.GetImageData()))
    assert np.allclose(local.ijk_to_ras, local_ijk_to_ras(node))
    assert np.allclose(world.ijk_to_ras, m @ local_ijk_to_ras(node))
    assert world.meta["node_id"] == node.GetID() and world.meta["mtime"] == node.GetImageData().GetMTime()
    assert "dicom_series_uid" not in world.meta
    node.SetAttribute("DICOM.instanceUIDs", "1.2.3.4 1.2.3.5")
    node.SetAttribute("DICOM.SeriesInstanceUID", "1.2.3")
    meta = sb.volume_from_node(node).meta
    assert meta["dicom_series_uid"] == "1.2.3" and meta["dicom_instance_uids"] == ["1.2.3.4", "1.2.3.5"]


def test_volume_under_nonlinear_transform_asks_to_harden(scene):
    node = add_volume(scene)
    tnode = scene.AddNewNodeByClass("vtkMRMLTransformNode", "warp")
    tps = vtk.vtkThinPlateSplineTransform()
    src, dst = vtk.vtkPoints(), vtk.vtkPoints()
    for p in ([0, 0, 0], [50, 0, 0], [0, 50, 0], [0, 0, 50]):
        src.InsertNextPoint(p)
        dst.InsertNextPoint([p[0] + 3, p[1], p[2] + (2 if p[2] else 0)])
    tps.SetSourceLandmarks(src)
    tps.SetTargetLandmarks(dst)
    tps.SetBasisToR()
    tnode.SetAndObserveTransformToParent(tps)
    node.SetAndObserveTransformNodeID(tnode.GetID())
    with pytest.raises(GeometryError, match="[Hh]arden"):
        sb.volume_from_node(node)


# ------------------------------------------------------------------------------------------------ clicks
def test_world_click_maps_to_right_voxel_on_oblique_anisotropic_transformed_volume(scene):
    node = add_volume(scene)
    _, m = add_parent_transform(scene, node)
    pos = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "pos")
    neg = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "neg")
    # Markups under their own, unrelated transform: only WORLD positions may matter.
    add_parent_transform(scene, neg, deg=-40.0, shift=(3.0, 4.0, 5.0))
    targets = [((40, 10, 7), True), ((5, 30, 15), False), ((63, 47, 19), True)]
    local = local_ijk_to_ras(node)
    for (ijk, positive) in targets:
        world = (m @ local @ np.array([*ijk, 1.0]))[:3]
        world = world + np.array([0.3, -0.2, 0.4])  # inside the voxel, not at its centre (< half spacing)
        n = pos if positive else neg
        n.AddControlPointWorld(vtk.vtkVector3d(*world.tolist()))
    clicks_local = sb.clicks_from_markups(pos, neg, node, frame="volume")
    vol_local = sb.volume_from_node(node, frame="volume")
    clicks_world = sb.clicks_from_markups(pos, neg, node)
    vol_world = sb.volume_from_node(node)
    # no placement numbers recorded (added by script): positive list first, then negative
    expected = [targets[0], targets[2], targets[1]]
    assert [vol_local.ras_to_voxel(p) for p, _ in clicks_local] == [t[0] for t in expected]
    assert [vol_world.ras_to_voxel(p) for p, _ in clicks_world] == [t[0] for t in expected]
    assert [pos_ for _, pos_ in clicks_world] == [t[1] for t in expected]
    # local click positions are the parent-inverse of the world ones
    back = [(np.linalg.inv(m) @ np.array([*p, 1.0]))[:3] for p, _ in clicks_world]
    assert np.allclose(back, [p for p, _ in clicks_local], atol=1e-6)


def _interaction_data(world):
    ed = slicer.vtkMRMLInteractionEventData()
    ed.SetWorldPosition(list(map(float, world)))
    return ed


def hover_then_click(node, positions, define=True):
    """What the markups widget does in place mode: a PREVIEW point follows the mouse, the click defines it."""
    d = node.GetDisplayNode()
    M = slicer.vtkMRMLMarkupsNode
    eye = [1, 0, 0, 0, 1, 0, 0, 0, 1]
    idx = d.UpdateActiveControlPointWorld(-1, _interaction_data(positions[0]), eye, "vtkMRMLSliceNodeRed", "",
                                          M.PositionPreview)
    for p in positions[1:]:
        d.UpdateActiveControlPointWorld(idx, _interaction_data(p), eye, "vtkMRMLSliceNodeRed", "", M.PositionPreview)
    if define:
        d.UpdateActiveControlPointWorld(idx, _interaction_data(positions[-1]), eye, "vtkMRMLSliceNodeRed", "",
                                        M.PositionDefined)
    return idx


def test_preview_points_fire_nothing_and_clicks_keep_placement_order(scene):
    node = add_volume(scene, oblique=False)
    pos = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "pos")
    neg = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "neg")
    for n in (pos, neg):
        n.CreateDefaultDisplayNodes()
    calls = []
    obs = sb.MarkupsObserver([pos, neg], lambda reason, n, i: calls.append((reason, n.GetName(), i)))
    try:
        # hovering: a preview point moving around fires Added/Modified only
        hover_then_click(pos, [(0, 20, 50), (1, 21, 51), (2, 22, 52)], define=False)
        assert calls == []
        assert pos.GetNumberOfControlPoints() == 1
        assert sb.clicks_from_markups(pos, neg, node) == []
        # the click defines it
        hover_then_click(pos, [(5, 25, 55)])  # a 2nd point: preview then defined
        assert calls == [("defined", "pos", 1)]
        pos.RemoveNthControlPoint(0)  # the stale preview leaves (place mode ended): not a user action
        assert calls == [("defined", "pos", 1)]
        # a negative click, then a positive one: order must be placement order across both lists
        hover_then_click(neg, [(9, 9, 60), (10, 10, 60)])
        hover_then_click(pos, [(-5, 30, 45)])
        clicks = sb.clicks_from_markups(pos, neg, node)
        assert [c[1] for c in clicks] == [True, False, True]
        assert np.allclose([c[0] for c in clicks], [(5, 25, 55), (10, 10, 60), (-5, 30, 45)])
        # a drag ends with PointEndInteraction: one "moved" call, order unchanged
        calls.clear()
        pos.SetNthControlPointPositionWorld(0, 6, 25, 55)  # during the drag: Modified only
        assert calls == []
        pos.InvokeEvent(slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent, 0)
        assert calls == [("moved", "pos", 0)]
        assert np.allclose(sb.clicks_from_markups(pos, neg, node)[0][0], (6, 25, 55))
        # removing the negative point
        neg.RemoveNthControlPoint(0)
        assert calls[-1] == ("removed", "neg", 0)
        assert [c[1] for c in sb.clicks_from_markups(pos, neg, node)] == [True, True]
    finally:
        obs.remove()
    n_calls = len(calls)
    hover_then_click(pos, [(0, 0, 50)])
    assert len(calls) == n_calls  # no callback after remove()


# ------------------------------------------------------------------------------------------------ write-back
def test_written_mask_equals_engine_mask_voxel_for_voxel(scene):
    node = add_volume(scene)
    seg, (sid,) = add_segmentation(scene, node)
    box = box_of(3, 15, 5, 40, 10, 50)
    mask = ball((12, 35, 40), (6, 17, 20), 9)
    rep = sb.write_mask_to_segment(seg, sid, mask, box, node)
    assert rep["changed_voxels"] == int(mask.sum())
    assert np.array_equal(sb.read_segment(seg, sid, node), full(box, mask))
    assert np.array_equal(slicer.util.arrayFromSegmentInternalBinaryLabelmap(seg, sid)[
        tuple(slice(s.start - e, s.stop - e) for s, e in zip(box, seg.GetBinaryLabelmapInternalRepresentation(sid)
                                                                   .GetExtent()[4::-2]))] > 0, mask > 0)
    # a second region outside the current extent grows the labelmap and keeps the first region
    box2 = box_of(0, 4, 40, 48, 55, 64)
    mask2 = np.ones((4, 8, 9), np.uint8)
    sb.write_mask_to_segment(seg, sid, mask2, box2, node)
    expected = full(box, mask)
    expected[box2] = 1
    assert np.array_equal(sb.read_segment(seg, sid, node), expected)
    # set semantics inside the box: clearing removes exactly the box content
    sb.write_mask_to_segment(seg, sid, np.zeros((4, 8, 9), np.uint8), box2, node)
    assert np.array_equal(sb.read_segment(seg, sid, node), full(box, mask))


class _BallBackend:
    """Stub model: logits > 0 in a ball of 1.2 low-res voxels around the newest point (region grid)."""

    name, image_size, low_res_size = "ball stub", 16, 4

    def encode(self, image):
        return None

    def decode(self, embedding, points, labels, mask_logits):
        centre = np.asarray(points, float)[-1] / 4.0
        grid = np.stack(np.meshgrid(*[np.arange(4) + 0.5] * 3, indexing="ij"), -1)
        return np.where(np.linalg.norm(grid - centre, axis=-1) <= 1.2, 5.0, -5.0).astype(np.float32)


def test_click_to_session_to_segment_end_to_end(scene):
    """Markups click (world, transformed oblique volume) -> Session -> bridge: segment == engine mask."""
    from SAM3DSegmentLib.inference.session import Session, SessionOptions

    node = add_volume(scene)
    add_parent_transform(scene, node)
    seg, (sid,) = add_segmentation(scene, node)
    pos = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "pos")
    world = sb.volume_from_node(node)
    pos.AddControlPointWorld(vtk.vtkVector3d(*world.ijk_to_ras_points(np.array([30.0, 24.0, 10.0])).tolist()))
    session = Session(_BallBackend(), SessionOptions(region_size=16, spacing_mm=2.0, extend=False, max_regions=1))
    session.set_volume(world)
    session.new_object("a")
    (ras, positive), = sb.clicks_from_markups(pos, None, node)
    update = session.add_click(ras=tuple(ras), positive=positive)
    assert update.mask_box.any()
    sb.write_mask_to_segment(seg, sid, update.mask_box, update.box, node)
    assert np.array_equal(sb.read_segment(seg, sid, node), session.mask())
    assert session.mask()[10, 24, 30] == 1  # the clicked voxel is inside


def test_write_fires_modified_events(scene):
    node = add_volume(scene)
    seg, (sid,) = add_segmentation(scene, node)
    events = []
    tag = seg.AddObserver(slicer.vtkSegmentation.SourceRepresentationModified, lambda *a: events.append(1))
    tag2 = seg.GetSegmentation().AddObserver(slicer.vtkSegmentation.SourceRepresentationModified,
                                             lambda *a: events.append(2))
    try:
        sb.write_mask_to_segment(seg, sid, np.ones((2, 2, 2), np.uint8), box_of(1, 3, 1, 3, 1, 3), node)
    finally:
        seg.RemoveObserver(tag)
        seg.GetSegmentation().RemoveObserver(tag2)
    assert 2 in events


def test_other_and_locked_segments_are_untouched(scene):
    node = add_volume(scene)
    seg, (a, b, c, d) = add_segmentation(scene, node, names=("target", "other", "locked", "hidden"))
    box = box_of(0, 20, 0, 48, 0, 64)
    block = np.zeros(SHAPE_KJI, np.uint8)
    other = block.copy(); other[5:10, 10:20, 10:30] = 1
    locked = block.copy(); locked[5:10, 25:35, 10:30] = 1
    hidden = block.copy(); hidden[12:16, 10:35, 35:40] = 1
    for sid, arr in ((b, other), (c, locked), (d, hidden)):
        sb.write_mask_to_segment(seg, sid, arr, box, node)
    sb.set_segment_locked(seg, c, True)
    seg.GetDisplayNode().SetSegmentVisibility(d, False)
    # the new object covers parts of all three
    new = np.zeros(SHAPE_KJI, np.uint8); new[4:14, 15:30, 20:38] = 1
    sb.write_mask_to_segment(seg, a, new[box], box, node, overwrite="visible")
    got = {s: sb.read_segment(seg, s, node) for s in (a, b, c, d)}
    assert np.array_equal(got[c], locked), "locked segment changed"
    assert np.array_equal(got[d], hidden), "hidden segment changed under overwrite='visible'"
    assert np.array_equal(got[b], other & ~new), "visible segment not overwritten"
    assert np.array_equal(got[a], new & ~locked), "locked voxels were taken"
    # overwrite="none": overlap allowed, nothing else changes (same layer -> target moved to its own layer)
    new2 = np.zeros(SHAPE_KJI, np.uint8); new2[0:20, 0:48, 36:39] = 1
    sb.write_mask_to_segment(seg, a, new2[box], box, node, overwrite="none")
    assert np.array_equal(sb.read_segment(seg, d, node), hidden)
    assert np.array_equal(sb.read_segment(seg, a, node), new2)
    # overwrite="all" takes the hidden segment's voxels too, never the locked ones
    sb.write_mask_to_segment(seg, a, new[box], box, node, overwrite="all")
    assert np.array_equal(sb.read_segment(seg, d, node), hidden & ~new)
    assert np.array_equal(sb.read_segment(seg, c, node), locked)
    with pytest.raises(PermissionError, match="locked"):
        sb.write_mask_to_segment(seg, c, new[box], box, node)


def test_editable_area_inside_segment_and_intensity_range(scene):
    node = add_volume(scene)
    seg, (a, organ) = add_segmentation(scene, node, names=("lesion", "organ"))
    box = box_of(0, 20, 0, 48, 0, 64)
    organ_arr = np.zeros(SHAPE_KJI, np.uint8); organ_arr[2:18, 5:40, 5:50] = 1
    sb.write_mask_to_segment(seg, organ, organ_arr, box, node)
    new = np.zeros(SHAPE_KJI, np.uint8); new[10:20, 30:48, 40:64] = 1
    sb.write_mask_to_segment(seg, a, new, box, node, overwrite="none", mask_mode="inside_segment",
                             mask_segment_id=organ)
    assert np.array_equal(sb.read_segment(seg, a, node), new & organ_arr)
    assert np.array_equal(sb.read_segment(seg, organ, node), organ_arr)
    vox = sb.scalars_view(node.GetImageData())
    sb.write_mask_to_segment(seg, a, np.zeros(SHAPE_KJI, np.uint8), box, node, overwrite="none")
    sb.write_mask_to_segment(seg, a, new, box, node, overwrite="none", intensity_range=(0, 500))
    assert np.array_equal(sb.read_segment(seg, a, node), new & (vox >= 0) & (vox <= 500))
    with pytest.raises(ValueError, match="mask_segment_id"):
        sb.write_mask_to_segment(seg, a, new, box, node, mask_mode="inside_segment")


def test_editor_settings_follow_the_segment_editor_node(scene):
    sc = slicer.vtkMRMLScene()
    assert sb.editor_settings(sc) == {"overwrite": "all", "mask_mode": "everywhere", "mask_segment_id": None,
                                      "intensity_range": None}
    editor = slicer.vtkMRMLSegmentEditorNode()
    sc.AddNode(editor)
    editor.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteVisibleSegments)
    editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
    editor.SetMaskSegmentID("organ")
    editor.SetSourceVolumeIntensityMask(True)
    editor.SetSourceVolumeIntensityMaskRange(-100.0, 300.0)
    assert sb.editor_settings(sc) == {"overwrite": "visible", "mask_mode": "inside_segment",
                                      "mask_segment_id": "organ", "intensity_range": (-100.0, 300.0)}
    editor.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteNone)
    editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedOutsideAllSegments)
    editor.SetSourceVolumeIntensityMask(False)
    got = sb.editor_settings(sc)
    assert (got["overwrite"], got["mask_mode"], got["intensity_range"]) == ("none", "outside_all", None)


def add_segment_with_own_origin(seg, volume, name, shift_ijk, arr_kji):
    """A segment stored in its own layer whose labelmap starts at volume voxel ``shift_ijk`` (extent from 0), as
    labelmaps imported from cropped files are."""
    m = local_ijk_to_ras(volume)
    t = np.eye(4)
    t[:3, 3] = shift_ijk
    img = slicer.vtkOrientedImageData()
    img.SetExtent(0, arr_kji.shape[2] - 1, 0, arr_kji.shape[1] - 1, 0, arr_kji.shape[0] - 1)
    img.SetImageToWorldMatrix(sb.numpy_to_vtk_matrix(m @ t))
    img.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    sb.scalars_view(img)[...] = arr_kji
    segment = slicer.vtkSegment()
    segment.SetName(name)
    segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(), img)
    seg.GetSegmentation().AddSegment(segment, name)
    return name


def test_labelmaps_with_whole_voxel_origin_shift_are_handled(scene):
    node = add_volume(scene)
    seg, (a,) = add_segmentation(scene, node, names=("target",))
    crop = np.zeros((6, 10, 12), np.uint8); crop[1:5, 2:8, 3:9] = 1
    b = add_segment_with_own_origin(seg, node, "imported", (30, 20, 8), crop)
    imported = np.zeros(SHAPE_KJI, np.uint8); imported[8:14, 20:30, 30:42] = crop
    assert np.array_equal(sb.read_segment(seg, b, node), imported)
    new = np.zeros(SHAPE_KJI, np.uint8); new[10:20, 25:40, 35:50] = 1
    sb.write_mask_to_segment(seg, a, new, box_of(0, 20, 0, 48, 0, 64), node, overwrite="all")
    assert np.array_equal(sb.read_segment(seg, b, node), imported & (1 - new))
    assert np.array_equal(sb.read_segment(seg, a, node), new)
    # writing INTO the shifted labelmap, partly outside its extent: it grows, keeps its voxels
    more = np.ones((3, 3, 3), np.uint8)
    sb.write_mask_to_segment(seg, b, more, box_of(1, 4, 1, 4, 1, 4), node)
    expected = imported & (1 - new); expected[1:4, 1:4, 1:4] = 1
    assert np.array_equal(sb.read_segment(seg, b, node), expected)
    # a sub-voxel shift is another grid: refused with the fix
    c = add_segment_with_own_origin(seg, node, "offgrid", (0.5, 0, 0), crop)
    with pytest.raises(GeometryError, match="Create new segmentation"):
        sb.write_mask_to_segment(seg, c, np.ones((2, 2, 2), np.uint8), box_of(0, 2, 0, 2, 0, 2), node)


def test_bad_box_and_shape_errors(scene):
    node = add_volume(scene)
    seg, (a,) = add_segmentation(scene, node)
    with pytest.raises(ValueError, match="does not match"):
        sb.write_mask_to_segment(seg, a, np.ones((2, 2, 2)), box_of(0, 3, 0, 3, 0, 3), node)
    with pytest.raises(KeyError):
        sb.write_mask_to_segment(seg, "nope", np.ones((2, 2, 2)), box_of(0, 2, 0, 2, 0, 2), node)


def test_undo_redo_restore_exact_states(scene):
    node = add_volume(scene)
    seg, (a, b) = add_segmentation(scene, node, names=("a", "b"))
    hist = sb.SegmentHistory(seg)
    box = box_of(0, 20, 0, 48, 0, 64)
    s0 = {s: sb.read_segment(seg, s, node) for s in (a, b)}
    m1 = np.zeros(SHAPE_KJI, np.uint8); m1[2:10, 5:30, 5:40] = 1
    sb.write_mask_to_segment(seg, b, m1, box, node, history=hist)
    s1 = {s: sb.read_segment(seg, s, node) for s in (a, b)}
    m2 = ball(SHAPE_KJI, (8, 20, 30), 10)
    sb.write_mask_to_segment(seg, a, m2[2:15, 8:35, 15:45], box_of(2, 15, 8, 35, 15, 45), node, history=hist)
    s2 = {s: sb.read_segment(seg, s, node) for s in (a, b)}
    assert s2[a].any() and not np.array_equal(s2[b], s1[b])  # a took voxels from b
    assert hist.undo()
    assert all(np.array_equal(sb.read_segment(seg, s, node), s1[s]) for s in (a, b))
    assert hist.undo()
    assert all(np.array_equal(sb.read_segment(seg, s, node), s0[s]) for s in (a, b))
    assert not hist.can_undo
    assert hist.redo()
    assert all(np.array_equal(sb.read_segment(seg, s, node), s1[s]) for s in (a, b))
    assert hist.redo()
    assert all(np.array_equal(sb.read_segment(seg, s, node), s2[s]) for s in (a, b))
    assert not hist.can_redo
    # writing after an undo drops the redo branch
    hist.undo()
    sb.write_mask_to_segment(seg, b, np.zeros(SHAPE_KJI, np.uint8), box, node, history=hist)
    assert not hist.can_redo


# ------------------------------------------------------------------------------------------------ export
def test_exported_seg_nrrd_and_nifti_match_the_segment(scene, tmp_path):
    slicerio = pytest.importorskip("slicerio")
    import SimpleITK as sitk

    node = add_volume(scene)
    seg, (a, b) = add_segmentation(scene, node, names=("liver", "lesion"))
    ma = ball(SHAPE_KJI, (10, 24, 30), 8)
    mb = np.zeros(SHAPE_KJI, np.uint8); mb[2:6, 2:10, 50:60] = 1
    box = box_of(0, 20, 0, 48, 0, 64)
    sb.write_mask_to_segment(seg, a, ma, box, node)
    sb.write_mask_to_segment(seg, b, mb, box, node)
    path = sb.export_seg_nrrd(seg, str(tmp_path / "out.seg.nrrd"), node)
    assert os.path.exists(path) and not [f for f in os.listdir(tmp_path) if f.startswith(".sam3d-")]
    s = slicerio.read_segmentation(path)
    ref = Volume(np.zeros(SHAPE_KJI), local_ijk_to_ras(node))
    ijk_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(s["ijkToLPS"])
    assert np.allclose(ijk_to_ras[:3, :3], ref.ijk_to_ras[:3, :3], atol=1e-4)
    offset = np.round(ref.ras_to_ijk_points(ijk_to_ras[:3, 3])).astype(int)  # (i, j, k) of file voxel 0
    voxels = np.asarray(s["voxels"])  # (i, j, k[, layer])
    if voxels.ndim == 3:
        voxels = voxels[..., None]
    assert voxels.shape[:3] == SHAPE_KJI[::-1] and offset.tolist() == [0, 0, 0]  # the whole grid, not cropped
    for sid, expected in ((a, ma), (b, mb)):
        info = next(x for x in s["segments"] if x["id"] == sid)
        got = np.zeros(SHAPE_KJI, np.uint8)
        layer = voxels[..., info.get("layer", 0)] == info["labelValue"]
        kji = np.transpose(layer, (2, 1, 0))
        got[offset[2]:offset[2] + kji.shape[0], offset[1]:offset[1] + kji.shape[1],
            offset[0]:offset[0] + kji.shape[2]] = kji
        assert np.array_equal(got, expected), sid
    # NIfTI: one labelmap on the full reference grid (LPS on disk)
    labels = sb.export_nifti(seg, str(tmp_path / "labels.nii.gz"), node)
    assert labels == {1: "liver", 2: "lesion"}
    img = sitk.ReadImage(str(tmp_path / "labels.nii.gz"))
    vol = Volume.from_sitk(img)
    assert vol.array.shape == SHAPE_KJI and np.allclose(vol.ijk_to_ras, local_ijk_to_ras(node), atol=1e-4)
    expected = np.zeros(SHAPE_KJI, np.uint8); expected[ma > 0] = 1; expected[mb > 0] = 2
    assert np.array_equal(vol.array, expected)
    # per-segment files in a folder
    out = sb.export_nifti(seg, str(tmp_path), node, segment_ids=[b])
    (f,) = out
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(f)), mb)
    with pytest.raises(ValueError, match="seg.nrrd"):
        sb.export_seg_nrrd(seg, str(tmp_path / "x.nrrd"), node)


def test_dicom_seg_export_is_guarded(scene, tmp_path):
    node = add_volume(scene)
    seg, _ = add_segmentation(scene, node)
    with pytest.raises(ValueError, match="DICOM"):
        sb.export_dicom_seg(seg, str(tmp_path), node)
    node.SetAttribute("DICOM.instanceUIDs", "1.2.3")
    with pytest.raises(RuntimeError, match="inside 3D Slicer"):
        sb.export_dicom_seg(seg, str(tmp_path), node)


def test_dicom_seg_without_the_plugin_names_slicer_5_12_or_quantitative_reporting(scene, tmp_path, monkeypatch):
    import slicer

    node = add_volume(scene)
    seg, _ = add_segmentation(scene, node)
    node.SetAttribute("DICOM.instanceUIDs", "1.2.3")
    monkeypatch.setattr(slicer, "app", object(), raising=False)
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(dicom=object()), raising=False)
    monkeypatch.setitem(sys.modules, "DICOMSegmentationPlugin", None)   # Slicer < 5.12 without the extension
    with pytest.raises(RuntimeError, match="Slicer 5.12 or newer .* QuantitativeReporting extension"):
        sb.export_dicom_seg(seg, str(tmp_path), node)
    assert not list(tmp_path.iterdir())
