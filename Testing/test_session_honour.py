"""SessionOptions.honour_clicks (issue 8 item 6): include-click voxels always in the mask, exclude-click voxels
never, parts an exclude click cuts off from every include click dropped; off = the model's mask bit for bit.

The stub model ignores every click after the first (it returns the previous logits), the way a model can
leave an exclude click's voxel in the mask. Its logits are a fixed pattern of low-res cells placed so that
each cell centre is a volume voxel centre (1 mm volume, 0.25 mm region voxels, 4 region voxels per cell),
so the model's mask is exactly the pattern, voxel for voxel.
"""
from __future__ import annotations

import numpy as np
import pytest

from SAM3DSegmentLib.core.geometry import Volume, make_ijk_to_ras
from SAM3DSegmentLib.inference.session import Click, Session, SessionOptions

CELLS = 8


def dumbbell() -> np.ndarray:
    """Cells [a, b, c]: block A (a 0..1) joined to block B (a 3..7) by ONE neck cell at (2, 3, 3), and a
    separate two-cell island at (0, 7, 6..7)."""
    p = np.zeros((CELLS,) * 3, bool)
    p[0:2, 2:6, 2:6] = True          # A
    p[2, 3, 3] = True                # the neck
    p[3:8, 1:7, 1:7] = True          # B (holds the first click)
    p[0, 7, 6:8] = True              # an island
    return p


class StubbornBackend:
    name = "stubborn stub"
    image_size = 32
    low_res_size = CELLS

    def __init__(self, pattern: np.ndarray):
        self.logits = np.where(pattern, 4.0, -4.0).astype(np.float32)
        self.decodes = 0

    def encode(self, image):
        return None

    def decode(self, embedding, points, labels, mask_logits):
        self.decodes += 1
        if mask_logits is not None and (np.asarray(mask_logits) > 0).any():
            return np.asarray(mask_logits, dtype=np.float32)     # ignores every later click
        return self.logits


VOLUME_SHAPE_IJK = (24, 22, 20)
FIRST = np.array([12.625, 11.625, 10.625])   # RAS of the first click (identity directions, 1 mm, origin 0)


def make_session(honour=True, **kw):
    arr = np.zeros(VOLUME_SHAPE_IJK[::-1], dtype=np.int16)
    vol = Volume(arr, make_ijk_to_ras((1.0, 1.0, 1.0)))
    s = Session(StubbornBackend(dumbbell()),
                SessionOptions(region_size=32, spacing_mm=0.25, extend=False, honour_clicks=honour, **kw))
    s.set_volume(vol)
    s.new_object()
    return s


def cell_voxel(s, cell):
    """(i, j, k) of the volume voxel at the centre of low-res cell ``cell`` of the object's first region."""
    region = s.regions()[0]
    idx = (np.asarray(cell, float) + 0.5) * 4 - 0.5
    ijk = s.volume.ras_to_ijk_points(region.index_to_ras(idx[None])[0])
    assert np.allclose(ijk, np.round(ijk), atol=1e-6)          # the set-up: cell centres on voxel centres
    return tuple(int(v) for v in np.round(ijk))


def pattern_mask(s, pattern):
    out = np.zeros(s.volume.array.shape, np.uint8)
    for cell in np.argwhere(pattern):
        i, j, k = cell_voxel(s, cell)
        out[k, j, i] = 1
    return out


def at(mask, ijk):
    i, j, k = ijk
    return int(mask[k, j, i])


def model_mask(s):
    full = tuple(slice(0, n) for n in s.volume.array.shape)
    return s._composer.render(s._object().regions, full)


def test_the_stub_makes_exactly_the_pattern():
    s = make_session()
    s.add_click(ras=FIRST)
    np.testing.assert_array_equal(s.mask(), pattern_mask(s, dumbbell()))
    assert at(s.mask(), s.volume.ras_to_voxel(FIRST)) == 1


@pytest.mark.parametrize("honour", [True, False])
def test_an_exclude_click_the_model_ignores(honour):
    s = make_session(honour)
    s.add_click(ras=FIRST)
    before = s.mask().copy()
    e = cell_voxel(s, (5, 3, 4))                  # deep inside B, next to the include click
    u = s.add_click(ijk=e, positive=False)
    np.testing.assert_array_equal(model_mask(s), before)   # the model kept it
    m = s.mask()
    if honour:
        assert at(m, e) == 0
        expected = before.copy()
        expected[e[2], e[1], e[0]] = 0
        np.testing.assert_array_equal(m, expected)           # that voxel only: B stays connected
        assert m.sum() == before.sum() - 1
    else:                                          # reference mode: the model's mask, bit for bit
        assert at(m, e) == 1
        np.testing.assert_array_equal(m, before)
    np.testing.assert_array_equal(u.mask_box, m[u.box])


