"""The remote server over real HTTP on loopback: keys, refusals (4xx with reasons, never a crash or a
hang), limits, statelessness, time limits in the client, proxies and TLS. The model is a numpy stand-in
(Testing/_remote_fixtures.py); model parity is in test_remote_parity.py."""
from __future__ import annotations

import http.server
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest

from SAM3DSegmentLib.remote import protocol as P
from SAM3DSegmentLib.remote.client import RemoteBackend
from SAM3DSegmentLib.remote.errors import (AuthError, BadRequest, ProxyError, RemoteTimeout, ServerBusy,
                                           ServerUnavailable, VersionMismatch)
from SAM3DSegmentLib.remote.server import ServerConfig, ServerState, create_app

from _remote_fixtures import KEY, StubBackend, free_port, image32, serving, stub_model

AUTH = {"Authorization": f"Bearer {KEY}"}


def _post(url, path, body, headers=None, **kw):
    h = {"Content-Type": P.MEDIA_TYPE, **(headers if headers is not None else AUTH)}
    return httpx.post(url + path, content=body, headers=h, timeout=10, **kw)


def _encode_body(img=None, **meta):
    return P.pack({"model": "stub", **meta}, {"image": image32() if img is None else img})


def _decode_arrays(n=1):
    return {"points": np.full((n, 3), 10.0, np.float32), "labels": np.ones(n, np.int32)}


def test_key_required_constant_time_no_work_when_refused():
    backend = StubBackend()
    with serving(stub_model(backend), keys=[KEY, "second-key-abcdefghijk"]) as srv:
        assert httpx.get(srv.url + "/v1/health", timeout=5).json()["status"] == "ok"   # no key needed
        for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789"}, {"Authorization": KEY},
                        {"Authorization": f"Basic {KEY}"}):
            r = _post(srv.url, "/v1/encode", _encode_body(), headers=headers)
            assert r.status_code == 401 and r.json()["error"] == "unauthorized", headers
            assert r.headers["www-authenticate"] == "Bearer"
            assert KEY not in r.text
            assert httpx.get(srv.url + "/v1/capabilities", headers=headers, timeout=5).status_code == 401
        assert backend.encodes == 0                    # refused before any work
        assert _post(srv.url, "/v1/encode", _encode_body()).status_code == 200
        r = _post(srv.url, "/v1/encode", _encode_body(image32(1)),
                  headers={"Authorization": "Bearer second-key-abcdefghijk"})
        assert r.status_code == 200 and backend.encodes == 2
        stats = httpx.get(srv.url + "/v1/stats", headers=AUTH, timeout=5).json()
        assert stats["counters"]["refused_auth"] == 8
        with pytest.raises(AuthError, match="refused the key"):
            RemoteBackend(srv.url, key="wrong-key-0123456789")


def test_server_refuses_network_bind_without_key():
    with pytest.raises(ValueError, match="without a key"):
        ServerState([stub_model()], ServerConfig(host="0.0.0.0"))
    ServerState([stub_model()], ServerConfig(host="0.0.0.0", keys=[KEY]))   # with a key it may
    ServerState([stub_model()], ServerConfig(host="::1"))


