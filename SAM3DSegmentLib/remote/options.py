"""``--server`` options shared by ``sam3d segment`` and ``sam3d evaluate``, and the remote branch of
``cli.load_backend``.

The key never appears on the command line (other users can read a process's arguments): it comes from
``--server-key-file PATH`` or the ``SAM3D_SERVER_KEY`` environment variable.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

KEY_ENV = "SAM3D_SERVER_KEY"


@dataclass
class RemoteOptions:
    servers: List[str]
    key: Optional[str] = None
    mode: str = "auto"
    timeout_s: float = 60.0
    ca_file: Optional[str] = None
    wire_dtype: str = "float16"


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("remote inference (docs/remote.md)")
    g.add_argument("--server", action="append", default=[], metavar="URL",
                   help="run the model on 'sam3d serve' at URL instead of here; repeat (or comma-separate) for "
                        "equivalent servers to fail over between. --model then names a model the server offers; "
                        "--device/--dtype/--threads apply only to a local torch decoder (--checkpoint)")
    g.add_argument("--server-key-file", metavar="PATH",
                   help=f"file holding the server's key (default: ${KEY_ENV}); never pass a key on the command line")
    g.add_argument("--server-mode", choices=("auto", "split", "full"), default="auto",
                   help="split: decode clicks here (ONNX, or torch with --checkpoint of the served file); full: "
                        "the server decodes; auto (default): split when onnxruntime is installed")
    g.add_argument("--server-timeout", type=float, default=60.0, metavar="S",
                   help="seconds to wait for one server's answer (default 60)")
    g.add_argument("--server-ca", metavar="PEM", help="CA certificate to trust for an https server (self-signed)")
    g.add_argument("--wire-dtype", choices=("float16", "float32"), default="float16",
                   help="precision of the region and embedding on the wire (float32: exact, twice the bytes)")


def read_key(path: Optional[str], environ=os.environ) -> Optional[str]:
    """The key from ``path`` (its first non-empty line) or ``$SAM3D_SERVER_KEY``; None when neither."""
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                lines = [ln.strip() for ln in fh.read().splitlines() if ln.strip()]
        except OSError as err:
            raise ValueError(f"--server-key-file {path}: {err.strerror or err}; give a readable file holding "
                             "the key") from None
        if not lines:
            raise ValueError(f"--server-key-file {path} is empty; put the key on its first line")
        return lines[0]
    return environ.get(KEY_ENV, "").strip() or None


def remote_options(args: argparse.Namespace) -> Optional[RemoteOptions]:
    """RemoteOptions from parsed arguments, or None when no ``--server`` was given."""
    servers = [u.strip() for item in (getattr(args, "server", None) or []) for u in item.split(",") if u.strip()]
    if not servers:
        return None
    if not args.server_timeout > 0:
        raise ValueError(f"--server-timeout must be positive, got {args.server_timeout}")
    return RemoteOptions(servers=servers, key=read_key(args.server_key_file), mode=args.server_mode,
                         timeout_s=args.server_timeout, ca_file=args.server_ca, wire_dtype=args.wire_dtype)


def load_remote_backend(opts: RemoteOptions, model: Optional[str], checkpoint: Optional[str],
                        load_local: Callable[[], Any]) -> Tuple[Any, dict]:
    """(RemoteBackend, info) for ``cli.load_backend``. With ``checkpoint`` the clicks are decoded here by
    torch (``load_local()`` builds that backend), and the servers must serve the same file (sha256).
    Raises RemoteError or ValueError with a one-line message."""
    from .client import RemoteBackend

    local, sha = None, None
    if checkpoint:
        if opts.mode == "full":
            raise ValueError("--checkpoint with --server is the local decoder of split mode; drop it or use "
                             "--server-mode split")
        from ..weights import sha256_file

        local = load_local()
        sha = sha256_file(checkpoint)
    backend = RemoteBackend(opts.servers, key=opts.key, model=model, mode=opts.mode, local_decoder=local,
                            expected_sha256=sha, wire_dtype=opts.wire_dtype, timeout_s=opts.timeout_s,
                            ca_file=opts.ca_file)
    info = {"model": backend.model, "checkpoint": f"{backend.model} served by {', '.join(opts.servers)}",
            "checkpoint_sha256": backend.model_info.get("sha256"), "backend": backend.name,
            "device": backend.caps.get("device"), "architecture": backend.model_info.get("architecture"),
            "image_size": int(backend.image_size), "server": list(opts.servers), "server_mode": backend.mode,
            "server_version": backend.caps.get("version"), "wire_dtype": opts.wire_dtype}
    return backend, info
