"""``sam3d segment`` / the ``sam3d`` dispatcher, run as ``python -m SAM3DSegmentLib`` subprocesses.

A tiny random-weights checkpoint (SamMed3DConfig.tiny(), saved with save_checkpoint) and a small synthetic
NIfTI are built once per module. Every bad input gets: its exit status, a one-line stderr message naming
the problem, and no file left in the output folder.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from SAM3DSegmentLib import cli
from SAM3DSegmentLib.io import read_segmentation, read_volume
from _cli_fixtures import make_cli_inputs  # noqa: E402  (Testing/ is on sys.path under pytest)

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "SAM3DSegmentLib", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd or REPO, timeout=300)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_cli_inputs(tmp_path_factory.mktemp("cli_inputs"))


def ras_arg(p):
    return ",".join(f"{v:.3f}" for v in p)


def only_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


# ------------------------------------------------------------------------------------------ success
def test_segment_writes_a_mask_on_the_input_grid(inputs, tmp_path):
    out, timings = tmp_path / "mask.nii.gz", tmp_path / "t.json"
    c = inputs["centre"]
    r = run_cli("segment", inputs["image"], "--click", ras_arg(c), "--click", ras_arg(c + [2.0, 0, 0]) + ":-",
                "--checkpoint", inputs["ckpt"], "--device", "cpu", "--out", out, "--timings", timings)
    assert r.returncode == 0, r.stderr
    assert "tiny.pt" in r.stdout and "model:" in r.stdout and str(inputs["ckpt"]) in r.stdout
    mask = read_volume(str(out))
    assert mask.same_grid(inputs["volume"], atol=1e-4)
    assert set(np.unique(mask.array)) <= {0, 1}
    info = json.loads(timings.read_text(encoding="utf-8"))
    assert info["checkpoint"] == str(inputs["ckpt"]) and info["regions"] >= 1
    assert len(info["timings"]["clicks"]) == 2 and info["timings"]["clicks"][1]["encoded_regions"] == 0
    assert info["mask_voxels"] == int(mask.array.sum())
    assert sorted(os.listdir(tmp_path)) == ["mask.nii.gz", "t.json"]     # no temporaries left


def test_segment_seg_nrrd_with_voxel_clicks_and_options(inputs, tmp_path):
    out = tmp_path / "out.seg.nrrd"
    r = run_cli("segment", inputs["image"], "--voxel", "--click", "20,18,12", "--checkpoint", inputs["ckpt"],
                "--prompt-mode", "all", "--no-extend", "--spacing", "2.0", "--name", "ball", "--dtype", "bfloat16",
                "--out", out)
    assert r.returncode == 0, r.stderr
    segs = read_segmentation(str(out), reference=inputs["volume"])
    assert list(segs) == ["ball"]
    assert segs["ball"].array.shape == inputs["volume"].array.shape


# ------------------------------------------------------------------------------------------ bad inputs
def _bad_image(kind: str, d: Path) -> Path:
    import SimpleITK as sitk

    if kind == "missing":
        return d / "nope.nii.gz"
    # (NaN through .mha: SimpleITK's NIfTI writer turns NaN into 0)
    p = d / {"corrupt": "corrupt.nrrd", "nan": "nan.mha"}.get(kind, f"{kind}.nii.gz")
    if kind == "corrupt":
        p.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 10 10 10\nencoding: raw\n\n" + b"\x01" * 37)
    elif kind == "2d":
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((20, 30), np.int16)), str(p))
    elif kind == "4d":
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 8, 9, 10), np.int16), isVector=False), str(p))
    elif kind == "nan":
        a = np.zeros((10, 12, 14), np.float32)
        a[5, 5, 5] = np.nan
        sitk.WriteImage(sitk.GetImageFromArray(a), str(p))
    return p


@pytest.mark.parametrize("kind, needle", [("missing", "no such file"), ("corrupt", "could not be read"),
                                          ("2d", "2D"), ("4d", "4D"), ("nan", "NaN")])
def test_bad_images_fail_clearly(inputs, tmp_path, kind, needle):
    src = tmp_path / "src"
    src.mkdir()
    outdir = tmp_path / "out"
    outdir.mkdir()
    image = _bad_image(kind, src)
    r = run_cli("segment", image, "--voxel", "--click", "1,1,1", "--checkpoint", inputs["ckpt"],
                "--out", outdir / "m.nii.gz")
    assert r.returncode == 1
    line = only_line(r.stderr)
    assert line.startswith("sam3d segment: error:") and needle in line and str(image.name) in line
    assert os.listdir(outdir) == []


@pytest.mark.parametrize("case, status, needle", [
    ("outside_ras", 1, "outside the volume"),
    ("outside_voxel", 1, "outside the image"),
    ("malformed", 2, "malformed --click"),
    ("no_click", 2, "no clicks"),
    ("bad_ext", 2, "unsupported file type '.png'"),
    ("no_dir", 1, "does not exist"),
    ("missing_ckpt", 1, "Checkpoint file not found"),
    ("wrong_ckpt", 1, "could not load checkpoint"),
    ("both_models", 2, "not allowed with argument"),
    ("bad_clamp", 2, "--clamp-hu"),
    ("fp16_on_cpu", 1, "--dtype float16: float16 inference is only supported on a GPU"),
])
def test_bad_arguments_fail_clearly(inputs, tmp_path, case, status, needle):
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = outdir / "m.nii.gz"
    c = inputs["centre"]
    args = ["segment", inputs["image"], "--click", ras_arg(c), "--checkpoint", inputs["ckpt"], "--out", out]
    if case == "outside_ras":
        args[3] = ras_arg(c + [0, 0, 500.0])
    elif case == "outside_voxel":
        args[3:4] = ["40,0,0", "--voxel"]
    elif case == "malformed":
        args[3] = "12,abc,4"
    elif case == "no_click":
        del args[2:4]
    elif case == "bad_ext":
        args[-1] = outdir / "m.png"
    elif case == "no_dir":
        args[-1] = outdir / "missing" / "m.nii.gz"
    elif case == "missing_ckpt":
        args[5] = tmp_path / "nothing.pt"
    elif case == "wrong_ckpt":
        bad = tmp_path / "bad.pt"
        bad.write_bytes(b"this is not a checkpoint")
        args[5] = bad
    elif case == "both_models":
        args += ["--model", "demo"]
    elif case == "bad_clamp":
        args += ["--clamp-hu", "1000,-1000"]
    elif case == "fp16_on_cpu":
        args += ["--dtype", "float16", "--device", "cpu"]
    r = run_cli(*args)
    assert r.returncode == status, (r.returncode, r.stderr)
    line = only_line(r.stderr)
    assert line.startswith("sam3d segment: error:") and needle in line, line
    assert os.listdir(outdir) == []


def test_failed_run_does_not_clobber_an_existing_output(inputs, tmp_path):
    out = tmp_path / "m.nii.gz"
    out.write_bytes(b"precious")
    r = run_cli("segment", inputs["image"], "--click", ras_arg(inputs["centre"] + [0, 900.0, 0]),
                "--checkpoint", inputs["ckpt"], "--out", out, "--overwrite")
    assert r.returncode == 1 and "outside the volume" in r.stderr and out.read_bytes() == b"precious"


def test_negative_coordinates_after_click_flag_are_accepted():
    from SAM3DSegmentLib.cli import segment

    assert segment.normalise_argv(["--click", "-12,3,-4:-", "x"]) == ["--click=-12,3,-4:-", "x"]
    assert segment.normalise_argv(["-c", "-1,2,3", "--clamp-hu", "-1000,1000"]) == [
        "--click=-1,2,3", "--clamp-hu=-1000,1000"]
    assert segment.parse_click("-12,3.5,-4e1:-") == ((-12.0, 3.5, -40.0), False)
    assert segment.parse_click(" 1, 2, 3 ") == ((1.0, 2.0, 3.0), True)
    with pytest.raises(cli.UsageError):
        segment.parse_click("1,2,3:x")


# ------------------------------------------------------------------------------------------ dispatcher
def test_dispatcher_help_unknown_and_missing_modules(capsys, monkeypatch):
    assert cli.main([]) == 2 and "segment" in capsys.readouterr().out
    assert cli.main(["--help"]) == 0
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    # a command whose library cannot be imported (a broken installation): one line, exit status 1
    monkeypatch.setitem(sys.modules, "SAM3DSegmentLib.train.config", None)
    assert cli.main(["train", "config.json"]) == 1
    err = capsys.readouterr().err
    assert "'train' command is not available" in err and len(err.strip().splitlines()) == 1


def test_dispatcher_forwards_argv(monkeypatch):
    from SAM3DSegmentLib.cli import evaluate

    seen = {}
    monkeypatch.setattr(evaluate, "run", lambda args: seen.setdefault("args", args) and 7)
    assert cli.main(["evaluate", "--data", "d", "-q", "--out", "o", "--clamp-hu", "-1000,1000"]) == 7
    args = seen["args"]
    assert (args.data, args.quiet, args.out, args.clamp_hu) == ("d", True, "o", (-1000.0, 1000.0))


def test_diagnose_is_dispatched(capsys):
    assert cli.main(["diagnose"]) == 0
    assert "diagnostic report" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ demo
def test_demo_without_the_embedded_model_asks_for_a_checkpoint(monkeypatch, tmp_path, capsys):
    from SAM3DSegmentLib import weights
    from SAM3DSegmentLib.cli import demo

    def missing(name, *a, **k):
        raise weights.WeightsError("The bundled 'demo' model is not included in this installation")

    monkeypatch.setattr(weights, "resolve_checkpoint", missing)
    assert cli.main(["demo", "--out", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err
    assert "--checkpoint PATH" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists()
    assert demo.main(["--structures", " , "]) == 2


def test_run_demo_writes_masks_overlay_and_report(inputs, tmp_path):
    from PIL import Image

    from SAM3DSegmentLib.cli.demo import run_demo
    from SAM3DSegmentLib.io.segmentations import read_segmentation

    vol = inputs["volume"]
    from SAM3DSegmentLib.inference.backends import load_backend

    backend, info = load_backend(None, str(inputs["ckpt"]), "cpu")
    refs = {"ball": vol.with_array((vol.array > 0).astype(np.uint8))}
    report = run_demo(backend, info, str(tmp_path / "demo"), ["ball"], corrections=1, max_regions=1,
                      log=lambda *a: None, volume=vol, references=refs)
    out = tmp_path / "demo"
    assert sorted(os.listdir(out)) == ["demo.json", "demo.seg.nrrd", "overlay.png"]
    saved = json.loads((out / "demo.json").read_text(encoding="utf-8"))
    assert saved["structures"]["ball"]["clicks"][0]["positive"] is True
    assert 0.0 <= saved["structures"]["ball"]["dice"] <= 1.0 and saved["model"]["checkpoint"] == str(inputs["ckpt"])
    segs = read_segmentation(str(out / "demo.seg.nrrd"), reference=vol)
    assert list(segs) == ["ball"]
    assert Image.open(out / "overlay.png").size[0] > 2 * 40
    assert report["mean_dice"] == saved["mean_dice"]


@pytest.mark.parametrize("flag, honoured", [([], True), (["--no-honour-clicks"], False)])
def test_segment_passes_honour_clicks_to_the_engine(inputs, tmp_path, monkeypatch, flag, honoured):
    from SAM3DSegmentLib.inference import session as session_module

    seen = []
    real_init = session_module.Session.__init__

    def spy(self, backend, options=None, *a, **kw):
        seen.append(options)
        real_init(self, backend, options, *a, **kw)

    monkeypatch.setattr(session_module.Session, "__init__", spy)
    c = inputs["centre"]
    out = tmp_path / "mask.nii.gz"
    assert cli.main(["segment", str(inputs["image"]), "--click", ras_arg(c), "--click", ras_arg(c + [2.0, 0, 0]) + ":-",
                     "--checkpoint", str(inputs["ckpt"]), "--device", "cpu", "--out", str(out), "--quiet", *flag]) == 0
    assert [o.honour_clicks for o in seen] == [honoured]
    if honoured:   # the include click's voxel is in the written mask and the exclude click's is not
        mask = read_volume(str(out))
        inc, exc = (np.rint(mask.ras_to_ijk_points(np.asarray(p, float))).astype(int) for p in (c, c + [2.0, 0, 0]))
        assert mask.array[inc[2], inc[1], inc[0]] == 1 and mask.array[exc[2], exc[1], exc[0]] == 0
