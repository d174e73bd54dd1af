"""``sam3d serve``: load models onto one device and serve them over HTTP (docs/remote.md).

The command line only: keys, models and the running server are :mod:`SAM3DSegmentLib.remote.serve`'s, the
HTTP endpoints :mod:`SAM3DSegmentLib.remote.server`'s. ``--device``, ``--threads`` and ``--dtype`` are the
shared options of every command; ``--model`` and ``--checkpoint`` differ by design: a server offers several
models, so both repeat, and ``--checkpoint`` names each file (``NAME=PATH``). Keys come from ``--keys-file`` or
``$SAM3D_SERVER_KEYS``, never from the command line. The command runs until interrupted (Ctrl-C or SIGTERM:
uvicorn finishes the requests in progress, then the exit status is 0).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence, Tuple

from . import options as O
from .options import CliError, UsageError
from .runner import command_main

NAME = "serve"
HELP = "serve models over HTTP for remote inference (docs/remote.md)"
DESCRIPTION = ("Serve SAM-Med3D-family models over HTTP: clients send 128^3 model-input regions, the server returns "
               "embeddings (split clients decode clicks locally) or decodes clicks too (full clients). One process "
               "per GPU; put a plain load balancer in front for more. See docs/remote.md.")
KEYS_HELP = "accepted bearer keys, one per line, # comments (also: $SAM3D_SERVER_KEYS, comma-separated)"


def named_checkpoint(text: str) -> Tuple[str, str]:
    """``"NAME=PATH"`` -> (name, path)."""
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: write NAME=PATH, e.g. --checkpoint mine=/models/ft.pth")
    return name.strip(), path.strip()


def port_number(text: str) -> int:
    value = O.non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0-65535, got {text}")
    return value


def configure(p) -> None:
    p.add_argument("--model", action="append", default=[], metavar="NAME",
                   help="registered model to serve under its own name (repeat for more; default: the default "
                        "model sam-med3d-turbo)")
    p.add_argument("--checkpoint", action="append", default=[], type=named_checkpoint, metavar="NAME=PATH",
                   help="serve a checkpoint file under NAME (repeatable)")
    O.add_device_options(p)
    g = p.add_argument_group("network and security")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other needs keys)")
    g.add_argument("--port", type=port_number, default=8765, help="port (default 8765; 0 = any free port)")
    g.add_argument("--keys-file", metavar="PATH", help=KEYS_HELP)
    g.add_argument("--ssl-certfile", metavar="PEM", help="TLS certificate chain (serve https)")
    g.add_argument("--ssl-keyfile", metavar="PEM", help="TLS private key")
    g = p.add_argument_group("limits")
    g.add_argument("--cache-mb", type=O.positive_float, default=1024.0, metavar="MIB",
                   help="embedding cache size in MiB (default 1024)")
    g.add_argument("--max-request-mb", type=O.positive_float, default=32.0, metavar="MIB",
                   help="largest request body in MiB (default 32)")
    g.add_argument("--max-points", type=O.positive_int, default=256, metavar="N",
                   help="most points in one decode request (default 256)")
    g.add_argument("--rate", type=O.non_negative_float, default=50.0, metavar="PER_S",
                   help="requests per second per key (default 50; 0 = no limit)")
    g.add_argument("--burst", type=O.positive_int, default=100, metavar="N",
                   help="requests a key may send at once above --rate (default 100)")
    g.add_argument("--max-concurrent-encodes", type=O.positive_int, default=1, metavar="N",
                   help="encodes running at once (default 1)")
    g.add_argument("--max-queue", type=O.non_negative_int, default=16, metavar="N",
                   help="encodes allowed to wait; beyond that the server answers 503 'busy' (default 16)")
    p.add_argument("--no-onnx", action="store_true", help="do not offer the ONNX decoder to split clients")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (default info); keys are never logged")


def run(args) -> int:
    from ..remote.protocol import is_loopback_host
    from ..remote.serve import KEYS_ENV, ServeError, load_models, read_keys, start_server

    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise UsageError("TLS needs both --ssl-certfile and --ssl-keyfile")
    try:
        keys = read_keys(args.keys_file)
    except ServeError as err:
        raise CliError(str(err)) from err
    if not keys and not is_loopback_host(args.host):
        raise UsageError(f"--host {args.host} exposes the server to the network: give keys with --keys-file or "
                         f"${KEYS_ENV}, or bind to 127.0.0.1")
    try:
        models = load_models(args.model, args.checkpoint, args.device, args.threads, args.dtype, onnx=not args.no_onnx)
    except ServeError as err:
        raise CliError(str(err)) from err
    from ..models.device import describe_device
    from ..remote.server import ServerConfig

    config = ServerConfig(
        keys=keys, host=args.host, device=describe_device(models[0].backend.device),
        cache_bytes=int(args.cache_mb * (1 << 20)), max_request_bytes=int(args.max_request_mb * (1 << 20)),
        max_points=args.max_points, rate_per_s=args.rate, burst=args.burst,
        max_concurrent_encodes=args.max_concurrent_encodes, max_queue=args.max_queue)
    try:
        _, runner = start_server(models, config, args.port, args.ssl_certfile, args.ssl_keyfile, args.log_level)
    except OSError as err:  # the port is taken, the address is not ours, a certificate file is unreadable
        raise CliError(f"cannot serve on {args.host}:{args.port}: {err.strerror or err}; choose another --port or "
                       "--host, or check the certificate files") from err
    print(f"sam3d serve: {', '.join(m.name for m in models)} on {config.device}; "
          f"{'key required' if keys else 'no key (loopback only)'}; listening on {runner.url}", flush=True)
    runner.serve_forever()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``sam3d serve`` (``argv`` without the sub-command): the same parser, messages and exit statuses."""
    return command_main(sys.modules[__name__], argv)
