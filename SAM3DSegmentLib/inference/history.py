"""An object's stored mask and its undo/redo history.

Memory: an object's model mask is stored cropped to the bounding box of its voxels (:class:`CroppedMask`: a
small object on a large CT costs its box, not the volume); the session assembles full-grid arrays on request.

Undo/redo: every mutating session call pushes one :class:`Edit` holding the object's clicks and region states
before and after (logit arrays are never modified in place, so they are shared, not copied), the model-mask
:class:`Patch` of the changed box before and after (cropped to its non-zero part) and the click-honouring state
before and after. Undo restores the exact previous mask and logits; redo re-applies. :class:`History` keeps at
most ``SessionOptions.history_limit`` entries and ``history_mb`` of mask patches per object (oldest dropped
first, at least one kept).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Tuple

import numpy as np

from ..core.boxes import (Box, absolute, box_contains, box_intersect, box_shape, box_union, mask_bounds, read_box,
                          relative)
from ..core.types import Click

__all__ = ["Patch", "Edit", "CroppedMask", "History", "ObjectRecord", "unique_bytes", "memory_report"]


def unique_bytes(arrays: Iterable[np.ndarray], seen: set) -> int:
    """Bytes of the arrays not in ``seen`` (by identity), each counted once; adds them to ``seen``."""
    total = 0
    for a in arrays:
        if id(a) not in seen:
            seen.add(id(a))
            total += int(a.nbytes)
    return total


@dataclass(frozen=True)
class Patch:
    """A uint8 mask on a box of the volume grid, stored cropped to its non-zero voxels (zero elsewhere)."""

    box: Box                               # the box the patch covers
    sub: Optional[Box] = None              # the part of ``box`` holding its non-zero voxels (None: all zero)
    crop: Optional[np.ndarray] = None      # the mask on ``sub`` (read-only)

    @classmethod
    def of(cls, values: np.ndarray, box: Box) -> "Patch":
        nz = mask_bounds(values)
        if nz is None:
            return cls(box)
        crop = values[nz].copy()
        crop.flags.writeable = False
        return cls(box, absolute(nz, box), crop)

    def moved_to(self, box: Box) -> "Patch":
        """The same voxels as a patch of the larger ``box`` (zero elsewhere)."""
        return Patch(box, self.sub, self.crop)

    @property
    def nbytes(self) -> int:
        return 0 if self.crop is None else int(self.crop.nbytes)

    def full(self) -> np.ndarray:
        """The patch as an array of ``box``'s shape."""
        out = np.zeros(box_shape(self.box), dtype=np.uint8)
        if self.crop is not None:
            out[relative(self.sub, self.box)] = self.crop
        return out


@dataclass
class Edit:
    """One undo step of one object."""

    clicks_before: Tuple[Click, ...]
    regions_before: tuple                  # RegionState (inference.predictor) tuples
    clicks_after: Tuple[Click, ...]
    regions_after: tuple
    box: Optional[Box]
    patch_before: Patch                    # the model mask on ``box`` before and after (cropped)
    patch_after: Patch
    honour_before: object = None           # Honour (inference.honour) or None
    honour_after: object = None

    @property
    def mask_before(self) -> np.ndarray:
        """The model mask on ``box`` before the edit (a new array)."""
        return self.patch_before.full()

    @property
    def mask_after(self) -> np.ndarray:
        return self.patch_after.full()

    def arrays(self) -> List[np.ndarray]:
        """The mask arrays this entry holds (patches may share them with each other and the live mask)."""
        out = [p.crop for p in (self.patch_before, self.patch_after) if p.crop is not None]
        return out + [h.drop for h in (self.honour_before, self.honour_after) if h is not None and h.drop is not None]


