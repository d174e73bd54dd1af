"""The module's engine logic (``SAM3DSegmentLib.slicer.engine_link.EngineLink``) on real MRML (PyPI ``slicer-core``)
with the in-process ``ThreadEngine`` and a stub model: clicks, undo/redo and the volume hand-over, without Qt.
Also ``volume_token`` (when the volume must be sent again) and ``ensure_dependencies`` (torch is never imported).
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (test dependency) is required")

from SAM3DSegmentLib import slicer as sb  # noqa: E402
from SAM3DSegmentLib.core.geometry import GeometryError  # noqa: E402
from SAM3DSegmentLib.inference.session import SessionOptions  # noqa: E402
from SAM3DSegmentLib.inference.worker import ThreadEngine  # noqa: E402
from test_slicer_bridge import _BallBackend, add_parent_transform, add_volume, scene  # noqa: E402,F401 (fixture)

OPTIONS = SessionOptions(region_size=16, spacing_mm=2.0, extend=False, max_regions=1)


@pytest.fixture
def link():
    engine = ThreadEngine(OPTIONS, backend=_BallBackend())
    out = sb.EngineLink(engine)
    out.model_name = "ball stub"  # the backend is set directly: no "load" job
    yield out
    engine.shutdown()


def finish(link):
    """Pump until the engine is idle; the finished jobs."""
    jobs = []
    link.wait_idle(lambda: jobs.extend(link.poll(0.01)), timeout=60)
    assert not link.engine.busy
    return jobs


def kinds(jobs):
    return [(j.context["kind"], j.state) for j in jobs]


def world_ras(volume, ijk):
    return sb.volume_from_node(volume).ijk_to_ras_points(np.asarray(ijk, dtype=float))


# ------------------------------------------------------------------------------------------------ volume_token
def test_volume_token_changes_with_voxels_and_world_grid_only(scene):
    volume = add_volume(scene, name="token")
    token = sb.volume_token(volume)
    assert sb.volume_token(volume) == token
    volume.SetAttribute("note", "an attribute is no reason to send the volume again")
    assert sb.volume_token(volume) == token
    volume.SetSpacing(0.8, 1.3, 2.0)  # edited in the Volumes module: same voxels, another grid
    assert sb.volume_token(volume) != token
    token = sb.volume_token(volume)
    volume.SetOrigin(-20.0, 15.0, 41.0)
    assert sb.volume_token(volume) != token
    token = sb.volume_token(volume)
    sb.scalars_view(volume.GetImageData())[0, 0, 0] += 1
    volume.GetImageData().Modified()
    assert sb.volume_token(volume) != token
    token = sb.volume_token(volume)
    tnode, m = add_parent_transform(scene, volume)
    assert sb.volume_token(volume) != token
    token = sb.volume_token(volume)
    m[:3, 3] += (5.0, 0.0, 0.0)
    tnode.SetMatrixTransformToParent(sb.numpy_to_vtk_matrix(m))
    assert sb.volume_token(volume) != token
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    volume.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(GeometryError, match="Harden"):
        sb.volume_token(volume)


# ------------------------------------------------------------------------------------------------ EngineLink
def test_clicks_undo_and_redo_write_the_engine_masks(scene, link):
    volume = add_volume(scene, name="clicks")
    add_parent_transform(scene, volume)
    seg, sid = sb.prepare_target(scene, volume)
    history = sb.SegmentHistory(seg)
    first = (world_ras(volume, [30, 24, 10]), True)
    second = (world_ras(volume, [12, 10, 4]), True)

    link.sync_clicks(volume, seg, sid, [first])
    jobs = finish(link)
    assert kinds(jobs) == [("volume", "done"), ("clicks", "done")]
    update, clicks = link.write_result(jobs[1], history)
    assert clicks is None and update.mask_box.any()
    one_ball = link.engine.call("mask", sid)
    assert one_ball[10, 24, 30] == 1
    assert np.array_equal(sb.read_segment(seg, sid, volume), one_ball)

    link.sync_clicks(volume, seg, sid, [first, second])  # the same volume is not sent again
    jobs = finish(link)
    assert kinds(jobs) == [("clicks", "done")]
    link.write_result(jobs[0], history)
    after_second = link.engine.call("mask", sid)
    assert after_second[4, 10, 12] == 1 and np.array_equal(sb.read_segment(seg, sid, volume), after_second)

    link.edit("undo", seg, sid, volume)
    (job,) = finish(link)
    update, clicks = link.write_result(job, history)
    assert len(clicks) == 1 and np.allclose(clicks[0][0], first[0])  # the markups show the engine's clicks
    assert np.array_equal(sb.read_segment(seg, sid, volume), one_ball)
    link.edit("redo", seg, sid, volume)
    (job,) = finish(link)
    _, clicks = link.write_result(job, history)
    assert len(clicks) == 2 and np.array_equal(sb.read_segment(seg, sid, volume), after_second)


def test_a_history_of_another_segmentation_is_not_used(scene, link):
    volume = add_volume(scene, name="two segmentations")
    seg, sid = sb.prepare_target(scene, volume)
    other_seg, _ = sb.prepare_target(scene, volume)
    other_history = sb.SegmentHistory(other_seg)  # the user switched segmentations while the job ran
    link.sync_clicks(volume, seg, sid, [(world_ras(volume, [30, 24, 10]), True)])
    job = finish(link)[-1]
    link.write_result(job, other_history)
    assert sb.read_segment(seg, sid, volume).any()
    assert not other_history.can_undo


def test_write_back_follows_the_segment_editor_overwrite_choice(scene, link):
    volume = add_volume(scene, name="editor")
    seg, sid = sb.prepare_target(scene, volume)
    neighbour = sb.ensure_segment(seg, name="neighbour")
    block = np.ones((6, 8, 8), np.uint8)
    sb.write_mask_to_segment(seg, neighbour, block, (slice(7, 13), slice(20, 28), slice(26, 34)), volume)
    editor = slicer.vtkMRMLSegmentEditorNode()  # the class is not registered with every scene: add an instance
    scene.AddNode(editor)
    editor.SetAndObserveSegmentationNode(seg)
    editor.SetOverwriteMode(editor.OverwriteNone)  # "Modify other segments: allow overlap"
    try:
        link.sync_clicks(volume, seg, sid, [(world_ras(volume, [30, 24, 10]), True)])
        link.write_result(finish(link)[-1])
        assert (sb.read_segment(seg, sid, volume) & sb.read_segment(seg, neighbour, volume)).any()
        assert sb.read_segment(seg, neighbour, volume)[7:13, 20:28, 26:34].all()  # the neighbour kept its voxels
    finally:
        scene.RemoveNode(editor)


def test_volume_is_sent_again_when_its_grid_changes(scene, link):
    volume = add_volume(scene, name="resend")
    seg, sid = sb.prepare_target(scene, volume)
    clicks = [(world_ras(volume, [30, 24, 10]), True)]
    link.sync_clicks(volume, seg, sid, clicks)
    assert kinds(finish(link)) == [("volume", "done"), ("clicks", "done")]
    volume.SetAttribute("note", "unrelated")
    link.sync_clicks(volume, seg, sid, clicks)
    assert kinds(finish(link)) == [("clicks", "done")]
    volume.SetSpacing(0.8, 1.3, 2.0)  # the engine's copy has the old grid: a click would land elsewhere
    link.sync_clicks(volume, seg, sid, clicks)
    jobs = finish(link)
    assert kinds(jobs) == [("volume", "done"), ("clicks", "done")]
    assert jobs[0].context["token"] == sb.volume_token(volume) == link.volume_token


def test_a_volume_the_engine_refused_is_sent_again_and_close_scene_forgets_it(scene):
    volume = add_volume(scene, name="refused")
    seg, sid = sb.prepare_target(scene, volume)
    engine = ThreadEngine(OPTIONS)  # no model: set_volume fails
    link = sb.EngineLink(engine)
    try:
        assert link.request_clicks(sid) is None  # no model, no volume: nothing to ask
        link.sync_clicks(volume, seg, sid, [(world_ras(volume, [30, 24, 10]), True)])
        assert link.volume_token is not None
        jobs = finish(link)
        assert kinds(jobs) == [("volume", "failed"), ("clicks", "failed")]
        assert link.volume_token is None  # the next click sends it again
        engine.engine.set_backend(_BallBackend())
        link.model_name = "ball stub"
        link.sync_clicks(volume, seg, sid, [(world_ras(volume, [30, 24, 10]), True)])
        assert kinds(finish(link)) == [("volume", "done"), ("clicks", "done")]
        link.request_clicks(sid)
        (job,) = finish(link)
        assert job.context == {"kind": "points", "segment": sid} and len(job.result) == 1
        link.close_scene()
        assert link.volume_token is None and link.request_clicks(sid) is None
        assert kinds(finish(link)) == [("forget", "done")]
        assert engine.engine.volume_key is None
    finally:
        engine.shutdown()


# ------------------------------------------------------------------------------------------------ dependencies
def test_ensure_dependencies_never_imports_torch(monkeypatch):
    imported = []
    real_import = __import__

    def spy(name, *args, **kwargs):
        imported.append(name)
        return real_import(name, *args, **kwargs)

    real_find_spec = importlib.util.find_spec

    def installed(name, *args):  # torch and slicerio are installed (whether or not this machine has them)
        return importlib.machinery.ModuleSpec(name, None) if name in ("torch", "slicerio") else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", installed)
    monkeypatch.setattr("builtins.__import__", spy)
    sb.ensure_dependencies()
    monkeypatch.undo()
    assert "torch" not in imported and "PyTorchUtils" not in imported


def test_ensure_dependencies_installs_torch_through_the_pytorch_extension(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # find_spec: not installed
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # "import PyTorchUtils" raises ImportError
    with pytest.raises(RuntimeError, match="Install the 'PyTorch' extension"):
        sb.ensure_dependencies()
    calls = []

    class Logic:
        result = None

        def installTorch(self, **kwargs):
            calls.append(kwargs)
            return Logic.result

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=Logic))
    with pytest.raises(RuntimeError, match="PyTorch was not installed"):
        sb.ensure_dependencies()
    assert calls == [{"askConfirmation": True, "torchVersionRequirement": ">=2.1"}]
    Logic.result = object()
    pip = []
    monkeypatch.setitem(sys.modules, "slicerio", None)
    monkeypatch.setitem(sys.modules, "slicer.packaging",
                        types.SimpleNamespace(pip_ensure=lambda *a, **k: pip.append((a, k))))
    sb.ensure_dependencies()
    assert len(calls) == 2 and pip == [(("slicerio>=1.0",), {"requester": "SAM3DSegment"})]


@pytest.mark.parametrize("packaging", [None, types.SimpleNamespace()], ids=["no_slicer_packaging", "no_pip_ensure"])
def test_before_slicer_5_12_slicerio_comes_from_pip_install(monkeypatch, packaging):
    """Slicer < 5.12 has no slicer.packaging.pip_ensure: slicer.util.pip_install is used instead."""
    import slicer

    torch_stub = types.ModuleType("torch")
    torch_stub.__spec__ = importlib.machinery.ModuleSpec("torch", None)
    monkeypatch.setitem(sys.modules, "torch", torch_stub)                  # installed: PyTorch is not asked
    monkeypatch.setitem(sys.modules, "slicerio", None)                     # missing
    monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)        # None: "import slicer.packaging" fails
    pip = []
    monkeypatch.setattr(slicer, "util", types.SimpleNamespace(pip_install=pip.append), raising=False)
    sb.ensure_dependencies()
    assert pip == ["slicerio>=1.0"]


def test_the_upsampling_setting_reaches_the_child_engine(caplog):
    """The module reads EngineLink.UPSAMPLING_SETTING from Slicer's settings: "guided" gives the child engine
    guided session options, the default none (trilinear), and a typo is logged and ignored (nothing started)."""
    from SAM3DSegmentLib.inference.engine_process import ProcessEngine

    guided = sb.EngineLink(upsampling="guided")
    assert isinstance(guided.engine, ProcessEngine) and guided.engine.session_options.upsampling == "guided"
    assert not guided.engine.running
    assert sb.EngineLink().engine.session_options is None
    with caplog.at_level("WARNING"):
        typo = sb.EngineLink(upsampling="guidedd")
    assert typo.engine.session_options is None and "SAM3DSegment/Upsampling" in caplog.text


def test_without_an_explicit_choice_the_link_reads_slicers_setting(monkeypatch):
    import slicer

    class Settings:
        def value(self, key, default):
            return {"SAM3DSegment/Upsampling": "guided"}.get(key, default)

    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(settings=Settings), raising=False)
    assert sb.EngineLink().engine.session_options.upsampling == "guided"
    assert sb.EngineLink(upsampling="trilinear").engine.session_options is None
