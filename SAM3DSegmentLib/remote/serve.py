"""Starting a server: keys, models and the running server for ``sam3d serve`` (its command line:
``cli/serve.py``; the HTTP side: ``remote/server.py``).

One process per GPU (``--device cuda:N``), a plain load balancer in front for more (docs/remote.md). Keys
come from a file (one key per line, ``#`` comments) or the ``SAM3D_SERVER_KEYS`` environment variable
(comma-separated), never from the command line, where other users could read them.
"""
from __future__ import annotations

import os
import sys
import threading
from typing import List, Optional, Sequence, Tuple

KEYS_ENV = "SAM3D_SERVER_KEYS"
MIN_KEY_LENGTH = 16


class ServeError(Exception):
    """A start-up failure with a message naming the fix."""


def read_keys(path: Optional[str], environ=os.environ) -> List[str]:
    """Keys from ``path`` (one per line, ``#`` comments) and ``$SAM3D_SERVER_KEYS`` (comma-separated)."""
    keys: List[str] = []
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                lines = fh.read().splitlines()
        except OSError as err:
            raise ServeError(f"--keys-file {path}: {err.strerror or err}; give a readable file with one key "
                             "per line") from None
        keys += [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    keys += [k.strip() for k in environ.get(KEYS_ENV, "").split(",") if k.strip()]
    short = [k for k in keys if len(k) < MIN_KEY_LENGTH or any(c.isspace() for c in k)]
    if short:
        raise ServeError(f"{len(short)} key(s) are shorter than {MIN_KEY_LENGTH} characters or contain spaces; "
                         "make keys with: python -c \"import secrets; print(secrets.token_urlsafe(32))\"")
    return keys


def load_models(models: Sequence[str] = (), checkpoints: Sequence[Tuple[str, str]] = (), device: str = "auto",
                threads: Optional[int] = None, dtype: str = "float32", onnx: bool = True) -> list:
    """Load every requested model onto ``device`` (torch is imported through ``inference.backends``).

    ``models``: registered names, each served under its own name; ``checkpoints``: ``(name, path)`` pairs;
    neither: the default model. ``onnx=False``: do not offer the ONNX decoder. Raises :class:`ServeError`."""
    from ..inference.backends import BackendError, load_backend
    from ..weights import DEFAULT_MODEL, sha256_file
    from .server import ServedModel

    wanted = [(name, name, None) for name in models] + [(name, None, path) for name, path in checkpoints]
    if not wanted:
        wanted = [(DEFAULT_MODEL, DEFAULT_MODEL, None)]
    names = [w[0] for w in wanted]
    if len(set(names)) != len(names):
        raise ServeError(f"model names must be unique, got {names}")
    served = []
    for name, registered, path in wanted:
        try:
            backend, info = load_backend(registered, path, device, threads, dtype)
        except BackendError as err:
            raise ServeError(f"model {name}: {err}") from err
        if getattr(backend, "family", "sam_med3d") != "sam_med3d":
            raise ServeError(f"model {name}: {info['checkpoint']} is a {backend.family} model; sam3d serve serves "
                             "SAM-Med3D models only (its protocol carries SAM-Med3D image embeddings and previous-mask "
                             "logits). Run this model locally instead (sam3d segment, or the Slicer module with a local "
                             "model)")
        cfg = backend.model.config
        g = int(cfg.grid_size)
        served.append(ServedModel(
            name=name, backend=backend, sha256=sha256_file(info["checkpoint"]), architecture=info["architecture"],
            embedding_shape=(1, int(cfg.prompt_embed_dim), g, g, g), module=backend.model if onnx else None))
    return served


def start_server(models: list, config, port: int, ssl_certfile: Optional[str] = None,
                 ssl_keyfile: Optional[str] = None, log_level: str = "info"):
    """``(app, runner)``: the app for ``models`` bound to ``config.host:port`` (listening already), and the
    ONNX decoders exported in the background so that the first split client does not wait for them."""
    from .server import ServerThread, create_app

    app = create_app(models, config)
    runner = ServerThread(app, config.host, port, ssl_certfile, ssl_keyfile, log_level)
    state = app.state.sam3d

    def warm_up():
        for m in models:
            if m.module is not None:
                try:
                    state.onnx_decoder(m)
                except Exception as err:  # noqa: BLE001 - clients get the reason; full mode still works
                    sys.stderr.write(f"sam3d serve: warning: no ONNX decoder for {m.name}: {err}\n")

    threading.Thread(target=warm_up, name="onnx-export", daemon=True).start()
    return app, runner
