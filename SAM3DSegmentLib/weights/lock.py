"""The download lock: one writer per cached file, across processes and threads, never stale."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Union

from .cache import write_error
from .errors import WeightsError, require


class DownloadLock:
    """Exclusive lock on ``path`` shared by processes and threads: a ``filelock.FileLock``.

    It is an OS lock (``flock`` on POSIX, ``msvcrt.locking`` on Windows) that the OS drops when the holder
    dies, so a crashed download never leaves a stale lock behind. Whether the empty lock file is deleted on
    release is filelock's choice (current versions keep it on POSIX: deleting it would let a waiter lock the
    old file while a newcomer locks a new one of the same name); its presence means nothing.
    ``on_wait`` is called once when the lock is busy; after ``timeout`` seconds (None: never) a
    :class:`WeightsError` says what to do.
    """

    def __init__(self, path: Union[str, Path], timeout: Optional[float] = 3600.0, poll: float = 0.05,
                 on_wait: Optional[Callable[[], None]] = None):
        self.path = Path(path)
        self.timeout = timeout
        self.poll = poll
        self.on_wait = on_wait
        self._lock = None

    def acquire(self) -> "DownloadLock":
        filelock = require("filelock", "lock the model cache during a download")
        lock = filelock.FileLock(str(self.path))
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            if self.on_wait is not None:
                self.on_wait()
            try:
                lock.acquire(timeout=-1 if self.timeout is None else self.timeout, poll_interval=self.poll)
            except filelock.Timeout:
                raise WeightsError(
                    f"Timed out after {self.timeout:.0f} s waiting for another download of the same file "
                    f"(lock {self.path}). If no other SAM3DSegment process is running, try again.") from None
        self._lock = lock
        return self

    def release(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

    def __enter__(self) -> "DownloadLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_download(dest: Path, timeout: Optional[float], on_wait: Optional[Callable[[], None]] = None) -> DownloadLock:
    """Create ``dest``'s folder and take the lock on ``<dest>.lock``; a folder that cannot be written (read-only,
    full) raises the one-line :class:`WeightsError` of :func:`~SAM3DSegmentLib.weights.cache.write_error`."""
    lock_path = dest.with_name(dest.name + ".lock")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        return DownloadLock(lock_path, timeout=timeout, on_wait=on_wait).acquire()
    except OSError as exc:
        raise write_error(lock_path if dest.parent.is_dir() else dest.parent, exc) from None
