"""What a client needs to use remote servers (:class:`RemoteOptions`), where its key comes from, and the
remote branch of :func:`SAM3DSegmentLib.inference.backends.load_backend`.

The command-line spelling (``--server URL``, ``--server-key-file``, ...) is ``cli/options.py``'s
``add_server_options``; the Slicer module's is ``remote/settings.py``. The key never appears on a command
line (other users can read a process's arguments): it comes from a file or ``$SAM3D_SERVER_KEY``.
"""
from __future__ import annotations

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


def load_remote_backend(opts: RemoteOptions, model: Optional[str], checkpoint: Optional[str],
                        load_local: Callable[[], Any]) -> Tuple[Any, dict]:
    """(RemoteBackend, info) for ``inference.backends.load_backend``. With ``checkpoint`` the clicks are decoded here by
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
