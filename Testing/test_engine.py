"""The engine in a child process (engine_process.ProcessEngine), cancel semantics and incremental click suffixes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from SAM3DSegmentLib.inference.engine_process import EngineCrashed, ProcessEngine
from SAM3DSegmentLib.inference.protocol import decode, encode
from SAM3DSegmentLib.core.geometry import Volume, make_ijk_to_ras
from SAM3DSegmentLib.inference.worker import CANCELLED, DONE, FAILED, PENDING, RUNNING, ThreadEngine

from test_worker import BallBackend, make_engine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def phantom():
    k, j, i = np.indices((24, 48, 48))
    arr = np.where((k - 12) ** 2 / 2 + (j - 24) ** 2 + (i - 22) ** 2 < 100, 300, -100).astype(np.int16)
    return Volume(arr, np.diag([0.9, 0.9, 2.0, 1.0]))


def ras(vol, ijk):
    return tuple(float(v) for v in vol.ijk_to_ras_points(np.asarray(ijk, float)))


class CountingBackend(BallBackend):
    def __init__(self):
        super().__init__()
        self.decodes = 0

    def decode(self, *args):
        self.decodes += 1
        return super().decode(*args)


# ------------------------------------------------------------------------------------------ payloads
def test_encode_decode_round_trip_uses_plain_payloads():
    from SAM3DSegmentLib.inference.session import MaskUpdate

    vol = phantom()
    upd = MaskUpdate("object_1", (slice(1, 3), slice(2, 5), slice(0, 4)), np.ones((2, 3, 4), np.uint8), 1,
                     {"decode_s": 0.1}, 2, True)
    msg = encode({"v": vol, "r": (upd, [((1.0, 2.0, 3.0), True)], False)})
    assert msg["v"]["__type__"] == "Volume" and msg["r"][0]["box"] == [[1, 3], [2, 5], [0, 4]]
    back = decode(msg)
    assert np.array_equal(back["v"].array, vol.array) and np.allclose(back["v"].ijk_to_ras, vol.ijk_to_ras)
    u2 = back["r"][0]
    assert u2.box == upd.box and np.array_equal(u2.mask_box, upd.mask_box) and u2.truncated and u2.regions == 2


# ------------------------------------------------------------------------------------------ child process
@pytest.fixture(scope="module")
def child():
    pytest.importorskip("torch")
    pe = ProcessEngine()
    pe.call("load", "demo", "cpu", timeout=120)
    yield pe
    pe.shutdown()


def test_child_round_trip_matches_in_process_engine(child):
    """set_volume / clicks (1, then 2 appended) / undo / redo / reset give the in-process engine's masks."""
    local = ThreadEngine()
    try:
        local.call("load", "demo", "cpu", timeout=120)
        vol = phantom()
        a, b, c = ((ras(vol, p), s) for p, s in (((22, 24, 12), True), ((26, 24, 12), True), ((30, 24, 12), False)))
        steps = [("set_volume", (vol, "t1")), ("sync_clicks", ("S", [a], "t1")), ("sync_clicks", ("S", [a, b, c], "t1")),
                 ("edit", ("undo", "S")), ("edit", ("redo", "S")), ("edit", ("reset", "S")), ("edit", ("undo", "S"))]
        for op, args in steps:
            r_child, r_local = child.call(op, *args, timeout=120), local.call(op, *args, timeout=120)
            assert np.array_equal(child.call("mask", "S"), local.call("mask", "S")), op
            assert child.call("clicks", "S") == local.call("clicks", "S"), op
            if op == "sync_clicks":
                assert r_child.box == r_local.box and np.array_equal(r_child.mask_box, r_local.mask_box)
        assert child.call("mask", "S").any() and len(child.call("clicks", "S")) == 3
        assert child.pid != os.getpid() and child.running
    finally:
        local.shutdown()


def test_child_errors_come_back_with_their_message(child):
    job = child.submit("sync_clicks", "S", [((0.0, 0.0, 0.0), True)], "another volume")
    while job.state not in (DONE, FAILED, CANCELLED):
        child.poll(0.05)
    assert job.state == FAILED and "another volume than the one clicked on" in str(job.error)
    with pytest.raises(ValueError, match="unknown engine operation"):
        child.submit("rm_rf")