def test_malformed_requests_get_4xx_with_reasons_and_the_server_keeps_serving():
    backend = StubBackend()
    with serving(stub_model(backend), keys=[KEY], max_request_bytes=1 << 20, max_points=4) as srv:
        url = srv.url
        ok = _post(url, "/v1/encode", _encode_body())
        key = P.unpack(ok.content)[0]["key"]
        bad_img = image32()
        bad_img[1, 2, 3] = np.nan
        cases = [
            (_post(url, "/v1/encode", b"garbage!" * 4), 415, "bad magic"),
            (_post(url, "/v1/encode", _encode_body(), headers={**AUTH, "Content-Type": "application/json"}), 415,
             "send the body as"),
            (_post(url, "/v1/encode", _encode_body()[:-10]), 400, "does not match"),
            (_post(url, "/v1/encode", _encode_body(np.zeros((16, 32, 32), np.float32))), 400, "shape"),
            (_post(url, "/v1/encode", _encode_body(np.zeros((32, 32, 32), np.int32))), 400, "float16/float32"),
            (_post(url, "/v1/encode", _encode_body(bad_img)), 400, "NaN"),
            (_post(url, "/v1/encode", P.pack({"model": "nope"}, {"image": image32()})), 404, "unknown model"),
            (_post(url, "/v1/encode", _encode_body(return_embedding=True, embedding_dtype="int8")), 400,
             "embedding_dtype"),
            (_post(url, "/v1/encode", _encode_body(), headers={**AUTH, P.PROTOCOL_HEADER: "99"}), 400,
             "protocol 99"),
            (_post(url, "/v1/encode", _encode_body(model_sha256="cd" * 32)), 409, "same checkpoint"),
            (_post(url, "/v1/encode", P.pack({}, {"image": np.zeros((600, 600), np.float32)})), 413, "limit"),
            (_post(url, "/v1/decode", P.pack({"model": "stub"}, _decode_arrays())), 400, "'key' of an encoded"),
            (_post(url, "/v1/decode", P.pack({"model": "stub", "key": "x" * 64}, _decode_arrays())), 400,
             "64-character"),
            (_post(url, "/v1/decode", P.pack({"model": "stub", "key": "0" * 64}, _decode_arrays())), 404,
             "resend the region"),
            (_post(url, "/v1/decode", P.pack({"model": "stub", "key": key}, _decode_arrays(5))), 400, "1 <= N <= 4"),
            (_post(url, "/v1/decode", P.pack({"model": "stub", "key": key},
                                             {"points": np.zeros((1, 3), np.float32),
                                              "labels": np.array([2], np.int32)})), 400, "0 (exclude) or 1"),
            (_post(url, "/v1/decode", P.pack({"model": "stub", "key": key},
                                             {**_decode_arrays(), "mask_logits": np.zeros((4, 4, 4), np.float32)})),
             400, "mask_logits"),
            (_post(url, "/v1/decode", P.pack({"model": "stub", "key": key[::-1]},
                                             {**_decode_arrays(), "image": image32()})), 400, "does not match"),
        ]
        for r, status, reason in cases:
            assert r.status_code == status, (reason, r.status_code, r.text)
            assert reason in r.json()["detail"], (reason, r.text)
        # Content-Length over the limit is refused before the body is read.
        big = b"\0" * ((1 << 20) + 1)
        r = _post(url, "/v1/encode", big)
        assert r.status_code == 413
        assert httpx.get(url + "/v1/health", timeout=5).status_code == 200
        assert _post(url, "/v1/encode", _encode_body(image32(5))).status_code == 200
        assert backend.encodes == 2


def test_client_refuses_to_send_more_than_the_servers_published_limit():
    backend = StubBackend()
    with serving(stub_model(backend), max_request_bytes=100_000) as srv:
        rb = RemoteBackend(srv.url, mode="full", wire_dtype="float32")   # 128 KiB of noise: over the limit
        with pytest.raises(BadRequest, match="exceeds the server's limit of 100000 bytes"):
            rb.encode(image32())
        assert backend.encodes == 0
        RemoteBackend(srv.url, mode="full", wire_dtype="float16").encode(image32() * 0)   # compressible: fits
        assert backend.encodes == 1


