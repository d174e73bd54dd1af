"""The interactive segmentation engine: clicks in, full-grid masks out (contract: notes/session_api.md).

One :class:`Session` holds one volume and any number of objects (segments). Each object has its clicks,
its model-input regions (each with the latest 32^3 low-res logits) and its mask on the full volume grid
(uint8, ``[k, j, i]``). Coordinates: clicks are RAS mm (or voxel ``ijk`` indices of the volume); regions
have their own (a, b, c) axes (the volume's axes permuted/flipped to the closest RAS-canonical order, see
:mod:`SAM3DSegmentLib.inference.regions`), and prompt points cross the backend interface as continuous (a, b, c)
indices of the 128^3 region grid.

Per click (the reference protocol, docs/reference/SAM_MED3D.md section 5):

1. Pick the click's region: the object's region that contains the click and whose centre is nearest to it;
   when none contains it (or it is the object's first click) a new region centred on the click.
2. Embedding: from the LRU cache (:mod:`SAM3DSegmentLib.inference.cache`), else ``backend.encode`` once.
3. Prompt. ``prompt_mode="newest"`` (default, what the model was trained with): ONLY the newest click plus
   the region's previous low-res logits (zeros(32^3) at the region's first step, never None).
   ``prompt_mode="all"``: every point of the object inside the region so far (extension seed points first,
   then the clicks, in order) plus the previous logits.
4. Decode -> new low-res logits for the region.
5. Extension (``extend=True``): if the object's mask in the region touches one of its faces (any positive
   voxel of the 128^3 upsampled logits in the two outermost voxel layers of the face, lying inside the
   volume and belonging to the object: the positive low-res cells connected to a positive click or seed of
   the object in that region; speckles elsewhere do not count; nor does a face that is positive over more
   than ``extend_max_face_fill`` of its in-volume area, a leak rather than a cross-section), a
   neighbouring region shifted by half the region size across that face is added (unless the object
   already has a region within a quarter region of that place). It is prompted with ONE positive point, the
   face pixel with the largest upsampled logit (the most confident point of the mask's cross-section, two
   voxels inside the old region, i.e. near the centre plane of the new region), and, as mask input, the old
   region's logits resampled into the new region's low-res grid (the overlapping half; zeros elsewhere).
   The new region is then checked in turn, breadth-first, until no mask touches a new face or the object has
   ``max_regions`` regions; ``MaskUpdate.truncated`` (and ``timings["max_regions_reached"]``) says when the
   limit cut the object.
6. Paste back: ``regions.logits_to_volume`` over the affected box only (never the whole volume), threshold
   at ``threshold`` logits, written into the object's mask.

``max_regions`` bounds extension only: a user click outside every region of the object always gets its own
region.

Merging overlapping regions: where several regions of an object cover a voxel the mask is
``sum_r w_r * l_r / sum_r w_r > threshold`` with ``l_r`` the region's logits interpolated at the voxel and
``w_r`` a tent weight, the product over the three region axes of ``1 - |x - centre| / (size / 2)`` (floored
at 1e-3 inside the region, 0 outside). A region's voxels near its own faces saw the least context, so they
count least; with the 50 % overlap the two tents cross-fade linearly and the result is continuous. Where a
single region covers a voxel the mask is that region's logits thresholded, exactly as without merging.
The mask is therefore a pure function of the regions' logits: incremental clicks, :meth:`Session.set_clicks`
and undo/redo agree voxel for voxel.

7. Honour the clicks (``SessionOptions.honour_clicks``, on by default): the voxel of every include click is
   in the mask and the voxel of every exclude click is not, whatever the model says (the later click wins
   where two share a voxel); mask parts that an exclude click cuts off from every include click, or the
   model's island an exclude click lies on, are dropped (6-connected components, ``scipy.ndimage.label``).
   Off, the mask is the merged model output alone (what the reference pipeline pastes back).

Undo/redo: every mutating call (``add_click``, ``add_clicks``, ``set_clicks``, ``reset``) pushes one history entry holding
the object's clicks and region states before and after (logit arrays are never modified in place, so they
are shared, not copied), the model-mask patch of the changed box before and after (cropped to its non-zero
part) and the click-honouring state before and after. ``undo`` restores the exact previous mask and logits;
``redo`` re-applies.

Memory: an object's mask is stored cropped to the bounding box of its voxels (a small object on a large CT
costs its box, not the volume); :meth:`Session.mask` assembles the full-grid array on request and
:meth:`Session.memory_bytes` reports what masks, history and logits take.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import regions as _regions
from .cache import EmbeddingCache, region_key, volume_content_key
from ..core.geometry import GeometryError, Volume

__all__ = ["Click", "SessionOptions", "MaskUpdate", "Session", "PROMPT_MODES"]

PROMPT_MODES = ("newest", "all")
Box = Tuple[slice, slice, slice]
_MIN_WEIGHT = 1e-3
_MISSING = object()


# ------------------------------------------------------------------------------------------ data types
@dataclass(frozen=True)
class Click:
    """One click: ``ras`` (R, A, S mm) or ``ijk`` (voxel indices i, j, k of the volume), and its sign.

    Clicks returned by :meth:`Session.clicks` always carry ``ras`` (and ``ijk`` as given, if any).
    """

    ras: Optional[Tuple[float, float, float]] = None
    positive: bool = True
    ijk: Optional[Tuple[float, float, float]] = None


@dataclass
class SessionOptions:
    prompt_mode: str = "newest"
    region_size: int = 128
    spacing_mm: float = 1.5
    extend: bool = True
    max_regions: int = 8
    clamp_hu: Optional[Tuple[float, float]] = None
    cache_size: int = 8
    threshold: float = 0.0
    #: Leak guard of the extension: a face whose in-volume part is positive over more than this fraction
    #: is not treated as an object's cross-section (the mask fills the region: a leak), so no neighbour is
    #: added across it. 1.0 disables the guard.
    extend_max_face_fill: float = 0.75
    #: Undo entries kept per object (oldest dropped first) ...
    history_limit: int = 100
    #: ... and the most memory their mask patches may take per object, in MiB (at least one entry is kept).
    history_mb: float = 512.0
    #: Honour the clicks: the voxel under each include click is always in the mask, the voxel under each
    #: exclude click never (the later click wins where two share a voxel), even where the model disagrees.
    #: Cleanup that implies: the parts of the mask that forcing an exclude voxel off cuts off from every
    #: include click are dropped, and so is a model island (a part touching no include click) that an
    #: exclude click lies on: the user said "not this". Parts no exclude click touches stay as the model
    #: predicted them, islands included (they may be real parts of the object). Components are
    #: 6-connected (face neighbours), on the volume grid. False is the reference mode: the mask is the
    #: merged, thresholded model output and nothing else, as the reference pipeline produces it.
    honour_clicks: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.prompt_mode not in PROMPT_MODES:
            problems.append(f"prompt_mode must be one of {PROMPT_MODES}, got {self.prompt_mode!r}")
        if int(self.region_size) < 8 or int(self.region_size) % 4:
            problems.append(f"region_size must be a multiple of 4 and >= 8, got {self.region_size}")
        if not (float(self.spacing_mm) > 0 and np.isfinite(float(self.spacing_mm))):
            problems.append(f"spacing_mm must be a positive number of millimetres, got {self.spacing_mm}")
        if int(self.max_regions) < 1:
            problems.append(f"max_regions must be >= 1, got {self.max_regions}")
        if not 0.0 < float(self.extend_max_face_fill) <= 1.0:
            problems.append(f"extend_max_face_fill must be in (0, 1], got {self.extend_max_face_fill}")
        if int(self.history_limit) < 1 or not float(self.history_mb) > 0:
            problems.append("history_limit must be >= 1 and history_mb > 0")
        if int(self.cache_size) < 1:
            problems.append(f"cache_size must be >= 1, got {self.cache_size}")
        if self.clamp_hu is not None:
            lo, hi = (float(v) for v in self.clamp_hu)
            if not lo < hi:
                problems.append(f"clamp_hu must be (low, high) with low < high, got {self.clamp_hu}")
        if problems:
            raise ValueError("invalid SessionOptions: " + "; ".join(problems))
        self.region_size = int(self.region_size)
        self.spacing_mm = float(self.spacing_mm)
        self.max_regions = int(self.max_regions)
        self.cache_size = int(self.cache_size)
        self.honour_clicks = bool(self.honour_clicks)


@dataclass
class MaskUpdate:
    """What one call changed. ``box`` is the (k, j, i) box of the volume grid that may have changed and
    ``mask_box`` the object's mask inside it (uint8 0/1, read-only)."""

    object_id: str
    box: Box
    mask_box: np.ndarray
    encoded_regions: int = 0
    timings: Dict[str, float] = field(default_factory=dict)
    #: Regions the object has after the call.
    regions: int = 0
    #: True when extension wanted more regions than ``max_regions`` (the object is probably cut).
    truncated: bool = False


