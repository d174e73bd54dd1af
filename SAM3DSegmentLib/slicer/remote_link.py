"""The module's Local / Remote choice: the remote settings on screen and in Slicer's settings, the connection
test, the remote model load and the messages for what can go wrong with a server (docs/remote.md).

The settings live in Slicer's application settings (``qt.QSettings()``; the Qt-free storage helpers are
:mod:`SAM3DSegmentLib.remote.settings`), never in the MRML scene: a saved scene never carries a server key.
``$SAM3D_SERVER_KEY``, when set, overrides the stored key. The model itself runs wherever the engine process
(:mod:`SAM3DSegmentLib.inference.engine_process`) is told: :meth:`RemotePanel.load` queues either a local load or
``load_remote`` (a :class:`~SAM3DSegmentLib.remote.client.RemoteBackend`, which fails over between the listed
URLs when a server dies), and the connection test runs in that process too, so a slow or dead server never
freezes Slicer (each request gives up after the configured time limit).

:class:`RemotePanel` talks to the widgets only through the Qt properties PythonQt exposes as attributes
(``text``, ``currentText``, ``value``, ``checked``, ``currentPath``, ``visible``, ``enabled``,
``placeholderText``) and ``connect``/``findText``/``addItem``, so tests drive it with plain objects; it does not
import Qt.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, List, Optional

from ..remote.options import KEY_ENV
from ..remote.settings import RemoteSettings, load_key, load_settings, save_settings, store_key

LOCAL, REMOTE = "Local", "Remote"
#: What a failed job's error class (its name, as the engine process reports it) means, for the status line.
FAILURES = {
    "AuthError": "the server refused the key",
    "VersionMismatch": "version mismatch between this module and the server",
    "ServerBusy": "the server is full (busy)",
    "RemoteTimeout": "the server did not answer in time",
    "ProxyError": "a proxy or load balancer answered instead of the server",
    "ServerUnavailable": "no server could be reached",
    "BadRequest": "the server refused the request",
    "RemoteError": "the remote server failed",
}


def failure_text(job) -> str:
    """One status line for a failed job: ``Remote inference: <what happened>: <message naming the fix>`` for a
    server's failure, else ``Failed: <message>``."""
    error = job.error
    kind = FAILURES.get(getattr(error, "type_name", None) or type(error).__name__)
    message = " ".join(str(error).split())
    return f"Remote inference: {kind}: {message}" if kind else f"Failed: {message}"


