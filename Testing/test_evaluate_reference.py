"""`sam3d evaluate`: the click protocols under their own names, and the ``reference`` protocol
(SAM-Med3D's ``validate_paired_img_gt``, all-clicks) — with a stub model, no torch needed."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from SAM3DSegmentLib.cli import evaluate as cli_evaluate
from SAM3DSegmentLib.cli.options import UsageError
from SAM3DSegmentLib.cli.runner import command_parser
from SAM3DSegmentLib.core.geometry import Volume, make_ijk_to_ras
from SAM3DSegmentLib.data import phantoms as P
from SAM3DSegmentLib.eval import cases as C
from SAM3DSegmentLib.eval import protocols as E
from SAM3DSegmentLib.eval.evaluate import run_evaluation
from SAM3DSegmentLib.eval.metrics import score
from SAM3DSegmentLib.eval.reference_mode import reference_validate


class RecordingBallBackend:
    """A test double of the MODEL: each decode starts from the previous low-res logits and, for every
    prompt point, sets (positive) or clears (negative) a ball of low-res voxels, restricted to the bright
    voxels of the encoded input. Records how many points each decode was given."""

    def __init__(self, image_size: int = 64, radius: float = 2.5):
        self.image_size, self.low_res_size, self.radius = image_size, image_size // 4, radius
        self.name = "recording ball stub"
        self.points_per_decode = []

    def encode(self, image):
        s = self.low_res_size
        img = np.asarray(image, dtype=np.float32)
        bright = img > 0.5 * (float(img.max()) + float(img.min()))
        return bright.reshape(s, 4, s, 4, s, 4).mean(axis=(1, 3, 5)) > 0.5

    def decode(self, embedding, points, labels, mask_logits):
        pts = np.asarray(points, float).reshape(-1, 3)
        self.points_per_decode.append(len(pts))
        s = self.low_res_size
        pred = np.zeros((s,) * 3, bool) if mask_logits is None else np.asarray(mask_logits) > 0
        grid = np.stack(np.meshgrid(*(np.arange(s),) * 3, indexing="ij"), axis=-1).astype(float)
        for p, lab in zip(pts, np.asarray(labels).reshape(-1)):
            ball = ((grid - ((p + 0.5) / 4.0 - 0.5)) ** 2).sum(-1) <= self.radius ** 2
            pred = (pred | (ball & embedding)) if lab == 1 else (pred & ~ball)
        return np.where(pred, 5.0, -5.0).astype(np.float32)


def _label_case():
    """An oblique, LPS-stored int16 CT-like case at a non-integer size x spacing / 1.5, with a label map
    holding the values 2 and 1 (targets listed out of value order)."""
    shape = (70, 64, 30)
    m = make_ijk_to_ras((0.957, 0.957, 1.5), P.oblique_rotation((0.3, -0.2, 0.1)) @ np.diag([-1.0, -1.0, 1.0]),
                        (30.0, 20.0, -10.0))
    kji = shape[::-1]
    centre = m[:3, :3] @ ((np.asarray(shape) - 1) / 2.0) + m[:3, 3]
    image = np.full(kji, -50.0, np.float32) + np.random.default_rng(4).normal(0, 10, kji).astype(np.float32)
    labels = np.zeros(kji, np.uint8)
    for value, offset, semi in ((2, (-12.0, 4.0, 0.0), (9.0, 7.0, 8.0)), (1, (13.0, -5.0, 2.0), (6.0, 8.0, 10.0))):
        organ = P.ellipsoid_mask(m, kji, P.Ellipsoid(centre + np.asarray(offset), semi)).astype(bool)
        image[organ] = 200.0
        labels[organ] = value
    vol = Volume(np.rint(image).astype(np.int16), m)
    return C.Case("oblique", vol, C.LabelTargets(labels, {"second": 2, "first": 1})), labels


def _config(**kw):
    base = dict(clicks=3, spacing_mm=1.5, model={"name": "stub"}, data={"name": "phantom"}, extend=False)
    base.update(kw)
    return E.EvalConfig(**base)


def test_click_protocols_have_their_own_names():
    assert set(E.CLICK_PROTOCOLS) == {"newest-click", "all-clicks"}
    assert "validate_paired_img_gt" in E.CLICK_PROTOCOLS["all-clicks"]
    assert "published evaluation" in E.CLICK_PROTOCOLS["newest-click"]
    assert _config().prompt_mode == "newest-click"
    assert _config(prompt_mode="newest").prompt_mode == "newest-click"  # older spellings still accepted
    assert _config(prompt_mode="all").prompt_mode == "all-clicks"
    with pytest.raises(C.EvaluationError, match="newest-click, all-clicks"):
        _config(prompt_mode="reference")
    assert "newest-click" in E.LEGACY_LABEL and "all-clicks" in E.REFERENCE_LABEL
    assert "reference" not in E.CLICK_PROTOCOLS["newest-click"]
    parser = command_parser(cli_evaluate)
    args = parser.parse_args(["--sample", "chest", "--out", "x", "--prompt-mode", "all-clicks"])
    assert args.prompt_mode == "all-clicks"
    assert parser.parse_args(["--sample", "chest", "--out", "x", "--prompt-mode", "all"]).prompt_mode == "all-clicks"
    assert parser.parse_args(["--sample", "chest", "--out", "x"]).prompt_mode == "newest-click"
    with pytest.raises(UsageError, match="newest-click, all-clicks"):
        parser.parse_args(["--sample", "chest", "--out", "x", "--prompt-mode", "reference"])


@pytest.mark.parametrize("mode, expected", [("newest-click", [1, 1, 1]), ("all-clicks", [1, 2, 3])])
def test_engine_feeds_the_named_click_protocol(tmp_path, mode, expected):
    case, _ = _label_case()
    backend = RecordingBallBackend()
    summary = run_evaluation([C.Case(case.name, case.image, {"first": case.targets["first"]})], backend,
                               _config(prompt_mode=mode, protocols=("engine",)), str(tmp_path))
    assert backend.points_per_decode == expected
    assert summary["prompt_mode"] == mode and summary["protocols"]["engine"]["click_protocol"] == mode


def test_reference_protocol_is_reference_validate_scored_per_click(tmp_path):
    case, labels = _label_case()
    summary = run_evaluation([case], RecordingBallBackend(), _config(protocols=("reference", "legacy")),
                               str(tmp_path))
    rows = [r for r in csv.DictReader(open(tmp_path / "per_case.csv", newline="")) if r["protocol"] == "reference"]
    assert [r["target"] for r in rows] == ["first"] * 3 + ["second"] * 3  # ascending label value, as the reference
    backend = RecordingBallBackend()
    ref = reference_validate(backend, case.image, labels, num_clicks=3)
    assert backend.points_per_decode == [1, 2, 3, 1, 2, 3]  # all clicks so far at every step
    spacing_kji = case.image.spacing[::-1]
    for value, name in ((1, "first"), (2, "second")):
        obj = ref.objects[value]
        mine = [r for r in rows if r["target"] == name]
        assert [r["index"] for r in mine] == [" ".join(str(v) for v in p) for p in obj.points]
        assert [r["positive"] == "1" for r in mine] == obj.positive
        gt = labels == value
        for n, r in enumerate(mine):
            expected = score(obj.mask(case.image, n) != 0, gt, spacing_kji, 2.0).dice
            assert float(r["dice"]) == pytest.approx(expected, abs=1e-6)
        assert float(mine[-1]["dice"]) == pytest.approx(score(ref.label_map == value, gt, spacing_kji).dice,
                                                        abs=1e-6)
        assert float(mine[-1]["dice"]) > 0.5
    entry = summary["protocols"]["reference"]
    assert entry["label"] == E.REFERENCE_LABEL and entry["click_protocol"] == "all-clicks"
    assert summary["protocols"]["legacy"]["click_protocol"] == "newest-click"
    assert summary["reference_seed"] == 233 and set(summary["click_protocols"]) == set(E.CLICK_PROTOCOLS)
    other = run_evaluation([case], RecordingBallBackend(), _config(protocols=("reference",), reference_seed=5),
                             str(tmp_path / "seed5"))
    assert other["reference_seed"] == 5
    rows5 = list(csv.DictReader(open(tmp_path / "seed5" / "per_case.csv", newline="")))
    assert [r["index"] for r in rows5] != [r["index"] for r in rows]  # the seed drives the clicks


def test_cli_protocol_all_runs_the_three_protocols(tmp_path, monkeypatch, capsys):
    case, _ = _label_case()
    monkeypatch.setattr(C, "sample_cases", lambda name: [case])
    monkeypatch.setattr(cli_evaluate, "_backend", lambda args: (RecordingBallBackend(), {"backend": "stub", "name": "stub"}))
    out = tmp_path / "out"
    assert cli_evaluate.main(["--sample", "chest", "--protocol", "all", "--prompt-mode", "all", "--clicks", "2",
                              "--spacing", "1.5", "--no-extend", "--reference-seed", "7", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["protocols"]) == ["engine", "legacy", "reference"]
    assert summary["prompt_mode"] == "all-clicks" and summary["reference_seed"] == 7
    assert [summary["protocols"][p]["click_protocol"] for p in ("engine", "legacy", "reference")] == \
        ["all-clicks", "newest-click", "all-clicks"]
    printed = capsys.readouterr().out
    assert "click protocol: all-clicks" in printed and "click protocol: newest-click" in printed
    assert (out / "dice_vs_clicks.png").stat().st_size > 1000
