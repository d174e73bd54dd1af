"""Atomic file writes: a reader (or a crash, or a full disk) sees the complete new file or the old one.

Every file the library writes goes through :func:`atomic_write`: the content is written to a temporary
file in the destination folder (same extension, so format-sniffing writers such as SimpleITK pick the
right format), flushed to disk, checked, given the permissions a plain ``open()`` would have, renamed over
the target, and the folder entry is synced. On any failure the temporary is removed and the target untouched.

* **Checked before the rename.** Some writers report a short write only on stderr and return normally
  (SimpleITK's NIfTI writer on a full disk prints ``wrote only 4096 of 163840 bytes``). So a file whose
  name ends in ``.nii`` / ``.nii.gz`` is always read back first: the header must parse and the file
  (decompressed, CRC-checked for ``.nii.gz``) must hold every byte its header promises. Callers can add
  their own ``verify(tmp_path)``. A failed check raises :class:`IncompleteWriteError` and keeps the old file.
* **Symlinks are written through.** When the target is a symbolic link, the file it points to is replaced
  (the temporary is created beside that file); the link itself stays a link.
* **Several files together.** :class:`AtomicGroup` stages files and puts them all in place, or none of
  them (an earlier rename is rolled back from a hard-linked backup when a later one fails).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import stat
import tempfile
import uuid
from typing import Any, Callable, List, Optional, Tuple

import numpy as np

from .nifti import verify_nifti_written

__all__ = ["atomic_write", "write_json", "write_text", "json_safe", "path_extension", "resolve_target", "IncompleteWriteError",
           "AtomicGroup", "StagedFile"]

_umask: Optional[int] = None

Verify = Callable[[str], None]


class IncompleteWriteError(OSError):
    """The writer returned, but the file it produced is short or unreadable (full disk, quota, I/O error)."""


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


def resolve_target(path) -> str:
    """The absolute file a write to ``path`` replaces: ``path`` itself, or where its symlink(s) point."""
    path = os.path.abspath(os.fspath(path))
    return os.path.realpath(path) if os.path.islink(path) else path


def _builtin_verifier(path: str) -> Optional[Verify]:
    name = os.path.basename(path).lower()
    if name.endswith(".nii") or name.endswith(".nii.gz"):
        return verify_nifti_written
    return None


def _free_space(folder: str) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "unknown"
    return f"{free / 2**20:.1f} MiB" if free >= 2**20 else f"{free} bytes"


class StagedFile:
    """A complete, checked temporary file beside its target, waiting for :meth:`commit` (or :meth:`discard`)."""

    def __init__(self, path: str, target: str, tmp: str):
        self.path = path        #: the path the caller asked for (may be a symlink)
        self.target = target    #: the regular file that gets replaced
        self.tmp = tmp

    def commit(self) -> str:
        """Rename the temporary over the target and sync the folder. Returns the requested path."""
        try:
            os.replace(self.tmp, self.target)
        except BaseException:
            self.discard()
            raise
        self.tmp = None
        _sync_folder(os.path.dirname(self.target))
        return self.path

    def discard(self) -> None:
        """Remove the temporary (the target is untouched)."""
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except OSError:
                pass
            self.tmp = None


def _sync_folder(folder: str) -> None:
    try:  # make the rename durable too (best effort: not every platform can open a folder)
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def stage(path, write: Callable[[str], None], make_dirs: bool = False,
          verify: Optional[Verify] = None) -> StagedFile:
    """Write, fsync and check a temporary beside ``path``'s target; nothing is replaced yet.

    See :func:`atomic_write` for the arguments and the errors.
    """
    path = os.path.abspath(os.fspath(path))
    target = resolve_target(path)
    folder = os.path.dirname(target)
    if make_dirs:
        os.makedirs(folder, exist_ok=True)
    elif not os.path.isdir(folder):
        raise FileNotFoundError(f"{path}: the folder {folder} does not exist; create it first")
    if os.path.isdir(target):
        raise IsADirectoryError(f"{path} is a folder; give a file name")
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
        existed = True
    except FileNotFoundError:
        mode = _new_file_mode()
        existed = False
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(target)[:40] + ".",
                               suffix=".tmp" + path_extension(target)[-20:], dir=folder)
    os.close(fd)
    checks = [c for c in (_builtin_verifier(target), verify) if c is not None]
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        for check in checks:
            try:
                check(tmp)
            except Exception as err:  # noqa: BLE001 - any failed check means the file is not what was asked
                kept = "the previous file is kept" if existed else "nothing was written"
                raise IncompleteWriteError(
                    f"{path}: the file written is incomplete or unreadable ({' '.join(str(err).split())}); "
                    f"{kept}. Is the disk full ({_free_space(folder)} free in {folder})? Free some space or "
                    "write somewhere else") from err
        os.chmod(tmp, mode)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return StagedFile(path, target, tmp)


def atomic_write(path, write: Callable[[str], None], make_dirs: bool = False,
                 verify: Optional[Verify] = None, group: Optional["AtomicGroup"] = None) -> str:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, check it, then atomically replace ``path``.

    ``make_dirs`` creates missing parent folders; otherwise a missing folder is a ``FileNotFoundError``
    naming it. An existing target keeps its permissions; a new one gets the umask default. A symlink
    ``path`` is written through (its target is replaced). ``verify(tmp_path)`` may raise to reject the
    written file; NIfTI files are always checked (see the module docstring); a rejected file raises
    :class:`IncompleteWriteError`. With ``group`` the file is only staged: it is put in place by the
    group's :meth:`AtomicGroup.commit`. Returns the absolute path.
    """
    staged = stage(path, write, make_dirs=make_dirs, verify=verify)
    if group is not None:
        group.add(staged)
        return staged.path
    return staged.commit()


