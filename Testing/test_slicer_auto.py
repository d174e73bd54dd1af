"""The module's "Find all" on real MRML (PyPI ``slicer-core``, no Qt): instances become segments (names, colours,
scores in tags), existing segments keep every voxel, undo removes the batch in one step and redo adds it again;
the ROI markup in world space; the whole loop through the engine's ``find_all`` job with stand-in widgets (their
names checked against SAM3DSegment.ui)."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (test dependency) is required")
import vtk  # noqa: E402

from SAM3DSegmentLib import slicer as sb  # noqa: E402
from SAM3DSegmentLib.inference.session import SessionOptions  # noqa: E402
from SAM3DSegmentLib.inference.worker import ThreadEngine  # noqa: E402
from test_auto_generator import ImageBackend  # noqa: E402
from test_slicer_bridge import add_parent_transform, add_segmentation, scene  # noqa: E402,F401 (fixture)
from _qt_standins import Widget  # noqa: E402

UI_FILE = Path(__file__).resolve().parents[1] / "SAM3DSegment" / "Resources" / "UI" / "SAM3DSegment.ui"
SHAPE_KJI = (30, 40, 44)
CENTRES_IJK = [(12, 14, 10), (30, 26, 18)]


def sphere_volume(scene, name="ct"):
    """Body of 0 HU in air, two bright balls (radius 5 voxels of 1.5 mm)."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    img = vtk.vtkImageData()
    img.SetDimensions(SHAPE_KJI[2], SHAPE_KJI[1], SHAPE_KJI[0])
    img.AllocateScalars(vtk.VTK_SHORT, 1)
    arr = sb.scalars_view(img)
    k, j, i = np.indices(SHAPE_KJI)
    arr[...] = np.where((i - 22) ** 2 + (j - 20) ** 2 < 19 ** 2, 0, -1000)
    for c in CENTRES_IJK:
        arr[(i - c[0]) ** 2 + (j - c[1]) ** 2 + (k - c[2]) ** 2 <= 25] = 300
    node.SetAndObserveImageData(img)
    node.SetSpacing(1.5, 1.5, 1.5)
    node.SetOrigin(-30.0, 10.0, 40.0)
    return node


def instance(name, box, mask, color=(1.0, 0.0, 0.0)):
    return {"name": name, "color": list(color), "box": [[s.start, s.stop] for s in box], "mask": mask,
            "tags": {"SAM3D.Stability": "0.9", "SAM3D.PredictedIoU": "n/a"}, "volume_ml": 0.1, "stability": 0.9,
            "predicted_iou": None, "cut_by_region": False}


# ------------------------------------------------------------------------------------------ the batch
def test_a_batch_adds_segments_keeps_existing_voxels_and_undoes_in_one_step(scene):
    volume = sphere_volume(scene)
    seg, (mine,) = add_segmentation(scene, volume, names=("mine",))
    existing = np.zeros(SHAPE_KJI, np.uint8)
    existing[8:14, 10:20, 8:18] = 1
    sb.write_mask_to_segment(seg, mine, existing, tuple(slice(0, n) for n in SHAPE_KJI), volume)
    a = np.ones((4, 5, 6), np.uint8)                                  # overlaps the existing segment
    b = np.zeros((3, 3, 3), np.uint8)
    b[1, 1, 1] = 1
    box_a, box_b = (slice(10, 14), slice(15, 20), slice(12, 18)), (slice(20, 23), slice(25, 28), slice(30, 33))
    batch = sb.InstanceBatch(seg, volume, [instance("auto 001", box_a, a), instance("auto 002", box_b, b, (0, 1, 0))])
    ids = batch.apply()
    segmentation = seg.GetSegmentation()
    assert [segmentation.GetSegment(s).GetName() for s in ids] == ["auto 001", "auto 002"]
    tag = vtk.reference("")
    assert segmentation.GetSegment(ids[0]).GetTag("SAM3D.Stability", tag) and str(tag) == "0.9"
    assert np.allclose(segmentation.GetSegment(ids[1]).GetColor(), (0, 1, 0))
    assert np.array_equal(sb.read_segment(seg, mine, volume), existing)          # not a voxel taken
    want = np.zeros(SHAPE_KJI, np.uint8)
    want[box_a] = 1
    assert np.array_equal(sb.read_segment(seg, ids[0], volume), want)
    assert sb.read_segment(seg, ids[1], volume).sum() == 1
    assert batch.undo() == 2
    assert segmentation.GetNumberOfSegments() == 1 and np.array_equal(sb.read_segment(seg, mine, volume), existing)
    again = batch.redo()
    assert len(again) == 2 and np.array_equal(sb.read_segment(seg, again[0], volume), want)


def test_a_failed_batch_leaves_no_segment_behind(scene):
    volume = sphere_volume(scene)
    seg, _ = add_segmentation(scene, volume, names=("mine",))
    good = instance("auto 001", (slice(0, 2),) * 3, np.ones((2, 2, 2), np.uint8))
    bad = instance("auto 002", (slice(0, 2),) * 3, np.ones((3, 3, 3), np.uint8))     # mask does not fit its box
    with pytest.raises(ValueError):
        sb.InstanceBatch(seg, volume, [good, bad]).apply()
    assert seg.GetSegmentation().GetNumberOfSegments() == 1