def test_child_cancel_keeps_the_queued_volume(child):
    """The module's engine is the child process: Cancel there drops the clicks but never a queued volume, so
    the engine ends on volume B like the GUI (the ThreadEngine test above holds the same rule in-process)."""
    vol_a, vol_b = phantom(), phantom()
    vol_b = Volume(vol_b.array[:, :, ::-1].copy(), vol_b.ijk_to_ras)
    child.call("set_volume", vol_a, "A", timeout=120)
    click_a = child.submit("sync_clicks", "C", [(ras(vol_a, (22, 24, 12)), True)], "A", tag="clicks")
    setv = child.submit("set_volume", vol_b, "B", cancellable=False)
    click_b = child.submit("sync_clicks", "C", [(ras(vol_b, (25, 24, 12)), True)], "B", tag="clicks")
    child.cancel_all()
    t0 = time.time()
    while any(j.state in (PENDING, RUNNING) for j in (click_a, setv, click_b)) and time.time() - t0 < 60:
        child.poll(0.05)
    assert setv.state == DONE
    assert click_a.state in (DONE, CANCELLED) and click_b.state in (DONE, CANCELLED)
    # the engine is on B: a click for B is accepted, one for A is refused as another volume
    child.call("sync_clicks", "D", [(ras(vol_b, (25, 24, 12)), True)], "B", timeout=120)
    assert child.call("mask", "D").any()
    with pytest.raises(RuntimeError, match="another volume"):
        child.call("sync_clicks", "E", [(ras(vol_a, (22, 24, 12)), True)], "A", timeout=120)


def test_killed_child_gives_clear_error_then_restarts_with_nothing_lost():
    pytest.importorskip("torch")
    pe = ProcessEngine()
    try:
        pe.call("load", "demo", "cpu", timeout=120)
        vol = phantom()
        pe.call("set_volume", vol, "tok")
        clicks = [(ras(vol, (22, 24, 12)), True), (ras(vol, (27, 24, 12)), True)]
        pe.call("sync_clicks", "S", clicks, "tok")
        before_mask, before_clicks, old_pid = np.array(pe.call("mask", "S")), pe.call("clicks", "S"), pe.pid
        job = pe.submit("mask", "S")
        os.kill(old_pid, signal.SIGKILL)
        t0 = time.time()
        while job.state not in (DONE, FAILED) and time.time() - t0 < 10:
            pe.poll(0.05)
        assert job.state in (FAILED, DONE)
        if job.state == DONE:   # the reply beat the kill: the next request sees the dead child
            job = pe.submit("clicks", "S")
            while job.state not in (DONE, FAILED) and time.time() - t0 < 10:
                pe.poll(0.05)
        if job.state == FAILED:
            assert isinstance(job.error, EngineCrashed)
            assert "stopped unexpectedly (killed by SIGKILL)" in str(job.error) and "restarts it" in str(job.error)
        # the next action restarts the child and re-sends model, volume and clicks
        assert pe.call("clicks", "S", timeout=120) == before_clicks
        assert pe.pid != old_pid and pe.restarts == 1
        assert np.array_equal(pe.call("mask", "S"), before_mask)
    finally:
        pe.shutdown()


def test_child_exits_when_its_parent_dies(tmp_path):
    """No orphans: a parent killed without shutdown() takes its engine process with it."""
    code = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {ROOT!r})
        from SAM3DSegmentLib.inference.engine_process import ProcessEngine
        pe = ProcessEngine(); pe.start()
        print(pe.pid, flush=True)
        os.kill(os.getpid(), 9)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    pid = int(r.stdout.split()[0])
    t0 = time.time()
    while time.time() - t0 < 10:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the engine process outlived its parent")


def test_start_failure_names_the_python(tmp_path):
    pe = ProcessEngine(python=str(tmp_path / "no-such-python"))
    with pytest.raises(RuntimeError, match="SAM3DSEGMENT_PYTHON"):
        pe.submit("clicks", "S")


# ------------------------------------------------------------------------------------------ cancel (issue 9.4)
class HookBackend(CountingBackend):
    on_decode = None

    def decode(self, *args):
        if self.on_decode is not None:
            self.on_decode()
        return super().decode(*args)


