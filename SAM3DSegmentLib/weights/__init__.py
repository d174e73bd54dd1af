"""Named model weights: a registry of known checkpoints, a per-user cache, and a resumable download.

Nothing here imports torch: this module only finds, fetches and checks files.

* :data:`REGISTRY` maps short names (``"sam-med3d-turbo"``, ``"sam-med3d"``, ``"demo"``) to
  :class:`ModelWeights` records: file name, URL, expected size and sha256 where published, architecture,
  licence and a one-line description.
* :func:`cache_dir` is where downloaded files live (``$SAM3D_HOME`` overrides the platform default);
  checkpoints go to ``cache_dir() / "checkpoints"``.
* :func:`resolve_checkpoint` turns a name or a path into a local file, downloading on first use.
* :func:`download` streams a URL into ``dest + ".part"`` with ``urllib`` only, resumes an interrupted
  transfer with an HTTP ``Range`` request, checks size and sha256, and renames the finished file into
  place atomically. A lock file (an OS advisory lock) keeps two processes or threads from writing the same
  file at once.

Checksums: a published sha256 is always enforced. Where none is published, the content must first look
like a SAM-Med3D-family ``torch.save`` file (:func:`payload_problem`, read without torch: an HTML page from
a captive portal is refused); then the sha256 of the first complete download is recorded in ``<file>.json``
next to the cached file (trust on first use) and every later load is checked against both.
``sam3d download --repair NAME`` (:func:`repair`) deletes a copy that fails these checks and fetches it
again; ``sam3d download --list`` shows each copy as verified, unverified, corrupt or partial.

Registered names always mean the cache: a file called ``sam-med3d`` in the current folder is not picked
up in its place. Registry file names must be plain file names (nothing outside the cache folder).

Downloads are bounded: a socket timeout per read, a stall detector (minimum rate over a window) and an
optional overall deadline; a stopped transfer keeps its ``.part`` for resuming (the message says where
and how big). A full disk or read-only cache ends in one line naming the folder and the fix, and the
unfinished ``.part`` is deleted.

Environment:

``SAM3D_HOME``
    cache directory (the checkpoints live in its ``checkpoints/`` sub-folder).
``SAM3D_WEIGHTS_BASE_URL``
    mirror for the registered files: ``<base>/<file name>`` is fetched instead of the published URL
    (offline sites, tests).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import http.client
import json
import logging
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Union

from ..core.atomic import write_json

logger = logging.getLogger(__name__)

ENV_HOME = "SAM3D_HOME"
ENV_BASE_URL = "SAM3D_WEIGHTS_BASE_URL"
HF_REPO = "blueyo0/SAM-Med3D"
HF_BASE_URL = f"https://huggingface.co/{HF_REPO}/resolve/main"
DEFAULT_MODEL = "sam-med3d-turbo"
APP_DIR_NAME = "sam3dsegment"
SIDECAR_SUFFIX = ".json"
USER_AGENT = "SAM3DSegment-weights/1"

#: ``progress(bytes_done, bytes_total_or_None)``
ProgressCallback = Callable[[int, Optional[int]], None]
#: What the ``progress`` argument accepts: a callback, ``True``/``"text"`` for a text bar on stderr,
#: ``"auto"`` for a text bar only when stderr is a terminal, ``None``/``False`` for silence.
ProgressArg = Union[ProgressCallback, bool, str, None]


class WeightsError(RuntimeError):
    """A checkpoint could not be found, fetched or trusted. The message says what to do instead."""


class ChecksumError(WeightsError):
    """A file's sha256 (or size) is not the expected one."""

    def __init__(self, message: str, expected: Optional[str] = None, actual: Optional[str] = None):
        super().__init__(message)
        self.expected = expected
        self.actual = actual


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelWeights:
    """One named checkpoint.

    ``size`` (bytes) and ``sha256`` are None where no exact published value is known; then the file is
    checked trust-on-first-use (see the module docstring). ``size_hint`` is the rounded size shown by
    the host, for messages only. ``url`` is None for files shipped inside the package (``bundled``).
    """

    name: str
    filename: str
    url: Optional[str]
    size: Optional[int]
    sha256: Optional[str]
    architecture: str
    license: str
    description: str
    bundled: bool = False
    clinical_use: bool = False
    size_hint: Optional[str] = None
    checksum_source: Optional[str] = None
    notes: str = ""

    def __post_init__(self) -> None:
        _check_plain_filename(self.name, self.filename)

    def download_url(self) -> Optional[str]:
        """The URL actually fetched: ``$SAM3D_WEIGHTS_BASE_URL/<filename>`` if that is set, else ``url``."""
        if self.bundled or self.url is None:
            return None
        base = os.environ.get(ENV_BASE_URL, "").strip()
        if base:
            return base.rstrip("/") + "/" + self.filename
        return self.url

    def bundled_path(self) -> Optional[Path]:
        """Where a bundled file lies inside the installed package (it may be absent from a build)."""
        if not self.bundled:
            return None
        return Path(__file__).resolve().parents[1] / "resources" / self.filename


def _check_plain_filename(name: str, filename: str) -> None:
    """A registry file name must name a file directly inside the cache (or resources) folder."""
    bad = (not isinstance(filename, str) or not filename or filename in (".", "..") or filename.startswith(".")
           or "/" in filename or "\\" in filename or "\0" in filename or ":" in filename
           or os.path.isabs(filename) or Path(filename).name != filename)
    if bad:
        raise WeightsError(f"Registry entry {name!r} has the file name {filename!r}, which is not a plain file "
                           "name (it would point outside the cache folder); use a name such as 'model.pth'.")


_HF_LICENSE = "Apache-2.0 (uni-medical/SAM-Med3D)"
_NOT_CLINICAL = "Research use only; not a medical device."

REGISTRY: Dict[str, ModelWeights] = {}


def register_weights(entry: ModelWeights, *, replace: bool = False) -> ModelWeights:
    """Add ``entry`` to :data:`REGISTRY` (for extensions and tests). Names are case-insensitive."""
    key = entry.name.lower()
    if key in REGISTRY and not replace:
        raise WeightsError(f"A checkpoint named {entry.name!r} is already registered; pass replace=True "
                           "to override it.")
    REGISTRY[key] = entry
    return entry


