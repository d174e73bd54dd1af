"""The 3DSAM-adapter image encoder: the 2D SAM ViT-B made 3D (tokens (B, H, W, D, C), depth last).

Names of the reused parts follow segment-anything's ``ImageEncoderViT`` (``patch_embed.proj``, ``pos_embed``,
``blocks.i.{norm1, attn.qkv, attn.proj, attn.rel_pos_h, attn.rel_pos_w, norm2, mlp.lin1, mlp.lin2}``) so a
SAM checkpoint loads onto them directly; SAM's 2D ``neck`` is replaced by four 3D heads ``neck_3d``.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from ..common import LayerNorm3d, MLPBlock
from .adapters import build_adapter
from .attention import WindowAttention3D, shifted_window_mask, window_partition, window_unpartition
from .config import Sam3DAdapterConfig
from .embedding import PatchEmbed2D, add_positions, stream_patch_embed

_MLP_CHUNK_TOKENS = 8192


class Block3D(nn.Module):
    """adapter → (norm1 → [shifted] window attention) + residual → (norm2 → MLP) + residual."""

    def __init__(self, config: Sam3DAdapterConfig, index: int) -> None:
        super().__init__()
        c = config
        self.adapter = build_adapter(c.adapter, c.embed_dim, c.adapter_dim)
        self.norm1 = nn.LayerNorm(c.embed_dim, eps=1e-6)
        self.attn = WindowAttention3D(c.embed_dim, c.num_heads, c.window_size, c.sam_rel_pos_length(index))
        self.norm2 = nn.LayerNorm(c.embed_dim, eps=1e-6)
        self.mlp = MLPBlock(c.embed_dim, int(c.embed_dim * c.mlp_ratio), nn.GELU)
        self.window_size = c.window_size
        self.shift_size = c.shift_size if index in c.shifted_blocks else 0

    def attend(self, h: torch.Tensor, shift_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(Shifted) window attention over normed tokens (B, H, W, D, C); ``shift_mask`` from
        :meth:`ImageEncoder3D.shift_mask` (used on shifted blocks only)."""
        grid = h.shape[1:4]
        s = self.shift_size
        if s:
            if shift_mask is None:
                raise ValueError("a shifted block needs the shifted-window mask (ImageEncoder3D.shift_mask)")
            h = torch.roll(h, shifts=(-s, -s, -s), dims=(1, 2, 3))
        h = window_unpartition(self.attn(window_partition(h, self.window_size), shift_mask if s else None), grid)
        if s:
            h = torch.roll(h, shifts=(s, s, s), dims=(1, 2, 3))
        return h

    def forward(self, x: torch.Tensor, shift_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.adapter(x)
        x = x + self.attend(self.norm1(x), shift_mask)
        if torch.is_grad_enabled():
            return x + self.mlp(self.norm2(x))
        # inference: the MLP is per token, so run it on slabs of about _MLP_CHUNK_TOKENS tokens in place
        # (the 4x wide hidden layer of all 32768 tokens alone would be 400 MB)
        step = max(1, _MLP_CHUNK_TOKENS // (x.shape[2] * x.shape[3]))
        for i in range(0, x.shape[1], step):
            x[:, i:i + step] += self.mlp(self.norm2(x[:, i:i + step]))
        return x


def neck_head(dim: int, out_dim: int) -> nn.Sequential:
    """Conv 1×1×1 (no bias) → LayerNorm3d → Conv 3³ (no bias) → LayerNorm3d, on (B, C, H, W, D) maps."""
    return nn.Sequential(nn.Conv3d(dim, out_dim, kernel_size=1, bias=False), LayerNorm3d(out_dim),
                         nn.Conv3d(out_dim, out_dim, kernel_size=3, padding=1, bias=False), LayerNorm3d(out_dim))


class ImageEncoder3D(nn.Module):
    def __init__(self, config: Sam3DAdapterConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        g = c.grid_size
        self.patch_embed = PatchEmbed2D(c.patch_size, c.embed_dim)
        k = c.patch_size  # slices merged per token along D
        self.slice_embed = nn.Conv3d(c.embed_dim, c.embed_dim, kernel_size=(1, 1, k), stride=(1, 1, k),
                                     groups=c.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, c.sam_grid_size, c.sam_grid_size, c.embed_dim))
        self.depth_embed = nn.Parameter(torch.ones(1, g, c.embed_dim))
        self.blocks = nn.ModuleList(Block3D(c, i) for i in range(c.depth))
        self.neck_3d = nn.ModuleList(neck_head(c.embed_dim, c.neck_dim) for _ in c.neck_blocks)

    def shift_mask(self, device=None, dtype=torch.float32) -> Optional[torch.Tensor]:
        """The (nW, n³, n³) mask shared by every shifted block (the ``attn_mask`` of published checkpoints)."""
        c = self.config
        if not c.shifted_blocks or not c.shift_size:
            return None
        return shifted_window_mask(c.grid_size, c.window_size, c.shift_size, device=device, dtype=dtype)

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) normalised crop -> positioned tokens (B, H', W', D', C)."""
        c = self.config
        if tuple(image.shape[2:]) != (c.image_size,) * 3:
            raise ValueError(f"the 3DSAM-adapter takes {c.image_size}³ crops (B, 1, {c.image_size}, "
                             f"{c.image_size}, {c.image_size}); got shape {tuple(image.shape)}")
        tokens = stream_patch_embed(image, self.patch_embed, self.slice_embed, c.upsample)
        return add_positions(tokens, self.pos_embed, self.depth_embed)

    def forward(self, image: torch.Tensor) -> List[torch.Tensor]:
        """(B, 1, D, H, W) crop -> 4 features (B, neck_dim, H', W', D') from the blocks in ``neck_blocks``."""
        x = self.embed(image)
        mask = self.shift_mask(device=x.device, dtype=x.dtype)
        feats = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, mask)
            if i in self.config.neck_blocks:
                feats.append(x)
        return [head(f.permute(0, 4, 1, 2, 3)) for head, f in zip(self.neck_3d, feats)]
