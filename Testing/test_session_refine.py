"""Starting an object from an existing mask (Session.set_initial_mask, inference/prior.py) with stub models.

The stubs stand in for the MODEL only (encode/decode); regions, prompts, paste-back, honouring and history are the
real engine. Small volumes and a 32^3 model input keep each test well under a second.
"""
from __future__ import annotations

import numpy as np
import pytest

from SAM3DSegmentLib.core.geometry import GeometryError, Volume, make_ijk_to_ras
from SAM3DSegmentLib.inference.session import Click, Session, SessionOptions

from test_session import BlobBackend, centre_ras, make_volume


class EchoBackend:
    """Stub model that returns its mask prompt (the previous logits) unchanged, plus +4 at the newest click's
    low-res cell when it is positive: it never removes what the prompt says, whatever the clicks."""

    name = "echo stub"
    image_size = 32
    low_res_size = 8

    def __init__(self):
        self.prompts = []

    def encode(self, image):
        return 0

    def decode(self, embedding, points, labels, mask_logits):
        s = self.low_res_size
        out = np.full((s, s, s), -4.0, np.float32) if mask_logits is None else np.array(mask_logits, np.float32)
        self.prompts.append(None if mask_logits is None else np.array(mask_logits))
        if labels[-1] == 1:
            cell = np.clip(np.floor((np.asarray(points[-1]) + 0.5) / (self.image_size / s)).astype(int), 0, s - 1)
            out[tuple(cell)] = 4.0
        return out


def sphere(vol, centre_ijk, radius_mm):
    """uint8 (k, j, i) mask of the voxels whose centres lie within ``radius_mm`` of voxel ``centre_ijk``."""
    k, j, i = np.indices(vol.array.shape)
    ijk = np.stack([i, j, k], axis=-1).astype(float)
    d = np.linalg.norm(vol.ijk_to_ras_points(ijk) - vol.ijk_to_ras_points(np.asarray(centre_ijk, float)), axis=-1)
    return (d <= radius_mm).astype(np.uint8)


def refine_session(backend=None, **kw):
    backend = backend or BlobBackend()
    opts = dict(region_size=32, spacing_mm=1.0, extend=False)
    opts.update(kw)
    s = Session(backend, SessionOptions(**opts))
    s.set_volume(make_volume())
    s.new_object()
    return s, backend


def outside_every_region(s):
    """bool (k, j, i): voxels whose centres lie outside every region of the current object (computed here
    from the regions' geometry, with a margin, independently of the engine's paste-back)."""
    vol = s.volume
    k, j, i = np.indices(vol.array.shape)
    ras = vol.ijk_to_ras_points(np.stack([i, j, k], axis=-1).astype(float))
    out = np.ones(vol.array.shape, dtype=bool)
    for region in s.regions():
        idx = region.ras_to_index(ras.reshape(-1, 3)).reshape(ras.shape)
        out &= ~np.all((idx >= -0.5 - 1e-6) & (idx <= region.size - 0.5 + 1e-6), axis=-1)
    return out


# ---------------------------------------------------------------------------------------------- the mask
def test_initial_mask_is_the_mask_until_a_click_and_undo_stops_there():
    s, _ = refine_session()
    init = sphere(s.volume, (20, 18, 15), 9.0)
    u = s.set_initial_mask(init)
    assert np.array_equal(s.mask(), init)
    assert np.array_equal(u.mask_box, init[u.box]) and init[u.box].sum() == init.sum()
    assert not s.can_undo() and s.clicks() == []


def test_initial_mask_on_another_grid_is_placed_in_physical_space():
    """A mask on a grid twice as fine, shifted by a whole number of fine voxels: its voxel centres include the
    session's, so nearest-neighbour resampling must give the sphere evaluated at the session's voxel centres."""
    s, _ = refine_session()
    vol = s.volume
    fine_m = make_ijk_to_ras(vol.spacing / 2.0, vol.directions, vol.ijk_to_ras_points(np.array([-3.0, -2.0, -1.0])))
    fine = Volume(np.zeros(tuple(2 * n + 12 for n in vol.array.shape), np.uint8), fine_m)
    fk, fj, fi = np.indices(fine.array.shape)
    c = vol.ijk_to_ras_points(np.array([20.0, 18.0, 15.0]))
    d = np.linalg.norm(fine.ijk_to_ras_points(np.stack([fi, fj, fk], -1).astype(float)) - c, axis=-1)
    fine.array[...] = (d <= 9.0).astype(np.uint8) * 3          # any non-zero label counts
    s.set_initial_mask(fine)
    assert np.array_equal(s.mask(), sphere(vol, (20, 18, 15), 9.0))


