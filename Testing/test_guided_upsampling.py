"""Image-guided upsampling (SessionOptions.upsampling="guided", SAM3DSegmentLib.inference.guided).

The trilinear mode stays the plain paste-back (parity), the reference protocol ignores the setting (bit-identical
rows), guidance corrects a boundary the CT contradicts, and it never moves the mask away from a click: an include
click's voxel stays in, an exclude click's voxel stays out. Stub models (fixed logits), small volumes, no torch.
"""
from __future__ import annotations

import csv

import numpy as np
import pytest

from SAM3DSegmentLib.cli import evaluate as cli_evaluate
from SAM3DSegmentLib.cli import segment as cli_segment
from SAM3DSegmentLib.cli.options import UsageError
from SAM3DSegmentLib.cli.runner import command_parser
from SAM3DSegmentLib.core.geometry import Volume, make_ijk_to_ras
from SAM3DSegmentLib.eval import cases as C
from SAM3DSegmentLib.eval import protocols as E
from SAM3DSegmentLib.eval.evaluate import run_evaluation
from SAM3DSegmentLib.inference import regions as R
from SAM3DSegmentLib.inference.guided import GuidedParams, guided_mask
from SAM3DSegmentLib.inference.session import Click, Session, SessionOptions

from test_evaluate_reference import RecordingBallBackend, _label_case


class FixedBall:
    """A test double of the MODEL that ignores the prompt: logits ``(radius - distance to the region centre) / 4``
    (region voxels) on its 8^3 low-res grid, the same at every decode."""

    name, image_size, low_res_size = "fixed ball stub", 32, 8

    def __init__(self, radius: float):
        c = np.arange(8) * 4 + 1.5
        g = np.stack(np.meshgrid(c, c, c, indexing="ij"), axis=-1)
        self.logits = ((radius - np.linalg.norm(g - 15.5, axis=-1)) / 4.0).astype(np.float32)

    def encode(self, image):
        return None

    def decode(self, embedding, points, labels, mask_logits):
        return self.logits


def ball_volume(ct_radius_mm: float, n: int = 64, seed: int = 0):
    """1 mm voxels, a 700 HU ball of ``ct_radius_mm`` at the centre voxel in 0 HU, noise 10 HU."""
    rng = np.random.default_rng(seed)
    g = np.indices((n, n, n)) - 31.25   # the centre of the stub region around voxel 32 (its 1.5 mm grid starts at 8 mm)
    d = np.sqrt((g ** 2).sum(axis=0))
    arr = np.where(d <= ct_radius_mm, 700.0, 0.0) + rng.normal(0.0, 10.0, (n, n, n))
    return Volume(np.rint(arr).astype(np.int16), make_ijk_to_ras((1.0, 1.0, 1.0), np.eye(3), (0.0, 0.0, 0.0))), d


def run_session(mode: str, ct_radius_mm: float, clicks, logit_radius: float = 10.0, honour: bool = False):
    vol, d = ball_volume(ct_radius_mm)
    s = Session(FixedBall(logit_radius), SessionOptions(region_size=32, spacing_mm=1.5, extend=False,
                                                        honour_clicks=honour, upsampling=mode))
    s.set_volume(vol)
    s.new_object()
    s.add_clicks([Click(ijk=tuple(float(v) for v in c), positive=p) for c, p in clicks])
    return s, vol, d


CENTRE = (32, 32, 32)


def test_trilinear_is_the_default_and_the_plain_paste_back():
    assert SessionOptions().upsampling == "trilinear"
    with pytest.raises(ValueError, match="upsampling must be one of"):
        SessionOptions(upsampling="bicubic")
    s, vol, _ = run_session("trilinear", 13.0, [(CENTRE, True)])
    (region,) = s.regions()
    expected = R.logits_to_volume(FixedBall(10.0).logits, region, vol,
                                  box=tuple(slice(0, n) for n in vol.array.shape)) > s.options.threshold
    assert 0 < expected.sum() < expected.size
    assert np.array_equal(s.mask() != 0, expected)


def dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_guided_follows_the_ct_where_it_contradicts_the_trilinear_boundary():
    # the logits draw a ~14.5 mm ball; the CT shows a 12.5 mm one (and, below, a 16 mm one)
    plain, vol, d = run_session("trilinear", 12.5, [(CENTRE, True)])
    guided, _, _ = run_session("guided", 12.5, [(CENTRE, True)])
    ring = (d > 13.0) & (d < 14.0)
    assert plain.mask()[ring].all()          # trilinear: in
    assert guided.mask()[ring].sum() <= 0.01 * ring.sum()   # guided: out, as the CT says (a few ties aside)
    assert dice(guided.mask() != 0, d <= 12.5) > 0.995 > 0.85 > dice(plain.mask() != 0, d <= 12.5)
    grown, _, _ = run_session("guided", 16.0, [(CENTRE, True)])
    outer = (d > 15.2) & (d < 15.8)
    assert not plain.mask()[outer].any() and grown.mask()[outer].sum() >= 0.99 * outer.sum()
    assert dice(grown.mask() != 0, d <= 16.0) > 0.995


def test_guidance_keeps_an_include_click_in_and_an_exclude_click_out():
    # include: a voxel the CT alone would remove (13.76 mm from the centre, outside the 12.5 mm CT ball)
    inc = (45, 31, 31)   # (i, j, k)
    without, _, d = run_session("guided", 12.5, [(CENTRE, True)])
    assert 13.7 < d[inc[::-1]] < 13.8
    assert without.mask()[inc[::-1]] == 0                      # guidance alone takes it out ...
    with_click, _, _ = run_session("guided", 12.5, [(CENTRE, True), (inc, True)])
    assert with_click.mask()[inc[::-1]] == 1                    # ... but not next to an include click
    guard = GuidedParams.for_cell(6.0).click_guard_mm
    q = np.indices(d.shape)
    near = ((q[0] - inc[2]) ** 2 + (q[1] - inc[1]) ** 2 + (q[2] - inc[0]) ** 2) <= guard ** 2
    plain, _, _ = run_session("trilinear", 12.5, [(CENTRE, True)])
    assert np.all(with_click.mask()[near & (plain.mask() == 1)] == 1)   # nothing near it was removed
    assert with_click.mask()[31, 31, 31 - 13] == 0              # the far side (no click) still follows the CT
    # exclude: a voxel the CT alone would add (15.75 mm out, inside the 16 mm CT ball)
    exc = (47, 31, 31)
    grown, _, _ = run_session("guided", 16.0, [(CENTRE, True)])
    assert plain.mask()[exc[::-1]] == 0 and grown.mask()[exc[::-1]] == 1
    kept_out, _, _ = run_session("guided", 16.0, [(CENTRE, True), (exc, False)])
    assert kept_out.mask()[exc[::-1]] == 0
    assert kept_out.mask()[31, 31, 31 - 15] == 1               # the far side (no click) still follows the CT


def test_guided_mask_click_guard_directly():
    # a 5 mm slab along k, trilinear logits 7 mm wide: the CT trims 1 mm per face unless a click guards it
    nk = 40
    z = np.arange(nk, dtype=np.float32) - 20.0
    logits = np.broadcast_to((1.0 - np.abs(z) / 3.5)[:, None, None], (nk, 12, 12)).astype(np.float32)
    guide = np.broadcast_to(np.where(np.abs(z) <= 2.5, 700.0, 20.0)[:, None, None], logits.shape)
    guide = guide + np.random.default_rng(1).normal(0, 10, logits.shape)
    params = GuidedParams()
    free = guided_mask(logits, guide, (1.0, 1.0, 1.0), params)
    assert np.array_equal(free[:, 6, 6], np.abs(z) <= 2.5)
    guarded = guided_mask(logits, guide, (1.0, 1.0, 1.0), params, clicks_kji=[((23.0, 6.0, 6.0), True)])
    assert guarded[23, 6, 6] and guarded[23, 6, 8] and not guarded[23, 6, 11]   # guard 3 mm: (6, 11) is 5 away
    # the reverse: trilinear 3 mm wide, the CT 5 mm; an exclude click keeps its side's added voxels out
    narrow = np.broadcast_to((1.0 - np.abs(z) / 1.5)[:, None, None], (nk, 12, 12)).astype(np.float32)
    grown = guided_mask(narrow, guide, (1.0, 1.0, 1.0), params)
    assert np.array_equal(grown[:, 6, 6], np.abs(z) <= 2.5)
    kept = guided_mask(narrow, guide, (1.0, 1.0, 1.0), params, clicks_kji=[((22.0, 6.0, 6.0), False)])
    assert not kept[22, 6, 6] and kept[18, 6, 6]


