"""Helpers for the remote-inference tests: a numpy stand-in for the model and servers on loopback.

Every server here listens on 127.0.0.1 only and is stopped by the test that started it.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from typing import Iterator, List, Optional

import numpy as np

from SAM3DSegmentLib.remote.server import ServedModel, ServerConfig, ServerThread, create_app

KEY = "test-key-0123456789abcdef"


class StubBackend:
    """Deterministic numpy stand-in for the MODEL (32^3 input, 8^3 logits): the embedding is the input's
    2x2x2 block means of a 16^3 downsample; logits depend on the embedding, the points and the mask, so a
    wrong embedding, point or mask shows. ``delay_s`` slows encodes (time-limit tests)."""

    image_size = 32
    low_res_size = 8

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s
        self.encodes = 0
        self.decodes = 0
        self._lock = threading.Lock()

    def encode(self, image):
        if self.delay_s:
            time.sleep(self.delay_s)
        with self._lock:
            self.encodes += 1
        x = np.asarray(image, np.float32).reshape(4, 8, 4, 8, 4, 8).mean(axis=(1, 3, 5))
        return np.stack([x, -x])[None]            # (1, 2, 4, 4, 4)

    def decode(self, embedding, points, labels, mask_logits):
        with self._lock:
            self.decodes += 1
        emb = np.asarray(embedding, np.float32)
        s = self.low_res_size
        base = np.kron(emb[0, 0], np.ones((2, 2, 2), np.float32))
        c = (np.arange(s) + 0.5) * 4 - 0.5
        grid = np.stack(np.meshgrid(c, c, c, indexing="ij"), -1)
        out = base.copy()
        for p, lab in zip(np.asarray(points, np.float32), labels):
            d = np.linalg.norm(grid - p, axis=-1)
            out += (1.0 if lab == 1 else -1.0) * np.maximum(0.0, 6.0 - d)
        if mask_logits is not None:
            out += 0.5 * np.asarray(mask_logits, np.float32)
        return out.astype(np.float32)


def stub_model(backend: Optional[StubBackend] = None, name: str = "stub", sha256: str = "ab" * 32) -> ServedModel:
    return ServedModel(name=name, backend=backend or StubBackend(), sha256=sha256, architecture="stub",
                       embedding_shape=(1, 2, 4, 4, 4))


@contextlib.contextmanager
def serving(models, **config) -> Iterator[ServerThread]:
    """An in-process server on 127.0.0.1 (free port), stopped on exit."""
    if not isinstance(models, (list, tuple)):
        models = [models]
    ssl = {k: config.pop(k) for k in ("ssl_certfile", "ssl_keyfile") if k in config}
    srv = ServerThread(create_app(models, ServerConfig(**config)), "127.0.0.1", 0, **ssl)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def image32(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(32, 32, 32)).astype(np.float32)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_process(args: List[str], env_extra: Optional[dict] = None, timeout_s: float = 60.0):
    """``sam3d serve ARGS`` in a child process on loopback; yields (process, url); killed on exit. Its output
    (stdout and stderr) collects in ``process.log_lines``."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    proc = subprocess.Popen([sys.executable, "-m", "SAM3DSegmentLib", "serve", "--host", "127.0.0.1", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + timeout_s
        url, lines = None, []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "listening on " in line:
                url = line.rsplit("listening on ", 1)[1].strip()
                break
        if url is None:
            proc.kill()
            raise RuntimeError("sam3d serve did not start: " + "".join(lines))
        proc.log_lines = lines   # what it printed so far; the reader below adds the rest
        proc.log_reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        proc.log_reader.start()
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