def test_slow_upload_gets_408_not_a_hang():
    with serving(stub_model(), keys=[KEY], body_timeout_s=0.5) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            s.sendall(f"POST /v1/encode HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                      f"Content-Type: {P.MEDIA_TYPE}\r\nContent-Length: 1000\r\n\r\n".encode() + b"S3DA")
            t = time.monotonic()
            answer = ""
            while "not received within" not in answer and time.monotonic() - t < 4:   # headers, then body
                chunk = s.recv(4096).decode(errors="replace")
                if not chunk:
                    break
                answer += chunk
            assert time.monotonic() - t < 4
        assert answer.startswith("HTTP/1.1 408") and "not received within" in answer


def test_rate_limit_answers_429_and_the_client_reports_busy():
    with serving(stub_model(), keys=[KEY], rate_per_s=0.5, burst=2) as srv:
        codes = [httpx.get(srv.url + "/v1/capabilities", headers=AUTH, timeout=5).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        r = httpx.get(srv.url + "/v1/capabilities", headers=AUTH, timeout=5)
        assert r.json()["error"] == "rate_limited" and int(r.headers["retry-after"]) >= 1
        t = time.monotonic()
        with pytest.raises(ServerBusy, match="busy"):
            RemoteBackend(srv.url, key=KEY, busy_retries=0)
        assert time.monotonic() - t < 3


def test_full_encode_queue_answers_503():
    backend = StubBackend(delay_s=1.0)
    with serving(stub_model(backend), max_concurrent_encodes=1, max_queue=0) as srv:
        first = threading.Thread(target=lambda: _post(srv.url, "/v1/encode", _encode_body(), headers={}))
        first.start()
        for _ in range(200):
            if srv.server.config.app.state.sam3d.gate.stats()["running_or_waiting"]:
                break
            time.sleep(0.01)
        r = _post(srv.url, "/v1/encode", _encode_body(image32(1)), headers={})
        first.join(10)
        assert r.status_code == 503 and r.json()["error"] == "server_busy" and "retry-after" in r.headers


def test_request_bodies_need_a_length_and_count_against_the_inflight_budget():
    backend = StubBackend(delay_s=1.0)
    one = len(_encode_body())
    with serving(stub_model(backend), max_inflight_bytes=int(1.5 * one)) as srv:
        def chunks():
            yield _encode_body()
        r = httpx.post(srv.url + "/v1/encode", content=chunks(), headers={"Content-Type": P.MEDIA_TYPE}, timeout=10)
        assert r.status_code == 411 and "Content-Length" in r.json()["detail"]
        first = threading.Thread(target=lambda: _post(srv.url, "/v1/encode", _encode_body(), headers={}))
        first.start()
        state = srv.server.config.app.state.sam3d
        for _ in range(200):
            if state.inflight_bytes:
                break
            time.sleep(0.01)
        r = _post(srv.url, "/v1/encode", _encode_body(image32(1)), headers={})
        first.join(10)
        assert r.status_code == 503 and "bytes of requests in progress" in r.json()["detail"]
        assert state.inflight_bytes == 0 and backend.encodes == 1     # released after the answer
        assert _post(srv.url, "/v1/encode", _encode_body(image32(1)), headers={}).status_code == 200


def test_server_stateless_cache_bounded_and_decode_by_key_or_region():
    backend = StubBackend()
    emb_bytes = 2 * 4 * 4 * 4 * 4
    with serving(stub_model(backend), cache_bytes=3 * emb_bytes) as srv:
        rb = RemoteBackend(srv.url, mode="full", wire_dtype="float32")
        handles = [rb.encode(image32(i)) for i in range(6)]
        stats = httpx.get(srv.url + "/v1/stats", timeout=5).json()["cache"]
        assert stats["entries"] == 3 and stats["bytes"] <= stats["max_bytes"] and stats["evictions"] == 3
        pts, lab = np.array([[10.0, 12.0, 9.0]]), np.array([1])
        # handle 0 was evicted: the client resends its region, the answer is the same as for a fresh encode
        out0 = rb.decode(handles[0], pts, lab, None)
        ref = backend.decode(backend.encode(image32(0)), pts, lab, None)
        np.testing.assert_allclose(out0, ref, atol=1e-6)
        # a later click with the previous logits: the server holds no session, the client sends them
        out1 = rb.decode(handles[0], pts + 3, lab, out0)
        np.testing.assert_allclose(out1, backend.decode(backend.encode(image32(0)), pts + 3, lab, ref), atol=1e-6)
        caps = rb.caps
        assert caps["protocol"] == P.PROTOCOL_VERSION and caps["models"][0]["sha256"] == "ab" * 32
        assert caps["limits"]["cache_bytes"] == 3 * emb_bytes and caps["auth"] is False


def test_slow_server_gives_a_client_timeout_within_its_limit():
    with serving(stub_model(StubBackend(delay_s=2.0))) as srv:
        rb = RemoteBackend(srv.url, mode="full", timeout_s=0.7, busy_retries=0)
        t = time.monotonic()
        with pytest.raises(RemoteTimeout, match="within 0.7 s"):
            rb.encode(image32())
        assert time.monotonic() - t < 2.0


def test_dead_server_is_reported_at_once():
    port = free_port()                        # nothing listens there
    t = time.monotonic()
    with pytest.raises(ServerUnavailable, match="could be reached"):
        RemoteBackend(f"http://127.0.0.1:{port}", timeout_s=5)
    assert time.monotonic() - t < 3


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server API
        body = b"<html><body><h1>502 Bad Gateway</h1>nginx</body></html>"
        self.send_response(502)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_failing_proxy_is_named_as_such():
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ProxyHandler)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ProxyError, match="HTTP 502 without a sam3d reason"):
            RemoteBackend(f"http://127.0.0.1:{proxy.server_address[1]}", timeout_s=5)
    finally:
        proxy.shutdown()
        proxy.server_close()


class _FutureServerHandler(http.server.BaseHTTPRequestHandler):
    """A server of a later protocol: capabilities say protocol 2; other requests are refused as sam3d 2 would."""

    def _json(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 - http.server API
        if self.path == "/v1/capabilities":
            self._json(200, {"protocol": 2, "version": "9.9.9", "models": []})
        else:
            self._json(400, {"error": "protocol_mismatch", "detail": "client speaks protocol 1, this server 2"})

    def log_message(self, *args):
        pass


def test_a_server_of_another_protocol_version_is_named_with_both_versions():
    from SAM3DSegmentLib.remote.settings import check_connection
    from SAM3DSegmentLib.remote.transport import Transport

    fake = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FutureServerHandler)
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{fake.server_address[1]}"
    try:
        with pytest.raises(VersionMismatch, match="speaks protocol 2 .sam3dsegment 9.9.9., this client 1"):
            RemoteBackend(url, timeout_s=5)
        with pytest.raises(VersionMismatch, match="this server 2"):
            Transport([url]).request("GET", "/v1/stats")
        (report,) = check_connection([url])
        assert not report.ok and "protocol 2" in report.line() and "install matching versions" in report.line()
    finally:
        fake.shutdown()
        fake.server_close()


