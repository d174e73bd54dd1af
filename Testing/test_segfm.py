"""The SegFM (CVPR 2025 interactive 3D segmentation challenge) protocol: click simulator, metrics, case files,
the protocol loop (with a deterministic stand-in model)."""
import os
import pickle

import numpy as np
import pytest
from scipy.integrate import cumulative_trapezoid

from SAM3DSegmentLib.core.geometry import Volume, make_ijk_to_ras
from SAM3DSegmentLib.data.segfm_npz import (SegFMDataError, boxes_from_gt, list_segfm_cases, read_segfm_case,
                                            write_segfm_case)
from SAM3DSegmentLib.data.segfm_synthetic import write_synthetic_segfm_set
from SAM3DSegmentLib.eval.metrics import click_auc, multiclass_scores
from SAM3DSegmentLib.eval.segfm import SegFMConfig, SegFMTask, box_click_index, run_case
from SAM3DSegmentLib.eval.segfm_clicks import padded_edt, segfm_click


def cube(shape, lo, hi, value=1, out=None):
    out = np.zeros(shape, dtype=np.uint8) if out is None else out
    out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = value
    return out


# ------------------------------------------------------------------------------------------- clicks
def test_click_goes_to_the_centre_of_the_largest_error_component_negative():
    gt = cube((30, 30, 30), (2, 2, 2), (12, 12, 12))
    pred = gt.copy()
    pred[5:8, 5:8, 5:8] = 0                    # missed: 27 voxels
    pred[18:23, 18:23, 18:23] = 1              # extra: 125 voxels, the larger
    click = segfm_click(gt, pred)
    assert click.index == (20, 20, 20) and click.positive is False
    assert click.component_voxels == 125 and click.depth == 3.0


def test_click_is_positive_when_the_largest_error_is_missed_object():
    gt = cube((30, 30, 30), (2, 2, 2), (14, 14, 14))
    pred = gt.copy()
    pred[3:10, 3:10, 3:10] = 0                 # missed: 343 voxels
    pred[20:23, 20:23, 20:23] = 1              # extra: 27 voxels
    click = segfm_click(gt, pred)
    assert click.index == (6, 6, 6) and click.positive is True and click.component_voxels == 343


def test_components_are_26_connected_and_ties_use_a_fresh_seed_42_draw():
    gt = np.zeros((30, 30, 30), dtype=np.uint8)
    pred = gt.copy()
    pred[2:5, 2:5, 2:5] = 1                    # A: 27 voxels ...
    pred[5:8, 5:8, 5:8] = 1                    # ... B touches A at one corner only: one 26-component of 54
    pred[20:22, 20:24, 20:25] = 1              # C: 40 voxels (the largest 6-connected component)
    click = segfm_click(gt, pred)
    assert click.component_voxels == 54 and click.positive is False
    # The two cube centres tie at depth 2; candidates in C order: (3,3,3), (6,6,6).
    assert click.depth == 2.0
    assert click.index == ((3, 3, 3), (6, 6, 6))[np.random.RandomState(42).choice(2)] == (3, 3, 3)


def test_tie_break_matches_the_challenge_reseeding_the_global_generator():
    gt = cube((12, 12, 12), (2, 2, 2), (6, 6, 6))   # a 4^3 cube: its 8 centre voxels tie at depth 2
    pred = np.zeros_like(gt)
    click = segfm_click(gt, pred)
    centres = [(z, y, x) for z in (3, 4) for y in (3, 4) for x in (3, 4)]   # C order
    state = np.random.get_state()
    try:
        np.random.seed(42)                     # what the challenge does before each draw
        expected = centres[np.random.choice(len(centres))]
    finally:
        np.random.set_state(state)
    assert click.index == expected == (4, 4, 3)
    assert segfm_click(gt, pred).index == click.index          # a fresh draw: the same every time
    assert click.positive is True and click.depth == 2.0


