"""HTTP(S) requests to a list of equivalent servers, with keep-alive, time limits and fail-over.

Standard library only (``http.client`` + ``ssl``), so the client needs nothing beyond numpy. Servers are
stateless and interchangeable (``remote/server.py``): a request goes to the preferred server (the one that
holds an embedding) or the next in round-robin order; when a server cannot be reached, times out, is busy
or answers through a failing proxy, the same request goes to the next one. A failed server is tried last
for ``down_cooldown_s``. Each attempt is bounded by ``timeout_s`` (connect, send, wait and read together);
one call makes at most one attempt per server per pass, and repeats passes only while servers say "busy",
so a call ends within about ``timeout_s`` x servers x (1 + ``busy_retries``) seconds.
"""
from __future__ import annotations

import http.client
import json
import random
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit

from .. import __version__
from .errors import (AuthError, BadRequest, ProxyError, RemoteError, RemoteTimeout, ServerBusy, ServerUnavailable,
                     UnknownEmbedding, VersionMismatch)
from .protocol import (E_AUTH, E_BUSY, E_INTERNAL, E_MODEL_MISMATCH, E_PROTOCOL, E_RATE, E_TIMEOUT,
                       E_UNKNOWN_EMBEDDING, MEDIA_TYPE, PROTOCOL_HEADER, PROTOCOL_VERSION)

MAX_RESPONSE_BYTES = 256 << 20
_CHUNK = 1 << 16


@dataclass
class Reply:
    url: str
    status: int
    headers: Dict[str, str]
    body: bytes
    elapsed_s: float

    def json(self):
        return json.loads(self.body.decode("utf-8"))


def normalize_url(url: str) -> str:
    """``http(s)://host[:port][/prefix]`` without a trailing slash; a clear ValueError otherwise."""
    text = str(url).strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"server URL {text!r} must look like https://host:port (or http:// on a trusted "
                         "network / loopback)")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"server URL {text!r} must not carry a query, fragment or user name; give the key "
                         "through a key file or the environment")
    try:
        parts.port
    except ValueError:
        raise ValueError(f"server URL {text!r} has an invalid port") from None
    return text.rstrip("/")


class _Failure(Exception):
    def __init__(self, kind: str, error: RemoteError, retry_after_s: float = 0.0):
        super().__init__(str(error))
        self.kind, self.error, self.retry_after_s = kind, error, retry_after_s


