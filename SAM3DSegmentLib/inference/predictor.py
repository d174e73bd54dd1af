"""Prompting the model on one region (the predictor step of SAM: image embedding once, then prompts -> logits).

A region's embedding comes from the LRU cache (:mod:`~SAM3DSegmentLib.inference.cache`), else
``backend.encode`` of ``regions.model_input`` once (normalised with ``backend.intensity`` when the model has
its own HU window and statistics, the 3DSAM-adapter). Each decode takes prompt points in RAS mm (turned into the
region's continuous (a, b, c) indices) with their labels and the region's previous low-res logits (zeros at
its first step, never None: the reference's first step), and returns the region's next state.

Which points prompt a click (``SessionOptions.prompt_mode``, a click protocol of
:mod:`SAM3DSegmentLib.core.click_protocols`): ``"newest-click"`` (default, what the model was trained with)
ONLY the newest click; ``"all-clicks"`` every point of the object inside the region so far (extension seed
points first, then the clicks, in order).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import List, Optional, Sequence, Tuple

import numpy as np

from . import regions as _regions
from .cache import region_key
from ..core.boxes import Box, normalise_box
from ..core.click_protocols import NEWEST_CLICK
from ..core.geometry import GeometryError
from ..core.types import Click

__all__ = ["RegionState", "Stats", "RegionPredictor", "normalise_click"]


@dataclass(frozen=True)
class RegionState:
    """One model-input region of an object and its latest logits (immutable: states are shared by history)."""

    region: _regions.Region
    key: tuple                # cache.region_key(region)
    box: Box                  # footprint: volume voxels whose centres fall inside the region
    logits: Optional[np.ndarray] = None    # (s, s, s) float32, never modified in place
    pos_box: Optional[Box] = None          # conservative box of voxels where logits > threshold
    seeds: Tuple[Tuple[Tuple[float, float, float], bool], ...] = ()  # extension points (ras, positive)


class Stats:
    """What one session call spent: encode/decode seconds, regions encoded, extension cut by max_regions."""

    def __init__(self) -> None:
        self.encode_s = 0.0
        self.decode_s = 0.0
        self.encoded = 0
        self.truncated = False


def normalise_click(volume, click: Click) -> Click:
    """``click`` checked against ``volume`` and given in RAS (``ijk`` kept when given): a clear error when it
    is malformed or lies outside the volume."""
    if click.ras is None and click.ijk is None:
        raise ValueError("give a click either as ras=(R, A, S) mm or as ijk=(i, j, k) voxel indices")
    if click.ras is not None and click.ijk is not None:
        # Clicks returned by Session.clicks() carry both; they must agree (a moved point: give ras only).
        ijk = np.asarray(click.ijk, dtype=np.float64).reshape(-1)
        ras = np.asarray(click.ras, dtype=np.float64).reshape(-1)
        if ijk.size != 3 or ras.size != 3 or not np.allclose(volume.ijk_to_ras_points(ijk), ras, atol=1e-3):
            raise ValueError(f"click gives both ras={click.ras} and ijk={click.ijk} and they disagree; "
                             "give only one of them")
        click = Click(ras=None, positive=click.positive, ijk=click.ijk)
    if click.ras is not None:
        ras = np.asarray(click.ras, dtype=np.float64).reshape(-1)
        if ras.size != 3 or not np.all(np.isfinite(ras)):
            raise GeometryError(f"a RAS click needs three finite numbers, got {click.ras}")
        volume.ras_to_voxel(ras)   # raises GeometryError with a clear message when outside
        return Click(ras=tuple(float(v) for v in ras), positive=bool(click.positive), ijk=click.ijk)
    ijk = np.asarray(click.ijk, dtype=np.float64).reshape(-1)
    if ijk.size != 3 or not np.all(np.isfinite(ijk)):
        raise GeometryError(f"a voxel click needs three finite indices i, j, k, got {click.ijk}")
    if not bool(volume.contains_ijk(ijk)):
        raise GeometryError(
            f"voxel i, j, k = {ijk.tolist()} lies outside the volume (grid {list(volume.shape_ijk)} "
            "voxels along i, j, k; indices start at 0). Click inside the image")
    ras = volume.ijk_to_ras_points(ijk)
    return Click(ras=tuple(float(v) for v in ras), positive=bool(click.positive),
                 ijk=tuple(float(v) for v in ijk))


class RegionPredictor:
    """Regions of one volume and their decodes: ``backend`` (the model), ``cache`` (embeddings of this and
    other volumes, keyed by ``volume_key``), ``composer`` (:class:`~.compose.MaskComposer`, for the positive
    box of new logits)."""

    def __init__(self, backend, cache, volume, volume_key: str, options, low_res_size: int, composer):
        self.backend = backend
        self.cache = cache
        self.volume = volume
        self.volume_key = volume_key
        self.options = options
        self.low_res_size = int(low_res_size)
        self.composer = composer

    def new_region(self, region) -> RegionState:
        box = normalise_box(_regions.footprint(self.volume, region))
        return RegionState(region=region, key=region_key(region), box=box)

    def region_around(self, ras: np.ndarray) -> RegionState:
        """A new region centred on the RAS point ``ras`` (no logits yet)."""
        return self.new_region(_regions.Region.around(self.volume, ras, size=self.options.region_size,
                                                      spacing=self.options.spacing_mm))

    def embedding(self, rs: RegionState, stats: Stats):
        def encode():
            t = time.perf_counter()
            intensity = getattr(self.backend, "intensity", None)   # the model's own HU window and statistics
            image = _regions.model_input(self.volume, rs.region, clamp_hu=self.options.clamp_hu,
                                         **({} if intensity is None else {"intensity": intensity}))
            emb = self.backend.encode(image)
            stats.encode_s += time.perf_counter() - t
            stats.encoded += 1
            return emb

        return self.cache.get_or_compute((self.volume_key, rs.key), encode)[0]

    def decode(self, rs: RegionState, points_ras: np.ndarray, labels: np.ndarray,
               mask_in: Optional[np.ndarray], stats: Stats) -> RegionState:
        """``rs`` with the logits the model gives for these prompts (points in RAS mm)."""
        emb = self.embedding(rs, stats)
        s = self.low_res_size
        if mask_in is None:
            mask_in = np.zeros((s, s, s), dtype=np.float32)   # the reference's first step: zeros, never None
        else:
            mask_in = np.array(mask_in, dtype=np.float32)      # a writable copy: stored logits stay immutable
        pts = np.asarray(self.region_index(rs, points_ras), dtype=np.float32)
        t = time.perf_counter()
        logits = self.backend.decode(emb, pts, np.asarray(labels, dtype=np.int64), mask_in)
        stats.decode_s += time.perf_counter() - t
        logits = np.asarray(logits, dtype=np.float32).reshape(s, s, s)
        logits.flags.writeable = False
        return replace(rs, logits=logits, pos_box=self.composer.positive_box(rs.region, rs.box, logits))

    @staticmethod
    def region_index(rs: RegionState, ras) -> np.ndarray:
        """(N, 3) continuous (a, b, c) indices of RAS points in the region."""
        return np.asarray(rs.region.ras_to_index(np.asarray(ras, dtype=np.float64).reshape(-1, 3)))

    def choose_region(self, regions: Sequence[RegionState], ras: np.ndarray) -> Optional[int]:
        """Index of the region containing ``ras`` whose centre is nearest (max-norm), or None."""
        centre = (self.options.region_size - 1) / 2.0
        best, best_d = None, np.inf
        for n, rs in enumerate(regions):
            idx = self.region_index(rs, ras)[0]
            if not rs.region.contains_index(idx):
                continue
            d = float(np.max(np.abs(idx - centre)))
            if d < best_d:
                best, best_d = n, d
        return best

    def prompt(self, rs: RegionState, clicks: List[Click]) -> Tuple[np.ndarray, np.ndarray]:
        """``(points_ras, labels)`` prompting the LAST of ``clicks`` in region ``rs`` (see the module docstring)."""
        if self.options.prompt_mode == NEWEST_CLICK:
            click = clicks[-1]
            return np.asarray(click.ras, dtype=np.float64)[None], np.array([1 if click.positive else 0])
        pts, labels = [], []
        for p, positive in rs.seeds:
            pts.append(p)
            labels.append(1 if positive else 0)
        for c in clicks:
            if rs.region.contains_index(self.region_index(rs, c.ras)[0]):
                pts.append(c.ras)
                labels.append(1 if c.positive else 0)
        return np.asarray(pts, dtype=np.float64), np.asarray(labels)
