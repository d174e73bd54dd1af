"""The one nnU-Net dataset reader (SAM3DSegmentLib.data.datasets) and its two users, training and evaluation.

Before it, `sam3d train` and `sam3d evaluate` each read dataset folders and disagreed: on extensions and their
letter case, on hidden files, on how dataset.json labels are read, on unpaired files, on labels that are not on
their image's grid, and on the error type. Each test here checks both users on one of those cases.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from SAM3DSegmentLib.core.geometry import Volume, make_ijk_to_ras
from SAM3DSegmentLib.data import datasets
from SAM3DSegmentLib.data.datasets import DataError, label_names, read_case, read_nnunet_dataset
from SAM3DSegmentLib.eval.cases import discover_dataset, load_case
from SAM3DSegmentLib.io.volumes import write_volume
from SAM3DSegmentLib.train import data as train_data
from SAM3DSegmentLib.train.data import discover_cases


def _image(shape_kji=(6, 8, 8), spacing=(1.5, 1.5, 2.0), origin=(0.0, 0.0, 0.0)) -> Volume:
    m = make_ijk_to_ras(spacing)
    m[:3, 3] = origin
    arr = np.random.default_rng(0).integers(-100, 100, size=shape_kji).astype(np.int16)
    return Volume(arr, m)


def _label(image: Volume) -> np.ndarray:
    lab = np.zeros(image.array.shape, np.uint8)
    lab[1:4, 2:6, 2:6] = 1
    lab[4, 1, 1] = 2
    return lab


def _write(vol: Volume, path: str) -> None:
    """``write_volume`` under any letter case of the extension (ITK writes lower-case names only)."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, "tmp-" + name.lower())
    write_volume(vol, tmp)
    os.replace(tmp, path)


def _case(root, name, image_name=None, label_name=None, labels_json=None):
    os.makedirs(os.path.join(root, "imagesTr"), exist_ok=True)
    os.makedirs(os.path.join(root, "labelsTr"), exist_ok=True)
    img = _image()
    _write(img, os.path.join(root, "imagesTr", image_name or f"{name}_0000.nii.gz"))
    _write(img.with_array(_label(img)), os.path.join(root, "labelsTr", label_name or f"{name}.nii.gz"))
    if labels_json is not None:
        with open(os.path.join(root, "dataset.json"), "w") as f:
            json.dump({"labels": labels_json}, f)
    return str(root)


def _both(root):
    """What each user finds in ``root``: (training case ids, evaluation case names)."""
    return [c.case_id for c in discover_cases(root)], [c.name for c in discover_dataset(root)[0]]


def test_both_users_raise_the_one_error_type():
    assert train_data.DataError is DataError
    assert issubclass(DataError, ValueError)


def test_extensions_are_every_readable_format_in_any_letter_case(tmp_path):
    root = str(tmp_path / "ds")
    _case(root, "a", "a_0000.NII.GZ", "a.NII.GZ", labels_json={"background": 0, "organ": 1})
    _case(root, "b", "b_0000.mha", "b.mha")
    _case(root, "c", "c_0000.nrrd", "c.nrrd")
    assert _both(root) == (["a", "b", "c"], ["a", "b", "c"])
    refs, names = discover_dataset(root)
    assert load_case(refs[0], names).targets["organ"].sum() == 48  # the upper-case NIfTI pair reads
    assert datasets.split_extension("x.NII.GZ") == ("x", ".NII.GZ")
    assert datasets.split_extension("x.seg.nrrd") == ("x.seg.nrrd", "")  # a segmentation, not a label map
    assert datasets.split_extension("notes.txt") == ("notes.txt", "")


def test_hidden_files_and_other_files_are_not_data(tmp_path):
    root = _case(tmp_path / "ds", "a", labels_json={"background": 0, "organ": 1})
    for folder in ("imagesTr", "labelsTr"):
        with open(os.path.join(root, folder, "._a_0000.nii.gz" if folder == "imagesTr" else "._a.nii.gz"),
                  "wb") as f:
            f.write(b"\0\5\26\7 macOS AppleDouble")
        with open(os.path.join(root, folder, ".DS_Store"), "wb") as f:
            f.write(b"\0")
        with open(os.path.join(root, folder, "README.txt"), "w") as f:
            f.write("notes")
    assert _both(root) == (["a"], ["a"])