class RemotePanel:
    """The Local / Remote widgets of the module (``ui`` as ``slicer.util.childWidgetVariables`` gives them), the
    settings store (``qt.QSettings()`` in Slicer), the :class:`~.engine_link.EngineLink` and a callback that
    starts the module's pump after a job is queued. Connects its own widgets' signals."""

    def __init__(self, ui, settings, link, started: Callable[[], None] = lambda: None, environ=os.environ):
        self.ui, self.settings, self.link, self.started, self.environ = ui, settings, link, started, environ
        self.show_saved()
        ui.runOnComboBox.connect("currentTextChanged(QString)", self.on_run_on_changed)
        ui.testConnectionButton.connect("clicked()", self.test_connection)

    # ------------------------------------------------------------------ settings <-> widgets
    @property
    def remote(self) -> bool:
        return self.ui.runOnComboBox.currentText == REMOTE

    def show_saved(self) -> None:
        """Fill the widgets from the saved settings (the stored key included, not the environment's)."""
        ui, saved = self.ui, load_settings(self.settings)
        ui.runOnComboBox.currentText = REMOTE if saved.enabled else LOCAL
        ui.serverUrlsLineEdit.text = saved.servers
        ui.serverKeyLineEdit.text = load_key(self.settings, environ={}) or ""
        if self.environ.get(KEY_ENV, "").strip():
            ui.serverKeyLineEdit.placeholderText = f"${KEY_ENV} is set and used"
        ui.remoteModeComboBox.currentText = saved.mode
        ui.remoteTimeoutSpinBox.value = saved.timeout_s
        ui.serverCaPathLineEdit.currentPath = saved.ca_file
        ui.exactWireCheckBox.checked = saved.wire_dtype == "float32"
        self.update_visibility()

    def read(self) -> RemoteSettings:
        ui = self.ui
        return RemoteSettings(enabled=self.remote, servers=ui.serverUrlsLineEdit.text.strip(),
                              mode=ui.remoteModeComboBox.currentText, timeout_s=float(ui.remoteTimeoutSpinBox.value),
                              ca_file=ui.serverCaPathLineEdit.currentPath.strip(),
                              wire_dtype="float32" if ui.exactWireCheckBox.checked else "float16")

    def save(self) -> RemoteSettings:
        """Store what the widgets show (and the key typed in its field; an empty field forgets it)."""
        remote = self.read()
        save_settings(self.settings, remote)
        store_key(self.settings, self.ui.serverKeyLineEdit.text)
        return remote

    def key(self) -> Optional[str]:
        """``$SAM3D_SERVER_KEY`` when set, else the stored key (call after :meth:`save`)."""
        return load_key(self.settings, self.environ)

    def update_visibility(self) -> None:
        self.ui.remoteGroupBox.visible = self.remote
        self.ui.deviceComboBox.enabled = not self.remote   # a remote server's device is the operator's choice

    def on_run_on_changed(self, _text=None) -> None:
        """Local <-> Remote: saved at once, and the loaded model is forgotten, so the next click (or Load model)
        loads it where the choice now says; the segment's clicks are replayed there, nothing is lost."""
        self.update_visibility()
        self.save()
        if self.link is not None:
            self.link.model_name = None

    # ------------------------------------------------------------------ actions
    def _servers(self, remote: RemoteSettings) -> List[str]:
        servers = remote.server_list()
        if not servers:
            raise ValueError("no server URL: enter one or more (comma-separated), e.g. https://gpu-box:8765, "
                             "or choose Local")
        return servers

    def load(self, model: str, checkpoint_path: str, device: str):
        """Queue the model load the panel describes: local (``checkpoint_path`` or the registered ``model`` on
        ``device``) or, with Remote chosen, ``model`` on the servers. Raises ValueError for what cannot work."""
        if not self.remote:
            return self.link.load_model(checkpoint_path or model, device)
        if checkpoint_path:
            raise ValueError("a checkpoint file is for Local: the servers load only the models their operator "
                             "chose; clear 'Checkpoint file', or choose Local")
        remote = self.save()
        self._servers(remote)
        return self.link.load_remote(dataclasses.asdict(remote), self.key(), model or None)

    def test_connection(self):
        """Queue the connection test (version, models, device, round-trip time of each server) and return its
        job (None when nothing could be queued: the reason is shown); the result comes back through the
        module's pump to :meth:`show_reports`."""
        try:
            remote = self.save()
            servers = self._servers(remote)
            job = self.link.check_servers(servers, self.key(), remote.timeout_s, remote.ca_file or None)
        except (ValueError, RuntimeError) as err:  # no URL; the engine process cannot start
            self.ui.remoteStatusLabel.text = " ".join(str(err).split())
            return None
        self.ui.remoteStatusLabel.text = f"Testing {len(servers)} server(s)..."
        self.started()
        return job

    def show_reports(self, reports) -> None:
        """Show each server's line; offer the models of the servers that answered in the model list, and pick
        the first of them when the chosen model is not among them (said in the status)."""
        lines = [r["line"] for r in reports]
        offered = [m.get("name") for r in reports if r.get("ok") for m in r.get("models") or [] if m.get("name")]
        combo = self.ui.modelComboBox
        for name in dict.fromkeys(offered):
            if combo.findText(name) < 0:
                combo.addItem(name)
        if offered and combo.currentText not in offered:
            lines.append(f"The servers do not offer {combo.currentText}: model set to {offered[0]}.")
            combo.currentText = offered[0]
        if not any(r.get("ok") for r in reports):
            lines.append("No server is usable; see the reasons above.")
        self.ui.remoteStatusLabel.text = "\n".join(lines)
