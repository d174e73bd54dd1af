"""Starting an object from an existing mask (``Session.set_initial_mask``): refine a segment with clicks.

The initial mask lives on the session volume's grid (a mask on another grid is resampled onto it by nearest
neighbour in physical space, :func:`SAM3DSegmentLib.io.volumes.resample_like`), stored cropped to its voxels.
It enters the model as the previous-mask prompt (the 32^3 low-res logits the decoder takes with a click) of
every region of the object that it touches, in place of the zeros of a fresh object; regions it does not
touch start from zeros. The prompt is computed in physical space: the mask is sampled (trilinear, i.e. as a
soft occupancy) at the region's 1.5 mm voxel centres, then turned into low-res logits by
``SessionOptions.init_prompt`` (:data:`INIT_PROMPTS`):

* ``"binary"`` (default): ``+init_logit`` where ``p > 0.5``, else ``-init_logit``, with ``p`` the fraction of
  the low-res cell inside the mask;
* ``"occupancy"``: ``init_logit * (2 p - 1)``;
* ``"distance"``: the signed distance to the mask's surface (mm, positive inside, on a grid twice as coarse as
  the region's) averaged over each low-res cell, divided by ``init_width_mm`` and clipped to [-1, 1], times
  ``init_logit``;
* ``"zeros"``: no prompt from the mask (each region starts as for a fresh object; the mask is still shown
  where the model does not look).

Why binary is the default (Dice after 0 to 3 clicks with the demo model, ``benchmarks/bench_refine.py``):
docs/refine.md.

The object's mask is the initial mask wherever no region of the object covers a voxel (voxel centre inside
the region), and the model's merged mask where one does (:meth:`InitialMask.compose`): voxels outside the
regions the model sees keep the initial mask exactly. Click honouring keeps every mask component that holds
such an untouched voxel (:meth:`InitialMask.anchors`): an exclude click never drops the part of the object the
model did not see. Such an object does not grow into neighbouring regions (:mod:`~SAM3DSegmentLib.inference.growth`)
unless ``SessionOptions.init_extend``: its mask already covers it there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import numpy as np
from scipy import ndimage

from . import regions as _regions
from .cache import region_key
from ..core.boxes import Box, absolute, box_intersect, box_shape, mask_bounds, normalise_box, read_box, relative
from ..core.geometry import GeometryError, Volume
from .options import INIT_PROMPTS

__all__ = ["INIT_PROMPTS", "InitialMask"]


def _on_grid(mask, volume: Volume, box: Optional[Sequence[slice]]) -> np.ndarray:
    """``mask`` as a bool array on ``box`` (the whole grid when None) of ``volume``'s grid."""
    shape = volume.array.shape
    if isinstance(mask, Volume):
        if box is not None:
            raise ValueError("give box only with a numpy array (a Volume carries its own grid)")
        if not mask.same_grid(volume, atol=1e-6):
            from ..io.volumes import resample_like

            mask = resample_like(mask, volume, "nearest")
        return np.asarray(mask.array) != 0
    arr = np.asarray(mask)
    want = shape if box is None else box_shape(box)
    if arr.ndim != 3 or arr.shape != tuple(want):
        where = "the volume grid" if box is None else f"the box {[(s.start, s.stop) for s in box]}"
        raise GeometryError(f"initial mask of shape {arr.shape} does not match {where} {tuple(want)} (k, j, i); "
                            "give a mask on the image's grid, or a Volume on any grid")
    if arr.dtype.kind not in "biuf":
        raise GeometryError(f"initial mask has non-numeric voxels (dtype {arr.dtype}); give 0/1 voxels")
    return arr != 0


def _blocks(a: np.ndarray, n: int) -> np.ndarray:
    """The mean of each n x n x n block of a cubic array (a side a multiple of n)."""
    m = a.shape[0] // n
    return a.reshape(m, n, m, n, m, n).mean(axis=(1, 3, 5))


