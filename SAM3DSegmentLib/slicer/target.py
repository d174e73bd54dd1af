"""The segmentation and segment the module writes into: creating them, the Segment Editor's masking and
overwrite choices, the module's own segment lock, and which segment the prompt points belong to.

A segmentation the module creates is put under the volume's parent transform. A user's segmentation is never
re-parented or resampled; one whose labelmaps lie on another grid is refused before anything changes.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Optional, Sequence

from .layers import check_segmentation_geometry


#: Segment tag marking a segment as locked FOR THIS MODULE (never modified, never overwritten by SAM3DSegment).
#: Slicer has no per-segment lock (the Segment Editor's "locked" makes the whole editor read-only); this tag is the
#: module's own convention, set with :func:`set_segment_locked` (Python console). Other tools ignore it.
LOCK_TAG = "SAM3DSegment.Locked"

_SEGMENTATIONS_LOGIC = None


def segmentations_logic(scene=None):
    """The process-wide ``vtkSlicerSegmentationsModuleLogic``.

    Inside Slicer: ``slicer.modules.segmentations.logic()``. On slicer-core one logic must be created and given a
    scene once per process, or ``AddEmptySegment`` returns "" (no converter rules are registered).
    """
    global _SEGMENTATIONS_LOGIC
    import slicer

    modules = getattr(slicer, "modules", None)
    if modules is not None and hasattr(modules, "segmentations"):
        return modules.segmentations.logic()
    if _SEGMENTATIONS_LOGIC is None:
        _SEGMENTATIONS_LOGIC = slicer.vtkSlicerSegmentationsModuleLogic()
        if scene is not None:
            _SEGMENTATIONS_LOGIC.SetMRMLScene(scene)
    elif scene is not None and _SEGMENTATIONS_LOGIC.GetMRMLScene() is None:
        _SEGMENTATIONS_LOGIC.SetMRMLScene(scene)
    return _SEGMENTATIONS_LOGIC


def is_segment_locked(segment) -> bool:
    """True when the segment carries :data:`LOCK_TAG` with a true value ("1", "true", "yes", "on")."""
    import vtk

    if not segment.HasTag(LOCK_TAG):
        return False
    value = vtk.reference("")
    segment.GetTag(LOCK_TAG, value)
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def set_segment_locked(segmentation_node, segment_id: str, locked: bool = True) -> None:
    segmentation_node.GetSegmentation().GetSegment(segment_id).SetTag(LOCK_TAG, "1" if locked else "0")


def ensure_segment(segmentation_node, segment_id: Optional[str] = None, name: Optional[str] = None,
                   color: Optional[Sequence[float]] = None) -> str:
    """Return ``segment_id`` if it exists, else add an empty segment (returns its id)."""
    seg = segmentation_node.GetSegmentation()
    if segment_id and seg.GetSegment(segment_id) is not None:
        return segment_id
    segmentations_logic(segmentation_node.GetScene())
    args = [segment_id or "", name or segment_id or ""]
    if color is not None:
        args.append(list(color))
    new_id = seg.AddEmptySegment(*args)
    if not new_id:
        raise RuntimeError("could not add a segment: the segmentations module logic is not set up "
                           "(outside Slicer call SAM3DSegmentLib.slicer.segmentations_logic(scene) first)")
    return new_id


def editor_settings(scene, segmentation_node=None) -> Dict[str, object]:
    """The Segment Editor's "Modify other segments" and "Editable area/intensity range" choices as keyword
    arguments for :func:`~.labelmap.write_mask_to_segment` (defaults when the scene has no segment editor node).

    Prefers the editor node editing ``segmentation_node``; else the first one in the scene."""
    import slicer

    out: Dict[str, object] = {"overwrite": "all", "mask_mode": "everywhere", "mask_segment_id": None,
                              "intensity_range": None}
    nodes = [scene.GetNthNodeByClass(n, "vtkMRMLSegmentEditorNode")
             for n in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentEditorNode"))]
    if not nodes:
        return out
    editor = next((n for n in nodes if segmentation_node is not None
                   and n.GetSegmentationNode() is segmentation_node), nodes[0])
    E, S = slicer.vtkMRMLSegmentEditorNode, slicer.vtkMRMLSegmentationNode
    out["overwrite"] = {E.OverwriteAllSegments: "all", E.OverwriteVisibleSegments: "visible",
                        E.OverwriteNone: "none"}.get(editor.GetOverwriteMode(), "all")
    out["mask_mode"] = {S.EditAllowedEverywhere: "everywhere", S.EditAllowedInsideAllSegments: "inside_all",
                        S.EditAllowedInsideVisibleSegments: "inside_visible",
                        S.EditAllowedOutsideAllSegments: "outside_all",
                        S.EditAllowedOutsideVisibleSegments: "outside_visible",
                        S.EditAllowedInsideSingleSegment: "inside_segment"}.get(editor.GetMaskMode(), "everywhere")
    if out["mask_mode"] == "inside_segment":
        out["mask_segment_id"] = editor.GetMaskSegmentID()
        if not out["mask_segment_id"]:
            out["mask_mode"] = "everywhere"
    if editor.GetSourceVolumeIntensityMask():
        out["intensity_range"] = tuple(editor.GetSourceVolumeIntensityMaskRange())
    return out


def segmentation_for(scene, volume_node, segmentation_node=None, name_suffix: str = "segmentation"):
    """The user's ``segmentation_node`` (checked first), or a new one named "<volume> ``name_suffix``".

    A new segmentation is created under the volume's parent transform with the volume's geometry. A given (the
    user's) segmentation is never re-parented or resampled: it is checked (:func:`check_segmentation_geometry`) and
    refused with :class:`GeometryError` before anything changes when its segments lie on another voxel grid than
    the volume in world space; its reference geometry is set from the volume only when it has none."""
    if segmentation_node is None:
        segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume_node.GetName()} {name_suffix}")
        segmentation_node.CreateDefaultDisplayNodes()
        if volume_node.GetTransformNodeID():
            segmentation_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    else:
        check_segmentation_geometry(segmentation_node, volume_node)
    role = segmentation_node.GetReferenceImageGeometryReferenceRole()
    if segmentation_node.GetSegmentation().GetNumberOfSegments() == 0 or not segmentation_node.GetNodeReference(role):
        # computed through the transforms between the two nodes (the volume's grid as the segmentation sees it)
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    return segmentation_node


def prepare_target(scene, volume_node, segmentation_node=None, segment_id: Optional[str] = None):
    """Make sure there is a segmentation for ``volume_node`` (:func:`segmentation_for`) and a target segment,
    added when ``segment_id`` names no segment. Returns (node, id)."""
    segmentation_node = segmentation_for(scene, volume_node, segmentation_node)
    if not segment_id or segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
        n = segmentation_node.GetSegmentation().GetNumberOfSegments() + 1
        segment_id = ensure_segment(segmentation_node, name=f"Segment_{n}")
    return segmentation_node, segment_id


class TargetSegment:
    """Which segment the prompt points belong to, and what a segment-selector change means (no Qt).

    The segment selector (``qMRMLSegmentSelectorWidget``) emits ``currentSegmentChanged`` synchronously from
    inside the module's own changes (``AddEmptySegment`` on a segmentation without segments, selecting the node
    or segment the module just made). Run those inside :meth:`module_change`: selector notifications then are
    not user choices, so the click being handled keeps its point."""

    def __init__(self):
        self.segment_id: Optional[str] = None
        self._depth = 0

    @contextmanager
    def module_change(self):
        self._depth += 1
        try:
            yield self
        finally:
            self._depth -= 1

    @property
    def changing(self) -> bool:
        return self._depth > 0

    def selector_changed(self, segment_id: Optional[str]) -> bool:
        """The selector shows ``segment_id``. True when the USER chose another segment (show that segment's own
        points; restart the voxel history); False during :meth:`module_change` and for the current segment."""
        if self._depth or segment_id == self.segment_id:
            return False
        self.segment_id = segment_id or None
        return True

    def module_selected(self, segment_id: str) -> bool:
        """The module made ``segment_id`` the target; True when that is another segment than before."""
        changed = segment_id != self.segment_id
        self.segment_id = segment_id
        return changed

    def reset(self) -> None:
        self.segment_id = None