class Transport:
    """Requests with fail-over over ``servers`` (see the module docstring). Thread-safe (one request at a
    time); ``stats`` counts requests, bytes on the wire (headers included) and fail-overs."""

    def __init__(self, servers: Sequence[str], key: Optional[str] = None, timeout_s: float = 30.0,
                 connect_timeout_s: float = 5.0, ca_file: Optional[str] = None, down_cooldown_s: float = 30.0,
                 busy_retries: int = 2):
        if isinstance(servers, str):
            servers = [s for s in servers.split(",") if s.strip()]
        self.servers = [normalize_url(s) for s in servers]
        if not self.servers:
            raise ValueError("give at least one server URL")
        if not timeout_s > 0 or not connect_timeout_s > 0:
            raise ValueError("timeouts must be positive")
        self.key = key
        self.timeout_s, self.connect_timeout_s = float(timeout_s), float(connect_timeout_s)
        self.down_cooldown_s, self.busy_retries = float(down_cooldown_s), int(busy_retries)
        self._ssl = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
        self._conns: Dict[str, http.client.HTTPConnection] = {}
        self._down: Dict[str, float] = {}
        self._next = random.randrange(len(self.servers))  # clients start at different servers
        self._lock = threading.RLock()
        self.stats = {"requests": 0, "bytes_sent": 0, "bytes_received": 0, "failovers": 0}

    # ------------------------------------------------------------------ public
    def request(self, method: str, path: str, body: Optional[bytes] = None, prefer: Optional[str] = None,
                content_type: str = MEDIA_TYPE, headers: Optional[Dict[str, str]] = None) -> Reply:
        with self._lock:
            failures: List[_Failure] = []
            for _ in range(1 + self.busy_retries):
                this_pass: List[_Failure] = []
                for url in self._order(prefer):
                    try:
                        reply = self._attempt(url, method, path, body, content_type, headers)
                    except _Failure as f:
                        this_pass.append(f)
                        self.stats["failovers"] += 1
                        if f.kind != "busy":
                            self._down[url] = time.monotonic()
                        continue
                    self._down.pop(url, None)
                    return reply
                failures += this_pass
                if any(f.kind != "busy" for f in this_pass):
                    break  # a server failed for another reason than "busy": waiting would not help
                time.sleep(min(max(f.retry_after_s for f in this_pass), self.timeout_s))
            raise self._summarize(failures)

    def close(self) -> None:
        with self._lock:
            for conn in self._conns.values():
                conn.close()
            self._conns.clear()

    # ------------------------------------------------------------------ internals
    def _order(self, prefer: Optional[str]) -> List[str]:
        n = len(self.servers)
        start = self._next % n
        order = self.servers[start:] + self.servers[:start]
        if prefer in order:
            order.remove(prefer)
            order.insert(0, prefer)
        else:  # round robin over the requests that may go anywhere (encodes, capabilities)
            self._next += 1
        now = time.monotonic()
        up = [u for u in order if now - self._down.get(u, -1e18) > self.down_cooldown_s]
        return up + [u for u in order if u not in up]

    def _connection(self, url: str) -> Tuple[http.client.HTTPConnection, bool]:
        conn = self._conns.get(url)
        if conn is not None and conn.sock is not None:
            return conn, True
        parts = urlsplit(url)
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(parts.hostname, parts.port or 443, timeout=self.connect_timeout_s,
                                               context=self._ssl)
        else:
            conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=self.connect_timeout_s)
        self._conns[url] = conn
        return conn, False

    def _headers(self, body: Optional[bytes], content_type: str) -> Dict[str, str]:
        h = {"User-Agent": f"sam3dsegment/{__version__}", PROTOCOL_HEADER: str(PROTOCOL_VERSION),
             "Accept": f"{MEDIA_TYPE}, application/json, application/octet-stream"}
        if self.key:
            h["Authorization"] = f"Bearer {self.key}"
        if body is not None:
            h["Content-Type"] = content_type
        return h

    def _attempt(self, url: str, method: str, path: str, body: Optional[bytes], content_type: str,
                 extra: Optional[Dict[str, str]]) -> Reply:
        target = urlsplit(url).path + path
        headers = {**self._headers(body, content_type), **(extra or {})}
        for fresh_retry in (False, True):
            t0 = time.monotonic()
            deadline = t0 + self.timeout_s
            conn, reused = self._connection(url)
            try:
                if conn.sock is None:
                    conn.connect()
                conn.sock.settimeout(max(0.001, deadline - time.monotonic()))
                conn.request(method, target, body=body, headers=headers)
                resp = conn.getresponse()
                data = self._read(conn, resp, deadline)
            except (socket.timeout, TimeoutError):
                conn.close()
                raise _Failure("timeout", RemoteTimeout(
                    f"{url} did not answer within {self.timeout_s:g} s; the server is overloaded or down "
                    "(raise the time limit for very slow servers)", url)) from None
            except ssl.SSLError as err:
                conn.close()
                raise _Failure("unavailable", ServerUnavailable(
                    f"TLS with {url} failed ({getattr(err, 'reason', None) or err}); if the server uses a "
                    "self-signed certificate, give its CA file (--server-ca / the CA setting)", url)) from None
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as err:
                conn.close()
                if reused and not fresh_retry:
                    continue  # a kept-alive connection the server had closed: once more on a new one
                raise _Failure("unavailable", ServerUnavailable(
                    f"{url} closed the connection ({type(err).__name__}); the server stopped or crashed",
                    url)) from None
            except (OSError, http.client.HTTPException) as err:
                conn.close()
                raise _Failure("unavailable", ServerUnavailable(
                    f"cannot reach {url} ({type(err).__name__}: {err}); check the address and that "
                    "'sam3d serve' runs there", url)) from None
            if resp.will_close:
                conn.close()
            elapsed = time.monotonic() - t0
            self.stats["requests"] += 1
            self.stats["bytes_sent"] += len(body or b"") + len(target) + 16 + sum(
                len(k) + len(v) + 4 for k, v in headers.items())
            self.stats["bytes_received"] += len(data) + 17 + sum(len(k) + len(v) + 4 for k, v in resp.getheaders())
            reply = Reply(url, resp.status, {k.lower(): v for k, v in resp.getheaders()}, data, elapsed)
            return self._check(reply)
        raise AssertionError("unreachable")

    def _read(self, conn, resp, deadline: float) -> bytes:
        length = resp.getheader("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_RESPONSE_BYTES:
            raise http.client.HTTPException(f"answer of {length} bytes is larger than {MAX_RESPONSE_BYTES}")
        chunks, total = [], 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("deadline")
            if conn.sock is not None:
                conn.sock.settimeout(remaining)
            chunk = resp.read(_CHUNK)
            if not chunk:
                return b"".join(chunks)
            total += len(chunk)
            if total > MAX_RESPONSE_BYTES:
                raise http.client.HTTPException(f"answer larger than {MAX_RESPONSE_BYTES} bytes")
            chunks.append(chunk)

    def _check(self, reply: Reply) -> Reply:
        if reply.status == 200:
            return reply
        url = reply.url
        code, detail = None, None
        if reply.headers.get("content-type", "").startswith("application/json"):
            try:
                err = reply.json()
                code, detail = err.get("error"), err.get("detail")
            except (ValueError, AttributeError):
                pass
        if code is None:  # not a sam3d answer: a proxy, a balancer or another service
            raise _Failure("proxy", ProxyError(
                f"{url} answered HTTP {reply.status} without a sam3d reason - a proxy or load balancer in front "
                "of the server reports it down or too slow (check the server behind it), or the URL points to "
                "another service", url))
        try:
            retry_after = min(60.0, max(0.0, float(reply.headers.get("retry-after", "1"))))
        except ValueError:  # an HTTP date: not sent by sam3d servers
            retry_after = 1.0
        if code == E_AUTH or reply.status in (401, 403):
            raise AuthError(f"{url} refused the key ({detail}); check the key file / SAM3D_SERVER_KEY or the "
                            "key in the module's settings", url)
        if code == E_PROTOCOL:
            raise VersionMismatch(f"{url}: {detail}", url)
        if code == E_UNKNOWN_EMBEDDING:
            raise UnknownEmbedding(f"{url}: {detail}", url)
        if code in (E_BUSY, E_RATE):
            raise _Failure("busy", ServerBusy(f"{url} is busy: {detail}", url, retry_after), retry_after)
        if code in (E_TIMEOUT, E_INTERNAL) or reply.status >= 500:
            raise _Failure("server", RemoteError(f"{url} failed: {detail}", url))
        if code == E_MODEL_MISMATCH:
            raise _Failure("mismatch", VersionMismatch(f"{url}: {detail}", url))
        raise BadRequest(f"{url} refused the request: {detail}", url)

    def _summarize(self, failures: List[_Failure]) -> RemoteError:
        kinds = {f.kind for f in failures}
        seen = "; ".join(dict.fromkeys(str(f.error) for f in failures))
        n = len(self.servers)
        where = f"{n} server(s)"
        if kinds == {"busy"}:
            return ServerBusy(f"all {where} are busy, retry in a moment or add servers: {seen}",
                              retry_after_s=max(f.retry_after_s for f in failures))
        if kinds == {"mismatch"}:
            return VersionMismatch(seen)
        if "timeout" in kinds and kinds <= {"timeout", "busy"}:
            return RemoteTimeout(f"no answer from {where} within {self.timeout_s:g} s each: {seen}")
        if kinds == {"proxy"}:
            return ProxyError(seen)
        if "unavailable" in kinds and len(kinds) == 1:
            return ServerUnavailable(f"none of {where} could be reached: {seen}")
        return RemoteError(f"the request failed on {where}: {seen}")
