"""Is a NIfTI file complete? Its header is read and every byte it promises must be there (standard library only).

SimpleITK reads a truncated NIfTI file without complaint, and its NIfTI writer does not raise on a full disk
(it prints ``wrote only 4096 of 163840 bytes`` on stderr and returns). So the library checks the size itself:
:func:`SAM3DSegmentLib.core.atomic.atomic_write` before it renames any ``.nii`` / ``.nii.gz`` it wrote into
place (:func:`verify_nifti_written`), and :func:`SAM3DSegmentLib.io.volumes.read_volume` before it reads one.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib

__all__ = ["NiftiProblem", "check_nifti_complete", "verify_nifti_written"]


class NiftiProblem(Exception):
    """Why a NIfTI file is not complete: ``kind`` is ``header`` (no NIfTI header), ``unreadable`` (I/O or
    gzip error before the header) or ``short`` (less data than the header promises)."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind, self.detail = kind, detail


def _expected_size(header: bytes) -> int:
    """Bytes a NIfTI-1/2 file must hold (vox_offset + voxel data), from its header."""
    for endian in ("<", ">"):
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            vox_offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dims = struct.unpack(endian + "8q", header[16:80])
            vox_offset = struct.unpack(endian + "q", header[168:176])[0]
            break
    else:
        raise NiftiProblem("header", f"not a NIfTI file (bad header size field; {len(header)} header bytes)")
    ndim = max(0, min(int(dims[0]), 7))
    n = 1
    for d in dims[1:ndim + 1]:
        n *= max(int(d), 0)
    return int(vox_offset) + n * max(int(bitpix), 0) // 8


def check_nifti_complete(path: str, full: bool) -> None:
    """Raise :class:`NiftiProblem` if a .nii / .nii.gz holds less data than its header promises.

    For ``.nii.gz`` the gzip trailer's length is trusted when it matches (fast path for reading);
    ``full=True`` always decompresses the whole stream, which also checks its CRC."""
    gz = path.lower().endswith(".gz")
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            header = f.read(540)
    except (OSError, EOFError, zlib.error) as err:
        raise NiftiProblem("unreadable", str(err)) from err
    expected = _expected_size(header)
    if not gz:
        size = os.path.getsize(path)
        if size < expected:
            raise NiftiProblem("short", f"the header promises {expected} bytes, the file has {size}")
        return
    with open(path, "rb") as f:  # gzip trailer: uncompressed size mod 2^32 (cheap first check)
        f.seek(-4, os.SEEK_END)
        isize = int.from_bytes(f.read(4), "little")
    if isize == expected % (1 << 32) and not full:
        return
    total = 0
    try:
        with gzip.open(path, "rb") as f:
            while True:
                chunk = f.read(1 << 22)
                if not chunk:
                    break
                total += len(chunk)
    except (OSError, EOFError, zlib.error) as err:
        raise NiftiProblem("short", f"the compressed stream ends early or is damaged ({err})") from err
    if total < expected:
        raise NiftiProblem("short", f"the header promises {expected} bytes, the decompressed data has {total}")


def verify_nifti_written(path: str) -> None:
    """Check a NIfTI file just written: header present, every promised byte there (``.nii.gz``: the whole
    stream decompressed and CRC-checked). Raises ``ValueError`` saying what is missing."""
    try:
        check_nifti_complete(path, full=True)
    except NiftiProblem as p:
        raise ValueError(p.detail) from p
