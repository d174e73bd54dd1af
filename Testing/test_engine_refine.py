"""The engine's ``set_initial_mask`` op (refine an existing segment): through the job API, and re-sent when the
engine's child process is restarted after a crash, so the object and its clicks come back as they were."""
from __future__ import annotations

import numpy as np
import pytest

from SAM3DSegmentLib.inference.engine_process import ProcessEngine
from SAM3DSegmentLib.inference.worker import Job, ThreadEngine

from test_engine import phantom
from test_worker import BallBackend, make_engine


def organ(shape):
    m = np.zeros(shape, np.uint8)
    m[6:18, 10:38, 8:40] = 1
    return m


def test_engine_op_takes_a_box_and_refuses_another_volume():
    eng = make_engine(BallBackend())
    vol = eng.session.volume
    init = np.zeros(vol.array.shape, np.uint8)
    init[4:12, 5:15, 6:18] = 1
    eng.volume_token = "tok"
    with pytest.raises(RuntimeError, match="another volume"):
        eng.set_initial_mask("S", init[4:12, 5:15, 6:18], [[4, 12], [5, 15], [6, 18]], "other")
    update = eng.set_initial_mask("S", init[4:12, 5:15, 6:18], [[4, 12], [5, 15], [6, 18]], "tok")
    assert np.array_equal(eng.mask("S"), init) and np.array_equal(update.mask_box, init[update.box])
    eng.sync_clicks(None, "S", [(tuple(vol.ijk_to_ras_points(np.array([10.0, 8.0, 8.0]))), False)])
    assert eng.mask("S")[8, 8, 10] == 0
    update, clicks, changed = eng.edit("reset", "S")
    assert changed and clicks == [] and np.array_equal(eng.mask("S"), init)


def test_thread_engine_accepts_the_op():
    te = ThreadEngine(backend=BallBackend())
    try:
        from SAM3DSegmentLib.inference.session import SessionOptions

        te.engine.session_options = SessionOptions(region_size=16, spacing_mm=1.0, extend=False)
        te.engine.set_backend(BallBackend())
        vol = phantom()
        te.call("set_volume", vol, "t")
        te.call("set_initial_mask", "S", organ(vol.array.shape), None, "t")
        assert np.array_equal(te.call("mask", "S"), organ(vol.array.shape))
    finally:
        te.shutdown()


def _replayed(history):
    """What a restarted child is sent after the engine ran ``history`` (``(op, args, result)``): the parent's
    bookkeeping (``ProcessEngine._remember``) and replay (``_restart``), with the process start and the
    connection replaced by a recorder."""
    pe = ProcessEngine()
    for op, args, result in history:
        job = Job(op, args, {}, None, False)
        job.result = result
        pe._remember(job)
    sent = []
    pe.start = lambda: None
    pe._send = lambda op, args, kwargs, *rest: sent.append((op, tuple(args)))
    pe._restart(replay=True)
    return sent


def test_a_restarted_child_gets_the_initial_mask_before_the_clicks():
    vol, crop, box = phantom(), np.ones((2, 3, 4), np.uint8), [[1, 3], [2, 5], [3, 7]]
    click = ((1.0, 2.0, 3.0), True)
    base = [("load", ("demo", "cpu"), "demo"), ("set_volume", (vol, "tok"), "key")]
    sent = _replayed(base + [("sync_clicks", ("S", [click], "tok"), None),
                             ("set_initial_mask", ("S", crop, box, "tok"), None),
                             ("sync_clicks", ("S", [click], "tok"), None),
                             ("set_initial_mask", ("T", crop, box, "tok"), None),
                             ("forget_object", ("T",), None)])
    assert [op for op, _ in sent] == ["load", "set_volume", "set_initial_mask", "sync_clicks"]
    assert sent[2][1][0] == "S" and sent[2][1][1] is crop and sent[2][1][2:] == (box, "tok")
    assert sent[3][1] == ("S", [click], "tok")
    # reset returns to the initial mask: it is re-sent, the clicks are gone
    sent = _replayed(base + [("set_initial_mask", ("S", crop, box, "tok"), None),
                             ("sync_clicks", ("S", [click], "tok"), None),
                             ("edit", ("reset", "S"), (None, [], True))])
    assert [op for op, _ in sent] == ["load", "set_volume", "set_initial_mask"]
    # a new volume forgets every initial mask
    sent = _replayed(base + [("set_initial_mask", ("S", crop, box, "tok"), None), ("set_volume", (vol, "t2"), "k")])
    assert [op for op, _ in sent] == ["load", "set_volume"] and sent[1][1] == (vol, "t2")
