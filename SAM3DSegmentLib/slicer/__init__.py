"""The one place where SAM3DSegmentLib touches MRML (3D Slicer's scene).

Everything here runs on Slicer's main (GUI) thread: MRML and VTK objects are not thread-safe. Nothing
else in the library imports this module, and ``slicer`` / ``vtk`` are imported inside the functions, so
``import SAM3DSegmentLib`` stays Slicer-free. The same code runs in Slicer and, for tests and benchmarks,
on the Qt-free PyPI wheel ``slicer-core`` (pass your own ``vtkMRMLScene``).

Coordinate frames (see ``geometry``):

* Voxel arrays are ``[k, j, i]`` (``slicer.util.arrayFromVolume`` order); boxes are ``(k, j, i)`` slices.
* A node's ``IJKToRAS`` is LOCAL: it ignores parent transforms. Markups control points are read in WORLD
  coordinates. :func:`volume_from_node` folds a linear parent transform into ``ijk_to_ras`` (``frame="world"``,
  the default) and :func:`clicks_from_markups` returns WORLD points by default, so a click maps to the voxel
  the user saw under the mouse. ``frame="volume"`` gives both in the volume's local frame instead. Use the
  same frame for both.
* Segment voxels are written on the volume's voxel lattice as seen from the segmentation, through whatever
  linear transforms separate the two nodes (world space is the contract). A user's segmentation is never
  re-parented or resampled; one whose labelmaps lie on another grid is refused before anything changes. A
  segmentation the module creates is put under the volume's parent transform.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ..core.atomic import atomic_write
from ..core.geometry import GeometryError, Volume

#: Segment tag marking a segment as locked FOR THIS MODULE (never modified, never overwritten by SAM3DSegment).
#: Slicer has no per-segment lock (the Segment Editor's "locked" makes the whole editor read-only); this tag is the
#: module's own convention, set with :func:`set_segment_locked` (Python console). Other tools ignore it.
LOCK_TAG = "SAM3DSegment.Locked"
#: Node attribute (on each markups node) holding the placement order of its points: "pointID:seq;..."
ORDER_ATTRIBUTE = "SAM3DSegment.ClickOrder"
#: Scene-wide counter of placements (attribute on the positive node; merged with the negative node's).
_SEQ_ATTRIBUTE = "SAM3DSegment.ClickSeq"

#: Colour of prompt points that are not used (unselected: outside the volume).
UNUSED_POINT_COLOR = (0.55, 0.55, 0.55)

OVERWRITE_MODES = ("all", "visible", "none")
MASK_MODES = ("everywhere", "inside_all", "inside_visible", "outside_all", "outside_visible",
              "inside_segment", "outside_segment")

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


# --------------------------------------------------------------------------------------------- helpers
def _vtk_matrix_to_numpy(m) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def _numpy_to_vtk_matrix(a: np.ndarray):
    import vtk

    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


def _scalars_view(image) -> np.ndarray:
    """Writable [k, j, i] numpy view of a vtkImageData's scalars (memory owned by VTK: never reallocate)."""
    from vtk.util import numpy_support

    dims = image.GetDimensions()
    scalars = image.GetPointData().GetScalars()
    if scalars is None or min(dims) <= 0:
        return np.zeros((0, 0, 0), dtype=np.uint8)
    return numpy_support.vtk_to_numpy(scalars).reshape(tuple(reversed(dims)))


