"""PEFT adapters (models/adapters.py): shapes, axis conventions, exact identity at init, trainability."""
from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from SAM3DSegmentLib.models import SamMed3DConfig, build_sam_med3d  # noqa: E402
from SAM3DSegmentLib.models.adapters import (Adapter3D, DualPathAdapter, apply_adapters,  # noqa: E402
                                             count_parameters, mark_trainable)

KINDS = ("adapter3d", "dualpath")


def _tiny(**kw):
    return SamMed3DConfig.tiny(image_size=64, **kw)  # 4^3 tokens


@pytest.mark.parametrize("cls", [Adapter3D, DualPathAdapter])
def test_shapes_and_bottleneck(cls):
    a = cls(dim=24, hidden=12, kernel_size=3, init_seed=0)
    x = torch.randn(2, 5, 4, 3, 24)  # (B, D, H, W, C) channels-last, non-cubic grid
    y = a(x)
    assert y.shape == x.shape
    assert a.body.down.weight.shape == (12, 24) and a.body.up.weight.shape == (24, 12)
    conv = a.body.conv if cls is Adapter3D else a.body.global_conv
    assert conv.weight.shape == (12, 1, 3, 3, 3) and conv.groups == 12  # depthwise 3x3x3


def test_dualpath_local_kernel_spans_the_axial_plane_impulse():
    """Token grid axes (D, H, W) = (a, b, c) = (R, A, S): the local path must mix only within (a, b)."""
    torch.manual_seed(0)
    a = DualPathAdapter(dim=8, hidden=4, kernel_size=3, init_seed=1)
    body = a.body
    assert body.local1.dw.weight.shape == (4, 1, 3, 3, 1)
    # isolate the local path: no InstanceNorm coupling, global path off
    for unit in (body.local1, body.local2, body.local12):
        unit.norm = nn.Identity()
    with torch.no_grad():
        body.global_conv.weight.zero_()
        body.global_conv.bias.zero_()
    x0 = torch.zeros(1, 7, 7, 7, 8)
    x1 = x0.clone()
    x1[0, 3, 3, 3, 0] = 1.0  # impulse at token (a, b, c) = (3, 3, 3), fed channels-last
    with torch.no_grad():
        diff = (body(x1) - body(x0)).abs().sum(-1)[0]  # (a, b, c)
    changed = diff > 1e-7
    assert changed[3, 3, 3]
    assert changed[:, :, 3].sum() > 1 and changed[2, 3, 3] and changed[4, 3, 3] and changed[3, 2, 3] and changed[3, 4, 3]
    off_plane = changed.clone()
    off_plane[:, :, 3] = False
    assert not off_plane.any(), "the local path leaked out of the axial (a, b) plane"
    # the global path, in contrast, is 3D: it reaches the neighbouring S slices
    g = Adapter3D(dim=8, hidden=4, kernel_size=3, init_seed=2).body
    with torch.no_grad():
        dg = (g(x1) - g(x0)).abs().sum(-1)[0] > 1e-7
    assert dg[3, 3, 2] and dg[3, 3, 4] and dg[2, 3, 3] and dg[3, 2, 3]
    assert not dg[3, 3, 5] and not dg[5, 3, 3]  # 3x3x3 support only


@pytest.mark.parametrize("kind", KINDS)
def test_fresh_adapters_leave_the_model_output_exactly_unchanged(kind):
    torch.manual_seed(0)
    model = build_sam_med3d(_tiny()).eval()
    plain = copy.deepcopy(model)
    cfg = {"kind": kind, "bottleneck_ratio": 0.5, "init_seed": 3}
    model.config.adapter = cfg
    apply_adapters(model, cfg)
    keys_plain = set(plain.state_dict())
    keys = set(model.state_dict())
    assert keys_plain < keys and all(".adapter.body." in k for k in keys - keys_plain)
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        e0, e1 = plain.image_encoder(x), model.image_encoder(x)
        assert torch.equal(e0, e1)  # bitwise
        m = torch.zeros(1, 1, 16, 16, 16)
        p = torch.tensor([[[20.0, 30.0, 40.0]]])
        l = torch.ones(1, 1, dtype=torch.long)
        assert torch.equal(plain.predict_low_res(e0, p, l, m), model.predict_low_res(e1, p, l, m))
    # the adapters are not no-ops: perturbing their weights changes the output
    with torch.no_grad():
        model.image_encoder.blocks[0].adapter.body.up.weight.add_(0.1)
        assert not torch.equal(model.image_encoder(x), e0)


