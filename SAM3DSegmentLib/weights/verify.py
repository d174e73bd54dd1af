"""Is a cached checkpoint the file it claims to be? sha256, the content check, and the checksum record.

A published sha256 is always enforced. Where none is published, the content must first look like a
SAM-Med3D-family ``torch.save`` file (:func:`payload_problem`, read without torch: an HTML page from a captive
portal is refused); then the sha256 of the first complete download is recorded in ``<file>.json`` next to the
cached file (trust on first use) and every later load is checked against both.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
from pathlib import Path
from typing import Optional, Union

from ..core.atomic import write_json
from .errors import ChecksumError
from .registry import ModelWeights

logger = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".json"


def sidecar_path(path: Union[str, Path]) -> Path:
    """The checksum record kept next to a cached file: ``<file>.json``."""
    p = Path(path)
    return p.with_name(p.name + SIDECAR_SUFFIX)


def sha256_file(path: Union[str, Path], chunk_size: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_size), b""):
            h.update(block)
    return h.hexdigest()


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def read_json(path: Path) -> Optional[dict]:
    """The JSON object in ``path``, or None when it is missing, unreadable or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def record(path: Path, digest: str, *, source: str, url: Optional[str], name: Optional[str]) -> dict:
    """Write the checksum record of ``path`` (``source``: ``"published-sha256"`` or ``"trust-on-first-use"``).

    A cache that cannot be written (a read-only shared cache) is still usable: the record is then only logged.
    """
    st = path.stat()
    data = {
        "file": path.name,
        "name": name,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "sha256": digest,
        "verified": source,
        "url": url,
        "recorded": utc_now(),
    }
    try:
        write_json(sidecar_path(path), data, sort_keys=True)
    except OSError as exc:
        logger.warning("Could not record the sha256 of %s in %s (%s); it will be re-checked but not "
                       "remembered.", path, sidecar_path(path), exc)
    return data


def payload_problem(path: Union[str, Path]) -> Optional[str]:
    """None when ``path`` is a ``torch.save`` file holding a model (a SAM-Med3D-family state dict or a
    3DSAM-adapter file, :func:`SAM3DSegmentLib.models.families.model_file_problem`), else what is wrong.

    Checked without torch and without reading the tensor data (:mod:`SAM3DSegmentLib.models.checkpoint_file`).
    Used before a file without a published sha256 is trusted: an HTML page a captive portal answered
    with status 200 must never be pinned as the model.
    """
    from ..models.checkpoint_file import CheckpointError, inspect_checkpoint
    from ..models.families import model_file_problem

    try:
        return model_file_problem(inspect_checkpoint(path))
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


def check_cached(path: Path, entry: Optional[ModelWeights]) -> tuple:
    """Hash ``path`` and compare it with the published sha256 or its first-use record; for files without a
    published sha256 also check that the content is a SAM-Med3D-family checkpoint. Writes nothing.

    Returns ``(problem, digest, record)``: ``problem`` is None or ``(message, expected, actual)``, the message
    saying how to recover.
    """
    digest = sha256_file(path)
    published = entry.sha256.lower() if entry and entry.sha256 else None
    rec = read_json(sidecar_path(path))
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
    problem, digest, rec = check_cached(path, entry)
    if problem:
        raise ChecksumError(*problem)
    url = entry.download_url() if entry else None
    name = entry.name if entry else None
    if entry and entry.sha256:
        if not rec or rec.get("sha256") != digest or rec.get("verified") != "published-sha256":
            rec = record(path, digest, source="published-sha256", url=url, name=name)
        return rec
    if rec and rec.get("sha256"):
        return rec
    rec = record(path, digest, source="trust-on-first-use", url=url, name=name)
    logger.warning(
        "No published sha256 exists for %s; recorded sha256 %s of the file first seen at %s in %s "
        "(trust on first use). Later loads are checked against it.", path.name, digest, path,
        sidecar_path(path))
    return rec


def checksum_status(path: Union[str, Path], entry: Optional[ModelWeights] = None) -> str:
    """A one-line verification state for reports, from the ``<file>.json`` record (no hashing)."""
    path = Path(path)
    rec = read_json(sidecar_path(path))
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
