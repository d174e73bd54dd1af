"""The interactive segmentation engine: clicks in, full-grid masks out.

One :class:`Session` holds one volume and any number of objects (segments). Each object has its clicks,
its model-input regions (each with the latest 32^3 low-res logits) and its mask on the full volume grid
(uint8, ``[k, j, i]``). Coordinates: clicks are RAS mm (or voxel ``ijk`` indices of the volume); regions
have their own (a, b, c) axes (the volume's axes permuted/flipped to the closest RAS-canonical order, see
:mod:`SAM3DSegmentLib.inference.regions`), and prompt points cross the backend interface as continuous (a, b, c)
indices of the 128^3 region grid.

Per click (steps 2-4 and the paste-back follow the reference protocol, docs/reference/SAM_MED3D.md section 5;
the region choice, extension, merging and click honouring are this engine's), each step in its own module:

1. Pick the click's region: the object's region that contains the click and whose centre is nearest to it;
   when none contains it (or it is the object's first click) a new region centred on the click
   (:mod:`~SAM3DSegmentLib.inference.predictor`).
2. Embedding: from the LRU cache (:mod:`~SAM3DSegmentLib.inference.cache`), else ``backend.encode`` once.
3. Prompt: the points ``SessionOptions.prompt_mode`` selects (``newest-click``, the default: the newest
   click only, as SAM-Med3D's training and published evaluation; ``all-clicks``: every click in the region
   so far, as its inference code), plus the region's previous low-res logits.
4. Decode -> the region's new low-res logits (:mod:`~SAM3DSegmentLib.inference.predictor`).
5. Extension (``extend=True``): neighbouring regions while the object's mask touches a region face
   (:mod:`~SAM3DSegmentLib.inference.growth`).
6. Paste back and merge the regions' logits over the changed box only
   (:mod:`~SAM3DSegmentLib.inference.compose`); the mask is a pure function of the regions' logits (and of
   the initial mask where no region looks).
7. Honour the clicks (:mod:`~SAM3DSegmentLib.inference.honour`).

Undo/redo: every mutating call (``add_click``, ``add_clicks``, ``set_clicks``, ``reset``) pushes one history
entry; ``undo`` restores the exact previous mask and logits, ``redo`` re-applies. ``set_initial_mask`` starts
an object over from an existing mask that clicks then edit (:mod:`~SAM3DSegmentLib.inference.prior`). Masks
are stored cropped to their objects' boxes (:mod:`~SAM3DSegmentLib.inference.history`); :meth:`Session.mask`
assembles the full-grid array on request and :meth:`Session.memory_bytes` reports what masks, history and
logits take.
"""
from __future__ import annotations

import itertools
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .cache import EmbeddingCache, volume_content_key
from .compose import MaskComposer
from .growth import RegionGrowth
from .history import Edit, ObjectRecord as _Object, Patch, memory_report
from .honour import honour_changes, honour_clicks
from .options import PROMPT_MODES, SessionOptions, model_options, refuse_exclude, refuse_mask_prompt
from .predictor import RegionPredictor, RegionState, Stats, normalise_click
from .prior import InitialMask
from ..core.boxes import EMPTY_BOX, Box, absolute, box_intersect, box_union, mask_bounds, points_box
from ..core.geometry import GeometryError, Volume
from ..core.types import Click, MaskUpdate

__all__ = ["Click", "SessionOptions", "MaskUpdate", "Session", "PROMPT_MODES"]


