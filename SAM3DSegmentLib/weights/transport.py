"""The HTTP side of a download, on ``urllib``: connections whose sockets a :class:`Watchdog` can shut down
(an overall deadline and a minimum transfer rate), and the small parsers for what servers answer.

A socket timeout alone bounds each read, never a whole transfer: a server that trickles a byte now and then
keeps it alive forever. The watchdog samples the bytes received from a helper thread and, when the deadline
passes or fewer than ``min_rate`` bytes/s arrived over ``window`` seconds, shuts the sockets down so that a
blocked read returns at once.
"""
from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time
import urllib.request
from typing import List, Optional

USER_AGENT = "SAM3DSegment-weights/1"

#: Defaults of the stall detector: a transfer slower than ``DEFAULT_MIN_RATE`` bytes/s over
#: ``DEFAULT_STALL_WINDOW`` seconds is abandoned.
DEFAULT_MIN_RATE = 1024.0
DEFAULT_STALL_WINDOW = 60.0


class Watchdog:
    """Enforces an overall deadline and a minimum transfer rate on one download.

    Use it as a context manager around the transfer; call :meth:`add` with each block's size and
    :meth:`new_request` before each request. When it stops the transfer, :attr:`reason` says why
    (``"deadline"`` or ``"stalled"``) and :meth:`describe` says it in words. Sockets opened by
    :func:`open_url` while it runs (in the same thread) register with it.
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

    def __enter__(self) -> "Watchdog":
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


def open_url(request: urllib.request.Request, timeout: float):
    """``urlopen`` with a fresh opener so proxy settings are read from the environment at each call; its
    connections register their sockets with the running :class:`Watchdog`."""
    return urllib.request.build_opener(_HTTPHandler, _HTTPSHandler).open(request, timeout=timeout)


def describe_url_error(err: BaseException) -> str:
    """What a failed connection means, in words a user can act on."""
    reason = getattr(err, "reason", err)
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused (no server answering; are you offline or behind a proxy?)"
    if isinstance(reason, socket.gaierror):
        return f"host name could not be resolved (offline or DNS failure: {reason})"
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return "the connection timed out"
    return f"{type(reason).__name__}: {reason}"


def parse_content_range(value: Optional[str]):
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
