"""Writing binary masks and reading / writing Slicer ``.seg.nrrd`` segmentations (through ``slicerio``).

Same conventions as :mod:`SAM3DSegmentLib.io.volumes` (``Volume`` in RAS, files in LPS, atomic writes,
:class:`~SAM3DSegmentLib.io.errors.VolumeReadError` naming the file and the fix). slicerio's ``voxels`` are
``(i, j, k)``; they are transposed to ``[k, j, i]`` on the way in and back on the way out.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Sequence

import numpy as np

from ..core.geometry import LPS_TO_RAS, RAS_TO_LPS, Volume
from .errors import AmbiguousMaskError, VolumeReadError, VolumeWriteError
from .volumes import atomic_write, file_extension, read_volume, resample_like, write_volume

__all__ = ["write_mask", "read_segmentation", "write_segmentation", "read_mask"]


def write_mask(mask: Volume, path: str, compress: bool = True, label_value: int = 1, group=None) -> str:
    """Write a binary mask as uint8 (``label_value`` where the mask is non-zero, 0 elsewhere)."""
    if not 0 < int(label_value) < 256:
        raise VolumeWriteError(f"label_value must be in 1..255, got {label_value}")
    arr = np.asarray(mask.array)
    out = (arr != 0).astype(np.uint8) * np.uint8(label_value)
    return write_volume(mask.with_array(out), path, compress, group=group)


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


def read_mask(path: str, segment: Optional[str] = None) -> Volume:
    """One binary mask (uint8 0/1 ``Volume`` on the file's own grid) from a label file or a ``.seg.nrrd``.

    ``.seg.nrrd``: the segment named ``segment`` (or with that id); it may be omitted when the file holds one
    segment. Any other file (NIfTI, NRRD, MHA, a DICOM folder): its non-zero voxels, or with ``segment`` the
    voxels of that label value; a file with several non-zero labels needs ``segment``. A missing or empty
    choice raises :class:`~SAM3DSegmentLib.io.errors.VolumeReadError` naming what the file holds
    (:class:`~SAM3DSegmentLib.io.errors.AmbiguousMaskError` when a choice was needed and none given).
    """
    path = os.fspath(path)
    if file_extension(path) == ".seg.nrrd":
        masks = read_segmentation(path)
        if segment is None and len(masks) != 1:
            raise AmbiguousMaskError(f"{path} holds {len(masks)} segments ({', '.join(masks) or 'none'}); choose "
                                     "one by name")
        if segment is not None:
            named = [v for n, v in masks.items() if segment in (n, v.meta.get("name"), v.meta.get("id"))]
            if not named:
                raise VolumeReadError(f"{path} has no segment {segment!r}; it holds: {', '.join(masks)}")
            masks = {segment: named[0]}
        (name, mask), = masks.items()
        arr = (np.asarray(mask.array) != 0).astype(np.uint8)
    else:
        vol = read_volume(path)
        labels = np.unique(vol.array)
        labels = labels[labels != 0]
        if segment is None and labels.size > 1:
            shown = ", ".join(f"{v:g}" for v in labels[:12]) + (", ..." if labels.size > 12 else "")
            raise AmbiguousMaskError(f"{path} holds {labels.size} labels ({shown}); choose one label value")
        if segment is not None:
            try:
                value = float(segment)
            except ValueError:
                raise VolumeReadError(f"{path} is a label map: choose a label value (a number), not "
                                      f"{segment!r}") from None
            if value not in labels:
                raise VolumeReadError(f"{path} has no voxel of label {segment}; it holds labels "
                                      f"{', '.join(f'{v:g}' for v in labels[:12]) or 'none'}")
            arr = (vol.array == value).astype(np.uint8)
        else:
            arr = (vol.array != 0).astype(np.uint8)
        mask, name = vol, segment
    if not arr.any():
        raise VolumeReadError(f"{path}: the mask is empty; give a mask of the object to refine")
    return Volume(arr, mask.ijk_to_ras.copy(), {"source": path, "segment": name})
