"""`sam3d serve` as a user runs it (a child process, debug logging): keys never reach its log, and a model name
that is a file path is refused without the server touching the file (it loads only what its command line named)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from SAM3DSegmentLib.remote import protocol as P

from _remote_fixtures import KEY

WRONG = "wrong-key-9876543210zyxwvu"


def _start(tmp_path):
    key_file = tmp_path / "server.keys"
    key_file.write_text(f"{KEY}\n", encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "SAM3DSegmentLib", "serve", "--model", "demo", "--device", "cpu",
                             "--threads", "1", "--port", "0", "--keys-file", str(key_file), "--log-level", "debug",
                             "--no-onnx"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines, deadline = [], time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "listening on " in line:
            url = line.rsplit("listening on ", 1)[1].strip()
            rest = []
            reader = threading.Thread(target=lambda: rest.extend(proc.stdout), daemon=True)
            reader.start()
            return proc, url, lines, rest, reader
    proc.kill()
    raise RuntimeError("sam3d serve did not start: " + "".join(lines))


def test_keys_never_logged_and_client_paths_never_loaded(tmp_path):
    pytest.importorskip("torch")
    fifo = tmp_path / "evil.pth"
    os.mkfifo(fifo)   # opening it to read would block: a server that tried to load it would hang the request
    proc, url, head, rest, reader = _start(tmp_path)
    try:
        caps = httpx.get(url + "/v1/capabilities", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
        image = np.zeros((128,) * 3, np.float32)
        for model, key, status in (("demo", KEY, 200), ("demo", WRONG, 401), (str(fifo), KEY, 404),
                                   ("../" + str(fifo), KEY, 404)):
            body = P.pack({"model": model}, {"image": image})
            r = httpx.post(url + "/v1/encode", content=body, timeout=60,
                           headers={"Content-Type": P.MEDIA_TYPE, "Authorization": f"Bearer {key}"})
            assert r.status_code == status, (model, r.text)
            if status == 404:
                assert "unknown model" in r.json()["detail"]
        after = httpx.get(url + "/v1/capabilities", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
        assert after["models"] == caps["models"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        reader.join(10)
    log = "".join(head + rest)
    assert log.count("POST /v1/encode") >= 4, log[-2000:]   # the access log did record every request
    assert KEY not in log and WRONG not in log
