"""3DSAM-adapter checkpoints: the 2D segment-anything ViT-B start point and the published format."""
from __future__ import annotations

from functools import partial

import pytest

torch = pytest.importorskip("torch")

from _sam3d_adapter_fixtures import randomize_, sam_modeling, tiny_sam_encoder  # noqa: E402
from SAM3DSegmentLib.models.checkpoint import CheckpointError  # noqa: E402
from SAM3DSegmentLib.models.sam3d_adapter import (Sam3DAdapter, Sam3DAdapterConfig, load_published,  # noqa: E402
                                                  load_sam_vit_b, published_state, save_published, to_dualpath)

NEW_PARTS = ("depth_embed", "slice_embed.", ".adapter.", ".attn.rel_pos_d", ".attn.lr", "neck_3d.", ".attn_mask")


def _expected_missing(model):
    """Encoder keys of the published format that the 2D SAM does not have (listed independently)."""
    keys = list(model.image_encoder.state_dict()) + [f"blocks.{i}.attn_mask" for i in model.config.shifted_blocks]
    return sorted(k for k in keys if any(p in "." + k for p in NEW_PARTS))


def _tiny_sam_checkpoint(tmp_path, seed=0):
    m = sam_modeling()
    enc = tiny_sam_encoder(seed)
    pe = m.PromptEncoder(embed_dim=16, image_embedding_size=(16, 16), input_image_size=(256, 256), mask_in_chans=4)
    dec = m.MaskDecoder(transformer_dim=16, transformer=m.TwoWayTransformer(depth=1, embedding_dim=16, num_heads=2,
                                                                           mlp_dim=32), num_multimask_outputs=3)
    sam = m.Sam(image_encoder=enc, prompt_encoder=pe, mask_decoder=dec)
    path = tmp_path / "sam_tiny.pth"
    torch.save(sam.state_dict(), path)
    return sam, path


# ---------------------------------------------------------------------------------------------- 2D SAM
def test_sam_vit_b_loads_strictly_and_reports_exactly_the_new_parts(tmp_path):
    sam, path = _tiny_sam_checkpoint(tmp_path)
    model = Sam3DAdapter(Sam3DAdapterConfig.tiny())
    report = load_sam_vit_b(model, path)
    assert report["missing"] == _expected_missing(model)
    sam_keys = sam.state_dict()
    assert report["unused"] == sorted(k for k in sam_keys if k.startswith(("image_encoder.neck.", "prompt_encoder.",
                                                                           "mask_decoder.")))
    assert len(report["loaded"]) == sum(1 for k in sam_keys if k.startswith("image_encoder.")) - 6  # less neck.*
    ours = model.image_encoder.state_dict()
    for k in report["loaded"]:
        assert torch.equal(ours[k], sam_keys["image_encoder." + k]), k
    for blk in model.image_encoder.blocks:
        assert torch.equal(blk.attn.rel_pos_d, (blk.attn.rel_pos_h + blk.attn.rel_pos_w) / 2)
        assert blk.attn.lr.item() == 1.0


def test_full_size_sam_vit_b_key_mapping_on_meta():
    m = sam_modeling()
    with torch.device("meta"):
        sam_enc = m.ImageEncoderViT(depth=12, embed_dim=768, img_size=1024, mlp_ratio=4,
                                    norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=12, patch_size=16,
                                    qkv_bias=True, use_rel_pos=True, global_attn_indexes=(2, 5, 8, 11),
                                    window_size=14, out_chans=256)
        model = Sam3DAdapter(Sam3DAdapterConfig.vit_b())
    sd = {"image_encoder." + k: v for k, v in sam_enc.state_dict().items()}
    report = load_sam_vit_b(model, sd)
    assert len(report["loaded"]) == 171 and len(report["unused"]) == 6
    assert report["missing"] == _expected_missing(model)
    assert len(report["missing"]) == 1 + 2 + 6 + 12 * 6 + 12 + 12 + 24  # depth, slice, masks, adapters, d, lr, neck


