"""3DSAM-adapter model: exact parameter counts, the two training recipes, axial-plane kernels, axis conventions
and the predictor API."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from _sam3d_adapter_fixtures import randomize_  # noqa: E402
from SAM3DSegmentLib.models.sam3d_adapter import (Sam3DAdapter, Sam3DAdapterConfig, Sam3DAdapterPredictor,  # noqa: E402
                                                  apply_recipe, recipe_parameter_count, to_dualpath)
from SAM3DSegmentLib.models.sam3d_adapter.adapters import (Adapter3D, DualPathAdapter3D, in_plane_pool,  # noqa: E402
                                                           in_plane_upsample)
from SAM3DSegmentLib.models.sam3d_adapter.decoder import image_to_decoder  # noqa: E402
from SAM3DSegmentLib.models.sam3d_adapter.embedding import stream_patch_embed  # noqa: E402
from SAM3DSegmentLib.models.sam3d_adapter.model import points_to_grid  # noqa: E402
from SAM3DSegmentLib.models.sam3d_adapter.prompt_encoder import sample_at  # noqa: E402


def _meta_full(**overrides):
    with torch.device("meta"):
        return Sam3DAdapter(Sam3DAdapterConfig.vit_b(**overrides))


# ---------------------------------------------------------------------------------------------- counts
def test_full_size_parameter_counts_are_the_published_ones():
    model = _meta_full()
    counts = recipe_parameter_count(model, "original")
    assert counts["total"] == 114_309_004
    assert counts["recipe"] == 25_462_400
    assert counts["adapters"] == 7_220_736
    assert all(sum(p.numel() for p in b.adapter.parameters()) == 601_728 for b in model.image_encoder.blocks)
    # the unused token-to-image attention (2 layers) is in the published set but flagged frozen
    unused = sum(p.numel() for n, p in model.named_parameters()
                 if n.startswith("prompt_encoder.") and "cross_attn_token_to_image" in n)
    assert unused == 2 * 131_712
    trained = apply_recipe(model, "original")
    assert counts["trainable"] == 25_462_400 - unused
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == counts["trainable"]
    assert len(trained) == sum(1 for p in model.parameters() if p.requires_grad)


def test_dualpath_adapter_count_at_mid_384():
    model = to_dualpath(_meta_full(), mid=384)
    assert model.config.adapter == "dualpath"
    assert all(isinstance(b.adapter, DualPathAdapter3D) for b in model.image_encoder.blocks)
    assert all(sum(p.numel() for p in b.adapter.parameters()) == 1_358_208 for b in model.image_encoder.blocks)
    counts = recipe_parameter_count(model, "dualpath")
    assert counts["adapters"] == 12 * 1_358_208
    # dualpath trains: adapters, neck_3d, rel_pos_d, block norms, depth_embed, slice_embed
    expected = (12 * 1_358_208 + 4 * 1_967_104 + (8 * 27 + 4 * 127) * 64 + 12 * 2 * 1536 + 32 * 768
                + 768 * 16 + 768)
    assert counts["recipe"] == counts["trainable"] == expected


# ---------------------------------------------------------------------------------------------- recipes
def _dice_ce(logits, target):
    prob = logits.softmax(1)[:, 1]
    dice = 1 - (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
    return 0.5 * dice + 0.5 * F.cross_entropy(logits, target.long())


def _one_step(model, recipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    crop = torch.randn(1, 1, 32, 32, 32, generator=g)
    target = torch.zeros(1, 32, 32, 32)
    target[:, 10:20, 8:18, 12:24] = 1
    points = torch.tensor([[[14.0, 12.0, 17.0], [11.0, 9.0, 20.0]]])
    trained = apply_recipe(model, recipe)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=4e-4, weight_decay=0.0)
    model.train()
    loss = _dice_ce(model(crop, points), target)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    opt.step()
    return trained, before, buffers, grads


@pytest.mark.parametrize("recipe", ["original", "dualpath"])
def test_recipe_trains_exactly_its_tensors(recipe):
    torch.manual_seed(0)
    model = randomize_(Sam3DAdapter(Sam3DAdapterConfig.tiny()), seed=1, std=0.1)
    if recipe == "dualpath":
        to_dualpath(model, mid=8)
    trained, before, buffers, grads = _one_step(model, recipe)
    enc_parts = ("adapter.", "neck_3d.", "rel_pos_d", "norm1.", "norm2.", "depth_embed", "slice_embed.")
    for name, p in model.named_parameters():
        should = (name.startswith("image_encoder.") and any(s in name for s in enc_parts)) or (
            recipe == "original" and name.startswith(("prompt_encoder.", "mask_decoder."))
            and "cross_attn_token_to_image" not in name)
        assert (name in trained) == should, name
        if should and name.endswith("k_proj.bias"):
            # a key bias adds the same q·b to every logit of a query: softmax ignores it, so its gradient is
            # mathematically zero (as in SAM); it is computed (not None) but only rounding noise
            assert grads[name] is not None and grads[name].abs().max() < 1e-6, name
        elif should:
            assert grads[name] is not None and grads[name].abs().sum() > 0, f"{name} got no gradient"
            assert not torch.equal(p.detach(), before[name]), f"{name} did not change"
        else:
            assert grads[name] is None, name
            assert torch.equal(p.detach(), before[name]), f"frozen {name} changed"
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert any("prompt_encoder" in n for n in trained) == (recipe == "original")


def test_token_to_image_attention_really_gets_no_gradient():
    """The prompt encoder's token-to-image cross-attention does not reach the output (why it is frozen)."""
    model = Sam3DAdapter(Sam3DAdapterConfig.tiny())
    apply_recipe(model, "original")
    unused = [p for n, p in model.named_parameters() if "prompt_encoder" in n and "cross_attn_token_to_image" in n]
    assert unused
    for p in unused:
        p.requires_grad_(True)
    model(torch.randn(1, 1, 32, 32, 32), torch.tensor([[[5.0, 6.0, 7.0]]])).sum().backward()
    assert all(p.grad is None for p in unused)