def test_error_filling_the_array_is_clicked_at_its_centre_thanks_to_the_zero_pad():
    gt = np.ones((7, 7, 7), dtype=np.uint8)
    click = segfm_click(gt, np.zeros_like(gt))
    assert click.index == (3, 3, 3) and click.depth == 4.0 and click.positive is True
    # the pad is 25 % of the box per axis, at least one voxel; distances are in voxels (no spacing)
    d = padded_edt(np.ones((1, 8, 40), dtype=bool))
    assert d.shape == (1, 8, 40) and d.max() == 1.0


def test_no_click_when_the_prediction_is_exact():
    gt = cube((8, 8, 8), (1, 1, 1), (4, 4, 4))
    assert segfm_click(gt, gt.copy()) is None


# ------------------------------------------------------------------------------------------ metrics
def test_multiclass_dice_nsd_on_known_shapes():
    shape = (30, 30, 30)
    gt = cube(shape, (2, 2, 2), (12, 12, 12), 1)
    cube(shape, (15, 15, 15), (25, 25, 25), 2, out=gt)
    seg = cube(shape, (2, 2, 2), (12, 12, 12), 1)
    cube(shape, (15, 15, 16), (25, 25, 26), 2, out=seg)        # class 2 shifted by one voxel along x
    s = multiclass_scores(gt, seg, [1, 2], spacing=(1.0, 1.0, 1.0), tolerance_mm=2.0)
    assert s.per_class[1] == (1.0, 1.0)
    assert s.per_class[2][0] == pytest.approx(0.9) and s.per_class[2][1] == 1.0   # every surface voxel within 1 mm
    assert s.dice == pytest.approx(0.95) and s.nsd == 1.0
    # with 5 mm voxels along x the one-voxel shift is beyond the 2 mm tolerance for the x faces
    s5 = multiclass_scores(gt, seg, [1, 2], spacing=(1.0, 1.0, 5.0), tolerance_mm=2.0)
    assert s5.dice == s.dice and s5.per_class[2][1] < 0.9
    # a class the prediction misses scores 0; only the classes asked for are averaged
    assert multiclass_scores(gt, np.where(seg == 2, 0, seg), [1, 2]).dice == pytest.approx(0.5)
    assert multiclass_scores(gt, seg, [1]).dice == 1.0


def test_nsd_is_zero_when_the_mean_dice_is_not_above_0_2():
    shape = (40, 20, 20)
    gt = cube(shape, (2, 2, 2), (12, 12, 12))
    far = cube(shape, (11, 2, 2), (21, 12, 12))                  # overlap 1 of 10 slices: Dice 0.1
    s = multiclass_scores(gt, far, [1], tolerance_mm=2.0)
    assert s.dice == pytest.approx(0.1) and s.per_class[1][1] > 0.0 and s.nsd == 0.0
    near = cube(shape, (9, 2, 2), (19, 12, 12))                  # overlap 3 of 10: Dice 0.3
    s = multiclass_scores(gt, near, [1], tolerance_mm=2.0)
    assert s.dice == pytest.approx(0.3) and s.nsd == s.per_class[1][1] > 0.0


def test_click_auc_is_the_unit_trapezoid_of_the_challenge():
    for curve in ([0.0, 0.25, 0.5, 0.75, 1.0], [1.0] * 5, [0.2, 0.9, 0.1, 0.7, 0.4]):
        official = cumulative_trapezoid(np.array(curve), np.arange(5))[-1]
        assert click_auc(curve) == pytest.approx(official)
    assert click_auc([1.0] * 5) == 4.0 and click_auc([0.0, 0.25, 0.5, 0.75, 1.0]) == 2.0
    with pytest.raises(ValueError):
        click_auc([0.5])


