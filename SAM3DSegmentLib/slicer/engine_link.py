"""The module's link to the segmentation engine: jobs queued and collected on Slicer's GUI thread.

The engine runs the model in a child process (:class:`SAM3DSegmentLib.inference.engine_process.ProcessEngine`,
docs/slicer.md "How the engine runs"); :class:`SAM3DSegmentLib.inference.worker.ThreadEngine` has the same API
and runs it on a thread (tests). Each job's ``context`` says what it was for; finished jobs come back through
:meth:`EngineLink.poll`, and :meth:`EngineLink.write_result` writes an edit's mask into the segment. Cancel
(``engine.cancel_all``) never drops a queued volume, so engine and GUI agree on it. :meth:`EngineLink.refine`
("Refine selected segment") starts a segment's object from the segment's own voxels.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional

from ..core.boxes import mask_bounds
from .history import SegmentHistory, write_job_result
from .labelmap import read_segment
from .layers import check_segmentation_geometry
from .volumes import volume_from_node, volume_token

#: Jobs whose result is a segment edit (written back by :meth:`EngineLink.write_result`).
EDIT_KINDS = ("clicks", "reset", "undo", "redo")


def _setting(key: str, default: str) -> str:
    """Slicer's application setting ``key`` (``default`` when unset or outside the Slicer application)."""
    try:
        import slicer

        return str(slicer.app.settings().value(key, default))
    except (ImportError, AttributeError):
        return default


