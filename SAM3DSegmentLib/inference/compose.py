"""Composing an object's mask from its regions' low-res logits (paste-back and merging).

Paste-back: ``regions.logits_to_volume`` evaluates a region's logits at the volume's voxel centres, over the
box that changed only (never the whole volume), thresholded at ``SessionOptions.threshold`` logits.

Merging overlapping regions: where several regions of an object cover a voxel the mask is
``sum_r w_r * l_r / sum_r w_r > threshold`` with ``l_r`` the region's logits interpolated at the voxel and
``w_r`` a tent weight, the product over the three region axes of ``1 - |x - centre| / (size / 2)`` (floored
at 1e-3 inside the region, 0 outside). A region's voxels near its own faces saw the least context, so they
count least; with the 50 % overlap of :mod:`~SAM3DSegmentLib.inference.growth` the two tents cross-fade
linearly and the result is continuous. Where a single region covers a voxel the mask is that region's logits
thresholded, exactly as without merging. The mask is therefore a pure function of the regions' logits:
incremental clicks, ``Session.set_clicks`` and undo/redo agree voxel for voxel.
"""
from __future__ import annotations

import itertools
from typing import List, Optional, Sequence

import numpy as np

from . import guided as _guided
from . import regions as _regions
from ..core.boxes import Box, box_intersect, box_shape, box_union, relative
from ..core.interp import rescale_index

__all__ = ["MaskComposer"]

_MIN_WEIGHT = 1e-3