@pytest.mark.parametrize("kind", KINDS)
def test_one_optimizer_step_changes_every_adapter_tensor(kind):
    torch.manual_seed(0)
    model = build_sam_med3d(_tiny())
    cfg = {"kind": kind, "activation": "relu" if kind == "adapter3d" else "gelu"}
    model.config.adapter = cfg
    apply_adapters(model, cfg)
    mark_trainable(model, kind)
    names = [n for n, _ in model.named_parameters() if ".adapter." in n]
    assert names and all(dict(model.named_parameters())[n].requires_grad for n in names)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".adapter." in n}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    x = torch.randn(1, 1, 64, 64, 64)
    emb = model.image_encoder(x)
    logits = model.predict_low_res(emb, torch.tensor([[[30.0, 30.0, 30.0]]]), torch.ones(1, 1, dtype=torch.long),
                                   torch.zeros(1, 1, 16, 16, 16))
    (logits.float() ** 2).mean().backward()
    zero_grad = [n for n, p in model.named_parameters() if ".adapter." in n and
                 (p.grad is None or not torch.any(p.grad != 0))]
    assert not zero_grad, f"adapter tensors without gradient: {zero_grad}"
    opt.step()
    unchanged = [n for n, p in model.named_parameters() if ".adapter." in n and torch.equal(before[n], p)]
    assert not unchanged, f"adapter tensors unchanged after one step: {unchanged}"


def test_a_zero_initialised_up_projection_would_not_train_the_tensors_before_it():
    """Why the delta parametrisation: the naive identity init starves every tensor before the up-projection."""
    torch.manual_seed(0)
    down, up = nn.Linear(8, 4), nn.Linear(4, 8)
    nn.init.zeros_(up.weight)
    nn.init.zeros_(up.bias)
    x = torch.randn(3, 8)
    (x + up(torch.relu(down(x)))).pow(2).sum().backward()
    assert torch.count_nonzero(down.weight.grad) == 0  # exactly zero: it would not move in step 1
    a = Adapter3D(dim=8, hidden=4, init_seed=0)
    xa = torch.randn(1, 3, 3, 3, 8)
    a(xa).pow(2).sum().backward()
    assert torch.count_nonzero(a.body.down.weight.grad) > 0


def test_rebuilt_adapters_reproduce_the_frozen_snapshot_and_detect_a_different_one():
    torch.manual_seed(0)
    cfg = _tiny(adapter={"kind": "dualpath", "init_seed": 5})
    m1 = build_sam_med3d(cfg)  # build_sam_med3d applies config.adapter
    fp = cfg.adapter["theta0_sha256"]
    with torch.no_grad():  # "train" the adapters a bit
        for n, p in m1.named_parameters():
            if ".adapter." in n:
                p.add_(0.01 * torch.randn_like(p))
    cfg2 = _tiny(adapter={"kind": "dualpath", "init_seed": 5, "theta0_sha256": fp})
    m2 = build_sam_med3d(cfg2)
    m2.load_state_dict(m1.state_dict(), strict=True)
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        assert torch.equal(m1.eval().image_encoder(x), m2.eval().image_encoder(x))
    with pytest.raises(RuntimeError, match="snapshot"):
        build_sam_med3d(_tiny(adapter={"kind": "dualpath", "init_seed": 6, "theta0_sha256": fp}))
    with pytest.raises(ValueError, match="kind"):
        apply_adapters(build_sam_med3d(_tiny()), {"kind": "lora"})


@pytest.mark.parametrize("kind", KINDS)
def test_trainable_set_of_the_peft_modes(kind):
    model = build_sam_med3d(_tiny(adapter={"kind": kind}))
    n_train, n_total = mark_trainable(model, kind)
    expected = 0
    for name, p in model.named_parameters():
        parts = name.split(".")
        is_adapter = ".adapter." in name
        is_norm = parts[:2] == ["image_encoder", "blocks"] and parts[3] in ("norm1", "norm2")
        is_other = name.startswith(("image_encoder.pos_embed", "image_encoder.neck.", "prompt_encoder.",
                                    "mask_decoder."))
        want = is_adapter or is_norm or is_other
        assert p.requires_grad == want, name
        expected += p.numel() if want else 0
    assert n_train == expected and n_total == sum(p.numel() for p in model.parameters())
    assert not model.image_encoder.blocks[0].attn.qkv.weight.requires_grad
    assert not model.image_encoder.patch_embed.proj.weight.requires_grad
    # flags narrow the set
    n2, _ = mark_trainable(model, kind, {"train_prompt_decoder": False, "train_neck": False})
    assert n2 < n_train
    assert count_parameters(model)[0] == n2
