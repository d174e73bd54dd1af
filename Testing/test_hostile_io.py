"""Hostile file-system and input conditions for the readers/writers and ``sam3d segment`` (issue 9 items 1, 2,
9, 10, 11; issue 8 item 7).

* Full disk: SimpleITK's NIfTI writer reports a short write on stderr only; the atomic writer must check
  the file before the rename and keep the old one. Tested on a real 64 KiB tmpfs (needs root / mount;
  skipped with the reason otherwise) and, always, by injecting a short write.
* Output = input (same path, ``./`` vs absolute, a symlink), symlinked outputs (written through).
* DICOM series with missing / duplicate slices, several series in one folder and ``--series``.
* float64 values beyond the float32 range.
* Read-only output folders (checked before the model runs) and a failing ``--timings`` write (both
  outputs or neither).
* No model available offline: a short multi-line list naming ``--model demo``; ``--sample chest``;
  ``.seg.nrrd`` segment colour.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SAM3DSegmentLib import cli
from SAM3DSegmentLib.cli import segment as segment_command
from SAM3DSegmentLib.core import atomic
from SAM3DSegmentLib import io
from SAM3DSegmentLib.core.geometry import Volume, make_ijk_to_ras
from _cli_fixtures import make_cli_inputs  # noqa: E402  (Testing/ is on sys.path under pytest)

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ helpers
def run_cli(*args, cwd=None, env=None):
    e = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
             OMP_NUM_THREADS="1")
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "SAM3DSegmentLib", *map(str, args)], capture_output=True,
                          text=True, env=e, cwd=cwd or REPO, timeout=300)


@contextlib.contextmanager
def small_disk(folder: Path, size: str, read_only: bool = False):
    """A tmpfs of ``size`` mounted on ``folder`` (skips the test when mounting is not allowed here)."""
    folder.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def remount_read_only(folder: Path) -> None:
    r = subprocess.run(["mount", "-o", "remount,ro", str(folder)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _random_volume(shape=(40, 40, 40), dtype=np.int16, seed=0) -> Volume:
    arr = np.random.default_rng(seed).integers(-1000, 1000, shape).astype(dtype)  # incompressible
    return Volume(arr, make_ijk_to_ras((1.0, 1.0, 2.0), np.diag([-1.0, -1.0, 1.0]), (5.0, 6.0, 7.0)))


def _listing(folder) -> list:
    return sorted(os.listdir(folder))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_cli_inputs(tmp_path_factory.mktemp("hostile_inputs"))


def _segment_args(inputs, image, out, *extra):
    return ["segment", image, "--voxel", "--click", "20,18,12", "--checkpoint", inputs["ckpt"], "--device", "cpu",
            "--out", out, *extra]


# ------------------------------------------------------------------------------------------ item 1: full disk
@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
def test_nifti_write_on_a_full_tmpfs_keeps_the_old_file(tmp_path, ext):
    with small_disk(tmp_path / "disk", "64k") as disk:
        target = disk / f"old{ext}"
        io.write_volume(_random_volume((4, 4, 4)), str(target))
        before = target.read_bytes()
        with pytest.raises(atomic.IncompleteWriteError, match="incomplete.*previous file is kept.*disk full"):
            io.write_volume(_random_volume(), str(target))          # 128 KB of voxels into ~60 KB free
        assert target.read_bytes() == before and _listing(disk) == [f"old{ext}"]
        # the Slicer NIfTI export calls atomic.atomic_write with sitk.WriteImage directly: same protection
        image = _random_volume().to_sitk()
        with pytest.raises(atomic.IncompleteWriteError):
            atomic.atomic_write(str(target), lambda tmp: sitk.WriteImage(image, tmp, True))
        assert target.read_bytes() == before and _listing(disk) == [f"old{ext}"]


@pytest.fixture
def short_nifti_writes(monkeypatch):
    """SimpleITK.WriteImage that, like ITK on a full disk, writes only part of the file and returns normally."""
    real = sitk.WriteImage

    def short(image, path, *args, **kwargs):
        real(image, path, *args, **kwargs)
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(max(1, size // 3))

    monkeypatch.setattr(sitk, "WriteImage", short)


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
def test_injected_short_nifti_write_is_refused(tmp_path, short_nifti_writes, ext):
    target = tmp_path / f"mask{ext}"
    target.write_bytes(b"the user's previous file")
    vol = _random_volume((16, 16, 16))
    with pytest.raises(atomic.IncompleteWriteError, match="incomplete or unreadable"):
        io.write_volume(vol, str(target))
    with pytest.raises(atomic.IncompleteWriteError):
        atomic.atomic_write(str(target), lambda tmp: sitk.WriteImage(vol.to_sitk(), tmp, True))
    assert target.read_bytes() == b"the user's previous file" and _listing(tmp_path) == [f"mask{ext}"]
    new = tmp_path / f"new{ext}"
    with pytest.raises(atomic.IncompleteWriteError, match="nothing was written"):
        io.write_mask(vol, str(new))
    assert not new.exists() and _listing(tmp_path) == [f"mask{ext}"]


def test_write_volume_reads_the_header_back(tmp_path, monkeypatch):
    """Any format: a file whose header does not describe the image written is refused."""
    real = sitk.WriteImage
    monkeypatch.setattr(sitk, "WriteImage", lambda image, path, *a: real(image[:, :, :2], path, *a))
    target = tmp_path / "ct.nrrd"
    with pytest.raises(atomic.IncompleteWriteError, match=r"header says size \[16, 16, 2\]"):
        io.write_volume(_random_volume((16, 16, 16)), str(target))
    assert _listing(tmp_path) == []


def test_segment_cli_on_a_full_disk_fails_and_keeps_the_old_mask(inputs, tmp_path):
    with small_disk(tmp_path / "disk", "64k") as disk:
        out = disk / "mask.nii"                                   # uncompressed: ~35 KB per mask
        io.write_mask(inputs["volume"].with_array(np.ones_like(inputs["volume"].array)), str(out))
        before = out.read_bytes()
        r = run_cli(*_segment_args(inputs, inputs["image"], out, "--overwrite"))
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert "incomplete" in r.stderr and "disk full" in r.stderr
        assert out.read_bytes() == before and _listing(disk) == ["mask.nii"]


# ------------------------------------------------------------------------------------------ item 2: output = input
@pytest.mark.parametrize("how", ["same", "relative", "symlink", "hardlink"])
def test_segment_refuses_to_overwrite_its_input(inputs, tmp_path, how):
    image = tmp_path / "ct.nii.gz"
    image.write_bytes(inputs["image"].read_bytes())
    before = image.read_bytes()
    cwd = None
    if how == "same":
        out = image
    elif how == "relative":
        out, cwd = Path("./ct.nii.gz"), tmp_path
    elif how == "symlink":
        out = tmp_path / "link.nii.gz"
        out.symlink_to(image)
    else:
        out = tmp_path / "hard.nii.gz"
        os.link(image, out)
    r = run_cli(*_segment_args(inputs, image, out), cwd=cwd)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "is the input image" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "model:" not in r.stdout                                # refused before the model was loaded
    assert image.read_bytes() == before


def test_symlinked_output_is_written_through(tmp_path):
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    real = real_dir / "mask.nii.gz"
    real.write_bytes(b"old")
    link = tmp_path / "mask.nii.gz"
    link.symlink_to(os.path.relpath(real, tmp_path))
    vol = _random_volume((8, 8, 8))
    assert io.write_volume(vol, str(link)) == str(link)
    assert link.is_symlink() and os.readlink(link) == os.path.relpath(real, tmp_path)
    assert np.array_equal(io.read_volume(str(real)).array, vol.array)
    atomic.write_json(tmp_path / "t.json", {"a": 1})
    (tmp_path / "t_link.json").symlink_to(tmp_path / "t.json")
    atomic.write_json(tmp_path / "t_link.json", {"a": 2})
    assert (tmp_path / "t_link.json").is_symlink() and json.loads((tmp_path / "t.json").read_text(encoding="utf-8")) == {"a": 2}
    assert _listing(real_dir) == ["mask.nii.gz"]


# ------------------------------------------------------------------------------------------ item 9: DICOM
def _write_series(folder: Path, volume: Volume, uid: str, z_positions=None, prefix="slice"):
    """One CT file per k slice; ``z_positions`` (mm along the slice normal) override the volume's."""
    folder.mkdir(parents=True, exist_ok=True)
    image = volume.to_sitk()
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    n = image.GetSize()[2]
    zs = list(range(n)) if z_positions is None else list(z_positions)
    for k, z in enumerate(zs):
        sl = image[:, :, min(k, n - 1)]
        pos = np.asarray(image.GetOrigin()) + d[:, 2] * float(z) * image.GetSpacing()[2] if z_positions is None \
            else np.asarray(image.GetOrigin()) + d[:, 2] * float(z)
        tags = {"0008|0060": "CT", "0010|0010": "Phantom^Test", "0010|0020": "P1",
                "0020|000d": "1.2.826.0.1.3680043.2.1125.1", "0020|000e": uid, "0020|0013": str(k + 1),
                "0020|0032": "\\".join(f"{v:.6f}" for v in pos),
                "0020|0037": "\\".join(f"{v:.8f}" for v in list(d[:, 0]) + list(d[:, 1])),
                "0008|0018": f"{uid}.{k + 1}", "0008|0016": "1.2.840.10008.5.1.4.1.1.2"}
        for key, value in tags.items():
            sl.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{prefix}{k:03d}.dcm"))
        writer.Execute(sl)


