"""Reading and writing volumes, masks and ``.seg.nrrd`` segmentations (the LPS file boundary).

Conventions:

* Everything returned is a :class:`~SAM3DSegmentLib.core.geometry.Volume`: ``array[k, j, i]`` plus an
  ``ijk_to_ras`` 4x4 matrix (RAS mm). Files on disk are LPS (ITK, NRRD, DICOM, ``.seg.nrrd``); the
  LPS<->RAS flip happens in ``Volume.from_sitk`` / ``Volume.to_sitk`` and, for ``.seg.nrrd``, here.
* slicerio's ``voxels`` are ``(i, j, k)``; they are transposed to ``[k, j, i]`` on the way in and back
  on the way out.
* Every write is atomic (:mod:`SAM3DSegmentLib.core.atomic`): a temporary file with the same extension in the
  destination directory (so ITK picks the right format), flushed and fsync'ed, checked (the header read
  back; NIfTI: every promised byte present, since SimpleITK's NIfTI writer does not raise on a full disk),
  then ``os.replace``; the temporary is removed on failure and the old file kept. A symlinked output is
  written through. ``group=`` stages a file into an :class:`~SAM3DSegmentLib.core.atomic.AtomicGroup`.
* Bad input raises :class:`VolumeReadError` (a ``ValueError``) whose message names the file, the problem
  and what to do.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Sequence

import numpy as np

from ..core.geometry import LPS_TO_RAS, RAS_TO_LPS, GeometryError, Volume

__all__ = [
    "VolumeReadError", "VolumeWriteError", "READ_EXTENSIONS", "WRITE_EXTENSIONS", "file_extension",
    "read_volume", "write_volume", "write_mask", "read_segmentation", "write_segmentation",
    "resample_like", "atomic_write", "verify_nifti_written",
]

#: Extensions ``read_volume`` accepts (plus a DICOM series directory).
READ_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
#: Extensions ``write_volume`` / ``write_mask`` produce (single-file formats only, so writes are atomic).
WRITE_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".mha")


class VolumeReadError(ValueError):
    """A file or folder that cannot be turned into a 3D scalar volume (the message says why and the fix)."""


class VolumeWriteError(ValueError):
    """A volume that cannot be written where or how it was asked."""


def file_extension(path: str) -> str:
    """Lower-case extension including compound ones: ``.nii.gz``, ``.seg.nrrd``."""
    name = os.path.basename(str(path)).lower()
    for compound in (".seg.nrrd", ".nii.gz"):
        if name.endswith(compound):
            return compound
    return os.path.splitext(name)[1]


# -------------------------------------------------------------------------------- reading
def read_volume(path: str, series_uid: Optional[str] = None) -> Volume:
    """Read a 3D scalar image: NIfTI, NRRD, MHA/MHD, or a folder holding a DICOM series.

    For a folder, ``series_uid`` picks the series (SeriesInstanceUID); without it the series with the
    most files is read. ``meta["series_uid"]`` records the series read, ``meta["other_series"]`` the
    other series' UIDs and ``meta["series_files"]`` ``{uid: number of files}`` for every series. A
    series whose slices are not evenly spaced (missing slices, duplicates) or not parallel is refused:
    read on a uniform grid its geometry would be wrong.
    ``meta`` also holds ``source`` (the path), ``format`` and ``pixel_type``. Floating-point images
    with NaN, infinite values or values beyond the float32 range (what the model computes in) are refused.
    """
    import SimpleITK as sitk

    path = os.fspath(path)
    if not os.path.exists(path):
        raise VolumeReadError(f"{path}: no such file or folder; check the path")
    if os.path.isdir(path):
        return _read_dicom_series(path, series_uid)
    if series_uid is not None:
        raise VolumeReadError(f"{path}: a series UID was given, but this is a file; a series can only be "
                              "chosen in a DICOM folder")
    ext = file_extension(path)
    if ext == ".seg.nrrd":
        raise VolumeReadError(f"{path} is a Slicer segmentation, not an image; read it with "
                              "read_segmentation()")
    if ext == ".dcm" or ext == "":
        raise VolumeReadError(f"{path}: a single file without an image extension; for DICOM give the "
                              "folder that holds the whole series")
    if ext not in READ_EXTENSIONS:
        raise VolumeReadError(f"{path}: unsupported file type '{ext}'; give one of "
                              f"{', '.join(READ_EXTENSIONS)} or a DICOM series folder")
    if os.path.getsize(path) == 0:
        raise VolumeReadError(f"{path} is empty (0 bytes); the file is truncated, write or copy it again")
    if ext in (".nii", ".nii.gz"):
        _check_nifti_complete(path)  # ITK reads truncated NIfTI files without complaint
    try:
        image = sitk.ReadImage(path)
        # Force the pixel data in now, so a truncated file fails here, not later.
        array = sitk.GetArrayViewFromImage(image)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        detail = next((ln for ln in reversed(first) if ln.strip()), "") if first else ""
        raise VolumeReadError(f"{path}: could not be read as a {ext} image (corrupt or truncated file?): "
                              f"{detail}") from err
    return _to_volume(image, array, path, source=path, format=ext.lstrip("."))


class _NiftiProblem(Exception):
    """Why a NIfTI file is not complete: ``kind`` is ``header`` (no NIfTI header), ``unreadable`` (I/O or
    gzip error before the header) or ``short`` (less data than the header promises)."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind, self.detail = kind, detail