# -------------------------------------------------------------------------------------- case files
def challenge_boxes(gts):
    """The challenge's box recipe (get_boxes.py) without its random widening, as a list of dicts of numpy ints."""
    out = []
    for lab in np.unique(gts)[1:]:
        z, y, x = np.where(gts == lab)
        z_mid = z[len(z) // 2]
        ys, xs = np.where(gts[z_mid] == lab)
        out.append({"z_min": z.min(), "z_max": z.max(), "z_mid": z_mid, "z_mid_x_min": xs.min(),
                    "z_mid_y_min": ys.min(), "z_mid_x_max": xs.max(), "z_mid_y_max": ys.max()})
    return out


def test_reads_a_challenge_style_file_without_unpickling_code(tmp_path):
    gts = np.zeros((10, 12, 14), dtype=np.uint8)
    gts[0, 5, 5] = 1
    gts[1, 5, 6] = 1
    gts[5, 2:6, 3:8] = 1                        # voxel median on slice 5; slice median would be slice 1
    gts[6:9, 8:10, 9:12] = 3
    imgs = (np.arange(gts.size) % 256).astype(np.uint8).reshape(gts.shape)
    path = str(tmp_path / "CT_x.npz")
    np.savez_compressed(path, imgs=imgs, gts=gts, spacing=np.array([0.8, 0.7, 2.5]), boxes=challenge_boxes(gts))
    case = read_segfm_case(path)
    assert case.name == "CT_x" and case.classes == [1, 3]
    assert np.array_equal(case.imgs, imgs) and np.array_equal(case.gts, gts)
    assert case.spacing_zyx.tolist() == [2.5, 0.7, 0.8]          # stored (x, y, z)
    assert case.boxes[1]["z_mid"] == 5 and case.boxes[1]["z_mid_x_max"] == 7
    assert case.boxes == boxes_from_gt(gts)
    assert [case.boxes[c] for c in (1, 3)] == [{k: int(v) for k, v in b.items()} for b in challenge_boxes(gts)]
    vol = case.volume()
    assert vol.array.shape == gts.shape and np.allclose(vol.spacing, [0.8, 0.7, 2.5])
    assert read_segfm_case(path, spacing_order="zyx").spacing_zyx.tolist() == [0.8, 0.7, 2.5]


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_boxes_holding_code_are_refused_and_not_run(tmp_path):
    marker = str(tmp_path / "ran")
    boxes = np.empty(1, dtype=object)
    boxes[0] = _Evil(marker)
    path = str(tmp_path / "evil.npz")
    gts = cube((4, 4, 4), (1, 1, 1), (3, 3, 3))
    np.savez(path, imgs=gts, gts=gts, spacing=np.ones(3), boxes=boxes)
    with pytest.raises(SegFMDataError, match="not a plain list of boxes"):
        read_segfm_case(path)
    assert not os.path.exists(marker)
    pickle.loads(pickle.dumps(1))   # (the test's own pickling works: the refusal above is the reader's)


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("gts"), "no 'gts' key; give the folder of ground-truth files"),
    (lambda a: a.update(gts=np.zeros((2, 2, 2), np.uint8)), "'gts' has shape"),
    (lambda a: a.update(gts=a["gts"] * 0.5), "non-integer"),
    (lambda a: a.update(spacing=np.array([1.0, 0.0, 1.0])), "'spacing' must be three positive numbers"),
    (lambda a: a.update(boxes=a["boxes"][:1]), "1 box(es) for 2 class(es)"),
    (lambda a: a["boxes"][1].update(z_max=99), "not an ordered box inside"),
    (lambda a: a["boxes"][0].pop("z_mid"), "must be a dict with the keys"),
])
def test_bad_case_files_get_one_line_errors(tmp_path, change, message):
    gts = np.zeros((6, 8, 8), dtype=np.uint8)
    gts[1:3, 1:3, 1:3] = 1
    gts[4:6, 4:7, 4:7] = 2
    arrays = {"imgs": np.zeros(gts.shape, np.uint8), "gts": gts, "spacing": np.ones(3), "boxes": challenge_boxes(gts)}
    change(arrays)
    path = str(tmp_path / "bad.npz")
    np.savez_compressed(path, **arrays)
    with pytest.raises(SegFMDataError) as err:
        read_segfm_case(path)
    assert message in str(err.value) and "\n" not in str(err.value) and path in str(err.value)


