"""Atomic file writes: a reader (or a crash, or a full disk) sees the complete new file or the old one.

Every file the library writes goes through :func:`atomic_write`: the content is written to a temporary
file in the destination folder (same extension, so format-sniffing writers such as SimpleITK pick the
right format), flushed to disk, given the permissions a plain ``open()`` would have, renamed over the
target, and the folder entry is synced. On any failure the temporary is removed and the target untouched.
"""
from __future__ import annotations

import json
import os
import stat
import tempfile
from typing import Any, Callable, Optional

__all__ = ["atomic_write", "write_json", "path_extension"]

_umask: Optional[int] = None


def path_extension(path: str) -> str:
    """Every suffix of the file name (``.nii.gz``, ``.seg.nrrd``, ``.pt``; ``""`` without a dot)."""
    name = os.path.basename(os.fspath(path))
    dot = name.find(".", 1)
    return name[dot:] if dot > 0 else ""


def _new_file_mode() -> int:
    global _umask
    if _umask is None:  # read once: os.umask can only be read by setting it
        _umask = os.umask(0o022)
        os.umask(_umask)
    return 0o666 & ~_umask


def atomic_write(path, write: Callable[[str], None], make_dirs: bool = False) -> str:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then atomically replace ``path``.

    ``make_dirs`` creates missing parent folders; otherwise a missing folder is a ``FileNotFoundError``
    naming it. An existing target keeps its permissions; a new one gets the umask default. Returns the
    absolute path.
    """
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    if make_dirs:
        os.makedirs(folder, exist_ok=True)
    elif not os.path.isdir(folder):
        raise FileNotFoundError(f"{path}: the folder {folder} does not exist; create it first")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder; give a file name")
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = _new_file_mode()
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path)[:40] + ".",
                               suffix=".tmp" + path_extension(path)[-20:], dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename durable too (best effort: not every platform can open a folder)
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def write_json(path, data: Any, indent: Optional[int] = 2, sort_keys: bool = False,
               make_dirs: bool = False) -> str:
    """Atomically write ``data`` as JSON (UTF-8, trailing newline; non-JSON values via ``str``)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=indent, sort_keys=sort_keys, default=str)
            f.write("\n")

    return atomic_write(path, write, make_dirs=make_dirs)
