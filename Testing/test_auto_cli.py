"""``sam3d auto``: one segment per instance (names, colours, scores in tags), label maps, JSON/CSV reports written
together, the overwrite rule, one-line errors. The model is a stub (``load_backend`` patched); the rest is real."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from SAM3DSegmentLib import cli
from SAM3DSegmentLib.io import read_volume, write_volume
from test_auto_generator import ImageBackend, spheres_volume

CENTRES = [(-12.0, -6.0, -8.0), (10.0, 12.0, 6.0), (0.0, 0.0, 20.0)]


@pytest.fixture
def image(tmp_path, monkeypatch):
    vol, labels = spheres_volume(CENTRES, [6.0, 7.0, 6.0])
    path = tmp_path / "ct.nii.gz"
    write_volume(vol, str(path))
    calls = []

    def load_backend(*args, **kwargs):
        calls.append(args)
        return ImageBackend(), {"model": "stub", "checkpoint": "(none)", "backend": "image stub", "device": "cpu",
                                "architecture": "stub", "image_size": 32}

    monkeypatch.setattr("SAM3DSegmentLib.inference.backends.load_backend", load_backend)
    return path, labels, calls


ARGS = ["--grid", "6", "--max-volume", "10", "--quiet"]


def test_auto_writes_one_segment_per_instance_with_scores_and_the_reports(image, tmp_path, capsys):
    import slicerio

    path, labels, _ = image
    out, rep, table = tmp_path / "i.seg.nrrd", tmp_path / "r.json", tmp_path / "r.csv"
    assert cli.main(["auto", str(path), *ARGS, "--out", str(out), "--json", str(rep), "--csv", str(table)]) == 0
    seg = slicerio.read_segmentation(str(out))
    names = [s["name"] for s in seg["segments"]]
    assert names == ["auto 001", "auto 002", "auto 003"]
    for s in seg["segments"]:
        tags = s["tags"]
        assert 0.8 <= float(tags["SAM3D.Stability"]) <= 1.0 and tags["SAM3D.PredictedIoU"] == "n/a"
        assert float(tags["SAM3D.VolumeMl"]) > 0.5 and tags["SAM3D.Prompt"].startswith("grid at ")
        assert len(s["color"]) == 3
    report = json.loads(rep.read_text())
    assert report["count"] == 3 and report["candidates"]["grid"] > 0 and report["options"]["label"] == "everything"
    assert report["options"]["grid_spacing_mm"] == 6.0 and report["model"]["model"] == "stub"
    centroids = np.array([i["centroid_ras"] for i in report["instances"]])
    for c in CENTRES:
        assert np.linalg.norm(centroids - c, axis=1).min() < 2.0
    rows = list(csv.reader(table.open()))
    assert rows[0][:3] == ["index", "name", "volume_ml"] and len(rows) == 4 and rows[1][1] == "auto 001"


def test_auto_label_map_output_and_roi(image, tmp_path):
    path, labels, _ = image
    out = tmp_path / "labels.nii.gz"
    roi = ",".join(str(v) for v in (*CENTRES[1], 16.0, 16.0, 16.0))
    assert cli.main(["auto", str(path), *ARGS, "--roi", roi, "--out", str(out)]) == 0
    lab = read_volume(str(out))
    assert set(np.unique(lab.array)) == {0, 1}
    hit = lab.array == 1
    assert (labels.array[hit] == 2).mean() > 0.6                # the sphere inside the ROI, nothing else


@pytest.mark.parametrize("extra, needle", [
    (["--roi", "1,2,3"], "malformed --roi"), (["--min-stability", "2"], "between 0 and 1"),
    (["--grid", "none"], "no prompts"), (["--preset", "liver"], "invalid choice")])
def test_bad_options_fail_with_one_line_and_status_2(image, tmp_path, capsys, extra, needle):
    path, _, calls = image
    assert cli.main(["auto", str(path), "--out", str(tmp_path / "x.seg.nrrd"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and err[0].startswith("sam3d auto: error:"), err
    assert not calls and not (tmp_path / "x.seg.nrrd").exists()


def test_existing_outputs_are_refused_before_any_work(image, tmp_path, capsys):
    path, _, calls = image
    out = tmp_path / "i.seg.nrrd"
    out.write_bytes(b"earlier result")
    assert cli.main(["auto", str(path), *ARGS, "--out", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"earlier result" and not calls


def test_outputs_are_written_all_or_none(image, tmp_path, monkeypatch, capsys):
    path, _, _ = image
    out, rep, table = tmp_path / "i.seg.nrrd", tmp_path / "r.json", tmp_path / "r.csv"
    out.write_bytes(b"earlier result")

    def broken(report):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("SAM3DSegmentLib.inference.auto_export.csv_table", broken)
    status = cli.main(["auto", str(path), *ARGS, "--overwrite", "--out", str(out), "--json", str(rep), "--csv",
                       str(table)])
    assert status == 1 and "No space left" in capsys.readouterr().err
    assert out.read_bytes() == b"earlier result" and not rep.exists() and not table.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz", "i.seg.nrrd"]   # no temporary left


def test_spacing_defaults_to_the_model_own_and_the_option_overrides_it(image, tmp_path, monkeypatch):
    """Without --spacing the regions use the model's own spacing (``backend.spacing_mm``, as sam3d segment)."""
    path, _, _ = image
    monkeypatch.setattr(ImageBackend, "spacing_mm", 2.0, raising=False)
    for extra, expected in (([], 2.0), (["--spacing", "1.5"], 1.5)):
        rep = tmp_path / f"r{expected}.json"
        assert cli.main(["auto", str(path), *ARGS, *extra, "--out", str(tmp_path / f"i{expected}.seg.nrrd"),
                         "--json", str(rep)]) == 0
        assert json.loads(rep.read_text())["options"]["spacing_mm"] == expected
