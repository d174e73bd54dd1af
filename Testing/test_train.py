"""Headless training (SAM3DSegmentLib.train): config, data, loop, resume, PEFT, checkpoints, bad data."""
from __future__ import annotations

import errno
import glob
import json
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.dirname(__file__))
from _train_fixtures import TINY_ARCH, tiny_config, write_config, write_nnunet_dataset  # noqa: E402

from SAM3DSegmentLib.core.geometry import Volume  # noqa: E402
from SAM3DSegmentLib.io import read_volume, write_volume  # noqa: E402
from SAM3DSegmentLib.cli.train import main  # noqa: E402
from SAM3DSegmentLib.train import checkpointing  # noqa: E402
from SAM3DSegmentLib.train.config import ConfigError, apply_overrides, config_from_dict, load_config  # noqa: E402
from SAM3DSegmentLib.eval.reference_pipeline import reference_canonical  # noqa: E402
from SAM3DSegmentLib.train.data import DataError, prepare_dataset, resample_isotropic  # noqa: E402
from SAM3DSegmentLib.train.loop import system_check, train  # noqa: E402
from SAM3DSegmentLib.train.model import build_model  # noqa: E402
from SAM3DSegmentLib.train.optim import LRSchedule, make_param_groups  # noqa: E402
from SAM3DSegmentLib.train.samples import TrainTargets, normalize_ct  # noqa: E402

QUIET = lambda *a, **k: None  # noqa: E731


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_nnunet_dataset(str(tmp_path_factory.mktemp("ds") / "Dataset001_Phantoms"))


def _cfg(dataset, out, **over):
    return config_from_dict(tiny_config(dataset, str(out), **over))


# ------------------------------------------------------------------------------------------- config
def test_config_overrides_are_validated_against_the_schema(tmp_path):
    path = write_config(str(tmp_path / "c.json"), {"optim": {"lr": 0.001}, "loop": {"epochs": 3}})
    cfg = load_config(path, ["optim.lr=5e-4", "loop.click_mode=deepest", "data.roots=[\"a\",\"b\"]",
                             "model.arch_overrides.encoder_depth=2", "log.tensorboard=false"])
    assert cfg.optim.lr == 5e-4 and cfg.loop.epochs == 3 and cfg.loop.click_mode == "deepest"
    assert cfg.data.roots == ["a", "b"] and cfg.model.arch_overrides == {"encoder_depth": 2}
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['optim.lrr'\] \(did you mean 'optim.lr'\?\)"
                                          r".*known keys under optim"):
        apply_overrides(cfg, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="must be an integer"):
        apply_overrides(cfg, ["loop.epochs=abc"])
    with pytest.raises(ConfigError, match="click_mode"):
        apply_overrides(cfg, ["loop.click_mode=nearest"])
    bad = write_config(str(tmp_path / "bad.json"), {"optimizer": {}})
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['optimizer'\]"):
        load_config(bad)
    assert main([bad]) == 2  # the CLI reports it without a traceback