@dataclass(frozen=True)
class _RegionState:
    region: object            # regions.Region
    key: tuple                # cache.region_key(region)
    box: Box                  # footprint: volume voxels whose centres fall inside the region
    logits: Optional[np.ndarray] = None    # (s, s, s) float32, never modified in place
    pos_box: Optional[Box] = None          # conservative box of voxels where logits > threshold
    seeds: Tuple[Tuple[Tuple[float, float, float], bool], ...] = ()  # extension points (ras, positive)


@dataclass(frozen=True)
class _Patch:
    """A uint8 mask on a box of the volume grid, stored cropped to its non-zero voxels (zero elsewhere)."""

    box: Box                               # the box the patch covers
    sub: Optional[Box] = None              # the part of ``box`` holding its non-zero voxels (None: all zero)
    crop: Optional[np.ndarray] = None      # the mask on ``sub`` (read-only)

    @classmethod
    def of(cls, values: np.ndarray, box: Box) -> "_Patch":
        nz = _nonzero_box(values)
        if nz is None:
            return cls(box)
        crop = values[nz].copy()
        crop.flags.writeable = False
        return cls(box, _offset(nz, box), crop)

    def moved_to(self, box: Box) -> "_Patch":
        """The same voxels as a patch of the larger ``box`` (zero elsewhere)."""
        return _Patch(box, self.sub, self.crop)

    @property
    def nbytes(self) -> int:
        return 0 if self.crop is None else int(self.crop.nbytes)

    def full(self) -> np.ndarray:
        """The patch as an array of ``box``'s shape."""
        out = np.zeros(_box_shape(self.box), dtype=np.uint8)
        if self.crop is not None:
            out[_relative(self.sub, self.box)] = self.crop
        return out


@dataclass(frozen=True)
class _Honour:
    """What honouring the clicks changes on top of the model's mask (``SessionOptions.honour_clicks``):
    voxels ``(k, j, i)`` forced on (include clicks) and off (exclude clicks), and the voxels dropped by the
    connected-component cleanup (``drop`` on ``drop_box``, read-only bool)."""

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
            inter = _box_intersect(self.drop_box, box)
            if inter is not None:
                arr[_relative(inter, box)][self.drop[_relative(inter, self.drop_box)]] = 0
        for voxels, value in ((self.off, 0), (self.on, 1)):
            for v in voxels:
                if all(b.start <= x < b.stop for x, b in zip(v, box)):
                    arr[tuple(x - b.start for x, b in zip(v, box))] = value


_NO_HONOUR = _Honour()


def _honour_changes(a: Optional[_Honour], b: Optional[_Honour]) -> Optional[Box]:
    """Box of the voxels whose value can differ between applying ``a`` and applying ``b`` to one mask."""
    a, b = a or _NO_HONOUR, b or _NO_HONOUR
    box = _voxels_box((a.on ^ b.on) | (a.off ^ b.off))
    if a.drop is not b.drop:
        box = _box_union(box, _box_union(a.drop_box, b.drop_box))
    return box


@dataclass
class _Edit:
    clicks_before: Tuple[Click, ...]
    regions_before: Tuple[_RegionState, ...]
    clicks_after: Tuple[Click, ...]
    regions_after: Tuple[_RegionState, ...]
    box: Optional[Box]
    patch_before: _Patch                   # the model mask on ``box`` before and after (cropped)
    patch_after: _Patch
    honour_before: Optional[_Honour] = None
    honour_after: Optional[_Honour] = None

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


def _unique_bytes(arrays, seen: set) -> int:
    """Bytes of the arrays not in ``seen`` (by identity), each counted once; adds them to ``seen``."""
    total = 0
    for a in arrays:
        if id(a) not in seen:
            seen.add(id(a))
            total += int(a.nbytes)
    return total


@dataclass
class _Object:
    oid: str
    name: str
    clicks: List[Click] = field(default_factory=list)
    regions: List[_RegionState] = field(default_factory=list)
    #: the model mask (merged, thresholded logits), cropped: ``raw`` (uint8) on ``raw_box`` of the volume
    #: grid, zero elsewhere; None when empty.
    raw_box: Optional[Box] = None
    raw: Optional[np.ndarray] = None
    honour: Optional[_Honour] = None
    undo: List[_Edit] = field(default_factory=list)
    redo: List[_Edit] = field(default_factory=list)

    def clear(self) -> None:
        self.clicks.clear()
        self.regions.clear()
        self.raw_box = self.raw = self.honour = None
        self.undo.clear()
        self.redo.clear()


