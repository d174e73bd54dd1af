"""``sam3d serve``: load the operator's models onto one device and serve them (``remote/server.py``).

One process per GPU (``--device cuda:N``), a plain load balancer in front for more (docs/remote.md). Keys
come from a file (``--keys-file``, one key per line, ``#`` comments) or the ``SAM3D_SERVER_KEYS``
environment variable (comma-separated), never from the command line, where other users could read them.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
from typing import List, Optional, Sequence

KEYS_ENV = "SAM3D_SERVER_KEYS"
MIN_KEY_LENGTH = 16


class ServeError(Exception):
    """A start-up failure with a message naming the fix (exit status 1; usage errors are 2)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sam3d serve",
        description="Serve SAM-Med3D-family models over HTTP: clients send 128^3 model-input regions, the "
                    "server returns embeddings (split clients decode clicks locally) or decodes clicks too "
                    "(full clients). See docs/remote.md.")
    p.add_argument("--model", action="append", default=[], metavar="NAME",
                   help="registered model to serve (repeat for more; default: the default model)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                   help="serve a checkpoint file under NAME (repeatable)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="compute precision (default float32; see docs/precision.md)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; any other needs keys)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 = any free port)")
    p.add_argument("--keys-file", metavar="PATH", help=f"accepted bearer keys, one per line (or ${KEYS_ENV})")
    p.add_argument("--ssl-certfile", metavar="PEM", help="TLS certificate chain (serve https)")
    p.add_argument("--ssl-keyfile", metavar="PEM", help="TLS private key")
    p.add_argument("--cache-mb", type=float, default=1024, help="embedding cache size in MiB (default 1024)")
    p.add_argument("--max-request-mb", type=float, default=32, help="largest request body in MiB (default 32)")
    p.add_argument("--max-points", type=int, default=256, help="most points in one decode request")
    p.add_argument("--rate", type=float, default=50, help="requests per second per key (0 = no limit)")
    p.add_argument("--burst", type=int, default=100, help="requests a key may send at once above --rate")
    p.add_argument("--max-concurrent-encodes", type=int, default=1, help="encodes running at once (default 1)")
    p.add_argument("--max-queue", type=int, default=16,
                   help="encodes allowed to wait; beyond that the server answers 503 'busy' (default 16)")
    p.add_argument("--no-onnx", action="store_true", help="do not offer the ONNX decoder to split clients")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return p


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


def load_models(args) -> list:
    """Load every requested model onto the device (torch is imported through cli.load_backend)."""
    from ..cli import CliError, load_backend
    from ..weights import DEFAULT_MODEL, sha256_file
    from .server import ServedModel

    wanted = [(name, name, None) for name in args.model]
    for item in args.checkpoint:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ServeError(f"--checkpoint {item!r}: write NAME=PATH, e.g. --checkpoint mine=/models/ft.pth")
        wanted.append((name.strip(), None, path.strip()))
    if not wanted:
        wanted = [(DEFAULT_MODEL, DEFAULT_MODEL, None)]
    names = [w[0] for w in wanted]
    if len(set(names)) != len(names):
        raise ServeError(f"model names must be unique, got {names}")
    served = []
    for name, registered, path in wanted:
        try:
            backend, info = load_backend(registered, path, args.device, args.threads, args.dtype)
        except CliError as err:
            raise ServeError(f"model {name}: {err}") from err
        cfg = backend.model.config
        g = int(cfg.grid_size)
        served.append(ServedModel(
            name=name, backend=backend, sha256=sha256_file(info["checkpoint"]), architecture=info["architecture"],
            embedding_shape=(1, int(cfg.prompt_embed_dim), g, g, g),
            module=None if args.no_onnx else backend.model))
    return served


def serve_main(argv: Optional[Sequence[str]] = None) -> int:
    prog = "sam3d serve"
    args = build_parser().parse_args(list(argv or []))
    from .protocol import is_loopback_host
    from .server import ServerConfig, ServerThread, create_app

    try:
        keys = read_keys(args.keys_file)
        if not keys and not is_loopback_host(args.host):
            raise ServeError(f"--host {args.host} exposes the server to the network: give keys with --keys-file "
                             f"or ${KEYS_ENV}, or bind to 127.0.0.1")
        if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
            raise ServeError("TLS needs both --ssl-certfile and --ssl-keyfile")
        for flag, value in (("--cache-mb", args.cache_mb), ("--max-request-mb", args.max_request_mb)):
            if not value > 0:
                raise ServeError(f"{flag} must be positive, got {value}")
        models = load_models(args)
        from ..models.device import describe_device

        config = ServerConfig(
            keys=keys, host=args.host, device=describe_device(models[0].backend.device),
            cache_bytes=int(args.cache_mb * (1 << 20)), max_request_bytes=int(args.max_request_mb * (1 << 20)),
            max_points=args.max_points, rate_per_s=args.rate, burst=args.burst,
            max_concurrent_encodes=args.max_concurrent_encodes, max_queue=args.max_queue)
        app = create_app(models, config)
        runner = ServerThread(app, args.host, args.port, args.ssl_certfile, args.ssl_keyfile, args.log_level)
    except (ServeError, ValueError, OSError) as err:
        sys.stderr.write(f"{prog}: error: {' '.join(str(err).split())}\n")
        return 1
    state = app.state.sam3d

    def warm_up():  # export the ONNX decoders now, so the first split client does not wait for it
        for m in models:
            if m.module is not None:
                try:
                    state.onnx_decoder(m)
                except Exception as err:  # noqa: BLE001 - clients get the reason; full mode still works
                    sys.stderr.write(f"{prog}: warning: no ONNX decoder for {m.name}: {err}\n")

    threading.Thread(target=warm_up, name="onnx-export", daemon=True).start()
    print(f"{prog}: {', '.join(m.name for m in models)} on {config.device}; "
          f"{'key required' if keys else 'no key (loopback only)'}; listening on {runner.url}", flush=True)
    runner.serve_forever()
    return 0
