"""Prompt encoder: 3D points and the previous low-res logits -> sparse and dense prompt embeddings.

Points are continuous voxel coordinates in the model input (crop) in the tensor's own axis order
(a, b, c); labels 1 = include, 0 = exclude, -1 = padding. Boxes are not supported (they never worked in
the reference 3D code). The reference's keyword call (``points=(coords, labels), boxes=None, masks=...``) works.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

import torch.nn.functional as F

from ..common import LayerNorm3d, patchwise_conv
from .config import SamMed3DConfig


class PositionEmbeddingRandom3D(nn.Module):
    """Random Fourier features: coords in [0, 1] -> 2c-1 -> @ G -> 2π -> [sin, cos, sin]."""

    def __init__(self, num_pos_feats: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn((3, num_pos_feats)))

    def _encode(self, coords: torch.Tensor) -> torch.Tensor:
        proj = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix
        proj = 2 * math.pi * proj
        return torch.cat([torch.sin(proj), torch.cos(proj), torch.sin(proj)], dim=-1)

    def dense(self, size: Tuple[int, int, int]) -> torch.Tensor:
        """PE of the dense token grid, (C, X, Y, Z).

        Quirk baked into the weights: token (i, j, k) encodes ((j+.5)/Y, (i+.5)/X, (k+.5)/Z) — the first
        two axes swapped relative to the point encoding.
        """
        x, y, z = size
        dev = self.positional_encoding_gaussian_matrix.device
        ii = (torch.arange(x, device=dev, dtype=torch.float32) + 0.5) / x
        jj = (torch.arange(y, device=dev, dtype=torch.float32) + 0.5) / y
        kk = (torch.arange(z, device=dev, dtype=torch.float32) + 0.5) / z
        gi, gj, gk = torch.meshgrid(ii, jj, kk, indexing="ij")
        return self._encode(torch.stack([gj, gi, gk], dim=-1)).permute(3, 0, 1, 2)

    def points(self, coords: torch.Tensor, image_size: Tuple[int, int, int]) -> torch.Tensor:
        """PE of points given in voxel units of an input of ``image_size`` (already shifted by +0.5)."""
        scale = torch.tensor(image_size, dtype=torch.float32, device=coords.device)
        return self._encode(coords.float() / scale)


class PromptEncoder3D(nn.Module):
    def __init__(self, config: SamMed3DConfig) -> None:
        super().__init__()
        c = config
        self.embed_dim = c.prompt_embed_dim
        g = c.grid_size
        self.image_embedding_size = (g, g, g)
        self.input_image_size = (c.image_size,) * 3
        self.pe_layer = PositionEmbeddingRandom3D(c.prompt_embed_dim // 3)
        self.point_embeddings = nn.ModuleList([nn.Embedding(1, c.prompt_embed_dim) for _ in range(2)])
        self.not_a_point_embed = nn.Embedding(1, c.prompt_embed_dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv3d(1, c.mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm3d(c.mask_in_chans // 4),
            nn.GELU(),
            nn.Conv3d(c.mask_in_chans // 4, c.mask_in_chans, kernel_size=2, stride=2),
            LayerNorm3d(c.mask_in_chans),
            nn.GELU(),
            nn.Conv3d(c.mask_in_chans, c.prompt_embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, c.prompt_embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """(1, C, g, g, g) positional encoding of the image embedding grid."""
        return self.pe_layer.dense(self.image_embedding_size).unsqueeze(0)

    def embed_points(self, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, N, 3), (B, N) -> (B, N + 1, C): a padding point (label -1) is appended, as in SAM."""
        b = points.shape[0]
        points = torch.cat([points.float() + 0.5, points.new_zeros((b, 1, 3), dtype=torch.float32)], dim=1)
        labels = torch.cat([labels, labels.new_full((b, 1), -1)], dim=1)
        pe = self.pe_layer.points(points, self.input_image_size)
        lab = labels[..., None]
        pe = torch.where(lab == -1, torch.zeros_like(pe), pe)
        pe = pe + (lab == -1) * self.not_a_point_embed.weight
        pe = pe + (lab == 0) * self.point_embeddings[0].weight
        pe = pe + (lab == 1) * self.point_embeddings[1].weight
        return pe

    def embed_mask(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """``mask_downscaling`` computed channels-last with patch matmuls (its convs have kernel == stride).

        (B, 1, S/4, S/4, S/4) logits -> (B, C, g, g, g). Same maths as the nn.Sequential.
        """
        conv1, ln1, act1, conv2, ln2, act2, conv3 = self.mask_downscaling
        h = patchwise_conv(mask_logits.permute(0, 2, 3, 4, 1), conv1)
        h = act1(F.layer_norm(h, (h.shape[-1],), ln1.weight, ln1.bias, ln1.eps))
        h = patchwise_conv(h, conv2)
        h = act2(F.layer_norm(h, (h.shape[-1],), ln2.weight, ln2.bias, ln2.eps))
        h = F.linear(h, conv3.weight.reshape(conv3.out_channels, -1), conv3.bias)
        return h.permute(0, 4, 1, 2, 3)

    def forward(self, points=None, labels: Optional[torch.Tensor] = None,
                mask_logits: Optional[torch.Tensor] = None, batch_size: int = 1, *,
                boxes: Optional[torch.Tensor] = None,
                masks: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns sparse (B, N+1 or 0, C) and dense (B, C, g, g, g) embeddings.

        ``mask_logits`` (B, 1, S/4, S/4, S/4): previous low-res logits (the reference feeds zeros at the
        first step); None uses ``no_mask_embed`` (unused by the released training).

        The reference's keyword call works too: ``prompt_encoder(points=(coords, labels), boxes=None,
        masks=prev)`` (``masks`` is ``mask_logits``); a box raises ``NotImplementedError``.
        """
        if boxes is not None:
            raise NotImplementedError("box prompts are not supported by SAM-Med3D's 3D prompt encoder here: "
                                      "pass boxes=None and give points")
        if masks is not None:
            if mask_logits is not None:
                raise TypeError("give the previous logits once: mask_logits or masks, not both")
            mask_logits = masks
        if isinstance(points, (tuple, list)):
            if labels is not None:
                raise TypeError("points=(coords, labels) already holds the labels: do not pass labels too")
            points, labels = points
        if points is not None:
            batch_size = points.shape[0]
            sparse = self.embed_points(points, labels)
        else:
            if mask_logits is not None:
                batch_size = mask_logits.shape[0]
            sparse = self.no_mask_embed.weight.new_zeros((batch_size, 0, self.embed_dim))
        if mask_logits is not None:
            dense = self.embed_mask(mask_logits)
        else:
            g = self.image_embedding_size
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(batch_size, -1, *g)
        return sparse, dense
