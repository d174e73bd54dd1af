"""3D window attention of the 3DSAM-adapter encoder: windows of n³ tokens, Swin-style shifted windows and a
decomposed 3D relative-position bias. Tokens are (B, H, W, D, C), depth last.

Per head, for a query at window position (h, w, d) and a key at (h', w', d')::

    logit = scale·q·k + lr·(q·Rh[h, h'] + q·Rw[w, w'] + q·Rd[d, d']) (+ shift mask: 0 or -100)

where ``R*[i, j] = table*[i - j + n - 1]`` and every stored table (SAM's 27 or 127 entries) is first
resized linearly to 2n - 1 = 15 entries (``F.interpolate(mode="linear")``, as SAM's ``get_rel_pos`` does).
``rel_pos_h`` / ``rel_pos_w`` are SAM's tables (frozen), ``rel_pos_d`` is new (initialised to their mean,
trainable) and ``lr`` is a frozen scalar weight (1.0) on the rel-pos terms.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

#: additive logit of a key outside the query's shifted-window region (as in Swin)
SHIFT_MASK_VALUE = -100.0
#: windows attended per chunk, chosen so one chunk's bias stays near 2**25 floats (128 MB)
_BIAS_CHUNK_ELEMENTS = 2 ** 25


def resize_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """(L, hd) rel-pos table linearly resized to ``length`` entries (``align_corners=False``), as SAM does."""
    if table.shape[0] == length:
        return table
    return F.interpolate(table.t()[None], size=length, mode="linear")[0].t()


def rel_pos_matrix(table: torch.Tensor, n: int) -> torch.Tensor:
    """``R[i, j] = resize(table)[i - j + n - 1]`` for a window side n: (n, n, hd)."""
    table = resize_rel_pos(table, 2 * n - 1)
    idx = torch.arange(n, device=table.device)
    return table[idx[:, None] - idx[None, :] + (n - 1)]


def window_partition(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, H, W, D, C) -> (B·nW, n, n, n, C); windows in row-major (H, W, D) order."""
    b, h, w, d, c = x.shape
    x = x.reshape(b, h // n, n, w // n, n, d // n, n, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(-1, n, n, n, c)


def window_unpartition(windows: torch.Tensor, grid: Tuple[int, int, int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B·nW, n, n, n, C) -> (B, H, W, D, C)."""
    n, c = windows.shape[1], windows.shape[-1]
    h, w, d = grid
    x = windows.reshape(-1, h // n, w // n, d // n, n, n, n, c).permute(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(-1, h, w, d, c)


def shifted_window_mask(grid: int, n: int, shift: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(nW, n³, n³) additive mask of the shifted windows: 0 inside a region, -100 across regions.

    After rolling the grid by -shift on every axis, each axis has three regions ([0, g-n), [g-n, g-shift),
    [g-shift, g)); a query's logit for a key of its window gets -100 unless both lie in the same region on
    every axis (so tokens brought together by the wrap-around practically do not see each other).
    """
    coords = torch.arange(grid, device=device)
    region = (coords >= grid - n).long() + (coords >= grid - shift).long()       # 0, 1, 2 per axis
    ids = region[:, None, None] * 9 + region[None, :, None] * 3 + region[None, None, :]
    ids = window_partition(ids[None, ..., None], n).reshape(-1, n ** 3)          # (nW, N)
    mask = torch.zeros(ids.shape[0], n ** 3, n ** 3, device=device, dtype=dtype)
    return mask.masked_fill(ids[:, :, None] != ids[:, None, :], SHIFT_MASK_VALUE)


class WindowAttention3D(nn.Module):
    """Multi-head self-attention inside n³ windows with the decomposed 3D rel-pos bias.

    Parameter names follow SAM's ``Attention`` (``qkv``, ``proj``, ``rel_pos_h``, ``rel_pos_w``) plus
    ``rel_pos_d`` and ``lr``. ``table_length`` is the stored rel-pos length (27 or 127 for ViT-B).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, table_length: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window_size
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(table_length, self.head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(table_length, self.head_dim))
        self.rel_pos_d = nn.Parameter(torch.zeros(table_length, self.head_dim))
        self.lr = nn.Parameter(torch.ones(()), requires_grad=False)

    def rel_pos_bias(self, q: torch.Tensor) -> torch.Tensor:
        """q (Z, N, hd) unscaled queries of n³ windows -> (Z, N, N) bias (without the shift mask)."""
        n = self.window_size
        rh, rw, rd = (rel_pos_matrix(t, n) for t in (self.rel_pos_h, self.rel_pos_w, self.rel_pos_d))
        qg = q.reshape(-1, n, n, n, self.head_dim)
        # lr scales the three small factors, so the (Z, N, N) bias is built with one broadcast add
        bh = torch.einsum("zhwdc,hkc->zhwdk", qg, rh * self.lr)
        bw = torch.einsum("zhwdc,wkc->zhwdk", qg, rw * self.lr)
        bd = torch.einsum("zhwdc,dkc->zhwdk", qg, rd * self.lr)
        bias = (bh[..., :, None] + bw[..., None, :])[..., None] + bd[..., None, None, :]
        return bias.reshape(q.shape[0], n ** 3, n ** 3)

    def forward(self, windows: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """windows (B·nW, n, n, n, C) -> same shape. ``mask`` (nW, N, N) is added per window (shifted blocks)."""
        bw, n = windows.shape[0], windows.shape[1]
        tokens = n ** 3
        chunk = max(1, _BIAS_CHUNK_ELEMENTS // (self.num_heads * tokens * tokens))
        flat = windows.reshape(bw, tokens, -1)
        outs = [] if torch.is_grad_enabled() else torch.empty_like(flat)
        for start in range(0, bw, chunk):
            part = flat[start:start + chunk]
            z = part.shape[0]
            qkv = self.qkv(part).reshape(z, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)                                    # (z, heads, N, hd)
            bias = self.rel_pos_bias(q.reshape(-1, tokens, self.head_dim)).reshape(z, self.num_heads, tokens, tokens)
            if mask is not None:
                nw = mask.shape[0]
                if start % nw + z <= nw:                 # the chunk's windows are consecutive: a view
                    part_mask = mask[start % nw:start % nw + z]
                else:
                    part_mask = mask[torch.arange(start, start + z, device=mask.device) % nw]
                bias = bias.add_(part_mask[:, None]) if not torch.is_grad_enabled() else bias + part_mask[:, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            out = self.proj(out.transpose(1, 2).reshape(z, tokens, -1))
            if isinstance(outs, list):
                outs.append(out)
            else:
                outs[start:start + z] = out
        return (torch.cat(outs, dim=0) if isinstance(outs, list) else outs).reshape(windows.shape)
