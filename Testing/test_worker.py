"""SAM3DSegmentLib.inference.worker: the persistent worker thread and the engine it drives (no Slicer, no torch)."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from SAM3DSegmentLib.core.geometry import Volume, make_ijk_to_ras
from SAM3DSegmentLib.inference.engine import Engine, plan_click_update
from SAM3DSegmentLib.inference.worker import CANCELLED, DONE, FAILED, Cancelled, Worker


@pytest.fixture
def worker():
    w = Worker()
    yield w
    w.shutdown()


def drain(w, n, timeout=10.0):
    """What the GUI pump does: poll until n jobs came back."""
    got, t0 = [], time.time()
    while len(got) < n and time.time() - t0 < timeout:
        got += w.poll()
        time.sleep(0.005)
    return got


def test_jobs_run_in_order_on_one_persistent_thread(worker):
    names = []
    jobs = [worker.submit(lambda i=i: (names.append(threading.current_thread().name), i)[1]) for i in range(5)]
    done = drain(worker, 5)
    assert [j.result for j in done] == [0, 1, 2, 3, 4]
    assert all(j.state == DONE for j in jobs)
    assert set(names) == {"SAM3DSegment-worker"} and threading.current_thread().name not in names


def test_errors_are_returned_not_raised(worker):
    def boom():
        raise ValueError("bad click")

    job = worker.submit(boom)
    ok = worker.submit(lambda: 42)
    done = drain(worker, 2)
    assert [j.id for j in done] == [job.id, ok.id]
    assert job.state == FAILED and isinstance(job.error, ValueError) and "bad click" in job.traceback
    assert ok.state == DONE and ok.result == 42  # the thread survived


def test_pending_jobs_cancelled_and_superseded(worker):
    gate = threading.Event()
    ran = []
    blocker = worker.submit(gate.wait, 5)
    a = worker.submit(ran.append, "a", tag="clicks", supersede=True)
    b = worker.submit(ran.append, "b", tag="clicks", supersede=True)   # drops a
    other = worker.submit(ran.append, "other", tag="volume")
    c = worker.submit(ran.append, "c", tag="clicks", supersede=True)   # drops b, not "other"
    d = worker.submit(ran.append, "d")
    d.cancel()
    assert worker.busy
    gate.set()
    drain(worker, 6)
    assert ran == ["other", "c"]
    assert [j.state for j in (blocker, a, b, other, c, d)] == [DONE, CANCELLED, CANCELLED, DONE, DONE, CANCELLED]
    assert not worker.busy


def test_running_job_sees_cancel_request(worker):
    started, release = threading.Event(), threading.Event()

    def body(job):
        started.set()
        release.wait(5)
        job.check_cancelled()
        return "finished"

    job = worker.submit(body, pass_job=True)
    assert started.wait(5)
    worker.cancel_all()
    release.set()
    (done,) = drain(worker, 1)
    assert done is job and job.state == CANCELLED and job.result is None


def test_shutdown_stops_thread(worker):
    worker.submit(lambda: 1)
    drain(worker, 1)
    worker.shutdown()
    assert not worker._thread.is_alive()
    with pytest.raises(RuntimeError, match="shut down"):
        worker.submit(lambda: 2)


def test_plan_click_update():
    a, b, c = ((1.0, 2.0, 3.0), True), ((4.0, 5.0, 6.0), False), ((7.0, 8.0, 9.0), True)
    assert plan_click_update([a, b], [a, b]) == ("none",)
    assert plan_click_update([a, b], [a, b, c]) == ("add", [c])
    assert plan_click_update([a], [a, b, c]) == ("add", [b, c])                  # any appended suffix
    assert plan_click_update([], [a, b]) == ("add", [a, b])
    assert plan_click_update([a, b], [a, ((4.0, 5.5, 6.0), False)])[0] == "set"   # moved
    assert plan_click_update([a, b], [a]) == ("set", [a])                          # removed
    assert plan_click_update([a, b], [a, (b[0], True)])[0] == "set"                # sign changed


class BallBackend:
    """Stub model: the mask is a ball of radius 2 low-res voxels around the newest positive point."""

    name = "ball stub"
    image_size = 16
    low_res_size = 4

    def __init__(self, gate=None, started=None):
        self.gate, self.started = gate, started
        self.encodes = 0

    def encode(self, image):
        self.encodes += 1
        return np.asarray(image).mean()

    def decode(self, embedding, points, labels, mask_logits):
        if self.started is not None:
            self.started.set()
        if self.gate is not None:
            self.gate.wait(5)
        s = self.low_res_size
        centre = np.asarray(points, float)[-1] / (self.image_size / s)
        grid = np.stack(np.meshgrid(*[np.arange(s) + 0.5] * 3, indexing="ij"), -1)
        inside = np.linalg.norm(grid - centre, axis=-1) <= 1.0
        sign = 1.0 if labels[-1] == 1 else -1.0
        return np.where(inside, 5.0 * sign, -5.0).astype(np.float32)


def make_engine(backend):
    from SAM3DSegmentLib.inference.session import SessionOptions

    eng = Engine(SessionOptions(region_size=16, spacing_mm=1.0, extend=False, max_regions=1))
    eng.set_backend(backend)
    vol = Volume(np.random.default_rng(0).normal(size=(24, 24, 24)).astype(np.float32),
                 make_ijk_to_ras((1.0, 1.0, 1.0)))
    eng.set_volume(vol)
    return eng


def test_engine_sync_clicks_add_move_remove_and_undo():
    eng = make_engine(BallBackend())
    assert eng.sync_clicks(None, "Segment_1", []) is None
    c1 = ((12.0, 12.0, 12.0), True)
    u = eng.sync_clicks(None, "Segment_1", [c1])
    assert u.mask_box.any() and u.mask_box.shape == tuple(s.stop - s.start for s in u.box)
    assert eng.sync_clicks(None, "Segment_1", [c1]) is None   # nothing changed, nothing decoded
    c2 = ((14.0, 12.0, 12.0), True)
    eng.sync_clicks(None, "Segment_1", [c1, c2])
    assert [c[0] for c in eng.clicks("Segment_1")] == [c1[0], c2[0]]
    eng.sync_clicks(None, "Segment_1", [c2])                    # c1 removed -> replay
    assert [c[0] for c in eng.clicks("Segment_1")] == [c2[0]]
    eng.undo("Segment_1")
    assert len(eng.clicks("Segment_1")) == 2
    eng.redo("Segment_1")
    assert len(eng.clicks("Segment_1")) == 1
    # objects are independent and keyed by the caller's key
    eng.sync_clicks(None, "Segment_2", [((5.0, 5.0, 5.0), True)])
    assert len(eng.clicks("Segment_1")) == 1 and len(eng.clicks("Segment_2")) == 1
    eng.reset("Segment_2")
    assert eng.clicks("Segment_2") == []


def test_cancelled_running_click_leaves_session_unchanged(worker):
    gate, started = threading.Event(), threading.Event()
    backend = BallBackend()
    eng = make_engine(backend)
    c1 = ((12.0, 12.0, 12.0), True)
    eng.sync_clicks(None, "S", [c1])
    before = eng.session.mask(eng._objects["S"]).copy()
    backend.gate, backend.started = gate, started
    job = worker.submit(eng.sync_clicks, "S", [c1, ((8.0, 12.0, 12.0), True)], pass_job=True, tag="clicks")
    assert started.wait(5)
    job.cancel()
    gate.set()
    (done,) = drain(worker, 1)
    assert done.state == CANCELLED and done.result is None
    assert [c[0] for c in eng.clicks("S")] == [c1[0]]
    assert np.array_equal(eng.session.mask(eng._objects["S"]), before)


def test_engine_errors_name_the_fix():
    eng = Engine()
    with pytest.raises(RuntimeError, match="Load model"):
        eng.sync_clicks(None, "S", [])
    job_like = type("J", (), {"check_cancelled": lambda self: (_ for _ in ()).throw(Cancelled()),
                              "cancel_requested": True})()
    eng2 = make_engine(BallBackend())
    with pytest.raises(Cancelled):
        eng2.sync_clicks(job_like, "S", [((12.0, 12.0, 12.0), True)])
    assert eng2.clicks("S") == []


def test_engine_loads_checkpoint_on_worker_and_segments(worker, tmp_path):
    """The real path: checkpoint file -> LocalBackend -> Session, all on the worker thread."""
    pytest.importorskip("torch")
    from SAM3DSegmentLib.models import SamMed3DConfig, build_sam_med3d, save_checkpoint
    from SAM3DSegmentLib.inference.session import SessionOptions

    path = save_checkpoint(build_sam_med3d(SamMed3DConfig.tiny()), tmp_path / "tiny.pt")
    eng = Engine(SessionOptions(region_size=128, spacing_mm=1.5, extend=False, max_regions=1))
    load = worker.submit(eng.load, str(path), "cpu", progress=None)
    vol = Volume(np.random.default_rng(1).normal(size=(20, 40, 40)).astype(np.float32),
                 make_ijk_to_ras((1.0, 1.0, 2.0)))
    setv = worker.submit(eng.set_volume, vol)
    click = worker.submit(eng.sync_clicks, "S", [(tuple(vol.ijk_to_ras_points(np.array([20.0, 20.0, 10.0]))), True)],
                          pass_job=True)
    done = drain(worker, 3, timeout=120)
    assert [j.state for j in done] == [DONE, DONE, DONE], [j.traceback for j in done]
    assert "cpu" in load.result["name"] and load.result["device"] == "cpu" and isinstance(setv.result, str)
    update = click.result
    assert update.encoded_regions == 1 and update.mask_box.dtype == np.uint8
    assert np.array_equal(eng.mask("S")[update.box], update.mask_box)


def test_describe_update():
    from SAM3DSegmentLib.inference.worker import describe_update

    upd = type("U", (), {"timings": {"encode_s": 1.5, "decode_s": 0.02}, "encoded_regions": 1})()
    assert describe_update(upd, 1.6) == "Last click: 1600 ms (encode 1.50 s, decode 0.02 s, 1 new region(s))"


def test_engine_edit_reports_whether_anything_changed():
    assert Engine().edit("undo", "S") == (None, [], False)        # no model yet: nothing to do, no error
    eng = make_engine(BallBackend())
    c1 = ((12.0, 12.0, 12.0), True)
    eng.sync_clicks(None, "S", [c1])
    update, clicks, changed = eng.edit("undo", "S")
    assert changed and clicks == [] and not eng.mask("S").any() and update.mask_box.shape
    assert eng.edit("undo", "S")[2] is False                          # history exhausted
    update, clicks, changed = eng.edit("redo", "S")
    assert changed and [c[0] for c in clicks] == [c1[0]] and eng.mask("S").any()
    assert eng.edit("redo", "S") == (None, clicks, False)
    update, clicks, changed = eng.edit("reset", "S")
    assert changed and clicks == [] and not eng.mask("S").any()
    with pytest.raises(ValueError, match="unknown edit"):
        eng.edit("explode", "S")