def test_dataset_json_labels_read_the_same_way_by_both(tmp_path):
    assert label_names({"labels": {"background": "0", "liver": "1"}}) == {1: "liver"}  # v2, values as text
    assert label_names({"labels": {"0": "background", "1": "liver"}}) == {1: "liver"}  # v1 / MSD
    assert label_names({"labels": {"background": 0, "liver": 1.0}}) == {1: "liver"}
    assert label_names({"name": "no labels"}) is None and label_names(None) is None
    for bad, needle in (({"liver": 1.5}, "not an integer"), ({"liver": True}, "not an integer"),
                        ({"liver": [1, 2]}, "region-based"), ({}, "non-empty"), ({"a": 1, "b": 1}, "both have"),
                        ({"a": -1}, "0..65535")):
        with pytest.raises(DataError, match=needle):
            label_names({"labels": bad})
    root = _case(tmp_path / "ds", "a", labels_json={"background": "0", "organ": "1", "speck": "2"})
    assert discover_cases(root)[0].classes == {1: "organ", 2: "speck"}
    refs, names = discover_dataset(root)
    assert names == {1: "organ", 2: "speck"} and sorted(load_case(refs[0], names).targets) == ["organ", "speck"]


def test_unpaired_files_are_errors_for_both(tmp_path):
    root = _case(tmp_path / "ds", "a", labels_json={"background": 0, "organ": 1})
    _case(root, "b")
    os.remove(os.path.join(root, "imagesTr", "b_0000.nii.gz"))  # a label without its image
    for find in (discover_cases, discover_dataset):
        with pytest.raises(DataError, match=r"label .*b\.nii\.gz has no image: expected .*b_0000\.nii\.gz"):
            find(root)
    _case(root, "b")
    os.remove(os.path.join(root, "labelsTr", "b.nii.gz"))  # an image without its label
    for find in (discover_cases, discover_dataset):
        with pytest.raises(DataError, match=r"case b: label file .*labelsTr.b\.nii\.gz is missing"):
            find(root)
    _case(root, "b")
    write_volume(_image(), os.path.join(root, "imagesTr", "b.nii.gz"))  # both naming styles for one case
    with pytest.raises(DataError, match=r"case b has two images in .*imagesTr, b_0000\.nii\.gz and b\.nii\.gz"):
        discover_dataset(root)


def test_equal_names_and_extra_channels(tmp_path):
    root = str(tmp_path / "ds")
    _case(root, "a", "a.nii.gz", "a.nii.gz")  # reference-style: equal names, no dataset.json
    _case(root, "b")  # nnU-Net names in the same folder
    write_volume(_image(), os.path.join(root, "imagesTr", "b_0001.nii.gz"))  # a second channel
    with pytest.warns(UserWarning, match="only channel _0000 is used"):
        assert _both(root) == (["a", "b"], ["a", "b"])
        assert all(c.binary and c.classes == {1: "foreground"} for c in discover_cases(root))
        assert sorted(load_case(discover_dataset(root)[0][0], None).targets) == ["label_1", "label_2"]


def test_file_ending_selects_the_files_in_any_letter_case(tmp_path):
    root = _case(tmp_path / "ds", "a", "a_0000.NRRD", "a.NRRD")
    _case(root, "b")  # .nii.gz: not the dataset's file_ending
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump({"labels": {"background": 0, "organ": 1}, "file_ending": ".nrrd"}, f)
    assert _both(root) == (["a"], ["a"])
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump({"labels": {"background": 0, "organ": 1}, "file_ending": ".png"}, f)
    with pytest.raises(DataError, match="file_ending '.png' is not a volume format"):
        read_nnunet_dataset(root)


