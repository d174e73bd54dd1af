"""Reading a DICOM series from a folder (SimpleITK / GDCM), refusing series that would be stacked wrongly.

ITK stacks a series' slices on a uniform grid and only logs a warning when they are not evenly spaced, so a
missing or duplicated slice would silently shift everything after it: such series are refused here.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from .errors import VolumeReadError


def read_dicom_series(folder: str, series_uid: Optional[str] = None):
    """Read one DICOM series of ``folder`` (``series_uid``, or the series with the most files).

    Returns ``(image, array, what, meta)``: the SimpleITK image, a view of its voxels, the name to use in
    messages, and the ``meta`` entries :func:`SAM3DSegmentLib.io.volumes.read_volume` documents
    (``series_uid``, ``n_files``, ``other_series``, ``series_files``, ``source``, ``format``). A series with a
    single slice, or slices that are not parallel or not evenly spaced, raises :class:`VolumeReadError`.
    """
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
    return image, array, what, dict(source=folder, format="dicom", series_uid=uid, n_files=len(names),
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
