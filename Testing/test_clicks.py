"""Click simulation used by training and evaluation (SAM3DSegmentLib.train.clicks)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from SAM3DSegmentLib.train.clicks import prediction_mask, sample_click, sample_clicks  # noqa: E402
from SAM3DSegmentLib.train.interaction import mask_only_steps  # noqa: E402


def _box(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return m


def test_first_click_is_the_deepest_point_of_the_object():
    gt = _box((20, 20, 20), (3, 5, 7), (14, 14, 14))  # centre voxel of an odd box: (8, 9, 10) ... sides 11, 9, 7
    click = sample_click(gt, None, "deepest")
    assert click.positive
    assert click.ijk == (8, 9, 10)
    # an empty prediction is the same as no prediction
    assert sample_click(gt, np.zeros_like(gt), "deepest") == click


def test_later_click_goes_to_the_deeper_error_region_with_the_right_sign():
    gt = _box((30, 30, 30), (2, 2, 2), (12, 12, 12))
    pred = gt.copy()
    pred |= _box((30, 30, 30), (16, 16, 16), (29, 29, 29))  # large false positive blob, deeper than any FN
    pred[2:4, 2:12, 2:12] = False  # thin false negative slab
    click = sample_click(gt, pred, "deepest")
    assert click.positive is False
    assert pred[click.ijk] and not gt[click.ijk]
    assert click.ijk == (22, 22, 22)
    # make the FN the deeper region: the click turns positive and lands inside the missed part
    pred2 = np.zeros_like(gt)
    pred2[2:5, 2:5, 2:5] = True
    click2 = sample_click(gt, pred2, "deepest")
    assert click2.positive and gt[click2.ijk] and not pred2[click2.ijk]
    assert sample_click(gt, gt.copy(), "deepest") is None


def test_random_sampler_stays_in_the_error_region_and_is_seeded():
    gt = _box((16, 16, 16), (2, 2, 2), (10, 10, 10))
    pred = _box((16, 16, 16), (5, 5, 5), (14, 14, 14))
    fn, fp = gt & ~pred, pred & ~gt
    a = [sample_click(gt, pred, "random", np.random.default_rng(3)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    seen = set()
    rng = np.random.default_rng(0)
    for _ in range(200):
        c = sample_click(gt, pred, "random", rng)
        assert (fn | fp)[c.ijk]
        assert c.positive == bool(fn[c.ijk])
        seen.add(c.positive)
    assert seen == {True, False}
    with pytest.raises(ValueError, match="Generator"):
        sample_click(gt, pred, "random", None)


def test_batched_torch_sampler_matches_the_error_region_and_pads_perfect_samples():
    gt = torch.zeros((3, 12, 12, 12), dtype=torch.bool)
    gt[:, 3:9, 3:9, 3:9] = True
    pred = torch.zeros_like(gt)
    pred[1] = gt[1]  # perfect -> no click
    pred[2, 0:2, 0:2, 0:2] = True  # FP corner + whole object missed
    rngs = [np.random.default_rng([0, i]) for i in range(3)]
    pts, labels = sample_clicks(gt, pred, "random", rngs)
    assert pts.shape == (3, 3) and labels.tolist()[1] == -1
    for i in (0, 2):
        idx = tuple(int(v) for v in pts[i])
        err = (gt[i] ^ pred[i])[idx]
        assert bool(err)
        assert labels[i] == int(bool(gt[i][idx]))
    # deepest mode on torch input gives the object centre for sample 0
    pts_d, lab_d = sample_clicks(gt, pred, "deepest", rngs)
    assert lab_d[0] == 1 and all(v in (5.0, 6.0) for v in pts_d[0])  # one of the 8 central voxels of 3..8


def test_prediction_threshold_is_sigmoid_half_not_logit_half():
    logits = torch.tensor([-0.2, 0.0, 0.3, 0.6])
    # sigmoid(0.3) = 0.57 > 0.5: predicted foreground (the reference's "logits > 0.5" would call it background)
    assert prediction_mask(logits).tolist() == [False, False, True, True]
    assert prediction_mask(logits).tolist() == (torch.sigmoid(logits) > 0.5).tolist()


def test_mask_only_steps_follow_the_reference_and_scale_to_short_loops():
    for seed in range(20):
        s = mask_only_steps(11, [2, 8], np.random.default_rng(seed))
        assert 10 in s and len(s) == 2
        (other,) = s - {10}
        assert 2 <= other <= 8
    assert mask_only_steps(3, [2, 8], np.random.default_rng(0)) == {2}  # range clipped away: last only
    assert mask_only_steps(4, [1, 1], np.random.default_rng(0)) == {1, 3}
    assert mask_only_steps(1, [2, 8], np.random.default_rng(0)) == set()  # the only step keeps its click
