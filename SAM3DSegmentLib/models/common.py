"""Small building blocks shared by the encoder and the decoder (parameter names match the checkpoints)."""
from __future__ import annotations

from typing import Type

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm3d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, D, H, W) tensor (eps 1e-6, as in SAM)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None, None] * x + self.bias[:, None, None, None]


class MLPBlock(nn.Module):
    """Two linear layers with an activation between (``lin1``, ``lin2``)."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: Type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (hypernetworks, IoU head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return x


def patchwise_conv(x_cl: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    """A Conv3d whose kernel equals its stride (non-overlapping patches), channels-last in and out.

    x_cl (B, X, Y, Z, Cin) -> (B, X/k, Y/k, Z/k, Cout): the same maths as ``conv`` as one matmul.
    """
    k = conv.kernel_size[0]
    b, x, y, z, c = x_cl.shape
    patches = x_cl.reshape(b, x // k, k, y // k, k, z // k, k, c).permute(0, 1, 3, 5, 7, 2, 4, 6)
    patches = patches.reshape(b, x // k, y // k, z // k, c * k ** 3)
    weight = conv.weight.reshape(conv.out_channels, c * k ** 3)
    return F.linear(patches, weight, conv.bias)


def patchwise_conv_transpose(x_cl: torch.Tensor, conv: nn.ConvTranspose3d) -> torch.Tensor:
    """A ConvTranspose3d with kernel == stride, channels-last in; returns (B, X, Y, Z, Cout, k, k, k)
    (each input voxel's k³ output block), still to be interleaved by :func:`interleave_blocks`."""
    cin, cout, k = conv.in_channels, conv.out_channels, conv.kernel_size[0]
    out = x_cl @ conv.weight.reshape(cin, cout * k ** 3)
    out = out.reshape(*x_cl.shape[:-1], cout, k, k, k)
    if conv.bias is not None:
        out = out + conv.bias[:, None, None, None]
    return out


def interleave_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """(B, X, Y, Z, C, k, k, k) -> channels-last (B, kX, kY, kZ, C)."""
    b, x, y, z, c, k = blocks.shape[:6]
    return blocks.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, x * k, y * k, z * k, c)