def _rows(path):
    return [{k: v for k, v in r.items() if k != "seconds"}
            for r in csv.DictReader(open(path / "per_case.csv", newline=""))]


def test_reference_and_legacy_protocols_ignore_guidance(tmp_path):
    case, _ = _label_case()
    out = {}
    for mode in ("trilinear", "guided"):
        cfg = E.EvalConfig(clicks=2, spacing_mm=1.5, extend=False, protocols=("reference", "legacy"),
                           upsampling=mode, model={"name": "stub"}, data={"name": "phantom"})
        summary = run_evaluation([case], RecordingBallBackend(), cfg, str(tmp_path / mode))
        assert summary["engine_upsampling"] == mode
        out[mode] = _rows(tmp_path / mode)
    assert out["guided"] == out["trilinear"] and len(out["guided"]) == 8   # bit-identical, every row
    with pytest.raises(C.EvaluationError, match="--upsampling must be trilinear or guided"):
        E.EvalConfig(upsampling="nearest")


def test_cli_upsampling_option():
    ev = command_parser(cli_evaluate)
    assert ev.parse_args(["--sample", "chest", "--out", "x"]).upsampling == "trilinear"
    assert ev.parse_args(["--sample", "chest", "--out", "x", "--upsampling", "guided"]).upsampling == "guided"
    with pytest.raises(UsageError, match="trilinear"):
        ev.parse_args(["--sample", "chest", "--out", "x", "--upsampling", "cubic"])
    seg = command_parser(cli_segment)
    args = seg.parse_args(["--sample", "chest", "--click", "0,0,0", "--out", "m.nii.gz", "--upsampling", "guided"])
    assert args.upsampling == "guided"


def test_cli_segfm_refuses_guided(tmp_path):
    args = command_parser(cli_evaluate).parse_args(["--data", str(tmp_path), "--protocol", "segfm", "--out",
                                                    str(tmp_path / "o"), "--upsampling", "guided"])
    with pytest.raises(UsageError, match="--protocol segfm runs trilinear only"):
        cli_evaluate.run(args)


@pytest.mark.parametrize("oblique", [False, True])
def test_paste_operator_is_the_engines_paste_back(oblique):
    from SAM3DSegmentLib.data.phantoms import oblique_rotation
    from SAM3DSegmentLib.eval.logit_fit import fit_logits, paste_operator

    vol, d = ball_volume(12.0)
    if oblique:
        vol = Volume(vol.array, make_ijk_to_ras((1.0, 1.0, 1.2), oblique_rotation((12.0, -7.0, 20.0)), (3.0, -2.0, 1.0)))
    s = Session(FixedBall(10.0), SessionOptions(region_size=32, spacing_mm=1.5, extend=False, honour_clicks=False))
    s.set_volume(vol)
    s.new_object()
    s.add_click(ijk=CENTRE)
    (region,) = s.regions()
    op = paste_operator(vol, region, low_res_size=8)
    x = np.random.default_rng(3).normal(0.0, 2.0, (8, 8, 8)).astype(np.float32)
    engine = R.logits_to_volume(x, region, vol, box=op.box)
    assert op.inside.sum() > 1000
    np.testing.assert_allclose(op.forward(x), engine[op.inside], atol=1e-4)
    # the best fit of a 12 mm ball on 6 mm cells: close, not exact (what the low-res grid itself costs)
    label = d <= 12.0
    fit = fit_logits(label, op)
    mask = np.zeros(label.shape, bool)
    mask[op.box] = R.logits_to_volume(fit, region, vol, box=op.box) > 0
    assert 0.95 < dice(mask, label) < 1.0


def test_guidance_falls_back_to_trilinear_beyond_its_band_budget():
    z = np.arange(40, dtype=np.float32) - 20.0
    logits = np.broadcast_to((1.0 - np.abs(z) / 3.5)[:, None, None], (40, 12, 12)).astype(np.float32)
    guide = np.broadcast_to(np.where(np.abs(z) <= 2.5, 700.0, 20.0)[:, None, None], logits.shape)
    assert not np.array_equal(guided_mask(logits, guide, (1.0, 1.0, 1.0)), logits > 0)
    capped = guided_mask(logits, guide, (1.0, 1.0, 1.0), GuidedParams(max_band_cells=50))
    assert np.array_equal(capped, logits > 0)