def test_roi_markup_in_world_space(scene):
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "roi")
    roi.SetCenter(5.0, -3.0, 12.0)
    roi.SetSize(20.0, 30.0, 40.0)
    tnode, m = add_parent_transform(scene, roi)
    got = sb.roi_from_node(roi)
    assert np.allclose(got["centre"], m[:3, :3] @ [5.0, -3.0, 12.0] + m[:3, 3], atol=1e-6)
    assert np.allclose(got["size"], [20.0, 30.0, 40.0], atol=1e-6)
    assert np.allclose(np.asarray(got["axes"]), m[:3, :3], atol=1e-6)
    assert sb.roi_from_node(None) is None


# ------------------------------------------------------------------------------------------ the panel
class ListWidget(Widget):
    def __init__(self):
        super().__init__(items=[])

    def clear(self):
        self.items = []

    def addItem(self, text):  # noqa: N802 - Qt name
        self.items.append(text)


class Combo(Widget):
    def __init__(self):
        super().__init__(items=[], currentText="")

    def addItem(self, text):  # noqa: N802
        self.items.append(text)
        self.currentText = self.currentText or text


PANEL_WIDGETS = {"findAllRoiSelector": "qMRMLNodeComboBox", "findAllPresetComboBox": "QComboBox",
                 "findAllStabilitySpinBox": "QDoubleSpinBox", "findAllButton": "QPushButton",
                 "undoFindAllButton": "QPushButton", "redoFindAllButton": "QPushButton",
                 "findAllStatusLabel": "QLabel", "findAllList": "QListWidget"}


def make_ui(roi=None):
    return type("UI", (), {
        "findAllRoiSelector": Widget(currentNode=lambda: roi), "findAllPresetComboBox": Combo(),
        "findAllStabilitySpinBox": Widget(value=0.8), "findAllButton": Widget(), "undoFindAllButton": Widget(enabled=True),
        "redoFindAllButton": Widget(enabled=True), "findAllStatusLabel": Widget(text=""), "findAllList": ListWidget()})()


def test_the_panel_widgets_exist_in_the_module_ui():
    found = {w.get("name"): w.get("class") for w in ET.parse(UI_FILE).iter("widget")}
    assert {n: found.get(n) for n in PANEL_WIDGETS} == PANEL_WIDGETS


def test_find_all_through_the_engine_to_segments_and_back(scene):
    volume = sphere_volume(scene)
    engine = ThreadEngine(SessionOptions(region_size=32, spacing_mm=1.5), backend=ImageBackend())
    link = sb.EngineLink(engine)
    link.model_name = "image stub"
    ui = make_ui()
    shown = []
    panel = sb.FindAllPanel(ui, link, lambda: None, lambda: (volume, None), shown.append)
    try:
        assert ui.findAllPresetComboBox.items == ["nodules", "everything"]
        assert not ui.undoFindAllButton.enabled and not ui.redoFindAllButton.enabled
        ui.findAllPresetComboBox.currentText = "nodules"
        ui.findAllButton.click()
        jobs = []
        link.wait_idle(lambda: jobs.extend(link.poll(0.01)), timeout=120)
        job = [j for j in jobs if j.context["kind"] == "find_all"][0]
        assert job.state == "done", job.traceback
        batch = panel.show_result(job)
    finally:
        engine.shutdown()
    seg = shown[-1]
    world = sb.volume_from_node(volume)
    centres = [tuple(world.ijk_to_ras_points(np.asarray(c, float))) for c in CENTRES_IJK]
    names = [seg.GetSegmentation().GetSegment(s).GetName() for s in batch.ids]
    assert names[:1] == ["auto 001"] and len(ui.findAllList.items) == len(batch.ids)
    assert "stability" in ui.findAllList.items[0] and "ml" in ui.findAllList.items[0]
    balls = 0
    for sid in batch.ids:
        m = sb.read_segment(seg, sid, volume)
        c = world.ijk_to_ras_points(np.argwhere(m).mean(axis=0)[::-1])
        balls += min(np.linalg.norm(np.asarray(centres) - c, axis=1)) < 2.0
    assert balls == 2
    assert ui.undoFindAllButton.enabled and not ui.redoFindAllButton.enabled
    ui.undoFindAllButton.click()
    assert seg.GetSegmentation().GetNumberOfSegments() == 0 and ui.findAllList.items == []
    assert ui.redoFindAllButton.enabled and shown[-1] is seg
    ui.redoFindAllButton.click()
    assert seg.GetSegmentation().GetNumberOfSegments() == len(batch.ids)


def test_the_panel_shows_the_batch_segmentation_as_the_module_own_choice():
    """Given the module's TargetSegment, a batch's segmentation is put in the selector inside module_change (so the
    module does not take it for a user's choice), then the module's callback runs."""
    target = sb.TargetSegment()
    seen, told = [], []
    ui = make_ui()
    ui.segmentationSelector = Widget(setCurrentNode=lambda node: seen.append((node, target.changing)))
    panel = sb.FindAllPanel(ui, link=None, started=lambda: None, nodes=lambda: (None, None), changed=told.append,
                            target=target)
    node = object()
    panel.changed(node)
    assert seen == [(node, True)] and told == [node] and not target.changing
    bare = sb.FindAllPanel(make_ui(), None, lambda: None, lambda: (None, None), told.append)
    bare.changed("other")  # no target: the selector is the module's business
    assert told == [node, "other"] and len(seen) == 1