register_weights(ModelWeights(
    name="sam-med3d-turbo",
    filename="sam_med3d_turbo.pth",
    url=f"{HF_BASE_URL}/sam_med3d_turbo.pth",
    size=None,  # the host shows "402 MB" only; the exact byte count is not published on the file page
    size_hint="402 MB",
    # Git LFS SHA256 shown on https://huggingface.co/blueyo0/SAM-Med3D/blob/main/sam_med3d_turbo.pth
    # (revision 07f6f69, "Update SAM-Med3D ckpt with new Torch Version", 2024-09-07).
    sha256="899a46d04d3b70f723282ceb489149373558bf0aaba389a346f5ab57da5cdd3c",
    checksum_source="https://huggingface.co/blueyo0/SAM-Med3D/blob/main/sam_med3d_turbo.pth (Git LFS details)",
    architecture="vit_b_ori",
    license=_HF_LICENSE,
    description="SAM-Med3D-turbo: SAM-Med3D fine-tuned on 44 datasets; the recommended general model.",
    notes=_NOT_CLINICAL,
))

register_weights(ModelWeights(
    name="sam-med3d",
    filename="sam_med3d.pth",
    url=f"{HF_BASE_URL}/sam_med3d.pth",
    size=None,
    sha256=None,  # no published checksum found: trust on first use
    architecture="vit_b_ori",
    license=_HF_LICENSE,
    description="SAM-Med3D: the original release trained on SA-Med3D (131K masks, 247 categories).",
    notes=_NOT_CLINICAL + " This file was not in the Hugging Face repository's file listing we could "
          "see; if the URL answers 404, fetch the checkpoint from the links in the SAM-Med3D README "
          "and pass it as a local file.",
))

register_weights(ModelWeights(
    name="demo",
    filename="demo_model.pt",
    url=None,
    size=None,
    sha256=None,
    architecture="tiny",  # our own checkpoint format: the file stores its SamMed3DConfig
    license="Apache-2.0 (SAM3DSegment)",
    description="Small embedded demo model shipped in the package (local, bundled); for trying the tools "
                "only - NOT for clinical use.",
    bundled=True,
    notes="Bundled with the package at SAM3DSegmentLib/resources/demo_model.pt; never downloaded.",
))


def get_weights(name: str) -> ModelWeights:
    """The registry entry for ``name`` (case-insensitive) or a :class:`WeightsError` listing the names."""
    try:
        return REGISTRY[name.lower()]
    except KeyError:
        raise WeightsError(f"Unknown model name {name!r}. Known names: {', '.join(known_names())}. "
                           "To use your own file pass its path instead (CLI: --checkpoint PATH).") from None


def known_names() -> List[str]:
    return sorted(REGISTRY)


