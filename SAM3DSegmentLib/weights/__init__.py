"""Named model weights: a registry of known checkpoints, a per-user cache, and a resumable download.

Nothing here imports torch: this package only finds, fetches and checks files.

* :mod:`.registry`: :data:`REGISTRY` maps short names (``"sam-med3d-turbo"``, ``"sam-med3d"``, ``"demo"``) to
  :class:`ModelWeights` records: file name, URL, expected size and sha256 where published, architecture,
  licence and a one-line description.
* :mod:`.cache`: :func:`cache_dir` is where downloaded files live (``$SAM3D_HOME`` overrides the platform
  default from platformdirs); checkpoints go to ``cache_dir() / "checkpoints"``. :func:`cache_state` and
  :func:`list_cache` say what is there; :func:`offline_help` says what to do without a network.
* :mod:`.resolve`: :func:`resolve_checkpoint` turns a name or a path into a local file, downloading on first
  use; :func:`repair` deletes a cached copy that fails its checks and fetches it again.
* :mod:`.fetch`: :func:`download` streams a URL into ``dest + ".part"`` with ``urllib``, resumes an interrupted
  transfer with an HTTP ``Range`` request, checks size, sha256 and content, and renames the finished file into
  place atomically; :mod:`.lock` (filelock) keeps two processes or threads from writing the same file at once,
  and :mod:`.transport` bounds the transfer (a socket timeout per read, a stall detector, an overall
  deadline). A stopped transfer keeps its ``.part`` for resuming; a full disk or read-only cache ends in
  one line naming the folder and the fix, and the unfinished ``.part`` is deleted.
* :mod:`.verify`: a published sha256 is always enforced; a file without one must look like a
  SAM-Med3D-family checkpoint before the sha256 of its first download is recorded next to it (trust on
  first use) and checked on every later load.
* :mod:`.progress`: the tqdm progress bar; :mod:`.errors`: :class:`WeightsError`, :class:`ChecksumError`.

The transfer is our own code on ``urllib`` rather than huggingface_hub's or pooch's download: neither stops a
server that trickles bytes (no stall detector, no overall deadline; their timeouts bound single reads only),
pooch does not resume a partial file, and huggingface_hub only talks to Hub-compatible endpoints (it refuses a
plain file server without the Hub's ``X-Repo-Commit`` header, so ``$SAM3D_WEIGHTS_BASE_URL`` mirrors and the
loopback tests would break) and puts a file in place before our content check could refuse it.

Registered names always mean the cache: a file called ``sam-med3d`` in the current folder is not picked
up in its place.

Environment:

``SAM3D_HOME``
    cache directory (the checkpoints live in its ``checkpoints/`` sub-folder).
``SAM3D_WEIGHTS_BASE_URL``
    mirror for the registered files: ``<base>/<file name>`` is fetched instead of the published URL
    (offline sites, tests).
"""
from __future__ import annotations

import sys
from typing import List, Optional

from .cache import (APP_DIR_NAME, ENV_HOME, cache_dir, cache_state, cached_path, checkpoint_dir, list_cache,
                    offline_help)
from .errors import ChecksumError, WeightsError
from .fetch import DownloadResult, download
from .lock import DownloadLock
from .progress import ProgressArg, ProgressCallback, TextProgress
from .registry import (DEFAULT_MODEL, ENV_BASE_URL, HF_BASE_URL, HF_REPO, REGISTRY, ModelWeights, get_weights,
                       iter_registry, known_names, register_weights)
from .resolve import repair, resolve_checkpoint
from .transport import DEFAULT_MIN_RATE, DEFAULT_STALL_WINDOW
from .verify import (SIDECAR_SUFFIX, checksum_status, payload_problem, repair_command, sha256_file, sidecar_path,
                     verify_cached)