class Session:
    """Interactive click-based segmentation of one volume with a promptable model behind ``backend``."""

    def __init__(self, backend, options: Optional[SessionOptions] = None):
        self.backend = backend
        #: the options in force: ``spacing_mm`` and ``prompt_mode`` resolved for this backend (:func:`model_options`)
        self.options = model_options(backend, options or SessionOptions())
        size = int(getattr(backend, "image_size", self.options.region_size))
        if size != self.options.region_size:
            raise ValueError(
                f"the model takes {size}^3 inputs but SessionOptions.region_size is "
                f"{self.options.region_size}; set region_size={size}")
        self.low_res_size = int(getattr(backend, "low_res_size", self.options.region_size // 4))
        self.cache = EmbeddingCache(self.options.cache_size, max_bytes=int(self.options.cache_mb * 2 ** 20))
        self.volume: Optional[Volume] = None
        self.volume_key: Optional[str] = None
        self._objects: Dict[str, _Object] = {}
        self._current: Optional[str] = None
        self._ids = itertools.count(1)
        self._composer: Optional[MaskComposer] = None
        self._predictor: Optional[RegionPredictor] = None
        self._growth: Optional[RegionGrowth] = None

    # ------------------------------------------------------------------ volume and objects
    def set_volume(self, volume: Volume) -> str:
        """Use ``volume`` from now on. Computes its content key (embeddings of the same content stay valid)
        and resets every object (clicks, regions, masks, history). Returns the content key."""
        if not isinstance(volume, Volume):
            raise TypeError("set_volume expects a geometry.Volume (array[k, j, i] + ijk_to_ras)")
        arr = volume.array
        if arr.dtype.kind not in "biuf":
            raise GeometryError(f"volume has non-numeric voxels (dtype {arr.dtype}); give a scalar CT image")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise GeometryError("volume contains NaN or infinite voxels; fix or mask them before segmenting")
        self.volume = volume
        self.volume_key = volume_content_key(arr, volume.ijk_to_ras)
        o = self.options
        self._composer = MaskComposer(volume, o.region_size, self.low_res_size, o.threshold, o.upsampling, o.spacing_mm)
        self._predictor = RegionPredictor(self.backend, self.cache, volume, self.volume_key, o,
                                          self.low_res_size, self._composer)
        self._growth = RegionGrowth(self._predictor, self._composer, o)
        for obj in self._objects.values():
            obj.clear()
        return self.volume_key

    def new_object(self, name: Optional[str] = None) -> str:
        """Create an object (segment) and make it current; returns its id."""
        n = next(self._ids)
        oid = f"object_{n}"
        while oid in self._objects:
            n = next(self._ids)
            oid = f"object_{n}"
        self._objects[oid] = _Object(oid, name or f"Segment_{n}")
        self._current = oid
        return oid

    def select_object(self, oid: str) -> None:
        self._object(oid)
        self._current = oid

    def remove_object(self, oid: str) -> None:
        self._object(oid)
        del self._objects[oid]
        if self._current == oid:
            self._current = next(iter(self._objects), None)

    @property
    def current_object(self) -> Optional[str]:
        return self._current

    def object_ids(self) -> List[str]:
        return list(self._objects)

    def object_name(self, oid: Optional[str] = None) -> str:
        return self._object(oid).name

    def mask(self, oid: Optional[str] = None) -> np.ndarray:
        """The object's mask, uint8 0/1, (k, j, i) on the full volume grid (read-only; assembled on each call
        from the cropped store: use :meth:`mask_cropped` where the bounding box is enough)."""
        obj = self._object(oid)
        out = self._view(obj, tuple(slice(0, n) for n in self._require_volume().array.shape))
        out.flags.writeable = False
        return out

    def mask_cropped(self, oid: Optional[str] = None) -> Tuple[Box, np.ndarray]:
        """``(box, mask_in_box)``: the (k, j, i) bounding box of the object's mask and the mask inside it
        (uint8, read-only); an all-zero mask gives an empty box and a (0, 0, 0) array."""
        obj = self._object(oid)
        self._require_volume()
        box = self._mask_extent(obj)
        if box is None:
            box = EMPTY_BOX
        out = self._view(obj, box)
        nz = mask_bounds(out) if out.size else None
        if nz is None:
            out = np.zeros((0, 0, 0), dtype=np.uint8)
            box = EMPTY_BOX
        else:
            out, box = np.ascontiguousarray(out[nz]), absolute(nz, box)
        out.flags.writeable = False
        return box, out

    def memory_bytes(self, oid: Optional[str] = None) -> Dict[str, int]:
        """Memory held for one object (``oid``) or for all (None), in bytes: ``masks`` (the cropped masks, the
        click-honouring state and the initial mask), ``history`` (undo/redo mask patches beyond those shared with
        the live masks; each array counted once), ``logits`` (the regions' low-res logits, current and in the
        history, and the initial mask's prompts; each array counted once), their ``total``, the ``objects``
        counted and ``full_grid_mask_bytes`` (what one uncropped uint8 mask would take, for comparison).
        Embeddings are in :attr:`cache` (``cache.stats()``), bounded by ``SessionOptions.cache_size``."""
        objs = [self._object(oid)] if oid is not None else list(self._objects.values())
        return memory_report(objs, None if self.volume is None else self.volume.array.shape)

    def clicks(self, oid: Optional[str] = None) -> List[Click]:
        return list(self._object(oid).clicks)

    def region_count(self, oid: Optional[str] = None) -> int:
        return len(self._object(oid).regions)

    def regions(self, oid: Optional[str] = None) -> list:
        """The object's model-input regions (``regions.Region``), in creation order."""
        return [r.region for r in self._object(oid).regions]

    def can_undo(self, oid: Optional[str] = None) -> bool:
        return bool(self._object(oid).history.undo)

    def can_redo(self, oid: Optional[str] = None) -> bool:
        return bool(self._object(oid).history.redo)

    # ------------------------------------------------------------------ clicks
    def set_initial_mask(self, mask, oid: Optional[str] = None, box: Optional[Box] = None) -> MaskUpdate:
        """Start the object (``oid``; else the current one, created when there is none) over from ``mask``: a
        ``Volume`` on any grid (resampled by nearest neighbour in physical space), a (k, j, i) array on the
        volume's grid, or one on ``box`` of it; non-zero voxels are in the mask. Clicks, regions and undo history
        are cleared: the mask is the object's mask, then its previous-mask prompt in every region it touches
        (:mod:`~SAM3DSegmentLib.inference.prior`). Undo returns to it and no further; ``reset`` returns to it.
        ValueError (nothing changes) for a model without previous-mask input (the 3DSAM-adapter family)."""
        t0 = time.perf_counter()
        refuse_mask_prompt(self.backend)
        vol = self._require_volume()
        obj = self._current_or_new() if oid is None else self._object(oid)
        init = InitialMask.of(mask, vol, self.options, self.low_res_size, box=box)   # checked before any change
        before = self._mask_extent(obj)
        obj.clear()
        obj.init = init
        obj.raw.set(Patch(init.box, init.box, init.array))
        return self._plain_update(obj, box_union(before, init.box), t0)

    def add_click(self, ras: Optional[Sequence[float]] = None, positive: bool = True,
                  ijk: Optional[Sequence[float]] = None) -> MaskUpdate:
        """Add a click (RAS mm or voxel ijk) to the current object and update its mask."""
        return self.add_clicks([Click(ras=None if ras is None else tuple(ras), positive=bool(positive),
                                      ijk=None if ijk is None else tuple(ijk))])

    def add_clicks(self, clicks: Sequence[Click], check: Optional[Callable[[], None]] = None) -> MaskUpdate:
        """Append ``clicks`` to the current object, applying each incrementally (one decode per new click, as
        :meth:`add_click`; the existing clicks are not replayed). One undo step for all of them.

        ``check`` (optional) is called after each click is computed and before anything is stored; if it
        raises, the exception propagates and the session is exactly as before (clicks, masks, undo and redo)."""
        t0 = time.perf_counter()
        obj = self._current_or_new()
        normalised = [normalise_click(self.volume, c) for c in clicks]   # all validated before anything changes
        refuse_exclude(self.backend, normalised)
        stats = Stats()
        regions = list(obj.regions)
        all_clicks = list(obj.clicks)
        dirty = None
        for click in normalised:
            all_clicks.append(click)
            dirty = box_union(dirty, self._apply_click(regions, list(all_clicks), stats, obj.init))
            if check is not None:
                check()
        return self._commit(obj, all_clicks, regions, dirty, stats, t0)

    def set_clicks(self, clicks: Sequence[Click], check: Optional[Callable[[], None]] = None) -> MaskUpdate:
        """Replace the current object's clicks and recompute it from scratch (decode only: embeddings are
        cached). Used when the user moves or removes a point; one undo step. ``check`` as in :meth:`add_clicks`."""
        t0 = time.perf_counter()
        obj = self._current_or_new()
        normalised = [normalise_click(self.volume, c) for c in clicks]   # all validated before anything changes
        refuse_exclude(self.backend, normalised)
        stats = Stats()
        dirty = None
        for r in obj.regions:
            dirty = box_union(dirty, r.pos_box)
        regions: List[RegionState] = []
        for n in range(1, len(normalised) + 1):
            dirty = box_union(dirty, self._apply_click(regions, normalised[:n], stats, obj.init))
            if check is not None:
                check()
        return self._commit(obj, normalised, regions, dirty, stats, t0)

    def reset(self, oid: Optional[str] = None) -> MaskUpdate:
        """Clear the object's clicks, regions and mask (undoable); an object with an initial mask returns to it."""
        t0 = time.perf_counter()
        obj = self._object(oid)
        dirty = None
        for r in obj.regions:
            dirty = box_union(dirty, r.pos_box)
        return self._commit(obj, [], [], dirty, Stats(), t0)

    def undo(self, oid: Optional[str] = None) -> MaskUpdate:
        """Restore the object's state before its last edit (mask and logits exactly)."""
        obj = self._object(oid)
        if not obj.history.undo:
            return self._plain_update(obj, None, time.perf_counter())
        e = obj.history.undo.pop()
        obj.history.redo.append(e)
        return self._restore(obj, e, forward=False)

    def redo(self, oid: Optional[str] = None) -> MaskUpdate:
        """Re-apply the last undone edit."""
        obj = self._object(oid)
        if not obj.history.redo:
            return self._plain_update(obj, None, time.perf_counter())
        e = obj.history.redo.pop()
        obj.history.undo.append(e)
        return self._restore(obj, e, forward=True)

    # ------------------------------------------------------------------ internals
    def _object(self, oid: Optional[str] = None) -> _Object:
        key = self._current if oid is None else oid
        if key is None or key not in self._objects:
            if oid is None:
                raise KeyError("no current object: call new_object() first")
            raise KeyError(f"unknown object id {oid!r}; known: {list(self._objects)}")
        return self._objects[key]

    def _current_or_new(self) -> _Object:
        self._require_volume()
        if self._current is None:
            self.new_object()
        return self._object()

    def _require_volume(self) -> Volume:
        if self.volume is None:
            raise RuntimeError("no volume: call Session.set_volume(volume) before clicking")
        return self.volume

    def _mask_extent(self, obj: _Object) -> Optional[Box]:
        """A box holding every voxel of the object's mask (model mask and forced include voxels)."""
        return box_union(obj.raw.box, None if obj.honour is None else points_box(obj.honour.on))

    def _view(self, obj: _Object, box: Box) -> np.ndarray:
        """The object's mask (clicks honoured) on ``box`` (a new uint8 array)."""
        out = obj.raw.get(box)
        if obj.honour is not None:
            obj.honour.apply(out, box)
        return out

    def _apply_click(self, regions: List[RegionState], clicks: List[Click], stats: Stats,
                     init: Optional[InitialMask] = None) -> Optional[Box]:
        """Apply the LAST of ``clicks`` to ``regions`` (modified in place); a new region's first prompt comes
        from the object's initial mask ``init`` when it has one (such an object grows into neighbouring regions
        only with ``SessionOptions.init_extend``). Returns the box that changed."""
        ras = np.asarray(clicks[-1].ras, dtype=np.float64)
        n = self._predictor.choose_region(regions, ras)
        if n is None:
            regions.append(self._predictor.region_around(ras))
            n, old = len(regions) - 1, None
        else:
            old = regions[n]
        rs = regions[n]
        pts, labels = self._predictor.prompt(rs, clicks)
        prev = rs.logits if rs.logits is not None or init is None else init.region_prompt(rs.region)
        regions[n] = self._predictor.decode(rs, pts, labels, prev, stats)
        dirty = self._composer.changed_box(regions, n, old)
        if self.options.extend and (init is None or self.options.init_extend):
            dirty = box_union(dirty, self._growth.extend(regions, n, stats, clicks, init))
        return box_union(dirty, self._composer.click_box(ras))   # guided: the voxels its click guard may change

    def _commit(self, obj: _Object, clicks: List[Click], regions: List[RegionState], dirty: Optional[Box],
                stats: Stats, t0: float) -> MaskUpdate:
        t = time.perf_counter()
        vol_box = tuple(slice(0, n) for n in self._require_volume().array.shape)
        if obj.init is not None:   # regions added or removed: the initial mask in their footprints changes
            dirty = box_union(dirty, obj.init.changed_box(obj.regions, regions))
        if dirty is not None:
            dirty = box_intersect(dirty, vol_box)
        after = None
        if dirty is not None:
            after = self._composer.render(regions, dirty, clicks)
            if obj.init is not None:
                after = obj.init.compose(after, regions, dirty)
            patch_before, patch_after = obj.raw.patch(dirty), Patch.of(after, dirty)
            obj.raw.set(patch_after)
        else:
            patch_before = patch_after = Patch(EMPTY_BOX)
        honour_before = obj.honour
        keep = None if obj.init is None else (lambda: obj.init.anchors(regions))
        obj.honour = honour_clicks(self.volume, obj.raw, clicks, keep) if self.options.honour_clicks else None
        box = box_intersect(box_union(dirty, honour_changes(honour_before, obj.honour)), vol_box)
        box = EMPTY_BOX if box is None else box
        if after is not None and box == dirty:
            mask_box = after                   # our own array (the store holds a copy)
            if obj.honour is not None:
                obj.honour.apply(mask_box, box)
        else:
            mask_box = self._view(obj, box)
        mask_box.flags.writeable = False
        paste_s = time.perf_counter() - t
        edit = Edit(tuple(obj.clicks), tuple(obj.regions), tuple(clicks), tuple(regions),
                    dirty, patch_before, patch_after, honour_before, obj.honour)
        obj.history.push(edit, self.options.history_limit, self.options.history_mb * 2 ** 20, obj.live_arrays())
        obj.clicks = list(clicks)
        obj.regions = list(regions)
        timings = {"encode_s": stats.encode_s, "decode_s": stats.decode_s, "paste_s": paste_s,
                   "total_s": time.perf_counter() - t0, "regions": len(regions),
                   "max_regions_reached": bool(stats.truncated)}
        return MaskUpdate(obj.oid, box, mask_box, stats.encoded, timings, len(regions), stats.truncated)

    def _restore(self, obj: _Object, edit: Edit, forward: bool) -> MaskUpdate:
        t0 = time.perf_counter()
        patch = edit.patch_after if forward else edit.patch_before
        honour = edit.honour_after if forward else edit.honour_before
        if edit.box is not None:
            obj.raw.set(patch)
        box = box_union(edit.box, honour_changes(obj.honour, honour))
        obj.honour = honour
        obj.clicks = list(edit.clicks_after if forward else edit.clicks_before)
        obj.regions = list(edit.regions_after if forward else edit.regions_before)
        return self._plain_update(obj, box, t0)

    def _plain_update(self, obj: _Object, box: Optional[Box], t0: float) -> MaskUpdate:
        """An update that ran no model: the object's mask on ``box`` (None: nothing changed)."""
        if box is not None:
            box = box_intersect(box, tuple(slice(0, n) for n in self.volume.array.shape))
        box = EMPTY_BOX if box is None else box
        mask_box = self._view(obj, box)
        mask_box.flags.writeable = False
        dt = time.perf_counter() - t0
        return MaskUpdate(obj.oid, box, mask_box, 0,
                          {"encode_s": 0.0, "decode_s": 0.0, "paste_s": dt, "total_s": dt,
                           "regions": len(obj.regions), "max_regions_reached": False}, len(obj.regions), False)