class EngineLink:
    """The engine, the name of the loaded model and the volume the engine has (or will have)."""

    #: the module's progress dialog text while a job of that kind (its ``context["kind"]``) runs
    PROGRESS_TEXT = {"load": "Loading the model...", "find_all": "Finding all objects...",
                     "clicks": "Computing the image embedding (first click of a region)..."}

    #: the pump waits this long for a reply, lock released, while a request is in flight
    PUMP_WAIT_S = 0.025

    #: the Slicer setting that chooses the paste-back (docs/guided_upsampling.md); "trilinear" unless set
    UPSAMPLING_SETTING = "SAM3DSegment/Upsampling"

    def __init__(self, engine=None, upsampling: Optional[str] = None):
        """``engine``, or a new child-process engine with ``upsampling`` "trilinear" or "guided" (None: Slicer's
        setting :attr:`UPSAMPLING_SETTING`, else trilinear); an unknown value is logged and ignored, since a typo
        in a setting must not stop the module."""
        if engine is None:
            upsampling = upsampling or _setting(self.UPSAMPLING_SETTING, "trilinear")
            from ..inference.engine_process import ProcessEngine
            from ..inference.options import UPSAMPLING_MODES, SessionOptions

            if upsampling not in UPSAMPLING_MODES:
                logging.warning("SAM3DSegment: setting %s=%r is not one of %s: using trilinear",
                                self.UPSAMPLING_SETTING, upsampling, UPSAMPLING_MODES)
                upsampling = "trilinear"
            engine = ProcessEngine(SessionOptions(upsampling=upsampling) if upsampling != "trilinear" else None)
        self.engine = engine
        self.model_name: Optional[str] = None  #: the loaded model's name; None until a load succeeds
        #: the last successful load's result (its ``supports_exclude``, ``notice``...: what the model cannot do)
        self.model_info: Optional[dict] = None
        self.volume_token: Optional[tuple] = None  #: :func:`~.volumes.volume_token` of the volume sent last
        self._edits: list = []  #: edit jobs (:data:`EDIT_KINDS`) not yet collected by :meth:`poll`

    def load_model(self, name_or_path: str, device: str):
        """Queue loading a model (a registry name or a checkpoint path) on ``device``; the engine process picks
        the device for "auto" (this process never imports torch). The result is ``{"name", "device",
        "warning"}`` and the model's limits (:meth:`~SAM3DSegmentLib.inference.engine.Engine.load`). A new model
        starts without a volume."""
        self.volume_token = None
        return self.engine.submit("load", name_or_path, str(device),
                                  context={"kind": "load", "name": name_or_path, "device": device})

    @property
    def exclude_allowed(self) -> bool:
        """False when the loaded model has no exclude clicks (the 3DSAM-adapter family)."""
        return bool((self.model_info or {}).get("supports_exclude", True))

    @property
    def refine_allowed(self) -> bool:
        """False when the loaded model has no previous-mask input, so cannot refine a segment (the 3DSAM-adapter
        family)."""
        return bool((self.model_info or {}).get("supports_mask_prompt", True))

    def load_remote(self, settings: dict, key: Optional[str], model: Optional[str] = None):
        """Queue using the remote servers ``settings`` describe (the fields of
        :class:`~SAM3DSegmentLib.remote.settings.RemoteSettings`) instead of a local model; the key travels to
        the engine process over its private connection. Same result as :meth:`load_model`."""
        self.volume_token = None
        return self.engine.submit("load_remote", dict(settings), key, model,
                                  context={"kind": "load", "name": model, "device": "remote"})

    def check_servers(self, servers, key: Optional[str], timeout_s: float, ca_file: Optional[str] = None):
        """Queue the connection test of each server (in the engine process: a dead server never blocks the
        GUI); the result is one dict per server (``ok``, ``version``, ``models``, ``device``, ``rtt_ms``,
        ``line``)."""
        return self.engine.submit("check_servers", list(servers), key, float(timeout_s), ca_file,
                                  context={"kind": "servers"})

    def _send_volume(self, volume_node):
        """Queue the volume when the engine does not have it (:func:`~.volumes.volume_token`); its token."""
        token = volume_token(volume_node)
        if token != self.volume_token:  # never cancelled: engine and GUI must agree on the volume
            self.engine.submit("set_volume", volume_from_node(volume_node), token, cancellable=False,
                               context={"kind": "volume", "token": token})
            self.volume_token = token
        return token

    def sync_clicks(self, volume_node, segmentation_node, segment_id: str, clicks):
        """Queue: (re)send the volume if it changed (:func:`~.volumes.volume_token`), then bring the segment's
        object to ``clicks``; a newer sync supersedes a queued one."""
        token = self._send_volume(volume_node)
        return self._edit_job(self.engine.submit(
            "sync_clicks", segment_id, clicks, token, tag="clicks", supersede=True,
            context={"kind": "clicks", "segmentation": segmentation_node, "segment": segment_id,
                     "volume": volume_node}))

    def refine(self, volume_node, segmentation_node, segment_id: str):
        """Queue "Refine selected segment": the segment's object starts over from the segment's voxels (read here
        on the volume's grid in world space, :func:`~.labelmap.read_segment`; the engine's
        ``set_initial_mask``): its clicks and undo history are cleared, later clicks edit the segment and undo
        or reset return to these voxels. Nothing is written into the scene. Raises ValueError (nothing queued)
        when the segment is empty or an edit of this segmentation is still being computed, and GeometryError when
        the segmentation lies on another voxel grid (clicks could not be written into it). ValueError too when the
        loaded model cannot refine (:attr:`refine_allowed`)."""
        name = segmentation_node.GetSegmentation().GetSegment(segment_id).GetName()
        if not self.refine_allowed:
            raise ValueError(f"the loaded model ({self.model_name}) has no previous-mask input, so it cannot refine "
                             f"segment '{name}' (no previous-mask refinement in the 3DSAM-adapter family): load a "
                             "SAM-Med3D model to refine it, or segment with include clicks from scratch")
        if any(j.context["segmentation"] is segmentation_node for j in self._edits):
            raise ValueError("a click on this segmentation is still being computed; press 'Refine selected segment' "
                             "again when it is done")
        check_segmentation_geometry(segmentation_node, volume_node)
        mask = read_segment(segmentation_node, segment_id, volume_node)
        box = mask_bounds(mask)
        if box is None:
            raise ValueError(f"segment '{name}' is empty: paint or import it first (or click Include to segment it "
                             "from scratch)")
        token = self._send_volume(volume_node)
        return self.engine.submit("set_initial_mask", segment_id, mask[box].copy(), [[b.start, b.stop] for b in box],
                                  token, context={"kind": "refine", "segmentation": segmentation_node,
                                                  "segment": segment_id, "volume": volume_node,
                                                  "voxels": int(mask.sum())})

    def edit(self, kind: str, segmentation_node, segment_id: str, volume_node):
        """Queue undo / redo / reset of a segment's object; the result is (update, clicks, changed)."""
        return self._edit_job(self.engine.submit("edit", kind, segment_id, context={
            "kind": kind, "segmentation": segmentation_node, "segment": segment_id, "volume": volume_node}))

    def _edit_job(self, job):
        self._edits.append(job)
        return job

    def request_clicks(self, segment_id: str):
        """Queue reading the clicks of a segment's object (to show them when the user selects that segment);
        None when no model or no volume is loaded yet."""
        if self.model_name is None or self.volume_token is None:
            return None
        return self.engine.submit("clicks", segment_id, context={"kind": "points", "segment": segment_id})

    def poll(self, wait: Optional[float] = None):
        """Finished jobs (after noting the model's name; a volume the engine did not take is sent again next
        time)."""
        jobs = self.engine.poll(self.PUMP_WAIT_S if wait is None else wait)
        self._edits = [j for j in self._edits if j not in jobs]
        for job in jobs:
            kind = (job.context or {}).get("kind")
            if kind == "load":
                self.model_name = job.result["name"] if job.state == "done" else None
                self.model_info = job.result if job.state == "done" else None
            elif kind == "volume" and job.state != "done" and self.volume_token == job.context["token"]:
                self.volume_token = None
        return jobs

    def write_result(self, job, history: Optional[SegmentHistory] = None):
        """Write a finished edit job (kind in :data:`EDIT_KINDS`) into its segment
        (:func:`~.history.write_job_result`); returns ``(update, clicks)``."""
        ctx = job.context
        return write_job_result(ctx["kind"], job.result, ctx["segmentation"], ctx["segment"], ctx["volume"], history)

    def wait_idle(self, pump: Callable[[], None], process_events: Callable[[], None] = lambda: None,
                  timeout: float = 600.0) -> None:
        """Call ``process_events`` and ``pump`` until the engine is idle (tests, scripts), then ``pump`` once more."""
        t0 = time.time()
        while self.engine.busy and time.time() - t0 < timeout:
            process_events()
            pump()
        pump()

    def close_scene(self) -> None:
        """Scene closing: cancel clicks and free the engine's volume (the model stays loaded)."""
        self.engine.cancel_all()
        if self.volume_token is not None and self.engine.running:  # never start a process just for this
            self.engine.submit("forget_volume", cancellable=False, context={"kind": "forget"})
        self.volume_token = None

    def shutdown(self) -> None:
        self.engine.shutdown(wait=False)