def _nifti_expected_size(header: bytes) -> int:
    """Bytes a NIfTI-1/2 file must hold (vox_offset + voxel data), from its header."""
    import struct

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
        raise _NiftiProblem("header", f"not a NIfTI file (bad header size field; {len(header)} header bytes)")
    ndim = max(0, min(int(dims[0]), 7))
    n = 1
    for d in dims[1:ndim + 1]:
        n *= max(int(d), 0)
    return int(vox_offset) + n * max(int(bitpix), 0) // 8


def _nifti_check(path: str, full: bool) -> None:
    """Raise :class:`_NiftiProblem` if a .nii / .nii.gz holds less data than its header promises.

    For ``.nii.gz`` the gzip trailer's length is trusted when it matches (fast path for reading);
    ``full=True`` always decompresses the whole stream, which also checks its CRC."""
    import gzip
    import zlib

    gz = path.lower().endswith(".gz")
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            header = f.read(540)
    except (OSError, EOFError, zlib.error) as err:
        raise _NiftiProblem("unreadable", str(err)) from err
    expected = _nifti_expected_size(header)
    if not gz:
        size = os.path.getsize(path)
        if size < expected:
            raise _NiftiProblem("short", f"the header promises {expected} bytes, the file has {size}")
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
        raise _NiftiProblem("short", f"the compressed stream ends early or is damaged ({err})") from err
    if total < expected:
        raise _NiftiProblem("short", f"the header promises {expected} bytes, the decompressed data has {total}")


def _check_nifti_complete(path: str) -> None:
    """Raise VolumeReadError if a .nii / .nii.gz holds less data than its header promises."""
    try:
        _nifti_check(path, full=False)
    except _NiftiProblem as p:
        if p.kind == "unreadable":
            msg = f"{path}: could not be read as a NIfTI image (corrupt or truncated file?): {p.detail}"
        elif p.kind == "header":
            msg = f"{path}: {p.detail}; the file is corrupt or not NIfTI"
        else:
            msg = f"{path}: corrupt or truncated file: {p.detail}; copy or export it again"
        raise VolumeReadError(msg) from p


def verify_nifti_written(path: str) -> None:
    """Check a NIfTI file just written: header present, every promised byte there (``.nii.gz``: the whole
    stream decompressed and CRC-checked). Raises ``ValueError`` saying what is missing."""
    try:
        _nifti_check(path, full=True)
    except _NiftiProblem as p:
        raise ValueError(p.detail) from p


