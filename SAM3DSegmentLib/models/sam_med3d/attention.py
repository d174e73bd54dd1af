"""Multi-head self-attention of the SAM-Med3D image encoder, with its decomposed relative-position bias.

Notation (per head): the token grid is ``g x g x g`` (8 for 128³ input); a query at grid position
``q = (a, b, c)``, a key at ``k = (d, e, f)``; ``Q`` is the per-head query grid; the rel-pos tables give
``R*[x, y] = table*[x - y + n - 1]`` for a window of side ``n``. The released weights were trained with
this bias (a broadcasting quirk of the reference code, see docs/reference/SAM_MED3D.md §2)::

    bias(q, k) = Q[a,b,c]·Rd[a,f] + Q[a,b,d]·Rh[b,f] + Q[a,b,e]·Rw[e,f]

Window blocks (window side ``n = 14 > g``) pad the normed token grid with zeros to ``n³`` tokens before the
qkv projection, so padded tokens have ``q, k, v`` equal to the qkv biases and take part in every softmax.

Two implementations of the same maths:

* ``reference``: pads to ``n³`` and attends over all of them, as the published code does (368.6 GFLOP).
* ``fast`` (default): attends over the ``g³`` real keys plus ONE extra key standing for all padded keys,
  whose value is the v-bias and whose logit is ``log M`` (the log of the summed exp-logits of the padded
  keys). ``M`` factorises over the key axes, and we sum it as positive terms only (no subtraction):

      padded keys = {f >= g} ∪ {f < g, (d, e) not both real}
      M = e^{s q·bk} [ Σ_{f>=g} e^{A_f} SB_f SC_f + Σ_{f<g} e^{A_f} (PB_f SC_f + SB°_f PC_f) ]

  with ``A_f = Q[a,b,c]·Rd[a,f]``, ``B_{t,f} = Qpad[a,b,t]·Rh[b,f]``, ``C_{t,f} = Qpad[a,b,t]·Rw[t,f]``,
  ``SB_f = Σ_{t<n} e^{B_{t,f}}``, ``SB°_f = Σ_{t<g}``, ``PB_f = Σ_{t>=g}`` (same for C), all in log space.
  Valid while ``g <= n`` (crops up to 224³ for n = 14). Padded query rows are discarded by the reference,
  so they are never computed.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def relative_position_matrix(table: torch.Tensor, n: int) -> torch.Tensor:
    """``R[x, y] = table[x - y + n - 1]`` for ``x, y < n``: shape (n, n, head_dim)."""
    if table.shape[0] != 2 * n - 1:
        raise ValueError(f"rel-pos table has {table.shape[0]} rows, expected {2 * n - 1} for side {n}")
    idx = torch.arange(n, device=table.device)
    return table[idx[:, None] - idx[None, :] + (n - 1)]


def _bias_terms(q_grid: torch.Tensor, q_bias: Optional[torch.Tensor], rd: torch.Tensor, rh: torch.Tensor,
                rw: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three factors of the bias for real queries (Z = batch*heads, g real side, n window side).

    q_grid: (Z, g, g, g, hd) unscaled queries; q_bias: (Z, hd) the query of a padded token (None if n == g).
    Returns A (Z,g,g,g,n) [a,b,c,f], B (Z,g,g,n,n) [a,b,t=d,f], C (Z,g,g,n,n) [a,b,t=e,f].
    """
    z, g = q_grid.shape[0], q_grid.shape[1]
    n = rd.shape[0]
    if n > g:
        pad = q_bias[:, None, None, None, :].expand(z, g, g, n - g, q_grid.shape[-1])
        q_ext = torch.cat([q_grid, pad], dim=3)  # Qpad[a, b, t] for t < n (third grid axis padded)
    else:
        q_ext = q_grid
    a_term = torch.einsum("zabcx,afx->zabcf", q_grid, rd[:g])
    b_term = torch.einsum("zabtx,bfx->zabtf", q_ext, rh[:g])
    c_term = torch.einsum("zabtx,tfx->zabtf", q_ext, rw)
    return a_term, b_term, c_term


