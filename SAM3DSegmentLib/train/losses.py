"""Segmentation losses of the reference training: Dice (sigmoid, squared denominators) + BCE-with-logits.

Shapes: ``logits`` and ``target`` are ``(B, 1, S, S, S)`` (the 128^3-upsampled logits and the binary
crop label). Both terms are means over the batch, so the loss of a batch equals the mean of the
per-sample losses (this is what makes a DDP run equal a single-process run on the same global batch).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dice_loss", "bce_loss", "seg_loss", "dice_score"]


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """``1 - (2 sum(p g) + s) / (sum(p^2) + sum(g^2) + s)`` per sample, averaged (p = sigmoid)."""
    p = torch.sigmoid(logits.float()).flatten(1)
    g = target.float().flatten(1)
    inter = (p * g).sum(1)
    denom = (p * p).sum(1) + (g * g).sum(1)
    return (1.0 - (2.0 * inter + smooth) / (denom + smooth)).mean()


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits, per sample mean over voxels, averaged over the batch."""
    per = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    return per.flatten(1).mean(1).mean()


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return dice_loss(logits, target) + bce_loss(logits, target)


@torch.no_grad()
def dice_score(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Hard Dice per sample of boolean/0-1 tensors ``(B, ...)``; 1.0 when both are empty."""
    p = pred.bool().flatten(1)
    g = target.bool().flatten(1)
    inter = (p & g).sum(1).double()
    denom = p.sum(1).double() + g.sum(1).double()
    return torch.where(denom > 0, 2.0 * inter / denom.clamp_min(1), torch.ones_like(denom))