def _to_volume(image, array: np.ndarray, what: str, **meta) -> Volume:
    """Checks shared by files and DICOM series, then ``Volume.from_sitk``."""
    dim = image.GetDimension()
    ncomp = image.GetNumberOfComponentsPerPixel()
    if dim == 2:
        raise VolumeReadError(f"{what} is a 2D image ({image.GetSize()[0]}x{image.GetSize()[1]}); "
                              "3D segmentation needs a volume (for DICOM give the folder with all slices)")
    if dim == 4:
        raise VolumeReadError(f"{what} is a 4D image (size {list(image.GetSize())}); split it into 3D "
                              "frames and give one of them")
    if dim != 3:
        raise VolumeReadError(f"{what} has {dim} dimensions; a 3D volume is needed")
    if ncomp != 1:
        raise VolumeReadError(f"{what} has {ncomp} components per voxel (vector/RGB image); convert it to a "
                              "single-channel (scalar) CT volume first")
    size = image.GetSize()
    if min(size) < 2 and sum(s > 1 for s in size) < 3:
        raise VolumeReadError(f"{what} has a single slice (size {list(size)}): a 2D image stored as 3D; "
                              "give the whole volume")
    if array.dtype.kind == "f":
        n_nan = int(np.count_nonzero(np.isnan(array)))
        n_inf = int(np.count_nonzero(np.isinf(array)))
        if n_nan or n_inf:
            raise VolumeReadError(
                f"{what} contains {n_nan} NaN and {n_inf} infinite voxel value(s) out of {array.size}; "
                "replace them with a finite value (e.g. -1024 HU for air) before segmenting")
        f32max = float(np.finfo(np.float32).max)
        if array.dtype.itemsize > 4 and array.size:
            big = float(np.max(np.abs(array)))
            if big > f32max:
                n_big = int(np.count_nonzero(np.abs(array) > f32max))
                raise VolumeReadError(
                    f"{what} has {n_big} voxel value(s) beyond the float32 range (largest magnitude {big:.3g} > "
                    f"{f32max:.3g}); the model computes in float32, where they become infinite. Clip or "
                    "rescale the image to its real range (CT: about -1024..3071 HU) before segmenting")
    meta.setdefault("pixel_type", image.GetPixelIDTypeAsString())
    try:
        return Volume.from_sitk(image, **meta)
    except GeometryError as err:
        raise VolumeReadError(f"{what}: {err}") from err


def _read_dicom_series(folder: str, series_uid: Optional[str] = None) -> Volume:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    try:
        uids = list(reader.GetGDCMSeriesIDs(folder))
    except RuntimeError:  # pragma: no cover - GDCM failure on unreadable folder
        uids = []
    if not uids:
        n = len(os.listdir(folder))
        raise VolumeReadError(f"{folder}: no DICOM series found ({n} entries in the folder); give the folder "
                              "that holds the .dcm slices of one CT series, or an image file")
    files = {uid: list(reader.GetGDCMSeriesFileNames(folder, uid)) for uid in uids}
    if series_uid is not None:
        if series_uid not in files:
            listing = "; ".join(f"{u} ({len(files[u])} files)" for u in uids)
            raise VolumeReadError(f"{folder}: no DICOM series with UID {series_uid}; the folder holds: {listing}. "
                                  "Give one of these UIDs")
        uid = series_uid
    else:
        uid = max(uids, key=lambda u: len(files[u]))
    names = files[uid]
    if len(names) < 2:
        raise VolumeReadError(f"{folder}: DICOM series {uid} has a single slice; a 3D volume needs the whole "
                              "series")
    reader.SetFileNames(names)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
        array = sitk.GetArrayViewFromImage(image)
    except RuntimeError as err:
        raise VolumeReadError(f"{folder}: DICOM series {uid} could not be read: "
                              f"{str(err).strip().splitlines()[-1] if str(err).strip() else err}") from err
    what = f"{folder} (DICOM series {uid})"
    _check_dicom_slices(reader, names, what)
    return _to_volume(image, array, what, source=folder, format="dicom",
                      series_uid=uid, n_files=len(names),
                      other_series=[u for u in uids if u != uid],
                      series_files={u: len(files[u]) for u in uids})


