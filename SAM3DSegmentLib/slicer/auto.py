"""The module's "Find all": every object the automatic mask generator finds, as new segments (docs/automatic.md).

* :func:`roi_from_node`: a Markups ROI node (its world centre, size and axes) as the engine's ROI box.
* :func:`submit_find_all`: queue the engine's ``find_all`` job (the volume is sent first when it changed).
* :class:`InstanceBatch`: the segments one Find all added. :meth:`~InstanceBatch.apply` adds one segment per
  instance (name, colour, scores in its tags; voxels written with overlap allowed, so no existing segment loses a
  voxel); :meth:`~InstanceBatch.undo` removes exactly those segments in one step (every other segment keeps its
  voxels), :meth:`~InstanceBatch.redo` adds them again.
* :class:`FindAllPanel`: the widgets (ROI selector, preset, Find all, Undo/Redo find all, the list of instances with
  their scores). Like :class:`~.remote_link.RemotePanel` it only uses the Qt properties PythonQt exposes as
  attributes and ``connect``/``addItem``/``clear``, so tests drive it with plain objects; it does not import Qt.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import numpy as np

from .labelmap import write_mask_to_segment
from .target import ensure_segment, segmentation_for
from .volumes import volume_from_node, volume_token, vtk_matrix_to_numpy

__all__ = ["roi_from_node", "submit_find_all", "InstanceBatch", "FindAllPanel", "describe"]


def roi_from_node(roi_node) -> Optional[dict]:
    """``{"centre", "size", "axes"}`` of a ``vtkMRMLMarkupsROINode`` in world RAS mm (through its parent
    transforms); None for no node."""
    if roi_node is None:
        return None
    m = vtk_matrix_to_numpy(roi_node.GetObjectToWorldMatrix())
    scale = np.linalg.norm(m[:3, :3], axis=0)
    size = np.asarray(roi_node.GetSize(), dtype=float) * scale
    return {"centre": [float(v) for v in m[:3, 3]], "size": [float(v) for v in size],
            "axes": (m[:3, :3] / scale[None, :]).tolist()}


def submit_find_all(link, volume_node, segmentation_node, roi: Optional[dict], options: dict):
    """Queue the engine's ``find_all`` on ``volume_node`` (sent first when :func:`~.volumes.volume_token` changed);
    the result comes back as a job of kind ``find_all``."""
    token = volume_token(volume_node)
    if token != link.volume_token:  # never cancelled: engine and GUI must agree on the volume
        link.engine.submit("set_volume", volume_from_node(volume_node), token, cancellable=False,
                           context={"kind": "volume", "token": token})
        link.volume_token = token
    return link.engine.submit("find_all", dict(options), roi, token, context={
        "kind": "find_all", "segmentation": segmentation_node, "volume": volume_node})


class InstanceBatch:
    """The segments one Find all adds to ``segmentation_node`` (``instances``: the engine's payload dicts)."""

    def __init__(self, segmentation_node, volume_node, instances: List[dict]):
        self.node, self.volume, self.instances = segmentation_node, volume_node, list(instances)
        self.ids: List[str] = []

    @property
    def applied(self) -> bool:
        return bool(self.ids)

    def apply(self) -> List[str]:
        """Add one segment per instance; returns their ids. Existing segments keep every voxel."""
        seg = self.node.GetSegmentation()
        self.ids = []
        try:
            for inst in self.instances:
                sid = ensure_segment(self.node, name=inst["name"], color=inst["color"])
                self.ids.append(sid)
                for key, value in inst["tags"].items():
                    seg.GetSegment(sid).SetTag(key, str(value))
                box = tuple(slice(int(a), int(b)) for a, b in inst["box"])
                write_mask_to_segment(self.node, sid, np.asarray(inst["mask"]), box, self.volume, overwrite="none")
        except Exception:
            self.undo()            # all or nothing: a failed batch leaves no partial set of segments
            raise
        return list(self.ids)

    def undo(self) -> int:
        """Remove the batch's segments (those still there); returns how many were removed."""
        seg = self.node.GetSegmentation()
        removed = 0
        for sid in self.ids:
            if seg.GetSegment(sid) is not None:
                seg.RemoveSegment(sid)
                removed += 1
        self.ids = []
        return removed

    def redo(self) -> List[str]:
        return self.apply() if not self.ids else list(self.ids)


def describe(inst: dict) -> str:
    """One line of the instance list: name, volume and scores."""
    iou = "n/a" if inst.get("predicted_iou") is None else f"{inst['predicted_iou']:.2f}"
    return (f"{inst['name']}: {inst['volume_ml']:.2f} ml, stability {inst['stability']:.2f}, predicted IoU {iou}"
            + (" (cut by its region)" if inst.get("cut_by_region") else ""))


class FindAllPanel:
    """The Find all widgets (``ui`` as ``slicer.util.childWidgetVariables`` gives them), the module's
    :class:`~.engine_link.EngineLink`, a callback that starts the pump, ``nodes()`` -> (volume, segmentation) and
    ``changed(node)``, called with the segmentation after a batch is added, undone or redone (the module restarts
    its click history: Slicer's voxel history would otherwise restore states from across the batch). Given the
    module's :class:`~.target.TargetSegment` as ``target``, that segmentation is first shown in
    ``ui.segmentationSelector`` as the module's own choice. Connects its own widgets."""

    def __init__(self, ui, link, started: Callable[[], None], nodes: Callable[[], tuple],
                 changed: Callable[[object], None] = lambda node: None, target=None):
        from ..inference.auto_options import PRESETS

        self.ui, self.link, self.started, self.nodes, self.target = ui, link, started, nodes, target
        self._changed = changed
        self.batches: List[InstanceBatch] = []
        self.undone: List[InstanceBatch] = []
        for name in PRESETS:
            ui.findAllPresetComboBox.addItem(name)
        ui.findAllButton.connect("clicked()", self.find_all)
        ui.undoFindAllButton.connect("clicked()", self.undo)
        ui.redoFindAllButton.connect("clicked()", self.redo)
        self.update_buttons()

    def changed(self, node) -> None:
        """A batch was added, undone or redone on ``node``: show it (when a target was given), tell the module."""
        if self.target is not None:
            with self.target.module_change():
                self.ui.segmentationSelector.setCurrentNode(node)
        self._changed(node)

    def options(self) -> dict:
        from ..inference.auto_options import preset

        return preset(self.ui.findAllPresetComboBox.currentText, min_stability=float(self.ui.findAllStabilitySpinBox.value))

    def find_all(self):
        volume, seg = self.nodes()
        if volume is None:
            self.ui.findAllStatusLabel.text = "Select a volume first."
            return None
        roi = roi_from_node(self.ui.findAllRoiSelector.currentNode())
        job = submit_find_all(self.link, volume, seg, roi, self.options())
        self.ui.findAllStatusLabel.text = "Finding all objects " + ("inside the ROI..." if roi else "in the volume...")
        self.started()
        return job

    def show_result(self, job) -> Optional[InstanceBatch]:
        """A finished ``find_all`` job: its instances become segments (one batch); the list shows their scores."""
        ctx, result = job.context, job.result
        node = segmentation_for(ctx["volume"].GetScene(), ctx["volume"], ctx["segmentation"], name_suffix="automatic")
        batch = InstanceBatch(node, ctx["volume"], result["instances"])
        batch.apply()
        self.batches.append(batch)
        self.undone = []
        self.changed(node)
        rep = result["report"]
        self.ui.findAllStatusLabel.text = (f"{len(batch.ids)} object(s) added to '{node.GetName()}' "
                                          f"({rep['decoded']} prompts, {rep['timings']['total_s']:.1f} s).")
        self.show_list(batch)
        self.update_buttons()
        return batch

    def show_list(self, batch: Optional[InstanceBatch]) -> None:
        self.ui.findAllList.clear()
        for inst in (batch.instances if batch is not None and batch.applied else []):
            self.ui.findAllList.addItem(describe(inst))

    def undo(self) -> int:
        """Remove the last batch's segments (one step)."""
        if not self.batches:
            return 0
        batch = self.batches.pop()
        removed = batch.undo()
        self.undone.append(batch)
        self.changed(batch.node)
        self.ui.findAllStatusLabel.text = f"Removed the {removed} segment(s) of the last Find all."
        self.show_list(self.batches[-1] if self.batches else None)
        self.update_buttons()
        return removed

    def redo(self) -> List[str]:
        if not self.undone:
            return []
        batch = self.undone.pop()
        ids = batch.redo()
        self.batches.append(batch)
        self.changed(batch.node)
        self.ui.findAllStatusLabel.text = f"Added the {len(ids)} segment(s) of the Find all again."
        self.show_list(batch)
        self.update_buttons()
        return ids

    def reset(self) -> None:
        """Forget every batch (the scene is closing: their nodes go away)."""
        self.batches, self.undone = [], []
        self.show_list(None)
        self.ui.findAllStatusLabel.text = ""
        self.update_buttons()

    def update_buttons(self) -> None:
        self.ui.undoFindAllButton.enabled = bool(self.batches)
        self.ui.redoFindAllButton.enabled = bool(self.undone)
