"""The reference interaction loop of one batch: clicks, mask-only steps, fed-back logits, the summed loss.

Per micro-batch (:func:`InteractiveLoss`): the image encoder runs once; then ``num_click_steps`` decoder
steps. Step 0 clicks inside the object (the error region of an empty prediction); every later step samples
one click from the error region of the CURRENT prediction (``logits > 0`` on the upsampled logits), except
one random step in ``mask_only_range`` and the last step, which run with no points (mask only). The decoder
sees the newest click only (``loop.feed = "newest-click"``, the reference's training) or every click so far
(``"all-clicks"``). The previous low-res logits are fed back (not detached, as the reference, unless ``loop.detach_feedback``). Loss = sum
over steps of Dice (sigmoid, squared denominators) + BCE-with-logits on the upsampled logits.

Determinism: a sample's clicks are keyed by ``(seed, epoch, dataset index)``, the mask-only step by
``(seed, global micro-batch number)``: resuming continues the same sequence exactly, and a DDP run draws
the same clicks as one process with the same global batch.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

from ..core.click_protocols import ALL_CLICKS, click_protocol
from .config import TrainConfig
from .device import autocast

__all__ = ["mask_only_steps", "interact", "InteractiveLoss", "evaluate"]


def mask_only_steps(n_steps: int, lo_hi: Sequence[int], rng: np.random.Generator) -> set:
    """The steps run without points: one random step in [lo, hi] (kept inside 1..n-2) and the last one."""
    out = set()
    if n_steps >= 2:
        out.add(n_steps - 1)
    lo, hi = max(1, int(lo_hi[0])), min(n_steps - 2, int(lo_hi[1]))
    if hi >= lo:
        out.add(int(rng.integers(lo, hi + 1)))
    return out


def interact(model, emb, label, n_steps: int, mask_only: set, click_mode: str, rngs, feed: str = "newest-click",
             detach_feedback: bool = False, compute_loss: bool = True):
    """Run the click loop on one batch. ``emb`` from ``model.image_encoder``; ``label`` (B,1,S,S,S) 0/1.

    Returns ``(loss_sum or None, final boolean prediction (B,S,S,S), first-step prediction)``.
    """
    import torch
    import torch.nn.functional as F

    from .clicks import sample_clicks
    from .losses import seg_loss

    b = label.shape[0]
    size = label.shape[-1]
    low_size = size // 4
    gt = label[:, 0] > 0.5
    pred = torch.zeros_like(gt)
    first = None
    low = torch.zeros((b, 1, low_size, low_size, low_size), device=label.device, dtype=emb.dtype)
    hist_p: List[np.ndarray] = []
    hist_l: List[np.ndarray] = []
    total = None
    for t in range(n_steps):
        if t in mask_only:
            points = labels = None
        else:
            p, l = sample_clicks(gt, pred, click_mode, rngs)
            hist_p.append(p)
            hist_l.append(l)
            if click_protocol(feed, "feed") == ALL_CLICKS:
                p, l = np.stack(hist_p, 1), np.stack(hist_l, 1)
            else:
                p, l = p[:, None], l[:, None]
            points = torch.as_tensor(p, device=label.device, dtype=torch.float32)
            labels = torch.as_tensor(l, device=label.device, dtype=torch.long)
        prev = low.detach() if detach_feedback else low
        low = model.predict_low_res(emb, points, labels, prev)
        up = F.interpolate(low.float(), size=(size, size, size), mode="trilinear", align_corners=False)
        if compute_loss:
            step_loss = seg_loss(up, label)
            total = step_loss if total is None else total + step_loss
        pred = (up.detach() > 0)[:, 0]  # sigmoid > 0.5 (NOT logits > 0.5, the reference's defect)
        if first is None:
            first = pred
    return total, pred, first


class _Interactive:  # lazily created nn.Module subclass (torch is imported lazily)
    cls = None


def InteractiveLoss(model, cfg: TrainConfig, encoder_frozen: bool):
    """An ``nn.Module`` wrapping ``model`` whose forward runs the whole interaction loop and returns the
    summed loss; DDP wraps this module (its forward must contain every use of the parameters)."""
    import torch
    from torch import nn

    if _Interactive.cls is None:
        class _InteractiveLoss(nn.Module):
            def __init__(self, model, cfg, encoder_frozen):
                super().__init__()
                self.model = model
                self.cfg = cfg
                self.encoder_frozen = encoder_frozen

            def forward(self, image, label, epochs, indices, micro_key: int):
                lc = self.cfg.loop
                if self.encoder_frozen:
                    with torch.no_grad():
                        emb = self.model.image_encoder(image)
                else:
                    emb = self.model.image_encoder(image)
                seed = int(self.cfg.seed)
                rngs = [np.random.default_rng([seed, int(e), int(i), 17]) for e, i in zip(epochs, indices)]
                mask_only = mask_only_steps(lc.num_click_steps, lc.mask_only_range,
                                             np.random.default_rng([seed, 1000003, int(micro_key)]))
                loss, pred, _ = interact(self.model, emb, label, lc.num_click_steps, mask_only, lc.click_mode,
                                         rngs, lc.feed, lc.detach_feedback)
                return loss
        _Interactive.cls = _InteractiveLoss
    return _Interactive.cls(model, cfg, encoder_frozen)


def evaluate(model, loader, n_steps: int, click_mode: str, seed: int, device, amp_dtype=None,
             feed: str = "newest-click") -> Dict[str, float]:
    """Mean Dice (inside the crop) after the first click and after ``n_steps`` click steps (clicks at
    every step, no mask-only steps)."""
    import torch

    from .losses import dice_score

    was_training = model.training
    model.eval()
    finals: List[float] = []
    firsts: List[float] = []
    with torch.no_grad(), autocast(device, amp_dtype):
        for batch in loader:
            image = batch["image"].to(device)
            label = batch["label"].to(device)
            rngs = [np.random.default_rng([seed, 999, int(i)]) for i in batch["index"]]
            emb = model.image_encoder(image)
            _, pred, first = interact(model, emb, label, n_steps, set(), click_mode, rngs, feed,
                                      compute_loss=False)
            gt = label[:, 0] > 0.5
            finals += dice_score(pred, gt).tolist()
            firsts += dice_score(first, gt).tolist()
    model.train(was_training)
    return {"dice": float(np.mean(finals)) if finals else float("nan"),
            "dice_first_click": float(np.mean(firsts)) if firsts else float("nan"), "n": len(finals)}