def real_key_bias(a_term: torch.Tensor, b_term: torch.Tensor, c_term: torch.Tensor) -> torch.Tensor:
    """Bias between real queries and real keys: (Z, g³, g³)."""
    z, g = a_term.shape[0], a_term.shape[1]
    bias = (a_term[..., :g][:, :, :, :, None, None, :]
            + b_term[:, :, :, :g, :g][:, :, :, None, :, None, :]
            + c_term[:, :, :, :g, :g][:, :, :, None, None, :, :])
    return bias.reshape(z, g ** 3, g ** 3)


def padded_key_log_mass(a_term: torch.Tensor, b_term: torch.Tensor, c_term: torch.Tensor) -> torch.Tensor:
    """log Σ_{padded keys} exp(bias) for each real query, WITHOUT the ``s q·bk`` part: (Z, g, g, g)."""
    g = a_term.shape[1]
    lsb_all = torch.logsumexp(b_term, dim=3)            # (Z, g, g, n) over t < n
    lsb_real = torch.logsumexp(b_term[:, :, :, :g], dim=3)
    lpb = torch.logsumexp(b_term[:, :, :, g:], dim=3)   # t >= g
    lsc_all = torch.logsumexp(c_term, dim=3)
    lsc_real = torch.logsumexp(c_term[:, :, :, :g], dim=3)
    lpc = torch.logsumexp(c_term[:, :, :, g:], dim=3)
    del lsc_real  # not needed: the f < g padded set splits as (d >= g, any e) + (d < g, e >= g)
    inner_real_f = torch.logaddexp(lpb + lsc_all, lsb_real + lpc)[..., :g]     # (Z, g, g, g)
    inner_pad_f = (lsb_all + lsc_all)[..., g:]                                  # (Z, g, g, n - g)
    inner = torch.cat([inner_real_f, inner_pad_f], dim=-1)                      # (Z, g, g, n) over f
    return torch.logsumexp(a_term + inner[:, :, :, None, :], dim=-1)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Fused attention with an additive bias for (Z, N, hd) inputs. Passed as 4-D (1, Z, N, hd): PyTorch's
    CPU flash kernel only takes 4-D inputs (3-D ones fall back to the unfused maths path, about 2.8x slower
    for a 512-token block on 2 threads); on CUDA the memory-efficient kernel takes the bias either way."""
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=bias[None])[0]


class EncoderAttention(nn.Module):
    """Attention of one encoder block; parameter names match the released checkpoints.

    ``window_size`` is the side the rel-pos tables were built for: the window side (14) for window
    blocks, the token grid side (8) for global blocks. ``padded`` says whether the block pads the grid
    to ``window_size`` (window blocks) or attends over the grid as it is (global blocks).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, padded: bool, impl: str = "fast"):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.window_size = window_size
        self.padded = padded
        self.impl = impl
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_d = nn.Parameter(torch.zeros(2 * window_size - 1, self.head_dim))
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * window_size - 1, self.head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * window_size - 1, self.head_dim))

    # ------------------------------------------------------------------ helpers
    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, N, 3*dim) -> q, k, v each (B*heads, N, hd)."""
        b, n, _ = t.shape
        t = t.reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return t.reshape(3, b * self.num_heads, n, self.head_dim).unbind(0)

    def _merge_heads(self, out: torch.Tensor, b: int, grid: Tuple[int, int, int]) -> torch.Tensor:
        out = out.reshape(b, self.num_heads, *grid, self.head_dim).permute(0, 2, 3, 4, 1, 5)
        return self.proj(out.reshape(b, *grid, self.num_heads * self.head_dim))

    def _tables(self, n: int):
        return (relative_position_matrix(self.rel_pos_d, n), relative_position_matrix(self.rel_pos_h, n),
                relative_position_matrix(self.rel_pos_w, n))

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: normed tokens (B, g, g, g, C) channels-last -> (B, g, g, g, C)."""
        b, d, h, w, _ = x.shape
        if not (d == h == w):
            raise ValueError(f"SAM-Med3D attention expects a cubic token grid, got {(d, h, w)}")
        g = d
        n = self.window_size
        if not self.padded:
            if g != n:
                raise ValueError(f"global attention block built for a {n}³ grid got {g}³ tokens; "
                                 "SAM-Med3D takes exactly its training input size")
            return self._attend_unpadded(x)
        if g > n:
            return self._reference_windows(x)  # several windows: only the reference form applies
        if self.impl == "reference" or g == n:
            return self._reference_windows(x) if g < n else self._attend_unpadded(x)
        return self._fast_padded(x)

    def _attend_unpadded(self, x: torch.Tensor) -> torch.Tensor:
        b, g = x.shape[0], x.shape[1]
        q, k, v = self._split_heads(self.qkv(x.reshape(b, g ** 3, -1)))
        rd, rh, rw = self._tables(g)
        a_t, b_t, c_t = _bias_terms(q.reshape(-1, g, g, g, self.head_dim), None, rd, rh, rw)
        bias = real_key_bias(a_t, b_t, c_t)
        out = _sdpa(q, k, v, bias)
        return self._merge_heads(out, b, (g, g, g))

    def _fast_padded(self, x: torch.Tensor) -> torch.Tensor:
        b, g = x.shape[0], x.shape[1]
        n = self.window_size
        hd = self.head_dim
        q, k, v = self._split_heads(self.qkv(x.reshape(b, g ** 3, -1)))
        qkv_bias = self.qkv.bias.reshape(3, self.num_heads, hd)
        bq, bk, bv = (t.repeat(b, 1) for t in qkv_bias)  # (Z, hd), Z = B*heads, batch-major like q
        rd, rh, rw = self._tables(n)
        a_t, b_t, c_t = _bias_terms(q.reshape(-1, g, g, g, hd), bq, rd, rh, rw)
        bias = real_key_bias(a_t, b_t, c_t)                                  # (Z, N, N)
        log_mass = padded_key_log_mass(a_t, b_t, c_t).reshape(-1, g ** 3)    # (Z, N)
        log_mass = log_mass + self.scale * torch.einsum("znx,zx->zn", q, bk)
        # The extra key: zero key vector (its logit lives entirely in the mask), value = v-bias.
        k_ext = torch.cat([k, k.new_zeros(k.shape[0], 1, hd)], dim=1)
        v_ext = torch.cat([v, bv[:, None, :]], dim=1)
        mask = torch.cat([bias, log_mass[..., None]], dim=-1)
        out = _sdpa(q, k_ext, v_ext, mask)
        return self._merge_heads(out, b, (g, g, g))

    def _reference_windows(self, x: torch.Tensor) -> torch.Tensor:
        """The published computation: zero-pad to whole windows, attend inside each window, crop."""
        b, g = x.shape[0], x.shape[1]
        n = self.window_size
        p = (n - g % n) % n
        xp = F.pad(x, (0, 0, 0, p, 0, p, 0, p)) if p else x
        m = (g + p) // n
        win = xp.reshape(b, m, n, m, n, m, n, -1).permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(b * m ** 3, n, n, n, -1)
        out = self._attend_full_window(win)
        out = out.reshape(b, m, m, m, n, n, n, -1).permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, m * n, m * n, m * n, -1)
        return out[:, :g, :g, :g].contiguous()

    def _attend_full_window(self, win: torch.Tensor) -> torch.Tensor:
        bw, n = win.shape[0], win.shape[1]
        q, k, v = self._split_heads(self.qkv(win.reshape(bw, n ** 3, -1)))
        rd, rh, rw = self._tables(n)
        qg = q.reshape(-1, n, n, n, self.head_dim)
        a_t, b_t, c_t = _bias_terms(qg, None, rd, rh, rw)
        logits = (q * self.scale) @ k.transpose(-2, -1) + real_key_bias(a_t, b_t, c_t)
        out = logits.softmax(dim=-1) @ v
        return self._merge_heads(out, bw, (n, n, n))