def _dicom_floats(reader, index: int, tag: str, n: int, what: str, name: str) -> np.ndarray:
    try:
        values = [float(v) for v in reader.GetMetaData(index, tag).split("\\")]
    except (RuntimeError, ValueError):
        values = []
    if len(values) != n:
        field = {"0020|0032": "Image Position (Patient)", "0020|0037": "Image Orientation (Patient)"}[tag]
        raise VolumeReadError(f"{what}: slice {os.path.basename(name)} has no valid {field} ({tag}); the "
                              "slice geometry is unknown, so the series cannot be stacked into a volume")
    return np.asarray(values)


def _check_dicom_slices(reader, names: Sequence[str], what: str) -> None:
    """Refuse a series whose slices are not parallel or not evenly spaced (gaps, duplicates).

    ITK stacks the slices on a uniform grid with the spacing of the first two and only logs a warning,
    so a missing slice would silently shift everything after it.
    """
    n = len(names)
    orient = [_dicom_floats(reader, i, "0020|0037", 6, what, names[i]) for i in range(n)]
    pos = np.array([_dicom_floats(reader, i, "0020|0032", 3, what, names[i]) for i in range(n)])
    for i in range(1, n):
        if np.max(np.abs(orient[i] - orient[0])) > 1e-3:
            raise VolumeReadError(f"{what}: slices {os.path.basename(names[0])} and {os.path.basename(names[i])} "
                                  "have different orientations; give a series of parallel slices")
    normal = np.cross(orient[0][:3], orient[0][3:])
    norm = float(np.linalg.norm(normal))
    if norm < 1e-6:
        raise VolumeReadError(f"{what}: Image Orientation (Patient) of {os.path.basename(names[0])} is degenerate")
    dist = pos @ (normal / norm)
    order = np.argsort(dist, kind="stable")
    gaps = np.diff(dist[order])
    median = float(np.median(gaps))
    for g, (a, b) in zip(gaps, zip(order[:-1], order[1:])):
        if g < 1e-3:
            raise VolumeReadError(f"{what}: slices {os.path.basename(names[a])} and {os.path.basename(names[b])} "
                                  "are at the same position (duplicate slice or a second acquisition mixed in); "
                                  "remove the duplicates or give a folder with one series")
    # 10% of the step: small rounding of the stored positions passes; a missing slice doubles a step
    tol = max(0.1 * median, 0.01)
    bad = np.flatnonzero(np.abs(gaps - median) > tol)
    if bad.size:
        k = int(bad[0])
        a, b = order[k], order[k + 1]
        missing = int(round(gaps[k] / median)) - 1 if median > 0 else 0
        hint = (f" ({missing} slice(s) missing?)" if missing >= 1 else "")
        raise VolumeReadError(
            f"{what}: slices are not evenly spaced: {gaps[k]:.3f} mm between {os.path.basename(names[a])} and "
            f"{os.path.basename(names[b])} where the series steps {median:.3f} mm{hint}; {bad.size} uneven "
            "step(s) in all. Re-export the complete series, or resample it to a uniform grid and save it as "
            "NIfTI/NRRD first")


# -------------------------------------------------------------------------------- writing
def atomic_write(path: str, write: Callable[[str], None], verify: Optional[Callable[[str], None]] = None,
                 group=None) -> str:
    """:func:`SAM3DSegmentLib.core.atomic.atomic_write` (temporary beside ``path`` with the same extension, fsync,
    check, rename; a symlink is written through) with the folder checks reported as
    :class:`VolumeWriteError`. ``group``: an :class:`~SAM3DSegmentLib.core.atomic.AtomicGroup` to stage into."""
    from ..core.atomic import atomic_write as _atomic_write
    from ..core.atomic import resolve_target

    path = os.path.abspath(os.fspath(path))
    target = resolve_target(path)
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        raise VolumeWriteError(f"{path}: the folder {folder} does not exist; create it first")
    if os.path.isdir(target):
        raise VolumeWriteError(f"{path} is a folder; give a file name")
    return _atomic_write(path, write, verify=verify, group=group)