def _parent_to_world(node) -> np.ndarray:
    """4x4 local->world matrix of a transformable node; GeometryError for non-linear parent transforms."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise GeometryError(
            f"'{node.GetName()}' is under a non-linear (warping) transform '{parent.GetName()}'. "
            "Harden the transform first (Data module: right-click the node -> 'Harden transform'), "
            "or remove it")
    import vtk

    m = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(m)
    return _vtk_matrix_to_numpy(m)


def _check_frame(frame: str) -> None:
    if frame not in ("world", "volume"):
        raise ValueError(f"frame must be 'world' or 'volume', got {frame!r}")


# --------------------------------------------------------------------------------------------- volume
def volume_from_node(volume_node, frame: str = "world") -> Volume:
    """A copy of a scalar volume node as a ``geometry.Volume``.

    ``array`` is a copy ([k, j, i]), safe to hand to a worker thread. ``ijk_to_ras`` is the node's IJKToRAS,
    preceded (``frame="world"``) by its linear parent transform. ``meta``: ``node_id``, ``mtime`` (image data
    MTime: with node id and ``ijk_to_ras`` the embedding-cache key), ``frame``, ``name``, and
    ``dicom_series_uid`` / ``dicom_instance_uids`` when the volume was loaded from DICOM.
    """
    _check_frame(frame)
    if volume_node is None:
        raise ValueError("no volume selected: choose the CT volume to segment")
    if not volume_node.IsA("vtkMRMLScalarVolumeNode") or volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise GeometryError(f"'{volume_node.GetName()}' is a {volume_node.GetClassName()}, not a scalar (CT) "
                            "volume; select a grey-level volume")
    image = volume_node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise GeometryError(f"volume '{volume_node.GetName()}' has no voxels loaded")
    if image.GetNumberOfScalarComponents() != 1:
        raise GeometryError(f"volume '{volume_node.GetName()}' has {image.GetNumberOfScalarComponents()} "
                            "components per voxel; convert it to a scalar volume (Vector to Scalar Volume module)")
    array = np.array(_scalars_view(image))  # copy
    import vtk

    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    ijk_to_ras = _vtk_matrix_to_numpy(m)
    if frame == "world":
        ijk_to_ras = _parent_to_world(volume_node) @ ijk_to_ras
    meta = {"node_id": volume_node.GetID(), "name": volume_node.GetName(), "mtime": int(image.GetMTime()),
            "frame": frame}
    uids = volume_node.GetAttribute("DICOM.instanceUIDs")
    if uids:
        meta["dicom_instance_uids"] = uids.split()
        series = _dicom_series_uid(volume_node)
        if series:
            meta["dicom_series_uid"] = series
    return Volume(array, ijk_to_ras, meta)


def _dicom_series_uid(volume_node) -> Optional[str]:
    """Series instance UID from the subject hierarchy (Slicer GUI) or a node attribute; None if unknown."""
    uid = volume_node.GetAttribute("DICOM.SeriesInstanceUID")
    if uid:
        return uid
    try:
        import slicer

        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(volume_node.GetScene())
        item = sh.GetItemByDataNode(volume_node)
        return sh.GetItemUID(item, "DICOM") or None
    except Exception:  # noqa: BLE001 - subject hierarchy absent (slicer-core) or no DICOM UID
        return None


# --------------------------------------------------------------------------------------------- markups
def _read_order(node) -> Dict[str, int]:
    text = node.GetAttribute(ORDER_ATTRIBUTE) or ""
    order = {}
    for part in text.split(";"):
        if ":" in part:
            pid, seq = part.rsplit(":", 1)
            try:
                order[pid] = int(seq)
            except ValueError:
                continue
    return order


def record_placement(node, index: int, counter_node=None) -> int:
    """Give control point ``index`` of ``node`` the next placement number (kept in node attributes).

    The counter lives on ``counter_node`` (the positive list) so that the positive and negative lists share
    one sequence. Attributes, not point descriptions, so no PointModified event re-enters the observer.
    """
    counter_node = counter_node or node
    seq = int(counter_node.GetAttribute(_SEQ_ATTRIBUTE) or 0) + 1
    counter_node.SetAttribute(_SEQ_ATTRIBUTE, str(seq))
    order = _read_order(node)
    order[node.GetNthControlPointID(index)] = seq
    live = {node.GetNthControlPointID(i) for i in range(node.GetNumberOfControlPoints())}
    node.SetAttribute(ORDER_ATTRIBUTE, ";".join(f"{p}:{s}" for p, s in order.items() if p in live))
    return seq


def clicks_from_markups(positive_node, negative_node, volume_node,
                        frame: str = "world") -> List[Tuple[np.ndarray, bool]]:
    """Defined control points of the two lists as ``[(ras (3,), positive), ...]`` in placement order.

    Points are read in WORLD coordinates; ``frame="volume"`` maps them into the volume's local frame through
    the volume's parent transform (world -> parent), ready for the LOCAL IJKToRAS. Preview points (hovering in
    place mode), points whose position is undefined and unselected points (:func:`reject_points_outside` marks
    points outside the volume so) are skipped. Order: the placement number recorded by
    :func:`record_placement` (set by :class:`MarkupsObserver` when a point is defined); points without one
    (loaded from a scene, added by a script) come after, positive list first, each list in index order.
    """
    _check_frame(frame)
    import slicer
    import vtk

    to_volume = None
    if frame == "volume" and volume_node is not None and volume_node.GetParentTransformNode() is not None:
        to_volume = vtk.vtkGeneralTransform()
        slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, volume_node.GetParentTransformNode(), to_volume)
    entries = []
    for list_rank, (node, positive) in enumerate(((positive_node, True), (negative_node, False))):
        if node is None:
            continue
        order = _read_order(node)
        for i in range(node.GetNumberOfControlPoints()):
            if node.GetNthControlPointPositionStatus(i) != slicer.vtkMRMLMarkupsNode.PositionDefined \
                    or not node.GetNthControlPointSelected(i):
                continue
            p = [0.0, 0.0, 0.0]
            node.GetNthControlPointPositionWorld(i, p)
            if to_volume is not None:
                p = to_volume.TransformPoint(p)
            seq = order.get(node.GetNthControlPointID(i))
            key = (0, seq, 0, 0) if seq is not None else (1, 0, list_rank, i)
            entries.append((key, np.asarray(p, dtype=np.float64), positive))
    entries.sort(key=lambda e: e[0])
    return [(p, pos) for _, p, pos in entries]


def defined_point_ids(node) -> frozenset:
    """Ids of the control points of ``node`` whose position is defined (not previews, not unset)."""
    import slicer

    defined = slicer.vtkMRMLMarkupsNode.PositionDefined
    return frozenset(node.GetNthControlPointID(i) for i in range(node.GetNumberOfControlPoints())
                     if node.GetNthControlPointPositionStatus(i) == defined)


def volume_geometry(volume_node) -> Volume:
    """The volume's grid in WORLD space without copying its voxels (``array`` is a read-only zero view of the
    right shape): for point-inside tests on the GUI thread."""
    if volume_node is None or volume_node.GetImageData() is None:
        raise ValueError("no volume selected: choose the CT volume to segment")
    import vtk

    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    i, j, k = volume_node.GetImageData().GetDimensions()
    return Volume(np.broadcast_to(np.uint8(0), (k, j, i)), _parent_to_world(volume_node) @ _vtk_matrix_to_numpy(m),
                  {"node_id": volume_node.GetID(), "name": volume_node.GetName()})


def reject_points_outside(volume_node, nodes: Sequence, observer: Optional["MarkupsObserver"] = None) -> List[str]:
    """Mark the defined control points of ``nodes`` that lie outside the volume (world space, the same test the
    engine applies) as NOT selected, so :func:`clicks_from_markups` does not send them; points back inside are
    selected again. Returns one message per rejected point, for the status line (Slicer words, no command-line
    advice). The selection change fires only PointModified, which :class:`MarkupsObserver` ignores."""
    import slicer

    geometry = volume_geometry(volume_node)
    messages = []
    was = observer.enabled if observer is not None else None
    if observer is not None:
        observer.enabled = False
    try:
        for node in nodes:
            if node is None:
                continue
            for i in range(node.GetNumberOfControlPoints()):
                if node.GetNthControlPointPositionStatus(i) != slicer.vtkMRMLMarkupsNode.PositionDefined:
                    continue
                p = [0.0, 0.0, 0.0]
                node.GetNthControlPointPositionWorld(i, p)
                inside = bool(geometry.contains_ijk(geometry.ras_to_ijk_points(np.asarray(p))))
                if bool(node.GetNthControlPointSelected(i)) != inside:
                    node.SetNthControlPointSelected(i, inside)
                if not inside:
                    messages.append(f"The point at R,A,S = {np.round(p, 1).tolist()} in '{node.GetName()}' is "
                                    f"outside the volume '{volume_node.GetName()}' and is not used (shown grey): "
                                    "drag it into the image or delete it.")
    finally:
        if observer is not None:
            observer.enabled = was
    return messages


class MarkupsObserver:
    """Calls ``callback(reason, node, index)`` when the prompt points really change.

    Reasons: ``"defined"`` (a click placed a point: PointPositionDefinedEvent), ``"moved"`` (a drag ended:
    PointEndInteractionEvent), ``"removed"`` (PointRemovedEvent that took away a DEFINED point). Preview points
    while hovering in place mode fire only PointAdded/PointModified, and when the mouse leaves a view the markups
    widget removes its preview point (PointRemovedEvent): both are ignored (the observer keeps the set of defined
    point ids of each list and reports a removal only when that set lost a member), so nothing runs on mouse
    moves or on leaving a view. One VTK
    callback per event id (the event name arrives as 'NoEvent' for markups events); ``index`` is None when
    the event came from inside StartModify/EndModify. On "defined" the point gets its placement number
    (:func:`record_placement`) before the callback runs.
    """

    def __init__(self, nodes: Sequence, callback: Callable[[str, object, Optional[int]], None]):
        self.callback = callback
        self.nodes = [n for n in nodes if n is not None]
        self._tags: List[Tuple[object, int]] = []
        self.enabled = True
        self._defined = {id(n): defined_point_ids(n) for n in self.nodes}
        self._observe()

    def _observe(self) -> None:
        import slicer

        M = slicer.vtkMRMLMarkupsNode
        for node in self.nodes:
            for event, reason in ((M.PointPositionDefinedEvent, "defined"),
                                  (M.PointEndInteractionEvent, "moved"),
                                  (M.PointRemovedEvent, "removed")):
                handler = self._make_handler(reason)
                self._tags.append((node, node.AddObserver(event, handler)))
            for event in (M.PointAddedEvent, M.PointModifiedEvent):  # keep the defined-ids snapshot current
                self._tags.append((node, node.AddObserver(event, self._refresh)))

    def _refresh(self, node, _event) -> None:
        self._defined[id(node)] = defined_point_ids(node)

    def _make_handler(self, reason: str):
        import vtk

        @vtk.calldata_type(vtk.VTK_INT)
        def handler(caller, _event, index=None):
            self._dispatch(reason, caller, index)

        return handler

    def _dispatch(self, reason: str, node, index: Optional[int]) -> None:
        before = self._defined.get(id(node))
        self._defined[id(node)] = now = defined_point_ids(node)
        if not self.enabled:
            return
        if reason == "removed" and before is not None and before <= now:
            return  # a preview point (hover) was removed: not a user action
        if reason == "defined" and index is not None and 0 <= index < node.GetNumberOfControlPoints():
            record_placement(node, index, counter_node=self.nodes[0])
        self.callback(reason, node, index)

    def remove(self) -> None:
        for node, tag in self._tags:
            node.RemoveObserver(tag)
        self._tags = []


def place_buttons_state(interaction_node, selection_node, positive_node, negative_node) -> Tuple[bool, bool]:
    """(include checked, exclude checked) as the scene says: placing (interaction mode Place) into the positive
    or the negative list (the selection node's active place node). Esc or a right-click in a view ends place
    mode in the interaction node without touching the module's buttons; this is what the buttons must show."""
    if interaction_node is None or interaction_node.GetCurrentInteractionMode() != interaction_node.Place:
        return False, False
    active = selection_node.GetActivePlaceNodeID() if selection_node is not None else None
    return (bool(active) and positive_node is not None and active == positive_node.GetID(),
            bool(active) and negative_node is not None and active == negative_node.GetID())


class PlaceModeObserver:
    """Calls ``callback(include, exclude)`` (:func:`place_buttons_state`) whenever that state changes: the
    interaction node's mode (InteractionModeChangedEvent, ModifiedEvent) or the selection node's active place
    node (ActivePlaceNodeIDChangedEvent). ``nodes()`` returns the current (positive, negative) lists."""

    def __init__(self, interaction_node, selection_node, nodes: Callable[[], Tuple[object, object]],
                 callback: Callable[[bool, bool], None]):
        import vtk

        self.interaction_node, self.selection_node, self.nodes, self.callback = \
            interaction_node, selection_node, nodes, callback
        self.state = self.current()
        self._tags = []
        if interaction_node is not None:
            for event in (interaction_node.InteractionModeChangedEvent, vtk.vtkCommand.ModifiedEvent):
                self._tags.append((interaction_node, interaction_node.AddObserver(event, self._update)))
        if selection_node is not None:
            self._tags.append((selection_node, selection_node.AddObserver(
                selection_node.ActivePlaceNodeIDChangedEvent, self._update)))

    def current(self) -> Tuple[bool, bool]:
        positive, negative = self.nodes()
        return place_buttons_state(self.interaction_node, self.selection_node, positive, negative)

    def _update(self, *_args) -> None:
        state = self.current()
        if state != self.state:
            self.state = state
            self.callback(*state)

    def remove(self) -> None:
        for node, tag in self._tags:
            node.RemoveObserver(tag)
        self._tags = []


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


def prompt_nodes(scene, positive=None, negative=None):
    """The include (green) and exclude (red) markups lists; existing ones are reused, missing ones created."""
    out = []
    for node, name, color in ((positive, "SAM3D include", (0.1, 0.85, 0.2)),
                              (negative, "SAM3D exclude", (0.9, 0.15, 0.15))):
        if node is None or node.GetScene() is None:
            node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
            node.CreateDefaultDisplayNodes()
            node.GetDisplayNode().SetPointLabelsVisibility(False)
            node.SetMarkupLabelFormat("")
        display = node.GetDisplayNode()
        if display is not None:
            display.SetSelectedColor(*color)  # points that are used
            display.SetColor(*UNUSED_POINT_COLOR)  # unselected: outside the volume (reject_points_outside)
        out.append(node)
    return tuple(out)


def show_clicks(positive_node, negative_node, clicks, observer: Optional["MarkupsObserver"] = None) -> None:
    """Replace the points of both lists by ``clicks`` [(world ras, positive)], in order, without firing the
    observer (used after undo/redo and when another segment is selected)."""
    import vtk

    was = observer.enabled if observer is not None else None
    if observer is not None:
        observer.enabled = False
    try:
        for node in (positive_node, negative_node):
            node.RemoveAllControlPoints()
        for ras, positive in clicks:
            node = positive_node if positive else negative_node
            record_placement(node, node.AddControlPointWorld(vtk.vtkVector3d(*[float(v) for v in ras])), positive_node)
    finally:
        if observer is not None:
            observer.enabled = was


# --------------------------------------------------------------------------------------------- segments
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
                           "(outside Slicer call slicer_bridge.segmentations_logic(scene) first)")
    return new_id


