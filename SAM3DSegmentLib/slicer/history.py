"""Undo/redo of the segmentation's voxels kept in step with the engine's undo stack, and the module's
write-back of an engine result.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, List, Optional, Tuple

from .labelmap import write_mask_to_segment
from .target import editor_settings


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
    ``settings``: :func:`~.target.editor_settings` (Segment Editor masking/overwrite). Returns the write report,
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


def write_job_result(kind: str, result, segmentation_node, segment_id: str, volume_node,
                     history: Optional[SegmentHistory] = None) -> Tuple[object, Optional[list]]:
    """The module's write-back of a finished engine job, with the Segment Editor's masking and overwrite
    choices for this segmentation (:func:`~SAM3DSegmentLib.slicer.target.editor_settings`).

    ``kind`` "clicks": ``result`` is a ``MaskUpdate`` or None; "undo" / "redo" / "reset": ``result`` is the engine's
    ``(update, clicks after, changed)``. ``history`` is used only when it belongs to ``segmentation_node`` (the
    user may have chosen another segmentation while the job ran). Returns ``(update, clicks)``; ``clicks`` is None
    for "clicks" jobs (the markups already show them)."""
    update, clicks, changed = (result, None, True) if kind == "clicks" else result
    if history is not None and history.node is not segmentation_node:
        history = None
    settings = editor_settings(segmentation_node.GetScene(), segmentation_node)
    apply_engine_result(kind, update, changed, segmentation_node, segment_id, volume_node, history, **settings)
    return update, clicks