class _RecordingBusyHandler(http.server.BaseHTTPRequestHandler):
    """Capabilities of one stub model; every POST is recorded and answered 503 busy."""
    posts = []

    def do_GET(self):  # noqa: N802 - http.server API
        body = json.dumps({"protocol": 1, "version": "x", "device": "cpu", "models": [
            {"name": "stub", "sha256": None, "image_size": 32, "low_res_size": 8,
             "embedding_shape": [1, 2, 4, 4, 4], "decoder_onnx": False}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802 - http.server API
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).posts.append(dict(self.headers))
        body = json.dumps({"error": "server_busy", "detail": "server full"}).encode()
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Retry-After", "1")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_requests_name_their_region_for_balancers_and_busy_servers_are_retried_then_reported():
    fake = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RecordingBusyHandler)
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    try:
        rb = RemoteBackend(f"http://127.0.0.1:{fake.server_address[1]}", mode="full", busy_retries=1)
        t = time.monotonic()
        with pytest.raises(ServerBusy, match="all 1 server.s. are busy"):
            rb.encode(image32())
        assert 0.9 < time.monotonic() - t < 5                       # one wait of Retry-After, then one retry
        posts = _RecordingBusyHandler.posts
        assert len(posts) == 2
        assert posts[0]["X-SAM3D-Key"] == P.content_key(P.wire_array(image32(), "float16"))
        assert posts[0]["X-SAM3D-Protocol"] == "1" and "Authorization" not in posts[0]
    finally:
        fake.shutdown()
        fake.server_close()


def test_protocol_and_model_mismatch_are_version_errors():
    with serving(stub_model()) as srv:
        with pytest.raises(VersionMismatch, match="no model with sha256"):
            RemoteBackend(srv.url, expected_sha256="cd" * 32, local_decoder=StubBackend())
        with pytest.raises(BadRequest, match="refused the request"):
            rb = RemoteBackend(srv.url, mode="full")
            rb.model_info = dict(rb.model_info, name="nope")
            rb.model = "nope"
            rb.encode(image32())


def _self_signed(tmp_path):
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sam3d test server")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


def test_tls_with_a_self_signed_certificate(tmp_path):
    cert, key = _self_signed(tmp_path)
    backend = StubBackend()
    with serving(stub_model(backend), keys=[KEY], ssl_certfile=cert, ssl_keyfile=key) as srv:
        assert srv.url.startswith("https://127.0.0.1:")
        rb = RemoteBackend(srv.url, key=KEY, mode="full", ca_file=cert, wire_dtype="float32")
        h = rb.encode(image32())
        out = rb.decode(h, np.array([[5.0, 6.0, 7.0]]), np.array([1]), None)
        np.testing.assert_allclose(out, backend.decode(backend.encode(image32()), [[5.0, 6.0, 7.0]], [1], None),
                                   atol=1e-6)
        with pytest.raises(ServerUnavailable, match="TLS .* failed.*CA file"):
            RemoteBackend(srv.url, key=KEY, timeout_s=5)          # the system CAs do not know this certificate
        with pytest.raises(ServerUnavailable):
            RemoteBackend(srv.url.replace("https://", "http://"), key=KEY, timeout_s=5)


def test_failed_onnx_export_is_a_404_with_the_reason_and_auto_mode_falls_back_to_full():
    model = stub_model()
    model.module = object()                                    # not a model: the export fails
    with serving(model) as srv:
        r = httpx.get(srv.url + "/v1/models/stub/decoder.onnx", timeout=30)
        assert r.status_code == 404 and "ONNX export of model stub failed" in r.json()["detail"]
        rb = RemoteBackend(srv.url, mode="auto")
        assert rb.mode == "full" and "no local ONNX decoder" in rb.name
        with pytest.raises(BadRequest, match="use the full mode"):
            RemoteBackend(srv.url, mode="split")
        assert httpx.get(srv.url + "/v1/models/nope/decoder.onnx", timeout=5).status_code == 404


def test_app_has_no_docs_and_unknown_paths_are_404():
    with serving(stub_model()) as srv:
        for path in ("/docs", "/openapi.json", "/v1/nothing"):
            assert httpx.get(srv.url + path, timeout=5).status_code == 404


def test_create_app_directly_reports_its_limits():
    app = create_app([stub_model()], ServerConfig(max_points=7))
    caps = app.state.sam3d.capabilities()
    assert caps["limits"]["max_points"] == 7 and caps["models"][0]["name"] == "stub"
    assert caps["models"][0]["decoder_onnx"] is False