class AtomicGroup:
    """Files that are put in place all together or not at all.

    ``with AtomicGroup() as g: atomic_write(a, ..., group=g); write_json(b, ..., group=g)`` stages every
    file first (a failed write or check discards them all, nothing replaced), then commits them in order
    on leaving the block. If a rename fails, the files already renamed are restored from hard-linked
    backups (or removed if they did not exist before), so the targets keep their old contents.
    """

    def __init__(self) -> None:
        self._staged: List[StagedFile] = []

    def add(self, staged: StagedFile) -> None:
        if any(s.target == staged.target for s in self._staged):
            staged.discard()
            self.discard()
            raise ValueError(f"{staged.path}: written twice in one group (same file as an earlier output)")
        self._staged.append(staged)

    def discard(self) -> None:
        for s in self._staged:
            s.discard()
        self._staged = []

    def commit(self) -> List[str]:
        staged, self._staged = self._staged, []
        done: List[Tuple[StagedFile, Optional[str]]] = []
        backups: List[str] = []
        try:
            for s in staged:
                backup = _backup(s.target) if os.path.lexists(s.target) else None
                if backup:
                    backups.append(backup)
                os.replace(s.tmp, s.target)
                s.tmp = None
                done.append((s, backup))
        except BaseException:
            for s, backup in reversed(done):
                try:
                    if backup:
                        os.replace(backup, s.target)
                        backups.remove(backup)
                    else:
                        os.unlink(s.target)
                except OSError:
                    pass
            for s in staged:
                s.discard()
            raise
        finally:
            for b in backups:
                try:
                    os.unlink(b)
                except OSError:
                    pass
        for folder in sorted({os.path.dirname(s.target) for s in staged}):
            _sync_folder(folder)
        return [s.path for s in staged]

    def __enter__(self) -> "AtomicGroup":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def _backup(target: str) -> str:
    """A second name for ``target``'s current content (hard link; a copy where links are unsupported)."""
    backup = os.path.join(os.path.dirname(target), f".{os.path.basename(target)[:40]}.{uuid.uuid4().hex[:12]}.bak")
    try:
        os.link(target, backup)
    except OSError:
        shutil.copy2(target, backup)
    return backup


def json_safe(obj: Any) -> Any:
    """``obj`` with numpy scalars as Python numbers, tuples as lists, dict keys as strings, and NaN / infinity
    as None (JSON has no NaN; ``json.dump`` would write the invalid token ``NaN``)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def write_text(path, text: str, make_dirs: bool = False, group: Optional[AtomicGroup] = None) -> str:
    """Atomically write ``text`` (UTF-8, line endings as given)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)

    return atomic_write(path, write, make_dirs=make_dirs, group=group)


def write_json(path, data: Any, indent: Optional[int] = 2, sort_keys: bool = False,
               make_dirs: bool = False, group: Optional[AtomicGroup] = None) -> str:
    """Atomically write ``data`` as JSON (UTF-8, trailing newline) after :func:`json_safe` (NaN -> null);
    other non-JSON values are written as their ``str``."""
    text = json.dumps(json_safe(data), indent=indent, sort_keys=sort_keys, default=str, allow_nan=False)
    return write_text(path, text + "\n", make_dirs=make_dirs, group=group)
