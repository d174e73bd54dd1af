"""`sam3d serve` as a user runs it (a child process, debug logging): keys never reach its log, and a model name
that is a file path is refused without the server touching the file (it loads only what its command line named)."""
from __future__ import annotations

import os
import signal

import httpx
import numpy as np
import pytest

from SAM3DSegmentLib.remote import protocol as P

from _remote_fixtures import KEY, serve_process

WRONG = "wrong-key-9876543210zyxwvu"


def test_keys_never_logged_and_client_paths_never_loaded(tmp_path):
    pytest.importorskip("torch")
    fifo = tmp_path / "evil.pth"
    os.mkfifo(fifo)   # opening it to read would block: a server that tried to load it would hang the request
    key_file = tmp_path / "server.keys"
    key_file.write_text(f"{KEY}\n", encoding="utf-8")
    args = ["--model", "demo", "--device", "cpu", "--threads", "1", "--port", "0", "--keys-file", str(key_file),
            "--log-level", "debug", "--no-onnx"]
    with serve_process(args, timeout_s=120) as (proc, url):
        auth = {"Authorization": f"Bearer {KEY}"}
        caps = httpx.get(url + "/v1/capabilities", headers=auth, timeout=10).json()
        image = np.zeros((128,) * 3, np.float32)
        for model, key, status in (("demo", KEY, 200), ("demo", WRONG, 401), (str(fifo), KEY, 404),
                                   ("../" + str(fifo), KEY, 404)):
            body = P.pack({"model": model}, {"image": image})
            r = httpx.post(url + "/v1/encode", content=body, timeout=60,
                           headers={"Content-Type": P.MEDIA_TYPE, "Authorization": f"Bearer {key}"})
            assert r.status_code == status, (model, r.text)
            if status == 404:
                assert "unknown model" in r.json()["detail"]
        assert httpx.get(url + "/v1/capabilities", headers=auth, timeout=10).json()["models"] == caps["models"]
        proc.send_signal(signal.SIGTERM)   # a clean stop flushes every log line
        proc.wait(30)
        proc.log_reader.join(10)
    log = "".join(proc.log_lines)
    assert log.count("POST /v1/encode") >= 4, log[-2000:]   # the access log did record every request
    assert KEY not in log and WRONG not in log
