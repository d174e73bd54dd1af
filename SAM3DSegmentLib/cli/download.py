"""``sam3d download [NAME ...] [--list] [--repair]``: fetch and verify registered checkpoints into the model
cache (:mod:`SAM3DSegmentLib.weights`). Exit status 0 only when every named checkpoint is in the cache and
verified."""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from . import options as O
from .options import CliError
from .runner import command_main

NAME = "download"
HELP = "download and verify published checkpoints"
DESCRIPTION = ("Fetch and verify registered checkpoints into the model cache. Exit status 0 only when every "
               "named checkpoint is in the cache and verified.")


def configure(p) -> None:
    from ..weights import DEFAULT_MIN_RATE, DEFAULT_STALL_WINDOW

    p.add_argument("names", nargs="*", metavar="NAME",
                   help="model names (default: sam-med3d-turbo); see --list")
    p.add_argument("--list", action="store_true",
                   help="list the registered models and the state of their cached copies (hashes them)")
    p.add_argument("--repair", action="store_true",
                   help="check the named cached models; delete any copy that is corrupt (wrong or changed "
                        "sha256, not a checkpoint) with its record and partial download, and download it again")
    p.add_argument("--timeout", type=O.positive_float, default=30.0, metavar="S",
                   help="network timeout in seconds for each connect or read (default 30)")
    p.add_argument("--deadline", type=O.positive_float, default=None, metavar="S",
                   help="give up when one download takes longer than this many seconds in all (default: no "
                        "limit); the partial file is kept for the next run to resume")
    p.add_argument("--min-rate", type=O.non_negative_float, default=DEFAULT_MIN_RATE, metavar="B/S",
                   help=f"give up when fewer than this many bytes per second arrive over --stall-window "
                        f"(default {DEFAULT_MIN_RATE:g}; 0 switches the stall detector off)")
    p.add_argument("--stall-window", type=O.positive_float, default=DEFAULT_STALL_WINDOW, metavar="S",
                   help=f"seconds over which --min-rate is measured (default {DEFAULT_STALL_WINDOW:g})")


def _list(weights) -> int:
    print(f"cache: {weights.checkpoint_dir()}")
    for entry in weights.iter_registry():
        try:
            state, detail = weights.cache_state(entry)
        except (OSError, weights.WeightsError) as exc:
            state, detail = "unreadable", str(exc)
        print(f"{entry.name:18s} {entry.architecture:10s} {state:10s} {entry.description}")
        if state in ("corrupt", "unreadable"):
            print(f"    {state}: {' '.join(detail.split())}")
            if not entry.bundled:
                print(f"    fix: {weights.repair_command(entry)}")
        elif state == "partial":
            print(f"    {detail}")
    return 0


def run(args) -> int:
    from .. import weights

    if args.list:
        return _list(weights)
    options = dict(timeout=args.timeout, deadline=args.deadline, min_rate=args.min_rate or None,
                   stall_window=args.stall_window)
    try:
        for name in args.names or [weights.DEFAULT_MODEL]:
            if args.repair:
                path, removed = weights.repair(name, progress="auto", **options)
                for p in removed:
                    print(f"{name}: deleted {p}")
                if not removed:
                    print(f"{name}: the cached copy is fine; nothing to repair")
            else:
                path = weights.resolve_checkpoint(name, progress="auto", **options)
            print(f"{name}: {path} ({weights.checksum_status(path, weights.get_weights(name))})")
    except OSError as exc:  # anything the library's messages did not foresee: still one line, non-zero
        if isinstance(exc, weights.WeightsError):  # (should the library's error become an OSError)
            raise
        raise CliError(f"{exc.strerror or exc} ({getattr(exc, 'filename', '') or ''}); check the cache folder "
                       f"{weights.checkpoint_dir()} or set ${weights.ENV_HOME} to another folder") from exc
    except KeyboardInterrupt:
        raise KeyboardInterrupt("interrupted; run the same command again to resume") from None
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``sam3d download`` (``argv`` without the sub-command): the same parser, messages and exit statuses."""
    return command_main(sys.modules[__name__], argv)