def test_sam_vit_l_is_refused_with_the_reason():
    m = sam_modeling()
    with torch.device("meta"):
        big = m.ImageEncoderViT(depth=24, embed_dim=1024, num_heads=16, use_rel_pos=True,
                                global_attn_indexes=(5, 11, 17, 23), window_size=14)
        model = Sam3DAdapter(Sam3DAdapterConfig.vit_b())
    with pytest.raises(CheckpointError, match="ViT-L is 1024.*sam_vit_b_01ec64.pth"):
        load_sam_vit_b(model, {"image_encoder." + k: v for k, v in big.state_dict().items()})


def test_incomplete_sam_encoder_is_refused(tmp_path):
    sam, _ = _tiny_sam_checkpoint(tmp_path)
    sd = {k: v for k, v in sam.state_dict().items() if k != "image_encoder.blocks.2.attn.qkv.weight"}
    with pytest.raises(CheckpointError, match=r"1 missing keys \[blocks.2.attn.qkv.weight\]"):
        load_sam_vit_b(Sam3DAdapter(Sam3DAdapterConfig.tiny()), sd)


# ---------------------------------------------------------------------------------------------- published
def test_full_size_published_layout_on_meta():
    state = published_state(_meta_model())
    enc = state["encoder_dict"]
    assert len(enc) == 300 and len(state["decoder_dict"]) == 10
    assert len(state["feature_dict"]) == 4 and all(len(f) == 75 for f in state["feature_dict"])
    masks = [k for k in enc if k.endswith("attn_mask")]
    assert masks == [f"blocks.{i}.attn_mask" for i in (0, 2, 4, 6, 8, 10)]
    assert all(enc[k].shape == (64, 512, 512) for k in masks)
    assert sum(enc[k].numel() * 4 for k in masks) == 402_653_184            # the 403 MB of the published files
    assert all(f["pe_layer.positional_encoding_gaussian_matrix"].shape == (3, 128) for f in state["feature_dict"])


def _meta_model(**overrides):
    with torch.device("meta"):
        return Sam3DAdapter(Sam3DAdapterConfig.vit_b(**overrides))


@pytest.mark.parametrize("adapter", ["original", "dualpath"])
def test_published_round_trip_is_strict_and_logits_identical(tmp_path, adapter):
    torch.manual_seed(0)
    cfg = Sam3DAdapterConfig.tiny(adapter=adapter)
    model = randomize_(Sam3DAdapter(cfg), seed=3, std=0.1).eval()
    path = tmp_path / "model.pth"
    save_published(model, path)
    raw = torch.load(path, weights_only=True)
    assert sorted(raw) == ["decoder_dict", "encoder_dict", "feature_dict"]
    assert len(raw["encoder_dict"]) == len(model.image_encoder.state_dict()) + 2     # tiny: 2 shifted blocks
    loaded = load_published(path, config=cfg)
    assert loaded.config == cfg
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    crop, pts = torch.randn(1, 1, 32, 32, 32), torch.tensor([[[4.0, 9.0, 20.0]]])
    with torch.no_grad():
        assert torch.equal(model(crop, pts), loaded(crop, pts))


def test_unused_prompt_encoders_survive_load_and_save(tmp_path):
    cfg = Sam3DAdapterConfig.tiny()
    state = published_state(randomize_(Sam3DAdapter(cfg), seed=4))
    others = [randomize_(Sam3DAdapter(cfg), seed=10 + i).prompt_encoder.state_dict() for i in range(3)]
    state["feature_dict"] = others + [state["feature_dict"][3]]
    loaded = load_published(state, config=cfg)
    again = published_state(loaded)
    for i in range(3):
        assert all(torch.equal(again["feature_dict"][i][k], others[i][k]) for k in others[i])
    assert all(torch.equal(again["feature_dict"][3][k], v) for k, v in state["feature_dict"][3].items())


