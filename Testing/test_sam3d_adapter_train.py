"""Training the 3DSAM-adapter family with ``sam3d train`` (model.family 3dsam_adapter): the tiny config's loss
falls on phantoms and its files load for clicking with identical logits; one step trains exactly the recipe's
tensors (both recipes); start points, normalisation, samples and resume."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from _sam3d_adapter_fixtures import randomize_  # noqa: E402
from _train_fixtures import write_nnunet_dataset  # noqa: E402
from SAM3DSegmentLib.core.intensity import WindowZNorm  # noqa: E402
from SAM3DSegmentLib.inference.backends import load_backend  # noqa: E402
from SAM3DSegmentLib.inference.backends_sam3d_adapter import Sam3DAdapterBackend  # noqa: E402
from SAM3DSegmentLib.models.sam3d_adapter import Sam3DAdapter, Sam3DAdapterConfig  # noqa: E402
from SAM3DSegmentLib.models.sam3d_adapter.files import load_model_file, save_model_file  # noqa: E402
from SAM3DSegmentLib.models.sam3d_adapter.recipes import adapter_parameters  # noqa: E402
from SAM3DSegmentLib.train.adapter_loop import AdapterTrainer  # noqa: E402
from SAM3DSegmentLib.train.adapter_samples import dataset_intensity  # noqa: E402
from SAM3DSegmentLib.train.config import ConfigError, load_config  # noqa: E402
from SAM3DSegmentLib.train.loop import train  # noqa: E402

CONFIG = "configs/3dsam_adapter_tiny.json"
#: a smaller crop than the tiny config's 32³ (same code paths, 4³ tokens): keeps each test to seconds
SMALL = ['model.arch_overrides={"image_size": 16}', "device=cpu", "threads=2", "data.make_demo_data=false",
         "log.print_every=0"]
STEADY = ["sam3d_adapter.positive_fraction=1.0", "sam3d_adapter.zoom_p=0.0", "sam3d_adapter.rot90=false",
          "sam3d_adapter.flip=false", "sam3d_adapter.hu_shift=0.0"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds3dsam")
    return write_nnunet_dataset(str(root), n_cases=3, shape_ijk=(36, 36, 24), spacing=(1.0, 1.0, 1.5), n_objects=2)


def config(dataset, out, *extra):
    return load_config(CONFIG, [f'data.roots=["{dataset}"]', f"output_dir={out}", *SMALL, *extra])


def test_the_tiny_config_is_the_family_and_recipe_it_says():
    raw = json.load(open(CONFIG))
    assert raw["model"] == {"family": "3dsam_adapter", "recipe": "original", "init": "", "arch": "tiny"}
    cfg = load_config(CONFIG)
    assert cfg.sam3d_adapter.weight_decay == 0.0 and cfg.sam3d_adapter.lr_end_factor == 0.01
    assert (cfg.sam3d_adapter.dice_weight, cfg.sam3d_adapter.ce_weight, cfg.sam3d_adapter.grad_clip) == (0.5, 0.5, 1.0)
    with pytest.raises(ConfigError, match="model.recipe"):
        load_config(CONFIG, ["model.recipe=lora"])


def test_tiny_training_loss_falls_and_the_model_file_clicks_identically(dataset, tmp_path):
    cfg = config(dataset, tmp_path / "run", *STEADY, "loop.epochs=1", "loop.samples_per_epoch=8",
                 "sam3d_adapter.lr=3e-3", "val.max_targets=1")
    out = train(cfg, log=lambda m: None)
    losses = out["losses"]
    assert len(losses) == 8 and np.mean(losses[-3:]) < 0.85 * np.mean(losses[:3]), losses
    for name in ("best.pt", "latest.pt", "final.pt", "metrics.csv"):
        assert (tmp_path / "run" / name).is_file(), name
    # save -> load -> identical logits, through the one load_backend path, with the run's normalisation
    trained = load_model_file(str(tmp_path / "run" / "final.pt"))
    backend, info = load_backend(checkpoint=str(tmp_path / "run" / "final.pt"), device="cpu")
    assert isinstance(backend, Sam3DAdapterBackend) and info["family"] == "3dsam_adapter"
    assert backend.intensity == WindowZNorm.from_dict(out["intensity"]) and backend.intensity.has_statistics
    crop = torch.randn(1, 1, 16, 16, 16)
    pts = torch.tensor([[[3.0, 4.0, 5.0], [8.0, 8.0, 9.0]]])
    with torch.no_grad():
        want = trained(crop, pts)
        got = backend.model(crop, pts)
    assert torch.equal(want, got)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("recipe", ["original", "dualpath"])
def test_one_step_trains_exactly_the_recipes_tensors(dataset, tmp_path, recipe):
    extra = []
    if recipe == "dualpath":  # the DualPath fine-tune starts from a trained 3DSAM-adapter file
        start = randomize_(Sam3DAdapter(Sam3DAdapterConfig.tiny(image_size=16)), seed=1, std=0.05)
        save_model_file(start, tmp_path / "trained.pth", intensity=WindowZNorm((-200, 300), 40.0, 90.0))
        extra = [f"model.init={tmp_path / 'trained.pth'}", "model.recipe=dualpath", "sam3d_adapter.dualpath_dim=8"]
    tr = AdapterTrainer(config(dataset, tmp_path / "run", *STEADY, *extra), log=lambda m: None)
    tr.setup()
    before = _snapshot(tr.model)
    trainable = {n for n, p in tr.model.named_parameters() if p.requires_grad}
    assert trainable == set(tr.init["trained"]) and trainable
    tr.step(tr.train_ds[(0, 0)])
    for n, p in tr.model.named_parameters():
        if n in trainable:
            assert p.grad is not None and not torch.equal(p.detach(), before[n]), n
        else:
            assert p.grad is None and torch.equal(p.detach(), before[n]), n
    if recipe == "dualpath":
        assert tr.model.config.adapter == "dualpath"
        assert not any(n.startswith(("prompt_encoder.", "mask_decoder.")) for n in trainable)
        assert {id(p) for p in tr.clipped} == {id(p) for p in adapter_parameters(tr.model)}
        assert tr.intensity == WindowZNorm((-200, 300), 40.0, 90.0)   # the start file's normalisation is kept
    else:
        assert {id(p) for p in tr.clipped} == {id(p) for p in tr.params}


def test_start_points_and_settings_are_checked(dataset, tmp_path):
    def refused(*extra, match):
        tr = AdapterTrainer(config(dataset, tmp_path / "x", *extra), log=lambda m: None)
        with pytest.raises(ConfigError, match=match):
            tr.setup()

    refused("model.init=SAM3DSegmentLib/resources/demo_model.pt", match="looks like a SAM-Med3D checkpoint")
    refused("mode=adapter3d", match="SAM-Med3D training mode")
    refused("loop.batch_size=2", match="batch 1")
    refused("data.spacing=1.5", match="1 mm crops")
    refused("sam3d_adapter.mean=10.0", match="give both or neither")
    refused("model.arch=vit_b_ori", "model.checkpoint=x.pt", match="model.init")
    refused("model.arch=small", match="not a 3DSAM-adapter preset")


def test_a_2d_sam_start_point_loads_for_the_original_recipe_only(dataset, tmp_path):
    from _sam3d_adapter_fixtures import tiny_sam_encoder

    enc = tiny_sam_encoder()
    torch.save({f"image_encoder.{k}": v for k, v in enc.state_dict().items()}, tmp_path / "sam2d.pth")
    # the tiny 2D SAM oracle is shaped for the 32³ tiny config
    base = [f'data.roots=["{dataset}"]', f"output_dir={tmp_path / 'r'}", "device=cpu", "data.make_demo_data=false",
            f"model.init={tmp_path / 'sam2d.pth'}"]
    tr = AdapterTrainer(load_config(CONFIG, base), log=lambda m: None)
    tr.setup()
    assert tr.init["init_kind"] == "sam_vit_b"
    assert torch.equal(tr.model.image_encoder.patch_embed.proj.weight, enc.patch_embed.proj.weight)
    with pytest.raises(ConfigError, match="dualpath recipe fine-tunes a TRAINED"):
        AdapterTrainer(load_config(CONFIG, base + ["model.recipe=dualpath"]), log=lambda m: None).setup()


def test_normalisation_comes_from_the_training_foreground_unless_given(dataset, tmp_path):
    tr = AdapterTrainer(config(dataset, tmp_path / "run"), log=lambda m: None)
    tr.setup()
    fg = []
    for t in tr.data.train_targets:
        with np.load(tr.data.cases[t.case_index].path) as z:
            fg.append(z["image"][z["label"] == t.value].astype(np.float32))
    fg = np.concatenate(fg)
    lo, hi = np.percentile(fg, (0.5, 99.5))
    clipped = np.clip(fg, lo, hi)
    got = tr.intensity
    np.testing.assert_allclose(got.window, (lo, hi), rtol=1e-6)
    np.testing.assert_allclose((got.mean, got.std), (clipped.mean(), clipped.std()), rtol=1e-4)
    s = tr.cfg.sam3d_adapter.model_copy(update={"window": [-100.0, 100.0], "mean": 5.0, "std": 7.0})
    assert dataset_intensity(tr.data.cases, tr.data.train_targets, s) == WindowZNorm((-100, 100), 5.0, 7.0)
    # a sample is the crop in the model's [d, h, w] = [c, b, a] order, normalised, with points in its foreground
    item = tr.train_ds[(0, 0)]
    assert item["image"].shape == item["label"].shape == (1, 16, 16, 16) and item["points"].shape == (30, 3)
    fg_pts = item["points"][:10].astype(int)
    assert item["label"][0][tuple(fg_pts.T)].all()


def test_resume_continues_the_same_run(dataset, tmp_path):
    common = [*STEADY, "loop.samples_per_epoch=2", "val.every_epochs=0"]
    whole = train(config(dataset, tmp_path / "whole", *common, "loop.epochs=2"), log=lambda m: None)
    first = train(config(dataset, tmp_path / "split", *common, "loop.epochs=2", "loop.max_steps=2"),
                  log=lambda m: None)
    assert first["stopped"] == "max_steps" and first["epoch"] == 1   # stopped at the end of epoch 0
    resumed = train(config(dataset, tmp_path / "split", *common, "loop.epochs=2", "checkpoint.resume=auto"),
                    log=lambda m: None)
    assert resumed["steps"] == whole["steps"] == 4 and resumed["losses"] == whole["losses"][2:]
    a = load_model_file(str(tmp_path / "whole" / "final.pt")).state_dict()
    b = load_model_file(str(tmp_path / "split" / "final.pt")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert os.path.isfile(tmp_path / "split" / "latest.pt")