def test_initial_mask_on_a_box_and_bad_masks_are_refused_with_the_session_unchanged():
    s, _ = refine_session()
    init = sphere(s.volume, (20, 18, 15), 6.0)
    s.add_click(ras=centre_ras(s.volume, (10, 10, 10)))
    before, clicks = s.mask().copy(), s.clicks()
    with pytest.raises(GeometryError, match="does not match the volume grid"):
        s.set_initial_mask(init[:, :, :-1])
    with pytest.raises(GeometryError, match="no voxel inside the image"):
        s.set_initial_mask(np.zeros_like(init))
    with pytest.raises(GeometryError, match="not inside the volume grid"):
        s.set_initial_mask(np.ones((3, 3, 3)), box=(slice(-1, 2), slice(0, 3), slice(0, 3)))
    assert np.array_equal(s.mask(), before) and s.clicks() == clicks and s.can_undo()
    box = (slice(8, 22), slice(9, 27), slice(11, 29))
    s.set_initial_mask(init[box], box=box)
    assert np.array_equal(s.mask(), init) and not s.can_undo() and s.clicks() == []


# ---------------------------------------------------------------------------------------------- the prompt
def test_first_decode_in_a_region_is_prompted_with_the_initial_mask_in_physical_space():
    s, b = refine_session(init_prompt="binary", init_logit=5.0)
    centre, radius = (20, 18, 15), 9.0
    s.set_initial_mask(sphere(s.volume, centre, radius))
    s.add_click(ras=centre_ras(s.volume, (24, 18, 15)))
    prompt = b.decodes[0]["mask"]
    assert prompt is not None and set(np.unique(prompt)) == {-5.0, 5.0}
    # the low-res cell centres in RAS, from the region's own geometry: inside the sphere <=> +5
    region = s.regions()[0]
    lr = (np.arange(8) + 0.5) * 4 - 0.5
    grid = np.stack(np.meshgrid(lr, lr, lr, indexing="ij"), -1).reshape(-1, 3)
    d = np.linalg.norm(region.index_to_ras(grid) - s.volume.ijk_to_ras_points(np.asarray(centre, float)), axis=-1)
    sure = np.abs(d - radius) > 2.5   # a 4 mm cell whose centre is clear of the surface
    assert np.array_equal((prompt.reshape(-1) > 0)[sure], (d <= radius)[sure])
    # a second click in the same region continues from the region's logits, not from the initial mask
    s.add_click(ras=centre_ras(s.volume, (22, 18, 15)))
    assert np.array_equal(b.decodes[1]["mask"], s._object().history.undo[-1].regions_before[0].logits)


@pytest.mark.parametrize("prompt", ["distance", "occupancy", "binary"])
def test_every_prompt_encoding_is_signed_like_the_mask_and_bounded(prompt):
    s, b = refine_session(init_prompt=prompt, init_logit=6.0, init_width_mm=3.0)
    s.set_initial_mask(sphere(s.volume, (20, 18, 15), 9.0))
    s.add_click(ras=centre_ras(s.volume, (20, 18, 15)))
    p = b.decodes[0]["mask"]
    assert np.abs(p).max() <= 6.0 + 1e-6 and p.max() > 3.0 and p.min() < -3.0
    assert p[4, 4, 4] > 0 and p[0, 0, 0] < 0          # the click (and the sphere) sit at the region's centre


def test_zeros_prompt_starts_each_region_fresh_but_keeps_the_mask_outside():
    s, b = refine_session(init_prompt="zeros")
    s.set_initial_mask(sphere(s.volume, (20, 18, 15), 9.0))
    s.add_click(ras=centre_ras(s.volume, (20, 18, 15)))
    assert not np.any(b.decodes[0]["mask"])


def test_a_region_that_misses_the_initial_mask_starts_from_zeros():
    s, b = refine_session()
    s.set_initial_mask(sphere(s.volume, (6, 6, 5), 3.0))
    s.add_click(ras=centre_ras(s.volume, (35, 31, 26)))
    assert not np.any(b.decodes[0]["mask"])


# ---------------------------------------------------------------------------------------------- edits
def test_voxels_outside_the_regions_stay_bit_identical_and_undo_returns_to_the_initial_mask():
    s, _ = refine_session()
    init = np.zeros(s.volume.array.shape, np.uint8)
    init[4:26, 5:31, 3:37] = 1                           # a slab larger than one 32 mm region
    init[20:24, 2:4, 2:6] = 1                            # and a separate piece
    s.set_initial_mask(init)
    s.add_click(ras=centre_ras(s.volume, (30, 20, 8)), positive=True)
    s.add_click(ras=centre_ras(s.volume, (18, 18, 14)), positive=False)
    s.add_click(ras=centre_ras(s.volume, (4, 30, 20)), positive=True)
    assert s.region_count() == 3          # each click is beyond the 32 mm regions of the others
    mask, out = s.mask(), outside_every_region(s)
    assert out.sum() > 1000 and np.array_equal(mask[out], init[out])
    assert not np.array_equal(mask[~out], init[~out])   # the model did change what it sees
    s.undo()
    assert np.array_equal(s.mask()[out], init[out])
    s.undo()
    s.undo()
    assert np.array_equal(s.mask(), init) and not s.can_undo() and s.region_count() == 0
    s.redo()
    s.redo()
    s.redo()
    assert np.array_equal(s.mask(), mask)
    s.reset()
    assert np.array_equal(s.mask(), init) and s.clicks() == []
    s.undo()
    assert np.array_equal(s.mask(), mask)


