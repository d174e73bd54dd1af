"""The per-block adapters of the 3DSAM-adapter: the original Adapter and the DualPath adapter.

Both act on tokens (B, H, W, D, C) at the start of a block (before ``norm1``) and return tokens of the same
shape (residual included). Their 3D convolutions see (B, mid, H, W, D) maps, depth LAST, so the DualPath
local path's "in-plane" (axial) kernels are (3, 3, 1) and its pooling (2, 2, 1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: in-plane (axial) kernel, padding and pooling for a depth-last (H, W, D) grid
IN_PLANE_KERNEL = (3, 3, 1)
IN_PLANE_PADDING = (1, 1, 0)
IN_PLANE_POOL = (2, 2, 1)


def _to_map(tokens: torch.Tensor) -> torch.Tensor:
    return tokens.permute(0, 4, 1, 2, 3)          # (B, H, W, D, C) -> (B, C, H, W, D)


def _to_tokens(fmap: torch.Tensor) -> torch.Tensor:
    return fmap.permute(0, 2, 3, 4, 1)


class Adapter3D(nn.Module):
    """Linear(C→mid) → ReLU → depthwise Conv3d 3³ → ReLU → Linear(mid→C) → ReLU → residual add."""

    def __init__(self, dim: int, mid: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, mid)
        self.conv = nn.Conv3d(mid, mid, kernel_size=3, padding=1, groups=mid)
        self.up = nn.Linear(mid, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.down(x))
        h = _to_tokens(F.relu(self.conv(_to_map(h))))
        return x + F.relu(self.up(h))


class InPlaneConvBlock(nn.Module):
    """Depthwise in-plane (3, 3, 1) conv → pointwise 1×1×1 conv → InstanceNorm3d (affine) → ReLU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv3d(cin, cin, kernel_size=IN_PLANE_KERNEL, padding=IN_PLANE_PADDING, groups=cin)
        self.pointwise = nn.Conv3d(cin, cout, kernel_size=1)
        self.norm = nn.InstanceNorm3d(cout, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.pointwise(self.depthwise(x))))


def in_plane_pool(x: torch.Tensor) -> torch.Tensor:
    """2× max-pool in the axial plane of a (B, C, H, W, D) map; slices are never mixed."""
    return F.max_pool3d(x, kernel_size=IN_PLANE_POOL, stride=IN_PLANE_POOL)


def in_plane_upsample(x: torch.Tensor) -> torch.Tensor:
    """2× (bi)linear upsampling in the axial plane of a (B, C, H, W, D) map (align_corners=True)."""
    return F.interpolate(x, scale_factor=IN_PLANE_POOL, mode="trilinear", align_corners=True)


class DualPathAdapter3D(nn.Module):
    """DualPath adapter: a global (3³ depthwise) path and a local UNet++ in-plane path, fused by a gate.

    ``h = ReLU(Linear(x))``; ``g = ReLU(DWConv3³(h))``; local: ``x00 = conv_0_0(h)``,
    ``x10 = conv_1_0(pool(x00))``, ``x01 = conv_0_1([x00, up(x10)])``; ``gate = sigmoid(Conv1³(g))``;
    ``out = x + Linear(g + gate·x01)``.
    """

    def __init__(self, dim: int, mid: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, mid)
        self.global_conv = nn.Conv3d(mid, mid, kernel_size=3, padding=1, groups=mid)
        self.conv_0_0 = InPlaneConvBlock(mid, mid)
        self.conv_1_0 = InPlaneConvBlock(mid, mid)
        self.conv_0_1 = InPlaneConvBlock(2 * mid, mid)
        self.gate = nn.Conv3d(mid, mid, kernel_size=1)
        self.up = nn.Linear(mid, dim)

    def local_path(self, h: torch.Tensor) -> torch.Tensor:
        """UNet++ (depth 2) on a (B, mid, H, W, D) map, every operation in-plane."""
        x00 = self.conv_0_0(h)
        x10 = self.conv_1_0(in_plane_pool(x00))
        return self.conv_0_1(torch.cat([x00, in_plane_upsample(x10)], dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _to_map(F.relu(self.down(x)))
        g = F.relu(self.global_conv(h))
        fused = g + torch.sigmoid(self.gate(g)) * self.local_path(h)
        return x + self.up(_to_tokens(fused))


def build_adapter(kind: str, dim: int, mid: int) -> nn.Module:
    if kind == "original":
        return Adapter3D(dim, mid)
    if kind == "dualpath":
        return DualPathAdapter3D(dim, mid)
    raise ValueError(f"unknown adapter kind {kind!r}; use 'original' or 'dualpath'")