@dataclass
class InitialMask:
    """An object's initial mask on the session grid: ``array`` (uint8, read-only) on ``box``, and the way it
    prompts the model (``prompt``, ``logit``, ``width_mm``; see the module docstring)."""

    volume: Volume
    box: Box
    array: np.ndarray
    prompt: str = "binary"
    logit: float = 8.0
    width_mm: float = 6.0
    low_res_size: int = 32
    _prompts: Dict[tuple, Optional[np.ndarray]] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, mask, volume: Volume, options, low_res_size: int,
           box: Optional[Sequence[slice]] = None) -> "InitialMask":
        """From a ``Volume`` on any grid, a (k, j, i) array on ``volume``'s grid, or an array on ``box`` of
        it. Raises ``GeometryError`` when no voxel of the mask lies in the volume."""
        if box is not None:
            box = normalise_box(box)
            if any(s.start < 0 or s.stop > n or s.stop <= s.start for s, n in zip(box, volume.array.shape)):
                raise GeometryError(f"initial mask box {[(s.start, s.stop) for s in box]} is not inside the volume "
                                    f"grid {volume.array.shape} (k, j, i)")
        on = _on_grid(mask, volume, box)
        nz = mask_bounds(on)
        if nz is None:
            raise GeometryError("the initial mask has no voxel inside the image (it is empty, or on a grid "
                                "that does not overlap the image); give a mask of the object to refine")
        crop = np.ascontiguousarray(on[nz], dtype=np.uint8)
        crop.flags.writeable = False
        full = absolute(nz, box) if box is not None else nz
        return cls(volume, full, crop, options.init_prompt, float(options.init_logit),
                   float(options.init_width_mm), int(low_res_size))

    # ------------------------------------------------------------------ the mask
    def get(self, box: Box) -> np.ndarray:
        """The initial mask on ``box`` (a new uint8 array)."""
        return read_box(self.array, self.box, box)

    def covered(self, regions: Sequence, box: Box) -> np.ndarray:
        """bool on ``box``: voxels whose centres lie inside one of ``regions`` (``RegionState``), the test
        the paste-back uses (:func:`~SAM3DSegmentLib.inference.regions.logits_to_volume`)."""
        cov = np.zeros(box_shape(box), dtype=bool)
        for rs in regions:
            sub = box_intersect(rs.box, box)
            if sub is None:
                continue
            ones = np.ones((self.low_res_size,) * 3, dtype=np.float32)
            inside = _regions.logits_to_volume(ones, rs.region, self.volume, box=sub) > 0
            cov[relative(sub, box)] |= inside
        return cov

    def compose(self, model_mask: np.ndarray, regions: Sequence, box: Box) -> np.ndarray:
        """The object's mask on ``box``: ``model_mask`` (the merged model output there) where a region covers
        a voxel, the initial mask elsewhere (a new uint8 array)."""
        return np.where(self.covered(regions, box), model_mask, self.get(box)).astype(np.uint8)

    def changed_box(self, before: Sequence, after: Sequence) -> Optional[Box]:
        """Voxels of the initial mask whose cover changes when the object's regions go from ``before`` to
        ``after`` (regions added or removed: the initial mask inside their footprints)."""
        keys_before, keys_after = {rs.key for rs in before}, {rs.key for rs in after}
        out = None
        for rs in list(before) + list(after):
            if (rs.key in keys_before) != (rs.key in keys_after):
                hit = box_intersect(rs.box, self.box)
                if hit is not None:
                    out = hit if out is None else tuple(slice(min(a.start, b.start), max(a.stop, b.stop))
                                                        for a, b in zip(out, hit))
        return out

    def anchors(self, regions: Sequence):
        """``(box, bool array)``: the initial mask's voxels that no region covers (the part of the object the
        model does not see; click honouring never drops a component holding one)."""
        return self.box, (self.array > 0) & ~self.covered(regions, self.box)

    # ------------------------------------------------------------------ the prompt
    def region_prompt(self, region) -> Optional[np.ndarray]:
        """The previous-mask prompt (float32 (s, s, s) logits, read-only) of ``region`` from the initial mask;
        None when the region's footprint misses the mask or ``prompt`` is ``"zeros"`` (start from zeros)."""
        if self.prompt == "zeros":
            return None
        key = region_key(region)
        if key not in self._prompts:
            self._prompts[key] = self._compute(region)
        return self._prompts[key]

    def _compute(self, region) -> Optional[np.ndarray]:
        if box_intersect(normalise_box(_regions.footprint(self.volume, region)), self.box) is None:
            return None
        origin = np.eye(4)
        origin[:3, 3] = [self.box[2].start, self.box[1].start, self.box[0].start]
        crop = Volume(self.array, self.volume.ijk_to_ras @ origin)
        occ = _regions.sample_volume(crop, region)                 # soft occupancy at the region's voxel centres
        s = self.low_res_size
        f = region.size // s

        if self.prompt == "distance":
            # signed distance on a grid twice as coarse as the region's (3 mm for 1.5 mm regions): 8x less work
            # for the distance transform, well within the width over which the distance is used
            g = 2 if f % 2 == 0 else 1
            inside = _blocks(occ, g) > 0.5
            if inside.all() or not inside.any():
                unit = np.full((s, s, s), 1.0 if inside.all() else -1.0)
            else:
                sd = np.where(inside, ndimage.distance_transform_edt(inside) - 0.5,
                              0.5 - ndimage.distance_transform_edt(~inside)) * (region.spacing * g)
                unit = np.clip(_blocks(sd, f // g) / self.width_mm, -1.0, 1.0)
        elif self.prompt == "occupancy":
            unit = 2.0 * _blocks(occ, f) - 1.0
        else:
            unit = np.where(_blocks(occ, f) > 0.5, 1.0, -1.0)
        out = (self.logit * unit).astype(np.float32)
        out.flags.writeable = False
        return out

    def prompt_arrays(self) -> list:
        """The prompts computed so far (one per region it touched; kept for replays and undo)."""
        return [p for p in self._prompts.values() if p is not None]
