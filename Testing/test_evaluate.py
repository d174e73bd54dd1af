"""`sam3d evaluate`: click simulator, both protocols with a stub model, outputs, dataset discovery, CLI."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from SAM3DSegmentLib.eval.clicker import deepest_point, next_click, next_click_index, random_error_click
from SAM3DSegmentLib.data.datasets import DataError, label_names
from SAM3DSegmentLib.eval.cases import Case, EvaluationError, discover_dataset, load_case
from SAM3DSegmentLib.cli.evaluate import main
from SAM3DSegmentLib.eval.evaluate import run_evaluation
from SAM3DSegmentLib.eval.protocols import LEGACY_LABEL, EvalConfig, upsample_logits
from SAM3DSegmentLib.data.phantoms import sphere_phantom


# ------------------------------------------------------------------------------------ the stub
class GrowingBallBackend:
    """A test double of the MODEL only (the engine, regions and metrics are the real ones).

    ``encode`` keeps the bright half of the input (its "object"), pooled to the low-res grid. Each
    ``decode`` starts from the previous low-res logits and, for every prompt point, adds (positive) or
    removes (negative) a ball of ``radius`` low-res voxels restricted to the bright voxels. One click
    therefore never covers a larger object and corrective clicks improve the prediction.
    """

    def __init__(self, image_size: int = 64, radius: float = 2.0):
        self.image_size = image_size
        self.low_res_size = image_size // 4
        self.radius = radius
        self.name = "growing-ball stub"
        self.encodes = 0
        self.decodes = 0

    def encode(self, image):
        self.encodes += 1
        image = np.asarray(image, dtype=np.float32)
        assert image.shape == (self.image_size,) * 3
        thr = 0.5 * (float(image.max()) + float(image.min()))
        s = self.low_res_size
        pooled = (image > thr).reshape(s, 4, s, 4, s, 4).mean(axis=(1, 3, 5))
        return pooled > 0.5

    def decode(self, embedding, points, labels, mask_logits):
        self.decodes += 1
        s = self.low_res_size
        pred = np.zeros((s, s, s), bool) if mask_logits is None else np.asarray(mask_logits) > 0
        grid = np.stack(np.meshgrid(*(np.arange(s),) * 3, indexing="ij"), axis=-1).astype(np.float64)
        for p, lab in zip(np.asarray(points, float).reshape(-1, 3), np.asarray(labels).reshape(-1)):
            if lab < 0:
                continue
            u = (p + 0.5) / 4.0 - 0.5  # crop index -> low-res index (align_corners=False)
            ball = ((grid - u) ** 2).sum(axis=-1) <= self.radius ** 2
            pred = (pred | (ball & embedding)) if lab == 1 else (pred & ~ball)
        return np.where(pred, 6.0, -6.0).astype(np.float32)


def _sphere_case(radius_mm=14.0):
    image, mask = sphere_phantom(shape_ijk=(48, 48, 40), spacing=(1.0, 1.0, 1.2), radius_mm=radius_mm,
                                 hu_inside=120.0, hu_background=-200.0, noise=5.0, seed=1)
    return Case("sphere", image, {"ball": np.asarray(mask.array) != 0})


def _config(**kw):
    base = dict(clicks=5, spacing_mm=1.0, nsd_tolerance_mm=2.0, model={"name": "stub"},
                data={"name": "phantom"})
    base.update(kw)
    return EvalConfig(**base)


# ------------------------------------------------------------------------------------ clicker
def test_first_click_is_the_centre_of_a_sphere():
    n = 31
    g = np.stack(np.meshgrid(*(np.arange(n),) * 3, indexing="ij"), -1)
    gt = ((g - np.array([12, 15, 17])) ** 2).sum(-1) <= 8 ** 2  # [k, j, i] centre k=12, j=15, i=17
    click = next_click(gt, np.zeros_like(gt), (1.0, 1.0, 1.0))
    assert click.positive is True
    assert click.ijk == (17, 15, 12)  # (i, j, k): reversed array order
    assert next_click(gt, None, (1.0, 1.0, 1.0)) == click
    assert next_click(gt, gt, (1.0, 1.0, 1.0)) is None  # nothing to correct


def test_depth_uses_physical_spacing_per_array_axis():
    gt = np.zeros((40, 40, 40), bool)
    gt[2:9, 2:9, 2:9] = True        # A: 7x7x7 voxels
    gt[20:23, 15:28, 15:28] = True  # B: 3 slices x 13 x 13
    # Isotropic: A is deeper (4 vs 2 voxels). Slices 3 mm apart: A 4 mm (in-plane), B 6 mm (2 slices).
    assert next_click_index(gt, None, (1.0, 1.0, 1.0)).ijk == (5, 5, 5)
    assert next_click_index(gt, None, (3.0, 1.0, 1.0)).ijk == (21, 21, 21)
    idx, depth = deepest_point(gt[20:23, 15:28, 15:28], (3.0, 1.0, 1.0))
    assert idx == (1, 6, 6) and depth == pytest.approx(6.0)


def test_corrections_go_to_the_larger_error_region_with_the_right_sign():
    gt = np.zeros((40, 40, 40), bool)
    gt[5:35, 5:35, 5:35] = True
    # Large false-negative hole + a small false-positive speck: positive click in the hole's centre.
    pred = gt.copy()
    pred[10:20, 10:20, 10:20] = False
    pred[0:2, 0:2, 36:38] = True
    c = next_click(gt, pred, (1.0, 1.0, 1.0))
    assert c.positive is True
    k, j, i = c.ijk[2], c.ijk[1], c.ijk[0]
    assert 13 <= k <= 16 and 13 <= j <= 16 and 13 <= i <= 16 and not pred[k, j, i] and gt[k, j, i]
    # Large false-positive slab + a small hole: negative click in the slab.
    pred = gt.copy()
    pred[5:35, 5:35, 35:40] = True   # 5 voxels thick outside the object
    pred[20, 20, 20] = False
    c = next_click(gt, pred, (1.0, 1.0, 1.0))
    assert c.positive is False
    i, j, k = c.ijk
    assert pred[k, j, i] and not gt[k, j, i] and i == 37  # mid-thickness of the slab


def test_clicks_are_deterministic_and_random_clicks_reproducible():
    gt = np.zeros((20, 20, 20), bool)
    gt[4:16, 4:16, 4:16] = True  # even size: 8 voxels tie for deepest
    a = next_click(gt, None, (1.0, 1.0, 1.0))
    assert a == next_click(gt.copy(), None, (1.0, 1.0, 1.0))
    i, j, k = a.ijk
    assert {i, j, k} <= {9, 10}
    pred = np.zeros_like(gt)
    pred[4:10, 4:16, 4:16] = True
    r1 = [random_error_click(gt, pred, np.random.default_rng(7)) for _ in range(3)]
    r2 = [random_error_click(gt, pred, np.random.default_rng(7)) for _ in range(3)]
    assert r1 == r2
    for c in r1:
        assert gt[c.ijk] and not pred[c.ijk] and c.positive  # the only error here is FN


def test_upsample_logits_matches_torch_trilinear():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal((8, 8, 8)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x)[None, None], size=(32, 32, 32),
                                          mode="trilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(upsample_logits(x, 32), ref, atol=1e-5)


# ----------------------------------------------------------------------------- both protocols
def test_stub_engine_and_legacy_improve_with_clicks_and_write_outputs(tmp_path):
    from PIL import Image

    backend = GrowingBallBackend()
    out = tmp_path / "eval"
    summary = run_evaluation([_sphere_case()], backend, _config(), str(out))

    with open(out / "per_case.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 5  # protocols x clicks, one target
    engine = [r for r in rows if r["protocol"] == "engine"]
    legacy = [r for r in rows if r["protocol"] == "legacy"]
    assert [int(r["click"]) for r in engine] == [1, 2, 3, 4, 5]
    d_engine = [float(r["dice"]) for r in engine]
    assert d_engine[4] > d_engine[0] + 0.1, d_engine
    assert 0.0 < d_engine[0] < 0.9
    assert engine[0]["positive"] == "1"
    gt = _sphere_case().targets["ball"]
    for r in engine:  # volume (i, j, k) clicks: positive ones on the object, negative ones off it
        i, j, k = (int(v) for v in r["index"].split())
        assert bool(gt[k, j, i]) == (r["positive"] == "1")
    assert float(engine[4]["nsd"]) > float(engine[0]["nsd"])
    d_legacy = [float(r["dice"]) for r in legacy]
    assert max(d_legacy) > d_legacy[0]

    data = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert data == json.loads(json.dumps(summary))  # the file is the returned summary
    e = data["protocols"]["engine"]
    assert e["per_click"][4]["dice_mean"] == pytest.approx(d_engine[4], abs=1e-5)
    assert e["per_target"]["ball"][0]["dice_mean"] == pytest.approx(d_engine[0], abs=1e-5)
    lg = data["protocols"]["legacy"]
    assert lg["label"] == LEGACY_LABEL
    assert lg["best_dice_mean"] == pytest.approx(max(d_legacy), abs=1e-5)
    assert data["clicks"] == 5 and data["model"]["name"] == "stub" and data["timing"]["total_s"] > 0

    img = Image.open(out / "dice_vs_clicks.png")
    img.load()
    assert img.format == "PNG" and img.size[0] >= 600
    px = np.asarray(img.convert("RGB")).reshape(-1, 3)
    colours = {tuple(int(v) for v in c) for c in np.unique(px, axis=0)}
    assert (31, 119, 180) in colours and (0, 0, 0) in colours  # the target line and the mean line


def test_prompt_mode_all_and_legacy_reproducible(tmp_path):
    case = _sphere_case()
    s1 = run_evaluation([case], GrowingBallBackend(), _config(prompt_mode="all", protocols=("legacy",), seed=3),
                        str(tmp_path / "a"))
    s2 = run_evaluation([case], GrowingBallBackend(), _config(prompt_mode="all", protocols=("legacy",), seed=3),
                        str(tmp_path / "b"))
    def without_time(path):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(path, newline=""))]

    assert without_time(tmp_path / "a" / "per_case.csv") == without_time(tmp_path / "b" / "per_case.csv")
    assert s1["protocols"]["legacy"]["best_dice_mean"] == s2["protocols"]["legacy"]["best_dice_mean"]
    s3 = run_evaluation([case], GrowingBallBackend(), _config(prompt_mode="all", protocols=("engine",), clicks=3),
                        str(tmp_path / "c"))
    pc = s3["protocols"]["engine"]["per_click"]
    assert pc[2]["dice_mean"] > pc[0]["dice_mean"]


def test_sample_chest_cases_and_label_filter():
    from SAM3DSegmentLib.eval.cases import filter_targets, sample_cases

    (case,) = sample_cases("chest")
    assert len(case.targets) == 7
    assert all(m.shape == case.image.array.shape and m.dtype == bool and m.any() for m in case.targets.values())
    assert list(filter_targets(case, ["Right Lung"]).targets) == ["right lung"]
    with pytest.raises(EvaluationError, match="only sample"):
        sample_cases("abdomen")


def test_bad_options_are_clear_errors():
    with pytest.raises(EvaluationError, match="clicks"):
        EvalConfig(clicks=0)
    with pytest.raises(EvaluationError, match="protocol"):
        EvalConfig(protocols=("best",))


# ------------------------------------------------------------------------------ dataset layout
def _write_nnunet(root, n_cases=2, v1_labels=False, with_json=True):
    import SimpleITK as sitk

    os.makedirs(root / "imagesTr")
    os.makedirs(root / "labelsTr")
    for c in range(n_cases):
        image, mask = sphere_phantom(shape_ijk=(40, 36, 24), spacing=(1.5, 1.5, 2.0), radius_mm=9.0,
                                     hu_inside=150.0, hu_background=-50.0, noise=5.0, seed=c)
        lab = np.asarray(mask.array).astype(np.uint8)
        lab[2:5, 2:8, 2:8] = 2  # a second, small label
        sitk.WriteImage(image.to_sitk(), str(root / "imagesTr" / f"case{c:02d}_0000.nii.gz"))
        sitk.WriteImage(image.to_sitk(lab), str(root / "labelsTr" / f"case{c:02d}.nii.gz"))
    if with_json:
        labels = {"0": "background", "1": "ball", "2": "corner"} if v1_labels else \
            {"background": 0, "ball": 1, "corner": 2}
        (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels,
                                                       "numTraining": n_cases, "file_ending": ".nii.gz"}))


def test_discover_nnunet_dataset_and_labels(tmp_path):
    _write_nnunet(tmp_path / "ds")
    refs, names = discover_dataset(str(tmp_path / "ds"))
    assert [r.name for r in refs] == ["case00", "case01"] and names == {1: "ball", 2: "corner"}
    case = load_case(refs[0], names, ["ball"])
    assert list(case.targets) == ["ball"] and case.targets["ball"].sum() > 100
    assert list(load_case(refs[0], names, ["2"]).targets) == ["corner"]  # by label value
    with pytest.raises(EvaluationError, match="available: ball, corner"):
        load_case(refs[0], names, ["liver"])
    assert label_names({"labels": {"0": "background", "1": "liver"}}) == {1: "liver"}
    with pytest.raises(DataError, match="region-based"):
        label_names({"labels": {"background": 0, "tumour": [1, 2]}})
    # A label without its image names the expected file.
    os.remove(tmp_path / "ds" / "imagesTr" / "case01_0000.nii.gz")
    with pytest.raises(DataError, match="case01_0000"):
        discover_dataset(str(tmp_path / "ds"))
    with pytest.raises(DataError, match="imagesTr"):
        discover_dataset(str(tmp_path / "nothing_here"))


def test_dataset_without_json_names_labels_by_value(tmp_path):
    _write_nnunet(tmp_path / "ds", n_cases=1, with_json=False)
    refs, names = discover_dataset(str(tmp_path / "ds"))
    assert names is None
    assert sorted(load_case(refs[0], names).targets) == ["label_1", "label_2"]


# ------------------------------------------------------------------------------ CLI end to end
def test_cli_end_to_end_with_a_tiny_random_checkpoint(tmp_path, capsys):
    pytest.importorskip("torch")
    from SAM3DSegmentLib.models import SamMed3DConfig, build_sam_med3d, save_checkpoint

    ckpt = tmp_path / "tiny.pt"
    save_checkpoint(build_sam_med3d(SamMed3DConfig.tiny()), ckpt)
    _write_nnunet(tmp_path / "ds", n_cases=1)
    out = tmp_path / "out"
    argv = ["--data", str(tmp_path / "ds"), "--checkpoint", str(ckpt), "--clicks", "2", "--labels", "ball",
            "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    rows = list(csv.DictReader(open(out / "per_case.csv", newline="")))
    assert {(r["protocol"], r["click"]) for r in rows} == {(p, c) for p in ("engine", "legacy") for c in "12"}
    assert all(0.0 <= float(r["dice"]) <= 1.0 and 0.0 <= float(r["nsd"]) <= 1.0 for r in rows)
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert len(summary["model"]["checkpoint_sha256"]) == 64
    assert summary["model"]["device"] == "cpu"
    assert summary["data"]["cases"] == ["case00"]
    assert (out / "dice_vs_clicks.png").stat().st_size > 1000
    assert "best Dice over clicks" in capsys.readouterr().out
    # Never clobber earlier results without --overwrite.
    before = (out / "per_case.csv").read_text(encoding="utf-8")
    assert main(argv) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "per_case.csv").read_text(encoding="utf-8") == before
    # Bad input: a clear message, exit status 1.
    assert main(["--data", str(tmp_path / "missing"), "--checkpoint", str(ckpt), "--out", str(tmp_path / "o2")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(argv[:-2] + ["--dtype", "float16", "--out", str(tmp_path / "o3"), "--quiet"]) == 1
    assert "float16 inference is only supported on a GPU" in capsys.readouterr().err
    assert not (tmp_path / "o3" / "summary.json").exists()
