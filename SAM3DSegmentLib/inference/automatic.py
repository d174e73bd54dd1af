"""Automatic mask generator (3D): every object the model finds from prompts it places itself (docs/automatic.md).

A Predictor-style class in the manner of segment-anything's ``SamAutomaticMaskGenerator``, on the engine's
regions and embedding cache:

1. Search area (:class:`~.candidates.SearchArea`): the volume, restricted to the body and to an optional ROI.
2. Prompts (:mod:`.candidates`): a physical-space point grid (``grid_spacing_mm``) and/or blob candidates
   (Laplacian-of-Gaussian maxima at ``blob_diameters_mm``); blobs first, strongest first.
3. Regions: a lattice of the model's cubic regions (128^3 at 1.5 mm for SAM-Med3D) along the region axes,
   overlapping by ``region_overlap_mm``, centred on the search area; each prompt is decoded in the region whose
   centre is nearest, so it lies at least about half the overlap inside it. Only regions holding prompts are
   encoded, once each, through the :class:`~.cache.EmbeddingCache` (a session's cache when given: running again
   with other filters costs no encode while the cache holds the regions).
4. Batched decoding: ``points_per_batch`` single-point prompts per decoder call (:func:`.backends.decode_batch`),
   the previous-mask input zeros (the reference's first step).
5. Per prompt (:mod:`.auto_masks`): the connected mask holding the prompt, its stability score, filters
   (stability, predicted IoU if asked, volume), paste-back onto the input grid.
6. Non-maximum suppression by 3D mask IoU (:mod:`.nms`): inside each region on its grid before paste-back, then
   across regions on the input grid. Ranking: masks the region did not cut first, then ``rank_by``.

Output: :class:`AutoResult` with one :class:`AutoInstance` per object: mask (box + voxels on the input grid),
predicted IoU (None when the backend gives none), stability, volume (ml), centroid (RAS), the prompt.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import regions as _regions
from .auto_masks import RegionMask, Rejection, paste_instance, region_mask
from .auto_options import AutoOptions
from .backends import decode_batch
from .cache import EmbeddingCache, region_key, volume_content_key
from .candidates import Candidate, RoiBox, SearchArea, blob_candidates, dedupe_candidates, grid_candidates
from .nms import BoxMask, nms
from ..core.geometry import Volume

__all__ = ["AutoOptions", "AutoInstance", "AutoResult", "AutomaticMaskGenerator3D", "BackendRegionDecoder",
           "RegionLattice"]


@dataclass
class AutoInstance:
    """One object: ``mask`` (box + voxels on the input grid, ``[k, j, i]``) and what made and scored it."""

    mask: BoxMask
    stability: float
    score: float
    volume_ml: float
    centroid_ras: Tuple[float, float, float]
    prompt: Candidate
    region: int
    predicted_iou: Optional[float] = None
    cut_by_region: bool = False

    @property
    def box(self):
        return self.mask.box

    def to_dict(self) -> dict:
        return {"box_kji": [[int(s.start), int(s.stop)] for s in self.mask.box], "voxels": int(self.mask.count),
                "volume_ml": round(self.volume_ml, 4), "centroid_ras": [round(v, 2) for v in self.centroid_ras],
                "predicted_iou": None if self.predicted_iou is None else round(self.predicted_iou, 4),
                "stability": round(self.stability, 4), "score": round(self.score, 4),
                "prompt": self.prompt.to_dict(), "region": int(self.region),
                "cut_by_region": bool(self.cut_by_region)}


@dataclass
class AutoResult:
    instances: List[AutoInstance]
    regions: List[object]
    candidates: Dict[str, int]
    decoded: int
    rejected: Dict[str, int]
    timings: Dict[str, float]
    notes: List[str] = field(default_factory=list)

    def report(self) -> dict:
        """JSON-ready summary (without voxels)."""
        return {"instances": [dict(index=n + 1, **inst.to_dict()) for n, inst in enumerate(self.instances)],
                "count": len(self.instances), "regions": len(self.regions), "candidates": dict(self.candidates),
                "decoded": int(self.decoded), "rejected": dict(self.rejected),
                "timings": {k: round(float(v), 4) for k, v in self.timings.items()}, "notes": list(self.notes)}

    def label_map(self, shape) -> np.ndarray:
        """uint16 ``[k, j, i]`` label map: instance ``n`` (1-based) where it is, the better instance wins overlaps."""
        out = np.zeros(tuple(shape), dtype=np.uint16)
        for n in range(len(self.instances), 0, -1):
            m = self.instances[n - 1].mask
            out[m.box][m.mask] = n
        return out


class RegionLattice:
    """Region centres on a lattice along the region axes with stride ``region mm - overlap``, centred on a RAS box."""

    def __init__(self, volume: Volume, lo: np.ndarray, hi: np.ndarray, options: AutoOptions):
        self.volume = volume
        self.options = options
        probe = _regions.Region.around(volume, (np.asarray(lo) + hi) / 2.0, options.region_size, options.spacing_mm)
        self.axes = probe.region_to_ras[:3, :3] / options.spacing_mm      # unit a, b, c directions (columns)
        self.stride = options.region_size * options.spacing_mm - options.region_overlap_mm
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        q = corners @ self.axes
        qlo, qhi = q.min(axis=0), q.max(axis=0)
        self.n = np.maximum(1, np.ceil((qhi - qlo) / self.stride - 1e-9)).astype(int)
        self.first = (qlo + qhi) / 2.0 - (self.n - 1) / 2.0 * self.stride

    def tile_of(self, ras: np.ndarray) -> np.ndarray:
        """(N, 3) lattice indices of the tiles whose centres are nearest to the RAS points."""
        q = np.asarray(ras, dtype=np.float64).reshape(-1, 3) @ self.axes
        return np.clip(np.floor((q - self.first) / self.stride + 0.5), 0, self.n - 1).astype(int)

    def centre(self, tile: Sequence[int]) -> np.ndarray:
        return self.axes @ (self.first + np.asarray(tile, dtype=np.float64) * self.stride)

    def region(self, tile: Sequence[int]):
        return _regions.Region.around(self.volume, self.centre(tile), self.options.region_size,
                                      self.options.spacing_mm)


class BackendRegionDecoder:
    """Decodes prompts of one volume's regions with a backend: the embedding from the cache or encoded once."""

    def __init__(self, backend, cache: EmbeddingCache, volume: Volume, volume_key: str, options: AutoOptions):
        self.backend, self.cache, self.volume, self.volume_key, self.options = backend, cache, volume, volume_key, options
        self.encode_s = self.decode_s = 0.0
        self.encoded = 0

    def decode(self, region, points_abc: np.ndarray) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        def encode():
            t = time.perf_counter()
            emb = self.backend.encode(_regions.model_input(self.volume, region, clamp_hu=self.options.clamp_hu))
            self.encode_s += time.perf_counter() - t
            self.encoded += 1
            return emb

        emb, _ = self.cache.get_or_compute((self.volume_key, region_key(region)), encode)
        t = time.perf_counter()
        pts = np.asarray(points_abc, dtype=np.float32).reshape(-1, 1, 3)
        out = decode_batch(self.backend, emb, pts, np.ones(pts.shape[:2], dtype=np.int64))
        self.decode_s += time.perf_counter() - t
        return out