def editor_settings(scene, segmentation_node=None) -> Dict[str, object]:
    """The Segment Editor's "Modify other segments" and "Editable area/intensity range" choices as keyword
    arguments for :func:`write_mask_to_segment` (defaults when the scene has no segment editor node).

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


def prepare_target(scene, volume_node, segmentation_node=None, segment_id: Optional[str] = None):
    """Make sure there is a segmentation for ``volume_node`` and a target segment. Returns (node, id).

    A missing segmentation is created under the volume's parent transform with the volume's geometry. A given
    (the user's) segmentation is never re-parented or resampled: it is checked first
    (:func:`check_segmentation_geometry`) and refused with :class:`GeometryError` before anything changes when its
    segments lie on another voxel grid than the volume in world space; its reference geometry is set from the volume
    only when it has none. Then the target segment is added when ``segment_id`` names no segment."""
    if segmentation_node is None:
        segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume_node.GetName()} segmentation")
        segmentation_node.CreateDefaultDisplayNodes()
        if volume_node.GetTransformNodeID():
            segmentation_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    else:
        check_segmentation_geometry(segmentation_node, volume_node)
    role = segmentation_node.GetReferenceImageGeometryReferenceRole()
    if segmentation_node.GetSegmentation().GetNumberOfSegments() == 0 or not segmentation_node.GetNodeReference(role):
        # computed through the transforms between the two nodes (the volume's grid as the segmentation sees it)
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    if not segment_id or segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
        n = segmentation_node.GetSegmentation().GetNumberOfSegments() + 1
        segment_id = ensure_segment(segmentation_node, name=f"Segment_{n}")
    return segmentation_node, segment_id


def volume_lattice_in_segmentation(volume_node, segmentation_node) -> np.ndarray:
    """4x4 matrix: volume voxel (i, j, k) -> the segmentation's local coordinates (the frame its labelmaps'
    ImageToWorld matrices are in), through the transforms that separate the two nodes (world space is the
    contract). GeometryError when a non-linear transform separates them."""
    import vtk

    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    ijk_to_local = _vtk_matrix_to_numpy(m)
    if volume_node.GetParentTransformNode() is segmentation_node.GetParentTransformNode():
        return ijk_to_local
    return np.linalg.inv(_parent_to_world(segmentation_node)) @ _parent_to_world(volume_node) @ ijk_to_local


def check_segmentation_geometry(segmentation_node, volume_node) -> None:
    """GeometryError (nothing is changed) unless every non-empty labelmap of the segmentation lies on the volume's
    voxel grid in world space (same axes and spacing, origin shifted by whole voxels), whatever transforms the
    two nodes are under."""
    import slicer

    segmentation = segmentation_node.GetSegmentation()
    if segmentation.GetNumberOfSegments() == 0:
        return
    if segmentation.GetSourceRepresentationName() != \
            slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName():
        raise GeometryError(f"segmentation '{segmentation_node.GetName()}' is not stored as a binary labelmap; in "
                            "the Segmentations module set its source representation to 'Binary labelmap', or "
                            "choose 'Create new segmentation'")
    lattice = volume_lattice_in_segmentation(volume_node, segmentation_node)
    for n in range(segmentation.GetNumberOfSegments()):
        sid = segmentation.GetNthSegmentID(n)
        layer = _Layer(segmentation_node.GetBinaryLabelmapInternalRepresentation(sid), lattice,
                       f"segment '{segmentation.GetSegment(sid).GetName()}' of '{segmentation_node.GetName()}'")
        if not layer.empty:
            layer.offset()


def _visible_ids(segmentation_node, ids: Iterable[str]) -> List[str]:
    display = segmentation_node.GetDisplayNode()
    if display is None:
        return list(ids)
    return [s for s in ids if display.GetSegmentVisibility(s)]


class _Layer:
    """One (possibly shared) binary labelmap seen on the volume's voxel lattice.

    The labelmap may index the same lattice with another origin (a whole-voxel shift ``offset``: volume ijk =
    labelmap ijk + offset); any other geometry (spacing, axes, sub-voxel shift) is refused with a clear error.
    """

    def __init__(self, image, lattice: np.ndarray, what: str):
        self.image, self.lattice, self.what = image, lattice, what
        self._offset: Optional[np.ndarray] = None

    @property
    def empty(self) -> bool:
        e = self.image.GetExtent()
        return e[0] > e[1] or e[2] > e[3] or e[4] > e[5] or self.image.GetPointData().GetScalars() is None

    def offset(self) -> np.ndarray:
        if self._offset is None:
            import vtk

            m = vtk.vtkMatrix4x4()
            self.image.GetImageToWorldMatrix(m)
            rel = np.linalg.inv(self.lattice) @ _vtk_matrix_to_numpy(m)
            t = rel[:3, 3]
            if not (np.allclose(rel[:3, :3], np.eye(3), atol=1e-4) and np.allclose(t, np.round(t), atol=1e-3)):
                raise GeometryError(
                    f"{self.what} is stored on another voxel grid than this volume in world space (it was made "
                    "for another image, or for this one before it was moved); nothing was changed. Choose "
                    "'Create new segmentation' in the Segmentation selector, or choose the volume it was made for")
            self._offset = np.round(t).astype(int)
        return self._offset

    def view(self) -> np.ndarray:
        return _scalars_view(self.image)

    def box_slices(self, box_ijk: Tuple[Tuple[int, int], ...]):
        """Slices of this layer's [k, j, i] array for a volume box ((i0, i1), (j0, j1), (k0, k1)) (half-open) and
        the matching slices of the box: the overlap only; ``(None, None)`` when they do not overlap."""
        if self.empty:
            return None, None
        e, t = self.image.GetExtent(), self.offset()
        arr_sl, box_sl = [], []
        for axis in (2, 1, 0):  # k, j, i
            lo, hi = box_ijk[axis]
            elo, ehi = e[2 * axis] + t[axis], e[2 * axis + 1] + 1 + t[axis]
            a, b = max(lo, elo), min(hi, ehi)
            if a >= b:
                return None, None
            arr_sl.append(slice(a - elo, b - elo))
            box_sl.append(slice(a - lo, b - lo))
        return tuple(arr_sl), tuple(box_sl)

    def read_box(self, box_ijk, label: int) -> np.ndarray:
        shape = tuple(box_ijk[a][1] - box_ijk[a][0] for a in (2, 1, 0))
        out = np.zeros(shape, dtype=bool)
        arr_sl, box_sl = self.box_slices(box_ijk)
        if arr_sl is not None:
            out[box_sl] = self.view()[arr_sl] == label
        return out

    def grow_to_contain(self, box_ijk) -> None:
        """Extend the labelmap IN PLACE (the same object: segments sharing the layer keep pointing at it) so
        that its extent holds the box; an empty labelmap takes the volume's lattice."""
        import vtk
        import slicer

        if self.empty:
            matrix, t, old, scalar_type = self.lattice, np.zeros(3, int), None, vtk.VTK_UNSIGNED_CHAR
            want = [v for a in range(3) for v in (box_ijk[a][0], box_ijk[a][1] - 1)]
        else:
            t, e = self.offset(), list(self.image.GetExtent())
            want = [v for a in range(3) for v in (min(box_ijk[a][0] - t[a], e[2 * a]),
                                                   max(box_ijk[a][1] - 1 - t[a], e[2 * a + 1]))]
            if want == e:
                return
            m = vtk.vtkMatrix4x4()
            self.image.GetImageToWorldMatrix(m)
            matrix = _vtk_matrix_to_numpy(m)
            old, scalar_type = np.array(self.view()), self.image.GetPointData().GetScalars().GetDataType()
        grown = slicer.vtkOrientedImageData()
        grown.SetExtent(want)
        grown.SetImageToWorldMatrix(_numpy_to_vtk_matrix(matrix))
        grown.AllocateScalars(scalar_type, 1)
        arr = _scalars_view(grown)
        arr[...] = 0
        if old is not None and old.size:
            arr[e[4] - want[4]:e[5] - want[4] + 1, e[2] - want[2]:e[3] - want[2] + 1,
                e[0] - want[0]:e[1] - want[0] + 1] = old
        self.image.ShallowCopy(grown)
        self.image.SetImageToWorldMatrix(_numpy_to_vtk_matrix(matrix))
        self._offset = t


