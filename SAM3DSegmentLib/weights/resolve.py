"""A checkpoint name or path -> a local, checked file: the cache first, a download on first use, and the
repair of a copy that fails its checks."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import List, Optional, Union

from .cache import cache_target, offline_help, write_error
from .errors import WeightsError
from .fetch import download as _fetch
from .lock import lock_download
from .progress import ProgressArg, fmt_bytes
from .registry import get_weights, is_registered_name, known_names
from .transport import DEFAULT_MIN_RATE, DEFAULT_STALL_WINDOW
from .verify import check_cached, payload_problem, read_json, record, sidecar_path, verify_cached

logger = logging.getLogger(__name__)


def resolve_checkpoint(name_or_path: Union[str, os.PathLike], download: bool = True,
                       progress: ProgressArg = "auto", *, verify: bool = True, timeout: float = 30.0,
                       retries: int = 3, lock_timeout: Optional[float] = 3600.0,
                       deadline: Optional[float] = None, min_rate: Optional[float] = DEFAULT_MIN_RATE,
                       stall_window: float = DEFAULT_STALL_WINDOW) -> Path:
    """Turn a checkpoint name or path into an existing local file.

    * A registered name (a ``str`` in :func:`known_names`, case-insensitive, without a folder separator)
      always means the cached copy, never a file of that name in the current folder (pass ``./NAME`` or a
      ``Path`` for that). It is looked up in :func:`~SAM3DSegmentLib.weights.cache.checkpoint_dir`; if absent
      it is downloaded (``download=True``) from its URL or ``$SAM3D_WEIGHTS_BASE_URL``, checked (the published
      sha256, or for files without one, that the content is a SAM-Med3D-family checkpoint) and its sha256
      recorded next to it. With ``verify`` the cached file is hashed and checked on every call.
    * The bundled ``"demo"`` model resolves to the file inside the package.
    * Anything else is a path: an existing regular file is returned as is (``~`` expanded); no checksum
      is imposed on user files.

    ``deadline``, ``min_rate`` and ``stall_window`` bound the download (see
    :func:`~SAM3DSegmentLib.weights.fetch.download`). Raises :class:`WeightsError` with instructions
    (``--checkpoint PATH`` / Slicer "Checkpoint file" / where to copy the file in the cache /
    ``sam3d download --repair NAME``) when the file is missing, cannot be fetched or is not trusted.
    """
    if not is_registered_name(name_or_path):
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

    entry = get_weights(str(name_or_path))
    if entry.bundled:
        bundled = entry.bundled_path()
        if bundled is None or not bundled.is_file():
            raise WeightsError(f"The bundled {entry.name!r} model is not included in this installation "
                               f"(expected at {bundled}). Use --checkpoint PATH with a checkpoint file instead.")
        return bundled

    target = cache_target(entry)
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
    logger.info("Downloading %s (%s) from %s to %s", entry.name, entry.size_hint or fmt_bytes(entry.size),
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
    previous = read_json(sidecar_path(target))
    if previous and previous.get("sha256") and previous["sha256"] != result.sha256:
        logger.warning("The new download of %s has sha256 %s, unlike the %s recorded on %s for an earlier "
                       "copy; the record is replaced.", entry.filename, result.sha256, previous["sha256"],
                       previous.get("recorded", "?"))
    if entry.sha256:
        record(target, result.sha256, source="published-sha256", url=url, name=entry.name)
    else:
        record(target, result.sha256, source="trust-on-first-use", url=url, name=entry.name)
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
    target = cache_target(entry)
    removed: List[Path] = []
    lock = lock_download(target, download_options.get("lock_timeout", 3600.0))
    try:
        if target.is_file():
            problem, _, _ = check_cached(target, entry)
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
                    raise write_error(p, exc) from None
                removed.append(p)
    finally:
        lock.release()
    path = resolve_checkpoint(entry.name, progress=progress, **download_options)
    return path, removed