def _check_write_ext(path: str) -> str:
    ext = file_extension(path)
    if ext not in WRITE_EXTENSIONS:
        hint = " (use write_segmentation for .seg.nrrd)" if ext == ".seg.nrrd" else ""
        raise VolumeWriteError(f"{path}: cannot write '{ext}' files{hint}; use one of "
                               f"{', '.join(WRITE_EXTENSIONS)}")
    return ext


def write_volume(volume: Volume, path: str, compress: bool = True, group=None) -> str:
    """Write ``volume`` (any numeric dtype) to NIfTI / NRRD / MHA, atomically. Returns the path.

    Before the file replaces ``path``, its header is read back and must describe the image written (size,
    one component); a NIfTI file must also hold all its voxel data (SimpleITK's NIfTI writer does not
    raise on a short write). ``group``: stage into an :class:`~SAM3DSegmentLib.core.atomic.AtomicGroup`.
    """
    import SimpleITK as sitk

    _check_write_ext(path)
    arr = np.asarray(volume.array)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    image = volume.to_sitk(arr)

    def write(tmp: str) -> None:
        try:
            sitk.WriteImage(image, tmp, bool(compress))
        except RuntimeError as err:
            lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
            raise VolumeWriteError(f"{path}: SimpleITK could not write the file ({lines[-1] if lines else err}); "
                                   "is the disk full or the folder read-only?") from err

    def verify(tmp: str) -> None:
        reader = sitk.ImageFileReader()
        reader.SetFileName(tmp)
        try:
            reader.ReadImageInformation()
        except RuntimeError as err:
            lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
            raise VolumeWriteError(f"its header cannot be read back ({lines[-1] if lines else err})") from err
        if tuple(reader.GetSize()) != tuple(image.GetSize()) or reader.GetNumberOfComponents() != 1:
            raise VolumeWriteError(f"its header says size {list(reader.GetSize())}, "
                                   f"{reader.GetNumberOfComponents()} component(s); written: "
                                   f"{list(image.GetSize())}, 1")

    return atomic_write(path, write, verify=verify, group=group)


def write_mask(mask: Volume, path: str, compress: bool = True, label_value: int = 1, group=None) -> str:
    """Write a binary mask as uint8 (``label_value`` where the mask is non-zero, 0 elsewhere)."""
    if not 0 < int(label_value) < 256:
        raise VolumeWriteError(f"label_value must be in 1..255, got {label_value}")
    arr = np.asarray(mask.array)
    out = (arr != 0).astype(np.uint8) * np.uint8(label_value)
    return write_volume(mask.with_array(out), path, compress, group=group)


# -------------------------------------------------------------------------------- resampling
def resample_like(volume: Volume, reference: Volume, interpolation: str = "nearest",
                  default_value: float = 0.0) -> Volume:
    """``volume`` resampled onto ``reference``'s grid in physical space (SimpleITK).

    ``interpolation``: ``"nearest"`` (labels; keeps the dtype) or ``"linear"`` (float32 output).
    Voxels of the reference outside ``volume`` get ``default_value``. Same grid: returned as is.
    """
    import SimpleITK as sitk

    if volume.same_grid(reference, atol=1e-6):
        return volume.with_array(volume.array.copy())
    interp = {"nearest": sitk.sitkNearestNeighbor, "linear": sitk.sitkLinear}[interpolation]
    src = volume.to_sitk()
    if interpolation == "linear":
        src = sitk.Cast(src, sitk.sitkFloat32)
    ijk_to_lps = RAS_TO_LPS @ reference.ijk_to_ras
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    f = sitk.ResampleImageFilter()
    f.SetSize([int(v) for v in reference.shape_ijk])
    f.SetOutputSpacing(spacing.tolist())
    f.SetOutputDirection((ijk_to_lps[:3, :3] / spacing[None, :]).reshape(-1).tolist())
    f.SetOutputOrigin(ijk_to_lps[:3, 3].tolist())
    f.SetInterpolator(interp)
    f.SetDefaultPixelValue(float(default_value))
    f.SetOutputPixelType(src.GetPixelID())
    out = f.Execute(src)
    return Volume(sitk.GetArrayFromImage(out), reference.ijk_to_ras.copy(), dict(volume.meta))