class MaskComposer:
    """Renders an object's mask on a box of ``volume``'s grid from its region states (``RegionState`` of
    :mod:`~SAM3DSegmentLib.inference.predictor`: ``region``, footprint ``box``, ``logits``, ``pos_box``)."""

    def __init__(self, volume, region_size: int, low_res_size: int, threshold: float,
                 upsampling: str = "trilinear", spacing_mm: float = 1.5):
        self.volume = volume
        self.region_size = int(region_size)
        self.low_res_size = int(low_res_size)
        self.threshold = float(threshold)
        #: the image-guided refinement's parameters (None: plain trilinear paste-back)
        self.cell_mm = float(spacing_mm) * self.region_size / self.low_res_size
        self.guided = _guided.GuidedParams.for_cell(self.cell_mm) if upsampling == "guided" else None

    def positive_box(self, region, footprint: Box, logits: np.ndarray) -> Optional[Box]:
        """Conservative (k, j, i) box of the volume voxels (within the region's ``footprint``) where the
        interpolated ``logits`` can exceed the threshold: an interpolated value is a convex combination of
        the 8 surrounding low-res cells. None when no cell exceeds it."""
        pos = logits > self.threshold
        if not pos.any():
            return None
        f = self.region_size / self.low_res_size
        lo_hi = []
        for axis in range(3):
            other = tuple(a for a in range(3) if a != axis)
            nz = np.nonzero(pos.any(axis=other))[0]
            lo = max(-0.5, rescale_index(nz[0] - 1, f))
            hi = min(self.region_size - 0.5, rescale_index(nz[-1] + 1, f))
            lo_hi.append((lo, hi))
        corners = np.array(list(itertools.product(*lo_hi)))
        ijk = self.volume.ras_to_ijk_points(np.asarray(region.index_to_ras(corners)))
        lo = np.floor(ijk.min(axis=0)).astype(int) - 1
        hi = np.ceil(ijk.max(axis=0)).astype(int) + 2
        if self.guided is not None:   # guidance may add voxels up to its band beyond the trilinear mask
            grow = np.ceil(self.guided.band_mm / np.asarray(self.volume.spacing, dtype=np.float64)).astype(int)
            lo, hi = lo - grow, hi + grow
        box = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))   # (k, j, i)
        return box_intersect(box, footprint)

    def click_box(self, ras) -> Optional[Box]:
        """Guided mode: the voxels within the click guard of a click at ``ras`` (None in trilinear mode)."""
        if self.guided is None:
            return None
        ijk = self.volume.ras_to_ijk_points(np.asarray(ras, dtype=np.float64).reshape(1, 3))[0]
        r = self.guided.click_guard_mm / np.asarray(self.volume.spacing, dtype=np.float64)
        lo, hi = np.floor(ijk - r).astype(int), np.ceil(ijk + r).astype(int) + 1
        vol = tuple(slice(0, n) for n in self.volume.array.shape)
        return box_intersect((slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0])), vol)

    def voxel_weights(self, rs, box: Box) -> np.ndarray:
        """Tent weight of region state ``rs`` at the centres of the volume voxels in ``box`` (0 outside)."""
        a = np.linalg.inv(np.asarray(rs.region.region_to_ras, dtype=np.float64)) @ self.volume.ijk_to_ras
        k = np.arange(box[0].start, box[0].stop, dtype=np.float64)[:, None, None]
        j = np.arange(box[1].start, box[1].stop, dtype=np.float64)[None, :, None]
        i = np.arange(box[2].start, box[2].stop, dtype=np.float64)[None, None, :]
        size = self.region_size
        centre, half = (size - 1) / 2.0, size / 2.0
        w = None
        for row in range(3):
            x = a[row, 0] * i + a[row, 1] * j + a[row, 2] * k + a[row, 3]
            wa = np.where((x >= -0.5) & (x <= size - 0.5),
                          np.maximum(1.0 - np.abs(x - centre) / half, _MIN_WEIGHT), 0.0)
            w = wa if w is None else w * wa
        return np.broadcast_to(w, box_shape(box)).astype(np.float32)

    def render(self, regions: Sequence, box: Box, clicks: Sequence = ()) -> np.ndarray:
        """The object's mask (uint8) inside ``box`` as a pure function of its regions' logits (and, guided,
        of the CT and of its ``clicks``, :class:`~SAM3DSegmentLib.core.types.Click` in RAS)."""
        out = np.zeros(box_shape(box), dtype=np.uint8)
        live = [r for r in regions if r.logits is not None and box_intersect(r.box, box) is not None]
        pos = None
        for r in live:
            pos = box_union(pos, box_intersect(r.pos_box, box))
        if pos is None:
            return out
        live = [r for r in live if box_intersect(r.box, pos) is not None]
        if self.guided is not None:
            out[relative(pos, box)] = self._render_guided(live, pos, clicks)
            return out
        out[relative(pos, box)] = self._render_plain(live, pos)
        return out

    def _render_plain(self, live: Sequence, pos: Box) -> np.ndarray:
        """The trilinear mask (uint8) on ``pos`` (the union of the live regions' positive boxes)."""
        out = np.zeros(box_shape(pos), dtype=np.uint8)
        thr = self.threshold
        if len(live) == 1:
            r = live[0]
            sub = box_intersect(r.pos_box, pos)
            vals = _regions.logits_to_volume(r.logits, r.region, self.volume, box=sub)
            np.greater(vals, thr, out=out[relative(sub, pos)], casting="unsafe")
            return out
        num = np.zeros(box_shape(pos), dtype=np.float32)
        den = np.zeros(box_shape(pos), dtype=np.float32)
        for r in live:
            sub = box_intersect(r.box, pos)
            rel = relative(sub, pos)
            vals = np.asarray(_regions.logits_to_volume(r.logits, r.region, self.volume, box=sub),
                              dtype=np.float32)
            w = self.voxel_weights(r, sub)
            num[rel] += w * vals
            den[rel] += w
        np.greater(num, thr * den, out=out, casting="unsafe")
        out &= (den > 0)
        return out

    def _render_guided(self, live: Sequence, pos: Box, clicks: Sequence) -> np.ndarray:
        """Guided mode: the merged logits on ``pos`` widened by what the refinement reads, refined with the CT
        (:func:`~SAM3DSegmentLib.inference.guided.guided_mask`); returns the mask (bool) on ``pos``."""
        vol = self.volume
        spacing_kji = np.asarray(vol.spacing, dtype=np.float64)[::-1]
        m = self.guided.margin_voxels(spacing_kji)
        ext = box_intersect(tuple(slice(s.start - g, s.stop + g) for s, g in zip(pos, m)),
                            tuple(slice(0, n) for n in vol.array.shape))
        bound = max(_guided.gradient_bound(r.logits - self.threshold, [self.cell_mm] * 3) for r in live)
        if bound == 0:   # no boundary inside any region's logits: nothing to refine
            return self._render_plain(live, pos)
        if len(live) == 1:
            logits = _regions.logits_to_volume(live[0].logits, live[0].region, vol, box=ext)
            logits -= np.float32(self.threshold)
        else:
            num = np.zeros(box_shape(ext), dtype=np.float32)
            den = np.zeros(box_shape(ext), dtype=np.float32)
            for r in live:
                sub = box_intersect(r.box, ext)
                if sub is None:
                    continue
                rel = relative(sub, ext)
                vals = np.asarray(_regions.logits_to_volume(r.logits, r.region, vol, box=sub), dtype=np.float32)
                w = self.voxel_weights(r, sub)
                num[rel] += w * vals
                den[rel] += w
            valid = den > 0
            logits = np.full(num.shape, _regions.OUTSIDE_LOGIT, dtype=np.float32)
            logits[valid] = (num[valid] - self.threshold * den[valid]) / den[valid]
        start = np.array([ext[0].start, ext[1].start, ext[2].start], dtype=np.float64)
        guard = []
        for c in clicks:
            kji = vol.ras_to_ijk_points(np.asarray(c.ras, dtype=np.float64).reshape(1, 3))[0][::-1] - start
            guard.append((kji, bool(c.positive)))
        mask = _guided.guided_mask(logits, vol.array[ext], spacing_kji, self.guided, None, guard, bound)
        return mask[relative(pos, ext)]

    @staticmethod
    def changed_box(regions: List, n: int, old) -> Optional[Box]:
        """Voxels whose merged value may change when ``regions[n]`` replaced ``old`` (None: a new region)."""
        new = regions[n]
        dirty = box_union(None if old is None else old.pos_box, new.pos_box)
        for m, q in enumerate(regions):
            if m != n:
                dirty = box_union(dirty, box_intersect(q.pos_box, new.box))
        return dirty
