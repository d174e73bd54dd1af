"""``sam3d segment --init-mask FILE [--init-segment NAME|VALUE]`` (refine an existing segmentation) and the reader
behind it (``SAM3DSegmentLib.io.read_mask``). A tiny random model: the masks are meaningless, the geometry and the
rules are what is checked."""
from __future__ import annotations

import json

import numpy as np
import pytest

from SAM3DSegmentLib import cli
from SAM3DSegmentLib.core.geometry import Volume, make_ijk_to_ras
from SAM3DSegmentLib.io import AmbiguousMaskError, VolumeReadError, read_mask, read_volume, resample_like, \
    write_segmentation, write_volume


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    import torch

    from SAM3DSegmentLib.models import SamMed3DConfig, build_sam_med3d, save_checkpoint

    d = tmp_path_factory.mktemp("refine_cli")
    torch.manual_seed(0)
    ckpt = save_checkpoint(build_sam_med3d(SamMed3DConfig.tiny()), d / "tiny.pt", extra={"name": "tiny-test"})
    image_m = make_ijk_to_ras((1.2, 1.1, 2.0), np.diag([-1.0, -1.0, 1.0]), (30.0, 20.0, -15.0))
    rng = np.random.default_rng(0)
    write_volume(Volume(rng.integers(-100, 100, (24, 36, 40)).astype(np.int16), image_m), str(d / "ct.nii.gz"))
    image = read_volume(str(d / "ct.nii.gz"))
    # the masks live on another grid: 1 mm voxels, RAS-stored, shifted
    mask_m = make_ijk_to_ras((1.0, 1.0, 1.0), np.eye(3), (-20.0, -25.0, -18.0))
    k, j, i = np.indices((56, 52, 56))
    ras = np.stack([i, j, k], -1) @ mask_m[:3, :3].T + mask_m[:3, 3]
    organ = (np.abs(ras[..., 0] - 6.0) < 20) & (np.abs(ras[..., 1] - 0.0) < 15) & (np.abs(ras[..., 2] - 9) < 16)
    other = np.linalg.norm(ras - np.array([20.0, 20.5, 20.0]), axis=-1) < 5   # beside the organ
    organ_v, other_v = Volume(organ.astype(np.uint8), mask_m), Volume(other.astype(np.uint8), mask_m)
    write_segmentation(str(d / "two.seg.nrrd"), {"organ": organ_v, "other": other_v}, organ_v)
    labels = Volume((organ * 3 + other * 5).astype(np.uint8), mask_m)
    write_volume(labels, str(d / "labels.nii.gz"))
    far = Volume(organ.astype(np.uint8), make_ijk_to_ras((1.0, 1.0, 1.0), np.eye(3), (500.0, 500.0, 500.0)))
    write_volume(far, str(d / "far.nii.gz"))
    return {"dir": d, "ckpt": ckpt, "image": image, "organ": organ_v, "other": other_v}


def segment(inputs, out, *extra):
    click = inputs["image"].ijk_to_ras_points(np.array([20.0, 18.0, 12.0]))
    args = ["segment", str(inputs["dir"] / "ct.nii.gz"), "--click", ",".join(f"{v:.3f}" for v in click) + ":-",
            "--checkpoint", str(inputs["ckpt"]), "--device", "cpu", "--spacing", "0.25", "--no-extend",
            "--out", str(out), *map(str, extra)]
    return cli.main(args), click


# ------------------------------------------------------------------------------------------ read_mask
def test_read_mask_picks_one_segment_or_label_and_says_what_the_file_holds(inputs):
    d = inputs["dir"]
    organ = read_mask(str(d / "two.seg.nrrd"), "organ")
    assert organ.same_grid(inputs["organ"]) and np.array_equal(organ.array, inputs["organ"].array)
    assert np.array_equal(read_mask(str(d / "labels.nii.gz"), "5").array, inputs["other"].array)
    with pytest.raises(AmbiguousMaskError, match=r"holds 2 segments \(organ, other\); choose one by name"):
        read_mask(str(d / "two.seg.nrrd"))
    with pytest.raises(AmbiguousMaskError, match=r"holds 2 labels \(3, 5\); choose one label value"):
        read_mask(str(d / "labels.nii.gz"))
    with pytest.raises(VolumeReadError, match="has no segment 'liver'; it holds: organ, other"):
        read_mask(str(d / "two.seg.nrrd"), "liver")
    with pytest.raises(VolumeReadError, match="has no voxel of label 4; it holds labels 3, 5"):
        read_mask(str(d / "labels.nii.gz"), "4")
    with pytest.raises(VolumeReadError, match="choose a label value"):
        read_mask(str(d / "labels.nii.gz"), "organ")


# ------------------------------------------------------------------------------------------ sam3d segment
def test_segment_refines_the_chosen_segment_and_keeps_it_outside_the_model_region(inputs, tmp_path):
    out, timings = tmp_path / "refined.nii.gz", tmp_path / "t.json"
    status, click = segment(inputs, out, "--init-mask", inputs["dir"] / "two.seg.nrrd", "--init-segment", "organ",
                            "--timings", timings)
    assert status == 0
    image = inputs["image"]
    result = read_volume(str(out))
    init = resample_like(inputs["organ"], image, "nearest").array
    k, j, i = np.indices(image.array.shape)
    ras = image.ijk_to_ras_points(np.stack([i, j, k], -1).astype(float))
    outside = np.abs(ras - click).max(axis=-1) > 16.0 + 1.0      # the 128 x 0.25 mm region is 32 mm wide
    assert outside.sum() > 1000 and init[outside].any() and (init[outside] == 0).any()
    assert np.array_equal(result.array[outside], init[outside])
    report = json.loads(timings.read_text())
    assert report["init_mask"]["segment"] == "organ"
    assert report["init_mask"]["voxels_on_image_grid"] == int(init.sum())


@pytest.mark.parametrize("extra, status, needle", [
    (("--init-segment", "organ"), 2, "--init-segment chooses a segment of --init-mask; give --init-mask FILE too"),
    (("--init-mask", "two.seg.nrrd"), 1, "holds 2 segments (organ, other); choose one by name with --init-segment"),
    (("--init-mask", "labels.nii.gz"), 1, "holds 2 labels (3, 5); choose one label value with --init-segment"),
    (("--init-mask", "two.seg.nrrd", "--init-segment", "liver"), 1, "has no segment 'liver'; it holds: organ, other"),
    (("--init-mask", "far.nii.gz"), 1, "no voxel of the mask lies inside the image"),
    (("--init-mask", "missing.nii.gz"), 1, "missing.nii.gz"),
])
def test_bad_initial_masks_fail_with_one_line_and_write_nothing(inputs, tmp_path, capsys, extra, status, needle):
    extra = [str(inputs["dir"] / e) if e.endswith((".nrrd", ".nii.gz")) else e for e in extra]
    out = tmp_path / "never.nii.gz"
    got, _ = segment(inputs, out, *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert got == status and len(err) == 1 and needle in err[0], err
    assert not out.exists()
