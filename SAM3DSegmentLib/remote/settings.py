"""Qt-free pieces the Slicer module's Local/Remote panel calls: settings storage and the connection test.

``settings`` is any object with QSettings' ``value(name, default)``, ``setValue(name, value)`` and
``remove(name)`` — in Slicer, ``qt.QSettings()`` (the user's Slicer settings file, readable by that OS
user only as far as the file permissions allow). The key is kept there, never in the MRML scene, so it is
not saved with scenes or shared with data; ``$SAM3D_SERVER_KEY`` overrides it.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from .errors import RemoteError, user_message
from .options import KEY_ENV

PREFIX = "SAM3DSegment/Remote/"
_FIELDS = {"enabled": False, "servers": "", "mode": "auto", "timeout_s": 60.0, "ca_file": "", "wire_dtype": "float16"}


@dataclass
class RemoteSettings:
    enabled: bool = False          # False = run the model locally
    servers: str = ""              # comma-separated URLs
    mode: str = "auto"
    timeout_s: float = 60.0
    ca_file: str = ""
    wire_dtype: str = "float16"

    def server_list(self) -> List[str]:
        return [u.strip() for u in self.servers.split(",") if u.strip()]


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def load_settings(settings) -> RemoteSettings:
    """The saved remote settings (defaults where none or unreadable)."""
    out = RemoteSettings()
    for name, default in _FIELDS.items():
        raw = settings.value(PREFIX + name, default)
        try:
            value = _as_bool(raw) if isinstance(default, bool) else type(default)(raw)
        except (TypeError, ValueError):
            value = default
        setattr(out, name, value)
    return out


def save_settings(settings, remote: RemoteSettings) -> None:
    for name in _FIELDS:
        settings.setValue(PREFIX + name, getattr(remote, name))


def store_key(settings, key: Optional[str]) -> None:
    """Remember ``key`` in the settings (an empty key forgets it)."""
    key = (key or "").strip()
    if key:
        settings.setValue(PREFIX + "key", key)
    else:
        settings.remove(PREFIX + "key")


def load_key(settings, environ=os.environ) -> Optional[str]:
    """``$SAM3D_SERVER_KEY`` when set, else the stored key, else None."""
    env = environ.get(KEY_ENV, "").strip()
    if env:
        return env
    value = settings.value(PREFIX + "key", "")
    return str(value).strip() or None


def backend_from_settings(remote: RemoteSettings, key: Optional[str], model: Optional[str] = None):
    """The :class:`~SAM3DSegmentLib.remote.client.RemoteBackend` the saved settings describe (what the
    engine builds instead of a local model when Remote is chosen). Raises RemoteError / ValueError."""
    from .client import RemoteBackend

    servers = remote.server_list()
    if not servers:
        raise ValueError("no server URL is set: enter one (https://host:port) or choose Local")
    return RemoteBackend(servers, key=key, model=model, mode=remote.mode, wire_dtype=remote.wire_dtype,
                         timeout_s=remote.timeout_s, ca_file=remote.ca_file or None)


# ------------------------------------------------------------------------------------------ connection test
@dataclass
class ServerReport:
    url: str
    ok: bool
    message: str
    version: Optional[str] = None
    protocol: Optional[int] = None
    device: Optional[str] = None
    models: List[Dict[str, Any]] = field(default_factory=list)
    rtt_ms: Optional[float] = None

    def line(self) -> str:
        if not self.ok:
            return self.message if self.message.startswith(self.url) else f"{self.url}: {self.message}"
        names = ", ".join(m.get("name", "?") for m in self.models) or "no models"
        return (f"{self.url}: sam3dsegment {self.version} (protocol {self.protocol}), {names} on {self.device}, "
                f"round trip {self.rtt_ms:.1f} ms")


def check_connection(servers: Sequence[str], key: Optional[str] = None, timeout_s: float = 5.0,
                    ca_file: Optional[str] = None, pings: int = 3) -> List[ServerReport]:
    """Check every server separately: key accepted, protocol, version, models, device, round-trip time
    (median of ``pings`` health requests). Never raises for a server's failure: it is in the report."""
    from .protocol import PROTOCOL_VERSION
    from .transport import Transport

    reports = []
    for url in servers:
        try:
            transport = Transport([url], key, timeout_s=timeout_s, connect_timeout_s=timeout_s, ca_file=ca_file,
                                  busy_retries=0)
        except ValueError as err:
            reports.append(ServerReport(str(url), False, str(err)))
            continue
        try:
            caps = transport.request("GET", "/v1/capabilities").json()
            report = ServerReport(transport.servers[0], True, "ok", caps.get("version"), caps.get("protocol"),
                                  caps.get("device"), list(caps.get("models") or []))
            if caps.get("protocol") != PROTOCOL_VERSION:
                report.ok = False
                report.message = (f"speaks protocol {caps.get('protocol')} (sam3dsegment {caps.get('version')}), "
                                  f"this client {PROTOCOL_VERSION}; install matching versions")
            else:
                rtts = []
                for _ in range(max(1, int(pings))):
                    t = time.perf_counter()
                    transport.request("GET", "/v1/health")
                    rtts.append((time.perf_counter() - t) * 1000.0)
                report.rtt_ms = statistics.median(rtts)
            reports.append(report)
        except (RemoteError, ValueError) as err:
            reports.append(ServerReport(transport.servers[0], False, user_message(err)))
        finally:
            transport.close()
    return reports