def test_window_maps_the_stored_0_255_image_back(tmp_path):
    gts = cube((4, 5, 6), (1, 1, 1), (3, 3, 3))
    imgs = np.array([0, 51, 255], dtype=np.uint8)[np.arange(gts.size) % 3].reshape(gts.shape)
    case = read_segfm_case(write_segfm_case(str(tmp_path / "w.npz"), imgs, gts, (1.0, 1.0, 1.0)))
    assert np.array_equal(case.volume().array, imgs)
    hu = case.volume(window=(-1000.0, 1000.0)).array
    assert hu.dtype == np.float32 and sorted(np.unique(hu).tolist()) == pytest.approx([-1000.0, -600.0, 1000.0])
    assert SegFMTask.from_npz(case, window=(-160, 240)).image.array.max() == pytest.approx(240.0)
    with pytest.raises(ValueError, match="low < high"):
        case.volume(window=(10, 10))


def test_synthetic_set_with_separate_ground_truth(tmp_path):
    paths = write_synthetic_segfm_set(str(tmp_path / "imgs"), n_cases=3, seed=5, shape_ijk=(32, 32, 20),
                                      separate_gts=str(tmp_path / "gts"))
    assert [os.path.basename(p) for p in list_segfm_cases(str(tmp_path / "imgs"))] == \
        ["case_000.npz", "case_001.npz", "case_002.npz"]
    with pytest.raises(SegFMDataError, match="no 'gts' key"):
        read_segfm_case(paths[0])
    cases = [read_segfm_case(p, gts_path=str(tmp_path / "gts" / os.path.basename(p))) for p in paths]
    assert [c.boxes is not None for c in cases] == [True, True, False]
    for c in cases:
        assert c.imgs.dtype == np.uint8 and c.classes and c.spacing_zyx.tolist() == [2.0, 1.2, 1.2]
    again = write_synthetic_segfm_set(str(tmp_path / "again"), n_cases=1, seed=5, shape_ijk=(32, 32, 20))
    assert np.array_equal(read_segfm_case(again[0]).gts, cases[0].gts)        # everything from the seed


def test_written_case_round_trips(tmp_path):
    gts = cube((6, 7, 8), (1, 2, 3), (4, 5, 6), 2)
    path = write_segfm_case(str(tmp_path / "c.npz"), gts * 10, gts, (1.0, 2.0, 3.0), boxes_from_gt(gts))
    case = read_segfm_case(path)
    assert case.boxes == boxes_from_gt(gts) and case.spacing_zyx.tolist() == [3.0, 2.0, 1.0]


# ---------------------------------------------------------------------------------------- protocol
class BallBackend:
    """Deterministic stand-in model: logits > 0 within ``radius`` region voxels of an include click, the
    previous logits carried over, < 0 near an exclude click."""

    name = "ball stub"

    def __init__(self, image_size=32, radius=5.0):
        self.image_size, self.low_res_size, self.radius = image_size, image_size // 4, radius

    def encode(self, image):
        return {}

    def decode(self, embedding, points, labels, mask_logits):
        s = self.low_res_size
        f = self.image_size / s
        c = np.arange(s) * f + (f - 1) / 2
        grid = np.stack(np.meshgrid(c, c, c, indexing="ij"), axis=-1)
        out = np.full((s, s, s), -4.0)
        if mask_logits is not None:
            out = np.maximum(out, np.asarray(mask_logits) - 0.25)
        for p, lab in zip(points, labels):
            d = np.linalg.norm(grid - np.asarray(p), axis=-1)
            out = np.maximum(out, (self.radius - d) / 2.0) if lab == 1 else np.where(d < 3, -4.0, out)
        return out.astype(np.float32)