__all__ = [
    "APP_DIR_NAME", "ChecksumError", "DEFAULT_MIN_RATE", "DEFAULT_MODEL", "DEFAULT_STALL_WINDOW", "DownloadLock",
    "DownloadResult", "ENV_BASE_URL", "ENV_HOME", "HF_BASE_URL", "HF_REPO", "ModelWeights", "ProgressArg",
    "ProgressCallback", "REGISTRY", "SIDECAR_SUFFIX", "TextProgress", "WeightsError", "cache_dir", "cache_state",
    "cached_path", "checkpoint_dir", "checksum_status", "download", "get_weights", "iter_registry", "known_names",
    "list_cache", "main", "offline_help", "payload_problem", "register_weights", "repair", "repair_command",
    "resolve_checkpoint", "sha256_file", "sidecar_path", "verify_cached",
]


def _positive(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _non_negative(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or a positive number of bytes per second, got {text}")
    return value


def main(argv: Optional[List[str]] = None) -> int:
    """``sam3d download [NAME ...] [--list] [--repair]``: fetch and verify registered checkpoints into the
    cache. Exit status 0 only when every named checkpoint is in the cache and verified."""
    import argparse

    ap = argparse.ArgumentParser(prog="sam3d download", description=main.__doc__)
    ap.add_argument("names", nargs="*", help=f"model names (default: {DEFAULT_MODEL}); see --list")
    ap.add_argument("--list", action="store_true",
                    help="list the registered models and the state of their cached copies (hashes them)")
    ap.add_argument("--repair", action="store_true",
                    help="check the named cached models; delete any copy that is corrupt (wrong or changed "
                         "sha256, not a checkpoint) with its record and partial download, and download it again")
    ap.add_argument("--timeout", type=_positive, default=30.0,
                    help="network timeout in seconds for each connect or read (default 30)")
    ap.add_argument("--deadline", type=_positive, default=None,
                    help="give up when one download takes longer than this many seconds in all (default: no "
                         "limit); the partial file is kept for the next run to resume")
    ap.add_argument("--min-rate", type=_non_negative, default=DEFAULT_MIN_RATE,
                    help=f"give up when fewer than this many bytes per second arrive over --stall-window "
                         f"(default {DEFAULT_MIN_RATE:g}; 0 switches the stall detector off)")
    ap.add_argument("--stall-window", type=_positive, default=DEFAULT_STALL_WINDOW,
                    help=f"seconds over which --min-rate is measured (default {DEFAULT_STALL_WINDOW:g})")
    args = ap.parse_args(argv)
    if args.list:
        print(f"cache: {checkpoint_dir()}")
        for entry in iter_registry():
            try:
                state, detail = cache_state(entry)
            except (OSError, WeightsError) as exc:
                state, detail = "unreadable", str(exc)
            print(f"{entry.name:18s} {entry.architecture:10s} {state:10s} {entry.description}")
            if state in ("corrupt", "unreadable"):
                print(f"    {state}: {' '.join(detail.split())}")
                if not entry.bundled:
                    print(f"    fix: {repair_command(entry)}")
            elif state == "partial":
                print(f"    {detail}")
        return 0
    options = dict(timeout=args.timeout, deadline=args.deadline, min_rate=args.min_rate or None,
                   stall_window=args.stall_window)
    try:
        for name in args.names or [DEFAULT_MODEL]:
            if args.repair:
                path, removed = repair(name, progress="auto", **options)
                for p in removed:
                    print(f"{name}: deleted {p}")
                if not removed:
                    print(f"{name}: the cached copy is fine; nothing to repair")
            else:
                path = resolve_checkpoint(name, progress="auto", **options)
            print(f"{name}: {path} ({checksum_status(path, get_weights(name))})")
    except WeightsError as exc:
        print(f"sam3d download: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # anything the messages above did not foresee: still one line, non-zero
        print(f"sam3d download: error: {exc.strerror or exc} ({getattr(exc, 'filename', '') or ''}); check the "
              f"cache folder {checkpoint_dir()} or set ${ENV_HOME} to another folder", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sam3d download: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0