class _Stats:
    def __init__(self) -> None:
        self.encode_s = 0.0
        self.decode_s = 0.0
        self.encoded = 0
        self.truncated = False


# ------------------------------------------------------------------------------------------ box helpers
def _box_union(a: Optional[Box], b: Optional[Box]) -> Optional[Box]:
    if a is None:
        return b
    if b is None:
        return a
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))


def _box_intersect(a: Optional[Box], b: Optional[Box]) -> Optional[Box]:
    if a is None or b is None:
        return None
    out = tuple(slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(a, b))
    if any(s.stop <= s.start for s in out):
        return None
    return out


def _box_shape(b: Box) -> Tuple[int, int, int]:
    return tuple(s.stop - s.start for s in b)


def _box_contains(outer: Box, inner: Box) -> bool:
    return all(o.start <= i.start and i.stop <= o.stop for o, i in zip(outer, inner))


def _offset(inner: Box, outer: Box) -> Box:
    """``inner``, given relative to ``outer``, in ``outer``'s frame (the inverse of :func:`_relative`)."""
    return tuple(slice(i.start + o.start, i.stop + o.start) for i, o in zip(inner, outer))


def _nonzero_box(arr: np.ndarray) -> Optional[Box]:
    """Bounding box (relative to ``arr``) of the non-zero voxels of a uint8/bool 3D array; None if none."""
    a = arr.view(np.uint8) if arr.dtype == bool else arr
    kj = np.bitwise_or.reduce(a, axis=2)
    k = np.flatnonzero(kj.any(axis=1))
    if k.size == 0:
        return None
    j = np.flatnonzero(kj.any(axis=0))
    i = np.flatnonzero(np.bitwise_or.reduce(a[k[0]:k[-1] + 1], axis=0).any(axis=0))
    return (slice(int(k[0]), int(k[-1]) + 1), slice(int(j[0]), int(j[-1]) + 1), slice(int(i[0]), int(i[-1]) + 1))


def _box_voxels(box: Box) -> int:
    return int(np.prod(_box_shape(box)))


def _voxels_box(voxels) -> Optional[Box]:
    """Bounding box of a collection of (k, j, i) voxels; None when empty."""
    if not voxels:
        return None
    v = np.asarray(list(voxels), dtype=np.int64).reshape(-1, 3)
    lo, hi = v.min(axis=0), v.max(axis=0) + 1
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _relative(inner: Box, outer: Box) -> Box:
    return tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, outer))


def _normalise_box(box) -> Box:
    return tuple(slice(int(s.start or 0), int(s.stop)) for s in box)


def _upsample_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) linear interpolation matrix with align_corners=False semantics (edges clamped)."""
    f = n_in / n_out
    u = np.clip((np.arange(n_out) + 0.5) * f - 0.5, 0, n_in - 1)
    lo = np.floor(u).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    t = u - lo
    m = np.zeros((n_out, n_in), dtype=np.float64)
    m[np.arange(n_out), lo] += 1 - t
    m[np.arange(n_out), hi] += t
    return m


def _trilinear(grid: np.ndarray, coords: np.ndarray, outside: float = 0.0) -> np.ndarray:
    """Sample ``grid`` (s, s, s) at continuous indices ``coords`` (N, 3); points beyond the cell centres are
    clamped to the edge (align_corners=False semantics); points outside the grid's extent get ``outside``."""
    s = np.asarray(grid.shape)
    inside = np.all((coords >= -0.5) & (coords <= s - 0.5), axis=1)
    c = np.clip(coords, 0, s - 1)
    lo = np.floor(c).astype(int)
    hi = np.minimum(lo + 1, s - 1)
    t = c - lo
    out = np.zeros(len(coords), dtype=np.float64)
    for corner in itertools.product((0, 1), repeat=3):
        idx = [np.where(corner[d], hi[:, d], lo[:, d]) for d in range(3)]
        w = np.prod([np.where(corner[d], t[:, d], 1 - t[:, d]) for d in range(3)], axis=0)
        out += w * grid[idx[0], idx[1], idx[2]]
    out[~inside] = outside
    return out


def _face_neighbours(v: Tuple[int, int, int], shape) -> List[Tuple[int, int, int]]:
    """The 6 face neighbours of voxel ``v`` inside an array of ``shape``."""
    out = []
    for axis in range(3):
        for d in (-1, 1):
            n = list(v)
            n[axis] += d
            if 0 <= n[axis] < shape[axis]:
                out.append(tuple(n))
    return out