def write_mask_to_segment(segmentation_node, segment_id: str, mask_box: np.ndarray, box: Sequence[slice],
                          volume_node, overwrite: str = "all", mask_mode: str = "everywhere",
                          mask_segment_id: Optional[str] = None,
                          intensity_range: Optional[Tuple[float, float]] = None,
                          history: Optional["SegmentHistory"] = None) -> Dict[str, object]:
    """Set segment ``segment_id`` to ``mask_box`` inside ``box`` of the volume grid; nothing outside the box changes.

    ``mask_box``: uint8/bool (k, j, i) array of the box shape; ``box``: (k, j, i) slices of the volume grid
    (a ``MaskUpdate``'s fields). Semantics follow the Segment Editor's "set" modification:

    * Editable area (``mask_mode``, like the editor's "Editable area"; ``mask_segment_id`` for the
      ``*_segment`` modes; ``intensity_range`` like "Editable intensity range"): outside it the segment keeps
      its previous voxels.
    * ``overwrite`` ("all" | "visible" | "none", like "Modify other segments"): voxels the segment holds in the
      editable part of the box are removed from the other (all / visible) segments; "none" allows overlap.
    * Locked segments (tag :data:`LOCK_TAG`) are never changed: their voxels are outside the editable area when
      overwriting, and writing into a locked segment raises ``PermissionError``.

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

    def layer_of(sid) -> _Layer:
        return _Layer(segmentation_node.GetBinaryLabelmapInternalRepresentation(sid), lattice,
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
        vox = _scalars_view(volume_node.GetImageData())[box]
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
            _mark_modified(other.image)
            touched.add(sid)
    _mark_modified(layer.image)
    for sid in touched:
        segmentation.GetSegment(sid).Modified()
    report["modified_segments"] = sorted(touched)
    return report


def _mark_modified(image) -> None:
    scalars = image.GetPointData().GetScalars()
    if scalars is not None:
        scalars.Modified()
    image.Modified()


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
            layer = _Layer(image, volume_lattice_in_segmentation(volume_node, segmentation_node), "")
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
        return (np.array(_scalars_view(labelmap.GetImageData())) > 0).astype(np.uint8)
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


# --------------------------------------------------------------------------------------------- undo
class SegmentHistory:
    """Undo/redo of a segmentation's voxels (``slicer.vtkSegmentationHistory``) kept in step with the engine's
    undo stack.

    One STEP per engine edit (a click, a moved or removed point, a reset): run its write inside :meth:`step`.
    ``write_mask_to_segment(..., history=h)`` calls :meth:`save` just before it changes voxels, so a step holds a
    Slicer state only when its write changed something (``vtkSegmentationHistory`` cannot hold "no change"
    steps: saving an unchanged state makes a later RestorePreviousState skip or repeat states). :meth:`undo` /
    :meth:`redo` move one step: a step without a state needs no restoring. Restores exact previous voxel states
    of all segments (also those the object took voxels from)."""

    def __init__(self, segmentation_node, max_states: int = 30):
        import slicer

        self.node = segmentation_node
        self.max_states = int(max_states)
        self.history = slicer.vtkSegmentationHistory()
        # one more than the steps kept: the first undo saves the current state too (for redo)
        self.history.SetMaximumNumberOfStates(self.max_states + 1)
        self.history.SetSegmentation(segmentation_node.GetSegmentation())
        self._steps: List[bool] = []  # per engine edit: did its write save a Slicer state?
        self._pos = 0  # steps[:pos] are done, steps[pos:] can be redone
        self._saved = None  # inside step(): whether save() was called; None outside

    def save(self) -> None:
        """Save the current voxels as the state before the running step's change (called by the writer just
        before it changes voxels). Outside :meth:`step` the save is a step of its own."""
        self.history.SaveState()
        if self._saved is None:
            self._record(True)
        else:
            self._saved = True

    @contextmanager
    def step(self):
        """One engine edit's write runs inside: afterwards (even when the write failed) the step is recorded,
        with a state when :meth:`save` was called; steps that could be redone are dropped."""
        self._saved = False
        try:
            yield self
        finally:
            saved, self._saved = self._saved, None
            self._record(saved)

    def _record(self, saved: bool) -> None:
        del self._steps[self._pos:]
        self._steps.append(bool(saved))
        self._pos = len(self._steps)
        while sum(self._steps) > self.max_states:  # vtkSegmentationHistory dropped the oldest state
            self._steps.pop(0)
            self._pos -= 1

    @property
    def can_undo(self) -> bool:
        return self._pos > 0

    @property
    def can_redo(self) -> bool:
        return self._pos < len(self._steps)

    def undo(self) -> bool:
        """Go back one step. True when the segmentation now holds the voxels from before that step (restored,
        or the step changed none); False when that state is not available (nothing is restored: the caller
        writes the engine's result; when Slicer's history lost the state, e.g. after edits made elsewhere, the
        history is cleared)."""
        if not self.can_undo:
            return False
        if self._steps[self._pos - 1]:
            if not (self.history.IsRestorePreviousStateAvailable() and self.history.RestorePreviousState()):
                self.clear()
                return False
            self.node.Modified()
        self._pos -= 1
        return True

    def redo(self) -> bool:
        """Go forward one step; True / False as for :meth:`undo`."""
        if not self.can_redo:
            return False
        if self._steps[self._pos]:
            if not (self.history.IsRestoreNextStateAvailable() and self.history.RestoreNextState()):
                self.clear()
                return False
            self.node.Modified()
        self._pos += 1
        return True

    def clear(self) -> None:
        self.history.RemoveAllStates()
        self._steps, self._pos = [], 0


def apply_engine_result(kind: str, update, changed: bool, segmentation_node, segment_id: str, volume_node,
                        history: Optional[SegmentHistory] = None, **settings) -> Optional[Dict[str, object]]:
    """Bring segment ``segment_id`` to the engine's result of one job, keeping ``history`` in step with the
    engine's undo stack (the module's write-back).

    ``kind`` "clicks" or "reset": ``update`` (a ``MaskUpdate``) None means the engine made no edit and nothing
    happens; otherwise it is written as one history step (a Slicer state only if voxels change). ``kind`` "undo"
    or "redo": ``changed`` False means the engine had nothing to undo/redo; otherwise ``history`` steps back or
    forward (exact restoration of every segment), and where it cannot, ``update`` is written without a step.
    ``settings``: :func:`editor_settings` (Segment Editor masking/overwrite). Returns the write report,
    ``{"restored": True}`` after a history restore, or None when nothing was done."""
    if kind not in ("clicks", "reset", "undo", "redo"):
        raise ValueError(f"unknown engine result kind {kind!r}")
    if kind in ("undo", "redo"):
        if not changed:
            return None
        if history is not None and getattr(history, kind)():
            return {"restored": True}
        return _write_update(update, segmentation_node, segment_id, volume_node, None, settings)
    if update is None:
        return None
    if history is None:
        return _write_update(update, segmentation_node, segment_id, volume_node, None, settings)
    with history.step():
        return _write_update(update, segmentation_node, segment_id, volume_node, history, settings)


def _write_update(update, segmentation_node, segment_id, volume_node, history, settings):
    if update is None or segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
        return None
    if any(sl.stop is not None and sl.start is not None and sl.stop <= sl.start for sl in update.box):
        return {"changed_voxels": 0, "taken_voxels": {}, "modified_segments": []}  # an edit of an empty object
    return write_mask_to_segment(segmentation_node, segment_id, update.mask_box, update.box, volume_node,
                                 history=history, **settings)


# --------------------------------------------------------------------------------------------- dependencies
def ensure_dependencies(torch_requirement: str = ">=2.1") -> None:
    """Inside Slicer, on the user's request only: torch through the PyTorch extension (picks the CUDA build that
    matches the driver; never pip-installed directly), other packages through ``slicer.packaging.pip_ensure``
    (Slicer >= 5.12; no release from 5.8.0 to 5.12.3 has a ``slicer.pydeps``) or ``slicer.util.pip_install`` on
    older versions. numpy/SimpleITK/vtk come with Slicer and are never installed."""
    import importlib

    import slicer

    try:
        import torch  # noqa: F401
    except ImportError:
        try:
            import PyTorchUtils
        except ImportError:
            raise RuntimeError("Install the 'PyTorch' extension (View > Extensions Manager), restart Slicer, then "
                               "press 'Install dependencies' again") from None
        if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True,
                                                         torchVersionRequirement=torch_requirement) is None:
            raise RuntimeError("PyTorch was not installed; SAM3DSegment needs it to run the model")
    try:
        import slicerio  # noqa: F401
    except ImportError:
        try:
            packaging = importlib.import_module("slicer.packaging")
        except ImportError:
            packaging = None
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            packaging.pip_ensure("slicerio>=1.0", requester="SAM3DSegment")
        else:
            slicer.util.pip_install("slicerio>=1.0")


# --------------------------------------------------------------------------------------------- export
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
