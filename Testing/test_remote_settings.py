"""Qt-free pieces of the Slicer module's Remote panel: settings and key storage on a QSettings-like
object, the connection test (version, models, device, round-trip time) and its failure messages."""
from __future__ import annotations

import pytest

from SAM3DSegmentLib.remote.errors import AuthError, ServerBusy, user_message
from SAM3DSegmentLib.remote.settings import (PREFIX, RemoteSettings, check_connection, load_key, load_settings,
                                             save_settings, store_key)

from _remote_fixtures import KEY, free_port, serving, stub_model


class FakeQSettings:
    """The three QSettings calls the helpers use, on a dict; like QSettings (INI backend) it hands values
    back as strings."""

    def __init__(self):
        self.data = {}

    def value(self, name, default=None):
        return self.data.get(name, default)

    def setValue(self, name, value):  # noqa: N802 - Qt API
        self.data[name] = str(value).lower() if isinstance(value, bool) else str(value)

    def remove(self, name):
        self.data.pop(name, None)


def test_settings_round_trip_through_string_values():
    qs = FakeQSettings()
    assert load_settings(qs) == RemoteSettings()
    saved = RemoteSettings(enabled=True, servers="https://a:8765, https://b:8765", mode="split", timeout_s=12.5,
                           ca_file="/etc/ca.pem", wire_dtype="float32")
    save_settings(qs, saved)
    assert all(isinstance(v, str) for v in qs.data.values())
    got = load_settings(qs)
    assert got == saved and got.server_list() == ["https://a:8765", "https://b:8765"]
    qs.setValue(PREFIX + "timeout_s", "not a number")
    assert load_settings(qs).timeout_s == 60.0
    assert not any("key" in name for name in qs.data)     # the key is stored separately


def test_key_storage_and_environment_override():
    qs = FakeQSettings()
    assert load_key(qs, environ={}) is None
    store_key(qs, "  stored-key-0123456789  ")
    assert load_key(qs, environ={}) == "stored-key-0123456789"
    assert load_key(qs, environ={"SAM3D_SERVER_KEY": "env-key-0123456789"}) == "env-key-0123456789"
    store_key(qs, "")
    assert load_key(qs, environ={}) is None and not qs.data


def test_connection_test_reports_version_models_device_and_round_trip():
    from SAM3DSegmentLib import __version__

    dead = f"http://127.0.0.1:{free_port()}"
    with serving(stub_model(), keys=[KEY], device="cpu (test)") as srv:
        good, down, bad_url = check_connection([srv.url, dead, "not a url"], key=KEY, timeout_s=2)
        (wrong_key,) = check_connection([srv.url], key="wrong-key-0123456789")
    assert good.ok and good.version == __version__ and good.protocol == 1 and good.device == "cpu (test)"
    assert [m["name"] for m in good.models] == ["stub"] and 0 < good.rtt_ms < 1000
    assert "stub on cpu (test)" in good.line() and "round trip" in good.line()
    assert not wrong_key.ok and "refused the key" in wrong_key.line()
    assert not down.ok and "could be reached" in down.message
    assert not bad_url.ok and "must look like" in bad_url.message


def test_backend_from_settings():
    from SAM3DSegmentLib.remote.settings import backend_from_settings

    with pytest.raises(ValueError, match="no server URL"):
        backend_from_settings(RemoteSettings(enabled=True), KEY)
    with serving(stub_model(), keys=[KEY]) as srv:
        qs = FakeQSettings()
        save_settings(qs, RemoteSettings(enabled=True, servers=f" {srv.url} ,", mode="full", timeout_s=7.0,
                                         wire_dtype="float32"))
        store_key(qs, KEY)
        rb = backend_from_settings(load_settings(qs), load_key(qs, environ={}))
        assert rb.mode == "full" and rb.wire_dtype == "float32" and rb.transport.timeout_s == 7.0
        assert rb.transport.servers == [srv.url] and rb.image_size == 32
        rb.close()
        with pytest.raises(AuthError):
            backend_from_settings(load_settings(qs), None)


def test_user_messages_are_one_line():
    assert user_message(AuthError("a\n  b", "http://x")) == "a b"
    assert user_message(ServerBusy("busy")) == "busy"
    assert user_message(KeyError("k")).startswith("unexpected KeyError")


@pytest.mark.parametrize("servers", [["http://127.0.0.1:1/"], ["https://[::1]:8443/sam3d"]])
def test_urls_are_normalised(servers):
    from SAM3DSegmentLib.remote.transport import Transport

    t = Transport(servers)
    assert not t.servers[0].endswith("/")
    with pytest.raises(ValueError, match="must not carry"):
        Transport(["https://user:pw@host:1"])
