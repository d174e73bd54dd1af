"""Simulated clicks never land on a voxel already clicked (issue 8 item 5: the demo clicked the right lung
twice at the same voxel when the model ignored the first correction)."""
from __future__ import annotations

import numpy as np

from SAM3DSegmentLib.eval.clicker import next_click, next_click_index


def _box(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return m


def test_a_repeated_point_moves_to_the_next_best_point_of_the_same_region():
    gt = _box((30, 30, 30), (2, 2, 2), (23, 23, 23))      # a 21^3 cube
    pred = _box((30, 30, 30), (2, 2, 2), (23, 23, 8))     # a slab of it predicted: FN is much the deeper region
    pred |= _box((30, 30, 30), (25, 25, 25), (28, 28, 28))  # a small false positive
    first = next_click_index(gt, pred)
    assert first.positive and first.ijk == (12, 12, 15)   # the deepest FN voxel
    # the model ignored that click (same prediction): the plain policy would repeat it ...
    assert next_click_index(gt, pred) == first
    again = next_click_index(gt, pred, avoid=[first.ijk])
    # ... with the clicked voxel as border the click moves away from it, still in the deeper FN region
    assert again is not None and again.ijk != first.ijk and again.positive
    assert gt[again.ijk] and not pred[again.ijk]
    assert np.abs(np.subtract(again.ijk, first.ijk)).max() >= 3
    third = next_click_index(gt, pred, avoid=[first.ijk, again.ijk])
    assert third.ijk not in (first.ijk, again.ijk)


def test_a_region_used_up_gives_the_other_region():
    gt = _box((12, 12, 12), (2, 2, 2), (9, 9, 9))
    pred = gt.copy()
    pred[5, 5, 5:7] = False                    # a two-voxel false negative ...
    pred[10, 10, 0] = True                     # ... and a one-voxel false positive (same depth, fewer voxels)
    c1 = next_click_index(gt, pred)
    assert c1.positive and c1.ijk in ((5, 5, 5), (5, 5, 6))
    c2 = next_click_index(gt, pred, avoid=[c1.ijk])       # the other FN voxel
    assert c2.positive and c2.ijk in ((5, 5, 5), (5, 5, 6)) and c2.ijk != c1.ijk
    c3 = next_click_index(gt, pred, avoid=[c1.ijk, c2.ijk])   # FN used up: the other region
    assert c3 == ((10, 10, 0), False)
    assert next_click_index(gt, pred, avoid=[c1.ijk, c2.ijk, c3.ijk]) is None   # every error voxel clicked


def test_avoid_changes_nothing_without_a_repeat():
    rng = np.random.default_rng(3)
    gt = _box((24, 24, 24), (3, 4, 5), (20, 18, 16))
    pred = gt & (rng.random(gt.shape) > 0.3)
    plain = next_click_index(gt, pred, (1.0, 0.8, 2.5))
    far = [(0, 0, 0), (23, 23, 23)]
    assert next_click_index(gt, pred, (1.0, 0.8, 2.5), avoid=far) == plain


def test_volume_order_wrapper_avoids_ijk_clicks():
    gt = _box((10, 20, 30), (2, 3, 4), (8, 17, 26))       # [k, j, i]
    first = next_click(gt, None, (2.0, 1.0, 1.0))
    i, j, k = first.ijk
    assert gt[k, j, i]
    second = next_click(gt, None, (2.0, 1.0, 1.0), avoid_ijk=[first.ijk])
    assert second.ijk != first.ijk and second.positive
    i2, j2, k2 = second.ijk
    assert gt[k2, j2, i2]


def test_repeated_clicks_in_a_simulated_session_never_repeat():
    """A model that never changes its prediction: every click of a 6-click loop is a new voxel."""
    gt = _box((20, 20, 20), (4, 4, 4), (16, 16, 16))
    pred = _box((20, 20, 20), (4, 4, 4), (16, 16, 6))
    clicked = []
    for _ in range(6):
        c = next_click(gt, pred, avoid_ijk=clicked)
        assert c is not None and c.ijk not in clicked
        clicked.append(c.ijk)
