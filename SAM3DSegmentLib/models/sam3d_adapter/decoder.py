"""Multi-level decoder of the 3DSAM-adapter.

Each of the 4 encoder features (B, 256, g, g, g) (depth last) -> 2×[Conv3d 3³ + InstanceNorm + ReLU]
(256→128→128) -> ×2 trilinear (align_corners=True) to S/2; concatenated (4·128) with channel 0 of the
crop laid out (H, W, D) and down-sampled ×0.5 trilinearly (align_corners=False) -> Conv3d 3³ (513→128) +
IN + ReLU -> Conv3d 3³ (128→classes) -> ×2 trilinear (align_corners=True) to S -> permuted back to
(B, classes, D, H, W) logits (softmax over classes gives the probabilities). No conv has a bias, no
InstanceNorm has affine parameters.

``fuse`` is linear before its norm, so its output splits into a part from levels 0-2 and the image (which
do not depend on the clicks, see :meth:`MultiLevelDecoder.static_part`) plus a part from level 3.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import Sam3DAdapterConfig


def _conv_in_relu(cin: int, cout: int) -> List[nn.Module]:
    return [nn.Conv3d(cin, cout, kernel_size=3, padding=1, bias=False), nn.InstanceNorm3d(cout), nn.ReLU()]


def image_to_decoder(image: torch.Tensor) -> torch.Tensor:
    """(B, 1, D, H, W) crop -> channel 0 laid out (H, W, D), down-sampled ×0.5: (B, 1, S/2, S/2, S/2)."""
    return F.interpolate(image[:, :1].permute(0, 1, 3, 4, 2), scale_factor=0.5, mode="trilinear",
                         align_corners=False)


class MultiLevelDecoder(nn.Module):
    def __init__(self, config: Sam3DAdapterConfig) -> None:
        super().__init__()
        c = config
        self.half = c.image_size // 2
        n = c.decoder_dim
        self.level_blocks = nn.ModuleList(nn.Sequential(*_conv_in_relu(c.neck_dim, n), *_conv_in_relu(n, n))
                                          for _ in range(4))
        self.fuse = nn.Sequential(*_conv_in_relu(4 * n + 1, n))
        self.head = nn.Conv3d(n, c.num_classes, kernel_size=3, padding=1, bias=False)

    def level(self, i: int, feature: torch.Tensor) -> torch.Tensor:
        """Level ``i``'s branch: (B, 256, g, g, g) -> (B, 128, S/2, S/2, S/2)."""
        return F.interpolate(self.level_blocks[i](feature), size=(self.half,) * 3, mode="trilinear",
                             align_corners=True)

    def _fuse_weight(self, channels: slice) -> torch.Tensor:
        return self.fuse[0].weight[:, channels]

    def static_part(self, features: List[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        """The pre-norm ``fuse`` conv output contributed by levels 0-2 and the image (click-independent)."""
        n = self.level_blocks[0][0].out_channels
        x = torch.cat([self.level(i, features[i]) for i in range(3)] + [image_to_decoder(image)], dim=1)
        w = torch.cat([self._fuse_weight(slice(0, 3 * n)), self._fuse_weight(slice(4 * n, 4 * n + 1))], dim=1)
        return F.conv3d(x, w, padding=1)

    def finish(self, fused: torch.Tensor) -> torch.Tensor:
        """pre-norm fuse output (B, 128, S/2, ...) -> logits (B, classes, D, H, W) at full crop size."""
        _, norm, act = self.fuse
        logits = self.head(act(norm(fused)))
        logits = F.interpolate(logits, scale_factor=2, mode="trilinear", align_corners=True)
        return logits.permute(0, 1, 4, 2, 3)                     # (H, W, D) -> (D, H, W)

    def forward(self, features: List[torch.Tensor], image: torch.Tensor,
                static: Optional[torch.Tensor] = None) -> torch.Tensor:
        """features: 4 maps (B, 256, g, g, g) (index 3 already updated by the prompt encoder); image: the
        (B, 1, D, H, W) crop. ``static``: :meth:`static_part` computed earlier for the same crop (per-click
        path), else the full concatenation is convolved (the published computation)."""
        if static is None:
            x = torch.cat([self.level(i, f) for i, f in enumerate(features)] + [image_to_decoder(image)], dim=1)
            return self.finish(self.fuse[0](x))
        n = self.level_blocks[0][0].out_channels
        dynamic = F.conv3d(self.level(3, features[3]), self._fuse_weight(slice(3 * n, 4 * n)), padding=1)
        return self.finish(static + dynamic)