class AutomaticMaskGenerator3D:
    """``generate(volume, roi=None)`` -> :class:`AutoResult` (see the module docstring).

    ``backend``: the model (:class:`~.backends.Backend`). ``cache``: an :class:`~.cache.EmbeddingCache` to share
    (a session's); a private one holding every region otherwise. ``region_decoder``: replaces the model by any
    object with ``decode(region, points_abc (B, 3)) -> (logits (B, s, s, s), predicted IoU (B,) or None)``, built
    per volume as ``region_decoder(volume, volume_key)`` (the model-free oracle of eval/oracle.py uses it)."""

    def __init__(self, backend=None, options: Optional[AutoOptions] = None, cache: Optional[EmbeddingCache] = None,
                 region_decoder: Optional[Callable] = None):
        if backend is None and region_decoder is None:
            raise ValueError("give a backend (the model) or a region_decoder")
        self.options = options or AutoOptions()
        if backend is not None:
            size = int(getattr(backend, "image_size", self.options.region_size))
            if size != self.options.region_size:
                raise ValueError(f"the model takes {size}^3 inputs but AutoOptions.region_size is "
                                 f"{self.options.region_size}; set region_size={size}")
            if self.options.uses_predicted_iou and region_decoder is None and not hasattr(backend, "decode_batch"):
                raise ValueError(f"{getattr(backend, 'name', 'this backend')} reports no predicted IoU: use "
                                 "rank_by='stability' and min_predicted_iou=None")
        self.backend = backend
        self.cache = cache
        self.region_decoder = region_decoder
        self.last_decoder = None

    @classmethod
    def from_session(cls, session, options: Optional[AutoOptions] = None, **changes) -> "AutomaticMaskGenerator3D":
        """A generator on a :class:`~.session.Session`'s backend and embedding cache, with its region settings."""
        opts = options or AutoOptions.for_session(session.options, **changes)
        return cls(session.backend, opts, cache=session.cache)

    # ------------------------------------------------------------------------------------------ planning
    def candidates(self, volume: Volume, roi: Optional[RoiBox] = None) -> Tuple[SearchArea, List[Candidate]]:
        """The search area and its prompts, blobs (strongest first) before grid points."""
        o = self.options
        area = SearchArea(volume, roi, o.body_threshold_hu)
        cands: List[Candidate] = []
        if o.blob_diameters_mm:
            blobs = blob_candidates(volume, area, o.blob_diameters_mm, o.blob_min_response, o.blob_max_per_diameter)
            blobs.sort(key=lambda c: -(c.response or 0.0))
            cands.extend(dedupe_candidates(blobs, min_distance_mm=1.5))
        if o.grid_spacing_mm is not None:
            cands.extend(grid_candidates(area, o.grid_spacing_mm, self._axes(volume)))
        return area, cands

    def _axes(self, volume: Volume) -> np.ndarray:
        o = self.options
        r = _regions.Region.around(volume, volume.ijk_to_ras_points(np.zeros(3)), o.region_size, o.spacing_mm)
        return r.region_to_ras[:3, :3] / o.spacing_mm

    # ------------------------------------------------------------------------------------------ running
    def generate(self, volume: Volume, roi: Optional[RoiBox] = None, volume_key: Optional[str] = None,
                 progress: Optional[Callable[[float, str], None]] = None,
                 check: Optional[Callable[[], None]] = None) -> AutoResult:
        """Every instance in ``volume`` (inside ``roi`` when given). ``progress(fraction, message)`` is called
        as regions are done; ``check()`` is called between decoder calls and may raise to cancel."""
        o = self.options
        t0 = time.perf_counter()
        key = volume_key or volume_content_key(volume.array, volume.ijk_to_ras)
        area, cands = self.candidates(volume, roi)
        t_cand = time.perf_counter() - t0
        notes = [area.note] if area.note else []
        counts = {"grid": sum(c.kind == "grid" for c in cands), "blob": sum(c.kind == "blob" for c in cands)}
        rejected: Dict[str, int] = {}
        decoder = self._decoder(volume, key, max(1, len(cands)))
        self.last_decoder = decoder
        regions: List[object] = []
        found: List[AutoInstance] = []
        decoded = 0
        t_masks = t_paste = 0.0
        if cands:
            lo, hi = area.bounds_ras()
            lattice = RegionLattice(volume, lo, hi, o)
            tiles = lattice.tile_of(np.asarray([c.ras for c in cands]))
            order = sorted({tuple(t) for t in tiles.tolist()})
            for r, tile in enumerate(order):
                region = lattice.region(tile)
                regions.append(region)
                members = [n for n in range(len(cands)) if tuple(tiles[n]) == tile]
                ta = time.perf_counter()
                kept, n_dec, t_p = self._run_region(decoder, volume, region, r, [cands[n] for n in members],
                                                    rejected, check)
                decoded += n_dec
                t_paste += t_p
                t_masks += time.perf_counter() - ta - t_p
                found.extend(kept)
                if progress is not None:
                    progress((r + 1) / len(order), f"region {r + 1} of {len(order)}: {len(found)} instances so far")
        tn = time.perf_counter()
        found = self._suppress(found, rejected)
        if o.max_instances is not None:
            found = found[:int(o.max_instances)]
        timings = {"candidates_s": t_cand, "encode_s": getattr(decoder, "encode_s", 0.0),
                   "decode_s": getattr(decoder, "decode_s", 0.0), "paste_s": t_paste,
                   "nms_s": time.perf_counter() - tn, "total_s": time.perf_counter() - t0}
        timings["masks_s"] = max(0.0, t_masks - timings["encode_s"] - timings["decode_s"])
        return AutoResult(found, regions, counts, decoded, rejected, timings, notes)

    def _decoder(self, volume: Volume, key: str, n_regions_hint: int):
        if self.region_decoder is not None:
            return self.region_decoder(volume, key)
        cache = self.cache if self.cache is not None else EmbeddingCache(max(8, n_regions_hint))
        return BackendRegionDecoder(self.backend, cache, volume, key, self.options)

    def _run_region(self, decoder, volume: Volume, region, r: int, cands: List[Candidate],
                    rejected: Dict[str, int], check) -> Tuple[List[AutoInstance], int, float]:
        o = self.options
        s = o.region_size
        covered = np.zeros((s, s, s), dtype=bool) if o.skip_covered else None   # region grid, [c, b, a]
        covered_cells = None                                                     # low-res, [c, b, a]
        idx_all = region.ras_to_index(np.asarray([c.ras for c in cands], dtype=np.float64))
        pending = list(range(len(cands)))
        accepted: List[Tuple[RegionMask, Candidate, Optional[float], float, np.ndarray]] = []
        decoded = 0
        while pending:
            batch = []
            while pending and len(batch) < o.points_per_batch:
                n = pending.pop(0)
                if covered is not None:
                    cba = np.clip(np.floor(idx_all[n][::-1] + 0.5), 0, s - 1).astype(int)
                    if covered[tuple(cba)] or (covered_cells is not None and covered_cells[
                            tuple(cba * covered_cells.shape[0] // s)]):
                        _count(rejected, "covered")
                        continue
                batch.append(n)
            if not batch:
                break
            if check is not None:
                check()
            logits, iou = decoder.decode(region, idx_all[batch])
            decoded += len(batch)
            if iou is None and o.uses_predicted_iou:
                raise ValueError("the model reports no predicted IoU: use rank_by='stability' and "
                                 "min_predicted_iou=None")
            for b, n in enumerate(batch):
                got = region_mask(logits[b], region, volume, idx_all[n], o.threshold, o.stability_offset,
                                  o.max_volume_ml)
                if isinstance(got, Rejection):
                    _count(rejected, got.reason)
                    if covered is not None and got.cells is not None:
                        covered_cells = got.cells if covered_cells is None else covered_cells | got.cells
                    continue
                piou = None if iou is None else float(iou[b])
                if got.stability < o.min_stability:
                    _count(rejected, "low_stability")
                    continue
                if o.min_predicted_iou is not None and piou < o.min_predicted_iou:
                    _count(rejected, "low_predicted_iou")
                    continue
                if covered is not None:
                    covered[got.mask.box] |= got.mask.mask
                accepted.append((got, cands[n], piou, _score(o.rank_by, got.stability, piou), logits[b]))
        # duplicates inside the region, on its grid, before the (costlier) paste-back
        ranked = sorted(range(len(accepted)), key=lambda k: (accepted[k][0].cut_by_region, -accepted[k][3], k))
        keep = nms([a[0].mask for a in accepted], ranked, o.nms_iou)
        _count(rejected, "duplicate", len(accepted) - len(keep))
        t = time.perf_counter()
        out: List[AutoInstance] = []
        for k in keep:
            rm, cand, piou, score, lg = accepted[k]
            if o.drop_cut and rm.cut_by_region:
                _count(rejected, "cut_by_region")
                continue
            bm = paste_instance(lg, region, volume, rm.mask, np.asarray(cand.ras), o.threshold)
            if bm is None:
                _count(rejected, "vanishes")
                continue
            ml = bm.count * abs(float(np.linalg.det(volume.ijk_to_ras[:3, :3]))) / 1000.0
            if ml < o.min_volume_ml or (o.max_volume_ml is not None and ml > o.max_volume_ml):
                _count(rejected, "too_small" if ml < o.min_volume_ml else "too_large")
                continue
            kji = np.argwhere(bm.mask).mean(axis=0) + [sl.start for sl in bm.box]
            centroid = volume.ijk_to_ras_points(kji[::-1])
            out.append(AutoInstance(bm, rm.stability, score, ml, tuple(float(v) for v in centroid), cand, r, piou,
                                    rm.cut_by_region))
        return out, decoded, time.perf_counter() - t

    def _suppress(self, found: List[AutoInstance], rejected: Dict[str, int]) -> List[AutoInstance]:
        ranked = sorted(range(len(found)), key=lambda k: (found[k].cut_by_region, -found[k].score, k))
        keep = nms([f.mask for f in found], ranked, self.options.nms_iou)
        _count(rejected, "duplicate", len(found) - len(keep))
        return [found[k] for k in keep]


def _score(rank_by: str, stability: float, piou: Optional[float]) -> float:
    if rank_by == "stability":
        return float(stability)
    if rank_by == "predicted_iou":
        return float(piou)
    return float(stability) * float(piou)


def _count(d: Dict[str, int], key: str, n: int = 1) -> None:
    if n:
        d[key] = d.get(key, 0) + int(n)