def _ct(shape=(10, 12, 14)) -> Volume:
    arr = np.random.default_rng(1).integers(-1000, 1000, shape).astype(np.int16)
    return Volume(arr, make_ijk_to_ras((0.8, 0.8, 2.5), np.eye(3), (0.0, 0.0, 0.0)))


UID_A, UID_B = "1.2.826.0.1.3680043.2.1125.2", "1.2.826.0.1.3680043.2.1125.3"


def test_dicom_series_with_a_missing_slice_is_refused(tmp_path):
    z = [2.5 * k for k in range(10)]
    del z[4]                                                       # slice 5 of 10 lost in transfer
    _write_series(tmp_path / "gap", _ct(), UID_A, z_positions=z)
    with pytest.raises(io.VolumeReadError, match=r"not evenly spaced: 5\.000 mm .* 2\.500 mm \(1 slice\(s\) "
                                                 r"missing\?\)"):
        io.read_volume(str(tmp_path / "gap"))
    _write_series(tmp_path / "uneven", _ct(), UID_A, z_positions=[0, 2.5, 5, 7.5, 10, 12, 14.5, 17, 19.5, 22])
    with pytest.raises(io.VolumeReadError, match="not evenly spaced"):
        io.read_volume(str(tmp_path / "uneven"))
    _write_series(tmp_path / "dup", _ct(), UID_A, z_positions=[0, 2.5, 5, 5, 7.5, 10, 12.5, 15, 17.5, 20])
    with pytest.raises(io.VolumeReadError, match="same position"):
        io.read_volume(str(tmp_path / "dup"))
    _write_series(tmp_path / "ok", _ct(), UID_A)                   # evenly spaced: read as before
    vol = io.read_volume(str(tmp_path / "ok"))
    assert vol.array.shape == (10, 12, 14)
    np.testing.assert_allclose(np.linalg.norm(vol.ijk_to_ras[:3, 2]), 2.5, atol=1e-4)


