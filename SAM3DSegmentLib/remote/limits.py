"""The server's bounds: a byte-bounded embedding cache, an encode queue limit and per-client rate limits.

All three are thread-safe and torch-free; the server (``remote/server.py``) owns one of each.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Dict, Hashable, Optional, Tuple

import numpy as np


class ByteLRU:
    """Least-recently-used store of numpy arrays holding at most ``max_bytes`` of array data.

    An array larger than the whole budget is not stored. ``bytes`` never exceeds ``max_bytes``.
    """

    def __init__(self, max_bytes: int):
        if int(max_bytes) < 0:
            raise ValueError(f"cache size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._data: "OrderedDict[Hashable, np.ndarray]" = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: Hashable) -> Optional[np.ndarray]:
        with self._lock:
            value = self._data.get(key)
            if value is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: Hashable, value: np.ndarray) -> bool:
        """Store ``value`` (read-only from now on); False when it is larger than the whole cache."""
        size = int(value.nbytes)
        if size > self.max_bytes:
            return False
        value.flags.writeable = False
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self.bytes -= int(old.nbytes)
            while self._data and self.bytes + size > self.max_bytes:
                _, dropped = self._data.popitem(last=False)
                self.bytes -= int(dropped.nbytes)
                self.evictions += 1
            self._data[key] = value
            self.bytes += size
        return True

    def __len__(self) -> int:
        return len(self._data)

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._data), "bytes": self.bytes, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses, "evictions": self.evictions}


class Busy(Exception):
    """The encode queue is full, or a request waited longer than the queue allows."""

    def __init__(self, detail: str, retry_after_s: float):
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class EncodeGate:
    """At most ``concurrent`` encodes run at once (one per GPU is best); at most ``queue`` more wait, each
    for at most ``wait_s`` seconds. Anything beyond is refused at once with :class:`Busy` (HTTP 503), so
    a flooded server answers "busy, retry" instead of piling up requests until the clients time out."""

    def __init__(self, concurrent: int = 1, queue: int = 16, wait_s: float = 30.0):
        if concurrent < 1 or queue < 0 or wait_s <= 0:
            raise ValueError("encode gate needs concurrent >= 1, queue >= 0 and wait_s > 0")
        self.concurrent, self.queue, self.wait_s = int(concurrent), int(queue), float(wait_s)
        self._sem = threading.BoundedSemaphore(self.concurrent)
        self._lock = threading.Lock()
        self._inside = 0
        self.refused = 0

    def __enter__(self):
        with self._lock:
            if self._inside >= self.concurrent + self.queue:
                self.refused += 1
                raise Busy(f"server full: {self.concurrent} encode(s) running and {self.queue} waiting; "
                           "retry shortly or add a server", retry_after_s=1.0)
            self._inside += 1
        if not self._sem.acquire(timeout=self.wait_s):
            with self._lock:
                self._inside -= 1
                self.refused += 1
            raise Busy(f"server full: no encode slot within {self.wait_s:g} s; retry or add a server",
                       retry_after_s=2.0)
        return self

    def __exit__(self, *exc):
        self._sem.release()
        with self._lock:
            self._inside -= 1
        return False

    def stats(self) -> dict:
        return {"running_or_waiting": self._inside, "concurrent": self.concurrent, "queue": self.queue,
                "refused": self.refused}


class RateLimiter:
    """Token bucket per client identity: ``rate`` requests per second on average, bursts of ``burst``.

    ``rate <= 0`` disables the limit. At most ``max_clients`` identities are tracked (the least recently
    seen are forgotten), so the table itself is bounded.
    """

    def __init__(self, rate: float, burst: int, max_clients: int = 10000):
        self.rate, self.burst, self.max_clients = float(rate), max(1, int(burst)), int(max_clients)
        self._buckets: "OrderedDict[str, Tuple[float, float]]" = OrderedDict()
        self._lock = threading.Lock()
        self.refused = 0

    def check(self, identity: str, now: Optional[float] = None) -> float:
        """0 when the request may go ahead (a token is taken), else the seconds until the next token."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.pop(identity, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            wait = 0.0
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self.rate
                self.refused += 1
            self._buckets[identity] = (tokens, now)
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
            return wait

    def stats(self) -> Dict[str, float]:
        return {"rate_per_s": self.rate, "burst": self.burst, "refused": self.refused}
