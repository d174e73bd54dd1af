"""``sam3d segment`` / ``evaluate`` with a 3DSAM-adapter file: exclude clicks refused plainly, the family's
limits and normalisation said once, ``--znorm``, the model's own spacing, and the family's evaluation protocol."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from _sam3d_adapter_fixtures import randomize_  # noqa: E402
from SAM3DSegmentLib import cli  # noqa: E402
from SAM3DSegmentLib.core.intensity import WindowZNorm  # noqa: E402
from SAM3DSegmentLib.models.sam3d_adapter import Sam3DAdapter, Sam3DAdapterConfig  # noqa: E402
from SAM3DSegmentLib.models.sam3d_adapter.files import save_model_file  # noqa: E402

DEMO = "SAM3DSegmentLib/resources/demo_model.pt"


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    model = randomize_(Sam3DAdapter(Sam3DAdapterConfig.tiny()), seed=4, std=0.1)
    path = tmp_path_factory.mktemp("m") / "tiny3dsam.pth"
    save_model_file(model, path, intensity=WindowZNorm((-200, 300), 40.0, 90.0), name="tiny 3dsam")
    return str(path)


def test_segment_refuses_exclude_clicks_before_the_model_runs(model_file, tmp_path, capsys):
    out = tmp_path / "m.nii.gz"
    rc = cli.main(["segment", "--sample", "chest", "--checkpoint", model_file, "--voxel", "--click", "60,60,17",
                   "--click", "30,30,17:-", "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "has no exclude clicks" in err and "include clicks only" in err
    assert not out.exists()


def test_segment_refuses_an_initial_mask_plainly(model_file, tmp_path, capsys):
    """--init-mask needs a previous-mask input: refused with the reason and the way out, nothing written."""
    from SAM3DSegmentLib.core.geometry import Volume
    from SAM3DSegmentLib.io import write_volume

    m = np.diag([-1.0, -1.0, 1.0, 1.0])
    ct = np.random.default_rng(0).integers(-100, 100, (40, 44, 48)).astype(np.int16)
    mask = np.zeros(ct.shape, dtype=np.uint8)
    mask[15:25, 17:27, 19:29] = 1
    image, init, out = tmp_path / "ct.nii.gz", tmp_path / "init.nii.gz", tmp_path / "m.nii.gz"
    write_volume(Volume(ct, m), str(image))
    write_volume(Volume(mask, m), str(init))
    args = ["segment", str(image), "--checkpoint", model_file, "--voxel", "--click", "24,22,20", "--out", str(out),
            "--device", "cpu", "--no-extend"]
    rc = cli.main(args + ["--init-mask", str(init)])
    err = capsys.readouterr().err
    assert rc == 2 and "no previous-mask input" in err and "Leave out --init-mask" in err
    assert not out.exists()
    assert cli.main(args) == 0 and out.is_file()     # the same call without --init-mask runs


def test_segment_runs_at_1_mm_and_says_the_limits_once(model_file, tmp_path, capsys):
    out, timings = tmp_path / "m.nii.gz", tmp_path / "t.json"
    rc = cli.main(["segment", "--sample", "chest", "--checkpoint", model_file, "--voxel", "--click", "60,60,17",
                   "--click", "62,60,17", "--no-extend", "--out", str(out), "--timings", str(timings),
                   "--device", "cpu", "--znorm=50,80"])
    printed = capsys.readouterr().out
    assert rc == 0 and out.is_file()
    assert printed.count("no exclude clicks") == 1 and "foreground mean 50, std 80" in printed
    report = json.loads(timings.read_text())
    assert report["family"] == "3dsam_adapter" and report["spacing_mm"] == 1.0 and report["prompt_mode"] == "all-clicks"
    assert report["intensity"] == {"window": [-200.0, 300.0], "mean": 50.0, "std": 80.0}
    assert report["cache"]["bytes"] > 0 and report["regions"] == 1


def test_serve_refuses_the_family_in_one_line(model_file, capsys):
    """The remote protocol carries SAM-Med3D embeddings: a 3DSAM-adapter file is refused before serving."""
    assert cli.main(["serve", "--checkpoint", f"mine={model_file}", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sam3d serve: error: model mine:") and err.count("\n") == 1
    assert "3dsam_adapter model" in err and "SAM-Med3D models only" in err and "locally" in err


def test_evaluate_refuses_the_segfm_protocol_before_any_case_runs(model_file, tmp_path, capsys):
    """SegFM clicks exclude points on false positives, which this family has not: refused plainly, no results."""
    from SAM3DSegmentLib.data.segfm_synthetic import write_synthetic_segfm_set

    write_synthetic_segfm_set(str(tmp_path / "cases"), n_cases=1, seed=3, shape_ijk=(40, 40, 24), n_classes=1)
    out = tmp_path / "out"
    rc = cli.main(["evaluate", "--protocol", "segfm", "--data", str(tmp_path / "cases"), "--checkpoint", model_file,
                   "--device", "cpu", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "has no exclude clicks" in err and "use --protocol engine, 3dsam, both or all" in err
    assert not out.exists() or not any(out.iterdir())


def test_znorm_is_refused_for_sam_med3d(tmp_path, capsys):
    rc = cli.main(["segment", "--sample", "chest", "--checkpoint", DEMO, "--voxel", "--click", "60,60,17",
                   "--out", str(tmp_path / "m.nii.gz"), "--device", "cpu", "--znorm=50,80"])
    assert rc == 2 and "--znorm applies to 3DSAM-adapter models only" in capsys.readouterr().err


def test_evaluate_runs_the_engine_and_the_familys_own_protocol(model_file, tmp_path, capsys):
    out = tmp_path / "ev"
    rc = cli.main(["evaluate", "--sample", "chest", "--labels", "left lung", "--checkpoint", model_file,
                   "--clicks", "2", "--no-extend", "--device", "cpu", "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["protocols"]) == {"engine", "3dsam"}
    own = summary["protocols"]["3dsam"]
    assert own["nsd_tolerance_mm"] == 5.0 and "one pass" in own["label"]
    assert [p["click"] for p in own["per_click"]] == [1, 2]
    assert summary["model_grid_spacing_mm"] == 1.0 and summary["model"]["family"] == "3dsam_adapter"
    rows = (out / "per_case.csv").read_text().splitlines()
    engine_rows = [r for r in rows if r.startswith("engine,")]
    assert engine_rows and all(r.split(",")[4] in ("1", "") for r in engine_rows)   # include clicks only
    rc = cli.main(["evaluate", "--sample", "chest", "--labels", "left lung", "--checkpoint", model_file,
                   "--protocol", "legacy", "--device", "cpu", "--out", str(tmp_path / "ev2")])
    assert rc == 2 and "does not apply to this model" in capsys.readouterr().err


def test_points_protocol_draws_in_the_ground_truth_and_scores_inside_the_crop():
    from SAM3DSegmentLib.eval.cases import Case
    from SAM3DSegmentLib.eval.points_protocol import draw_points, evaluate_points
    from SAM3DSegmentLib.eval.protocols import EvalConfig
    from SAM3DSegmentLib.inference.backends_sam3d_adapter import Sam3DAdapterBackend
    from test_sam3d_adapter_inference import ct_volume

    vol = ct_volume((40, 44, 48), spacing=(2.0, 1.0, 1.0))
    k, j, i = np.meshgrid(*[np.arange(n) for n in vol.array.shape], indexing="ij")
    gt = (k - 20) ** 2 * 4 + (j - 22) ** 2 + (i - 24) ** 2 <= 36
    pts = draw_points(vol, gt, 5, np.random.default_rng(0))
    ijk = vol.ras_to_ijk_points(pts)
    assert len(pts) == 5 and len({tuple(p) for p in np.round(pts, 6)}) == 5
    assert gt[tuple(np.rint(ijk[:, ::-1]).astype(int).T)].all()      # every point lies in the object
    backend = Sam3DAdapterBackend(randomize_(Sam3DAdapter(Sam3DAdapterConfig.tiny()), seed=2, std=0.1))
    rows = evaluate_points(backend, Case("c", vol, {"ball": gt}), EvalConfig(clicks=3, protocols=("3dsam",)))
    assert [r["click"] for r in rows] == [1, 2, 3] and [r["encodes"] for r in rows] == [1, 0, 0]
    assert all(0.0 <= r["dice"] <= 1.0 and r["positive"] == 1 for r in rows)