def test_replaying_the_clicks_gives_the_incremental_mask():
    s, _ = refine_session(extend=True, init_extend=True, max_regions=3)
    init = np.zeros(s.volume.array.shape, np.uint8)
    init[6:24, 8:28, 5:35] = 1
    s.set_initial_mask(init)
    clicks = [Click(ras=centre_ras(s.volume, p), positive=q) for p, q in
              (((30, 20, 12), True), ((14, 16, 12), False), ((8, 22, 18), True))]
    s.add_clicks(clicks)
    incremental = s.mask().copy()
    s.set_clicks(clicks)
    assert np.array_equal(s.mask(), incremental)


def _slab(s):
    init = np.zeros(s.volume.array.shape, np.uint8)
    init[12:18, 14:22, :] = 1                            # along i across the whole volume: beyond any region
    return init


def test_a_refined_object_grows_into_neighbouring_regions_only_when_asked():
    s, b = refine_session(extend=True, max_regions=3)
    s.set_initial_mask(_slab(s))
    s.add_click(ras=centre_ras(s.volume, (20, 18, 15)))
    assert s.region_count() == 1 and len(b.decodes) == 1
    s, b = refine_session(extend=True, init_extend=True, max_regions=2, init_prompt="binary", init_logit=5.0)
    s.set_initial_mask(_slab(s))
    s.add_click(ras=centre_ras(s.volume, (20, 18, 15)))
    assert s.region_count() == 2 and len(b.decodes) == 2
    # the new region's prompt: the old region's logits where it overlaps, the initial mask's prompt elsewhere
    old, new = s.regions()
    prompt, own = b.decodes[1]["mask"], s._object().init.region_prompt(new)
    lr = (np.arange(8) + 0.5) * 4 - 0.5
    cells = np.stack(np.meshgrid(lr, lr, lr, indexing="ij"), -1).reshape(-1, 3)
    in_old = (old.ras_to_index(new.index_to_ras(cells)) + 0.5) / 4 - 0.5
    covered = np.all((in_old >= -0.5) & (in_old <= 7.5), axis=-1).reshape(8, 8, 8)
    assert 0 < covered.sum() < covered.size
    assert np.array_equal(prompt[~covered], own[~covered]) and not np.array_equal(prompt[covered], own[covered])


def test_an_exclude_click_never_drops_the_part_of_the_object_the_model_does_not_see():
    """The echo model keeps whatever the prompt says: the exclude voxel stays in the model's mask, so honouring
    forces it off. The object it cuts holds no include click, but it holds initial-mask voxels outside the
    region: only the clicked voxel goes. An island of the initial mask inside the region, clicked "not this",
    is dropped as for any object."""
    init = np.zeros(make_volume().array.shape, np.uint8)
    init[10:16, 2:34, 2:38] = 1          # big: reaches far beyond a 32 mm region around the click
    init[22:26, 16:20, 18:22] = 1        # an island near the click
    masks = {}
    for honour in (True, False):
        s, _ = refine_session(EchoBackend(), init_prompt="binary", init_logit=4.0, honour_clicks=honour)
        s.set_initial_mask(init)
        s.add_click(ras=centre_ras(s.volume, (20, 18, 12)), positive=False)
        first = s.mask().copy()
        s.add_click(ras=centre_ras(s.volume, (20, 18, 24)), positive=False)   # "not this" on the island
        masks[honour] = first, s.mask().copy()
    (first, second), (model_first, model_second) = masks[True], masks[False]
    assert model_first[12, 18, 20] == 1 and model_second[24, 18, 20] == 1    # the model kept both voxels
    expected = model_first.copy()
    expected[12, 18, 20] = 0
    assert np.array_equal(first, expected)                  # nothing but the clicked voxel is gone
    island = np.zeros_like(init, bool)
    island[20:28, 14:22, 16:24] = True                       # around the island, clear of the slab
    expected = model_second.copy()
    expected[12, 18, 20] = 0
    expected[island] = 0
    assert model_second[island].sum() > 20 and np.array_equal(second, expected)


def test_set_volume_forgets_the_initial_mask_and_memory_counts_it():
    s, _ = refine_session()
    init = sphere(s.volume, (20, 18, 15), 9.0)
    s.set_initial_mask(init)
    assert s.memory_bytes()["masks"] >= int(init.sum())
    logits = s.memory_bytes()["logits"]
    s.add_click(ras=centre_ras(s.volume, (20, 18, 15)))    # the region's logits and its prompt (8^3 float32 each)
    assert s.memory_bytes()["logits"] == logits + 2 * 8 ** 3 * 4
    s.set_volume(make_volume())
    assert not s.mask().any()
    s.add_click(ras=centre_ras(s.volume, (20, 18, 15)))
    assert s.mask()[0, 0, 0] == 0