# ------------------------------------------------------------------------------------------ the session
class Session:
    """Interactive click-based segmentation of one volume with a promptable model behind ``backend``."""

    def __init__(self, backend, options: Optional[SessionOptions] = None):
        self.backend = backend
        self.options = options or SessionOptions()
        size = int(getattr(backend, "image_size", self.options.region_size))
        if size != self.options.region_size:
            raise ValueError(
                f"the model takes {size}^3 inputs but SessionOptions.region_size is "
                f"{self.options.region_size}; set region_size={size}")
        self.low_res_size = int(getattr(backend, "low_res_size", self.options.region_size // 4))
        self.cache = EmbeddingCache(self.options.cache_size)
        self.volume: Optional[Volume] = None
        self.volume_key: Optional[str] = None
        self._objects: Dict[str, _Object] = {}
        self._current: Optional[str] = None
        self._ids = itertools.count(1)
        self._faces_m = _upsample_matrix(self.options.region_size, self.low_res_size)

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
            box = (slice(0, 0),) * 3
        out = self._view(obj, box)
        nz = _nonzero_box(out) if out.size else None
        if nz is None:
            out = np.zeros((0, 0, 0), dtype=np.uint8)
            box = (slice(0, 0),) * 3
        else:
            out, box = np.ascontiguousarray(out[nz]), _offset(nz, box)
        out.flags.writeable = False
        return box, out

    @staticmethod
    def _history_bytes(obj: _Object) -> int:
        """What the object's undo/redo entries hold beyond its live mask (shared arrays counted once)."""
        seen = {id(a) for a in (obj.raw, None if obj.honour is None else obj.honour.drop) if a is not None}
        return sum(_unique_bytes(e.arrays(), seen) for e in obj.undo + obj.redo)

    def memory_bytes(self, oid: Optional[str] = None) -> Dict[str, int]:
        """Memory held for one object (``oid``) or for all (None), in bytes: ``masks`` (the cropped masks and
        the click-honouring state), ``history`` (undo/redo mask patches beyond those shared with the live
        masks; each array counted once), ``logits`` (the regions' low-res
        logits, current and in the history, each array counted once), their ``total``, the ``objects``
        counted and ``full_grid_mask_bytes`` (what one uncropped uint8 mask would take, for comparison).
        Embeddings are in :attr:`cache` (``cache.stats()``), bounded by ``SessionOptions.cache_size``."""
        objs = [self._object(oid)] if oid is not None else list(self._objects.values())
        masks = history = logits = 0
        seen: set = set()
        for obj in objs:
            live = [a for a in (obj.raw, None if obj.honour is None else obj.honour.drop) if a is not None]
            masks += _unique_bytes(live, seen)
            history += self._history_bytes(obj)
            states = list(obj.regions)
            for e in obj.undo + obj.redo:
                states += list(e.regions_before) + list(e.regions_after)
            for r in states:
                if r.logits is not None and id(r.logits) not in seen:
                    seen.add(id(r.logits))
                    logits += int(r.logits.nbytes)
        full = int(np.prod(self.volume.array.shape)) if self.volume is not None else 0
        return {"masks": masks, "history": history, "logits": logits, "total": masks + history + logits,
                "objects": len(objs), "full_grid_mask_bytes": full}

    def clicks(self, oid: Optional[str] = None) -> List[Click]:
        return list(self._object(oid).clicks)

    def region_count(self, oid: Optional[str] = None) -> int:
        return len(self._object(oid).regions)

    def regions(self, oid: Optional[str] = None) -> list:
        """The object's model-input regions (``regions.Region``), in creation order."""
        return [r.region for r in self._object(oid).regions]

    def can_undo(self, oid: Optional[str] = None) -> bool:
        return bool(self._object(oid).undo)

    def can_redo(self, oid: Optional[str] = None) -> bool:
        return bool(self._object(oid).redo)

    # ------------------------------------------------------------------ clicks
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
        normalised = [self._normalise_click(c) for c in clicks]   # all validated before anything changes
        stats = _Stats()
        regions = list(obj.regions)
        all_clicks = list(obj.clicks)
        dirty = None
        for click in normalised:
            all_clicks.append(click)
            dirty = _box_union(dirty, self._apply_click(regions, list(all_clicks), stats))
            if check is not None:
                check()
        return self._commit(obj, all_clicks, regions, dirty, stats, t0)

    def set_clicks(self, clicks: Sequence[Click], check: Optional[Callable[[], None]] = None) -> MaskUpdate:
        """Replace the current object's clicks and recompute it from scratch (decode only: embeddings are
        cached). Used when the user moves or removes a point; one undo step. ``check`` as in :meth:`add_clicks`."""
        t0 = time.perf_counter()
        obj = self._current_or_new()
        normalised = [self._normalise_click(c) for c in clicks]   # all validated before anything changes
        stats = _Stats()
        dirty = None
        for r in obj.regions:
            dirty = _box_union(dirty, r.pos_box)
        regions: List[_RegionState] = []
        for n in range(1, len(normalised) + 1):
            dirty = _box_union(dirty, self._apply_click(regions, normalised[:n], stats))
            if check is not None:
                check()
        return self._commit(obj, normalised, regions, dirty, stats, t0)

    def reset(self, oid: Optional[str] = None) -> MaskUpdate:
        """Clear the object's clicks, regions and mask (undoable)."""
        t0 = time.perf_counter()
        obj = self._object(oid)
        dirty = None
        for r in obj.regions:
            dirty = _box_union(dirty, r.pos_box)
        return self._commit(obj, [], [], dirty, _Stats(), t0)

    def undo(self, oid: Optional[str] = None) -> MaskUpdate:
        """Restore the object's state before its last edit (mask and logits exactly)."""
        obj = self._object(oid)
        if not obj.undo:
            return self._empty_update(obj)
        e = obj.undo.pop()
        obj.redo.append(e)
        return self._restore(obj, e, forward=False)

    def redo(self, oid: Optional[str] = None) -> MaskUpdate:
        """Re-apply the last undone edit."""
        obj = self._object(oid)
        if not obj.redo:
            return self._empty_update(obj)
        e = obj.redo.pop()
        obj.undo.append(e)
        return self._restore(obj, e, forward=True)

    # ------------------------------------------------------------------ internals: objects & clicks
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

    # ------------------------------------------------------------------ internals: the cropped mask store
    def _raw_get(self, obj: _Object, box: Box) -> np.ndarray:
        """The model mask on ``box`` (a new uint8 array)."""
        out = np.zeros(_box_shape(box), dtype=np.uint8)
        inter = _box_intersect(obj.raw_box, box)
        if inter is not None:
            out[_relative(inter, box)] = obj.raw[_relative(inter, obj.raw_box)]
        return out

    def _raw_patch(self, obj: _Object, box: Box) -> _Patch:
        """The model mask on ``box`` as a patch (shares the store's array when the box holds all of it)."""
        inter = _box_intersect(obj.raw_box, box)
        if inter is None:
            return _Patch(box)
        if inter == obj.raw_box:
            return _Patch(box, inter, obj.raw)         # the store is tight and never modified in place
        return _Patch.of(obj.raw[_relative(inter, obj.raw_box)], inter).moved_to(box)

    def _raw_set(self, obj: _Object, patch: _Patch) -> None:
        """Set the model mask on ``patch.box`` to the patch. The store (``obj.raw``, read-only, never modified
        in place, so patches may share it) is replaced by one holding exactly the mask's bounding box."""
        old = obj.raw_box
        if old is None or _box_contains(patch.box, old):
            obj.raw_box, obj.raw = patch.sub, patch.crop   # the patch covers everything there was
            return
        union = _box_union(old, patch.sub)
        inter = _box_intersect(patch.box, union)
        if inter is None:
            return                                      # zeros written where there was nothing
        store = np.zeros(_box_shape(union), dtype=np.uint8)
        store[_relative(old, union)] = obj.raw
        store[_relative(inter, union)] = 0
        if patch.crop is not None:
            store[_relative(patch.sub, union)] = patch.crop
        # Voxels were written on a face of the store: its content may have shrunk away from that face.
        if any(i.start == u.start or i.stop == u.stop for i, u in zip(inter, union)):
            tight = _nonzero_box(store)
            if tight is None:
                obj.raw_box = obj.raw = None
                return
            if tight != tuple(slice(0, n) for n in store.shape):
                union, store = _offset(tight, union), np.ascontiguousarray(store[tight])
        store.flags.writeable = False
        obj.raw_box, obj.raw = union, store

    def _mask_extent(self, obj: _Object) -> Optional[Box]:
        """A box holding every voxel of the object's mask (model mask and forced include voxels)."""
        return _box_union(obj.raw_box, None if obj.honour is None else _voxels_box(obj.honour.on))

    def _view(self, obj: _Object, box: Box) -> np.ndarray:
        """The object's mask (clicks honoured) on ``box`` (a new uint8 array)."""
        out = self._raw_get(obj, box)
        if obj.honour is not None:
            obj.honour.apply(out, box)
        return out

    # ------------------------------------------------------------------ internals: honouring the clicks
    def _click_voxels(self, clicks: Sequence[Click]) -> List[Tuple[int, int, int]]:
        """The (k, j, i) voxel whose centre is nearest to each click."""
        vol = self.volume
        ras = np.asarray([c.ras for c in clicks], dtype=np.float64).reshape(-1, 3)
        ijk = np.floor(vol.ras_to_ijk_points(ras) + 0.5).astype(int).reshape(-1, 3)
        ijk = np.clip(ijk, 0, np.asarray(vol.shape_ijk) - 1)
        return [(int(i[2]), int(i[1]), int(i[0])) for i in ijk]

    def _honour(self, obj: _Object, clicks: Sequence[Click]) -> Optional[_Honour]:
        """The click-honouring state for ``clicks`` on the object's current model mask (None: off)."""
        if not self.options.honour_clicks or not clicks:
            return None
        sign: Dict[Tuple[int, int, int], bool] = {}
        for v, c in zip(self._click_voxels(clicks), clicks):   # in click order: the later click wins a voxel
            sign.pop(v, None)
            sign[v] = bool(c.positive)
        on = frozenset(v for v, p in sign.items() if p)
        off = frozenset(v for v, p in sign.items() if not p)
        drop_box, drop = self._dropped(obj, on, off)
        return _Honour(on, off, drop_box, drop)

    def _dropped(self, obj: _Object, on: frozenset, off: frozenset) -> Tuple[Optional[Box], Optional[np.ndarray]]:
        """The cleanup of :attr:`SessionOptions.honour_clicks`: the 6-connected components of the mask (model
        mask, include voxels on, exclude voxels off) that touch an exclude voxel the model had in its mask
        and hold no include voxel. Returns ``(box, bool array)`` or ``(None, None)``."""
        if obj.raw_box is None or not off:
            return None, None
        rb = obj.raw_box
        cut = [v for v in off if all(b.start <= x < b.stop for x, b in zip(v, rb))
               and obj.raw[tuple(x - b.start for x, b in zip(v, rb))]]
        if not cut:
            return None, None          # the model already left every exclude voxel out: nothing is cut
        # Cheap certificates first: connectivity inside a small box (a path found there is a path in the whole
        # mask). For each cut voxel, the box spanning it and its nearest include voxel; then the box spanning
        # all of them. The object's whole box is labelled only when neither settles it.
        if on:
            inc = np.asarray(sorted(on), dtype=np.int64)
            boxes = [_voxels_box([e, tuple(inc[np.argmin(np.abs(inc - e).sum(axis=1))])]) for e in cut]
            if all(self._nothing_cut_off(obj, b_, [e], on, off) for b_, e in zip(boxes, cut)):
                return None, None
        shape = self.volume.array.shape
        work = tuple(slice(max(b.start - 1, 0), min(b.stop + 1, n)) for b, n in zip(rb, shape))
        span = _voxels_box(list(cut) + list(on))
        if (_box_voxels(span) <= _box_voxels(work) // 2
                and self._nothing_cut_off(obj, span, cut, on, off)):
            return None, None
        m = self._forced(obj, work, on, off)
        rel = lambda vs: [tuple(x - b.start for x, b in zip(v, work)) for v in vs  # noqa: E731
                          if all(b.start <= x < b.stop for x, b in zip(v, work))]
        on_rel, cut_rel = rel(on), rel(cut)
        from scipy import ndimage

        labels, _ = ndimage.label(m)
        touching = set()
        for e in cut_rel:
            touching.update(int(labels[n]) for n in _face_neighbours(e, m.shape))
        keep = {int(labels[v]) for v in on_rel}
        gone = sorted(touching - keep - {0})
        if not gone:
            return None, None
        drop = np.isin(labels, gone)
        nz = _nonzero_box(drop)
        crop = np.ascontiguousarray(drop[nz])
        crop.flags.writeable = False
        return _offset(nz, work), crop

    def _forced(self, obj: _Object, box: Box, on, off) -> np.ndarray:
        """The model mask on ``box`` as bool with the include voxels ``on`` set and the exclude voxels ``off``
        cleared (a new array)."""
        m = self._raw_get(obj, box).view(bool)
        for voxels, value in ((off, False), (on, True)):
            for v in voxels:
                if all(b.start <= x < b.stop for x, b in zip(v, box)):
                    m[tuple(x - b.start for x, b in zip(v, box))] = value
        return m

    def _nothing_cut_off(self, obj: _Object, box: Box, cut, on, off) -> bool:
        """True when the mask inside ``box`` (grown by 2 voxels) alone proves that clearing the exclude voxels
        ``cut`` drops nothing: the remaining face neighbours of each are connected to each other and to an
        include voxel inside the box (or it has none: it was an isolated voxel)."""
        from scipy import ndimage

        shape = self.volume.array.shape
        box = tuple(slice(max(b.start - 2, 0), min(b.stop + 2, n)) for b, n in zip(box, shape))
        labels, _ = ndimage.label(self._forced(obj, box, on, off))
        inside = lambda v: all(b.start <= x < b.stop for x, b in zip(v, box))  # noqa: E731
        local = lambda v: tuple(x - b.start for x, b in zip(v, box))           # noqa: E731
        inc = {int(labels[local(v)]) for v in on if inside(v)}
        for e in cut:
            found = {int(labels[n]) for n in _face_neighbours(local(e), labels.shape)} - {0}
            if len(found) > 1 or (found and not found & inc):
                return False
        return True

    def _normalise_click(self, click: Click) -> Click:
        vol = self._require_volume()
        if click.ras is None and click.ijk is None:
            raise ValueError("give a click either as ras=(R, A, S) mm or as ijk=(i, j, k) voxel indices")
        if click.ras is not None and click.ijk is not None:
            # Clicks returned by clicks() carry both; they must agree (a moved point: give ras only).
            ijk = np.asarray(click.ijk, dtype=np.float64).reshape(-1)
            ras = np.asarray(click.ras, dtype=np.float64).reshape(-1)
            if ijk.size != 3 or ras.size != 3 or not np.allclose(vol.ijk_to_ras_points(ijk), ras, atol=1e-3):
                raise ValueError(f"click gives both ras={click.ras} and ijk={click.ijk} and they disagree; "
                                 "give only one of them")
            click = Click(ras=None, positive=click.positive, ijk=click.ijk)
        if click.ras is not None:
            ras = np.asarray(click.ras, dtype=np.float64).reshape(-1)
            if ras.size != 3 or not np.all(np.isfinite(ras)):
                raise GeometryError(f"a RAS click needs three finite numbers, got {click.ras}")
            vol.ras_to_voxel(ras)   # raises GeometryError with a clear message when outside
            return Click(ras=tuple(float(v) for v in ras), positive=bool(click.positive), ijk=click.ijk)
        ijk = np.asarray(click.ijk, dtype=np.float64).reshape(-1)
        if ijk.size != 3 or not np.all(np.isfinite(ijk)):
            raise GeometryError(f"a voxel click needs three finite indices i, j, k, got {click.ijk}")
        if not bool(vol.contains_ijk(ijk)):
            raise GeometryError(
                f"voxel i, j, k = {ijk.tolist()} lies outside the volume (grid {list(vol.shape_ijk)} "
                "voxels along i, j, k; indices start at 0). Click inside the image")
        ras = vol.ijk_to_ras_points(ijk)
        return Click(ras=tuple(float(v) for v in ras), positive=bool(click.positive),
                     ijk=tuple(float(v) for v in ijk))

    # ------------------------------------------------------------------ internals: the engine
    def _new_region_state(self, region) -> _RegionState:
        box = _normalise_box(_regions.footprint(self.volume, region))
        return _RegionState(region=region, key=region_key(region), box=box)

    def _embedding(self, rs: _RegionState, stats: _Stats):
        key = (self.volume_key, rs.key)
        emb = self.cache.get(key, _MISSING)
        if emb is _MISSING:
            t = time.perf_counter()
            image = _regions.model_input(self.volume, rs.region, clamp_hu=self.options.clamp_hu)
            emb = self.backend.encode(image)
            self.cache.put(key, emb)
            stats.encode_s += time.perf_counter() - t
            stats.encoded += 1
        return emb

    def _decode(self, rs: _RegionState, points_ras: np.ndarray, labels: np.ndarray,
                mask_in: Optional[np.ndarray], stats: _Stats) -> _RegionState:
        emb = self._embedding(rs, stats)
        s = self.low_res_size
        if mask_in is None:
            mask_in = np.zeros((s, s, s), dtype=np.float32)   # the reference's first step: zeros, never None
        else:
            mask_in = np.array(mask_in, dtype=np.float32)      # a writable copy: stored logits stay immutable
        pts = np.asarray(rs.region.ras_to_index(np.asarray(points_ras, dtype=np.float64).reshape(-1, 3)),
                         dtype=np.float32)
        t = time.perf_counter()
        logits = self.backend.decode(emb, pts, np.asarray(labels, dtype=np.int64), mask_in)
        stats.decode_s += time.perf_counter() - t
        logits = np.asarray(logits, dtype=np.float32).reshape(s, s, s)
        logits.flags.writeable = False
        return replace(rs, logits=logits, pos_box=self._positive_box(rs, logits))

    def _region_index(self, rs: _RegionState, ras: np.ndarray) -> np.ndarray:
        return np.asarray(rs.region.ras_to_index(np.asarray(ras, dtype=np.float64).reshape(-1, 3)))

    def _inside_region(self, idx: np.ndarray) -> np.ndarray:
        hi = self.options.region_size - 0.5
        return np.all((idx >= -0.5) & (idx <= hi), axis=-1)

    def _choose_region(self, regions: List[_RegionState], ras: np.ndarray) -> Optional[int]:
        """Index of the object's region containing ``ras`` whose centre is nearest (max-norm), or None."""
        centre = (self.options.region_size - 1) / 2.0
        best, best_d = None, np.inf
        for n, rs in enumerate(regions):
            idx = self._region_index(rs, ras)[0]
            if not self._inside_region(idx):
                continue
            d = float(np.max(np.abs(idx - centre)))
            if d < best_d:
                best, best_d = n, d
        return best

    def _apply_click(self, regions: List[_RegionState], clicks: List[Click], stats: _Stats) -> Optional[Box]:
        """Apply the LAST of ``clicks`` to ``regions`` (modified in place). Returns the dirty box."""
        click = clicks[-1]
        ras = np.asarray(click.ras, dtype=np.float64)
        n = self._choose_region(regions, ras)
        if n is None:
            region = _regions.Region.around(self.volume, ras, size=self.options.region_size,
                                            spacing=self.options.spacing_mm)
            regions.append(self._new_region_state(region))
            n = len(regions) - 1
            old = None
        else:
            old = regions[n]
        rs = regions[n]
        if self.options.prompt_mode == "newest":
            pts, labels = ras[None], np.array([1 if click.positive else 0])
        else:
            pts_l, lab_l = [], []
            for p, pos in rs.seeds:
                pts_l.append(p)
                lab_l.append(1 if pos else 0)
            for c in clicks:
                if self._inside_region(self._region_index(rs, np.asarray(c.ras))[0]):
                    pts_l.append(c.ras)
                    lab_l.append(1 if c.positive else 0)
            pts, labels = np.asarray(pts_l, dtype=np.float64), np.asarray(lab_l)
        new = self._decode(rs, pts, labels, rs.logits, stats)
        regions[n] = new
        dirty = self._dirty_for_change(regions, n, old)
        if self.options.extend:
            dirty = _box_union(dirty, self._extend(regions, n, stats, clicks))
        return dirty

    def _dirty_for_change(self, regions: List[_RegionState], n: int, old: Optional[_RegionState]) -> Optional[Box]:
        """Voxels whose merged value may have changed when region ``n`` went from ``old`` to its new state."""
        new = regions[n]
        dirty = _box_union(None if old is None else old.pos_box, new.pos_box)
        for m, q in enumerate(regions):
            if m != n:
                dirty = _box_union(dirty, _box_intersect(q.pos_box, new.box))
        return dirty

    # ---------------------------------------------------- extension (docs/reference/SAM_MED3D.md section 7)
    def _object_cells(self, rs: _RegionState, clicks: Sequence[Click]) -> Optional[np.ndarray]:
        """The object inside the region at low resolution: the positive low-res cells 6-connected to a
        positive prompt of the object in this region (its positive clicks and extension seeds). Scattered
        positives elsewhere in the region are not the object and do not drive the extension."""
        if rs.logits is None:
            return None
        pos = rs.logits > self.options.threshold
        if not pos.any():
            return None
        pts = [p for p, positive in rs.seeds if positive] + [c.ras for c in clicks if c.positive]
        if not pts:
            return None
        s = self.low_res_size
        f = self.options.region_size / s
        idx = self._region_index(rs, np.asarray(pts, dtype=np.float64))
        idx = idx[self._inside_region(idx)]
        if len(idx) == 0:
            return None
        cells = np.clip(np.floor((idx + 0.5) / f - 0.5 + 0.5), 0, s - 1).astype(int)
        comp = np.zeros_like(pos)
        comp[cells[:, 0], cells[:, 1], cells[:, 2]] = True
        comp &= pos
        if not comp.any():
            return None
        while True:   # flood fill within the positive cells (a few dozen cheap steps on 32^3)
            grown = comp.copy()
            grown[1:] |= comp[:-1]
            grown[:-1] |= comp[1:]
            grown[:, 1:] |= comp[:, :-1]
            grown[:, :-1] |= comp[:, 1:]
            grown[:, :, 1:] |= comp[:, :, :-1]
            grown[:, :, :-1] |= comp[:, :, 1:]
            grown &= pos
            if np.array_equal(grown, comp):
                return comp
            comp = grown

    def _face_seed(self, rs: _RegionState, axis: int, side: int,
                   comp: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
        """RAS of the most confident voxel of the object in the region's outer two voxel layers on one face
        (inside the volume), or None when the object does not touch that face. ``comp``: the object's
        low-res cells (:meth:`_object_cells`); None = every positive cell."""
        s = self.low_res_size
        size = self.options.region_size
        layer = 0 if side < 0 else s - 1
        face = np.take(rs.logits, layer, axis=axis).astype(np.float64)
        if face.max() <= self.options.threshold:
            return None
        m = self._faces_m
        up = m @ face @ m.T                       # the 128^2 face of the upsampled logits (layers 0,1 or S-2,S-1)
        hit = up > self.options.threshold
        if comp is not None:
            cf = np.take(comp, layer, axis=axis)
            if not cf.any():
                return None
            near = cf.copy()                      # the object's face cells, dilated by one (interpolation spill)
            near[1:] |= cf[:-1]
            near[:-1] |= cf[1:]
            near[:, 1:] |= cf[:, :-1]
            near[:, :-1] |= cf[:, 1:]
            f = size / s
            cell = np.clip(np.floor((np.arange(size) + 0.5) / f), 0, s - 1).astype(int)
            hit &= near[cell[:, None], cell[None, :]]
        uu, vv = np.nonzero(hit)
        if uu.size == 0:
            return None
        other = [a for a in range(3) if a != axis]
        idx = np.zeros((uu.size, 3))
        idx[:, axis] = 1.0 if side < 0 else size - 2.0
        idx[:, other[0]] = uu
        idx[:, other[1]] = vv
        ras = np.asarray(rs.region.index_to_ras(idx))
        inside = self.volume.contains_ijk(self.volume.ras_to_ijk_points(ras))
        if not inside.any():
            return None
        if self.options.extend_max_face_fill < 1.0:
            # fraction of the face's in-volume pixels that are positive (leak guard)
            g = np.arange(size, dtype=np.float64)
            gu, gv = np.meshgrid(g, g, indexing="ij")
            all_idx = np.zeros((size * size, 3))
            all_idx[:, axis] = idx[0, axis]
            all_idx[:, other[0]] = gu.reshape(-1)
            all_idx[:, other[1]] = gv.reshape(-1)
            face_in = self.volume.contains_ijk(
                self.volume.ras_to_ijk_points(np.asarray(rs.region.index_to_ras(all_idx))))
            if int(inside.sum()) > self.options.extend_max_face_fill * max(int(face_in.sum()), 1):
                return None
        vals = np.where(inside, up[uu, vv], -np.inf)
        return ras[int(np.argmax(vals))]

    def _covered(self, regions: List[_RegionState], candidate) -> bool:
        centre = (self.options.region_size - 1) / 2.0
        c_ras = np.asarray(candidate.index_to_ras(np.full((1, 3), centre)))
        for rs in regions:
            idx = self._region_index(rs, c_ras)[0]
            if np.max(np.abs(idx - centre)) < self.options.region_size / 4.0:
                return True
        return False

    def _resample_logits(self, src: _RegionState, dst_region) -> np.ndarray:
        """``src`` low-res logits sampled at ``dst_region``'s low-res cell centres (0 where src has none)."""
        s = self.low_res_size
        f = self.options.region_size / s
        lr = (np.arange(s) * f + (f - 1) / 2.0)
        grid = np.stack(np.meshgrid(lr, lr, lr, indexing="ij"), axis=-1).reshape(-1, 3)
        ras = np.asarray(dst_region.index_to_ras(grid))
        src_hi = np.asarray(src.region.ras_to_index(ras))
        src_lo = (src_hi + 0.5) / f - 0.5
        return _trilinear(src.logits, src_lo).reshape(s, s, s).astype(np.float32)

    def _extend(self, regions: List[_RegionState], start: int, stats: _Stats,
                clicks: Sequence[Click] = ()) -> Optional[Box]:
        half = self.options.region_size // 2
        dirty = None
        queue = [start]
        while queue:
            rs = regions[queue.pop(0)]
            if rs.logits is None or rs.pos_box is None:
                continue
            comp = self._object_cells(rs, clicks)
            if comp is None:
                continue
            for axis in range(3):
                for side in (-1, 1):
                    seed = self._face_seed(rs, axis, side, comp)
                    if seed is None:
                        continue
                    offset = np.zeros(3, dtype=int)
                    offset[axis] = side * half
                    cand = rs.region.shifted(offset)
                    if self._covered(regions, cand):
                        continue
                    if len(regions) >= self.options.max_regions:
                        stats.truncated = True
                        continue
                    new = replace(self._new_region_state(cand), seeds=((tuple(float(v) for v in seed), True),))
                    mask_in = self._resample_logits(rs, cand)
                    new = self._decode(new, seed[None], np.array([1]), mask_in, stats)
                    regions.append(new)
                    dirty = _box_union(dirty, self._dirty_for_change(regions, len(regions) - 1, None))
                    queue.append(len(regions) - 1)
        return dirty

    # ------------------------------------------------------------------ paste back
    def _positive_box(self, rs: _RegionState, logits: np.ndarray) -> Optional[Box]:
        """Conservative (k, j, i) box of the volume voxels where the interpolated logits can exceed the
        threshold: an interpolated value is a convex combination of the 8 surrounding low-res cells."""
        pos = logits > self.options.threshold
        if not pos.any():
            return None
        s = self.low_res_size
        f = self.options.region_size / s
        lo_hi = []
        for axis in range(3):
            other = tuple(a for a in range(3) if a != axis)
            nz = np.nonzero(pos.any(axis=other))[0]
            lo = max(-0.5, f * (nz[0] - 1 + 0.5) - 0.5)
            hi = min(self.options.region_size - 0.5, f * (nz[-1] + 1 + 0.5) - 0.5)
            lo_hi.append((lo, hi))
        corners = np.array(list(itertools.product(*lo_hi)))
        ijk = self.volume.ras_to_ijk_points(np.asarray(rs.region.index_to_ras(corners)))
        lo = np.floor(ijk.min(axis=0)).astype(int) - 1
        hi = np.ceil(ijk.max(axis=0)).astype(int) + 2
        box = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))   # (k, j, i)
        return _box_intersect(box, rs.box)

    def _voxel_weights(self, rs: _RegionState, box: Box) -> np.ndarray:
        """Tent weight of region ``rs`` at the centres of the volume voxels in ``box`` (0 outside)."""
        a = np.linalg.inv(np.asarray(rs.region.region_to_ras, dtype=np.float64)) @ self.volume.ijk_to_ras
        k = np.arange(box[0].start, box[0].stop, dtype=np.float64)[:, None, None]
        j = np.arange(box[1].start, box[1].stop, dtype=np.float64)[None, :, None]
        i = np.arange(box[2].start, box[2].stop, dtype=np.float64)[None, None, :]
        size = self.options.region_size
        centre, half = (size - 1) / 2.0, size / 2.0
        w = None
        for row in range(3):
            x = a[row, 0] * i + a[row, 1] * j + a[row, 2] * k + a[row, 3]
            wa = np.where((x >= -0.5) & (x <= size - 0.5),
                          np.maximum(1.0 - np.abs(x - centre) / half, _MIN_WEIGHT), 0.0)
            w = wa if w is None else w * wa
        return np.broadcast_to(w, _box_shape(box)).astype(np.float32)

    def _render(self, regions: Sequence[_RegionState], box: Box) -> np.ndarray:
        """The object's mask inside ``box`` as a pure function of its regions' logits."""
        out = np.zeros(_box_shape(box), dtype=np.uint8)
        live = [r for r in regions if r.logits is not None and _box_intersect(r.box, box) is not None]
        pos = None
        for r in live:
            pos = _box_union(pos, _box_intersect(r.pos_box, box))
        if pos is None:
            return out
        thr = self.options.threshold
        live = [r for r in live if _box_intersect(r.box, pos) is not None]
        if len(live) == 1:
            r = live[0]
            sub = _box_intersect(r.pos_box, box)
            vals = _regions.logits_to_volume(r.logits, r.region, self.volume, box=sub)
            np.greater(vals, thr, out=out[_relative(sub, box)], casting="unsafe")
            return out
        num = np.zeros(_box_shape(pos), dtype=np.float32)
        den = np.zeros(_box_shape(pos), dtype=np.float32)
        for r in live:
            sub = _box_intersect(r.box, pos)
            rel = _relative(sub, pos)
            vals = np.asarray(_regions.logits_to_volume(r.logits, r.region, self.volume, box=sub),
                              dtype=np.float32)
            w = self._voxel_weights(r, sub)
            num[rel] += w * vals
            den[rel] += w
        np.greater(num, thr * den, out=out[_relative(pos, box)], casting="unsafe")
        out[_relative(pos, box)] &= (den > 0)
        return out

    # ------------------------------------------------------------------ commit / restore
    def _commit(self, obj: _Object, clicks: List[Click], regions: List[_RegionState], dirty: Optional[Box],
                stats: _Stats, t0: float) -> MaskUpdate:
        t = time.perf_counter()
        vol_box = tuple(slice(0, n) for n in self._require_volume().array.shape)
        if dirty is not None:
            dirty = _box_intersect(dirty, vol_box)
        after = None
        if dirty is not None:
            after = self._render(regions, dirty)
            patch_before, patch_after = self._raw_patch(obj, dirty), _Patch.of(after, dirty)
            self._raw_set(obj, patch_after)
        else:
            patch_before = patch_after = _Patch((slice(0, 0),) * 3)
        honour_before = obj.honour
        obj.honour = self._honour(obj, clicks)
        box = _box_intersect(_box_union(dirty, _honour_changes(honour_before, obj.honour)), vol_box)
        box = (slice(0, 0),) * 3 if box is None else box
        if after is not None and box == dirty:
            mask_box = after                   # our own array (the store holds a copy)
            if obj.honour is not None:
                obj.honour.apply(mask_box, box)
        else:
            mask_box = self._view(obj, box)
        mask_box.flags.writeable = False
        paste_s = time.perf_counter() - t
        obj.undo.append(_Edit(tuple(obj.clicks), tuple(obj.regions), tuple(clicks), tuple(regions),
                              dirty, patch_before, patch_after, honour_before, obj.honour))
        del obj.undo[:-self.options.history_limit]
        budget = self.options.history_mb * 2 ** 20
        while len(obj.undo) > 1 and self._history_bytes(obj) > budget:
            obj.undo.pop(0)
        obj.redo.clear()
        obj.clicks = list(clicks)
        obj.regions = list(regions)
        timings = {"encode_s": stats.encode_s, "decode_s": stats.decode_s, "paste_s": paste_s,
                   "total_s": time.perf_counter() - t0, "regions": len(regions),
                   "max_regions_reached": bool(stats.truncated)}
        return MaskUpdate(obj.oid, box, mask_box, stats.encoded, timings, len(regions), stats.truncated)

    def _restore(self, obj: _Object, edit: _Edit, forward: bool) -> MaskUpdate:
        t0 = time.perf_counter()
        patch = edit.patch_after if forward else edit.patch_before
        honour = edit.honour_after if forward else edit.honour_before
        if edit.box is not None:
            self._raw_set(obj, patch)
        box = _box_union(edit.box, _honour_changes(obj.honour, honour))
        obj.honour = honour
        box = (slice(0, 0),) * 3 if box is None else box
        mask_box = self._view(obj, box)
        mask_box.flags.writeable = False
        obj.clicks = list(edit.clicks_after if forward else edit.clicks_before)
        obj.regions = list(edit.regions_after if forward else edit.regions_before)
        dt = time.perf_counter() - t0
        return MaskUpdate(obj.oid, box, mask_box, 0,
                          {"encode_s": 0.0, "decode_s": 0.0, "paste_s": dt, "total_s": dt,
                           "regions": len(obj.regions), "max_regions_reached": False}, len(obj.regions), False)

    def _empty_update(self, obj: _Object) -> MaskUpdate:
        empty = np.zeros((0, 0, 0), dtype=np.uint8)
        empty.flags.writeable = False
        return MaskUpdate(obj.oid, (slice(0, 0),) * 3, empty, 0,
                          {"encode_s": 0.0, "decode_s": 0.0, "paste_s": 0.0, "total_s": 0.0,
                           "regions": len(obj.regions), "max_regions_reached": False}, len(obj.regions))
