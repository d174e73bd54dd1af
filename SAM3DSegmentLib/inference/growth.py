"""Growing an object beyond one region: the 50 %-overlap extension (``SessionOptions.extend``).

SAM-Med3D sees a 128^3 region (192 mm at 1.5 mm); larger objects are cut at its faces
(docs/reference/SAM_MED3D.md, section 5 item 7: the paper describes a 50 %-overlap sliding-window extension). After a decode,
if the object's mask in the region touches one of its faces (any positive voxel of the 128^3 upsampled logits
in the two outermost voxel layers of the face, lying inside the volume and belonging to the object: the
positive low-res cells connected to a positive click or seed of the object in that region; speckles elsewhere
do not count; nor does a face that is positive over more than ``extend_max_face_fill`` of its in-volume area,
a leak rather than a cross-section), a neighbouring region shifted by half the region size across that face
is added (unless the object already has a region within a quarter region of that place). It is prompted with
ONE positive point, the face pixel with the largest upsampled logit (the most confident point of the mask's
cross-section, two voxels inside the old region, i.e. near the centre plane of the new region), and, as mask
input, the old region's logits resampled into the new region's low-res grid (the overlapping half; zeros
elsewhere, or the prompt of the object's initial mask there, :mod:`~SAM3DSegmentLib.inference.prior`). The new
region is then checked in turn, breadth-first, until no mask touches a new face or the object has
``max_regions`` regions; ``MaskUpdate.truncated`` (and ``timings["max_regions_reached"]``) says when the limit
cut the object. ``max_regions`` bounds extension only: a user click outside every region of
the object always gets its own region.
"""
from __future__ import annotations

from collections import deque
from dataclasses import replace
from typing import List, Optional, Sequence

import numpy as np
from scipy import ndimage

from ..core.boxes import Box, box_union
from ..core.interp import nearest_index, rescale_index, resize_matrix, trilinear
from ..core.types import Click
from .predictor import RegionState, Stats

__all__ = ["RegionGrowth"]

_FACE_CROSS = ndimage.generate_binary_structure(2, 1)   # a face cell and its 4 edge neighbours


class RegionGrowth:
    """Adds neighbouring regions to an object whose mask reaches its regions' faces (see the module docstring).
    ``predictor``: :class:`~.predictor.RegionPredictor`; ``composer``: :class:`~.compose.MaskComposer`."""

    def __init__(self, predictor, composer, options):
        self.predictor = predictor
        self.composer = composer
        self.options = options
        self.volume = predictor.volume
        self.size = int(options.region_size)
        self.low_res_size = int(predictor.low_res_size)
        #: upsamples a low-res face (s, s) to the region's (size, size): ``m @ face @ m.T``
        self._face_matrix = resize_matrix(self.size, self.low_res_size, dtype=np.float64)

    def object_cells(self, rs: RegionState, clicks: Sequence[Click]) -> Optional[np.ndarray]:
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
        idx = self.predictor.region_index(rs, pts)
        idx = idx[rs.region.contains_index(idx)]
        if len(idx) == 0:
            return None
        cells = nearest_index(rescale_index(idx, s / self.size), s)
        labels, _ = ndimage.label(pos)
        hit = labels[cells[:, 0], cells[:, 1], cells[:, 2]]
        hit = hit[hit > 0]
        if hit.size == 0:
            return None
        return np.isin(labels, hit)

    def face_seed(self, rs: RegionState, axis: int, side: int,
                  comp: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
        """RAS of the most confident voxel of the object in the region's outer two voxel layers on one face
        (inside the volume), or None when the object does not touch that face. ``comp``: the object's
        low-res cells (:meth:`object_cells`); None = every positive cell."""
        s, size = self.low_res_size, self.size
        layer = 0 if side < 0 else s - 1
        face = np.take(rs.logits, layer, axis=axis).astype(np.float64)
        if face.max() <= self.options.threshold:
            return None
        m = self._face_matrix
        up = m @ face @ m.T                       # the size^2 face of the upsampled logits (layers 0,1 or S-2,S-1)
        hit = up > self.options.threshold
        if comp is not None:
            cf = np.take(comp, layer, axis=axis)
            if not cf.any():
                return None
            near = ndimage.binary_dilation(cf, structure=_FACE_CROSS)   # interpolation spills one cell over
            cell = nearest_index(rescale_index(np.arange(size), s / size), s)
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

    def covered(self, regions: Sequence[RegionState], candidate) -> bool:
        """True when one of ``regions`` has its centre within a quarter region of ``candidate``'s."""
        centre = (self.size - 1) / 2.0
        c_ras = np.asarray(candidate.index_to_ras(np.full((1, 3), centre)))
        for rs in regions:
            idx = self.predictor.region_index(rs, c_ras)[0]
            if np.max(np.abs(idx - centre)) < self.size / 4.0:
                return True
        return False

    def resample_logits(self, src: RegionState, dst_region, fill: Optional[np.ndarray] = None) -> np.ndarray:
        """``src`` low-res logits sampled at ``dst_region``'s low-res cell centres; where src has none, ``fill``
        (low-res logits of ``dst_region``), or 0 when it is None."""
        s = self.low_res_size
        lr = rescale_index(np.arange(s, dtype=np.float64), self.size / s)   # cell centres, region indices
        grid = np.stack(np.meshgrid(lr, lr, lr, indexing="ij"), axis=-1).reshape(-1, 3)
        ras = np.asarray(dst_region.index_to_ras(grid))
        src_lo = rescale_index(np.asarray(src.region.ras_to_index(ras)), s / self.size)
        vals = trilinear(src.logits, src_lo.T, extend=0.5, outside=np.nan, dtype=np.float64).reshape(s, s, s)
        return np.where(np.isnan(vals), 0.0 if fill is None else fill, vals).astype(np.float32)

    def extend(self, regions: List[RegionState], start: int, stats: Stats,
               clicks: Sequence[Click] = (), init=None) -> Optional[Box]:
        """Grow from ``regions[start]`` (``regions`` is extended in place); returns the box that changed.
        ``init``: the object's ``prior.InitialMask`` (or None)."""
        half = self.size // 2
        dirty = None
        queue = deque([start])
        while queue:
            rs = regions[queue.popleft()]
            if rs.logits is None or rs.pos_box is None:
                continue
            comp = self.object_cells(rs, clicks)
            if comp is None:
                continue
            for axis in range(3):
                for side in (-1, 1):
                    seed = self.face_seed(rs, axis, side, comp)
                    if seed is None:
                        continue
                    offset = np.zeros(3, dtype=int)
                    offset[axis] = side * half
                    cand = rs.region.shifted(offset)
                    if self.covered(regions, cand):
                        continue
                    if len(regions) >= self.options.max_regions:
                        stats.truncated = True
                        continue
                    new = replace(self.predictor.new_region(cand), seeds=((tuple(float(v) for v in seed), True),))
                    mask_in = self.resample_logits(rs, cand, None if init is None else init.region_prompt(cand))
                    new = self.predictor.decode(new, seed[None], np.array([1]), mask_in, stats)
                    regions.append(new)
                    dirty = box_union(dirty, self.composer.changed_box(regions, len(regions) - 1, None))
                    queue.append(len(regions) - 1)
        return dirty
