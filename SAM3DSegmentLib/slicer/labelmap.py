"""Writing an engine mask into a segment (the Segment Editor's "set" semantics: editable area, overwrite of
other segments, locked segments) and reading a segment back on the volume's grid.

Segment voxels are written on the volume's voxel lattice as seen from the segmentation, through whatever
linear transforms separate the two nodes (:mod:`SAM3DSegmentLib.slicer.layers`).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ..core.geometry import GeometryError
from .layers import Layer, mark_modified, volume_lattice_in_segmentation
from .target import is_segment_locked, segmentations_logic
from .volumes import scalars_view


OVERWRITE_MODES = ("all", "visible", "none")
MASK_MODES = ("everywhere", "inside_all", "inside_visible", "outside_all", "outside_visible",
              "inside_segment", "outside_segment")


def write_mask_to_segment(segmentation_node, segment_id: str, mask_box: np.ndarray, box: Sequence[slice],
                          volume_node, overwrite: str = "all", mask_mode: str = "everywhere",
                          mask_segment_id: Optional[str] = None,
                          intensity_range: Optional[Tuple[float, float]] = None,
                          history=None) -> Dict[str, object]:
    """Set segment ``segment_id`` to ``mask_box`` inside ``box`` of the volume grid; nothing outside the box changes.

    ``mask_box``: uint8/bool (k, j, i) array of the box shape; ``box``: (k, j, i) slices of the volume grid
    (a ``MaskUpdate``'s fields). Semantics follow the Segment Editor's "set" modification:

    * Editable area (``mask_mode``, like the editor's "Editable area"; ``mask_segment_id`` for the
      ``*_segment`` modes; ``intensity_range`` like "Editable intensity range"): outside it the segment keeps
      its previous voxels.
    * ``overwrite`` ("all" | "visible" | "none", like "Modify other segments"): voxels the segment holds in the
      editable part of the box are removed from the other (all / visible) segments; "none" allows overlap.
    * Locked segments (tag :data:`~SAM3DSegmentLib.slicer.target.LOCK_TAG`) are never changed: their voxels are
      outside the editable area when overwriting, and writing into a locked segment raises ``PermissionError``.

    Writes in place into the segment's internal labelmap (label value = ``segment.GetLabelValue()`` on a shared
    layer), growing its extent when the box lies outside it. When overlap must be kept with a segment of the same
    layer, the segment is first moved to its own layer. ``history.save()`` is called before anything changes.
    Returns ``{"changed_voxels": int (of this segment), "taken_voxels": {id: n}, "modified_segments": [ids]}``.
    """
    import slicer

    if overwrite not in OVERWRITE_MODES:
        raise ValueError(f"overwrite must be one of {OVERWRITE_MODES}, got {overwrite!r}")
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
    segmentation = segmentation_node.GetSegmentation()
    segment = segmentation.GetSegment(segment_id)
    if segment is None:
        raise KeyError(f"segment '{segment_id}' is not in segmentation '{segmentation_node.GetName()}'")
    if is_segment_locked(segment):
        raise PermissionError(f"segment '{segment.GetName()}' is locked; unlock it or choose another segment")
    if segmentation.GetSourceRepresentationName() != slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName():
        raise GeometryError("the segmentation's source representation is not a binary labelmap; in the "
                            "Segmentations module set the source representation to 'Binary labelmap'")
    dims = volume_node.GetImageData().GetDimensions()  # i, j, k
    box = tuple(box)
    if len(box) != 3:
        raise ValueError("box must be three (k, j, i) slices")
    box_ijk = []
    for axis, sl in zip((2, 1, 0), box):
        start, stop, step = sl.indices(dims[axis])
        if step != 1 or stop <= start:
            raise ValueError(f"box slice {sl} along axis {'kji'[2 - axis]} is empty or strided")
        box_ijk.append((axis, (start, stop)))
    box_ijk = tuple(dict(box_ijk)[a] for a in range(3))  # ((i0,i1),(j0,j1),(k0,k1))
    shape = tuple(box_ijk[a][1] - box_ijk[a][0] for a in (2, 1, 0))
    new = np.asarray(mask_box)
    if new.shape != shape:
        raise ValueError(f"mask_box shape {new.shape} does not match the box {shape} (k, j, i)")
    new = new > 0

    lattice = volume_lattice_in_segmentation(volume_node, segmentation_node)

    all_ids = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
    others = [s for s in all_ids if s != segment_id]

    def layer_of(sid) -> Layer:
        return Layer(segmentation_node.GetBinaryLabelmapInternalRepresentation(sid), lattice,
                      f"segment '{segmentation.GetSegment(sid).GetName()}'")

    def voxels_of(sid) -> np.ndarray:
        return layer_of(sid).read_box(box_ijk, segmentation.GetSegment(sid).GetLabelValue())

    # ---- editable area
    editable = np.ones(shape, dtype=bool)
    visible = set(_visible_ids(segmentation_node, others))
    if mask_mode in ("inside_all", "outside_all", "inside_visible", "outside_visible"):
        pool = others if mask_mode.endswith("_all") else [s for s in others if s in visible]
        union = np.zeros(shape, dtype=bool)
        for sid in pool:
            union |= voxels_of(sid)
        editable &= union if mask_mode.startswith("inside") else ~union
    elif mask_mode in ("inside_segment", "outside_segment"):
        if not mask_segment_id or segmentation.GetSegment(mask_segment_id) is None:
            raise ValueError(f"mask_mode {mask_mode!r} needs mask_segment_id naming an existing segment")
        inside = voxels_of(mask_segment_id)
        editable &= inside if mask_mode == "inside_segment" else ~inside
    if intensity_range is not None:
        lo, hi = float(intensity_range[0]), float(intensity_range[1])
        vox = scalars_view(volume_node.GetImageData())[box]
        editable &= (vox >= lo) & (vox <= hi)
    overwritten = []
    if overwrite == "all":
        overwritten = list(others)
    elif overwrite == "visible":
        overwritten = [s for s in others if s in visible]
    locked = [s for s in others if is_segment_locked(segmentation.GetSegment(s))]
    overwritten = [s for s in overwritten if s not in locked]
    if overwrite != "none":
        for sid in locked:
            editable &= ~voxels_of(sid)

    old = voxels_of(segment_id)
    result = np.where(editable, new, old)
    gained, lost = result & ~old, old & ~result
    claim = result & editable  # voxels this write sets: overwritable segments lose them (editor's "set")
    taken = {sid: n for sid, n in ((sid, int((voxels_of(sid) & claim).sum())) for sid in overwritten) if n}
    report = {"changed_voxels": int(gained.sum() + lost.sum()), "taken_voxels": taken, "modified_segments": []}
    if not report["changed_voxels"] and not taken:
        return report
    if history is not None:
        history.save()

    # ---- same-layer segments that must keep their voxels where we gain: move our segment to its own layer
    layer = layer_of(segment_id)
    shared = [s for s in others if segmentation_node.GetBinaryLabelmapInternalRepresentation(s) is layer.image
              or segmentation_node.GetBinaryLabelmapInternalRepresentation(s) == layer.image]
    keep = [s for s in shared if s not in overwritten]
    if any((voxels_of(s) & gained).any() for s in keep):
        segmentation.SeparateSegmentLabelmap(segment_id)
        layer = layer_of(segment_id)
        shared = []
    label = segment.GetLabelValue()
    layer.grow_to_contain(box_ijk)
    arr_sl, box_sl = layer.box_slices(box_ijk)
    view = layer.view()[arr_sl]
    view[lost[box_sl] & (view == label)] = 0
    view[gained[box_sl]] = label  # same-layer segments here are overwritable (checked above)
    touched = {segment_id} | {s for s in shared if s in overwritten}
    # ---- other layers: remove the gained voxels from overwritable segments
    for sid in overwritten:
        other = layer_of(sid)
        if other.image is layer.image or other.image == layer.image:
            continue
        o_sl, ob_sl = other.box_slices(box_ijk)
        if o_sl is None:
            continue
        ov = other.view()[o_sl]
        hit = claim[ob_sl] & (ov == segmentation.GetSegment(sid).GetLabelValue())
        if hit.any():
            ov[hit] = 0
            mark_modified(other.image)
            touched.add(sid)
    mark_modified(layer.image)
    for sid in touched:
        segmentation.GetSegment(sid).Modified()
    report["modified_segments"] = sorted(touched)
    return report


def _visible_ids(segmentation_node, ids: Iterable[str]) -> List[str]:
    display = segmentation_node.GetDisplayNode()
    if display is None:
        return list(ids)
    return [s for s in ids if display.GetSegmentVisibility(s)]


def read_segment(segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    """Segment voxels (uint8 0/1, [k, j, i]) on the volume's full grid, in world space (through the transforms
    between the two nodes).

    A segment stored on the volume's grid (what :func:`write_mask_to_segment` writes) is read exactly from its
    labelmap. Any other geometry goes through Slicer's exporter (resampling); the temporary labelmap, display and
    colour table nodes it adds to the scene are removed again."""
    segmentation = segmentation_node.GetSegmentation()
    segment = segmentation.GetSegment(segment_id)
    if segment is None:
        raise KeyError(f"segment '{segment_id}' is not in segmentation '{segmentation_node.GetName()}'")
    image = segmentation_node.GetBinaryLabelmapInternalRepresentation(segment_id)
    dims = volume_node.GetImageData().GetDimensions()  # i, j, k
    if image is not None:
        try:
            layer = Layer(image, volume_lattice_in_segmentation(volume_node, segmentation_node), "")
            if layer.empty:
                return np.zeros(tuple(reversed(dims)), dtype=np.uint8)
            return layer.read_box(tuple((0, int(n)) for n in dims), segment.GetLabelValue()).astype(np.uint8)
        except GeometryError:
            pass  # another grid (or a non-linear transform): let Slicer resample it
    return _export_segment(segmentation_node, segment_id, volume_node)


def _export_segment(segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    import vtk

    scene = segmentation_node.GetScene()
    logic = segmentations_logic(scene)
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    colors_before = {scene.GetNthNodeByClass(n, "vtkMRMLColorNode")
                     for n in range(scene.GetNumberOfNodesByClass("vtkMRMLColorNode"))}
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__sam3d_tmp__")
    try:
        if not logic.ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap, volume_node):
            raise RuntimeError(f"exporting segment '{segment_id}' failed")
        return (np.array(scalars_view(labelmap.GetImageData())) > 0).astype(np.uint8)
    finally:
        remove_temporary_node(scene, labelmap, colors_before)


def remove_temporary_node(scene, node, colors_before=()) -> None:
    """Remove ``node`` with the display and storage nodes it references and the colour nodes those display
    nodes reference that were not in the scene before (``colors_before``: the colour nodes present before the
    node was filled, e.g. by ``ExportSegmentsToLabelmapNode``, which makes a ``<segmentation>_ColorTable``)."""
    keep = set(colors_before)
    extra = []
    for n in range(node.GetNumberOfDisplayNodes()):
        display = node.GetNthDisplayNode(n)
        if display is None:
            continue
        color = display.GetColorNode() if hasattr(display, "GetColorNode") else None
        if color is not None and color not in keep and color not in extra:
            extra.append(color)
        extra.append(display)
    for n in range(node.GetNumberOfStorageNodes()):
        if node.GetNthStorageNode(n) is not None:
            extra.append(node.GetNthStorageNode(n))
    scene.RemoveNode(node)
    for other in extra:
        if other.GetScene() is scene:
            scene.RemoveNode(other)
