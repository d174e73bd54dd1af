"""The 3DSAM-adapter's own evaluation protocol (``sam3d evaluate --protocol 3dsam``), beside the engine protocol.

What the 3DSAM-adapter publication evaluates (docs/evaluation.md): N positive points drawn uniformly from the
ground truth at 1 mm, a 128³ crop at 1 mm centred on the points' bounding box, ONE pass of the model with all
the points, Dice and NSD at a 5 mm tolerance. Here, per target of a case:

1. the ground truth is resampled (trilinear, > 0.5) onto a 1 mm grid with the region axes of
   :mod:`~SAM3DSegmentLib.inference.regions` covering its bounding box, and ``config.clicks`` points are drawn
   uniformly (without replacement, a seed per case and target) from its voxels;
2. the crop is the backend's region (``image_size``³ at ``spacing_mm``, 128³ at 1 mm) centred on the centre of
   the points' bounding box, normalised as the engine does (``backend.intensity``), encoded once;
3. for n = 1..N the model decodes the first n points (those inside the crop) in one pass: the row of click n
   is that one-pass result, so ``per_click`` is Dice against the number of points, not an interactive
   sequence;
4. Dice, NSD (at :data:`NSD_TOLERANCE_MM`, whatever ``--nsd-tolerance`` says) and HD95 are computed inside
   the crop at its 1 mm spacing, against the ground truth resampled onto the crop.

Only models without a previous-mask input and with unlabelled points (the 3DSAM-adapter family) are scored
this way; for SAM-Med3D the comparable protocol is ``legacy``.
"""
from __future__ import annotations

import time
import zlib
from typing import List

import numpy as np

from ..inference.regions import Region, model_input, sample_volume
from .cases import Case, EvaluationError
from .metrics import score
from .protocols import POINTS_LABEL, _row

__all__ = ["POINTS_LABEL", "NSD_TOLERANCE_MM", "evaluate_points", "draw_points"]

NSD_TOLERANCE_MM = 5.0


def draw_points(volume, gt: np.ndarray, n: int, rng: np.random.Generator, spacing: float = 1.0) -> np.ndarray:
    """``n`` RAS points drawn uniformly (without replacement; fewer when the object is smaller) from the voxels of
    ``gt`` (bool ``[k, j, i]`` on ``volume``'s grid) resampled onto a ``spacing`` mm grid; ``(n, 3)`` RAS mm."""
    kji = np.argwhere(gt)
    lo, hi = kji.min(axis=0), kji.max(axis=0)
    corners = np.array([[i, j, k] for i in (lo[2], hi[2]) for j in (lo[1], hi[1]) for k in (lo[0], hi[0])], float)
    ras = volume.ijk_to_ras_points(corners)
    centre = (ras.min(axis=0) + ras.max(axis=0)) / 2.0
    extent = np.max(ras.max(axis=0) - ras.min(axis=0)) + np.max(volume.spacing)   # voxel centres -> edges
    grid = Region.around(volume, centre, size=int(np.ceil(extent / spacing)) + 2, spacing=spacing)
    fine = sample_volume(volume.with_array(gt.view(np.uint8)), grid) > 0.5
    idx = np.argwhere(fine)
    if len(idx) == 0:   # thinner than the 1 mm grid resolves: fall back to the original voxels
        return volume.ijk_to_ras_points(kji[rng.choice(len(kji), size=min(n, len(kji)), replace=False)][:, ::-1]
                                        .astype(float))
    pick = idx[rng.choice(len(idx), size=min(n, len(idx)), replace=False)]
    return grid.index_to_ras(pick.astype(float))


def _seed(*parts) -> int:
    return zlib.crc32("\x1f".join(str(p) for p in parts).encode("utf-8")) & 0x7FFFFFFF


def evaluate_points(backend, case: Case, config, log=lambda m: None) -> List[dict]:
    """The ``3dsam`` protocol for every target of ``case`` (rows as :func:`.protocols.evaluate_engine`'s)."""
    if getattr(backend, "supports_mask_prompt", True) or getattr(backend, "supports_exclude", True):
        raise EvaluationError("--protocol 3dsam is the 3DSAM-adapter's protocol (unlabelled points, one pass); "
                              "this model is not of that family: use --protocol engine or legacy")
    size = int(backend.image_size)
    spacing = float(getattr(backend, "spacing_mm", 1.0))
    intensity = getattr(backend, "intensity", None)
    rows: List[dict] = []
    for target, gt in case.targets.items():
        gt = np.asarray(gt, dtype=bool)
        if not gt.any():
            log(f"  {case.name} / {target}: empty ground truth, skipped")
            continue
        rng = np.random.default_rng(_seed(config.seed, case.name, target))
        pts_ras = draw_points(case.image, gt, int(config.clicks), rng, spacing)
        centre = (pts_ras.min(axis=0) + pts_ras.max(axis=0)) / 2.0
        crop = Region.around(case.image, centre, size=size, spacing=spacing)
        crop_gt = sample_volume(case.image.with_array(gt.view(np.uint8)), crop) > 0.5
        kw = {} if intensity is None else {"intensity": intensity}
        t0 = time.perf_counter()
        emb = backend.encode(model_input(case.image, crop, clamp_hu=config.clamp_hu, **kw))
        encode_s = time.perf_counter() - t0
        idx = crop.ras_to_index(pts_ras)
        inside = crop.contains_index(idx)
        for n in range(1, int(config.clicks) + 1):
            t0 = time.perf_counter()
            use = idx[:n][inside[:n]]
            if len(use):
                pred = np.asarray(backend.decode(emb, use, np.ones(len(use), dtype=np.int64), None)) > 0.0
            else:
                pred = np.zeros_like(crop_gt)
            dt = time.perf_counter() - t0 + (encode_s if n == 1 else 0.0)
            s = score(pred, crop_gt, (spacing,) * 3, NSD_TOLERANCE_MM)
            point = None if n > len(idx) else np.rint(idx[n - 1]).astype(int)
            rows.append(_row("3dsam", case.name, target, n, True if point is not None else None, point, s, dt,
                             int(n == 1), 1))
        log(f"  3dsam   {case.name} / {target}: crop Dice " +
            " ".join(f"{r['dice']:.3f}" for r in rows[-int(config.clicks):]))
    return rows
