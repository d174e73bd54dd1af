"""The engine that the worker thread drives: the model, one :class:`~SAM3DSegmentLib.inference.session.Session`
and the caller's objects, behind job bodies (:class:`Engine`); and how a session is brought to the GUI's click
list with the least work (:func:`plan_click_update`).

Pure Python + numpy; torch is imported only when a local model is loaded (through
:mod:`~SAM3DSegmentLib.inference.backends` and :mod:`~SAM3DSegmentLib.models`), never for remote servers
(:meth:`Engine.load_remote`, :mod:`SAM3DSegmentLib.remote`).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..core.types import Click

__all__ = ["Engine", "plan_click_update"]


def plan_click_update(old: Sequence[Tuple[Sequence[float], bool]], new: Sequence[Tuple[Sequence[float], bool]],
                      atol: float = 1e-4):
    """How to bring a session from clicks ``old`` to ``new`` (lists of ``(ras, positive)``):
    ``("none",)``; ``("add", [clicks...])`` when ``new`` is ``old`` plus any number of clicks at the end
    (one decode per appended click, nothing replayed); else ``("set", new)`` (replay: a point was moved or
    removed, or a sign changed)."""
    def same(a, b):
        return bool(a[1]) == bool(b[1]) and np.allclose(np.asarray(a[0], float), np.asarray(b[0], float), atol=atol)

    prefix = len(old) <= len(new) and all(same(a, b) for a, b in zip(old, new))
    if prefix and len(new) == len(old):
        return ("none",)
    if prefix:
        return ("add", [tuple(c) for c in new[len(old):]])
    return ("set", list(new))


class Engine:
    """Model + session, used ONLY from the worker thread (every method is a job body).

    Objects are keyed by the caller's key (the Slicer segment id), mapped to session object ids.
    """

    def __init__(self, session_options=None):
        self.session_options = session_options
        self.session = None
        self.backend = None
        self.volume_key: Optional[str] = None
        self.volume_token: Any = None
        self._objects: Dict[str, str] = {}

    # ------------------------------------------------------------------ model
    def load(self, checkpoint: str, device: str = "auto", dtype: str = "float32",
             progress: Optional[Callable[[int, Optional[int]], None]] = None) -> Dict[str, Any]:
        """Resolve (download if needed) and load a checkpoint of either model family on ``device`` ("auto": CUDA,
        else Apple MPS, else the CPU, chosen HERE, so the caller's process need not import torch). Returns
        ``{"name": the backend's name, "device": the device used, "warning": the CPU warning when it is the CPU,
        else None}`` and the model's limits (:meth:`model_limits`)."""
        from .backends import make_backend, require_torch

        require_torch()   # a clear message before anything is downloaded or the model code is imported
        from ..models.device import device_warning, resolve_device
        from ..models.families import load_model
        from ..weights import get_weights, resolve_checkpoint
        from ..weights.registry import is_registered_name

        dev = resolve_device(device)   # a clear error when the device asked for is not there
        path = resolve_checkpoint(checkpoint, progress=progress if progress is not None else "auto")
        model = load_model(str(path), map_location="cpu")
        entry = get_weights(checkpoint) if is_registered_name(checkpoint) else None
        name = self.set_backend(make_backend(model, device=str(dev), dtype=dtype,
                                             intensity=getattr(entry, "intensity", None)))
        return {"name": name, "device": str(dev), "warning": device_warning(dev), **self.model_limits()}

    def model_limits(self) -> Dict[str, Any]:
        """What the GUI says about the loaded model: ``family``, ``supports_exclude``, ``supports_mask_prompt``
        and ``notice`` (one line on what the model cannot do, or None: the 3DSAM-adapter has no exclude clicks
        and no previous-mask refinement)."""
        b = self.backend
        return {"family": getattr(b, "family", "sam_med3d"),
                "supports_exclude": bool(getattr(b, "supports_exclude", True)),
                "supports_mask_prompt": bool(getattr(b, "supports_mask_prompt", True)),
                "notice": getattr(b, "limits_notice", None)}

    def load_remote(self, settings: Dict[str, Any], key: Optional[str] = None,
                    model: Optional[str] = None) -> Dict[str, Any]:
        """Use the remote servers that ``settings`` (the fields of
        :class:`~SAM3DSegmentLib.remote.settings.RemoteSettings`) describe, with bearer ``key``, instead of a
        local model; ``model``: a model name the servers offer (None: their first). Needs no torch. The result
        has :meth:`load`'s keys (``device``: the server's)."""
        from ..remote.settings import RemoteSettings, backend_from_settings

        backend = backend_from_settings(RemoteSettings(**settings), key, model)
        name = self.set_backend(backend)
        return {"name": name, "device": str(backend.caps.get("device") or "?"), "warning": None,
                **self.model_limits()}

    def check_servers(self, servers: Sequence[str], key: Optional[str] = None, timeout_s: float = 5.0,
                      ca_file: Optional[str] = None) -> List[Dict[str, Any]]:
        """The connection test of :func:`~SAM3DSegmentLib.remote.settings.check_connection`, one dict per server
        (its fields and ``line``, the text to show); runs here so that a slow server never blocks the GUI."""
        import dataclasses

        from ..remote.settings import check_connection

        return [dict(dataclasses.asdict(r), line=r.line())
                for r in check_connection(list(servers), key, timeout_s=timeout_s, ca_file=ca_file or None)]

    def set_backend(self, backend) -> str:
        from .session import Session, SessionOptions

        options = self.session_options or SessionOptions(region_size=int(getattr(backend, "image_size", 128)))
        if self.backend is not None and self.backend is not backend and hasattr(self.backend, "close"):
            self.backend.close()   # a remote backend's connections
        self.backend = backend
        self.session = Session(backend, options)
        self.volume_key = self.volume_token = None
        self._objects = {}
        return str(getattr(backend, "name", type(backend).__name__))

    # ------------------------------------------------------------------ volume and objects
    def set_volume(self, volume, token: Any = None) -> str:
        """Use ``volume`` (forgets every object). ``token`` is the caller's name for this volume: clicks sent
        with another token are refused (see :meth:`sync_clicks`), so engine and GUI cannot disagree on it."""
        self._require_session()
        self.volume_key = self.volume_token = None   # a failed set leaves no volume, never the previous one
        self._objects = {}
        self.volume_key = self.session.set_volume(volume)
        self.volume_token = token
        return self.volume_key

    def forget_volume(self) -> None:
        """Drop the volume, every object and the embedding cache (memory); the model stays loaded."""
        if self.backend is not None:
            self.set_backend(self.backend)

    def _object(self, key: str) -> str:
        oid = self._objects.get(key)
        if oid is None or oid not in self.session.object_ids():
            oid = self.session.new_object(name=key)
            self._objects[key] = oid
        self.session.select_object(oid)
        return oid

    def forget_object(self, key: str) -> None:
        oid = self._objects.pop(key, None)
        if oid is not None and self.session is not None and oid in self.session.object_ids():
            self.session.remove_object(oid)

    def clicks(self, key: str) -> List[Tuple[Tuple[float, float, float], bool]]:
        self._require_session()
        return [(tuple(c.ras), bool(c.positive)) for c in self.session.clicks(self._object(key))]

    # ------------------------------------------------------------------ edits (job bodies)
    def sync_clicks(self, job: Optional[Any], key: str, clicks: Sequence[Tuple[Sequence[float], bool]],
                    volume_token: Any = None):
        """Bring object ``key`` to exactly ``clicks``; returns a MaskUpdate or None when nothing changed.
        Clicks appended after the current ones are decoded one by one (nothing replayed).

        ``volume_token`` (when given) must be the token of the last :meth:`set_volume`, else RuntimeError.
        ``job`` (the running ``worker.Job``, or None): if it is cancelled while it runs, its ``Cancelled`` is
        raised before the session stores anything."""
        self._require_volume()
        if volume_token is not None and volume_token != self.volume_token:
            raise RuntimeError("the engine holds another volume than the one clicked on; click again "
                               "(the volume is re-sent)")
        oid = self._object(key)
        old = [(c.ras, c.positive) for c in self.session.clicks(oid)]
        plan = plan_click_update(old, clicks)
        check = job.check_cancelled if job is not None else None
        if check is not None:
            check()
        if plan[0] == "none":
            return None
        as_clicks = [Click(ras=tuple(float(v) for v in r), positive=bool(p)) for r, p in plan[1]]
        if plan[0] == "add":
            return self.session.add_clicks(as_clicks, check=check)
        return self.session.set_clicks(as_clicks, check=check)

    def set_initial_mask(self, key: str, mask, box=None, volume_token: Any = None):
        """Start object ``key`` over from ``mask`` (its clicks and undo history are cleared; undo and reset return
        to it): ``Session.set_initial_mask``'s mask (a ``Volume`` on any grid, or an array on the volume's grid
        or on its (k, j, i) ``box``, a list of ``(start, stop)`` pairs or slices). ``volume_token`` as in
        :meth:`sync_clicks`. Returns the MaskUpdate."""
        self._require_volume()
        if volume_token is not None and volume_token != self.volume_token:
            raise RuntimeError("the engine holds another volume than the segment's; try again (the volume is re-sent)")
        if box is not None:
            box = tuple(b if isinstance(b, slice) else slice(int(b[0]), int(b[1])) for b in box)
        return self.session.set_initial_mask(mask, self._object(key), box=box)

    def edit(self, kind: str, key: str):
        """``kind`` in undo / redo / reset. Returns ``(MaskUpdate or None, clicks after, changed)``;
        ``changed`` is False (and the update None) when there was nothing to undo/redo or no session yet."""
        if kind not in ("undo", "redo", "reset"):
            raise ValueError(f"unknown edit {kind!r}")
        if self.session is None or self.volume_key is None:
            return None, [], False
        oid = self._object(key)
        possible = {"undo": self.session.can_undo, "redo": self.session.can_redo}.get(kind, lambda o: True)(oid)
        update = getattr(self, kind)(key) if possible else None
        return update, self.clicks(key), bool(possible)

    def mask(self, key: str) -> np.ndarray:
        """The object's mask (uint8 [k, j, i], full volume grid)."""
        self._require_volume()
        return self.session.mask(self._object(key))

    def undo(self, key: str):
        self._require_volume()
        return self.session.undo(self._object(key))

    def redo(self, key: str):
        self._require_volume()
        return self.session.redo(self._object(key))

    def reset(self, key: str):
        self._require_volume()
        return self.session.reset(self._object(key))

    def find_all(self, job: Optional[Any], options: Optional[dict] = None, roi: Optional[dict] = None,
                 volume_token: Any = None) -> dict:
        """Every instance the automatic mask generator finds in the volume (inside ``roi``: ``{"centre", "size",
        "axes"}`` in RAS mm, or the whole volume), with :class:`~.auto_options.AutoOptions` fields ``options``,
        on the session's model and embedding cache. Returns :func:`~.auto_export.payload`; changes no object.
        ``job``: cancelled between decoder calls (``Cancelled``)."""
        from .auto_export import payload
        from .auto_options import AutoOptions
        from .automatic import AutomaticMaskGenerator3D
        from .candidates import RoiBox

        self._require_volume()
        if volume_token is not None and volume_token != self.volume_token:
            raise RuntimeError("the engine holds another volume than the one to search; press Find all again "
                               "(the volume is re-sent)")
        opts = AutoOptions.for_session(self.session.options, **dict(options or {}))
        box = None if roi is None else RoiBox(tuple(roi["centre"]), tuple(roi["size"]), roi.get("axes"))
        gen = AutomaticMaskGenerator3D.from_session(self.session, opts)
        check = job.check_cancelled if job is not None else None
        return payload(gen.generate(self.session.volume, box, volume_key=self.volume_key, check=check))

    def _require_session(self) -> None:
        if self.session is None:
            raise RuntimeError("no model loaded: choose a model and press 'Load model'")

    def _require_volume(self) -> None:
        self._require_session()
        if self.volume_key is None:
            raise RuntimeError("no volume: select the CT volume to segment")
