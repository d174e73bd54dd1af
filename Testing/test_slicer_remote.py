"""The Slicer module's Local / Remote choice, Qt-free: ``slicer/remote_link.RemotePanel`` on stand-in widgets (the
names checked against SAM3DSegment.ui) and a QSettings-like store, the engine's ``load_remote`` and
``check_servers`` ops against numpy stub servers on loopback (parity with a local run, fail-over when a server
dies, a slow server timing out without blocking the caller), the messages for each kind of server failure, the
engine child process (the key never on a command line, a remote load replayed after a crash, no torch loaded),
and the device for "auto" chosen in the engine process, never in Slicer's."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")

from SAM3DSegmentLib.core.geometry import Volume  # noqa: E402
from SAM3DSegmentLib.inference.protocol import EngineError  # noqa: E402
from SAM3DSegmentLib.inference.worker import DONE, FAILED, ThreadEngine  # noqa: E402
from SAM3DSegmentLib.remote.options import KEY_ENV  # noqa: E402
from SAM3DSegmentLib.remote.settings import RemoteSettings, load_key, load_settings, save_settings, store_key  # noqa: E402
from SAM3DSegmentLib.slicer.engine_link import EngineLink  # noqa: E402
from SAM3DSegmentLib.slicer.remote_link import FAILURES, LOCAL, REMOTE, RemotePanel, failure_text  # noqa: E402

from _remote_fixtures import KEY, StubBackend, free_port, serving, stub_model  # noqa: E402
from test_remote_settings import FakeQSettings  # noqa: E402
from _qt_standins import Widget  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
UI_FILE = ROOT / "SAM3DSegment" / "Resources" / "UI" / "SAM3DSegment.ui"


# ------------------------------------------------------------------------------------------ stand-in widgets
class Combo(Widget):
    """A non-editable QComboBox: setting ``currentText`` to a text that is not an item changes nothing."""

    def __init__(self, items, **props):
        super().__init__(items=list(items), enabled=True, **props)
        self._current = self.items[0]

    @property
    def currentText(self):  # noqa: N802 - Qt property
        return self._current

    @currentText.setter
    def currentText(self, text):  # noqa: N802
        if text in self.items and text != self._current:
            self._current = text
            self.emit("currentTextChanged(QString)", text)

    def findText(self, text):  # noqa: N802
        return self.items.index(text) if text in self.items else -1

    def addItem(self, text):  # noqa: N802
        self.items.append(text)


def make_ui():
    return Widget(
        runOnComboBox=Combo([LOCAL, REMOTE]), remoteGroupBox=Widget(visible=False),
        serverUrlsLineEdit=Widget(text="", placeholderText=""), serverKeyLineEdit=Widget(text="", placeholderText=""),
        remoteModeComboBox=Combo(["auto", "split", "full"]), remoteTimeoutSpinBox=Widget(value=60.0),
        serverCaPathLineEdit=Widget(currentPath=""), exactWireCheckBox=Widget(checked=False),
        testConnectionButton=Widget(), remoteStatusLabel=Widget(text=""),
        modelComboBox=Combo(["sam-med3d-turbo", "demo"]), deviceComboBox=Combo(["auto", "cuda", "mps", "cpu"]))


def ui_widget_names():
    return {w.get("name") for w in ET.parse(UI_FILE).iter("widget")}


def test_the_panel_and_its_stand_ins_use_widgets_of_the_ui_file():
    source = (ROOT / "SAM3DSegmentLib" / "slicer" / "remote_link.py").read_text(encoding="utf-8")
    used = set(re.findall(r"\bui\.(\w+)", source))
    assert used and used <= ui_widget_names(), used - ui_widget_names()
    stand_ins = {k for k, v in vars(make_ui()).items() if isinstance(v, Widget)}
    assert stand_ins == used   # the stand-ins are exactly the widgets the panel touches
    tree = ET.parse(UI_FILE)
    key_field = next(w for w in tree.iter("widget") if w.get("name") == "serverKeyLineEdit")
    assert key_field.find("property[@name='echoMode']/enum").text == "QLineEdit::Password"


# ------------------------------------------------------------------------------------------ settings
def test_settings_are_shown_saved_and_the_key_kept_apart_from_the_scene():
    qs = FakeQSettings()
    save_settings(qs, RemoteSettings(enabled=True, servers="https://a:8765,https://b:8765", mode="full",
                                     timeout_s=7.0, wire_dtype="float32"))
    store_key(qs, KEY)
    ui = make_ui()
    panel = RemotePanel(ui, qs, link=None, environ={})
    assert panel.remote and ui.remoteGroupBox.visible and not ui.deviceComboBox.enabled
    assert ui.serverUrlsLineEdit.text == "https://a:8765,https://b:8765" and ui.serverKeyLineEdit.text == KEY
    assert ui.remoteModeComboBox.currentText == "full" and ui.remoteTimeoutSpinBox.value == 7.0
    assert ui.exactWireCheckBox.checked and ui.serverKeyLineEdit.placeholderText == ""
    ui.runOnComboBox.currentText = LOCAL                       # the user chooses Local: saved at once
    assert not ui.remoteGroupBox.visible and ui.deviceComboBox.enabled and not load_settings(qs).enabled
    ui.serverKeyLineEdit.text = ""                            # an emptied key field forgets the key
    panel.save()
    assert load_key(qs, environ={}) is None
    assert [n for n in qs.data if "key" in n.lower()] == []
    # the environment's key wins, and the field says so
    ui2 = make_ui()
    panel2 = RemotePanel(ui2, qs, link=None, environ={KEY_ENV: "env-key-0123456789abc"})
    assert KEY_ENV in ui2.serverKeyLineEdit.placeholderText and panel2.key() == "env-key-0123456789abc"


def test_remote_load_refuses_what_cannot_work():
    ui = make_ui()
    panel = RemotePanel(ui, FakeQSettings(), link=None, environ={})
    ui.runOnComboBox.currentText = REMOTE
    with pytest.raises(ValueError, match="no server URL"):
        panel.load("demo", "", "auto")
    ui.serverUrlsLineEdit.text = " , "
    assert panel.test_connection() is None                     # no URL: said in the panel, nothing queued
    assert "no server URL" in ui.remoteStatusLabel.text
    ui.serverUrlsLineEdit.text = "https://a:8765"
    with pytest.raises(ValueError, match="checkpoint file is for Local"):
        panel.load("demo", "/models/mine.pth", "auto")


# ------------------------------------------------------------------------------------------ engine, stub servers
def phantom():
    k, j, i = np.indices((24, 48, 48))
    arr = np.where((k - 12) ** 2 / 2 + (j - 24) ** 2 + (i - 22) ** 2 < 100, 300, -100).astype(np.int16)
    return Volume(arr, np.diag([0.9, 0.9, 2.0, 1.0]))


def clicks(vol):
    pts = [((22, 24, 12), True), ((26, 24, 12), True), ((30, 24, 12), False)]
    return [(tuple(float(v) for v in vol.ijk_to_ras_points(np.asarray(p, float))), s) for p, s in pts]


def finish(link, job, timeout=30.0):
    """Pump the link (as the module's timer does) until ``job`` has finished."""
    t0 = time.monotonic()
    while job.state not in (DONE, FAILED, "cancelled") and time.monotonic() - t0 < timeout:
        link.poll(0.02)
    assert job.state in (DONE, FAILED), job.state
    return job


def remote_panel(link, servers, started=lambda: None, timeout_s=5.0):
    """A panel built from empty settings (as on a first start), then filled in by the user: Remote, the URLs,
    the key, full mode, exact transfer."""
    ui = make_ui()
    panel = RemotePanel(ui, FakeQSettings(), link, started=started, environ={})
    ui.runOnComboBox.currentText = REMOTE
    ui.serverUrlsLineEdit.text = servers
    ui.serverKeyLineEdit.text = KEY
    ui.remoteModeComboBox.currentText = "full"
    ui.remoteTimeoutSpinBox.value = timeout_s
    ui.exactWireCheckBox.checked = True
    return ui, panel


def local_masks(vol):
    """The masks a local engine gives on the same clicks (the stub model in this process)."""
    ref = ThreadEngine(backend=StubBackend())
    try:
        ref.call("set_volume", vol, "t")
        out = []
        for n in (1, 3):
            ref.call("sync_clicks", "S", clicks(vol)[:n], "t")
            out.append(np.array(ref.call("mask", "S")))
        return out
    finally:
        ref.shutdown()


def test_remote_load_matches_local_and_survives_a_dead_server():
    """Remote chosen in the panel: the engine builds a RemoteBackend (full mode: numpy only) over a list whose
    first URL is dead; the server that encoded the region is stopped mid-session; the session finishes on the
    other one with the masks of a local run."""
    vol = phantom()
    expected = local_masks(vol)
    a_backend, b_backend = StubBackend(), StubBackend()
    dead = f"http://127.0.0.1:{free_port()}"
    engine = ThreadEngine()
    link = EngineLink(engine)
    with serving(stub_model(a_backend), keys=[KEY]) as a, serving(stub_model(b_backend), keys=[KEY]) as b:
        ui, panel = remote_panel(link, f"{dead}, {a.url}, {b.url}")
        job = finish(link, panel.load("stub", "", "auto"))
        assert job.state == DONE, job.error
        assert link.model_name == job.result["name"] and "full mode" in job.result["name"]
        assert job.result["warning"] is None and job.result["device"] == "cpu"
        engine.call("set_volume", vol, "t")
        engine.call("sync_clicks", "S", clicks(vol)[:1], "t")
        np.testing.assert_array_equal(engine.call("mask", "S"), expected[0])
        holder, survivor = (a, b) if a_backend.encodes else (b, a)
        assert (a_backend.encodes, b_backend.encodes) in ((1, 0), (0, 1))
        holder.stop()                                                   # the server holding the embedding dies
        engine.call("sync_clicks", "S", clicks(vol), "t")               # two more clicks: on the survivor
        np.testing.assert_array_equal(engine.call("mask", "S"), expected[1])
        assert (b_backend if survivor is b else a_backend).decodes >= 2
        ui.runOnComboBox.currentText = LOCAL          # the next click loads the model where the choice says
        assert link.model_name is None and not load_settings(panel.settings).enabled
    engine.shutdown()


def test_connection_test_runs_in_the_engine_and_offers_the_servers_models():
    dead = f"http://127.0.0.1:{free_port()}"
    engine = ThreadEngine()
    link = EngineLink(engine)
    try:
        with serving(stub_model(), keys=[KEY], device="cuda:0 (test GPU)") as srv:
            started = []
            ui, panel = remote_panel(link, f"{srv.url},{dead}", started=lambda: started.append(1))
            ui.testConnectionButton.emit("clicked()")           # the module's button: queued, not run here
            assert started and ui.remoteStatusLabel.text == "Testing 2 server(s)..."
            jobs = []
            t0 = time.monotonic()
            while not jobs and time.monotonic() - t0 < 30:
                jobs = link.poll(0.05)                          # the module's pump
            (job,) = jobs
            assert job.state == DONE and job.context["kind"] == "servers"
            panel.show_reports(job.result)
            good, down = ui.remoteStatusLabel.text.splitlines()[:2]
            assert good.startswith(srv.url) and "stub on cuda:0 (test GPU)" in good and "round trip" in good
            assert "sam3dsegment" in good and "protocol 1" in good
            assert down.startswith(dead) and "could be reached" in down
            assert ui.modelComboBox.findText("stub") >= 0 and ui.modelComboBox.currentText == "stub"
            assert "model set to stub" in ui.remoteStatusLabel.text
            ui.serverKeyLineEdit.text = "wrong-key-0123456789abc"
            job = finish(link, panel.test_connection())
            panel.show_reports(job.result)
            assert "refused the key" in ui.remoteStatusLabel.text and "No server is usable" in ui.remoteStatusLabel.text
            assert "wrong-key" not in ui.remoteStatusLabel.text
    finally:
        engine.shutdown()


def test_failure_messages_name_what_happened():
    class FakeJob:
        def __init__(self, error):
            self.error = error

    for type_name, meaning in FAILURES.items():
        text = failure_text(FakeJob(EngineError("http://gpu:8765 said\n  why; the fix", type_name)))
        assert text == f"Remote inference: {meaning}: http://gpu:8765 said why; the fix"
    assert failure_text(FakeJob(EngineError("no volume", "RuntimeError"))) == "Failed: no volume"
    assert failure_text(FakeJob(ValueError("bad"))) == "Failed: bad"
    # the real thing, in this process: a refused key
    engine = ThreadEngine()
    link = EngineLink(engine)
    try:
        with serving(stub_model(), keys=[KEY]) as srv:
            ui, panel = remote_panel(link, srv.url)
            ui.serverKeyLineEdit.text = "not-the-key-0123456789"
            job = finish(link, panel.load("stub", "", "auto"))
        assert job.state == FAILED and link.model_name is None
        text = failure_text(job)
        assert text.startswith("Remote inference: the server refused the key: ") and "not-the-key" not in text
    finally:
        engine.shutdown()


def test_a_slow_server_times_out_within_the_limit_and_never_blocks_the_caller():
    vol = phantom()
    engine = ThreadEngine()
    link = EngineLink(engine)
    try:
        with serving(stub_model(StubBackend(delay_s=2.5)), keys=[KEY]) as srv:
            ui, panel = remote_panel(link, srv.url, timeout_s=1.0)
            assert finish(link, panel.load("stub", "", "auto")).state == DONE
            engine.call("set_volume", vol, "t")
            t0 = time.monotonic()
            job = engine.submit("sync_clicks", "S", clicks(vol)[:1], "t")
            polls = []
            while job.state not in (DONE, FAILED):
                t = time.monotonic()
                link.poll(0.0)                                  # the module's timer: returns at once
                polls.append(time.monotonic() - t)
                time.sleep(0.02)
            elapsed = time.monotonic() - t0
        assert job.state == FAILED and 0.9 < elapsed < 2.4, elapsed
        assert failure_text(job).startswith("Remote inference: the server did not answer in time: ")
        assert max(polls) < 0.1
    finally:
        engine.shutdown()


# ------------------------------------------------------------------------------------------ engine child process
def _proc_text(pid, name):
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes().decode("utf-8", "replace")
    except OSError:
        return None


def test_child_process_gets_the_key_privately_replays_the_remote_load_and_never_loads_torch():
    from SAM3DSegmentLib.inference.engine_process import EngineCrashed, ProcessEngine

    vol = phantom()
    expected = local_masks(vol)
    with serving(stub_model(), keys=[KEY]) as srv:
        settings = vars(RemoteSettings(enabled=True, servers=srv.url, mode="full", timeout_s=10, wire_dtype="float32"))
        pe = ProcessEngine()
        try:
            result = pe.call("load_remote", settings, KEY, "stub", timeout=120)
            assert "stub" in result["name"] and "full mode" in result["name"]
            pe.call("set_volume", vol, "t")
            pe.call("sync_clicks", "S", clicks(vol), "t")
            np.testing.assert_array_equal(pe.call("mask", "S"), expected[1])
            first = pe.pid
            cmdline = _proc_text(first, "cmdline")
            if cmdline is not None:
                assert KEY not in cmdline and KEY not in (_proc_text(first, "environ") or "")
                assert "libtorch" not in _proc_text(first, "maps")   # remote inference needs no torch
            os.kill(first, signal.SIGKILL)
            job = pe.submit("mask", "S")
            while job.state not in (DONE, FAILED):
                pe.poll(0.05)
            assert job.state == FAILED and isinstance(job.error, EngineCrashed)
            # the next request restarts the child, which loads the remote backend again, the volume and clicks
            np.testing.assert_array_equal(pe.call("mask", "S", timeout=120), expected[1])
            assert pe.pid != first and pe.restarts == 1
        finally:
            pe.shutdown()


AUTO_DEVICE = textwrap.dedent('''
    import json, sys, time
    sys.modules["torch"] = None                  # Slicer's process: "import torch" would fail here
    from SAM3DSegmentLib.slicer.engine_link import EngineLink
    link = EngineLink()                          # the engine in a child process (which has torch)
    job = link.load_model("demo", "auto")
    jobs = []
    link.wait_idle(lambda: jobs.extend(link.poll(0.05)), timeout=300)
    link.shutdown()
    print(json.dumps({"state": job.state, "error": str(job.error), "result": job.result,
                      "model_name": link.model_name, "torch": sys.modules.get("torch") is not None}))
''')


def test_auto_device_is_chosen_in_the_engine_process_never_in_slicers():
    torch = pytest.importorskip("torch")
    from SAM3DSegmentLib.models.device import CPU_WARNING, default_device

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", AUTO_DEVICE], capture_output=True, text=True, timeout=300, env=env,
                       cwd=str(ROOT))
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["state"] == "done", out["error"]
    assert out["torch"] is False                            # this process never imported torch
    device = default_device()
    assert torch.device(out["result"]["device"]).type == device
    assert out["result"]["warning"] == (CPU_WARNING if device == "cpu" else None)
    assert out["model_name"] == out["result"]["name"] and "demo" in out["model_name"]