def test_dicom_folder_with_two_series_reports_and_chooses(tmp_path):
    folder = tmp_path / "dicom"
    _write_series(folder, _ct(), UID_A)
    _write_series(folder, _ct((4, 12, 14)), UID_B, prefix="other")
    vol = io.read_volume(str(folder))
    assert vol.meta["series_uid"] == UID_A and vol.meta["other_series"] == [UID_B]
    assert vol.meta["series_files"] == {UID_A: 10, UID_B: 4}
    small = io.read_volume(str(folder), series_uid=UID_B)
    assert small.meta["series_uid"] == UID_B and small.array.shape == (4, 12, 14)
    with pytest.raises(io.VolumeReadError, match=rf"no DICOM series with UID 1\.2\.3.*{UID_A} \(10 files\)"):
        io.read_volume(str(folder), series_uid="1.2.3")


def test_segment_cli_dicom_series_choice_is_printed_and_recorded(inputs, tmp_path):
    folder = tmp_path / "dicom"
    _write_series(folder, inputs["volume"], UID_A)
    v = inputs["volume"]
    _write_series(folder, Volume(np.ascontiguousarray(v.array[:5]), v.ijk_to_ras), UID_B, prefix="other")
    out, timings = tmp_path / "m.nii.gz", tmp_path / "t.json"
    r = run_cli(*_segment_args(inputs, folder, out, "--timings", timings))
    assert r.returncode == 0, r.stderr
    assert f"DICOM folder holds 2 series; reading {UID_A} (24 files)" in r.stdout and UID_B in r.stdout
    rec = json.loads(timings.read_text(encoding="utf-8"))["dicom_series"]
    assert rec == {"series_uid": UID_A, "n_files": 24, "other_series": [UID_B], "chosen_by": "most files"}
    args = _segment_args(inputs, folder, out, "--timings", timings, "--series", UID_B, "--overwrite")
    args[args.index("20,18,12")] = "20,18,2"                          # inside the 5-slice series
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    rec = json.loads(timings.read_text(encoding="utf-8"))["dicom_series"]
    assert rec["series_uid"] == UID_B and rec["chosen_by"] == "--series" and rec["n_files"] == 5
    assert io.read_volume(str(out)).array.shape == (5, 36, 40)
    r = run_cli(*_segment_args(inputs, folder, tmp_path / "x.nii.gz", "--series", "9.9.9"))
    assert r.returncode == 1 and "no DICOM series with UID 9.9.9" in r.stderr
    gap = tmp_path / "gap"
    z = [2.0 * k for k in range(24) if k != 10]
    _write_series(gap, inputs["volume"], UID_A, z_positions=z)
    r = run_cli(*_segment_args(inputs, gap, tmp_path / "g.nii.gz"))
    assert r.returncode == 1 and "not evenly spaced" in r.stderr and not (tmp_path / "g.nii.gz").exists()


