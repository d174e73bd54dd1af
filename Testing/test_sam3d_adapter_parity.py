"""3DSAM-adapter: parity with segment-anything (test-only oracle) where the maths coincide, and the streamed /
windowed implementations against direct computations. Tolerance 1e-5 throughout."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from _sam3d_adapter_fixtures import randomize_, sam_modeling, tiny_sam_encoder  # noqa: E402
from SAM3DSegmentLib.models.sam3d_adapter import Sam3DAdapter, Sam3DAdapterConfig, load_sam_vit_b  # noqa: E402
from SAM3DSegmentLib.models.sam3d_adapter.attention import rel_pos_matrix  # noqa: E402
from SAM3DSegmentLib.models.sam3d_adapter.embedding import add_positions, stream_patch_embed  # noqa: E402
from SAM3DSegmentLib.models.sam_med3d.mask_decoder import TwoWayAttentionBlock3D  # noqa: E402

TOL = 1e-5


def _tiny_from_sam(seed=0):
    torch.manual_seed(seed)
    sam = tiny_sam_encoder(seed)
    model = Sam3DAdapter(Sam3DAdapterConfig.tiny()).eval()
    load_sam_vit_b(model, {"image_encoder." + k: v for k, v in sam.state_dict().items()})
    return sam, model


def _upsampled(crop, factor=4):
    return F.interpolate(crop, scale_factor=factor, mode="trilinear", align_corners=False)


def test_patch_embedding_matches_sam_on_every_axial_slice():
    """Tokens at depth t with a one-hot slice kernel at j are SAM's PatchEmbed of upsampled slice 16t+j."""
    sam, model = _tiny_from_sam()
    enc = model.image_encoder
    crop = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    up = _upsampled(crop)                                                  # (1, 1, 128, 128, 128) D, H, W
    for j in (0, 7, 15):
        with torch.no_grad():
            enc.slice_embed.weight.zero_()
            enc.slice_embed.weight[..., j] = 1.0
            enc.slice_embed.bias.zero_()
            tokens = stream_patch_embed(crop, enc.patch_embed, enc.slice_embed, 4)    # (1, H', W', D', C)
            for t in range(tokens.shape[3]):
                ref = sam.patch_embed(up[:, :, 16 * t + j].expand(-1, 3, -1, -1))     # (1, H', W', C)
                assert (tokens[:, :, :, t] - ref).abs().max() <= TOL


def test_streamed_embedding_equals_the_literal_computation():
    """Streaming (no 3×512³ tensor) = upsample, repeat to 3 channels, per-slice SAM conv, depthwise slice conv."""
    _, model = _tiny_from_sam()
    enc = model.image_encoder
    randomize_(enc.slice_embed, seed=3, std=0.3)
    crop = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = stream_patch_embed(crop, enc.patch_embed, enc.slice_embed, 4)
        up = _upsampled(crop).expand(-1, 3, -1, -1, -1)                       # (B, 3, Dup, Hup, Wup)
        slices = up.permute(0, 2, 1, 3, 4).reshape(-1, 3, 128, 128)
        emb = enc.patch_embed.proj(slices).reshape(2, 128, 32, 8, 8)           # (B, Dup, C, H', W')
        ref = enc.slice_embed(emb.permute(0, 2, 3, 4, 1)).permute(0, 2, 3, 4, 1)
    assert got.shape == (2, 8, 8, 8, 32)
    assert (got - ref).abs().max() <= TOL


@pytest.mark.parametrize("length", [27, 127])
def test_reused_rel_pos_tables_resized_like_sam(length):
    m = sam_modeling()
    table = torch.randn(length, 64, generator=torch.Generator().manual_seed(length))
    ref = m.image_encoder.get_rel_pos(8, 8, table)                           # SAM: resize to 15, index
    assert ref.shape == (8, 8, 64)
    assert (rel_pos_matrix(table, 8) - ref).abs().max() <= TOL


