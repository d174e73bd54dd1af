"""A model-free oracle in place of the network: each prompt is decoded to the TRUE object under it.

It validates the automatic mask generator's machinery (candidates, regions, stability, filters, paste-back,
non-maximum suppression) independently of any model's quality: with the oracle, a missed object is the
machinery's fault (no prompt on it, a filter, the output resolution), not the model's.

What it returns is what a perfect SAM-Med3D-family decoder could return through the same interface: 32^3
low-res logits over the 128^3 region (6 mm cells at 1.5 mm), chosen so that the engine's trilinear upsampling of
them comes closest (least squares, one pseudo-inverse per axis) to ``gain`` times the object's signed distance
(mm, positive inside, clipped to ``soft_mm`` inside and ``margin_mm`` outside) on the region grid. The engine
upsamples them like any model's logits, so objects much smaller than a cell can shrink, grow or vanish: an
honest limit of the model's output grid, not of the oracle. Prompts on label 0 (or on ``background_labels``)
give no object. No predicted IoU (None).

Use: ``AutomaticMaskGenerator3D(region_decoder=OracleRegionDecoder(labels), options=...)``.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from ..core.geometry import Volume
from ..core.interp import resize_matrix
from ..inference.cache import region_key

__all__ = ["OracleRegionDecoder"]


class OracleRegionDecoder:
    """``labels``: an integer label map (one label per object, 0 = nothing) in physical space (any grid)."""

    def __init__(self, labels: Volume, low_res_size: int = 32, gain: float = 10.0,
                 background_labels: Sequence[int] = (0,), margin_mm: float = 12.0, soft_mm: float = 3.0,
                 refine_steps: int = 300):
        if np.asarray(labels.array).dtype.kind not in "biu":
            raise ValueError(f"the oracle needs an integer label map, got dtype {labels.array.dtype}")
        self.labels = labels
        self.low_res_size = int(low_res_size)
        self.gain = float(gain)
        self.background = {int(v) for v in background_labels}
        self.margin_mm = float(margin_mm)
        self.encode_s = self.decode_s = 0.0
        self.encoded = 0
        self._grid: Dict[tuple, np.ndarray] = {}
        self._logits: Dict[Tuple[tuple, int], np.ndarray] = {}
        self.refine_steps, self.refine_rate, self.refine_max_voxels = int(refine_steps), 1.0, 32
        self.soft_mm = float(soft_mm)

    def __call__(self, volume: Volume, volume_key: str) -> "OracleRegionDecoder":
        """The generator's ``region_decoder`` factory: the same oracle for every volume."""
        return self

    def region_labels(self, region) -> np.ndarray:
        """The label map sampled (nearest voxel) at the region's voxel centres, ``[a, b, c]``; 0 outside."""
        key = region_key(region)
        if key not in self._grid:
            s = int(region.size)
            m = self.labels.ras_to_ijk @ region.region_to_ras
            idx = np.arange(s, dtype=np.float64)
            ijk = [m[r, 0] * idx[:, None, None] + m[r, 1] * idx[None, :, None] + m[r, 2] * idx[None, None, :]
                   + m[r, 3] for r in range(3)]
            n = self.labels.shape_ijk
            ijk = [np.floor(v + 0.5).astype(np.int64) for v in ijk]
            inside = np.ones((s, s, s), dtype=bool)
            for v, nv in zip(ijk, n):
                inside &= (v >= 0) & (v < nv)
            out = np.zeros((s, s, s), dtype=np.int64)
            out[inside] = np.asarray(self.labels.array)[ijk[2][inside], ijk[1][inside], ijk[0][inside]]
            self._grid[key] = out
            self.encoded += 1
        return self._grid[key]

    def _fit(self, target: np.ndarray, inside: np.ndarray, f: int) -> np.ndarray:
        """Low-res logits whose upsampling fits ``target`` (least squares); for small boxes (at most
        ``refine_max_voxels`` a side) then up to ``refine_steps`` gradient steps on the logistic loss of the
        upsampled logits against ``inside``, keeping the step whose mask (upsampled logits > 0) has the best IoU
        with ``inside`` (stopping after 40 steps without a better one)."""
        ups = [resize_matrix(n, n // f, dtype=np.float64) for n in target.shape]
        pinv = [np.linalg.pinv(u) for u in ups]
        cells = _separable(pinv, target)
        if max(target.shape) > self.refine_max_voxels or not inside.any():
            return cells
        y = np.where(inside, 1.0, -1.0)
        downs = [u.T for u in ups]
        best, best_iou, since = cells, -1.0, 0
        for _ in range(self.refine_steps + 1):
            u = _separable(ups, cells)
            pos = u > 0
            iou = np.count_nonzero(pos & inside) / max(np.count_nonzero(pos | inside), 1)
            if iou > best_iou:
                best, best_iou, since = cells, iou, 0
            else:
                since += 1
            if iou == 1.0 or since > 40:
                break
            g = -y / (1.0 + np.exp(np.clip(y * u, -50.0, 50.0)))
            cells = cells - self.refine_rate * _separable(downs, g)
        return best

    def _object_logits(self, region, label: int) -> np.ndarray:
        from scipy import ndimage

        key = (region_key(region), int(label))
        if key in self._logits:
            return self._logits[key]
        lab = self.region_labels(region)
        s, lr = int(region.size), self.low_res_size
        f = s // lr
        sp = float(region.spacing)
        far = -self.gain * self.margin_mm
        mask = lab == label
        pad = 2 * f
        nz = [np.flatnonzero(mask.any(axis=tuple(b for b in range(3) if b != a))) for a in range(3)]
        lo = [max(0, (max(0, int(n[0]) - pad) // f) * f) for n in nz]
        hi = [min(s, -(-min(s, int(n[-1]) + 1 + pad) // f) * f) for n in nz]
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        sub = mask[box]
        inside = ndimage.distance_transform_edt(sub) * sp
        outside = ndimage.distance_transform_edt(~sub) * sp
        sdf = np.where(sub, inside - sp / 2.0, -(outside - sp / 2.0))
        target = self.gain * np.clip(sdf, -self.margin_mm, self.soft_mm)
        cells = self.gain * self._fit(target / self.gain, sub, f)
        out = np.full((lr, lr, lr), far, dtype=np.float32)
        out[lo[0] // f:hi[0] // f, lo[1] // f:hi[1] // f, lo[2] // f:hi[2] // f] = cells
        out.flags.writeable = False
        self._logits[key] = out
        return out

    def decode(self, region, points_abc: np.ndarray) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        lab = self.region_labels(region)
        s = int(region.size)
        pts = np.clip(np.floor(np.asarray(points_abc, dtype=np.float64).reshape(-1, 3) + 0.5), 0, s - 1).astype(int)
        lr = self.low_res_size
        out = np.empty((len(pts), lr, lr, lr), dtype=np.float32)
        for n, p in enumerate(pts):
            label = int(lab[p[0], p[1], p[2]])
            if label in self.background:
                out[n] = -self.gain * self.margin_mm
            else:
                out[n] = self._object_logits(region, label)
        return out, None


def _separable(mats, x: np.ndarray) -> np.ndarray:
    """``x`` with ``mats[a]`` applied along axis ``a`` (a separable linear map, BLAS matrix products)."""
    x = np.tensordot(mats[0], x, axes=(1, 0))
    x = np.tensordot(mats[1], x, axes=(1, 1)).transpose(1, 0, 2)
    return np.tensordot(x, mats[2], axes=(2, 1))
