"""Fetch a URL into a file: resumable, locked, bounded in time, checked before it is put in place.

The body streams into ``<dest>.part``; the server's validators (ETag / Last-Modified / total size) go to
``<dest>.part.json`` so that a later call resumes with ``Range: bytes=<n>-`` (and ``If-Range``). Only a
complete, checked file is renamed to ``dest``. A :class:`~.lock.DownloadLock` on ``<dest>.lock`` keeps two
processes or threads from writing the same file at once.
"""
from __future__ import annotations

import contextlib
import http.client
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Union

from ..core.atomic import write_json
from .cache import offline_help, write_error
from .errors import ChecksumError, WeightsError
from .lock import lock_download
from .progress import ProgressArg, ProgressCallback, fmt_bytes, make_progress
from .transport import (DEFAULT_MIN_RATE, DEFAULT_STALL_WINDOW, USER_AGENT, Watchdog, describe_url_error, open_url,
                        parse_content_range)
from .verify import read_json, sha256_file, utc_now

logger = logging.getLogger(__name__)

_urlopen = open_url  # tests patch this to simulate failures that loopback cannot produce (DNS)


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


class _Aborted(Exception):
    """The watchdog stopped the transfer (deadline or stall)."""


class _WriteFailed(Exception):
    """Writing into the cache folder failed (disk full, read-only, ...); carries the OSError."""

    def __init__(self, path: Path, error: OSError):
        super().__init__(str(error))
        self.path = path
        self.error = error


def _unlink_quiet(*paths: Path) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


def download(url: str, dest: Union[str, Path], expected_size: Optional[int] = None,
             sha256: Optional[str] = None, progress: ProgressArg = None, timeout: float = 30.0, *,
             retries: int = 3, lock_timeout: Optional[float] = 3600.0, chunk_size: int = 1 << 16,
             help_text: Optional[str] = None, deadline: Optional[float] = None,
             min_rate: Optional[float] = DEFAULT_MIN_RATE, stall_window: float = DEFAULT_STALL_WINDOW,
             validate: Optional[Callable[[Path], Optional[str]]] = None) -> DownloadResult:
    """Fetch ``url`` into ``dest`` (atomically), resuming a previous partial download.

    A server that answers 200 instead of 206 is handled by restarting from zero. A body cut short is
    resumed up to ``retries`` times in this call; after that the ``.part`` stays for the next call.
    When complete, the size (``expected_size``) and ``sha256`` are checked; on mismatch the ``.part`` is
    deleted and :class:`ChecksumError` names expected and actual values. ``validate(part)`` then returns
    None or what is wrong with the content (the ``.part`` is deleted and :class:`WeightsError` raised).
    Only then is the file renamed to ``dest``. Concurrent calls for the same ``dest`` are serialised; a
    waiter that finds ``dest`` complete returns it without downloading.

    ``progress``: ``callback(bytes_done, bytes_total_or_None)``, ``True``/``"text"`` (bar on stderr),
    ``"auto"`` or ``None``. ``timeout``: socket timeout in seconds per connect/read. ``deadline``: seconds
    the whole call may take (None: no limit). ``min_rate``/``stall_window``: abandon the transfer when
    fewer than ``min_rate`` bytes/s arrive over ``stall_window`` seconds (None: no stall detection). A
    stopped transfer keeps its ``.part`` for the next call to resume, and the message says how much it holds.

    Errors that mean "no network" or "not there" (connection refused, DNS failure, HTTP 404, ...) raise
    :class:`WeightsError` with instructions to use a local file instead (``help_text`` overrides them).
    A cache folder that cannot be written (full disk, read-only) raises :class:`WeightsError` naming the
    folder and the fix; a ``.part`` that could not be completed for that reason is deleted.
    """
    dest = Path(dest).expanduser()
    part = dest.with_name(dest.name + ".part")
    meta_path = dest.with_name(dest.name + ".part.json")
    sha256 = sha256.lower() if sha256 else None
    hint = help_text if help_text is not None else offline_help(url, dest.name, dest)

    def on_wait() -> None:
        logger.info("Another process is downloading %s; waiting for it to finish.", dest)

    callback, close_progress = make_progress(progress, f"Downloading {dest.name}")  # draws nothing before use
    lock = lock_download(dest, lock_timeout, on_wait)
    try:
        if dest.exists():
            return _verify_existing(dest, expected_size, sha256)
        with Watchdog(deadline, min_rate, stall_window) as watchdog:
            try:
                result, total = _transfer(url, dest, part, meta_path, expected_size, callback, timeout, retries,
                                          chunk_size, hint, watchdog)
                return _finish(url, dest, part, meta_path, result, total, expected_size, sha256, validate, hint)
            except _WriteFailed as exc:
                freed = part.stat().st_size if part.exists() else 0
                _unlink_quiet(part, meta_path)
                raise write_error(exc.path, exc.error, freed) from None
    finally:
        close_progress()
        lock.release()


def _aborted_error(url: str, watchdog: Watchdog, part: Path, hint: str) -> WeightsError:
    kept = part.stat().st_size if part.exists() else 0
    tail = (f"The {fmt_bytes(kept)} received are kept in {part} and the next run resumes from there; delete "
            "it to free the space." if kept else "Nothing was saved.")
    return WeightsError(f"Download of {url} was stopped: {watchdog.describe()}. {tail}\n{hint}")


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


def _transfer(url, dest, part, meta_path, expected_size, callback, timeout, retries, chunk_size, hint,
              watchdog: Watchdog) -> tuple:
    """Request and receive until ``part`` holds the whole body (resuming, restarting, retrying). Returns
    ``(result, total)``: what was done so far, and the size the server announced (None when unknown)."""
    result = DownloadResult(path=dest, size=0, sha256="")
    attempt = 0
    while True:
        if watchdog.reason:
            raise _aborted_error(url, watchdog, part, hint)
        # What we already have and whether it can be resumed.
        meta = read_json(meta_path) if part.exists() else None
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
            err.close()
            if err.code == 416 and offset:
                # Range not satisfiable: our partial file is no prefix of the remote one. Start over.
                _unlink_quiet(part, meta_path)
                result.restarts += 1
                attempt += 1
                if attempt > retries:
                    raise WeightsError(f"Download of {url} failed: the server rejected resuming (HTTP 416) "
                                       "repeatedly.\n" + hint) from None
                continue
            if (err.code >= 500 or err.code == 429) and attempt < retries:
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
            raise WeightsError(f"Could not download {url}: {describe_url_error(err)}.\n{hint}") from None

        try:
            with response:
                status = getattr(response, "status", None) or response.getcode()
                length = response.headers.get("Content-Length")
                length = int(length) if length and length.isdigit() else None
                if offset and status == 206:
                    cr = parse_content_range(response.headers.get("Content-Range"))
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
                        write_json(meta_path, {"url": url, "etag": response.headers.get("ETag"),
                                               "last_modified": response.headers.get("Last-Modified"),
                                               "total": total, "started": utc_now()}, sort_keys=True)
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
        return result, total


def _finish(url, dest, part, meta_path, result: DownloadResult, total: Optional[int], expected_size, sha256,
            validate, hint) -> DownloadResult:
    """Check the complete ``part`` (size, sha256, content) and rename it to ``dest``; delete it when it fails."""
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
            f"Download of {url} is not a usable checkpoint: {problem.rstrip('. ')}. It was deleted, not cached. A "
            "captive portal, proxy login or error page can answer with status 200: check the network (open the URL "
            f"in a browser), then run the command again.\n{hint}")
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
                 callback: Optional[ProgressCallback], watchdog: Watchdog) -> int:
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
