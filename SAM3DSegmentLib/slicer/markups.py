"""The include / exclude prompt points: markups lists, click order, observers that fire only on real changes
(never on hover previews), points outside the volume shown unused, and the Include/Exclude buttons' state.

Points are read in WORLD coordinates (:func:`clicks_from_markups`; ``frame="volume"`` maps them into the
volume's local frame instead).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .volumes import check_frame, volume_geometry


#: Node attribute (on each markups node) holding the placement order of its points: "pointID:seq;..."
ORDER_ATTRIBUTE = "SAM3DSegment.ClickOrder"
#: Scene-wide counter of placements (attribute on the positive node; merged with the negative node's).
_SEQ_ATTRIBUTE = "SAM3DSegment.ClickSeq"
#: Colour of prompt points that are not used (unselected: outside the volume).
UNUSED_POINT_COLOR = (0.55, 0.55, 0.55)


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
    check_frame(frame)
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
