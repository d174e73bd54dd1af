"""Writing many instance masks, each stored on its own box, as one Slicer ``.seg.nrrd`` (one segment each) or one
label map (instance ``n`` = label ``n``), atomically.

An instance is any object with ``box`` (``(k, j, i)`` slices of the reference grid) and ``mask`` (its voxels on
the box); for a ``.seg.nrrd`` also ``name``, ``color`` (0..1 RGB) and ``tags`` (``{key: value}``, stored as
Slicer segment tags). Only the boxes are touched while assembling (no full-grid array per instance). In a
``.seg.nrrd`` overlapping instances go to separate layers, as Slicer stores them (each layer is the reference
grid, uint8: a layer takes at most 255 segments). A label map keeps, where instances overlap, the earlier one.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from ..core.geometry import RAS_TO_LPS, Volume
from .errors import VolumeWriteError
from .volumes import atomic_write, file_extension, write_volume

__all__ = ["write_instance_segmentation", "write_instance_labelmap"]


def _layers(instances, shape) -> tuple:
    """Place each instance on the first layer where its voxels meet no other: ``[(layer, label), ...]``."""
    layers, counts, place = [], [], []
    for inst in instances:
        m = np.asarray(inst.mask, dtype=bool)
        for n, layer in enumerate(layers):
            if counts[n] < 255 and not np.any(layer[inst.box][m]):
                break
        else:
            layers.append(np.zeros(shape, dtype=np.uint8))
            counts.append(0)
            n = len(layers) - 1
        counts[n] += 1
        layers[n][inst.box][m] = counts[n]
        place.append((n, counts[n]))
    return layers, place


def write_instance_segmentation(path: str, instances: Sequence, reference: Volume, group=None) -> str:
    """Write ``instances`` as a ``.seg.nrrd`` on ``reference``'s grid (LPS in the file): one segment each, in order,
    with its name, colour and tags. No instance: a valid segmentation without segments."""
    import slicerio

    path = os.fspath(path)
    if file_extension(path) != ".seg.nrrd":
        raise VolumeWriteError(f"{path}: a segmentation file name must end with .seg.nrrd")
    shape = tuple(int(v) for v in reference.array.shape)
    layers, place = _layers(instances, shape)
    voxels = np.zeros(shape, dtype=np.uint8) if not layers else (layers[0] if len(layers) == 1 else np.stack(layers))
    segments = []
    for n, (inst, (layer, label)) in enumerate(zip(instances, place), start=1):
        ext = [v for sl in reversed(inst.box) for v in (int(sl.start), int(sl.stop) - 1)]   # i, j, k min/max
        seg = {"id": f"Segment_{n}", "name": str(getattr(inst, "name", f"Segment_{n}")), "labelValue": int(label),
               "layer": int(layer), "extent": ext}
        if getattr(inst, "color", None) is not None:
            seg["color"] = [float(c) for c in inst.color]
        tags = getattr(inst, "tags", None) or {}
        bad = [f"{k}:{v}" for k, v in tags.items() if any(c in f"{k}{v}" for c in ":|")]
        if bad:
            raise VolumeWriteError(f"segment tags may not contain ':' or '|' ({bad[0]!r})")
        seg["tags"] = {str(k): str(v) for k, v in tags.items()}
        segments.append(seg)
    # slicerio's voxels are (i, j, k) (layer first when there are several)
    arr = voxels.transpose(2, 1, 0) if voxels.ndim == 3 else voxels.transpose(0, 3, 2, 1)
    seg_dict = {"voxels": np.ascontiguousarray(arr), "ijkToLPS": RAS_TO_LPS @ reference.ijk_to_ras,
                "segments": segments}

    def write(tmp: str) -> None:
        slicerio.write_segmentation(tmp, seg_dict)

    return atomic_write(path, write, group=group)


def write_instance_labelmap(path: str, instances: Sequence, reference: Volume, group=None) -> str:
    """Write ``instances`` as one label map on ``reference``'s grid: instance ``n`` (1-based) is label ``n`` (uint16;
    where instances overlap the earlier keeps its voxels)."""
    if len(instances) > np.iinfo(np.uint16).max:
        raise VolumeWriteError(f"{len(instances)} instances do not fit a uint16 label map; write a .seg.nrrd")
    out = np.zeros(reference.array.shape, dtype=np.uint16)
    for n in range(len(instances), 0, -1):
        inst = instances[n - 1]
        out[inst.box][np.asarray(inst.mask, dtype=bool)] = n
    return write_volume(reference.with_array(out), path, group=group)
