"""File I/O: every writer/reader round trip keeps voxels and ijk->RAS (oblique, LPS-flipped);
bad input gets a clear VolumeReadError; writes are atomic.

Frames: ``Volume.array[k, j, i]`` in RAS; files are LPS (the flip happens in geometry/io only).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from SAM3DSegmentLib import io
from SAM3DSegmentLib.data import phantoms as P
from SAM3DSegmentLib.core.geometry import Volume
from SAM3DSegmentLib.io import VolumeReadError, VolumeWriteError

OBLIQUE = P.oblique_rotation((12.0, -8.0, 25.0))


def _oblique_flipped(dtype=np.int16):
    image, mask = P.sphere_phantom((40, 36, 12), (0.7, 0.8, 5.0), OBLIQUE, origin=(31.5, -12.25, 80.0),
                                   radius_mm=9.0, noise=30, seed=5, dtype=dtype)
    return P.lps_flipped(image), P.lps_flipped(mask)


def _assert_same(a: Volume, b: Volume, atol=1e-5):
    assert a.array.shape == b.array.shape
    assert a.array.dtype == b.array.dtype, (a.array.dtype, b.array.dtype)
    assert np.array_equal(a.array, b.array)
    np.testing.assert_allclose(a.ijk_to_ras, b.ijk_to_ras, atol=atol)


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.uint8])
def test_volume_round_trip(tmp_path, ext, dtype):
    image, _ = _oblique_flipped(dtype)
    path = io.write_volume(image, str(tmp_path / f"ct{ext}"))
    back = io.read_volume(path)
    # NIfTI stores the affine in float32: ~1e-6 mm
    _assert_same(back, image, atol=1e-4 if ext.startswith(".nii") else 1e-9)
    assert back.meta["source"] == path and back.meta["format"] == ext.lstrip(".")
    assert sorted(os.listdir(tmp_path)) == [f"ct{ext}"]  # no temporary left behind


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mha"])
def test_mask_round_trip(tmp_path, ext):
    _, mask = _oblique_flipped()
    bool_mask = mask.with_array(mask.array.astype(bool))
    path = io.write_mask(bool_mask, str(tmp_path / f"mask{ext}"), label_value=3)
    back = io.read_volume(path)
    assert back.array.dtype == np.uint8
    assert np.array_equal(back.array, mask.array * 3)
    np.testing.assert_allclose(back.ijk_to_ras, mask.ijk_to_ras, atol=1e-4)


def _write_dicom_series(volume: Volume, folder, series_uid: str, n_slices=None):
    """Minimal CT series writer for the test (one file per k slice, LPS positions)."""
    os.makedirs(folder, exist_ok=True)
    image = volume.to_sitk()
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    n = image.GetSize()[2] if n_slices is None else n_slices
    for k in range(n):
        sl = image[:, :, k]
        pos = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "CT", "0010|0010": "Phantom^Test", "0010|0020": "P1",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1", "0020|000e": series_uid,
            "0020|0013": str(k + 1), "0020|0032": "\\".join(f"{v:.6f}" for v in pos),
            "0020|0037": "\\".join(f"{v:.8f}" for v in list(d[:, 0]) + list(d[:, 1])),
            "0008|0018": f"{series_uid}.{k + 1}", "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
        }
        for key, value in tags.items():
            sl.SetMetaData(key, value)
        writer.SetFileName(os.path.join(str(folder), f"slice{k:03d}.dcm"))
        writer.Execute(sl)


def test_dicom_series_round_trip_picks_largest_series(tmp_path):
    image, _ = _oblique_flipped()
    folder = tmp_path / "dicom"
    _write_dicom_series(image, folder, "1.2.826.0.1.3680043.2.1125.2")
    # a second, smaller series in the same folder must be ignored (and reported)
    small = image.with_array(np.zeros_like(image.array))
    _write_dicom_series(small, tmp_path / "tmp_small", "1.2.826.0.1.3680043.2.1125.3", n_slices=3)
    for name in os.listdir(tmp_path / "tmp_small"):
        os.replace(tmp_path / "tmp_small" / name, folder / f"other_{name}")
    back = io.read_volume(str(folder))
    assert back.meta["series_uid"] == "1.2.826.0.1.3680043.2.1125.2"
    assert back.meta["other_series"] == ["1.2.826.0.1.3680043.2.1125.3"]
    assert back.meta["format"] == "dicom" and back.meta["n_files"] == image.array.shape[0]
    assert np.array_equal(back.array.astype(np.int16), image.array)
    np.testing.assert_allclose(back.ijk_to_ras, image.ijk_to_ras, atol=1e-4)


def test_segmentation_round_trip_with_overlap_and_colors(tmp_path):
    image, mask = _oblique_flipped()
    other = np.zeros_like(mask.array)
    other[:, :10, :] = 1  # overlaps the sphere -> second layer
    masks = {"sphere": mask, "slab": mask.with_array(other)}
    path = io.write_segmentation(str(tmp_path / "seg.seg.nrrd"), masks, image,
                                 colors={"sphere": (1.0, 0.0, 0.0)})
    back = io.read_segmentation(path)
    assert list(back) == ["sphere", "slab"]
    for name in masks:
        _assert_same(back[name], masks[name], atol=1e-9)
    assert back["sphere"].meta["color"] == [1.0, 0.0, 0.0]
    assert {back["sphere"].meta["layer"], back["slab"].meta["layer"]} == {0, 1}
    assert sorted(os.listdir(tmp_path)) == ["seg.seg.nrrd"]


def test_segmentation_masks_on_other_grid_are_resampled_in_physical_space(tmp_path):
    image, mask = _oblique_flipped()
    # the same mask stored the other way round (RAS order) must land on the same voxels
    stored_other_way = P.lps_flipped(mask)
    path = io.write_segmentation(str(tmp_path / "s.seg.nrrd"), {"sphere": stored_other_way}, image)
    back = io.read_segmentation(path)
    _assert_same(back["sphere"], mask, atol=1e-9)
    # and read_segmentation(reference=...) resamples onto another grid
    onto = io.read_segmentation(path, reference=stored_other_way)
    _assert_same(onto["sphere"], stored_other_way, atol=1e-9)


def test_resample_like_nearest_and_linear():
    image, mask = _oblique_flipped(np.float32)
    flipped = P.flip_axes(image, "k")
    back = io.resample_like(flipped, image, "linear")
    np.testing.assert_allclose(back.array, image.array, atol=1e-3)
    assert back.same_grid(image)


# ------------------------------------------------------------------------------ bad input
def _write_raw(image: sitk.Image, path) -> str:
    sitk.WriteImage(image, str(path))
    return str(path)


def test_missing_file(tmp_path):
    with pytest.raises(VolumeReadError, match="no such file"):
        io.read_volume(str(tmp_path / "nope.nii.gz"))


def test_unsupported_extension(tmp_path):
    p = tmp_path / "scan.png"
    p.write_bytes(b"\x89PNG....")
    with pytest.raises(VolumeReadError, match=r"unsupported file type '\.png'.*\.nii\.gz"):
        io.read_volume(str(p))


def test_seg_nrrd_given_as_image(tmp_path):
    image, mask = _oblique_flipped()
    path = io.write_segmentation(str(tmp_path / "s.seg.nrrd"), {"m": mask}, image)
    with pytest.raises(VolumeReadError, match="read_segmentation"):
        io.read_volume(path)


def test_empty_file(tmp_path):
    p = tmp_path / "ct.nrrd"
    p.write_bytes(b"")
    with pytest.raises(VolumeReadError, match="empty"):
        io.read_volume(str(p))


@pytest.mark.parametrize("ext,compress", [(".nii.gz", True), (".nii", False), (".nrrd", True),
                                          (".nrrd", False), (".mha", True), (".mha", False)])
def test_truncated_file(tmp_path, ext, compress):
    # ITK itself reads truncated NIfTI files silently (half the voxels garbage); we must not.
    image, _ = _oblique_flipped()
    path = io.write_volume(image, str(tmp_path / f"ct{ext}"), compress=compress)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(VolumeReadError, match="corrupt or truncated"):
        io.read_volume(path)


def test_corrupt_file(tmp_path):
    p = tmp_path / "ct.nii.gz"
    p.write_bytes(np.random.default_rng(0).integers(0, 255, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(VolumeReadError, match="could not be read"):
        io.read_volume(str(p))


def test_2d_image(tmp_path):
    path = _write_raw(sitk.Image(32, 32, sitk.sitkInt16), tmp_path / "slice.nrrd")
    with pytest.raises(VolumeReadError, match="2D image"):
        io.read_volume(path)


def test_single_slice_3d_image(tmp_path):
    path = _write_raw(sitk.Image(32, 32, 1, sitk.sitkInt16), tmp_path / "slice.nii.gz")
    with pytest.raises(VolumeReadError, match="single slice"):
        io.read_volume(path)


def test_4d_image(tmp_path):
    img = sitk.GetImageFromArray(np.zeros((3, 4, 5, 6), np.int16), isVector=False)
    assert img.GetDimension() == 4
    path = _write_raw(img, tmp_path / "series.nii.gz")
    with pytest.raises(VolumeReadError, match="4D image.*split"):
        io.read_volume(path)


def test_vector_image(tmp_path):
    img = sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.uint8), isVector=True)
    path = _write_raw(img, tmp_path / "rgb.mha")
    with pytest.raises(VolumeReadError, match="3 components per voxel"):
        io.read_volume(path)


def test_nan_and_inf_voxels(tmp_path):
    arr = np.zeros((4, 5, 6), np.float32)
    arr[0, 0, :3] = np.nan
    arr[1, 1, 1] = np.inf
    arr[2, 2, 2] = -np.inf
    path = _write_raw(sitk.GetImageFromArray(arr), tmp_path / "bad.nrrd")
    with pytest.raises(VolumeReadError, match=r"3 NaN and 2 infinite voxel value\(s\) out of 120"):
        io.read_volume(path)


def test_empty_dicom_folder(tmp_path):
    (tmp_path / "dicom").mkdir()
    (tmp_path / "dicom" / "notes.txt").write_text("not dicom")
    with pytest.raises(VolumeReadError, match="no DICOM series found"):
        io.read_volume(str(tmp_path / "dicom"))


def test_single_file_without_extension(tmp_path):
    p = tmp_path / "IM0001"
    p.write_bytes(b"x" * 200)
    with pytest.raises(VolumeReadError, match="give the folder"):
        io.read_volume(str(p))


def test_corrupt_segmentation(tmp_path):
    p = tmp_path / "bad.seg.nrrd"
    p.write_bytes(b"NRRD0004\ntype: what\n\n")
    with pytest.raises(VolumeReadError, match="could not be read as a Slicer segmentation"):
        io.read_segmentation(str(p))


# ------------------------------------------------------------------------------ writing
def test_write_errors(tmp_path):
    image, mask = _oblique_flipped()
    with pytest.raises(VolumeWriteError, match="cannot write '.png'"):
        io.write_volume(image, str(tmp_path / "a.png"))
    with pytest.raises(VolumeWriteError, match="write_segmentation"):
        io.write_volume(image, str(tmp_path / "a.seg.nrrd"))
    with pytest.raises(VolumeWriteError, match="does not exist"):
        io.write_volume(image, str(tmp_path / "missing" / "a.nrrd"))
    with pytest.raises(VolumeWriteError, match=".seg.nrrd"):
        io.write_segmentation(str(tmp_path / "a.nrrd"), {"m": mask}, image)
    with pytest.raises(VolumeWriteError, match="no masks"):
        io.write_segmentation(str(tmp_path / "a.seg.nrrd"), {}, image)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    image, _ = _oblique_flipped()
    path = io.write_volume(image, str(tmp_path / "ct.nrrd"))
    before = open(path, "rb").read()

    def failing(tmp):
        assert tmp.endswith(".nrrd") and os.path.dirname(tmp) == str(tmp_path)
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        io.atomic_write(path, failing)
    assert open(path, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["ct.nrrd"]
    # overwriting with a new volume replaces the file completely
    io.write_volume(image.with_array(image.array + 1), path)
    assert np.array_equal(io.read_volume(path).array, image.array + 1)


def test_file_extension():
    assert io.file_extension("/a/b/CT.NII.GZ") == ".nii.gz"
    assert io.file_extension("x.seg.nrrd") == ".seg.nrrd"
    assert io.file_extension("x.nrrd") == ".nrrd"
    assert io.file_extension("folder") == ""


def test_mhd_with_separate_raw_file(tmp_path):
    image, _ = _oblique_flipped()
    sitk.WriteImage(image.to_sitk(), str(tmp_path / "ct.mhd"))
    assert (tmp_path / "ct.raw").exists() or (tmp_path / "ct.zraw").exists()
    back = io.read_volume(str(tmp_path / "ct.mhd"))
    _assert_same(back, image, atol=1e-9)


def test_atomic_write_permissions_extension_and_failure(tmp_path):
    from SAM3DSegmentLib.core import atomic

    assert [atomic.path_extension(p) for p in ("a/ct.nii.gz", "x.seg.nrrd", "best.pt", "README", ".hidden")] == \
        [".nii.gz", ".seg.nrrd", ".pt", "", ""]
    seen = []

    def write(tmp):
        seen.append(tmp)
        with open(tmp, "w") as f:
            f.write("new")

    # (a .seg.nrrd name: no built-in content check, so plain text may stand in for the file)
    target = tmp_path / "sub" / "mask.seg.nrrd"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        atomic.atomic_write(target, write)
    atomic.atomic_write(target, write, make_dirs=True)
    assert seen[-1].endswith(".seg.nrrd") and os.path.dirname(seen[-1]) == str(target.parent)
    umask = os.umask(0o022)
    os.umask(umask)
    assert (os.stat(target).st_mode & 0o777) == 0o666 & ~umask  # not mkstemp's 0600
    os.chmod(target, 0o640)  # an existing file keeps the mode its owner gave it
    atomic.write_json(target, {"a": 1})
    assert (os.stat(target).st_mode & 0o777) == 0o640 and json.loads(target.read_text(encoding="utf-8")) == {"a": 1}

    def fail(tmp):
        open(tmp, "w").write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic.atomic_write(target, fail)
    assert json.loads(target.read_text(encoding="utf-8")) == {"a": 1} and os.listdir(target.parent) == ["mask.seg.nrrd"]
    with pytest.raises(IsADirectoryError):
        atomic.atomic_write(tmp_path, write)


def test_io_package_reexports_the_public_names_of_its_modules():
    from SAM3DSegmentLib.io import segmentations, volumes

    for module in (volumes, segmentations):
        for name in module.__all__:
            assert getattr(io, name) is getattr(module, name), name
    assert set(volumes.__all__) | set(segmentations.__all__) <= set(io.__all__)
