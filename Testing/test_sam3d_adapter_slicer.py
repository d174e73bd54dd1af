"""The module's engine link with a 3DSAM-adapter model (real MRML via slicer-core, the in-process ThreadEngine):
after loading, the link learns once that the model has no exclude clicks and no previous-mask refinement (the
module then disables Exclude and Refine and says why); an exclude click that still reaches the engine is refused
and the segment is unchanged, and so is a refine request; a SAM-Med3D model allows both again."""
from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (test dependency) is required")
torch = pytest.importorskip("torch")

from _sam3d_adapter_fixtures import randomize_  # noqa: E402
from SAM3DSegmentLib import slicer as sb  # noqa: E402
from SAM3DSegmentLib.core.intensity import WindowZNorm  # noqa: E402
from SAM3DSegmentLib.inference.worker import ThreadEngine  # noqa: E402
from SAM3DSegmentLib.models.sam3d_adapter import Sam3DAdapter, Sam3DAdapterConfig  # noqa: E402
from SAM3DSegmentLib.models.sam3d_adapter.files import save_model_file  # noqa: E402
from test_slicer_bridge import add_volume, scene  # noqa: E402,F401 (fixture)
from test_slicer_engine_link import finish, kinds, world_ras  # noqa: E402


def test_the_link_learns_the_model_has_no_exclude_clicks(scene, tmp_path):
    model = randomize_(Sam3DAdapter(Sam3DAdapterConfig.tiny()), seed=5, std=0.1)
    path = save_model_file(model, tmp_path / "tiny3dsam.pth", intensity=WindowZNorm((-200, 300), 40.0, 90.0))
    engine = ThreadEngine()   # each model with its own region size
    link = sb.EngineLink(engine)
    try:
        assert link.exclude_allowed and link.refine_allowed  # nothing loaded yet: the buttons stay as they are
        link.load_model(str(tmp_path / "missing.pth"), "cpu")   # a failed load: nothing known about a model
        jobs = finish(link)
        assert kinds(jobs) == [("load", "failed")] and link.model_info is None and link.exclude_allowed
        link.load_model(str(path), "cpu")
        jobs = finish(link)
        assert kinds(jobs) == [("load", "done")]
        info = link.model_info   # the load result: name, device, warning and the model's limits
        assert info["family"] == "3dsam_adapter" and info["supports_exclude"] is False
        assert info["supports_mask_prompt"] is False and "no exclude clicks" in info["notice"]
        assert not link.exclude_allowed and not link.refine_allowed

        volume = add_volume(scene, name="ct3dsam", oblique=False)
        seg, sid = sb.prepare_target(scene, volume)
        include = (world_ras(volume, [20, 16, 8]), True)
        link.sync_clicks(volume, seg, sid, [include])
        jobs = finish(link)
        assert kinds(jobs) == [("volume", "done"), ("clicks", "done")]
        link.write_result(jobs[1])
        before = sb.read_segment(seg, sid, volume).copy()
        link.sync_clicks(volume, seg, sid, [include, (world_ras(volume, [5, 5, 3]), False)])
        jobs = finish(link)
        assert kinds(jobs) == [("clicks", "failed")] and "has no exclude clicks" in str(jobs[0].error)
        assert np.array_equal(sb.read_segment(seg, sid, volume), before)
        assert len(engine.call("clicks", sid)) == 1
        with pytest.raises(ValueError, match="has no previous-mask input.*SAM-Med3D"):   # refused before queueing
            link.refine(volume, seg, sid)
        assert finish(link) == [] and np.array_equal(sb.read_segment(seg, sid, volume), before)
        assert len(engine.call("clicks", sid)) == 1   # the object keeps its click

        link.load_model("SAM3DSegmentLib/resources/demo_model.pt", "cpu")   # a SAM-Med3D model: exclude again
        finish(link)
        assert link.exclude_allowed and link.refine_allowed and link.model_info["notice"] is None
    finally:
        engine.shutdown()