def test_rel_pos_bias_restricted_to_a_slice_is_sams_2d_decomposed_bias():
    """With rel_pos_d = 0, the 3D bias between two depths is SAM's 2D decomposed bias of the query slice."""
    m = sam_modeling()
    _, model = _tiny_from_sam()
    attn = model.image_encoder.blocks[1].attn                              # a global SAM block: 31-entry tables
    with torch.no_grad():
        attn.rel_pos_d.zero_()
    n, hd = attn.window_size, attn.head_dim
    q = torch.randn(3, n ** 3, hd, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        bias = attn.rel_pos_bias(q).reshape(3, n, n, n, n, n, n)            # [z, h, w, d, h', w', d']
    qg = q.reshape(3, n, n, n, hd)
    for d in (0, n - 1):
        q2d = qg[:, :, :, d].reshape(3, n * n, hd)
        ref = m.image_encoder.add_decomposed_rel_pos(torch.zeros(3, n * n, n * n), q2d, attn.rel_pos_h,
                                                     attn.rel_pos_w, (n, n), (n, n))
        for d_key in (0, 2):
            got = bias[:, :, :, d, :, :, d_key].reshape(3, n * n, n * n)
            assert (got - ref).abs().max() <= TOL


def test_pooled_pos_embed_is_the_2x2_mean_of_sams():
    sam, model = _tiny_from_sam()
    enc = model.image_encoder
    with torch.no_grad():
        enc.depth_embed.copy_(torch.randn(enc.depth_embed.shape))
        pos = add_positions(torch.zeros(1, 8, 8, 8, 32), enc.pos_embed, enc.depth_embed)
    sam_pos = sam.pos_embed[0]                                               # (16, 16, C) SAM layout (H, W, C)
    for h in range(8):
        for w in range(8):
            ref = sam_pos[2 * h:2 * h + 2, 2 * w:2 * w + 2].reshape(4, -1).mean(0)
            for d in (0, 5):
                assert (pos[0, h, w, d] - enc.depth_embed[0, d] - ref).abs().max() <= TOL


@pytest.mark.parametrize("skip_first_layer_pe", [False, True])
def test_two_way_layer_matches_sam(skip_first_layer_pe):
    m = sam_modeling()
    ours = randomize_(TwoWayAttentionBlock3D(32, 4, 64, 2, skip_first_layer_pe), seed=7, std=0.2)
    ref = m.transformer.TwoWayAttentionBlock(32, 4, 64, activation=torch.nn.ReLU, attention_downsample_rate=2,
                                            skip_first_layer_pe=skip_first_layer_pe)
    ref.load_state_dict(ours.state_dict(), strict=True)
    g = torch.Generator().manual_seed(8)
    queries, qpe = torch.randn(2, 5, 32, generator=g), torch.randn(2, 5, 32, generator=g)
    keys, kpe = torch.randn(2, 64, 32, generator=g), torch.randn(2, 64, 32, generator=g)
    with torch.no_grad():
        got_q, got_k = ours(queries, keys, qpe, kpe)
        ref_q, ref_k = ref(queries=queries, keys=keys, query_pe=qpe, key_pe=kpe)
        assert (got_q - ref_q).abs().max() <= TOL and (got_k - ref_k).abs().max() <= TOL
        # the 3DSAM-adapter variant ignores the token-to-image cross-attention: SAM with that output zeroed
        ours.token_to_image = False
        ref.cross_attn_token_to_image.out_proj.weight.zero_()
        ref.cross_attn_token_to_image.out_proj.bias.zero_()
        got_q, got_k = ours(queries, keys, qpe, kpe)
        ref_q, ref_k = ref(queries=queries, keys=keys, query_pe=qpe, key_pe=kpe)
    assert (got_q - ref_q).abs().max() <= TOL and (got_k - ref_k).abs().max() <= TOL


@pytest.mark.parametrize("block", [0, 1])
def test_shifted_window_attention_equals_masked_full_attention(block):
    """Windowed (shifted on block 0) attention = attention over all tokens where a key counts only if it is
    in the query's window of the shifted grid and not brought there by the roll's wrap-around."""
    torch.manual_seed(block)
    model = randomize_(Sam3DAdapter(Sam3DAdapterConfig.tiny()), seed=11, std=0.3).eval()
    enc = model.image_encoder
    blk = enc.blocks[block]
    attn, n, g, s = blk.attn, 4, 8, blk.shift_size
    assert s == (2 if block == 0 else 0)
    x = torch.randn(1, g, g, g, 32, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        got = blk.attend(x, enc.shift_mask())
        xr = torch.roll(x, shifts=(-s,) * 3, dims=(1, 2, 3)).reshape(g ** 3, 32)
        coords = torch.stack(torch.meshgrid(*[torch.arange(g)] * 3, indexing="ij"), -1).reshape(-1, 3)
        same_window = ((coords[:, None] // n) == (coords[None] // n)).all(-1)
        orig = (coords + s) % g
        no_wrap = ((orig[:, None] - orig[None]) == (coords[:, None] - coords[None])).all(-1)
        qkv = attn.qkv(xr).reshape(g ** 3, 3, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3)
        q, k, v = qkv[0], qkv[1], qkv[2]                                     # (heads, T, hd)
        rh, rw, rd = (rel_pos_matrix(t, n) for t in (attn.rel_pos_h, attn.rel_pos_w, attn.rel_pos_d))
        loc = coords % n
        bias = (torch.einsum("htc,tkc->htk", q, rh[loc[:, 0]])[:, :, loc[:, 0]]
                + torch.einsum("htc,tkc->htk", q, rw[loc[:, 1]])[:, :, loc[:, 1]]
                + torch.einsum("htc,tkc->htk", q, rd[loc[:, 2]])[:, :, loc[:, 2]])
        logits = q @ k.transpose(1, 2) * attn.head_dim ** -0.5 + attn.lr * bias
        logits = logits + torch.where(no_wrap, 0.0, -100.0)
        logits = logits.masked_fill(~same_window, float("-inf"))
        out = (logits.softmax(-1) @ v).transpose(0, 1).reshape(g ** 3, 32)
        ref = torch.roll(attn.proj(out).reshape(1, g, g, g, 32), shifts=(s,) * 3, dims=(1, 2, 3))
    assert (got - ref).abs().max() <= TOL