def test_cli_print_config(tmp_path, capsys):
    path = write_config(str(tmp_path / "c.json"), {"mode": "dualpath"})
    assert main([path, "--set", "adapter.bottleneck_ratio=0.25", "--print-config"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "dualpath" and out["adapter"]["bottleneck_ratio"] == 0.25


# --------------------------------------------------------------------------------------------- data
def test_preprocessing_reorients_resamples_and_caches(dataset, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    prep = prepare_dataset([dataset], cache, val_fraction=0.25, split_seed=1, log=QUIET)
    assert len(prep.cases) == 4 and len(prep.val_ids) == 1 and set(prep.train_ids).isdisjoint(prep.val_ids)
    assert len(prep.train_targets) == 6 and {t.value for t in prep.train_targets} == {1, 2}
    with np.load(prep.cases[0].path) as z:
        img, m = z["image"], z["ijk_to_ras"]
        assert z["label"].shape == img.shape
    assert img.dtype == np.int16 and np.allclose(np.linalg.norm(m[:3, :3], axis=0), 1.5)
    assert np.all(np.diag(m[:3, :3]) > 0)  # RAS canonical
    src = read_volume(os.path.join(dataset, "imagesTr", "case000_0000.nii.gz"))
    lo, hi = src.bounds_ras()
    centre_new = m[:3, :3] @ ((np.array(img.shape) - 1) / 2) + m[:3, 3]
    assert np.allclose(centre_new, (lo + hi) / 2, atol=0.8)  # same field of view
    # second run reuses the cache without reading any file
    import SAM3DSegmentLib.io.volumes as io

    def boom(path):
        raise AssertionError("cache miss")
    monkeypatch.setattr(io, "read_volume", boom)
    prep2 = prepare_dataset([dataset], cache, val_fraction=0.25, split_seed=1, log=QUIET)
    assert [c.path for c in prep2.cases] == [c.path for c in prep.cases]
    # a changed source file invalidates its entry
    p = os.path.join(dataset, "labelsTr", "case001.nii.gz")
    st = os.stat(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="cache miss"):
        prepare_dataset([dataset], cache, log=QUIET)


def test_canonical_reorientation_keeps_physical_positions():
    """The preprocessing reorients with the reference's ToCanonical (one implementation for both)."""
    arr = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)  # [k, j, i]
    m = np.array([[-1.0, 0, 0, 10], [0, 0, 2.0, -5], [0, -3.0, 0, 7], [0, 0, 0, 1]])  # i->-R, j->-S, k->+A
    vol = Volume(arr, m)
    can = reference_canonical(vol)
    assert np.allclose(can.directions, np.eye(3))
    for ijk in [(0, 0, 0), (5, 4, 3), (2, 1, 3)]:
        ras = vol.ijk_to_ras_points(np.array(ijk, float))
        i2, j2, k2 = np.rint(can.ras_to_ijk_points(ras)).astype(int)
        assert can.array[k2, j2, i2] == arr[ijk[2], ijk[1], ijk[0]]
    res = resample_isotropic(can, 1.5, "linear", np.float32)
    assert np.allclose(res.spacing, 1.5)


def test_samples_are_normalised_per_sample_cropped_on_the_target_and_seeded(dataset, tmp_path):
    prep = prepare_dataset([dataset], str(tmp_path / "c"), val_fraction=0.0, log=QUIET)
    ds = TrainTargets(prep.cases, prep.train_targets, 32, seed=0, flip=True, min_label_voxels=5)
    a, b = ds[(0, 3)], ds[(0, 3)]
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["label"], b["label"])
    assert a["image"].shape == (1, 32, 32, 32) and a["image"].dtype == np.float32
    assert a["label"].sum() > 5
    assert not np.array_equal(ds[(1, 3)]["image"], a["image"]) or not np.array_equal(ds[(2, 3)]["image"], a["image"])
    x = np.array([[-3000.0, -500.0], [100.0, 300.0]]).reshape(1, 2, 2)
    z = normalize_ct(x)
    assert np.isclose(z[0, 1, 0], -1.0) and np.isclose(z[0, 1, 1], 1.0)  # mean/std over voxels > 0 only
    assert np.isclose(z[0, 0, 0], (-1000 - 200) / 100)  # clamped to -1000 first


# --------------------------------------------------------------------------------------- optimiser
def test_param_groups_and_schedules(dataset, tmp_path):
    cfg = _cfg(dataset, tmp_path, optim={"lr": 1e-3, "weight_decay": 0.1})
    model, _, _ = build_model(cfg, QUIET)
    groups = {g["name"]: g for g in make_param_groups(model, cfg)}
    assert set(groups) == {"encoder", "encoder/no_decay", "decoder", "decoder/no_decay"}
    assert groups["decoder"]["lr"] == pytest.approx(1e-4) and groups["encoder"]["lr"] == 1e-3
    ids = {id(p) for p in groups["encoder/no_decay"]["params"]}
    enc = model.image_encoder
    assert id(enc.pos_embed) in ids and id(enc.blocks[0].norm1.weight) in ids
    assert id(enc.blocks[0].mlp.lin1.bias) in ids and id(enc.blocks[0].mlp.lin1.weight) not in ids
    assert groups["encoder/no_decay"]["weight_decay"] == 0.0 and groups["encoder"]["weight_decay"] == 0.1
    opt = torch.optim.AdamW(make_param_groups(model, cfg))
    c2 = apply_overrides(cfg, ["schedule.name=multistep", "schedule.milestones=[2,4]", "schedule.warmup_steps=4",
                               "loop.epochs=6"])
    s = LRSchedule(opt, c2, steps_per_epoch=2)
    assert s.factor(0) == pytest.approx(0.01) and s.factor(2) == pytest.approx(0.505)
    assert s.factor(4) == pytest.approx(0.1) and s.factor(8) == pytest.approx(0.01)
    c3 = apply_overrides(cfg, ["schedule.name=cosine", "loop.epochs=5", "schedule.min_lr_factor=0.1"])
    s3 = LRSchedule(opt, c3, steps_per_epoch=2)
    assert s3.factor(0) == pytest.approx(1.0) and s3.factor(10) == pytest.approx(0.1)
    assert s3.factor(5) == pytest.approx(0.55)
    c4 = apply_overrides(cfg, ["schedule.name=plateau", "schedule.plateau_patience=1"])
    s4 = LRSchedule(opt, c4, 2)
    for v in (0.5, 0.4, 0.4):
        s4.on_validation(v)
    assert s4.factor(3) == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------ training
def test_tiny_training_loss_falls_and_writes_everything(dataset, tmp_path):
    cfg = _cfg(dataset, tmp_path / "run", loop__epochs=5, checkpoint={"export_encoder": True})
    out = train(cfg, log=QUIET)
    losses = out["losses"]
    assert len(losses) == 15 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.02
    for name in ("latest.pt", "best.pt", "final.pt", "encoder.pt", "metrics.csv"):
        assert os.path.isfile(tmp_path / "run" / name), name
    rows = open(tmp_path / "run" / "metrics.csv").read().splitlines()
    assert sum(r.startswith("train,") for r in rows) == 15 and sum(r.startswith("val,") for r in rows) == 5
    assert len(out["val"]) == 5 and 0.0 <= out["best_dice"] <= 1.0
    # our checkpoints load with the models package (config stored)
    from SAM3DSegmentLib.models import load_checkpoint

    m = load_checkpoint(str(tmp_path / "run" / "final.pt"))
    assert m.config.encoder_embed_dim == TINY_ARCH["encoder_embed_dim"]
    enc = torch.load(tmp_path / "run" / "encoder.pt", weights_only=True)
    assert set(enc["image_encoder_state_dict"]) == set(m.image_encoder.state_dict())


def test_resume_reproduces_the_uninterrupted_run_exactly(dataset, tmp_path):
    over = dict(loop__epochs=2, loop__accumulate=2, schedule={"name": "cosine", "warmup_steps": 2},
                loop__click_mode="random")
    full = train(_cfg(dataset, tmp_path / "a", **over), log=QUIET)
    part1 = train(_cfg(dataset, tmp_path / "b", loop__max_steps=3, **over), log=QUIET)
    assert part1["stopped"] == "max_steps" and len(part1["losses"]) == 3
    part2 = train(_cfg(dataset, tmp_path / "b", checkpoint={"resume": "auto"}, **over), log=QUIET)
    assert len(full["losses"]) == 4
    assert part1["losses"] + part2["losses"] == full["losses"]  # bitwise-equal floats
    a = torch.load(tmp_path / "a" / "latest.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "latest.pt", weights_only=True)
    assert all(torch.equal(a["model_state_dict"][k], b["model_state_dict"][k]) for k in a["model_state_dict"])
    assert a["training"]["global_step"] == b["training"]["global_step"] == 4


@pytest.mark.parametrize("mode", ["adapter3d", "dualpath", "decoder"])
def test_peft_modes_freeze_exactly_and_merge(dataset, tmp_path, mode):
    from SAM3DSegmentLib.models import SamMed3DConfig, build_sam_med3d, load_checkpoint, save_checkpoint

    torch.manual_seed(7)
    base = build_sam_med3d(SamMed3DConfig.tiny(**TINY_ARCH))
    base_path = str(tmp_path / "base.pt")
    save_checkpoint(base, base_path)
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    out = train(_cfg(dataset, tmp_path / "run", mode=mode, model={"checkpoint": base_path}, loop__epochs=1,
                     optim={"lr": 1e-2, "weight_decay": 0.1}), log=QUIET)
    # independent count of the trainable set
    tmp = build_sam_med3d(SamMed3DConfig.tiny(**TINY_ARCH, adapter=None if mode == "decoder" else {"kind": mode}))
    total = sum(p.numel() for p in tmp.parameters())

    def trains(name):
        if mode == "decoder":
            return name.startswith(("prompt_encoder.", "mask_decoder."))
        p = name.split(".")
        return (".adapter." in name or (p[1] == "blocks" and p[3] in ("norm1", "norm2"))
                or name.startswith(("image_encoder.pos_embed", "image_encoder.neck.", "prompt_encoder.",
                                    "mask_decoder.")))
    n_train = sum(p.numel() for n, p in tmp.named_parameters() if trains(n))
    assert out["trainable"] == n_train and out["total"] == total
    assert out["trainable_fraction"] == pytest.approx(n_train / total)
    # partial checkpoints are small and hold only trainable tensors + config + base identity
    part = torch.load(tmp_path / "run" / "final.pt", weights_only=True)
    assert part["format"] == checkpointing.PARTIAL_FORMAT
    assert part["base"]["sha256"] == checkpointing.file_sha256(base_path)
    assert sum(v.numel() for v in part["trainable_state_dict"].values()) == n_train
    assert os.path.getsize(tmp_path / "run" / "final.pt") < os.path.getsize(base_path)
    merged_path = str(tmp_path / "merged.pt")
    assert main(["merge", str(tmp_path / "run" / "final.pt"), "-o", merged_path]) == 0
    merged = load_checkpoint(merged_path)
    assert (merged.config.adapter or {}).get("kind") == (None if mode == "decoder" else mode)
    sd = merged.state_dict()
    changed = []
    for k, v in base_sd.items():
        if k in part["trainable_state_dict"]:
            changed.append(not torch.equal(sd[k], v))
        else:
            assert torch.equal(sd[k], v), f"frozen tensor {k} changed"
    assert any(changed)
    if mode != "decoder":
        assert all(torch.equal(sd[k], part["trainable_state_dict"][k]) for k in part["trainable_state_dict"])
    # a wrong base is refused
    other = build_sam_med3d(SamMed3DConfig.tiny(**TINY_ARCH))
    save_checkpoint(other, str(tmp_path / "other.pt"))
    assert main(["merge", str(tmp_path / "run" / "final.pt"), "-o", str(tmp_path / "x.pt"),
                 "--base", str(tmp_path / "other.pt")]) == 1  # bad data: 1, as in every sam3d command
    assert not (tmp_path / "x.pt").exists()


def test_system_check_runs_two_steps(capsys):
    assert system_check("cpu", "auto", image_size=32) == 0
    out = capsys.readouterr().out
    assert "device: cpu" in out and "AMP: off" in out and "memory:" in out and "step 1:" in out


# ------------------------------------------------------------------------------------------ bad data
def _copy_dataset(src, dst, n=2):
    import shutil

    shutil.copytree(src, dst)
    for c in range(n, 4):
        os.remove(os.path.join(dst, "imagesTr", f"case{c:03d}_0000.nii.gz"))
        os.remove(os.path.join(dst, "labelsTr", f"case{c:03d}.nii.gz"))
    return dst


def test_geometry_mismatch_and_unreadable_files_are_reported(dataset, tmp_path):
    d = _copy_dataset(dataset, str(tmp_path / "d1"))
    lab_path = os.path.join(d, "labelsTr", "case001.nii.gz")
    lab = read_volume(lab_path)
    m = lab.ijk_to_ras.copy()
    m[:3, :3] *= 1.2
    write_volume(Volume(lab.array, m), lab_path)
    with pytest.raises(DataError, match=r"case case001: the label .* is not on the image grid.*Resample the label"):
        prepare_dataset([d], str(tmp_path / "c1"), log=QUIET)
    d2 = _copy_dataset(dataset, str(tmp_path / "d2"))
    with open(os.path.join(d2, "imagesTr", "case000_0000.nii.gz"), "wb") as f:
        f.write(b"not a nifti at all" * 10)
    with pytest.raises(DataError, match=r"case case000: cannot read the image .*case000_0000.nii.gz"):
        prepare_dataset([d2], str(tmp_path / "c2"), log=QUIET)
    os.remove(os.path.join(d2, "labelsTr", "case001.nii.gz"))
    with pytest.raises(DataError, match="label file .*case001.nii.gz is missing"):
        prepare_dataset([d2], str(tmp_path / "c3"), log=QUIET)
    with pytest.raises(DataError, match="does not exist"):
        prepare_dataset([str(tmp_path / "nope")], str(tmp_path / "c4"), log=QUIET)
    cfg = write_config(str(tmp_path / "cfg.json"), tiny_config(d, str(tmp_path / "run")))
    assert main([cfg]) == 1  # the CLI: a clear message, no traceback, nothing written but the cache


def test_empty_labels_are_skipped_with_a_warning_and_all_empty_is_an_error(dataset, tmp_path):
    d = _copy_dataset(dataset, str(tmp_path / "d"))
    for c in (0, 1):
        p = os.path.join(d, "labelsTr", f"case{c:03d}.nii.gz")
        v = read_volume(p)
        if c == 0:
            write_volume(v.with_array(np.zeros_like(v.array)), p)
    msgs = []
    prep = prepare_dataset([d], str(tmp_path / "c"), val_fraction=0.0, log=msgs.append)
    assert prep.skipped == ["case000"] and any("case000" in m and "empty" in m for m in msgs)
    p = os.path.join(d, "labelsTr", "case001.nii.gz")
    v = read_volume(p)
    write_volume(v.with_array(np.zeros_like(v.array)), p)
    with pytest.raises(DataError, match="no usable training targets"):
        prepare_dataset([d], str(tmp_path / "c2"), log=QUIET)


def test_full_disk_during_a_checkpoint_write_keeps_the_last_good_one(dataset, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(_cfg(dataset, out, loop__epochs=1), log=QUIET)
    latest = out / "latest.pt"
    good = latest.read_bytes()

    def full_disk(obj, f):
        f.write(b"\0" * 4096)  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpointing, "_serialize", full_disk)
    with pytest.raises(checkpointing.CheckpointWriteError, match="disk full .*previous file there .* is intact"):
        train(_cfg(dataset, out, loop__epochs=2, checkpoint={"resume": "auto"}), log=QUIET)
    assert latest.read_bytes() == good
    assert not glob.glob(str(out / ".*.tmp")), "temporary file left behind"
    monkeypatch.undo()
    res = train(_cfg(dataset, out, loop__epochs=2, checkpoint={"resume": "auto"}), log=QUIET)
    assert res["steps"] == 6  # resumed from the intact checkpoint at step 3


def _write_case(root, name, image: Volume, label: np.ndarray, binary=False):
    sub = ("imagesTr", "labelsTr")
    for s in sub:
        os.makedirs(os.path.join(root, s), exist_ok=True)
    img_name = f"{name}.nii.gz" if binary else f"{name}_0000.nii.gz"
    write_volume(image, os.path.join(root, "imagesTr", img_name))
    write_volume(image.with_array(label), os.path.join(root, "labelsTr", f"{name}.nii.gz"))


def _small_case(seed=0):
    from SAM3DSegmentLib.core.geometry import make_ijk_to_ras

    rng = np.random.default_rng(seed)
    img = Volume(rng.integers(-100, 100, size=(20, 24, 24)).astype(np.int16), make_ijk_to_ras((1.5, 1.5, 1.5)))
    lab = np.zeros(img.array.shape, np.uint8)
    lab[5:15, 6:18, 6:18] = 1  # 1440 voxels x 3.375 mm^3
    lab[1, 1, 1:3] = 2  # 2 voxels = 6.75 mm^3 < 10 mm^3: dropped
    return img, lab


def test_small_targets_dropped_binary_layout_and_explicit_validation_list(tmp_path):
    nn_root = str(tmp_path / "nn")
    for c in range(3):
        img, lab = _small_case(c)
        _write_case(nn_root, f"c{c}", img, lab)
    with open(os.path.join(nn_root, "dataset.json"), "w") as f:
        json.dump({"labels": {"background": 0, "organ": 1, "speck": 2}, "file_ending": ".nii.gz"}, f)
    prep = prepare_dataset([nn_root], str(tmp_path / "cache"), val_cases=["c1"], log=QUIET)
    assert prep.val_ids == ["c1"] and prep.train_ids == ["c0", "c2"]
    assert {t.value for t in prep.train_targets + prep.val_targets} == {1}  # the 2-voxel speck is dropped
    assert all(t.voxels == 1440 for t in prep.train_targets)
    with pytest.raises(DataError, match="not in the dataset"):
        prepare_dataset([nn_root], str(tmp_path / "cache"), val_cases=["c9"], log=QUIET)
    # the simple binary layout: equal names, any label > 0 is the target (here 1440 + 2 voxels)
    bin_root = str(tmp_path / "bin")
    for c in range(2):
        img, lab = _small_case(c)
        _write_case(bin_root, f"b{c}", img, lab, binary=True)
    prep_b = prepare_dataset([bin_root], str(tmp_path / "cache_b"), val_fraction=0.0, log=QUIET)
    assert [t.voxels for t in prep_b.train_targets] == [1442, 1442] and prep_b.train_targets[0].name == "foreground"
    # seeded fractional split: same seed same split, and it is a split of cases
    from SAM3DSegmentLib.train.data import split_cases

    ids = [f"x{i}" for i in range(20)]
    assert split_cases(ids, 0.2, seed=3) == split_cases(ids, 0.2, seed=3)
    tr, va = split_cases(ids, 0.2, seed=3)
    assert len(va) == 4 and sorted(tr + va) == sorted(ids) and split_cases(ids, 0.2, seed=4)[1] != va


def test_crops_with_too_few_label_voxels_resample_another_target(tmp_path):
    root = str(tmp_path / "nn")
    img, lab = _small_case(0)
    lab[lab == 2] = 0
    lab[18, 20, 20:23] = 2  # a 3-voxel target (10.1 mm^3, kept) far from the big one
    _write_case(root, "c0", img, lab)
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump({"labels": {"background": 0, "organ": 1, "small": 2}}, f)
    prep = prepare_dataset([root], str(tmp_path / "cache"), val_fraction=0.0, log=QUIET)
    small = [i for i, t in enumerate(prep.train_targets) if t.value == 2][0]
    ds = TrainTargets(prep.cases, prep.train_targets, 16, seed=0, flip=False, min_label_voxels=100)
    s = ds[(0, small)]
    assert s["target"] != small and s["label"].sum() > 100
    ds_all = TrainTargets(prep.cases, prep.train_targets, 16, seed=0, flip=False, min_label_voxels=0)
    assert ds_all[(0, small)]["target"] == small and ds_all[(0, small)]["label"].sum() == 3
    with pytest.warns(UserWarning, match="Lower data.min_crop_label_voxels"):
        TrainTargets(prep.cases, prep.train_targets, 16, min_label_voxels=10**6, max_tries=3)[(0, 0)]


def test_early_stopping_and_gradient_checkpointing(dataset, tmp_path):
    out = train(_cfg(dataset, tmp_path / "es", loop__epochs=6, optim={"lr": 0.0},
                     val={"every_epochs": 1, "click_steps": 2, "early_stopping_patience": 2}), log=QUIET)
    assert out["stopped"] == "early_stopping" and len(out["val"]) == 3  # no improvement after the first
    cfg = _cfg(dataset, tmp_path / "gc")
    torch.manual_seed(0)
    model, _, _ = build_model(cfg, QUIET)
    from SAM3DSegmentLib.train.interaction import InteractiveLoss

    x = torch.randn(1, 1, 32, 32, 32)
    y = (torch.rand(1, 1, 32, 32, 32) > 0.7).float()
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.image_encoder.grad_checkpointing = flag
        loss = InteractiveLoss(model, cfg, encoder_frozen=False)(x, y, [0], [0], 0)
        loss.backward()
        grads.append([p.grad.clone() for p in model.image_encoder.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_partial_adapter_checkpoints_resume_exactly(dataset, tmp_path):
    from SAM3DSegmentLib.models import SamMed3DConfig, build_sam_med3d, save_checkpoint

    torch.manual_seed(3)
    save_checkpoint(build_sam_med3d(SamMed3DConfig.tiny(**TINY_ARCH)), str(tmp_path / "base.pt"))
    over = dict(mode="dualpath", model={"checkpoint": str(tmp_path / "base.pt")}, loop__epochs=2,
                loop__accumulate=2, val={"every_epochs": 0})
    full = train(_cfg(dataset, tmp_path / "a", **over), log=QUIET)
    p1 = train(_cfg(dataset, tmp_path / "b", loop__max_steps=1, **over), log=QUIET)
    assert torch.load(tmp_path / "b" / "latest.pt", weights_only=True)["format"] == checkpointing.PARTIAL_FORMAT
    p2 = train(_cfg(dataset, tmp_path / "b", checkpoint={"resume": "auto"}, **over), log=QUIET)
    assert p1["losses"] + p2["losses"] == full["losses"] and len(full["losses"]) == 4


def test_shipped_demo_model_loads_and_segments_an_unseen_phantom():
    """docs/demo_model.md: the embedded model is a full checkpoint with its config and does segment."""
    from SAM3DSegmentLib.models import load_checkpoint
    from SAM3DSegmentLib.data.phantoms import synthetic_case
    from SAM3DSegmentLib.train.interaction import interact
    from SAM3DSegmentLib.eval.reference_pipeline import reference_crop_or_pad
    from SAM3DSegmentLib.train.losses import dice_score

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "SAM3DSegmentLib",
                        "resources", "demo_model.pt")
    model = load_checkpoint(path)
    assert model.config.name == "demo" and model.config.image_size == 128 and model.config.adapter is None
    assert sum(p.numel() for p in model.parameters()) == 2_084_308
    img, masks = synthetic_case(900, n_objects=2, spacing=(1.5, 1.5, 1.5), shape_ijk=(110, 110, 110))
    a = np.transpose(img.array, (2, 1, 0))  # (a, b, c) = (i, j, k): RAS-canonical grid already
    lab = np.transpose(masks["object_1"].array, (2, 1, 0)) > 0
    idx = np.argwhere(lab)
    centre = (idx.min(0) + idx.max(0)) // 2
    x = torch.as_tensor(normalize_ct(reference_crop_or_pad(a, centre, 128)[0]))[None, None]
    y = torch.as_tensor(reference_crop_or_pad(lab.astype(np.uint8), centre, 128)[0].astype(np.float32))[None, None]
    with torch.no_grad():
        _, pred, first = interact(model, model.image_encoder(x), y, 3, set(), "deepest", [None],
                                  compute_loss=False)
    assert float(dice_score(first, y[:, 0] > 0.5)[0]) > 0.5
    assert float(dice_score(pred, y[:, 0] > 0.5)[0]) > 0.5
