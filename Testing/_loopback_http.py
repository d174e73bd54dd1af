"""A file server on 127.0.0.1 for the download tests, with the misbehaviours they need.

``LoopbackServer(files, ...)`` serves ``files[name]`` at ``/name`` and honours ``bytes=N-`` ranges (416 past the
end). Knobs: ``cut_first`` — the first GET of a file announces the full length, sends only that many bytes and
closes; ``ignore_range`` — answer every request with the whole file (200); ``delay`` — seconds before the body;
``rate`` — bytes per second for the body (None: at once); ``header_trickle`` — send the status line one byte per
0.2 s and never finish. ``requests`` records each GET (path, Range, If-Range, status, bytes sent). Use it as a
context manager: it serves on a daemon thread and is shut down on exit.

``isolated_download_env`` (an autouse fixture where a test module imports it): no proxy, a fresh ``SAM3D_HOME``
and no ``SAM3D_WEIGHTS_BASE_URL``, so downloads reach the loopback server and the cache starts empty.
"""
import contextlib
import hashlib
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

CHUNK = 256 * 1024


@pytest.fixture(autouse=True)
def isolated_download_env(monkeypatch, tmp_path):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("SAM3D_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SAM3D_WEIGHTS_BASE_URL", raising=False)


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        srv = self.server
        entry = {"path": self.path, "range": self.headers.get("Range"),
                 "if_range": self.headers.get("If-Range"), "status": None, "sent": 0}
        with srv.lock:
            srv.requests.append(entry)
            first = sum(1 for r in srv.requests if r["path"] == self.path) == 1
        if srv.header_trickle:
            for b in b"HTTP/1.1 200 OK\r\n":
                if srv.stop.wait(0.2):
                    return
                with contextlib.suppress(OSError):
                    self.wfile.write(bytes([b]))
                    self.wfile.flush()
            return
        data = srv.files.get(self.path)
        if data is None:
            entry["status"] = 404
            self.send_error(404, "Not Found")
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and not srv.ignore_range:
            m = re.fullmatch(r"bytes=(\d+)-", rng.strip())
            assert m, rng
            start = int(m.group(1))
            if start >= len(data):
                entry["status"] = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            entry["status"] = 206
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            entry["status"] = 200
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", '"' + hashlib.md5(data).hexdigest() + '"')
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if srv.delay:
            srv.stop.wait(srv.delay)
        if first and srv.cut_first is not None:
            body = body[: srv.cut_first]
        step = CHUNK if srv.rate is None else max(1, int(srv.rate / 20))
        view = memoryview(body)
        try:
            for i in range(0, len(body), step):
                if srv.rate is not None and srv.stop.wait(0.05):
                    return
                self.wfile.write(view[i:i + step])
                entry["sent"] += len(view[i:i + step])
                if srv.rate is not None:
                    self.wfile.flush()
            self.wfile.flush()
        except OSError:  # the client gave up
            pass
        self.close_connection = True


class LoopbackServer:
    def __init__(self, files, *, cut_first=None, ignore_range=False, delay=0.0, rate=None, header_trickle=False):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.files = {"/" + k: v for k, v in files.items()}
        self.httpd.requests = []
        self.httpd.lock = threading.Lock()
        self.httpd.stop = threading.Event()
        self.httpd.cut_first = cut_first
        self.httpd.ignore_range = ignore_range
        self.httpd.delay = delay
        self.httpd.rate = rate
        self.httpd.header_trickle = header_trickle
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    @property
    def requests(self):
        return self.httpd.requests

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
        assert not self.thread.is_alive()