def ball_task():
    shape = (24, 40, 40)
    zz, yy, xx = np.indices(shape)
    gts = np.zeros(shape, dtype=np.uint8)
    gts[(zz - 12) ** 2 + (yy - 12) ** 2 + (xx - 12) ** 2 <= 36] = 1
    gts[(zz - 12) ** 2 + (yy - 26) ** 2 + (xx - 27) ** 2 <= 49] = 2
    image = Volume((gts * 100).astype(np.int16), make_ijk_to_ras((1.0, 1.0, 1.0)))
    return SegFMTask.from_volumes("balls", image, gts)


def test_protocol_steps_follow_the_simulator_and_the_metrics():
    task = ball_task()
    segs = {}
    config = SegFMConfig(box="gt", spacing_mm=1.0, extend=False)
    result = run_case(BallBackend(), task, config, on_step=lambda step, seg: segs.__setitem__(step, seg.copy()))
    assert [s["step"] for s in result.steps] == ["box", 1, 2, 3, 4, 5] and result.box_step
    boxes = boxes_from_gt(task.gts)
    box_rows = [c for c in result.clicks if c["step"] == "box"]
    assert [c["index_zyx"] for c in box_rows] == [" ".join(map(str, box_click_index(boxes[c]))) for c in (1, 2)]
    previous = segs["box"]
    for n in range(1, 6):
        for row in (c for c in result.clicks if c["step"] == n):
            expected = segfm_click(task.gts == row["class"], previous == row["class"])
            if expected is None:
                assert row["index_zyx"] == ""
            else:
                assert row["index_zyx"] == " ".join(map(str, expected.index))
                assert row["positive"] == int(expected.positive)
        scores = multiclass_scores(task.gts, segs[n], [1, 2], spacing=(1.0, 1.0, 1.0))
        assert result.steps[n]["dice"] == scores.dice and result.steps[n]["nsd"] == scores.nsd
        previous = segs[n]
    curve = [s["dice"] for s in result.steps[1:]]
    assert result.dsc_auc == pytest.approx(click_auc(curve)) and result.dsc_final == curve[-1]
    assert result.nsd_auc == pytest.approx(click_auc([s["nsd"] for s in result.steps[1:]]))
    assert result.steps[0]["dice"] > 0.5                  # the box-centre click lands inside each ball
    assert all(s["seconds"] > 0 for s in result.steps if s["step"] in ("box", 1))


def test_protocol_without_box_and_overlap_goes_to_the_higher_label():
    task = ball_task()
    segs = {}
    result = run_case(BallBackend(radius=12.0), task, SegFMConfig(box="none", spacing_mm=1.0, extend=False),
                      on_step=lambda step, seg: segs.__setitem__(step, seg.copy()))
    assert [s["step"] for s in result.steps] == [1, 2, 3, 4, 5] and not result.box_step
    first = [c for c in result.clicks if c["step"] == 1]
    assert all(c["positive"] == 1 for c in first)       # nothing predicted yet: the deepest voxel of each ball
    assert result.steps[0]["overlap_voxels"] > 0          # radius-12 balls around both objects overlap
    both = (segs[1] != 0)
    assert set(np.unique(segs[1][both])) <= {1, 2}


def test_box_mode_auto_needs_the_case_boxes():
    task = ball_task()
    result = run_case(BallBackend(), task, SegFMConfig(box="auto", spacing_mm=1.0, extend=False))
    assert not result.box_step                           # an nnU-Net case has no boxes
    task.boxes = {1: boxes_from_gt(task.gts)[1]}
    with pytest.raises(ValueError, match=r"no box for class\(es\) \[2\]"):
        run_case(BallBackend(), task, SegFMConfig(box="auto", spacing_mm=1.0, extend=False))


