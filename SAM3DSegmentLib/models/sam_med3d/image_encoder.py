"""The SAM-Med3D image encoder: a 3D ViT-B/16 with windowed and global attention and a conv neck.

Input (B, 1, S, S, S) in the region's (a, b, c) axis order; output (B, prompt_dim, S/16, S/16, S/16).
Tokens are kept channels-last (B, D, H, W, C) between blocks, as the released weights expect.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .attention import EncoderAttention
from ..common import LayerNorm3d, MLPBlock
from .config import SamMed3DConfig


class PatchEmbed3D(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 4, 1)  # (B, C, D, H, W) -> (B, D, H, W, C)


class Block3D(nn.Module):
    """Pre-norm transformer block. ``adapter`` is an optional slot (PEFT, models/adapters.py) applied to the
    tokens after the attention residual; when it is None the block is exactly the published one and adds
    no state-dict keys."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, window_size: int, padded: bool,
                 attention_impl: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = EncoderAttention(dim, num_heads, window_size, padded, attention_impl)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))
        self.adapter: Optional[nn.Module] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        if self.adapter is not None:
            x = self.adapter(x)
        return x + self.mlp(self.norm2(x))


class ImageEncoderViT3D(nn.Module):
    def __init__(self, config: SamMed3DConfig) -> None:
        super().__init__()
        c = config
        self.img_size = c.image_size
        g = c.grid_size
        self.patch_embed = PatchEmbed3D(c.patch_size, 1, c.encoder_embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, g, g, g, c.encoder_embed_dim))
        self.blocks = nn.ModuleList()
        for i in range(c.encoder_depth):
            is_global = i in c.encoder_global_attn_indexes
            self.blocks.append(Block3D(
                c.encoder_embed_dim, c.encoder_num_heads, c.encoder_mlp_ratio,
                window_size=g if is_global else c.window_size, padded=not is_global,
                attention_impl=c.attention_impl))
        self.neck = nn.Sequential(
            nn.Conv3d(c.encoder_embed_dim, c.prompt_embed_dim, kernel_size=1, bias=False),
            LayerNorm3d(c.prompt_embed_dim),
            nn.Conv3d(c.prompt_embed_dim, c.prompt_embed_dim, kernel_size=3, padding=1, bias=False),
            LayerNorm3d(c.prompt_embed_dim),
        )
        #: Recompute block activations in backward to save memory (training only).
        self.grad_checkpointing = False

    def set_attention_impl(self, impl: str) -> None:
        """Switch every block between the "fast" and the "reference" attention (same maths)."""
        for blk in self.blocks:
            blk.attn.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != 1 or tuple(x.shape[2:]) != (self.img_size,) * 3:
            raise ValueError(f"image encoder expects (B, 1, {self.img_size}, {self.img_size}, {self.img_size}), "
                             f"got {tuple(x.shape)}")
        x = self.patch_embed(x) + self.pos_embed
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint

                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.neck(x.permute(0, 4, 1, 2, 3))