# ------------------------------------------------------------------------------------------ item 10: float64
def test_float64_beyond_float32_range_is_refused(tmp_path, inputs):
    arr = np.zeros((10, 12, 14))
    arr[3, 4, 5] = 1e300
    path = tmp_path / "huge.mha"
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
    with pytest.raises(io.VolumeReadError, match=r"1 voxel value\(s\) beyond the float32 range"):
        io.read_volume(str(path))
    arr[3, 4, 5] = 3.0e38                                          # large but representable in float32
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
    assert io.read_volume(str(path)).array.dtype == np.float64
    big = inputs["volume"].array.astype(np.float64)
    big[0, 0, 0] = -1e39
    src = tmp_path / "ct64.nrrd"
    io.write_volume(inputs["volume"].with_array(big), str(src))
    out = tmp_path / "m.nii.gz"
    r = run_cli(*_segment_args(inputs, src, out))
    assert r.returncode == 1 and "float32 range" in r.stderr and not out.exists()


# ------------------------------------------------------------------------------------------ item 11: outputs
def test_read_only_output_folder_is_refused_before_the_model_runs(inputs, tmp_path):
    with small_disk(tmp_path / "ro", "1m") as ro:
        remount_read_only(ro)
        for flags in (["--out", ro / "m.nii.gz"], ["--out", tmp_path / "m.nii.gz", "--timings", ro / "t.json"]):
            args = _segment_args(inputs, inputs["image"], tmp_path / "unused.nii.gz")[:-2] + flags
            r = run_cli(*args)
            assert r.returncode == 1, r.stderr
            assert "cannot create files in" in r.stderr and "Read-only file system" in r.stderr
            assert "model:" not in r.stdout and not (tmp_path / "m.nii.gz").exists()


def test_failing_timings_write_leaves_no_half_result(inputs, tmp_path):
    out = tmp_path / "mask.nii.gz"
    out.write_bytes(b"old mask")
    with small_disk(tmp_path / "full", "8k") as full:
        (full / "filler").write_bytes(b"x" * 8192)                  # full: new files can be created, not filled
        r = run_cli(*_segment_args(inputs, inputs["image"], out, "--timings", full / "t.json", "--overwrite"))
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert "No space left on device" in r.stderr
        assert _listing(full) == ["filler"]
    assert out.read_bytes() == b"old mask" and _listing(tmp_path) == ["full", "mask.nii.gz"]


def test_failing_timings_write_injected(inputs, tmp_path, monkeypatch, capsys):
    """In process (always runs): the JSON writer fails after the mask was staged -> exit 1, no mask."""
    def broken(path, data, **kw):
        raise OSError(28, "No space left on device (injected)")

    monkeypatch.setattr(segment_command, "write_json", broken)
    out = tmp_path / "m.nii.gz"
    status = cli.main([str(a) for a in _segment_args(inputs, inputs["image"], out, "--timings", tmp_path / "t.json",
                                                     "-q")])
    assert status == 1 and "No space left on device (injected)" in capsys.readouterr().err
    assert _listing(tmp_path) == []


