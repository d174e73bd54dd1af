"""Remote inference, torch-free parts: the wire format, its refusals, the server's bounds, the import rules."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

from SAM3DSegmentLib.remote import protocol as P
from SAM3DSegmentLib.remote.limits import Busy, ByteLRU, EncodeGate, RateLimiter


def _message(header: dict, payload: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<4sB3xI", P.MAGIC, P.FORMAT_VERSION, len(h)) + h + payload


@pytest.mark.parametrize("codec", P.available_codecs())
def test_pack_unpack_round_trip_every_codec_and_dtype(codec):
    rng = np.random.default_rng(0)
    arrays = {"f16": rng.normal(size=(4, 5, 6)).astype(np.float16), "f32": rng.normal(size=(3, 3)).astype(np.float32),
              "i32": np.arange(7, dtype=np.int32), "i64": np.array([1, 0, 1], dtype=np.int64),
              "u8": np.arange(9, dtype=np.uint8).reshape(3, 3), "empty": np.zeros((0, 3), np.float32)}
    meta = {"model": "demo", "n": 3, "nested": {"a": [1, 2]}}
    data = P.pack(meta, arrays, codec=codec)
    got_meta, got = P.unpack(data)
    assert got_meta == meta
    assert set(got) == set(arrays)
    for name, a in arrays.items():
        assert got[name].dtype == a.dtype and got[name].shape == a.shape
        np.testing.assert_array_equal(got[name], a)
        assert got[name].flags.writeable


def test_shuffle_makes_smooth_float_data_smaller():
    x = np.linspace(-3, 3, 128 ** 3, dtype=np.float32).reshape(128, 128, 128)
    plain = len(P.pack({}, {"x": x}, codec="zlib", shuffle=False))
    shuffled = len(P.pack({}, {"x": x}, codec="zlib", shuffle=True))
    assert shuffled < 0.8 * plain


def test_content_key_depends_on_bytes_dtype_and_shape():
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    assert P.content_key(a) == P.content_key(a.copy())
    assert P.content_key(a) != P.content_key(a.reshape(4, 3, 2))
    assert P.content_key(a) != P.content_key(a.astype(np.float16))
    b = a.copy()
    b[1, 2, 3] += 1
    assert P.content_key(a) != P.content_key(b)
    assert len(P.content_key(a)) == 64
    with pytest.raises(P.ProtocolError, match="cannot be sent"):
        P.content_key(a.astype(np.float64))


def _raises(data: bytes, match: str, status: int = 400, **kw):
    with pytest.raises(P.ProtocolError, match=match) as info:
        P.unpack(data, **kw)
    assert info.value.status == status
    return info.value


def test_unpack_refuses_malformed_messages_with_reasons():
    good = P.pack({"a": 1}, {"x": np.zeros((2, 2), np.float32)}, codec="zlib")
    _raises(b"", "too short")
    _raises(b"GIF89a" + good[6:], "bad magic", 415)
    _raises(good[:-3], "does not match")
    _raises(good + b"x", "does not match")
    _raises(struct.pack("<4sB3xI", P.MAGIC, 9, 2) + b"{}", "format version 9")
    _raises(struct.pack("<4sB3xI", P.MAGIC, 1, 10 ** 6) + b"{}", "header length")
    _raises(struct.pack("<4sB3xI", P.MAGIC, 1, 4) + b"\xff\xfe{}", "UTF-8 JSON")
    _raises(_message([1, 2]), "must be")
    _raises(_message({"arrays": [{"name": "x", "dtype": "object", "shape": [1], "nbytes": 8}]}), "not allowed")
    _raises(_message({"arrays": [{"name": "x", "dtype": "float32", "shape": [-1], "nbytes": 0}]}), "non-negative")
    _raises(_message({"arrays": [{"name": "x", "dtype": "float32", "shape": [2.5], "nbytes": 0}]}), "non-negative")
    _raises(_message({"arrays": [{"name": "x", "dtype": "float32", "shape": [1] * 6, "nbytes": 4}]}), "at most")
    _raises(_message({"arrays": [{"name": "x", "dtype": "float32", "shape": [1], "codec": "lzma", "nbytes": 4}]},
                     b"\0" * 4), "unknown codec", 415)
    _raises(_message({"arrays": [{"name": "x", "dtype": "float32", "shape": [1], "nbytes": 4}] * 2}, b"\0" * 8),
            "duplicate")
    _raises(_message({"arrays": [{"name": f"x{i}", "dtype": "uint8", "shape": [0], "nbytes": 0} for i in range(9)]}),
            "too many arrays")
    _raises(_message({"arrays": [{"name": "x", "dtype": "float32", "shape": [2], "nbytes": 4}]}, b"\0" * 4),
            "needs 8")
    _raises(_message({"arrays": [{"name": "x", "dtype": "float32", "shape": [1], "codec": "zlib", "nbytes": 5}]},
                     b"notzl"), "corrupt zlib")


def test_unpack_bounds_sizes_before_allocating_or_decompressing():
    # A shape far over the limit is refused from the header alone (413), whatever the payload.
    _raises(_message({"arrays": [{"name": "x", "dtype": "float32", "shape": [1 << 20, 1 << 20], "nbytes": 0}]}),
            "larger than this server's limit", 413, max_array_bytes=1 << 20)
    # A decompression bomb: 64 MiB of zeros in a small zlib payload that claims 16 bytes.
    bomb = zlib.compress(b"\0" * (64 << 20), 9)
    assert len(bomb) < 100_000
    _raises(_message({"arrays": [{"name": "x", "dtype": "float32", "shape": [4], "codec": "zlib",
                                  "nbytes": len(bomb)}]}, bomb), "longer than its declared shape")
    if "zstd" in P.available_codecs():
        import zstandard

        zbomb = zstandard.ZstdCompressor().compress(b"\0" * (64 << 20))
        _raises(_message({"arrays": [{"name": "x", "dtype": "float32", "shape": [4], "codec": "zstd",
                                      "nbytes": len(zbomb)}]}, zbomb), "needs 16")


def test_choose_codec_and_loopback_detection():
    assert P.choose_codec(["zlib"]) == "zlib"
    assert P.choose_codec(["brotli"]) == "none"
    assert P.choose_codec(None) == P.available_codecs()[0]
    for host in ("127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost"):
        assert P.is_loopback_host(host), host
    for host in ("0.0.0.0", "10.0.0.5", "::", "example.org", "192.168.1.2"):
        assert not P.is_loopback_host(host), host


def test_byte_lru_never_exceeds_its_budget_and_evicts_least_recent():
    cache = ByteLRU(3 * 4000)
    arrays = [np.full(1000, i, np.float32) for i in range(5)]  # 4000 bytes each
    for i, a in enumerate(arrays[:3]):
        assert cache.put(i, a)
    assert cache.get(0) is not None          # 0 becomes the most recent
    cache.put(3, arrays[3])                   # evicts 1
    assert cache.get(1) is None and cache.get(0) is not None and cache.get(3) is not None
    assert cache.bytes <= cache.max_bytes and len(cache) == 3 and cache.evictions == 1
    assert not cache.put(9, np.zeros(4000, np.float32))   # larger than the whole cache: not stored
    assert cache.bytes == 12000
    assert not arrays[0].flags.writeable     # stored arrays are frozen
    s = cache.stats()
    assert s["hits"] == 3 and s["misses"] == 1 and s["bytes"] <= s["max_bytes"]


def test_encode_gate_refuses_beyond_running_plus_queue():
    import threading

    gate = EncodeGate(concurrent=1, queue=1, wait_s=5)
    inside = threading.Event()
    release = threading.Event()

    def hold():
        with gate:
            inside.set()
            release.wait(5)

    holders = [threading.Thread(target=hold) for _ in range(2)]
    holders[0].start()
    assert inside.wait(5)
    holders[1].start()                        # waits in the queue
    for _ in range(500):
        if gate.stats()["running_or_waiting"] == 2:
            break
        threading.Event().wait(0.01)
    with pytest.raises(Busy, match="server full"):
        with gate:
            pass
    release.set()
    for t in holders:
        t.join(5)
    assert gate.stats()["running_or_waiting"] == 0 and gate.refused == 1
    short = EncodeGate(concurrent=1, queue=2, wait_s=0.05)
    with short:
        with pytest.raises(Busy, match="no encode slot within"):
            with short:
                pass


def test_rate_limiter_token_bucket():
    rl = RateLimiter(rate=2.0, burst=3)
    assert [rl.check("a", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = rl.check("a", now=0.0)
    assert wait == pytest.approx(0.5)
    assert rl.check("b", now=0.0) == 0.0      # identities are separate
    assert rl.check("a", now=0.6) == 0.0      # refilled 1.2 tokens
    assert RateLimiter(rate=0, burst=1).check("x") == 0.0
    small = RateLimiter(rate=1, burst=1, max_clients=2)
    for ident in "abc":
        small.check(ident, now=0.0)
    assert len(small._buckets) == 2


def test_client_side_modules_import_without_torch_or_server_packages():
    code = ("import sys; import SAM3DSegmentLib.remote.client, SAM3DSegmentLib.remote.settings, "
            "SAM3DSegmentLib.remote.options, SAM3DSegmentLib.remote.onnx_decoder, SAM3DSegmentLib.remote.server; "
            "bad = [m for m in ('torch', 'fastapi', 'uvicorn', 'starlette', 'onnxruntime') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_no_torch_import_statement_in_remote_package():
    from pathlib import Path

    import SAM3DSegmentLib.remote as remote

    for path in Path(remote.__file__).parent.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "import torch" not in text and "from torch" not in text, path.name
