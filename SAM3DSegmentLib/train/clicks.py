"""Click simulation for training and evaluation on model crops (arrays indexed in the crop's (a, b, c)).

Two samplers, both taking the CURRENT PREDICTION as a boolean mask (``logits > 0``, i.e.
``sigmoid > 0.5``; the reference thresholds logits at 0.5, a defect not copied here):

* ``"deepest"`` (RITM, used by the published first click and by our evaluation): the first click is the
  deepest point of the object (Euclidean distance transform); later clicks go to the deepest point of
  the larger (deeper) error region, positive in FN = gt & ~pred, negative in FP = pred & ~gt. The
  single-sample maths lives in :mod:`SAM3DSegmentLib.eval.clicker` (shared with the evaluation tools).
* ``"random"`` (the reference's training sampler): one voxel drawn uniformly from FN | FP; positive when
  it is in FN. Deterministic given the numpy ``Generator``.

Points come back as continuous voxel indices in the crop's own axis order (what
``model.predict_low_res`` takes); label 1 positive, 0 negative, -1 "no click" (nothing to correct).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from ..eval.clicker import SimulatedClick, deepest_point, next_click_index, random_error_click

__all__ = ["SimulatedClick", "deepest_point", "next_click_index", "random_error_click",
           "prediction_mask", "sample_click", "sample_clicks"]


def prediction_mask(logits):
    """Boolean prediction from logits: ``logits > 0`` (== ``sigmoid(logits) > 0.5``). Works on torch or numpy."""
    return logits > 0


def sample_click(gt: np.ndarray, pred: Optional[np.ndarray], mode: str = "random",
                 rng: Optional[np.random.Generator] = None,
                 spacing: Optional[Sequence[float]] = None) -> Optional[SimulatedClick]:
    """One corrective click for one crop (``gt``, ``pred`` 3D bool arrays, same shape); None if perfect."""
    if mode == "deepest":
        return next_click_index(gt, pred, spacing)
    if mode == "random":
        if rng is None:
            raise ValueError("the random click sampler needs a numpy Generator (seed it for reproducibility)")
        return random_error_click(gt, pred, rng)
    raise ValueError(f"click mode must be 'deepest' or 'random', got {mode!r}")


def _random_click_torch(gt, pred, rng: np.random.Generator):
    """Uniform voxel of ``gt ^ pred`` for one sample using torch (stays on the tensor's device)."""
    import torch

    err = (gt ^ pred).reshape(-1)
    n = int(err.sum())
    if n == 0:
        return None
    r = int(rng.integers(n))
    flat = int(torch.searchsorted(err.to(torch.int32).cumsum(0), torch.tensor(r + 1, device=err.device,
                                                                              dtype=torch.int64)))
    idx = np.unravel_index(flat, tuple(gt.shape))
    return SimulatedClick(tuple(int(v) for v in idx), bool(gt.reshape(-1)[flat]))


def sample_clicks(gt, pred, mode: str, rngs: Sequence[np.random.Generator]) -> Tuple[np.ndarray, np.ndarray]:
    """Batched clicks: ``gt``, ``pred`` torch bool ``(B, S, S, S)``. Returns ``points (B, 3)`` float32 and
    ``labels (B,)`` int64 (1 positive, 0 negative, -1 where the prediction is already perfect)."""
    b = gt.shape[0]
    points = np.zeros((b, 3), dtype=np.float32)
    labels = np.full((b,), -1, dtype=np.int64)
    for i in range(b):
        if mode == "random":
            click = _random_click_torch(gt[i], pred[i], rngs[i])
        else:
            click = sample_click(gt[i].cpu().numpy(), pred[i].cpu().numpy(), "deepest")
        if click is not None:
            points[i] = click.ijk
            labels[i] = 1 if click.positive else 0
    return points, labels