def test_atomic_group_is_all_or_nothing(tmp_path, monkeypatch):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    atomic.write_json(a, "old a")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic.AtomicGroup() as g:
            atomic.write_json(a, "new a", group=g)
            atomic.atomic_write(b, lambda tmp: (_ for _ in ()).throw(RuntimeError("boom")), group=g)
    assert json.loads(a.read_text(encoding="utf-8")) == "old a" and _listing(tmp_path) == ["a.json"]
    # the second rename fails after the first succeeded: the first is rolled back
    real_replace = os.replace

    def replace(src, dst):
        if str(dst) == str(b):
            raise OSError(5, "Input/output error (injected)")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="injected"):
        with atomic.AtomicGroup() as g:
            atomic.write_json(a, "new a", group=g)
            atomic.write_json(b, "new b", group=g)
    monkeypatch.setattr(os, "replace", real_replace)
    assert json.loads(a.read_text(encoding="utf-8")) == "old a" and _listing(tmp_path) == ["a.json"]
    with atomic.AtomicGroup() as g:
        atomic.write_json(a, "new a", group=g)
        atomic.write_json(b, "new b", group=g)
        assert json.loads(a.read_text(encoding="utf-8")) == "old a"                # nothing in place before the commit
    assert json.loads(a.read_text(encoding="utf-8")) == "new a" and json.loads(b.read_text(encoding="utf-8")) == "new b"
    assert _listing(tmp_path) == ["a.json", "b.json"]


# ------------------------------------------------------------------------------------------ issue 8 item 7
def test_no_model_offline_lists_the_choices_including_demo(inputs, tmp_path):
    env = {"SAM3D_HOME": str(tmp_path / "home"), "SAM3D_WEIGHTS_BASE_URL": "http://127.0.0.1:9"}
    r = run_cli("segment", inputs["image"], "--voxel", "--click", "1,1,1", "--out", tmp_path / "m.nii.gz", env=env)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("sam3d segment: error: no model given, and the default model sam-med3d-turbo")
    assert 4 <= len(lines) <= 6 and all(len(ln) <= 200 for ln in lines[1:]), r.stderr
    assert any(ln.strip().startswith("--model demo") for ln in lines)
    assert any(ln.strip().startswith("--checkpoint PATH") for ln in lines)
    assert any(str(tmp_path / "home") in ln for ln in lines)
    r = run_cli("segment", inputs["image"], "--voxel", "--click", "1,1,1", "--model", "sam-med3d",
                "--out", tmp_path / "m.nii.gz", env=env)
    assert r.returncode == 1 and "cannot find the model sam-med3d" in r.stderr and "--model demo" in r.stderr


def test_segment_sample_chest_with_segment_colour(inputs, tmp_path):
    import slicerio

    out = tmp_path / "lung.seg.nrrd"
    r = run_cli("segment", "--sample", "chest", "--voxel", "--click", "40,64,17", "--checkpoint", inputs["ckpt"],
                "--device", "cpu", "--no-extend", "--name", "left lung", "--out", out)
    assert r.returncode == 0, r.stderr
    seg = slicerio.read_segmentation(str(out))
    (segment,) = seg["segments"]
    assert segment["name"] == "left lung"
    np.testing.assert_allclose(segment["color"], segment_command.DEFAULT_SEGMENT_COLOR, atol=1e-3)
    assert seg["voxels"].shape[:3] == (128, 128, 34)
    r = run_cli("segment", "--sample", "chest", "--voxel", "--click", "40,64,17", "--checkpoint", inputs["ckpt"],
                "--device", "cpu", "--no-extend", "--color", "#00ff80", "--out", out, "--overwrite")
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(slicerio.read_segmentation(str(out))["segments"][0]["color"], [0, 1, 128 / 255],
                               atol=1e-3)


@pytest.mark.parametrize("args, needle", [
    ([], "no input: give an image file or DICOM folder, or --sample chest"),
    (["IMAGE", "--sample", "chest"], "not both"),
    (["--sample", "chest", "--series", "1.2"], "--series chooses a series"),
    (["IMAGE", "--color", "red"], "malformed --color"),
    (["--sample", "lungs"], "invalid choice: 'lungs'"),
])
def test_segment_input_usage_errors(inputs, tmp_path, args, needle):
    args = [inputs["image"] if a == "IMAGE" else a for a in args]
    r = run_cli("segment", *args, "--voxel", "--click", "1,1,1", "--checkpoint", inputs["ckpt"],
                "--out", tmp_path / "m.seg.nrrd")
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert _listing(tmp_path) == []
