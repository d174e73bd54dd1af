"""Dice / NSD / HD95 against cases small enough to compute by hand."""
from __future__ import annotations

import numpy as np
import pytest

from SAM3DSegmentLib.eval.metrics import dice, hd95, normalized_surface_dice, score, surface, surface_distances


def cube(shape=(20, 20, 30), lo=(5, 5, 5), side=10):
    m = np.zeros(shape, dtype=bool)
    m[lo[0]:lo[0] + side, lo[1]:lo[1] + side, lo[2]:lo[2] + side] = True
    return m


# --------------------------------------------------------------------------------------- Dice
def test_dice_of_shifted_cubes_is_overlap_fraction():
    # 10^3 cubes shifted by 2 along the last axis: overlap 10*10*8 = 800 -> Dice 2*800/2000 = 0.8.
    assert dice(cube(lo=(5, 5, 5)), cube(lo=(5, 5, 7))) == pytest.approx(0.8)
    assert dice(cube(), cube()) == 1.0


def test_dice_empty_conventions():
    empty = np.zeros((4, 4, 4), bool)
    full = np.ones((4, 4, 4), bool)
    assert dice(empty, empty) == 1.0
    assert dice(empty, full) == 0.0
    assert dice(full, empty) == 0.0


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="same|differs"):
        dice(np.zeros((3, 3, 3)), np.zeros((3, 3, 4)))


# ------------------------------------------------------------------------------------ surface
def test_surface_of_cube_is_its_shell_and_array_edge_counts_as_outside():
    s = surface(cube())
    assert s.sum() == 10 ** 3 - 8 ** 3  # 488 shell voxels
    full = np.ones((5, 5, 5), bool)
    assert surface(full).sum() == 5 ** 3 - 3 ** 3  # touching every face of the array


# ---------------------------------------------------------------------------------------- NSD
def test_nsd_of_cubes_shifted_by_two_voxels():
    """Hand count (isotropic 1 mm, shift 2 along one axis, side 10).

    Surface voxels per cube: 488. Their distance to the other surface is at most 2 mm, so NSD = 1 at
    tolerance >= 2. Distances of exactly 2 mm, per cube: the whole far face (10 x 10 = 100 voxels) plus the
    interior of the opposite face whose in-plane distance to the shell's side faces is >= 2 (6 x 6 = 36).
    Below 2 mm: NSD = (2*488 - 2*136) / (2*488) = 352/488.
    """
    a, b = cube(lo=(5, 5, 5)), cube(lo=(5, 5, 7))
    assert normalized_surface_dice(a, b, tolerance_mm=2.0) == 1.0
    assert normalized_surface_dice(a, b, tolerance_mm=5.0) == 1.0
    assert normalized_surface_dice(a, b, tolerance_mm=1.0) == pytest.approx(352 / 488)
    assert normalized_surface_dice(a, b, tolerance_mm=1.9) == pytest.approx(352 / 488)
    # Identical masks agree at zero tolerance.
    assert normalized_surface_dice(a, a, tolerance_mm=0.0) == 1.0


def test_nsd_honours_anisotropic_spacing_per_array_axis():
    # Shift by ONE voxel along array axis 0 (the k / slice axis of a [k, j, i] array).
    a, b = cube(lo=(5, 5, 5)), cube(lo=(6, 5, 5))
    thick_along_shift = (3.0, 1.0, 1.0)   # the shift is 3 mm
    thick_elsewhere = (1.0, 1.0, 3.0)     # the shift is 1 mm
    assert normalized_surface_dice(a, b, 3.0, thick_along_shift) == 1.0
    assert normalized_surface_dice(a, b, 2.9, thick_along_shift) < 1.0
    assert normalized_surface_dice(a, b, 1.0, thick_elsewhere) == 1.0
    # 3 mm off, per cube: the far end face (10 x 10 = 100) and the centre of the near end face whose
    # in-plane distance to the other cube's side shell is >= 3 mm (4 x 4 = 16): (488 - 116) / 488.
    assert normalized_surface_dice(a, b, 2.9, thick_along_shift) == pytest.approx(372 / 488)


def test_nsd_empty_conventions_and_bad_tolerance():
    e = np.zeros((6, 6, 6), bool)
    c = cube(shape=(6, 6, 6), lo=(1, 1, 1), side=3)
    assert normalized_surface_dice(e, e, 1.0) == 1.0
    assert normalized_surface_dice(c, e, 1.0) == 0.0
    assert normalized_surface_dice(e, c, 1.0) == 0.0
    with pytest.raises(ValueError, match="tolerance"):
        normalized_surface_dice(c, c, -1.0)


def test_crop_to_union_box_gives_the_same_distances_as_a_padded_array():
    rng = np.random.default_rng(3)
    a = np.zeros((12, 14, 16), bool)
    b = np.zeros_like(a)
    a[2:9, 3:10, 1:12] = rng.random((7, 7, 11)) > 0.3
    b[3:11, 2:12, 4:15] = rng.random((8, 10, 11)) > 0.3
    sp = (2.0, 0.7, 1.3)
    d1 = surface_distances(a, b, sp)
    big_a = np.pad(a, 5)
    big_b = np.pad(b, 5)
    d2 = surface_distances(big_a, big_b, sp)
    # Padding adds no surface (the original array edge was already "outside").
    np.testing.assert_allclose(np.sort(d1[0]), np.sort(d2[0]))
    np.testing.assert_allclose(np.sort(d1[1]), np.sort(d2[1]))


# --------------------------------------------------------------------------------------- HD95
def test_hd95_of_shifted_cubes_and_conventions():
    a, b = cube(lo=(5, 5, 5)), cube(lo=(5, 5, 7))
    # 272 of the 976 pooled distances are 2 mm (> 5 %), the rest <= 1 mm.
    assert hd95(a, b) == pytest.approx(2.0)
    assert hd95(a, b, spacing=(1.0, 1.0, 0.5)) == pytest.approx(1.0)
    e = np.zeros_like(a)
    assert hd95(e, e) == 0.0
    assert hd95(a, e) == float("inf")


def test_score_bundles_the_three():
    a, b = cube(lo=(5, 5, 5)), cube(lo=(5, 5, 7))
    s = score(a, b, tolerance_mm=1.0)
    assert s.dice == pytest.approx(0.8)
    assert s.nsd == pytest.approx(352 / 488)
    assert s.hd95 == pytest.approx(2.0)