@dataclass
class CroppedMask:
    """A uint8 mask of the volume grid stored as ``array`` (read-only, never modified in place, so patches may
    share it) on ``box``, zero elsewhere; both None when the mask is empty."""

    box: Optional[Box] = None
    array: Optional[np.ndarray] = None

    def get(self, box: Box) -> np.ndarray:
        """The mask on ``box`` (a new uint8 array)."""
        return read_box(self.array, self.box, box)

    def patch(self, box: Box) -> Patch:
        """The mask on ``box`` as a patch (shares the stored array when the box holds all of it)."""
        inter = box_intersect(self.box, box)
        if inter is None:
            return Patch(box)
        if inter == self.box:
            return Patch(box, inter, self.array)       # the store is tight and never modified in place
        return Patch.of(self.array[relative(inter, self.box)], inter).moved_to(box)

    def set(self, patch: Patch) -> None:
        """Set the mask on ``patch.box`` to the patch. The stored array is replaced by one holding exactly the
        mask's bounding box."""
        old = self.box
        if old is None or box_contains(patch.box, old):
            self.box, self.array = patch.sub, patch.crop   # the patch covers everything there was
            return
        union = box_union(old, patch.sub)
        inter = box_intersect(patch.box, union)
        if inter is None:
            return                                      # zeros written where there was nothing
        store = np.zeros(box_shape(union), dtype=np.uint8)
        store[relative(old, union)] = self.array
        store[relative(inter, union)] = 0
        if patch.crop is not None:
            store[relative(patch.sub, union)] = patch.crop
        # Voxels were written on a face of the store: its content may have shrunk away from that face.
        if any(i.start == u.start or i.stop == u.stop for i, u in zip(inter, union)):
            tight = mask_bounds(store)
            if tight is None:
                self.box = self.array = None
                return
            if tight != tuple(slice(0, n) for n in store.shape):
                union, store = absolute(tight, union), np.ascontiguousarray(store[tight])
        store.flags.writeable = False
        self.box, self.array = union, store

    def clear(self) -> None:
        self.box = self.array = None


@dataclass
class History:
    """An object's undo and redo stacks (most recent last)."""

    undo: List[Edit] = field(default_factory=list)
    redo: List[Edit] = field(default_factory=list)

    def push(self, edit: Edit, limit: int, budget_bytes: float, live: Iterable[np.ndarray]) -> None:
        """Record a new edit (the redo entries are dropped: they cannot be re-applied after it), then drop the
        oldest entries beyond ``limit`` or while the entries hold more than ``budget_bytes`` beyond the ``live``
        arrays (at least one entry is kept)."""
        self.redo.clear()
        self.undo.append(edit)
        del self.undo[:-limit]
        live = list(live)
        while len(self.undo) > 1 and self.nbytes(live) > budget_bytes:
            self.undo.pop(0)

    def nbytes(self, live: Iterable[np.ndarray]) -> int:
        """What the entries hold beyond the ``live`` arrays (shared arrays counted once)."""
        seen = {id(a) for a in live}
        return sum(unique_bytes(e.arrays(), seen) for e in self.undo + self.redo)

    def clear(self) -> None:
        self.undo.clear()
        self.redo.clear()


@dataclass
class ObjectRecord:
    """One object of a session: its clicks, region states (``inference.predictor.RegionState``), model mask,
    click-honouring state (``inference.honour.Honour``), history and initial mask (``inference.prior.InitialMask``,
    set by ``Session.set_initial_mask``)."""

    oid: str
    name: str
    clicks: List[Click] = field(default_factory=list)
    regions: list = field(default_factory=list)
    #: the model mask (merged, thresholded logits; the initial mask where no region looks), cropped
    raw: CroppedMask = field(default_factory=CroppedMask)
    honour: object = None
    history: History = field(default_factory=History)
    init: object = None

    def clear(self) -> None:
        self.clicks.clear()
        self.regions.clear()
        self.raw.clear()
        self.honour = self.init = None
        self.history.clear()

    def live_arrays(self) -> List[np.ndarray]:
        """The arrays of the live mask and the initial mask (the history may share them)."""
        return [a for a in (self.raw.array, None if self.honour is None else self.honour.drop,
                            None if self.init is None else self.init.array) if a is not None]


def memory_report(objects, volume_shape) -> dict:
    """What ``Session.memory_bytes`` reports for ``objects`` (the session's object records: ``live_arrays()``,
    ``history``, ``regions``) on a volume of ``volume_shape`` (None: no volume)."""
    masks = history = logits = 0
    seen: set = set()
    for obj in objects:
        masks += unique_bytes(obj.live_arrays(), seen)
        history += obj.history.nbytes(obj.live_arrays())
        states = list(obj.regions)
        for e in obj.history.undo + obj.history.redo:
            states += list(e.regions_before) + list(e.regions_after)
        logits += unique_bytes([r.logits for r in states if r.logits is not None], seen)
        if obj.init is not None:
            logits += unique_bytes(obj.init.prompt_arrays(), seen)
    full = int(np.prod(volume_shape)) if volume_shape is not None else 0
    return {"masks": masks, "history": history, "logits": logits, "total": masks + history + logits,
            "objects": len(objects), "full_grid_mask_bytes": full}