def test_cancel_keeps_the_queued_volume():
    """Cancel while a click runs: the queued volume B still reaches the engine, so it agrees with the GUI."""
    backend = BallBackend()
    runner = ThreadEngine()
    runner.engine = make_engine(backend)
    gate, started = threading.Event(), threading.Event()
    backend.gate, backend.started = gate, started
    try:
        runner.submit("sync_clicks", "S", [((12.0, 12.0, 12.0), True)])
        assert started.wait(5)
        vol_b = Volume(np.zeros((20, 20, 20), np.float32), make_ijk_to_ras((1.0, 1.0, 1.0)))
        setv = runner.submit("set_volume", vol_b, "B", cancellable=False)
        click_b = runner.submit("sync_clicks", "S", [((5.0, 5.0, 5.0), True)], "B", tag="clicks")
        runner.cancel_all()
        gate.set()
        t0 = time.time()
        while runner.busy and time.time() - t0 < 10:
            runner.poll(0.05)
        assert setv.state == DONE and click_b.state == CANCELLED
        assert runner.engine.volume_token == "B" and runner.engine.session.volume is vol_b
    finally:
        runner.shutdown()


def test_clicks_for_another_volume_are_refused():
    eng = make_engine(BallBackend())
    eng.set_volume(eng.session.volume, token="A")
    with pytest.raises(RuntimeError, match="another volume"):
        eng.sync_clicks(None, "S", [((12.0, 12.0, 12.0), True)], volume_token="B")
    failing = Volume(np.full((8, 8, 8), np.nan, np.float32), make_ijk_to_ras((1.0, 1.0, 1.0)))
    with pytest.raises(Exception, match="NaN"):
        eng.set_volume(failing, token="C")
    with pytest.raises(RuntimeError, match="no volume"):   # never silently left on volume A
        eng.sync_clicks(None, "S", [((12.0, 12.0, 12.0), True)], volume_token="A")


def test_cancelled_click_keeps_the_redo_entry():
    from SAM3DSegmentLib.inference.worker import Cancelled, Job

    backend = HookBackend()
    eng = make_engine(backend)
    c1, c2, c3 = ((12.0, 12.0, 12.0), True), ((14.0, 12.0, 12.0), True), ((9.0, 12.0, 12.0), True)
    eng.sync_clicks(None, "S", [c1])
    eng.sync_clicks(None, "S", [c1, c2])
    eng.undo("S")                                        # redo now holds c2
    mask = eng.mask("S").copy()
    job = Job(None, (), {}, None, False)
    backend.on_decode = job.cancel                       # the user cancels while the decoder runs
    with pytest.raises(Cancelled):
        eng.sync_clicks(job, "S", [c1, c3])
    backend.on_decode = None
    assert [c[0] for c in eng.clicks("S")] == [c1[0]] and np.array_equal(eng.mask("S"), mask)
    eng.redo("S")
    assert [c[0] for c in eng.clicks("S")] == [c1[0], c2[0]]   # the real redo entry survived


def test_job_that_returned_is_done_even_if_cancel_came_late():
    """Its change is made: reporting it cancelled would leave the segment behind the engine."""
    from SAM3DSegmentLib.inference.worker import Worker

    worker = Worker()
    started, release = threading.Event(), threading.Event()

    def body(job):
        started.set()
        release.wait(5)
        return "changed"
    try:
        job = worker.submit(body, pass_job=True)
        assert started.wait(5)
        worker.cancel_all()
        release.set()
        assert job.wait(5)
        assert job.state == DONE and job.result == "changed"
    finally:
        worker.shutdown()


# ------------------------------------------------------------------------------------------ suffix (issue 9.5)
def test_appended_clicks_decode_only_the_new_ones_and_match_set_clicks():
    from SAM3DSegmentLib.inference.session import Click

    backend = CountingBackend()
    eng = make_engine(backend)
    base = [((12.0, 12.0, 12.0), True), ((13.0, 12.0, 12.0), False), ((10.0, 12.0, 12.0), True)]
    eng.sync_clicks(None, "S", base)
    for k, extra in enumerate(([((14.0, 11.0, 12.0), True), ((9.0, 13.0, 12.0), False)],
                               [((11.0, 14.0, 12.0), True), ((12.0, 9.0, 12.0), True), ((13.0, 13.0, 12.0), False)])):
        before = backend.decodes
        clicks = [c for c in eng.clicks("S")] + extra
        eng.sync_clicks(None, "S", clicks)
        assert backend.decodes - before == len(extra)          # only the new clicks are decoded
        ref = make_engine(CountingBackend())
        ref._object("S")
        ref.session.set_clicks([Click(ras=r, positive=p) for r, p in clicks])
        assert np.array_equal(eng.mask("S"), ref.mask("S"))
    eng.undo("S")                                              # one undo step per sync
    assert len(eng.clicks("S")) == len(base) + 2