# ------------------------------------------------------------------------------ dataset runs, CLI
def test_nnunet_folder_runs_with_names_and_label_selection(tmp_path):
    import json

    from SAM3DSegmentLib.eval.segfm_run import run_segfm, segfm_data
    from SAM3DSegmentLib.io import write_volume

    task = ball_task()
    root = tmp_path / "Dataset001_Balls"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    write_volume(task.image, str(root / "imagesTr" / "b1_0000.nii.gz"))
    write_volume(Volume(task.gts, task.image.ijk_to_ras), str(root / "labelsTr" / "b1.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "left": 1, "right": 2},
                                                   "file_ending": ".nii.gz"}))
    data = segfm_data(str(root), labels=["2"])
    assert data.kind == "nnunet" and data.names == ["b1"]
    out = tmp_path / "out"
    summary = run_segfm(data, BallBackend(), SegFMConfig(box="gt", spacing_mm=1.0, extend=False), str(out))
    rows = (out / "per_class.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0].startswith("case,class,name,step") and len(rows) == 1 + 6          # one class, box + 5 steps
    assert all(",2,right," in r for r in rows[1:])
    case = (out / "per_case.csv").read_text(encoding="utf-8").splitlines()
    assert len(case) == 2 and case[1].startswith("b1,2,1,")
    saved = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert saved["means"]["DSC_AUC"] == pytest.approx(summary["means"]["DSC_AUC"]) and saved["cases"] == 1
    assert [p["step"] for p in saved["per_step"]] == ["box", 1, 2, 3, 4, 5]
    assert (out / "dice_vs_clicks.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="by label value"):
        segfm_data(str(root), labels=["right"])
    with pytest.raises(ValueError, match="--gts is for folders of .npz cases; .* is an nnU-Net dataset"):
        segfm_data(str(root), gts=str(tmp_path))


def test_cli_segfm_end_to_end_with_the_demo_model(tmp_path, capsys):
    import json

    from SAM3DSegmentLib.cli.evaluate import main

    write_synthetic_segfm_set(str(tmp_path / "cases"), n_cases=1, seed=3, shape_ijk=(40, 40, 24), n_classes=1)
    out = tmp_path / "out"
    argv = ["--protocol", "segfm", "--data", str(tmp_path / "cases"), "--model", "demo", "--device", "cpu",
            "--threads", "2", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "DSC_AUC" in printed and "not comparable" in printed
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["protocol"] == "segfm" and summary["model"]["name"] == "demo"
    assert summary["settings"]["box"] == "auto" and "include click" in summary["settings"]["box_use"]
    assert summary["reference"]["DSC_AUC"] == 3.35 and summary["auc_max"] == 4.0
    header, row = (out / "per_case.csv").read_text(encoding="utf-8").splitlines()
    values = dict(zip(header.split(","), row.split(",")))
    assert values["box_step"] == "1" and float(values["DSC_AUC"]) == pytest.approx(summary["means"]["DSC_AUC"],
                                                                                      rel=1e-5)
    assert 0.0 <= float(values["DSC_AUC"]) <= 4.0 and float(values["RunningTime_box"]) > 0
    assert main(argv) == 1                                       # never replaces results without --overwrite
    assert "already holds" in capsys.readouterr().err


def test_cli_segfm_option_misuse(tmp_path, capsys):
    from SAM3DSegmentLib.cli.evaluate import main

    assert main(["--data", str(tmp_path), "--box", "gt", "--out", str(tmp_path / "o")]) == 2
    assert "--box is an option of --protocol segfm only" in capsys.readouterr().err
    assert main(["--data", str(tmp_path), "--npz-window", "-1000,1000", "--out", str(tmp_path / "o")]) == 2
    assert "--npz-window is an option of --protocol segfm only" in capsys.readouterr().err   # value parsed
    assert main(["--sample", "chest", "--protocol", "segfm", "--out", str(tmp_path / "o")]) == 1
    assert "give --data" in capsys.readouterr().err
    assert main(["--data", str(tmp_path), "--protocol", "segfm", "--model", "demo", "--out", str(tmp_path / "o")]) == 1
    assert "holds no .npz files" in capsys.readouterr().err
