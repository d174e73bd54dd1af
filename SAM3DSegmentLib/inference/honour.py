"""Honouring the clicks (``SessionOptions.honour_clicks``, on by default).

The voxel of every include click is in the mask and the voxel of every exclude click is not, whatever the model
says (the later click wins where two share a voxel); mask parts that an exclude click cuts off from every
include click, or the model's island an exclude click lies on, are dropped (6-connected components,
``scipy.ndimage.label``). Off, the mask is the merged model output alone (what the reference pipeline pastes
back). The state (:class:`Honour`) is applied on top of the stored model mask whenever the mask is read.
An object started from an initial mask (:mod:`~SAM3DSegmentLib.inference.prior`) also keeps every component that
holds a voxel of it the model does not see (``keep``): only parts the model sees can be dropped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from ..core.boxes import Box, absolute, box_intersect, box_size, box_union, mask_bounds, points_box, relative

__all__ = ["Honour", "honour_changes", "honour_clicks", "click_voxels"]

Voxel = Tuple[int, int, int]
_NEIGHBOURS = ndimage.generate_binary_structure(3, 1)   # a voxel's 6 face neighbours ...
_NEIGHBOURS[1, 1, 1] = False                              # ... without the voxel


@dataclass(frozen=True)
class Honour:
    """What honouring the clicks changes on top of the model's mask: voxels ``(k, j, i)`` forced on (include
    clicks) and off (exclude clicks), and the voxels dropped by the connected-component cleanup (``drop`` on
    ``drop_box``, read-only bool)."""

    on: frozenset = frozenset()
    off: frozenset = frozenset()
    drop_box: Optional[Box] = None
    drop: Optional[np.ndarray] = None

    @property
    def nbytes(self) -> int:
        return 0 if self.drop is None else int(self.drop.nbytes)

    def apply(self, arr: np.ndarray, box: Box) -> None:
        """Apply to ``arr``, the mask on ``box``, in place."""
        if self.drop is not None:
            inter = box_intersect(self.drop_box, box)
            if inter is not None:
                arr[relative(inter, box)][self.drop[relative(inter, self.drop_box)]] = 0
        _force(arr, box, self.on, self.off)


_NO_HONOUR = Honour()


def _force(arr: np.ndarray, box: Box, on, off) -> None:
    """Set the voxels ``on`` and clear the voxels ``off`` (those inside ``box``) of ``arr``, the mask on ``box``."""
    for voxels, value in ((off, 0), (on, 1)):
        for v in voxels:
            if all(b.start <= x < b.stop for x, b in zip(v, box)):
                arr[tuple(x - b.start for x, b in zip(v, box))] = value


def honour_changes(a: Optional[Honour], b: Optional[Honour]) -> Optional[Box]:
    """Box of the voxels whose value can differ between applying ``a`` and applying ``b`` to one mask."""
    a, b = a or _NO_HONOUR, b or _NO_HONOUR
    box = points_box((a.on ^ b.on) | (a.off ^ b.off))
    if a.drop is not b.drop:
        box = box_union(box, box_union(a.drop_box, b.drop_box))
    return box


def click_voxels(volume, clicks: Sequence) -> List[Voxel]:
    """The (k, j, i) voxel whose centre is nearest to each click (clicks carry ``ras``)."""
    ras = np.asarray([c.ras for c in clicks], dtype=np.float64).reshape(-1, 3)
    ijk = np.floor(volume.ras_to_ijk_points(ras) + 0.5).astype(int).reshape(-1, 3)
    ijk = np.clip(ijk, 0, np.asarray(volume.shape_ijk) - 1)
    return [(int(i[2]), int(i[1]), int(i[0])) for i in ijk]


def honour_clicks(volume, mask, clicks: Sequence, keep: Optional[Callable[[], Tuple[Box, np.ndarray]]] = None
                  ) -> Optional[Honour]:
    """The honouring state for ``clicks`` on the model mask ``mask`` (a ``history.CroppedMask`` of ``volume``'s
    grid); None without clicks. ``keep`` (optional) returns ``(box, bool array)``: voxels whose components are
    never dropped, as if they held an include click (called only when the cleanup labels components)."""
    if not clicks:
        return None
    sign: Dict[Voxel, bool] = {}
    for v, c in zip(click_voxels(volume, clicks), clicks):   # in click order: the later click wins a voxel
        sign.pop(v, None)
        sign[v] = bool(c.positive)
    on = frozenset(v for v, p in sign.items() if p)
    off = frozenset(v for v, p in sign.items() if not p)
    drop_box, drop = _dropped(volume.array.shape, mask, on, off, keep)
    return Honour(on, off, drop_box, drop)


def _forced(mask, box: Box, on, off) -> np.ndarray:
    """The model mask on ``box`` as bool with the include voxels ``on`` set and the exclude voxels ``off``
    cleared (a new array)."""
    m = mask.get(box)
    _force(m, box, on, off)
    return m.view(bool)


def _neighbour_labels(labels: np.ndarray, v: Voxel) -> set:
    """The labels of the face neighbours of voxel ``v`` that lie inside ``labels`` (0 included)."""
    lo = [max(x - 1, 0) for x in v]
    hi = [min(x + 2, n) for x, n in zip(v, labels.shape)]
    window = labels[tuple(slice(a, b) for a, b in zip(lo, hi))]
    return {int(x) for x in window[_NEIGHBOURS[tuple(slice(a - x + 1, b - x + 1) for a, b, x in zip(lo, hi, v))]]}


def _nothing_cut_off(shape, mask, box: Box, cut, on, off) -> bool:
    """True when the mask inside ``box`` (grown by 2 voxels) alone proves that clearing the exclude voxels
    ``cut`` drops nothing: the remaining face neighbours of each are connected to each other and to an
    include voxel inside the box (or it has none: it was an isolated voxel)."""
    box = tuple(slice(max(b.start - 2, 0), min(b.stop + 2, n)) for b, n in zip(box, shape))
    labels, _ = ndimage.label(_forced(mask, box, on, off))
    inside = lambda v: all(b.start <= x < b.stop for x, b in zip(v, box))  # noqa: E731
    local = lambda v: tuple(x - b.start for x, b in zip(v, box))           # noqa: E731
    inc = {int(labels[local(v)]) for v in on if inside(v)}
    for e in cut:
        found = _neighbour_labels(labels, local(e)) - {0}
        if len(found) > 1 or (found and not found & inc):
            return False
    return True


def _dropped(shape, mask, on: frozenset, off: frozenset, keep=None) -> Tuple[Optional[Box], Optional[np.ndarray]]:
    """The cleanup: the 6-connected components of the mask (model mask, include voxels on, exclude voxels off)
    that touch an exclude voxel the model had in its mask and hold no include voxel (nor a ``keep`` voxel, see
    :func:`honour_clicks`). Returns ``(box, bool array)`` or ``(None, None)``."""
    if mask.box is None or not off:
        return None, None
    rb = mask.box
    cut = [v for v in off if all(b.start <= x < b.stop for x, b in zip(v, rb))
           and mask.array[tuple(x - b.start for x, b in zip(v, rb))]]
    if not cut:
        return None, None          # the model already left every exclude voxel out: nothing is cut
    # Cheap certificates first: connectivity inside a small box (a path found there is a path in the whole
    # mask). For each cut voxel, the box spanning it and its nearest include voxel; then the box spanning
    # all of them. The object's whole box is labelled only when neither settles it.
    if on:
        inc = np.asarray(sorted(on), dtype=np.int64)
        boxes = [points_box([e, tuple(inc[np.argmin(np.abs(inc - e).sum(axis=1))])]) for e in cut]
        if all(_nothing_cut_off(shape, mask, b_, [e], on, off) for b_, e in zip(boxes, cut)):
            return None, None
    work = tuple(slice(max(b.start - 1, 0), min(b.stop + 1, n)) for b, n in zip(rb, shape))
    span = points_box(list(cut) + list(on))
    if box_size(span) <= box_size(work) // 2 and _nothing_cut_off(shape, mask, span, cut, on, off):
        return None, None
    labels, _ = ndimage.label(_forced(mask, work, on, off))
    rel = lambda vs: [tuple(x - b.start for x, b in zip(v, work)) for v in vs  # noqa: E731
                      if all(b.start <= x < b.stop for x, b in zip(v, work))]
    touching = set()
    for e in rel(cut):
        touching |= _neighbour_labels(labels, e)
    kept = {int(labels[v]) for v in rel(on)}
    if keep is not None:
        kbox, karr = keep()
        inter = box_intersect(kbox, work)
        if inter is not None:
            kept |= {int(v) for v in np.unique(labels[relative(inter, work)][karr[relative(inter, kbox)]])}
    gone = sorted(touching - kept - {0})
    if not gone:
        return None, None
    drop = np.isin(labels, gone)
    nz = mask_bounds(drop)
    crop = np.ascontiguousarray(drop[nz])
    crop.flags.writeable = False
    return absolute(nz, work), crop