# -------------------------------------------------------------------------------- .seg.nrrd
def read_segmentation(path: str, reference: Optional[Volume] = None) -> Dict[str, Volume]:
    """Read a Slicer ``.seg.nrrd``: ``{segment name: uint8 mask Volume}``.

    Overlapping segments (several layers) and shared labelmaps (label values) are both handled. The
    masks are on the segmentation's own grid (its voxel positions come from the file's space origin and
    directions, which already include any extent offset), or resampled by nearest neighbour onto
    ``reference``'s grid in physical space when given. ``meta`` of each mask holds ``color``, ``id``,
    ``label_value`` and ``layer`` from the file.
    """
    import slicerio

    path = os.fspath(path)
    if not os.path.exists(path):
        raise VolumeReadError(f"{path}: no such file; check the path")
    try:
        seg = slicerio.read_segmentation(path)
    except Exception as err:  # slicerio/pynrrd raise many types
        raise VolumeReadError(f"{path}: could not be read as a Slicer segmentation (.seg.nrrd): "
                              f"{type(err).__name__}: {err}") from err
    voxels = seg.get("voxels")
    if voxels is None or np.asarray(voxels).ndim not in (3, 4):
        raise VolumeReadError(f"{path}: the segmentation holds no 3D labelmap voxels")
    ijk_to_lps = np.asarray(seg["ijkToLPS"], dtype=np.float64)
    ijk_to_ras = LPS_TO_RAS @ ijk_to_lps
    out: Dict[str, Volume] = {}
    for segment in seg.get("segments", []):
        mask_ijk = slicerio.segment_mask(seg, segment)
        arr = np.ascontiguousarray(np.asarray(mask_ijk, dtype=np.uint8).transpose(2, 1, 0))
        meta = {"source": path, "id": segment.get("id"), "color": segment.get("color"),
                "label_value": segment.get("labelValue"), "layer": segment.get("layer", 0),
                "name": segment.get("name")}
        vol = Volume(arr, ijk_to_ras, meta)
        if reference is not None:
            vol = resample_like(vol, reference, "nearest")
            vol.meta.update(meta)
        name = segment.get("name") or segment.get("id")
        if name in out:
            name = f"{name} ({segment.get('id')})"
        out[name] = vol
    return out


def write_segmentation(path: str, masks: Dict[str, Volume], reference: Volume,
                       colors: Optional[Dict[str, Sequence[float]]] = None, group=None) -> str:
    """Write masks as a Slicer ``.seg.nrrd`` on ``reference``'s grid (LPS in the file), atomically.

    Masks on another grid are resampled onto it by nearest neighbour. Overlapping masks go to separate
    layers (as Slicer stores them). ``colors``: optional ``{name: (r, g, b)}`` in 0..1. ``group``: stage
    into an :class:`~SAM3DSegmentLib.core.atomic.AtomicGroup`.
    """
    import slicerio

    path = os.fspath(path)
    if file_extension(path) != ".seg.nrrd":
        raise VolumeWriteError(f"{path}: a segmentation file name must end with .seg.nrrd")
    if not masks:
        raise VolumeWriteError("no masks to write: give at least one {name: mask}")
    colors = colors or {}
    seg = slicerio.create_segmentation(tuple(reference.shape_ijk), RAS_TO_LPS @ reference.ijk_to_ras)
    for n, (name, mask) in enumerate(masks.items()):
        if not mask.same_grid(reference, atol=1e-6):
            mask = resample_like(mask, reference, "nearest")
        fields = {"id": f"Segment_{n + 1}", "name": str(name)}
        if name in colors:
            fields["color"] = [float(c) for c in colors[name]]
        slicerio.add_segment(seg, np.asarray(mask.array).transpose(2, 1, 0) != 0, fields)

    def write(tmp: str) -> None:
        slicerio.write_segmentation(tmp, seg)

    return atomic_write(path, write, group=group)
