"""Reading and writing volumes (NIfTI, NRRD, MHA/MHD, DICOM series) and resampling (the LPS file boundary).

Conventions (shared by :mod:`SAM3DSegmentLib.io.segmentations`):

* Everything returned is a :class:`~SAM3DSegmentLib.core.geometry.Volume`: ``array[k, j, i]`` plus an
  ``ijk_to_ras`` 4x4 matrix (RAS mm). Files on disk are LPS (ITK, NRRD, DICOM, ``.seg.nrrd``); the
  LPS<->RAS flip happens in ``Volume.from_sitk`` / ``Volume.to_sitk`` and, for ``.seg.nrrd``, in
  :mod:`SAM3DSegmentLib.io.segmentations`.
* Every write is atomic (:mod:`SAM3DSegmentLib.core.atomic`): a temporary file with the same extension in the
  destination directory (so ITK picks the right format), flushed and fsync'ed, checked (the header read
  back; NIfTI: every promised byte present, :mod:`SAM3DSegmentLib.core.nifti`, since SimpleITK's NIfTI writer
  does not raise on a full disk), then ``os.replace``; the temporary is removed on failure and the old file
  kept. A symlinked output is written through. ``group=`` stages a file into an
  :class:`~SAM3DSegmentLib.core.atomic.AtomicGroup`.
* Bad input raises :class:`VolumeReadError` (a ``ValueError``) whose message names the file, the problem
  and what to do.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import numpy as np

from ..core.geometry import RAS_TO_LPS, GeometryError, Volume
from ..core.nifti import NiftiProblem, check_nifti_complete
from .dicom import read_dicom_series
from .errors import VolumeReadError, VolumeWriteError

__all__ = [
    "VolumeReadError", "VolumeWriteError", "READ_EXTENSIONS", "WRITE_EXTENSIONS", "file_extension",
    "read_volume", "write_volume", "resample_like", "atomic_write",
]

#: Extensions ``read_volume`` accepts (plus a DICOM series directory).
READ_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
#: Extensions ``write_volume`` / ``write_mask`` produce (single-file formats only, so writes are atomic).
WRITE_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".mha")


def file_extension(path: str) -> str:
    """Lower-case extension including compound ones: ``.nii.gz``, ``.seg.nrrd``."""
    name = os.path.basename(str(path)).lower()
    for compound in (".seg.nrrd", ".nii.gz"):
        if name.endswith(compound):
            return compound
    return os.path.splitext(name)[1]


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
        return _to_volume(*read_dicom_series(path, series_uid))
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
    return _to_volume(image, array, path, {"source": path, "format": ext.lstrip(".")})


def _check_nifti_complete(path: str) -> None:
    """Raise VolumeReadError if a .nii / .nii.gz holds less data than its header promises."""
    try:
        check_nifti_complete(path, full=False)
    except NiftiProblem as p:
        if p.kind == "unreadable":
            msg = f"{path}: could not be read as a NIfTI image (corrupt or truncated file?): {p.detail}"
        elif p.kind == "header":
            msg = f"{path}: {p.detail}; the file is corrupt or not NIfTI"
        else:
            msg = f"{path}: corrupt or truncated file: {p.detail}; copy or export it again"
        raise VolumeReadError(msg) from p


def _to_volume(image, array: np.ndarray, what: str, meta: dict) -> Volume:
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