@pytest.mark.parametrize("honour", [True, False])
def test_an_include_click_the_model_ignores(honour):
    s = make_session(honour)
    s.add_click(ras=FIRST)
    before = s.mask().copy()
    p = cell_voxel(s, (0, 0, 0))                  # outside the model's mask, inside the region
    assert at(before, p) == 0
    u = s.add_click(ijk=p, positive=True)
    assert at(s.mask(), p) == (1 if honour else 0)
    assert s.mask().sum() == before.sum() + (1 if honour else 0)
    np.testing.assert_array_equal(u.mask_box, s.mask()[u.box])


def test_cutting_the_neck_drops_the_part_cut_off_from_every_include_click():
    s = make_session()
    s.add_click(ras=FIRST)
    neck = cell_voxel(s, (2, 3, 3))
    u = s.add_click(ijk=neck, positive=False)
    p = dumbbell()
    p[2, 3, 3] = False
    p[0:2] = False                                 # block A lost its link to the include click ...
    p[0, 7, 6:8] = True                            # ... the island touches no exclude click: it stays
    np.testing.assert_array_equal(s.mask(), pattern_mask(s, p))
    np.testing.assert_array_equal(u.mask_box, s.mask()[u.box])
    # an include click in A brings A back (it holds an include click now); the neck stays excluded
    a = cell_voxel(s, (1, 3, 3))
    s.add_click(ijk=a, positive=True)
    p[0:2, 2:6, 2:6] = True
    np.testing.assert_array_equal(s.mask(), pattern_mask(s, p))


def test_an_exclude_click_on_an_island_drops_the_island():
    s = make_session()
    s.add_click(ras=FIRST)
    island = cell_voxel(s, (0, 7, 7))
    assert at(s.mask(), island) == 1
    s.add_click(ijk=island, positive=False)
    p = dumbbell()
    p[0, 7, 6:8] = False                           # the whole island, not only the clicked voxel
    np.testing.assert_array_equal(s.mask(), pattern_mask(s, p))


def test_the_later_click_wins_a_shared_voxel():
    s = make_session()
    s.add_click(ras=FIRST)
    v = cell_voxel(s, (6, 2, 2))
    s.add_click(ijk=v, positive=False)
    assert at(s.mask(), v) == 0
    s.add_click(ijk=v, positive=True)
    assert at(s.mask(), v) == 1


def test_undo_redo_and_replay_stay_exact_with_honoured_clicks():
    s = make_session()
    s.add_click(ras=FIRST)
    steps = [((2, 3, 3), False), ((0, 0, 0), True), ((5, 3, 4), False), ((1, 3, 3), True), ((0, 7, 7), False),
             ((2, 3, 3), True)]
    clicks = [Click(ras=tuple(FIRST))] + [Click(ijk=cell_voxel(s, c), positive=pos) for c, pos in steps]
    states = [s.mask().copy()]
    for c in clicks[1:]:
        before = s.mask().copy()
        u = s.add_click(ijk=c.ijk, positive=c.positive)
        after = s.mask()
        outside = np.ones(after.shape, bool)
        outside[u.box] = False
        assert not (before != after)[outside].any()          # the update box covers every change
        states.append(after.copy())
    assert len({m.tobytes() for m in states}) == len(states)  # every click changed the mask
    for n in range(len(states) - 1, 0, -1):
        u = s.undo()
        np.testing.assert_array_equal(s.mask(), states[n - 1])
        np.testing.assert_array_equal(u.mask_box, s.mask()[u.box])
    for n in range(1, len(states)):
        u = s.redo()
        np.testing.assert_array_equal(s.mask(), states[n])
        np.testing.assert_array_equal(u.mask_box, s.mask()[u.box])
    s2 = make_session()
    s2.set_clicks(clicks)                          # replaying the clicks gives the same mask
    np.testing.assert_array_equal(s2.mask(), states[-1])
    s.reset()
    assert s.mask().sum() == 0
    s.undo()
    np.testing.assert_array_equal(s.mask(), states[-1])


def test_reference_mode_is_the_model_mask_bit_for_bit():
    s = make_session(honour=False)
    s.add_click(ras=FIRST)
    for cell, pos in [((2, 3, 3), False), ((0, 0, 0), True), ((0, 7, 7), False)]:
        s.add_click(ijk=cell_voxel(s, cell), positive=pos)
        np.testing.assert_array_equal(s.mask(), model_mask(s))
    np.testing.assert_array_equal(s.mask(), pattern_mask(s, dumbbell()))


def test_honour_clicks_is_on_by_default():
    assert SessionOptions().honour_clicks is True
