"""Exporting a segmentation: Slicer's ``.seg.nrrd``, NIfTI on the reference volume's grid, DICOM SEG.

Files are written atomically (:mod:`SAM3DSegmentLib.core.atomic`): a failed export leaves no partial file and
keeps an older file of the same name.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

import numpy as np

from ..core.atomic import atomic_write
from .labelmap import read_segment
from .volumes import volume_from_node


def export_seg_nrrd(segmentation_node, path: str, reference_volume=None) -> str:
    """Write the segmentation as a ``.seg.nrrd`` (LPS, Slicer's format; readable with ``slicerio``), atomically.

    With ``reference_volume`` the file holds the volume's full grid (not cropped to the segments)."""
    import slicer

    path = os.fspath(path)
    if not path.endswith(".seg.nrrd"):
        raise ValueError(f"{path}: the file name must end with .seg.nrrd")
    segmentation = segmentation_node.GetSegmentation()
    parameter = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    role = segmentation_node.GetReferenceImageGeometryReferenceRole()
    saved = (segmentation.GetConversionParameter(parameter), segmentation_node.GetNodeReferenceID(role))
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetCropToMinimumExtent(reference_volume is None)
    storage.SetUseCompression(1)

    def write(tmp: str) -> None:
        storage.SetFileName(tmp)
        if not storage.WriteData(segmentation_node):
            raise OSError(f"writing {path} failed (is the folder writable and is there free disk space?)")

    try:
        if reference_volume is not None:  # the file holds the volume's whole grid; restored below
            segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
        return atomic_write(path, write)
    finally:
        if reference_volume is not None:
            segmentation.SetConversionParameter(parameter, saved[0] or "")
            segmentation_node.SetNodeReferenceID(role, saved[1])


def export_nifti(segmentation_node, path: str, reference_volume, segment_ids: Optional[Sequence[str]] = None):
    """Write segments as NIfTI on the reference volume's full grid (LPS on disk, like the source CT), atomically.

    ``path`` ending in ``.nii`` / ``.nii.gz``: one labelmap, label n = n-th segment of ``segment_ids`` (all by
    default; later segments win where they overlap). ``path`` a folder: one binary file per segment, named after
    the segment. Returns ``{label_value_or_file: segment_name}``.
    """
    import SimpleITK as sitk

    if reference_volume is None:
        raise ValueError("NIfTI export needs the reference volume (its grid defines the output)")
    segmentation = segmentation_node.GetSegmentation()
    ids = list(segment_ids) if segment_ids is not None else \
        [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
    if not ids:
        raise ValueError("there are no segments to export")
    ref = volume_from_node(reference_volume, frame="volume")
    path = os.fspath(path)
    out = {}
    if path.endswith((".nii", ".nii.gz")):
        labels = np.zeros(ref.array.shape, dtype=np.uint16 if len(ids) > 255 else np.uint8)
        for n, sid in enumerate(ids, start=1):
            labels[read_segment(segmentation_node, sid, reference_volume) > 0] = n
            out[n] = segmentation.GetSegment(sid).GetName()
        _write_sitk_atomic(ref.to_sitk(labels), path, sitk)
        return out
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is neither a .nii/.nii.gz file name nor an existing folder")
    for sid in ids:
        name = segmentation.GetSegment(sid).GetName() or sid
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or sid
        target = os.path.join(path, safe + ".nii.gz")
        _write_sitk_atomic(ref.to_sitk(read_segment(segmentation_node, sid, reference_volume)), target, sitk)
        out[target] = name
    return out


def _write_sitk_atomic(image, path: str, sitk) -> None:
    atomic_write(path, lambda tmp: sitk.WriteImage(image, tmp, True))


def export_segmentation(kind: str, segmentation_node, volume_node, path: str):
    """The module's Export buttons: ``kind`` "seg.nrrd" | "nifti" | "dicom" (``path`` a file, or the folder for
    DICOM); the file extension is added when the user left it out. Returns the path(s) written."""
    if kind == "seg.nrrd":
        return export_seg_nrrd(segmentation_node, path if path.endswith(".seg.nrrd") else path + ".seg.nrrd",
                               volume_node)
    if kind == "nifti":
        target = path if path.endswith((".nii", ".nii.gz")) else path + ".nii.gz"
        export_nifti(segmentation_node, target, volume_node)
        return target
    if kind == "dicom":
        return export_dicom_seg(segmentation_node, path, volume_node)
    raise ValueError(f"unknown export kind {kind!r}: use 'seg.nrrd', 'nifti' or 'dicom'")


def export_dicom_seg(segmentation_node, folder: str, reference_volume) -> List[str]:
    """Export a DICOM SEG object with the DICOMSegmentationPlugin (only inside Slicer with the DICOM module; the
    plugin ships with Slicer from 5.12, before that with the QuantitativeReporting extension).

    The reference volume must have been loaded from DICOM. Returns the files the exporter wrote."""
    if reference_volume is None or not reference_volume.GetAttribute("DICOM.instanceUIDs"):
        raise ValueError("DICOM SEG export needs a reference volume loaded from DICOM (DICOM module); "
                         "this volume was not, export .seg.nrrd or NIfTI instead")
    import slicer

    if getattr(slicer, "app", None) is None or not hasattr(getattr(slicer, "modules", None), "dicom"):
        raise RuntimeError("DICOM SEG export runs only inside 3D Slicer with the DICOM module")
    try:
        from DICOMSegmentationPlugin import DICOMSegmentationPluginClass
    except ImportError as exc:
        raise RuntimeError("DICOM SEG export needs Slicer 5.12 or newer (its DICOMSegmentationPlugin) or, on older "
                           "Slicer, the QuantitativeReporting extension (View > Extensions Manager); or export "
                           ".seg.nrrd or NIfTI instead") from exc
    os.makedirs(folder, exist_ok=True)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    # The exporter takes the segmentation's study from the subject hierarchy: put it next to the volume.
    vol_item = sh.GetItemByDataNode(reference_volume)
    seg_item = sh.GetItemByDataNode(segmentation_node)
    sh.SetItemParent(seg_item, sh.GetItemParent(vol_item))
    segmentation_node.SetNodeReferenceID(segmentation_node.GetReferenceImageGeometryReferenceRole(),
                                         reference_volume.GetID())
    before = set(os.listdir(folder))
    exporter = DICOMSegmentationPluginClass()
    exportables = exporter.examineForExport(seg_item)
    if not exportables:
        raise RuntimeError("the DICOM SEG exporter found nothing to export for this segmentation")
    for exportable in exportables:
        exportable.directory = folder
    message = exporter.export(exportables)
    if message:
        raise RuntimeError(f"DICOM SEG export failed: {message}")
    return sorted(os.path.join(folder, f) for f in set(os.listdir(folder)) - before)
