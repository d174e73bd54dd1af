"""The 3DSAM-adapter model: 3D image encoder (adapted 2D SAM ViT-B), point prompt encoder, multi-level decoder.

Axis conventions: the crop is (B, 1, D, H, W); points are (B, N, 3) continuous voxel coordinates of the crop
in (d, h, w) order (voxel centres at integers); the output logits are (B, classes, D, H, W). Inside, every
3D map is (H, W, D) (depth last) and points become ``grid_sample`` coordinates (x, y, z) = (d, w, h),
normalised as (p + 0.5)·2/S - 1 (``align_corners=False``).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from .config import Sam3DAdapterConfig
from .decoder import MultiLevelDecoder
from .encoder import ImageEncoder3D
from .prompt_encoder import PointPromptEncoder3D


def points_to_grid(points_dhw: torch.Tensor, size: int) -> torch.Tensor:
    """(B, N, 3) crop voxel coordinates (d, h, w) -> ``grid_sample`` coordinates (d, w, h) in [-1, 1]."""
    p = points_dhw.to(torch.float32)[..., [0, 2, 1]]
    return (p + 0.5) * (2.0 / size) - 1.0


class Sam3DAdapter(nn.Module):
    def __init__(self, config: Sam3DAdapterConfig) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = ImageEncoder3D(config)
        self.prompt_encoder = PointPromptEncoder3D(config)
        self.mask_decoder = MultiLevelDecoder(config)
        #: prompt encoders 0-2 of a published checkpoint's ``feature_dict`` (unused by the model; written
        #: back unchanged when saving). None: the used encoder is written in every slot.
        self.unused_prompt_encoder_states: Optional[List[dict]] = None

    def decode(self, features: List[torch.Tensor], image: torch.Tensor, points_dhw: torch.Tensor,
               static: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Encoder features + crop + points (B, N, 3) -> logits (B, classes, D, H, W)."""
        grid = points_to_grid(points_dhw, self.config.image_size).to(features[3].device)
        updated = self.prompt_encoder(features[3], grid)
        return self.mask_decoder(list(features[:3]) + [updated], image, static)

    def forward(self, image: torch.Tensor, points_dhw: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) normalised crop, (B, N, 3) points -> (B, classes, D, H, W) logits."""
        return self.decode(self.image_encoder(image), image, points_dhw)


def build_sam3d_adapter(config: Optional[Sam3DAdapterConfig] = None) -> Sam3DAdapter:
    return Sam3DAdapter(config or Sam3DAdapterConfig.vit_b())
