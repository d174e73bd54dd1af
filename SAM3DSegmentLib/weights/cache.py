"""The per-user cache of downloaded checkpoints: where it is, what is in it, and what to do when it cannot
be used (no network, a full disk, a read-only folder).

``$SAM3D_HOME`` overrides the platform's cache folder (from platformdirs); checkpoints live in its
``checkpoints/`` sub-folder as ``<registry file name>``, with ``<file>.json`` (the checksum record);
``<file>.part`` / ``<file>.part.json`` hold an unfinished download (kept for resuming) and ``<file>.lock`` is the
download lock (filelock may leave it, empty, after the download).
"""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import List, Optional

from .errors import WeightsError, require
from .progress import fmt_bytes
from .registry import ENV_BASE_URL, REGISTRY, ModelWeights, check_plain_filename, get_weights
from .verify import SIDECAR_SUFFIX, check_cached, checksum_status

ENV_HOME = "SAM3D_HOME"
APP_DIR_NAME = "sam3dsegment"


def cache_dir() -> Path:
    """The per-user cache root (not created here).

    ``$SAM3D_HOME`` if set; else the user cache folder that platformdirs gives: on Linux/BSD
    ``$XDG_CACHE_HOME/sam3dsegment`` (default ``~/.cache/sam3dsegment``), on macOS
    ``~/Library/Caches/sam3dsegment``, on Windows ``<Local AppData>\\sam3dsegment\\Cache``.
    """
    env = os.environ.get(ENV_HOME, "").strip()
    if env:
        return Path(env).expanduser()
    platformdirs = require("platformdirs", f"find the model cache folder (or set ${ENV_HOME})")
    return platformdirs.PlatformDirs(APP_DIR_NAME, appauthor=False).user_cache_path


def checkpoint_dir() -> Path:
    """Folder of downloaded checkpoints: ``cache_dir() / "checkpoints"``."""
    return cache_dir() / "checkpoints"


def cache_target(entry: ModelWeights) -> Path:
    """``checkpoint_dir() / entry.filename``, re-checked here because :data:`REGISTRY` can be edited directly."""
    check_plain_filename(entry.name, entry.filename)
    return checkpoint_dir() / entry.filename


def cached_path(name: str) -> Path:
    """Where the registered checkpoint ``name`` is (or would be) cached; the bundled file for ``"demo"``."""
    entry = get_weights(name)
    if entry.bundled:
        path = entry.bundled_path()
        assert path is not None
        return path
    return cache_target(entry)


def offline_help(url: Optional[str], filename: str, cache_path: Optional[Path] = None) -> str:
    """How to proceed without a working download: what to pass and where to put the file."""
    target = cache_path if cache_path is not None else checkpoint_dir() / filename
    lines = ["How to continue without downloading:"]
    if url:
        lines.append(f"  - fetch the file on a machine with internet access: {url}")
    lines += [
        f"  - command line: pass the local file with --checkpoint PATH (e.g. --checkpoint /data/{filename})",
        '  - 3D Slicer: choose the file in the SAM3DSegment module\'s "Checkpoint file" field',
        f"  - or copy it to {target} ; it is picked up there automatically "
        f"(the cache folder moves with ${ENV_HOME})",
        f"  - or point ${ENV_BASE_URL} at a mirror that serves {filename}",
    ]
    return "\n".join(lines)


def write_error(path: Path, exc: OSError, freed: Optional[int] = None) -> WeightsError:
    """One line: what could not be written, why, what was cleaned up, and what to do."""
    folder = path if path.is_dir() else path.parent
    code = errno.errorcode.get(exc.errno or 0, "")
    why = (exc.strerror or str(exc)) + (f" [{code}]" if code else "")
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        fix = (f"free space on the disk holding {folder}, or set ${ENV_HOME} to a folder on a disk with room, "
               "then run the command again")
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = (f"set ${ENV_HOME} to a writable folder, or pass a local checkpoint file with --checkpoint PATH "
               "(3D Slicer: \"Checkpoint file\")")
    else:
        fix = f"check the folder {folder}, or set ${ENV_HOME} to another folder"
    deleted = f" The partial download ({fmt_bytes(freed)}) was deleted." if freed else ""
    return WeightsError(f"Cannot write {path} in the model cache: {why}.{deleted} To continue, {fix}.")


def cache_state(entry: ModelWeights) -> tuple:
    """``(state, detail)`` of a registered model's cached copy, checked now (the file is hashed).

    ``state`` is one of ``"bundled"``, ``"absent"``, ``"partial"``, ``"verified"`` (matches the
    published sha256), ``"unverified"`` (no published sha256: the content is a SAM-Med3D-family
    checkpoint and matches its first-use record, if any) or ``"corrupt"`` (``detail`` says why and how
    to repair). Nothing is written.
    """
    if entry.bundled:
        path = entry.bundled_path()
        return ("bundled", str(path)) if path is not None and path.is_file() else ("absent", "not in this build")
    target = cache_target(entry)
    part = target.with_name(target.name + ".part")
    if not target.exists():
        if part.is_file():
            return "partial", (f"{fmt_bytes(part.stat().st_size)} of an interrupted download in {part}; "
                               f"`sam3d download {entry.name}` resumes it")
        return "absent", ""
    if not target.is_file():
        return "corrupt", f"{target} is not a regular file; remove it, then run `sam3d download {entry.name}`"
    problem, _, rec = check_cached(target, entry)
    if problem:
        return "corrupt", problem[0]
    if entry.sha256:
        return "verified", "sha256 matches the published value"
    if rec and rec.get("sha256"):
        return "unverified", (f"no published sha256; matches the sha256 recorded at first use on "
                              f"{rec.get('recorded', '?')}")
    return "unverified", "no published sha256; its sha256 is recorded on first load"


def list_cache() -> List[dict]:
    """Files in :func:`checkpoint_dir` (checkpoints, partial downloads), with size and checksum state."""
    folder = checkpoint_dir()
    by_file = {e.filename: e for e in REGISTRY.values() if not e.bundled}
    rows: List[dict] = []
    if not folder.is_dir():
        return rows
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.endswith((SIDECAR_SUFFIX, ".lock")) or p.name.startswith("."):
            continue
        entry = by_file.get(p.name)
        if p.name.endswith(".part"):
            status = "partial download (resumed on next use)"
        else:
            status = checksum_status(p, entry)
        rows.append({"path": p, "name": entry.name if entry else None, "size": p.stat().st_size,
                     "status": status})
    return rows
