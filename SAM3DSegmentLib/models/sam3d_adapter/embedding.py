"""Patch embedding and positional parts of the 3DSAM-adapter encoder.

The published model upsamples the 128³ crop ×4 (trilinear) to 512³, repeats it to 3 channels, embeds each
of the 512 axial slices with SAM's frozen 2D ``Conv2d(3, 768, 16, stride 16)`` and merges every 16
consecutive slices with a trainable depthwise ``Conv3d(768, 768, (1, 1, 16), stride (1, 1, 16), groups 768)``
along the slice axis (depth last). Done literally that holds 3×512³ float32 (1.6 GB) plus 512 embedded
slices (another 1.6 GB). :func:`stream_patch_embed` computes the same numbers one token-slab (16 slices) at
a time:

* trilinear interpolation is separable: the slab's 16 slices are first interpolated along D from the (at
  most 6) crop slices they need — with exactly PyTorch's ``align_corners=False`` source index and weight —
  then bilinearly in-plane, which is what ``F.interpolate(..., mode="trilinear")`` computes;
* the 3 input channels are identical copies, so the 2D conv on them equals a 1-channel conv with the
  kernel summed over its 3 input channels;
* the depthwise slice conv of one token slab only needs that slab's 16 embedded slices.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def depth_source_weights(out_index: torch.Tensor, scale: int, in_size: int):
    """Linear-interpolation sources of output slices along one axis, as ``F.interpolate(align_corners=False)``
    computes them for an integer upsampling ``scale``: (i0, i1, w1) with out = (1-w1)·in[i0] + w1·in[i1]."""
    src = ((out_index.to(torch.float64) + 0.5) / scale - 0.5).clamp(min=0.0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    w1 = (src - i0.to(torch.float64))
    return i0, i1, w1


class PatchEmbed2D(nn.Module):
    """SAM's 2D patch embedding (key ``proj``): applied to every axial slice of the upsampled volume."""

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, slices: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) slices -> (N, H/p, W/p, C), exactly SAM's PatchEmbed."""
        return self.proj(slices).permute(0, 2, 3, 1)

    def embed_gray(self, slices: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) gray slices, meaning the same slice repeated to 3 channels -> (N, C, H/p, W/p)."""
        weight = self.proj.weight.sum(dim=1, keepdim=True)
        return F.conv2d(slices, weight, self.proj.bias, stride=self.proj.stride)


def stream_patch_embed(image: torch.Tensor, patch_embed: PatchEmbed2D, slice_embed: nn.Conv3d,
                       upsample: int) -> torch.Tensor:
    """(B, 1, D, H, W) normalised crop -> tokens (B, H', W', D', C), H' = H·upsample/patch (depth last).

    Equal (up to float rounding) to: upsample ×``upsample`` trilinearly (align_corners=False), repeat to 3
    channels, SAM 2D patch embedding of every D-slice, then ``slice_embed`` along the slice axis — without
    ever holding the upsampled volume or all embedded slices.
    """
    if image.dim() != 5 or image.shape[1] != 1:
        raise ValueError(f"expected a (B, 1, D, H, W) crop, got shape {tuple(image.shape)}")
    b, _, d, h, w = image.shape
    p = patch_embed.proj.kernel_size[0]
    k = slice_embed.kernel_size[2]
    if (d * upsample) % k:
        raise ValueError(f"depth {d}×{upsample} is not a multiple of the slice-embedding kernel {k}")
    n_tok = d * upsample // k
    c = slice_embed.out_channels
    w_slice = slice_embed.weight.reshape(c, k)                     # (C, k): depthwise kernel along D
    hp, wp = h * upsample // p, w * upsample // p
    if torch.is_grad_enabled() and (slice_embed.weight.requires_grad or image.requires_grad):
        out = []                                                   # autograd: build the result by stacking
    else:
        out = image.new_empty(b, hp, wp, n_tok, c)                 # inference: fill one slab at a time
    for t in range(n_tok):
        z = torch.arange(t * k, (t + 1) * k, device=image.device)
        i0, i1, w1 = depth_source_weights(z, upsample, d)
        w1 = w1.to(image.dtype)[None, :, None, None]
        slab = image[:, 0, i0] * (1 - w1) + image[:, 0, i1] * w1   # (B, k, H, W): slices interpolated along D
        slab = F.interpolate(slab.reshape(b * k, 1, h, w), scale_factor=upsample, mode="bilinear",
                             align_corners=False)                 # (B*k, 1, H*s, W*s)
        emb = patch_embed.embed_gray(slab)                         # (B*k, C, H', W')
        emb = emb.reshape(b, k, c, *emb.shape[-2:])
        tok = torch.einsum("bkchw,ck->bhwc", emb, w_slice)
        if slice_embed.bias is not None:
            tok = tok + slice_embed.bias
        if isinstance(out, list):
            out.append(tok)
        else:
            out[:, :, :, t] = tok
        del slab, emb, tok
    return torch.stack(out, dim=3) if isinstance(out, list) else out   # (B, H', W', D', C)


def pooled_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """SAM's absolute (1, G, G, C) pos_embed average-pooled to (1, grid, grid, C) (2×2 for 64 -> 32)."""
    f = pos_embed.shape[1] // grid
    if f == 1:
        return pos_embed
    return F.avg_pool2d(pos_embed.permute(0, 3, 1, 2), kernel_size=f, stride=f).permute(0, 2, 3, 1)


def add_positions(tokens: torch.Tensor, pos_embed: torch.Tensor, depth_embed: torch.Tensor) -> torch.Tensor:
    """tokens (B, H, W, D, C) + pooled in-plane pos_embed (broadcast over D) + depth_embed (1, D, C) (over H, W)."""
    pos = pooled_pos_embed(pos_embed, tokens.shape[1])
    return tokens + pos[:, :, :, None, :] + depth_embed[:, None, None, :, :]