def test_save_never_clobbers(tmp_path):
    model = Sam3DAdapter(Sam3DAdapterConfig.tiny())
    path = tmp_path / "keep.pth"
    path.write_bytes(b"user data")
    with pytest.raises(FileExistsError, match="already exists"):
        save_published(model, path)
    assert path.read_bytes() == b"user data"
    save_published(model, path, overwrite=True)
    assert load_published(path, config=Sam3DAdapterConfig.tiny()) is not None
    assert [p.name for p in tmp_path.iterdir()] == ["keep.pth"]                 # no temporary left behind


def _state(cfg=None):
    return published_state(Sam3DAdapter(cfg or Sam3DAdapterConfig.tiny()))


@pytest.mark.parametrize("damage, message", [
    (lambda s: s["encoder_dict"].pop("depth_embed"), r"encoder_dict: 1 missing keys \[depth_embed\]"),
    (lambda s: s["decoder_dict"].__setitem__("bias", torch.zeros(2)), r"decoder_dict: 1 unexpected keys \[bias\]"),
    (lambda s: s["encoder_dict"].__setitem__("pos_embed", torch.zeros(1, 8, 8, 32)),
     r"pos_embed: file \(1, 8, 8, 32\) vs model \(1, 16, 16, 32\)"),
    (lambda s: s["feature_dict"].pop(0), "feature_dict must be a list of 4 prompt encoders, got list of 3"),
    (lambda s: s["feature_dict"][1].pop("global_query"), r"feature_dict\[1\]: 1 missing keys \[global_query\]"),
])
def test_damaged_published_files_are_refused(damage, message):
    state = _state()
    damage(state)
    with pytest.raises(CheckpointError, match=message):
        load_published(state, config=Sam3DAdapterConfig.tiny())


def test_a_different_window_layout_is_refused():
    state = _state()
    state["encoder_dict"]["blocks.2.attn_mask"] = torch.zeros_like(state["encoder_dict"]["blocks.2.attn_mask"])
    with pytest.raises(CheckpointError, match=r"blocks.2.attn_mask differ from the shifted-window mask"):
        load_published(state, config=Sam3DAdapterConfig.tiny())


def test_the_adapter_kind_is_detected_and_checked():
    cfg = Sam3DAdapterConfig.tiny()
    dual = _state(Sam3DAdapterConfig.tiny(adapter="dualpath"))
    with pytest.raises(CheckpointError, match="original adapter.*unexpected keys"):
        load_published(dual, config=cfg)
    # without a config, the published ViT-B with the file's adapter kind and width is assumed
    with pytest.raises(CheckpointError, match=r"3dsam_adapter_vit_b \(dualpath adapter\)"):
        load_published(dual)


def test_other_files_are_refused_with_what_they_are(tmp_path):
    sam, sam_path = _tiny_sam_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="2D segment-anything checkpoint.*start point"):
        load_published(sam_path)
    med = tmp_path / "sam_med3d.pth"
    torch.save({"model_state_dict": {"image_encoder.pos_embed": torch.zeros(1)}, "epoch": 3}, med)
    with pytest.raises(CheckpointError, match="SAM-Med3D checkpoint"):
        load_published(med)
    with pytest.raises(CheckpointError, match="holds a list, not a dict"):
        load_published([1, 2])
    bare = Sam3DAdapter(Sam3DAdapterConfig.tiny()).image_encoder.state_dict()
    with pytest.raises(CheckpointError, match="bare image-encoder state dict"):
        load_published(bare)
    junk = tmp_path / "page.pth"
    junk.write_text("<html>not found</html>")
    with pytest.raises(CheckpointError, match="HTML page"):
        load_published(junk)


def test_dualpath_fine_tune_start_from_a_trained_checkpoint(tmp_path):
    """Published original-adapter model -> to_dualpath keeps every non-adapter tensor."""
    cfg = Sam3DAdapterConfig.tiny()
    trained = randomize_(Sam3DAdapter(cfg), seed=5)
    save_published(trained, tmp_path / "orig.pth")
    model = to_dualpath(load_published(tmp_path / "orig.pth", config=cfg), mid=8)
    before = trained.state_dict()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in after if ".adapter." not in k)
    assert sorted(k for k in after if ".adapter." in k) != sorted(k for k in before if ".adapter." in k)