# --------------------------------------------------------------------------------------------------
# Cache directory
# --------------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """The per-user cache root (not created here).

    ``$SAM3D_HOME`` if set; else Linux/BSD ``$XDG_CACHE_HOME/sam3dsegment`` (default
    ``~/.cache/sam3dsegment``), macOS ``~/Library/Caches/sam3dsegment``, Windows
    ``%LOCALAPPDATA%\\sam3dsegment\\Cache``.
    """
    env = os.environ.get(ENV_HOME, "").strip()
    if env:
        return Path(env).expanduser()
    home = Path.home()
    if sys.platform.startswith("win"):
        base = os.environ.get("LOCALAPPDATA", "").strip()
        root = Path(base) if base else home / "AppData" / "Local"
        return root / APP_DIR_NAME / "Cache"
    if sys.platform == "darwin":
        return home / "Library" / "Caches" / APP_DIR_NAME
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    # The XDG spec says relative paths are invalid and must be ignored.
    root = Path(xdg) if xdg and os.path.isabs(xdg) else home / ".cache"
    return root / APP_DIR_NAME


def checkpoint_dir() -> Path:
    """Folder of downloaded checkpoints: ``cache_dir() / "checkpoints"``."""
    return cache_dir() / "checkpoints"


def cached_path(name: str) -> Path:
    """Where the registered checkpoint ``name`` is (or would be) cached."""
    entry = get_weights(name)
    if entry.bundled:
        path = entry.bundled_path()
        assert path is not None
        return path
    return _cache_target(entry)


def _cache_target(entry: ModelWeights) -> Path:
    """``checkpoint_dir() / entry.filename``, re-checked here because :data:`REGISTRY` can be edited directly."""
    _check_plain_filename(entry.name, entry.filename)
    return checkpoint_dir() / entry.filename


def sidecar_path(path: Union[str, Path]) -> Path:
    """The checksum record kept next to a cached file: ``<file>.json``."""
    p = Path(path)
    return p.with_name(p.name + SIDECAR_SUFFIX)


# --------------------------------------------------------------------------------------------------
# Small file helpers
# --------------------------------------------------------------------------------------------------

def sha256_file(path: Union[str, Path], chunk_size: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_size), b""):
            h.update(block)
    return h.hexdigest()


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _write_json_atomic(path: Path, data: dict) -> None:
    write_json(path, data, sort_keys=True)


def _read_json(path: Path) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _unlink_quiet(*paths: Path) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


def _fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


# --------------------------------------------------------------------------------------------------
# Progress display
# --------------------------------------------------------------------------------------------------

class TextProgress:
    """A progress bar on ``stream`` (stderr): tqdm when installed, else a plain one-line bar.

    Call it as ``progress(done, total)``; call :meth:`close` at the end.
    """

    def __init__(self, description: str = "download", stream=None, min_interval: float = 0.2):
        self.description = description
        self.stream = stream if stream is not None else sys.stderr
        self.min_interval = min_interval
        self._last = 0.0
        self._tqdm = None
        self._tqdm_n = 0
        self._closed = False
        try:  # optional dependency
            import tqdm  # noqa: F401
            self._have_tqdm = True
        except Exception:
            self._have_tqdm = False

    def __call__(self, done: int, total: Optional[int]) -> None:
        if self._closed:
            return
        if self._have_tqdm:
            if self._tqdm is None:
                from tqdm import tqdm

                self._tqdm = tqdm(total=total, initial=done, unit="B", unit_scale=True, unit_divisor=1024,
                                  desc=self.description, file=self.stream, leave=True)
                self._tqdm_n = done
            else:
                if done < self._tqdm_n:  # restarted from zero
                    self._tqdm.reset(total=total)
                    self._tqdm_n = 0
                self._tqdm.update(done - self._tqdm_n)
                self._tqdm_n = done
            return
        now = time.monotonic()
        finished = total is not None and done >= total
        if not finished and now - self._last < self.min_interval:
            return
        self._last = now
        if total:
            frac = min(1.0, done / total)
            width = 30
            bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
            text = f"\r{self.description}: [{bar}] {frac * 100:5.1f}% {_fmt_bytes(done)} / {_fmt_bytes(total)}"
        else:
            text = f"\r{self.description}: {_fmt_bytes(done)}"
        with contextlib.suppress(Exception):
            self.stream.write(text)
            self.stream.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._tqdm is not None:
            self._tqdm.close()
        elif not self._have_tqdm:
            with contextlib.suppress(Exception):
                self.stream.write("\n")
                self.stream.flush()


def _make_progress(progress: ProgressArg, description: str):
    """Returns ``(callback or None, closer)``."""
    if progress is None or progress is False:
        return None, lambda: None
    if callable(progress):
        return progress, lambda: None
    if progress == "auto":
        stream = sys.stderr
        try:
            interactive = stream is not None and stream.isatty()
        except Exception:
            interactive = False
        if not interactive:
            return None, lambda: None
    elif progress not in (True, "text"):
        raise ValueError(f"progress must be a callable, True, 'text', 'auto', False or None, not {progress!r}")
    bar = TextProgress(description)
    return bar, bar.close


# --------------------------------------------------------------------------------------------------
# Lock: an OS advisory lock on "<dest>.lock" (released by the OS if the process dies, so never stale)
# --------------------------------------------------------------------------------------------------

class DownloadLock:
    """Exclusive lock on ``path`` shared by processes and threads.

    POSIX: ``fcntl.flock`` on a file opened by this object (threads that open it separately exclude each
    other too). After locking, the file's inode is compared with the path's so that a lock file removed
    by the previous holder is not mistaken for the live one. Windows: ``msvcrt.locking`` on byte 0. The
    OS drops the lock when the holder dies, so a crashed download never leaves a stale lock behind.
    """

    def __init__(self, path: Union[str, Path], timeout: Optional[float] = 3600.0, poll: float = 0.05,
                 on_wait: Optional[Callable[[], None]] = None):
        self.path = Path(path)
        self.timeout = timeout
        self.poll = poll
        self.on_wait = on_wait
        self._fd: Optional[int] = None

    def _try_lock(self, fd: int) -> bool:
        if os.name == "nt":
            import msvcrt

            try:
                os.lseek(fd, 0, os.SEEK_SET)
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
                return True
            except OSError:
                return False
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            return False

    def acquire(self) -> "DownloadLock":
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        waited = False
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if self._try_lock(fd):
                if os.name == "nt":
                    self._fd = fd
                    return self
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    self._fd = fd
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, 0)
                        os.write(fd, f"{os.getpid()} {socket.gethostname()} {_utc_now()}\n".encode())
                    return self
            os.close(fd)
            if not waited:
                waited = True
                if self.on_wait is not None:
                    self.on_wait()
            if deadline is not None and time.monotonic() > deadline:
                raise WeightsError(
                    f"Timed out after {self.timeout:.0f} s waiting for another download of the same file "
                    f"(lock {self.path}). If no other SAM3DSegment process is running, try again.")
            time.sleep(self.poll)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if os.name == "nt":
            import msvcrt

            with contextlib.suppress(OSError):
                os.lseek(fd, 0, os.SEEK_SET)
                msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
            os.close(fd)
            return
        # Remove the lock file while still holding the lock; waiters notice the inode change and retry.
        _unlink_quiet(self.path)
        os.close(fd)

    def __enter__(self) -> "DownloadLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# --------------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------------

@dataclass
class DownloadResult:
    """What :func:`download` did. ``resumed_from``: byte offsets at which transfers were resumed;
    ``restarts``: times a partial file was discarded (server ignored Range, remote file changed);
    ``already_present``: ``dest`` existed (for example another process finished it) and nothing was fetched.
    """

    path: Path
    size: int
    sha256: str
    resumed_from: List[int] = field(default_factory=list)
    restarts: int = 0
    requests: int = 0
    already_present: bool = False


class _Interrupted(Exception):
    """The body stopped before its end; the .part file keeps what arrived."""


class _WriteFailed(Exception):
    """Writing into the cache folder failed (disk full, read-only, ...); carries the OSError."""

    def __init__(self, path: Path, error: OSError):
        super().__init__(str(error))
        self.path = path
        self.error = error


#: Defaults of the stall detector: a transfer slower than ``DEFAULT_MIN_RATE`` bytes/s over
#: ``DEFAULT_STALL_WINDOW`` seconds is abandoned (a socket timeout alone never fires on a trickle).
DEFAULT_MIN_RATE = 1024.0
DEFAULT_STALL_WINDOW = 60.0


class _Watchdog:
    """Enforces an overall deadline and a minimum transfer rate on one :func:`download` call.

    A helper thread samples the byte count; when the deadline passes, or fewer than ``min_rate *
    window`` bytes arrived in the last ``window`` seconds, it records why in :attr:`reason` and shuts
    the connection's sockets down, so that a read blocked on a trickling server returns at once.
    Sockets are registered by the connection classes below through a thread-local.
    """

    def __init__(self, deadline: Optional[float], min_rate: Optional[float], window: float,
                 poll: float = 0.05):
        self.deadline = deadline
        self.min_rate = min_rate if min_rate and min_rate > 0 else None
        self.window = max(float(window), poll)
        self.poll = poll
        self.start = time.monotonic()
        self.received = 0
        self.reason: Optional[str] = None
        self._samples: List[tuple] = [(self.start, 0)]
        self._sockets: List[socket.socket] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "_Watchdog":
        _tracking.watchdog = self
        if self.deadline is not None or self.min_rate is not None:
            self._thread = threading.Thread(target=self._run, name="sam3d-download-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        _tracking.watchdog = None
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def add(self, nbytes: int) -> None:
        self.received += nbytes

    def new_request(self) -> None:
        """A new request restarts the stall window (connecting is bounded by the socket timeout)."""
        with self._lock:
            self._samples = [(time.monotonic(), self.received)]
            self._sockets = [s for s in self._sockets if s.fileno() != -1]

    def track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            aborted = self.reason is not None
        if aborted:
            self._shutdown(sock)

    @staticmethod
    def _shutdown(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    def _abort(self, reason: str) -> None:
        with self._lock:
            if self.reason is None:
                self.reason = reason
            sockets = list(self._sockets)
        for sock in sockets:
            self._shutdown(sock)

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            now = time.monotonic()
            if self.deadline is not None and now - self.start > self.deadline:
                self._abort("deadline")
                return
            if self.min_rate is None:
                continue
            with self._lock:
                self._samples.append((now, self.received))
                while len(self._samples) > 2 and self._samples[1][0] <= now - self.window:
                    self._samples.pop(0)
                first_t, first_n = self._samples[0]
            if now - first_t >= self.window and self.received - first_n < self.min_rate * self.window:
                self._abort("stalled")
                return

    def describe(self) -> str:
        if self.reason == "deadline":
            return f"it did not finish within the overall deadline of {self.deadline:g} s (--deadline)"
        return (f"it stalled: fewer than {self.min_rate:g} bytes/s arrived over {self.window:g} s "
                "(--min-rate, --stall-window)")


_tracking = threading.local()


def _track_socket(sock) -> None:
    watchdog = getattr(_tracking, "watchdog", None)
    if watchdog is not None and sock is not None:
        watchdog.track(sock)


class _TrackedHTTPConnection(http.client.HTTPConnection):
    def connect(self):
        super().connect()
        _track_socket(self.sock)


class _TrackedHTTPSConnection(http.client.HTTPSConnection):
    def connect(self):
        super().connect()
        _track_socket(self.sock)


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_TrackedHTTPConnection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(_TrackedHTTPSConnection, req, context=getattr(self, "_context", None))


def _open_url(request: urllib.request.Request, timeout: float):
    """``urlopen`` with a fresh opener so proxy settings are read from the environment at each call; its
    connections register their sockets with the running :class:`_Watchdog`."""
    return urllib.request.build_opener(_HTTPHandler, _HTTPSHandler).open(request, timeout=timeout)


_urlopen = _open_url  # tests patch this to simulate failures that loopback cannot produce (DNS)


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


def _describe_url_error(err: BaseException) -> str:
    reason = getattr(err, "reason", err)
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused (no server answering; are you offline or behind a proxy?)"
    if isinstance(reason, socket.gaierror):
        return f"host name could not be resolved (offline or DNS failure: {reason})"
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return "the connection timed out"
    return f"{type(reason).__name__}: {reason}"


def _parse_content_range(value: Optional[str]):
    """``"bytes 100-199/1000"`` -> ``(100, 199, 1000)``; total None for ``*``; None when unparseable."""
    if not value:
        return None
    try:
        unit, rest = value.strip().split(" ", 1)
        if unit.lower() != "bytes":
            return None
        span, total = rest.split("/", 1)
        start, end = span.split("-", 1)
        return int(start), int(end), (None if total.strip() == "*" else int(total))
    except ValueError:
        return None


def download(url: str, dest: Union[str, Path], expected_size: Optional[int] = None,
             sha256: Optional[str] = None, progress: ProgressArg = None, timeout: float = 30.0, *,
             retries: int = 3, lock_timeout: Optional[float] = 3600.0, chunk_size: int = 1 << 16,
             help_text: Optional[str] = None, deadline: Optional[float] = None,
             min_rate: Optional[float] = DEFAULT_MIN_RATE, stall_window: float = DEFAULT_STALL_WINDOW,
             validate: Optional[Callable[[Path], Optional[str]]] = None) -> DownloadResult:
    """Fetch ``url`` into ``dest`` (atomically), resuming a previous partial download.

    The body is streamed into ``dest + ".part"``; its validators (ETag / Last-Modified / total size) are
    kept in ``dest + ".part.json"`` so a later call resumes with ``Range: bytes=<n>-`` (and ``If-Range``).
    A server that answers 200 instead of 206 is handled by restarting from zero. A body cut short is
    resumed up to ``retries`` times in this call; after that the ``.part`` stays for the next call.
    When complete, the size (``expected_size``) and ``sha256`` are checked; on mismatch the ``.part`` is
    deleted and :class:`ChecksumError` names expected and actual values. ``validate(part)`` then returns
    None or what is wrong with the content (the ``.part`` is deleted and :class:`WeightsError` raised).
    Only then is the file renamed to ``dest``. A lock on ``dest + ".lock"`` serialises concurrent calls
    for the same ``dest``; a waiter that finds ``dest`` complete returns it without downloading.

    ``progress``: ``callback(bytes_done, bytes_total_or_None)``, ``True``/``"text"`` (bar on stderr),
    ``"auto"`` or ``None``. ``timeout``: socket timeout in seconds per connect/read. ``deadline``: seconds
    the whole call may take (None: no limit). ``min_rate``/``stall_window``: abandon the transfer when
    fewer than ``min_rate`` bytes/s arrive over ``stall_window`` seconds (None: no stall detection); a
    socket timeout alone never fires while a server trickles a byte now and then. A stopped transfer keeps
    its ``.part`` for the next call to resume, and the message says how much it holds.

    Errors that mean "no network" or "not there" (connection refused, DNS failure, HTTP 404, ...) raise
    :class:`WeightsError` with instructions to use a local file instead (``help_text`` overrides them).
    A cache folder that cannot be written (full disk, read-only) raises :class:`WeightsError` naming the
    folder and the fix; a ``.part`` that could not be completed for that reason is deleted.
    """
    dest = Path(dest).expanduser()
    part = dest.with_name(dest.name + ".part")
    meta_path = dest.with_name(dest.name + ".part.json")
    lock_path = dest.with_name(dest.name + ".lock")
    sha256 = sha256.lower() if sha256 else None
    hint = help_text if help_text is not None else offline_help(url, dest.name, dest)

    def on_wait() -> None:
        logger.info("Another process is downloading %s; waiting for it to finish.", dest)

    lock = DownloadLock(lock_path, timeout=lock_timeout, on_wait=on_wait)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except OSError as exc:
        raise _write_error(lock_path if dest.parent.is_dir() else dest.parent, exc) from None
    callback, close_progress = _make_progress(progress, f"Downloading {dest.name}")
    try:
        if dest.exists():
            return _verify_existing(dest, expected_size, sha256)
        with _Watchdog(deadline, min_rate, stall_window) as watchdog:
            try:
                return _download_locked(url, dest, part, meta_path, expected_size, sha256, callback, timeout,
                                        retries, chunk_size, hint, watchdog, validate)
            except _WriteFailed as exc:
                freed = part.stat().st_size if part.exists() else 0
                _unlink_quiet(part, meta_path)
                raise _write_error(exc.path, exc.error, freed) from None
    finally:
        close_progress()
        lock.release()


def _write_error(path: Path, exc: OSError, freed: Optional[int] = None) -> WeightsError:
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
    deleted = f" The partial download ({_fmt_bytes(freed)}) was deleted." if freed else ""
    return WeightsError(f"Cannot write {path} in the model cache: {why}.{deleted} To continue, {fix}.")


class _Aborted(Exception):
    """The watchdog stopped the transfer (deadline or stall)."""


def _aborted_error(url: str, watchdog: "_Watchdog", part: Path, hint: str) -> WeightsError:
    kept = part.stat().st_size if part.exists() else 0
    tail = (f"The {_fmt_bytes(kept)} received are kept in {part} and the next run resumes from there; delete "
            "it to free the space." if kept else "Nothing was saved.")
    return WeightsError(f"Download of {url} was stopped: {watchdog.describe()}. {tail}\n{hint}")


_fetch = download  # resolve_checkpoint's ``download`` flag shadows the function name


def _verify_existing(dest: Path, expected_size: Optional[int], sha256: Optional[str]) -> DownloadResult:
    size = dest.stat().st_size
    if expected_size is not None and size != expected_size:
        raise ChecksumError(f"{dest} exists but has {size} bytes, expected {expected_size}. It was left in "
                            "place; delete it to download again.", str(expected_size), str(size))
    digest = sha256_file(dest)
    if sha256 and digest != sha256:
        raise ChecksumError(f"{dest} exists but its sha256 is {digest}, expected {sha256}. It was left in "
                            "place; delete it to download again.", sha256, digest)
    return DownloadResult(path=dest, size=size, sha256=digest, already_present=True)


def _download_locked(url, dest, part, meta_path, expected_size, sha256, callback, timeout, retries,
                     chunk_size, hint, watchdog: "_Watchdog",
                     validate: Optional[Callable[[Path], Optional[str]]]) -> DownloadResult:
    result = DownloadResult(path=dest, size=0, sha256="")
    attempt = 0
    while True:
        if watchdog.reason:
            raise _aborted_error(url, watchdog, part, hint)
        # What we already have and whether it can be resumed.
        meta = _read_json(meta_path) if part.exists() else None
        offset = part.stat().st_size if part.exists() else 0
        if offset and (meta is None or meta.get("url") != url):
            offset = 0  # a partial file we cannot vouch for: start over
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            validator = meta.get("etag") if meta and meta.get("etag") and not str(meta["etag"]).startswith("W/") \
                else (meta or {}).get("last_modified")
            if validator:
                headers["If-Range"] = validator
        request = urllib.request.Request(url, headers=headers)
        result.requests += 1
        watchdog.new_request()
        try:
            response = _urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as err:
            if err.code == 416 and offset:
                # Range not satisfiable: our partial file is no prefix of the remote one. Start over.
                err.close()
                _unlink_quiet(part, meta_path)
                result.restarts += 1
                attempt += 1
                if attempt > retries:
                    raise WeightsError(f"Download of {url} failed: the server rejected resuming (HTTP 416) "
                                       "repeatedly.\n" + hint) from None
                continue
            err.close()
            retryable = err.code >= 500 or err.code == 429
            if retryable and attempt < retries:
                attempt += 1
                time.sleep(min(0.2 * attempt, 2.0))
                continue
            what = "not found (HTTP 404)" if err.code == 404 else f"HTTP error {err.code} {err.reason}"
            raise WeightsError(f"Could not download {url}: {what}.\n{hint}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            if watchdog.reason:
                raise _aborted_error(url, watchdog, part, hint) from None
            reason = getattr(err, "reason", err)
            transient = isinstance(reason, (socket.timeout, TimeoutError, ConnectionResetError))
            if transient and attempt < retries:
                attempt += 1
                time.sleep(min(0.2 * attempt, 2.0))
                continue
            raise WeightsError(f"Could not download {url}: {_describe_url_error(err)}.\n{hint}") from None

        try:
            with response:
                status = getattr(response, "status", None) or response.getcode()
                length = response.headers.get("Content-Length")
                length = int(length) if length and length.isdigit() else None
                if offset and status == 206:
                    cr = _parse_content_range(response.headers.get("Content-Range"))
                    if cr is None or cr[0] != offset or (meta.get("total") and cr[2] and cr[2] != meta["total"]):
                        # Not the continuation we asked for: discard and start over.
                        _unlink_quiet(part, meta_path)
                        result.restarts += 1
                        attempt += 1
                        if attempt > retries:
                            raise WeightsError(f"Download of {url} failed: the server sent an unexpected "
                                               f"range ({response.headers.get('Content-Range')}).\n" + hint)
                        continue
                    total = cr[2] if cr[2] is not None else (meta.get("total") if meta else None)
                    result.resumed_from.append(offset)
                elif status in (200, 203) or status is None:
                    if offset:
                        logger.info("Server ignored the Range request for %s; restarting from zero.", url)
                        result.restarts += 1
                    offset = 0
                    total = length
                elif status == 206:
                    raise WeightsError(f"Download of {url} failed: partial content (206) for a full request.\n"
                                       + hint)
                else:
                    raise WeightsError(f"Could not download {url}: unexpected HTTP status {status}.\n{hint}")

                if expected_size is not None and total is not None and total != expected_size:
                    _unlink_quiet(part, meta_path)
                    raise ChecksumError(
                        f"Size mismatch for {url}: the server announces {total} bytes, expected "
                        f"{expected_size}. Nothing was saved. The file may have been updated upstream or a "
                        f"mirror serves a different file.\n{hint}", str(expected_size), str(total))

                if offset == 0:
                    try:
                        _write_json_atomic(meta_path, {
                            "url": url,
                            "etag": response.headers.get("ETag"),
                            "last_modified": response.headers.get("Last-Modified"),
                            "total": total,
                            "started": _utc_now(),
                        })
                    except OSError as exc:
                        raise _WriteFailed(meta_path, exc) from None
                _stream_body(response, part, offset, total, chunk_size, callback, watchdog)
        except _Aborted:
            raise _aborted_error(url, watchdog, part, hint) from None
        except _Interrupted as exc:
            if watchdog.reason:
                raise _aborted_error(url, watchdog, part, hint) from None
            attempt += 1
            if attempt > retries:
                raise WeightsError(
                    f"Download of {url} was interrupted ({exc}). The {part.stat().st_size if part.exists() else 0}"
                    f" bytes received are kept in {part}; run the same command again to resume (or delete it to "
                    f"free the space).\n{hint}"
                ) from None
            time.sleep(min(0.1 * attempt, 2.0))
            continue
        break

    size = part.stat().st_size
    if total is not None and size != total:
        _unlink_quiet(part, meta_path)
        raise ChecksumError(f"Download of {url} produced {size} bytes but the server announced {total}; the "
                            "partial file was deleted.\n" + hint, str(total), str(size))
    if expected_size is not None and size != expected_size:
        _unlink_quiet(part, meta_path)
        raise ChecksumError(f"Size mismatch for {url}: got {size} bytes, expected {expected_size}. The "
                            f"download was deleted.\n{hint}", str(expected_size), str(size))
    digest = sha256_file(part)
    if sha256 and digest != sha256:
        _unlink_quiet(part, meta_path)
        raise ChecksumError(
            f"Checksum mismatch for {url}: expected sha256 {sha256}, got {digest}. The download was deleted. "
            "The file may have been corrupted in transit, replaced upstream, or a mirror serves a different "
            f"file.\n{hint}", sha256, digest)
    problem = validate(part) if validate is not None else None
    if problem:
        _unlink_quiet(part, meta_path)
        raise WeightsError(
            f"Download of {url} is not a usable checkpoint: {problem.rstrip('. ')}. It was deleted, not cached. A captive "
            "portal, proxy login or error page can answer with status 200: check the network (open the URL in "
            f"a browser), then run the command again.\n{hint}")
    try:
        with open(part, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(part, dest)
    except OSError as exc:
        raise _WriteFailed(dest, exc) from None
    _unlink_quiet(meta_path)
    result.size = size
    result.sha256 = digest
    return result


def _stream_body(response, part: Path, offset: int, total: Optional[int], chunk_size: int,
                 callback: Optional[ProgressCallback], watchdog: "_Watchdog") -> int:
    """Append the body to ``part`` (truncating first when ``offset`` is 0). Returns bytes on disk.

    Reads with ``read1`` (whatever one socket read brings, up to ``chunk_size``) so that the watchdog sees
    progress on slow links. Raises :class:`_Aborted` when the watchdog stopped the transfer,
    :class:`_Interrupted` when the body was cut short, :class:`_WriteFailed` when the disk refused it.
    """
    done = offset
    mode = "ab" if offset else "wb"
    read = getattr(response, "read1", None) or response.read
    try:
        f = open(part, mode, buffering=0)  # unbuffered: a failed write never resurfaces at close()
    except OSError as exc:
        raise _WriteFailed(part, exc) from None
    with f:
        if offset and f.tell() != offset:  # "ab" positions at end; guard against a racing writer
            raise _Interrupted("partial file changed while resuming")
        if callback is not None:
            callback(done, total)
        while True:
            try:
                block = read(chunk_size)
            except (http.client.HTTPException, OSError, ValueError) as exc:
                if watchdog.reason:  # the watchdog shut the socket down
                    raise _Aborted() from None
                raise _Interrupted(f"{type(exc).__name__} after {done} bytes") from None
            if watchdog.reason:
                raise _Aborted()
            if not block:
                break
            try:
                view = memoryview(block)
                while view:  # a raw write may be partial (for instance just before the disk fills)
                    view = view[f.write(view):]
            except OSError as exc:
                raise _WriteFailed(part, exc) from None
            done += len(block)
            watchdog.add(len(block))
            if callback is not None:
                callback(done, total)
        try:
            os.fsync(f.fileno())
        except OSError as exc:
            raise _WriteFailed(part, exc) from None
    if total is not None and done < total:
        raise _Interrupted(f"connection closed after {done} of {total} bytes")
    return done


# --------------------------------------------------------------------------------------------------
# Checksum records next to cached files (trust on first use)
# --------------------------------------------------------------------------------------------------

def _record(path: Path, digest: str, *, source: str, url: Optional[str], name: Optional[str]) -> dict:
    st = path.stat()
    data = {
        "file": path.name,
        "name": name,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "sha256": digest,
        "verified": source,  # "published-sha256" | "trust-on-first-use"
        "url": url,
        "recorded": _utc_now(),
    }
    try:
        _write_json_atomic(sidecar_path(path), data)
    except OSError as exc:  # read-only shared cache: still usable, just not recorded
        logger.warning("Could not record the sha256 of %s in %s (%s); it will be re-checked but not "
                       "remembered.", path, sidecar_path(path), exc)
    return data


def payload_problem(path: Union[str, Path]) -> Optional[str]:
    """None when ``path`` is a ``torch.save`` file holding a SAM-Med3D-family state dict, else what is wrong.

    Checked without torch and without reading the tensor data (:mod:`SAM3DSegmentLib.models.checkpoint_file`).
    Used before a file without a published sha256 is trusted: an HTML page a captive portal answered
    with status 200 must never be pinned as the model.
    """
    from ..models.checkpoint_file import CheckpointError, inspect_checkpoint, sam_state_dict_problem

    try:
        return sam_state_dict_problem(inspect_checkpoint(path))
    except CheckpointError as exc:
        return str(exc)


def repair_command(entry: Optional[ModelWeights]) -> str:
    """The command that deletes a bad cached copy of ``entry`` and fetches it again."""
    return f"sam3d download --repair {entry.name if entry else 'NAME'}"


def _repair_advice(path: Path, entry: Optional[ModelWeights]) -> str:
    if entry is not None and not entry.bundled:
        return (f"Run `{repair_command(entry)}` to delete it and download it again, or pass a file you trust "
                "with --checkpoint PATH (3D Slicer: \"Checkpoint file\").")
    return f"Delete {path} and {sidecar_path(path)}, or pass a file you trust with --checkpoint PATH."


def _check_cached(path: Path, entry: Optional[ModelWeights]) -> tuple:
    """Hash ``path`` and compare it with the published sha256 or its first-use record; for files without a
    published sha256 also check that the content is a SAM-Med3D-family checkpoint. Writes nothing.

    Returns ``(problem, digest, record)``: ``problem`` is None or a message that says how to recover.
    """
    digest = sha256_file(path)
    published = entry.sha256.lower() if entry and entry.sha256 else None
    rec = _read_json(sidecar_path(path))
    fix = _repair_advice(path, entry)
    if published:
        if digest != published:
            return (f"The cached checkpoint {path} has sha256 {digest}, but the published sha256 of "
                    f"{entry.filename} is {published}. {fix}", published, digest), digest, rec
        if entry and entry.size is not None and path.stat().st_size != entry.size:
            return (f"The cached checkpoint {path} has {path.stat().st_size} bytes, expected {entry.size}. "
                    f"{fix}", str(entry.size), str(path.stat().st_size)), digest, rec
        return None, digest, rec
    problem = payload_problem(path)
    if problem:
        what = f"The cached copy of {entry.name!r}" if entry else "The cached checkpoint"
        return (f"{what} is not usable: {problem.rstrip('. ')}. {fix}", None, None), digest, rec
    if rec and rec.get("sha256") and rec["sha256"] != digest:
        return (f"The cached checkpoint {path} changed since its sha256 was recorded on "
                f"{rec.get('recorded', '?')}: expected {rec['sha256']}, now {digest}. No published checksum "
                f"exists for this file, so the first download was trusted. {fix}", rec["sha256"], digest), \
            digest, rec
    return None, digest, rec


def verify_cached(path: Union[str, Path], entry: Optional[ModelWeights] = None) -> dict:
    """Hash a cached file and check it against the published sha256 or the first-use record.

    A file without a published sha256 must also look like a SAM-Med3D-family checkpoint
    (:func:`payload_problem`) before its hash is recorded in ``<file>.json`` (trust on first use, logged
    as a warning), and on every later check. Returns the record. Raises :class:`ChecksumError` (the
    file is left in place; the message names ``sam3d download --repair NAME``).
    """
    path = Path(path)
    problem, digest, rec = _check_cached(path, entry)
    if problem:
        raise ChecksumError(*problem)
    url = entry.download_url() if entry else None
    name = entry.name if entry else None
    if entry and entry.sha256:
        if not rec or rec.get("sha256") != digest or rec.get("verified") != "published-sha256":
            rec = _record(path, digest, source="published-sha256", url=url, name=name)
        return rec
    if rec and rec.get("sha256"):
        return rec
    rec = _record(path, digest, source="trust-on-first-use", url=url, name=name)
    logger.warning(
        "No published sha256 exists for %s; recorded sha256 %s of the file first seen at %s in %s "
        "(trust on first use). Later loads are checked against it.", path.name, digest, path,
        sidecar_path(path))
    return rec


def checksum_status(path: Union[str, Path], entry: Optional[ModelWeights] = None) -> str:
    """A one-line verification state for reports, from the ``<file>.json`` record (no hashing)."""
    path = Path(path)
    rec = _read_json(sidecar_path(path))
    if not rec or not rec.get("sha256"):
        return "not verified yet (verified on next load)"
    try:
        st = path.stat()
    except FileNotFoundError:
        return "missing"
    changed = st.st_size != rec.get("size") or st.st_mtime_ns != rec.get("mtime_ns")
    published = entry.sha256.lower() if entry and entry.sha256 else None
    if published and rec["sha256"] != published:
        return f"sha256 does NOT match the published value; run `{repair_command(entry)}`"
    kind = ("verified against the published sha256" if rec.get("verified") == "published-sha256"
            else "sha256 recorded at first use (no published checksum)")
    suffix = " - file modified since, re-checked on next load" if changed else ""
    return f"{kind} on {rec.get('recorded', '?')}{suffix}"


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
    target = _cache_target(entry)
    part = target.with_name(target.name + ".part")
    if not target.exists():
        if part.is_file():
            return "partial", (f"{_fmt_bytes(part.stat().st_size)} of an interrupted download in {part}; "
                               f"`sam3d download {entry.name}` resumes it")
        return "absent", ""
    if not target.is_file():
        return "corrupt", f"{target} is not a regular file; remove it, then run `sam3d download {entry.name}`"
    problem, _, rec = _check_cached(target, entry)
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


# --------------------------------------------------------------------------------------------------
# Name or path -> local file
# --------------------------------------------------------------------------------------------------

def _is_registered_name(name_or_path: Union[str, os.PathLike]) -> bool:
    """A plain string naming a registered model (no folder separator): it resolves to the cache only."""
    if not isinstance(name_or_path, str):
        return False
    if os.sep in name_or_path or (os.altsep and os.altsep in name_or_path):
        return False
    return name_or_path.lower() in REGISTRY


def resolve_checkpoint(name_or_path: Union[str, os.PathLike], download: bool = True,
                       progress: ProgressArg = "auto", *, verify: bool = True, timeout: float = 30.0,
                       retries: int = 3, lock_timeout: Optional[float] = 3600.0,
                       deadline: Optional[float] = None, min_rate: Optional[float] = DEFAULT_MIN_RATE,
                       stall_window: float = DEFAULT_STALL_WINDOW) -> Path:
    """Turn a checkpoint name or path into an existing local file.

    * A registered name (a ``str`` in :func:`known_names`, case-insensitive, without a folder separator)
      always means the cached copy, never a file of that name in the current folder (pass ``./NAME`` or a
      ``Path`` for that). It is looked up in :func:`checkpoint_dir`; if absent it is downloaded
      (``download=True``) from its URL or ``$SAM3D_WEIGHTS_BASE_URL``, checked (the published sha256, or
      for files without one, that the content is a SAM-Med3D-family checkpoint) and its sha256 recorded
      next to it. With ``verify`` the cached file is hashed and checked on every call.
    * The bundled ``"demo"`` model resolves to the file inside the package.
    * Anything else is a path: an existing regular file is returned as is (``~`` expanded); no checksum
      is imposed on user files.

    ``deadline``, ``min_rate`` and ``stall_window`` bound the download (see :func:`download`).
    Raises :class:`WeightsError` with instructions (``--checkpoint PATH`` / Slicer "Checkpoint file" /
    where to copy the file in the cache / ``sam3d download --repair NAME``) when the file is missing,
    cannot be fetched or is not trusted.
    """
    if not _is_registered_name(name_or_path):
        raw = os.fspath(name_or_path)
        if not isinstance(raw, str):
            raw = os.fsdecode(raw)
        path = Path(raw).expanduser()
        if path.is_file():
            return path
        if path.is_dir():
            raise WeightsError(f"Checkpoint path {path} is a directory, not a file; pass the .pth/.pt file itself.")
        if path.exists():
            raise WeightsError(f"Checkpoint path {path} is not a regular file (a device, pipe or socket); pass "
                               "the .pth/.pt file itself.")
        raise WeightsError(
            f"Checkpoint file not found: {path}. Pass an existing .pth/.pt file, or one of the model names "
            f"{', '.join(known_names())} to use the cached/downloaded weights.")

    raw = str(name_or_path)
    entry = get_weights(raw)
    if entry.bundled:
        bundled = entry.bundled_path()
        if bundled is None or not bundled.is_file():
            raise WeightsError(f"The bundled {entry.name!r} model is not included in this installation "
                               f"(expected at {bundled}). Use --checkpoint PATH with a checkpoint file instead.")
        return bundled

    target = _cache_target(entry)
    url = entry.download_url()
    hint = offline_help(url, entry.filename, target)
    if target.exists() and not target.is_file():
        raise WeightsError(f"The cache entry {target} is not a regular file; remove it, then run "
                           f"`sam3d download {entry.name}`.")
    if target.is_file():
        if verify:
            verify_cached(target, entry)
        return target
    if not download:
        raise WeightsError(f"The checkpoint {entry.name!r} ({entry.filename}) is not in the cache and "
                           f"downloading is disabled.\n{hint}")
    assert url is not None
    logger.info("Downloading %s (%s) from %s to %s", entry.name, entry.size_hint or _fmt_bytes(entry.size),
                url, target)
    result = _fetch(url, target, expected_size=entry.size, sha256=entry.sha256,
                    progress=progress, timeout=timeout, retries=retries,
                    lock_timeout=lock_timeout, help_text=hint, deadline=deadline, min_rate=min_rate,
                    stall_window=stall_window, validate=None if entry.sha256 else payload_problem)
    if result.already_present:
        # Another process finished it while we waited; check it like any cached file.
        if verify:
            verify_cached(target, entry)
        return target
    previous = _read_json(sidecar_path(target))
    if previous and previous.get("sha256") and previous["sha256"] != result.sha256:
        logger.warning("The new download of %s has sha256 %s, unlike the %s recorded on %s for an earlier "
                       "copy; the record is replaced.", entry.filename, result.sha256, previous["sha256"],
                       previous.get("recorded", "?"))
    if entry.sha256:
        _record(target, result.sha256, source="published-sha256", url=url, name=entry.name)
    else:
        _record(target, result.sha256, source="trust-on-first-use", url=url, name=entry.name)
        logger.warning(
            "No published sha256 exists for %s; recorded sha256 %s of this first download in %s "
            "(trust on first use). Later loads are checked against it.", entry.filename, result.sha256,
            sidecar_path(target))
    return target


def repair(name: str, progress: ProgressArg = "auto", **download_options) -> tuple:
    """Check the cached copy of ``name``; if it is corrupt (wrong or changed sha256, not a checkpoint, not a
    regular file), delete it with its record and any partial download, then download it again.

    Returns ``(path, removed)``: the good cached file and the paths deleted (empty when the copy was fine).
    ``download_options`` go to :func:`resolve_checkpoint` (``timeout``, ``deadline``, ...).
    """
    entry = get_weights(name)
    if entry.bundled:
        raise WeightsError(f"{entry.name!r} is bundled with the package and never downloaded; reinstall "
                           "SAM3DSegment if it is damaged.")
    target = _cache_target(entry)
    removed: List[Path] = []
    lock_path = target.with_name(target.name + ".lock")
    try:
        lock = DownloadLock(lock_path, timeout=download_options.get("lock_timeout", 3600.0)).acquire()
    except FileNotFoundError:
        lock = None  # no cache folder yet: nothing to remove
    except OSError as exc:
        raise _write_error(lock_path, exc) from None
    try:
        if target.is_file():
            problem, _, _ = _check_cached(target, entry)
            if problem is None:
                return target, removed
            logger.warning("%s", problem[0])
        elif target.exists():
            raise WeightsError(f"The cache entry {target} is not a regular file; remove it yourself, then run "
                               f"`sam3d download {entry.name}`.")
        for p in (target, sidecar_path(target), target.with_name(target.name + ".part"),
                  target.with_name(target.name + ".part.json")):
            if p.is_file():
                try:
                    os.unlink(p)
                except OSError as exc:
                    raise _write_error(p, exc) from None
                removed.append(p)
    finally:
        if lock is not None:
            lock.release()
    path = resolve_checkpoint(entry.name, progress=progress, **download_options)
    return path, removed


def iter_registry() -> Iterator[ModelWeights]:
    for key in known_names():
        yield REGISTRY[key]
