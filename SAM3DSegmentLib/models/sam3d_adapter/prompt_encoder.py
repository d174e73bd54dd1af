"""Prompt encoder of the 3DSAM-adapter: points (no include/exclude label) update the deepest feature map.

For a feature map F (B, C, H, W, D) (depth last) and points given as ``grid_sample`` coordinates
(x, y, z) = (d, w, h) normalised to [-1, 1]:

1. the feature and a random-Fourier positional encoding of the token grid are sampled at the points
   (``grid_sample``, trilinear, ``align_corners=False``);
2. the point tokens (with their sampled PE) and ``num_global_queries`` learned global queries (with their
   own learned PE) are the queries, the H·W·D image tokens (with the dense PE) the keys of a two-way
   transformer (SAM's ``TwoWayAttentionBlock`` layers);
3. the updated image tokens are the new deepest feature map.

In these layers the token-to-image cross-attention exists (its weights are in the checkpoints) but its
output is not used: the queries are updated by self-attention and the MLP only (``norm2`` still applies),
and the image tokens attend to the queries. It is built frozen (see ``recipes.py``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..sam_med3d.mask_decoder import TwoWayAttentionBlock3D
from .config import Sam3DAdapterConfig


class RandomFourierPE3D(nn.Module):
    """coords in [0, 1]³ (x, y, z) -> [sin, cos](2π (2c - 1) @ G), G a (3, C/2) Gaussian (a buffer)."""

    def __init__(self, num_pos_feats: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn((3, num_pos_feats)))

    def encode(self, coords: torch.Tensor) -> torch.Tensor:
        proj = 2 * math.pi * ((2 * coords - 1) @ self.positional_encoding_gaussian_matrix)
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)

    def dense(self, h: int, w: int, d: int) -> torch.Tensor:
        """PE of every token of an (H, W, D) grid: (C, H, W, D). A token's coordinate is its centre in
        ``grid_sample`` order, x along D, y along W, z along H, in [0, 1]."""
        dev = self.positional_encoding_gaussian_matrix.device

        def centres(n):
            return (torch.arange(n, device=dev, dtype=torch.float32) + 0.5) / n

        zz, yy, xx = torch.meshgrid(centres(h), centres(w), centres(d), indexing="ij")
        return self.encode(torch.stack([xx, yy, zz], dim=-1)).permute(3, 0, 1, 2)


def sample_at(fmap: torch.Tensor, grid_points: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W, D) map sampled at (B, N, 3) grid coordinates (x=d, y=w, z=h in [-1, 1]) -> (B, N, C)."""
    out = F.grid_sample(fmap, grid_points[:, None, None].to(fmap.dtype), mode="bilinear", align_corners=False)
    return out[:, :, 0, 0].transpose(1, 2)


class PointPromptEncoder3D(nn.Module):
    def __init__(self, config: Sam3DAdapterConfig) -> None:
        super().__init__()
        c = config
        dim = c.prompt_dim
        self.pe_layer = RandomFourierPE3D(dim // 2)
        self.global_query = nn.Parameter(torch.zeros(c.num_global_queries, dim))
        self.global_query_pe = nn.Parameter(torch.zeros(c.num_global_queries, dim))
        nn.init.normal_(self.global_query, std=0.02)
        nn.init.normal_(self.global_query_pe, std=0.02)
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock3D(dim, c.prompt_heads, c.prompt_mlp_dim, c.prompt_attention_downsample,
                                   skip_first_layer_pe=(i == 0), token_to_image=False)
            for i in range(c.prompt_depth))

    def forward(self, feature: torch.Tensor, grid_points: torch.Tensor) -> torch.Tensor:
        """feature (B, C, H, W, D), grid_points (B, N, 3) -> updated feature (B, C, H, W, D)."""
        b, c, h, w, d = feature.shape
        dense_pe = self.pe_layer.dense(h, w, d).to(feature.dtype)[None]                  # (1, C, H, W, D)
        point_feat = sample_at(feature, grid_points)
        point_pe = sample_at(dense_pe.expand(b, -1, -1, -1, -1), grid_points)
        queries = torch.cat([point_feat, self.global_query.expand(b, -1, -1)], dim=1)
        query_pe = torch.cat([point_pe, self.global_query_pe.expand(b, -1, -1)], dim=1)
        keys = feature.flatten(2).transpose(1, 2)
        key_pe = dense_pe.flatten(2).transpose(1, 2)
        for layer in self.layers:
            queries, keys = layer(queries, keys, query_pe, key_pe)
        return keys.transpose(1, 2).reshape(b, c, h, w, d)