def test_a_label_on_a_crop_of_the_image_grid_is_placed_and_any_other_grid_refused(tmp_path):
    root = _case(tmp_path / "ds", "a", labels_json={"background": 0, "organ": 1, "speck": 2})
    img = _image()
    full = _label(img)
    lab_path = os.path.join(root, "labelsTr", "a.nii.gz")
    # what Slicer writes for a segmentation cropped to its extent: same axes and spacing, shifted origin
    m = img.ijk_to_ras.copy()
    m[:3, 3] = img.ijk_to_ras_points(np.array([1.0, 1.0, 1.0]))
    write_volume(Volume(np.ascontiguousarray(full[1:5, 1:6, 1:6]), m), lab_path)
    case = discover_cases(root)[0]
    image, label = read_case(train_data._files_of(case))
    assert label.same_grid(image) and np.array_equal(label.array, full)
    refs, names = discover_dataset(root)
    assert np.array_equal(load_case(refs[0], names).targets["organ"], full == 1)
    # labelled voxels outside the image: refused
    m2 = m.copy()
    m2[:3, 3] = img.ijk_to_ras_points(np.array([6.0, 6.0, 4.0]))
    write_volume(Volume(np.ones((4, 4, 4), np.uint8), m2), lab_path)
    with pytest.raises(DataError, match="labelled voxel.* outside its image"):
        read_case(refs[0])
    # another spacing (or a half-voxel shift): refused, for both users
    write_volume(Volume(full, make_ijk_to_ras((1.8, 1.5, 2.0))), lab_path)
    with pytest.raises(DataError, match=r"case a: the label .* is not on the image grid.*Resample the label"):
        load_case(refs[0], names)
    with pytest.raises(DataError, match="not on the image grid"):
        train_data.prepare_dataset([root], str(tmp_path / "cache"), log=lambda *a: None)


def test_label_values_must_be_integers_in_range(tmp_path):
    root = _case(tmp_path / "ds", "a", labels_json={"background": 0, "organ": 1})
    lab_path = os.path.join(root, "labelsTr", "a.nii.gz")
    img = _image()
    write_volume(img.with_array(_label(img).astype(np.float32) * 0.5), lab_path)
    with pytest.raises(DataError, match="non-integer values"):
        read_case(discover_dataset(root)[0][0])
    write_volume(img.with_array(_label(img).astype(np.int16) - 1), lab_path)
    with pytest.raises(DataError, match=r"values -1..1; label values must be in 0..65535"):
        read_case(discover_dataset(root)[0][0])
    write_volume(img.with_array(_label(img).astype(np.float32)), lab_path)  # integral floats are fine
    _, label = read_case(discover_dataset(root)[0][0])
    assert label.array.dtype == np.uint8 and np.array_equal(label.array, _label(img))


def test_folder_messages_name_the_option_and_the_fix(tmp_path):
    with pytest.raises(DataError, match=r"--data: dataset folder .*nothing does not exist; give an nnU-Net raw "
                                        r"dataset folder \(imagesTs/ \+ labelsTs/"):
        discover_dataset(str(tmp_path / "nothing"), "Ts")
    with pytest.raises(DataError, match=r"data.roots: .* does not exist.*sam3d train make-demo-data"):
        discover_cases(str(tmp_path / "nothing"))
    os.makedirs(tmp_path / "half" / "imagesTr")
    with pytest.raises(DataError, match="has no labelsTr/ folder"):
        discover_dataset(str(tmp_path / "half"))
    os.makedirs(tmp_path / "half" / "labelsTr")
    with pytest.raises(DataError, match="holds no label files"):
        discover_dataset(str(tmp_path / "half"))
    with open(tmp_path / "half" / "dataset.json", "w") as f:
        f.write("{not json")
    with pytest.raises(DataError, match="cannot be read as JSON"):
        discover_cases(str(tmp_path / "half"))


def test_nnunet_layout_without_labels_says_what_to_add(tmp_path):
    root = _case(tmp_path / "ds", "a")
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump({"name": "x"}, f)
    with pytest.raises(DataError, match=r"no 'labels' object.*data.layout=binary"):
        discover_cases(root)
    assert [c.binary for c in discover_cases(root, "binary")] == [True]
    assert discover_dataset(root)[1] is None  # evaluation names every value present instead