def test_dualpath_recipe_needs_dualpath_adapters():
    with pytest.raises(ValueError, match="to_dualpath"):
        apply_recipe(Sam3DAdapter(Sam3DAdapterConfig.tiny()), "dualpath")
    with pytest.raises(ValueError, match="unknown 3DSAM-adapter recipe"):
        apply_recipe(Sam3DAdapter(Sam3DAdapterConfig.tiny()), "lora")


def test_tiny_model_learns_a_phantom():
    """A few AdamW steps of the original recipe on a sphere phantom lower the Dice+CE loss."""
    torch.manual_seed(0)
    model = Sam3DAdapter(Sam3DAdapterConfig.tiny())
    apply_recipe(model, "original")
    zz, yy, xx = torch.meshgrid(*[torch.arange(32.0)] * 3, indexing="ij")
    target = (((zz - 15) ** 2 + (yy - 17) ** 2 + (xx - 14) ** 2) < 49).float()[None]
    crop = (target * 2 - 1)[None] + 0.1 * torch.randn(1, 1, 32, 32, 32)
    points = torch.tensor([[[15.0, 17.0, 14.0], [13.0, 18.0, 15.0]]])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.0)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = _dice_ce(model(crop, points), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


# ---------------------------------------------------------------------------------------------- axial plane
def _support(t):
    return {tuple(i) for i in torch.nonzero(t.abs().sum(1)[0] > 1e-7).tolist()}   # (h, w, d) positions


@pytest.mark.parametrize("part", ["conv_0_0", "conv_1_0", "conv_0_1"])
def test_dualpath_local_kernels_are_in_plane(part):
    """An impulse moved in-plane moves the response in-plane; moved across slices, it stays in its slice."""
    ad = randomize_(DualPathAdapter3D(16, 4), seed=2, std=0.5)
    conv = getattr(ad, part).depthwise
    assert conv.kernel_size == (3, 3, 1)
    cin = conv.in_channels
    for h, w, d in [(3, 4, 5), (4, 4, 5), (3, 4, 6)]:
        x = torch.zeros(1, cin, 8, 8, 8)
        x[0, :, h, w, d] = 1.0
        with torch.no_grad():
            y = conv(x) - conv(torch.zeros_like(x))
        expect = {(h + i, w + j, d) for i in (-1, 0, 1) for j in (-1, 0, 1)}
        assert _support(y) == expect


def test_local_pooling_and_upsampling_never_mix_slices():
    x = torch.zeros(1, 2, 8, 8, 8)
    x[0, :, 2:6, 1:7, 3] = torch.rand(2, 4, 6) + 0.5
    pooled = in_plane_pool(x)
    assert pooled.shape == (1, 2, 4, 4, 8)
    assert {p[2] for p in _support(pooled)} == {3}
    up = in_plane_upsample(pooled)
    assert up.shape == (1, 2, 8, 8, 8)
    assert {p[2] for p in _support(up)} == {3}


def test_original_adapter_and_global_path_do_mix_slices():
    """Contrast: the 3³ depthwise convs (original adapter, DualPath global path) reach the next slices."""
    for conv in (Adapter3D(16, 4).conv, DualPathAdapter3D(16, 4).global_conv):
        x = torch.zeros(1, 4, 8, 8, 8)
        x[0, :, 3, 4, 5] = 1.0
        with torch.no_grad():
            y = conv(x) - conv(torch.zeros_like(x))
        assert {p[2] for p in _support(y)} == {4, 5, 6}


def test_crop_axes_map_to_the_token_grid_depth_last():
    """A crop voxel at (d, h, w) changes the tokens around (h/4, w/4, d/4): D is the LAST token axis."""
    enc = randomize_(Sam3DAdapter(Sam3DAdapterConfig.tiny()), seed=4, std=0.2).image_encoder
    base = torch.zeros(1, 1, 32, 32, 32)
    for d, h, w in [(13, 22, 5), (5, 13, 22)]:
        x = base.clone()
        x[0, 0, d, h, w] = 100.0
        with torch.no_grad():
            diff = (stream_patch_embed(x, enc.patch_embed, enc.slice_embed, 4)
                    - stream_patch_embed(base, enc.patch_embed, enc.slice_embed, 4)).abs().sum(-1)[0]
        peak = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
        assert peak == (h // 4, w // 4, d // 4)
        assert all(abs(a - b) <= 1 for p in torch.nonzero(diff > 1e-6).tolist() for a, b in zip(p, peak))


def test_points_are_sampled_at_their_dhw_voxel():
    """points_dhw (d, h, w) in crop voxels sample the (H, W, D) feature grid at the matching token."""
    fmap = torch.zeros(1, 1, 8, 8, 8)
    fmap[0, 0, 1, 2, 5] = 1.0                                       # token h=1, w=2, d=5
    centre = torch.tensor([[[4 * 5 + 1.5, 4 * 1 + 1.5, 4 * 2 + 1.5]]])  # its centre as (d, h, w) crop voxels
    assert sample_at(fmap, points_to_grid(centre, 32)).item() == pytest.approx(1.0, abs=1e-6)
    swapped = centre[..., [0, 2, 1]]
    assert sample_at(fmap, points_to_grid(swapped, 32)).item() == pytest.approx(0.0, abs=1e-6)


def test_decoder_output_is_in_crop_dhw_order():
    """With the decoder reduced to 'copy the image branch', the foreground peak is at the crop's bright voxel."""
    model = Sam3DAdapter(Sam3DAdapterConfig.tiny()).eval()
    dec = model.mask_decoder
    with torch.no_grad():
        for p in dec.parameters():
            p.zero_()
        dec.fuse[0].weight[0, 4 * 8, 1, 1, 1] = 1.0                 # image channel -> fused channel 0
        dec.head.weight[1, 0, 1, 1, 1] = 1.0                        # fused channel 0 -> class 1
        crop = torch.zeros(1, 1, 32, 32, 32)
        crop[0, 0, 24:28, 6:10, 14:18] = 1.0                        # a bright block at d 24-27, h 6-9, w 14-17
        assert tuple(torch.nonzero(image_to_decoder(crop)[0, 0] == image_to_decoder(crop).max())[0].tolist()) \
            in {(h, w, d) for h in (3, 4) for w in (7, 8) for d in (12, 13)}
        logits = model(crop, torch.tensor([[[3.0, 3.0, 3.0]]]))
    fg = logits[0, 1] - logits[0, 0]
    peak = torch.nonzero(fg == fg.max()).float().mean(0)
    assert torch.allclose(peak, torch.tensor([25.5, 7.5, 15.5]), atol=1.0)


# ---------------------------------------------------------------------------------------------- predictor
def test_predictor_equals_the_full_forward_and_checks_inputs():
    torch.manual_seed(0)
    model = randomize_(Sam3DAdapter(Sam3DAdapterConfig.tiny()), seed=6, std=0.1).eval()
    pred = Sam3DAdapterPredictor(model)
    crop = torch.randn(1, 1, 32, 32, 32)
    feats = pred.encode(crop)
    assert feats.nbytes > 0 and len(feats.features) == 4
    for pts in ([[3.0, 4.0, 5.0]], [[3.0, 4.0, 5.0], [30.0, 2.0, 17.5]]):
        fg = pred.decode(feats, pts)
        with torch.no_grad():
            full = model(crop, torch.tensor([pts]))
        assert fg.shape == (32, 32, 32)
        assert (fg - (full[0, 1] - full[0, 0])).abs().max() <= 1e-4
    with pytest.raises(ValueError, match=r"\(1, 1, 32, 32, 32\) crop"):
        pred.encode(torch.randn(1, 1, 32, 32, 16))
    with pytest.raises(ValueError, match="inside the 32³ crop"):
        pred.decode(feats, [[40.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match="N >= 1"):
        pred.decode(feats, torch.zeros(0, 3))


def test_config_validation_and_round_trip():
    cfg = Sam3DAdapterConfig.tiny(adapter="dualpath")
    assert Sam3DAdapterConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="window_size"):
        Sam3DAdapterConfig.tiny(window_size=3)
    with pytest.raises(ValueError, match="adapter must be one of"):
        Sam3DAdapterConfig.vit_b(adapter="lora")
    with pytest.raises(ValueError, match="unknown 3DSAM-adapter config keys"):
        Sam3DAdapterConfig.from_dict({"depth": 12, "colour": "red"})
    full = Sam3DAdapterConfig.vit_b()
    assert (full.grid_size, full.rel_pos_length, full.sam_rel_pos_length(0), full.sam_rel_pos_length(2)) == (32, 15, 27, 127)


# ---------------------------------------------------------------------------------------------- memory
_STREAM_PEAK = r"""
import json, resource, sys, torch
torch.set_num_threads(2)
from SAM3DSegmentLib.models.sam3d_adapter.embedding import PatchEmbed2D, stream_patch_embed
pe = PatchEmbed2D(16, 192)  # the published 768 channels cost 4x the time; the volumes do not depend on it
se = torch.nn.Conv3d(192, 192, (1, 1, 16), stride=(1, 1, 16), groups=192)
x = torch.randn(1, 1, 128, 128, 128)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.inference_mode():
    y = stream_patch_embed(x, pe, se, 4)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"shape": list(y.shape), "peak_increase_mb": (after - before) / 1024}))
"""


def test_full_size_patch_embedding_streams_without_the_512_cubed_volume():
    """Published crop and upsampling (128³ -> 512³ -> 32³ tokens): the peak grows by far less than one 512³
    float32 volume (512 MiB), let alone the 3-channel 1.5 GiB one."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", _STREAM_PEAK], cwd=root, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["shape"] == [1, 32, 32, 32, 192]
    assert out["peak_increase_mb"] < 256, out


def test_chunked_inference_paths_equal_the_training_path(monkeypatch):
    """Inference runs attention over chunks of windows (with the shift mask as a view or gathered across the
    batch) and the MLP on token slabs in place; the training path does neither. Same numbers."""
    from SAM3DSegmentLib.models.sam3d_adapter import attention, encoder

    model = randomize_(Sam3DAdapter(Sam3DAdapterConfig.tiny()), seed=8, std=0.2)
    enc = model.image_encoder
    x = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.enable_grad():
        ref = [f.detach() for f in enc(x)]
    monkeypatch.setattr(attention, "_BIAS_CHUNK_ELEMENTS", 3 * 2 * 64 * 64)   # 3 windows of 8 per chunk
    monkeypatch.setattr(encoder, "_MLP_CHUNK_TOKENS", 3 * 64)                 # 3 rows of the 8³ grid per slab
    with torch.inference_mode():
        got = enc(x)
    assert all((a - b).abs().max() <= 1e-5 for a, b in zip(got, ref))
