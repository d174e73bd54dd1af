"""The automatic mask generator (SAM3DSegmentLib.inference.automatic) and its parts: search area, grid and blob
prompts, stability score, 3D non-maximum suppression, filters, regions, the batched decode, the model-free oracle
and the chest phantom with nodules. Stubs stand in for the MODEL only; every other step is the real code."""
from __future__ import annotations

import numpy as np
import pytest

from SAM3DSegmentLib.core.geometry import Volume
from SAM3DSegmentLib.data.phantoms import Ellipsoid, ellipsoid_mask, make_volume_grid
from SAM3DSegmentLib.eval.detection import match_instances, objects_of
from SAM3DSegmentLib.eval.oracle import OracleRegionDecoder
from SAM3DSegmentLib.inference import regions as R
from SAM3DSegmentLib.inference.auto_masks import Rejection, region_mask
from SAM3DSegmentLib.inference.auto_options import AutoOptions
from SAM3DSegmentLib.inference.automatic import AutomaticMaskGenerator3D, RegionLattice
from SAM3DSegmentLib.inference.backends import decode_batch
from SAM3DSegmentLib.inference.candidates import RoiBox, SearchArea, blob_candidates, grid_candidates
from SAM3DSegmentLib.inference.nms import BoxMask, mask_iou, nms

SMALL = dict(region_size=32, spacing_mm=1.5, region_overlap_mm=16.0)   # 48 mm regions: fast stubs
#: size-limited searches drop what a region cut (a piece of the body in a corner region is small, not an object)
SIZED = dict(SMALL, drop_cut=True)


class ImageBackend:
    """Model stand-in that reads the image it is given: the object under a prompt is the 6-connected part of the
    region's voxels within ``tol`` (normalised units) of the prompt voxel's value; logits = 40 * (fraction of each
    2^3 cell inside - 0.5) on a 16^3 low-res grid. Only ``encode``/``decode`` (the plain Backend protocol): no
    predicted IoU."""

    name, image_size, low_res_size = "image stub", 32, 16

    def __init__(self, tol: float = 1.0):
        self.tol = tol
        self.encodes = 0
        self.decodes = 0

    def encode(self, image):
        self.encodes += 1
        return np.asarray(image, dtype=np.float32)

    def decode(self, embedding, points, labels, mask_logits):
        from scipy import ndimage

        self.decodes += 1
        p = tuple(np.clip(np.floor(np.asarray(points, dtype=float)[-1] + 0.5), 0, 31).astype(int))
        lab, _ = ndimage.label(np.abs(embedding - embedding[p]) <= self.tol)
        frac = (lab == lab[p]).reshape(16, 2, 16, 2, 16, 2).mean(axis=(1, 3, 5))
        return (40.0 * (frac - 0.5)).astype(np.float32)


def spheres_volume(centres, radii, shape=(60, 56, 40), spacing=(1.2, 1.3, 2.0), hu=300.0, noise=0.0):
    """A body of 0 HU in air with bright spheres; returns (image, labels) (labels 1..N, the spheres in order)."""
    m = make_volume_grid(shape, spacing)
    kji = tuple(int(v) for v in np.asarray(shape)[::-1])
    body = ellipsoid_mask(m, kji, Ellipsoid((0, 0, 0), (34.0, 34.0, 1e4)))
    img = np.where(body > 0, 0.0, -1000.0).astype(np.float32)
    labels = np.zeros(kji, dtype=np.uint16)
    for n, (c, r) in enumerate(zip(centres, radii), start=1):
        s = ellipsoid_mask(m, kji, Ellipsoid(c, (r, r, r))) > 0
        img[s] = hu
        labels[s] = n
    if noise:
        img += np.random.default_rng(0).normal(0, noise, size=img.shape).astype(np.float32)
    return Volume(img.astype(np.int16), m), Volume(labels, m.copy())


# ------------------------------------------------------------------------------------------ options
def test_options_name_every_problem_at_once():
    with pytest.raises(ValueError) as err:
        AutoOptions(grid_spacing_mm=None, blob_diameters_mm=(), min_stability=2.0, rank_by="area")
    msg = str(err.value)
    assert "no prompts" in msg and "min_stability" in msg and "rank_by" in msg
    with pytest.raises(ValueError, match="region_overlap_mm"):
        AutoOptions(region_overlap_mm=192.0)


def test_predicted_iou_needs_a_backend_that_gives_it():
    with pytest.raises(ValueError, match="reports no predicted IoU"):
        AutomaticMaskGenerator3D(ImageBackend(), AutoOptions(min_predicted_iou=0.5, **SMALL))
    with pytest.raises(ValueError, match="32\\^3 inputs"):
        AutomaticMaskGenerator3D(ImageBackend(), AutoOptions())


# ------------------------------------------------------------------------------------------ candidates
def test_search_area_is_the_body_and_the_roi():
    vol, _ = spheres_volume([(0, 0, 0)], [6.0])
    area = SearchArea(vol)
    assert area.contains(np.array([[0.0, 0, 0], [20, 0, 0]])).all()
    assert not area.contains(np.array([[33.0, 33.0, 0]])).any()     # air outside the body (a corner)
    assert not area.contains(np.array([[0.0, 0, 200]])).any()      # outside the volume
    roi = RoiBox((10.0, 0.0, 0.0), (10.0, 10.0, 10.0))
    inside_roi = SearchArea(vol, roi)
    assert inside_roi.contains(np.array([[12.0, 2, -3]])).all() and not inside_roi.contains(np.array([[0.0, 0, 0]])).any()
    lo, hi = inside_roi.bounds_ras()
    assert np.all(lo >= [5 - 1e-6, -5 - 1e-6, -5 - 1e-6]) and np.all(hi <= [15 + 1e-6, 5 + 1e-6, 5 + 1e-6])
    with pytest.raises(ValueError, match="does not overlap the volume"):
        SearchArea(vol, RoiBox((500.0, 0, 0), (10.0, 10, 10)))


def test_body_holes_are_filled_slice_by_slice_so_lungs_count_as_body():
    vol, _ = spheres_volume([], [])
    arr = vol.array.copy()
    j = np.arange(arr.shape[1])[:, None]
    i = np.arange(arr.shape[2])[None, :]
    arr[:, (np.abs(i - 30) < 6) & (np.abs(j - 28) < 6)] = -850   # a tube of air through every slice (open in 3D)
    area = SearchArea(vol.with_array(arr))
    centre = vol.ijk_to_ras_points(np.array([30.0, 28.0, 20.0]))
    assert area.contains(centre[None]).all()


def test_grid_points_are_spaced_in_millimetres_whatever_the_voxels():
    vol, _ = spheres_volume([], [])
    area = SearchArea(vol)
    axes = np.eye(3)
    pts = np.array([c.ras for c in grid_candidates(area, 7.0, axes)])
    assert len(pts) > 20 and area.contains(pts).all()
    steps = np.diff(np.unique(np.round(pts[:, 0], 6)))
    assert np.allclose(steps, 7.0)


def test_blob_candidates_find_balls_of_their_size_and_rate_them_in_hu_of_contrast():
    centres = [(-12.0, -8.0, 0.0), (14.0, 10.0, 6.0)]
    vol, _ = spheres_volume(centres, [4.0, 4.0], hu=200.0)
    area = SearchArea(vol)
    found = blob_candidates(vol, area, [8.0], min_response=50.0)
    pts = np.array([c.ras for c in found])
    for c in centres:
        d = np.linalg.norm(pts - np.asarray(c), axis=1)
        assert d.min() < 2.5, d.min()
        best = found[int(np.argmin(d))]
        assert best.kind == "blob" and best.diameter_mm == 8.0
        assert 100.0 < best.response < 300.0          # ~ the 200 HU contrast (discretised ball, blurred edge)
    assert not blob_candidates(vol, area, [8.0], min_response=400.0)   # weaker than asked: none


# ------------------------------------------------------------------------------------------ scores and NMS
def test_mask_iou_and_greedy_nms():
    a = BoxMask.of(np.ones((4, 4, 4), bool), (0, 0, 0))
    b = BoxMask.of(np.ones((4, 4, 4), bool), (0, 0, 2))        # half overlap: 32 / 96
    c = BoxMask.of(np.ones((2, 2, 2), bool), (10, 10, 10))
    assert mask_iou(a, b) == pytest.approx(32 / 96) and mask_iou(a, c) == 0.0 and mask_iou(a, a) == 1.0
    assert nms([a, b, c], [1, 0, 2], 0.3) == [1, 2]             # the better (first in order) wins
    assert nms([a, b, c], [0, 1, 2], 0.5) == [0, 1, 2]          # below the threshold both stay


def test_stability_score_is_the_mask_agreement_at_threshold_plus_minus_offset():
    region = R.Region(np.diag([1.5, 1.5, 1.5, 1.0]), 32, 1.5)
    vol = Volume(np.zeros((32, 32, 32), np.int16), region.region_to_ras.copy())
    # logits = 3 - distance to the centre (in low-res cells): at 3 -/+ 1 balls of radius 4 and 2 cells
    g = np.stack(np.meshgrid(*[np.arange(8)] * 3, indexing="ij"), -1)
    logits = (3.0 - np.linalg.norm(g - 3.5, axis=-1)).astype(np.float32)
    got = region_mask(logits, region, vol, np.array([15.5, 15.5, 15.5]), offset=1.0)
    up = R.logits_to_volume(logits, region, vol)
    expected = np.count_nonzero(up > 1.0) / np.count_nonzero(up > -1.0)
    assert got.stability == pytest.approx(expected)
    assert got.stability == pytest.approx((2 / 4) ** 3, abs=0.04)   # nested balls of radius 2 and 4 cells
    assert isinstance(region_mask(logits - 10, region, vol, np.array([15.5, 15.5, 15.5])), Rejection)


# ------------------------------------------------------------------------------------------ the generator
def test_every_sphere_once_with_volume_centroid_and_voxels_on_the_input_grid():
    centres = [(-12.0, -6.0, -8.0), (10.0, 12.0, 6.0), (0.0, 0.0, 20.0)]
    vol, labels = spheres_volume(centres, [7.0, 8.0, 7.0])
    backend = ImageBackend()
    gen = AutomaticMaskGenerator3D(backend, AutoOptions(grid_spacing_mm=6.0, max_volume_ml=10.0, **SIZED))
    res = gen.generate(vol)
    truth = objects_of(labels)
    m = match_instances([i.mask for i in res.instances], truth, 0.5)
    assert m["recall"] == 1.0 and m["fp"] == 0, (m, [i.to_dict() for i in res.instances])
    voxel_ml = abs(np.linalg.det(vol.ijk_to_ras[:3, :3])) / 1000.0
    for k, p in m["matched"].items():
        inst = res.instances[p]
        assert inst.volume_ml == pytest.approx(inst.mask.count * voxel_ml)
        assert np.linalg.norm(np.asarray(inst.centroid_ras) - centres[k - 1]) < 2.0
        assert inst.predicted_iou is None and 0.0 <= inst.stability <= 1.0
    assert res.rejected.get("duplicate", 0) > 0                # many prompts hit each sphere: NMS removed them
    assert res.rejected.get("too_large", 0) > 0                # the body is rejected by the volume filter
    assert res.rejected.get("cut_by_region", 0) > 0            # and so are the pieces of it corner regions saw
    assert backend.encodes == len(res.regions)                 # each region encoded once


def test_a_sphere_across_region_borders_is_found_once():
    opts = AutoOptions(grid_spacing_mm=4.0, max_volume_ml=10.0, **SIZED)
    vol, labels = spheres_volume([(0.0, 0.0, 0.0)], [6.0])
    area = SearchArea(vol)
    lat = RegionLattice(vol, *area.bounds_ras(), opts)
    assert tuple(lat.n) == (3, 3, 3)
    border = lat.centre((1, 1, 1)) + lat.axes @ np.array([lat.stride / 2, 0, 0])   # midway between two regions
    vol, labels = spheres_volume([tuple(border)], [6.0])
    res = AutomaticMaskGenerator3D(ImageBackend(), opts).generate(vol)
    regions = {i.region for i in res.instances}
    m = match_instances([i.mask for i in res.instances], objects_of(labels))
    assert m["tp"] == 1 and m["fp"] == 0
    assert len(res.regions) >= 2 and res.rejected.get("duplicate", 0) >= 1 and len(regions) == 1


def test_filters_roi_and_max_instances():
    centres = [(-12.0, -6.0, -8.0), (10.0, 12.0, 6.0)]
    vol, labels = spheres_volume(centres, [6.0, 9.0])
    small_ml = 4 / 3 * np.pi * 6 ** 3 / 1000
    base = dict(grid_spacing_mm=5.0, **SIZED)
    only_small = AutomaticMaskGenerator3D(ImageBackend(), AutoOptions(max_volume_ml=2 * small_ml, **base)).generate(vol)
    assert len(only_small.instances) == 1 and match_instances([i.mask for i in only_small.instances],
                                                              objects_of(labels, [1]))["tp"] == 1
    only_big = AutomaticMaskGenerator3D(ImageBackend(), AutoOptions(min_volume_ml=2 * small_ml, max_volume_ml=20.0,
                                                                    **base)).generate(vol)
    assert len(only_big.instances) == 1 and only_big.rejected.get("too_small", 0) >= 1
    roi = RoiBox((10.0, 12.0, 6.0), (30.0, 30.0, 30.0))
    in_roi = AutomaticMaskGenerator3D(ImageBackend(), AutoOptions(max_volume_ml=20.0, **base)).generate(vol, roi)
    assert len(in_roi.instances) == 1 and np.allclose(in_roi.instances[0].centroid_ras, centres[1], atol=2.0)
    one = AutomaticMaskGenerator3D(ImageBackend(), AutoOptions(max_volume_ml=20.0, max_instances=1, **base)).generate(vol)
    assert len(one.instances) == 1


class IoUBackend(ImageBackend):
    """:class:`ImageBackend` with a batched decoder that also predicts an IoU: 0.9 for objects of more than
    ``cells`` low-res cells, 0.2 for smaller ones (so a predicted-IoU filter must tell the two spheres apart)."""

    def __init__(self, cells: int = 70):
        super().__init__()
        self.cells, self.batches = cells, []

    def decode_batch(self, embedding, points, labels, mask_logits=None):
        self.batches.append(len(points))
        logits = np.stack([self.decode(embedding, p, lab, None) for p, lab in zip(points, labels)])
        return logits, np.where((logits > 0).sum(axis=(1, 2, 3)) > self.cells, 0.9, 0.2).astype(np.float32)


def test_predicted_iou_filters_and_ranks_and_is_reported():
    centres = [(-12.0, -6.0, -8.0), (10.0, 12.0, 6.0)]                  # 6 mm (~33 cells) and 9 mm (~113 cells)
    vol, labels = spheres_volume(centres, [6.0, 9.0])
    base = dict(grid_spacing_mm=5.0, max_volume_ml=20.0, points_per_batch=8, **SIZED)
    backend = IoUBackend()
    res = AutomaticMaskGenerator3D(backend, AutoOptions(min_predicted_iou=0.5, **base)).generate(vol)
    assert max(backend.batches) == 8                                    # many prompts per decoder call
    m = match_instances([i.mask for i in res.instances], objects_of(labels), 0.5)
    assert m["tp"] == 1 and 2 in m["matched"] and m["fp"] == 0          # only the big sphere passes the IoU filter
    assert res.rejected.get("low_predicted_iou", 0) > 0
    assert res.instances[0].predicted_iou == pytest.approx(0.9) and res.instances[0].to_dict()["predicted_iou"] == 0.9
    both = AutomaticMaskGenerator3D(IoUBackend(), AutoOptions(rank_by="predicted_iou", **base)).generate(vol)
    assert sorted(round(i.score, 3) for i in both.instances) == [0.2, 0.9]  # the score is the predicted IoU
    assert both.rejected.get("low_predicted_iou", 0) == 0 and len(both.instances) == 2


def test_the_stability_filter_drops_soft_masks():
    """Logits squeezed into (-1.5, 0.9), signs kept: nothing is above threshold + offset (0 + 1), so every mask's
    stability is 0 while the masks at threshold 0 stay close to the spheres."""

    class SoftBackend(ImageBackend):
        def decode(self, embedding, points, labels, mask_logits):
            lg = super().decode(embedding, points, labels, mask_logits)
            return np.where(lg > 0, lg * 0.9 / 20.0, lg * 1.5 / 20.0).astype(np.float32)   # into (-1.5, 0.9)

    vol, labels = spheres_volume([(-12.0, -6.0, -8.0), (10.0, 12.0, 6.0)], [6.0, 9.0])
    base = dict(grid_spacing_mm=5.0, max_volume_ml=20.0, **SIZED)
    strict = AutomaticMaskGenerator3D(SoftBackend(), AutoOptions(min_stability=0.8, **base)).generate(vol)
    assert strict.instances == [] and strict.rejected.get("low_stability", 0) > 0
    loose = AutomaticMaskGenerator3D(SoftBackend(), AutoOptions(min_stability=0.0, **base)).generate(vol)
    m = match_instances([i.mask for i in loose.instances], objects_of(labels), 0.5)
    assert m["tp"] == 2 and all(i.stability == 0.0 for i in loose.instances)


def test_cancel_between_decoder_calls():
    vol, _ = spheres_volume([(0.0, 0.0, 0.0)], [7.0])
    backend = ImageBackend()
    calls = []

    def check():
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt):
        AutomaticMaskGenerator3D(backend, AutoOptions(grid_spacing_mm=4.0, points_per_batch=4, **SMALL)).generate(
            vol, check=check)
    assert backend.decodes == 4                                # one batch ran, the second never started


def test_session_cache_is_shared_so_a_second_run_encodes_nothing():
    from SAM3DSegmentLib.inference.session import Session, SessionOptions

    vol, _ = spheres_volume([(0.0, 0.0, 0.0)], [7.0])
    backend = ImageBackend()
    session = Session(backend, SessionOptions(region_size=32, spacing_mm=1.5, cache_size=64))
    session.set_volume(vol)
    first = AutomaticMaskGenerator3D.from_session(session, grid_spacing_mm=6.0, region_overlap_mm=16.0).generate(
        vol, volume_key=session.volume_key)
    n = backend.encodes
    second = AutomaticMaskGenerator3D.from_session(session, grid_spacing_mm=6.0, region_overlap_mm=16.0,
                                                   min_stability=0.0).generate(vol, volume_key=session.volume_key)
    assert n == len(first.regions) and backend.encodes == n and len(second.regions) == len(first.regions)


def test_decode_batch_loops_over_plain_backends_and_matches_the_model_batch():
    backend = ImageBackend()
    emb = backend.encode(np.random.default_rng(0).normal(size=(32, 32, 32)).astype(np.float32) + 0.6)
    pts = np.array([[[3.0, 4.0, 5.0]], [[20.0, 21.0, 9.0]]])
    logits, iou = decode_batch(backend, emb, pts, np.ones((2, 1)))
    assert iou is None and logits.shape == (2, 16, 16, 16)
    for b in range(2):
        assert np.array_equal(logits[b], backend.decode(emb, pts[b], np.ones(1), None))
    with pytest.raises(ValueError, match="points \\(B, N, 3\\)"):
        decode_batch(backend, emb, pts[0], np.ones(1))


def test_local_backend_batch_equals_one_decode_per_prompt():
    torch = pytest.importorskip("torch")
    from SAM3DSegmentLib.inference.backends import LocalBackend
    from SAM3DSegmentLib.models.sam_med3d.config import SamMed3DConfig
    from SAM3DSegmentLib.models.sam_med3d.model import build_sam_med3d

    torch.manual_seed(0)
    cfg = SamMed3DConfig.tiny()
    backend = LocalBackend(build_sam_med3d(cfg))
    s = backend.image_size
    emb = backend.encode(np.random.default_rng(0).normal(size=(s, s, s)).astype(np.float32))
    pts = np.random.default_rng(1).uniform(0, s - 1, size=(5, 1, 3)).astype(np.float32)
    logits, iou = backend.decode_batch(emb, pts, np.ones((5, 1)))
    assert iou.shape == (5,) and np.isfinite(iou).all()
    for b in range(5):
        assert np.allclose(logits[b], backend.decode(emb, pts[b], np.ones(1), None), atol=1e-4)


# ------------------------------------------------------------------------------------------ oracle and phantom
def test_oracle_recalls_every_object_it_can_represent_and_nms_keeps_one_each():
    """The 18 mm sphere fits the regions' 12 mm margin (overlap 24 mm): every prompt's region sees it whole."""
    centres = [(-12.0, -6.0, -8.0), (10.0, 12.0, 6.0)]
    vol, labels = spheres_volume(centres, [6.0, 9.0])
    opts = AutoOptions(grid_spacing_mm=5.0, max_volume_ml=20.0, **dict(SIZED, region_overlap_mm=24.0))
    res = AutomaticMaskGenerator3D(region_decoder=OracleRegionDecoder(labels, low_res_size=8), options=opts).generate(vol)
    m = match_instances([i.mask for i in res.instances], objects_of(labels), 0.5)
    assert m["recall"] == 1.0 and m["fp"] == 0 and min(m["best_iou"].values()) > 0.7


def test_chest_phantom_places_nodules_of_every_kind_and_site():
    from SAM3DSegmentLib.data.nodule_phantoms import BODY, LEFT_LUNG, NODULE0, RIGHT_LUNG, VESSEL0, ChestPhantom

    ph = ChestPhantom(seed=3, shape_ijk=(128, 112, 80), spacing=(2.0, 2.0, 2.5), noise=0.0, blur_voxels=0.0)
    placed = []
    for d, kind, site in ((10.0, "solid", "free"), (12.0, "part_solid", "juxta_pleural"),
                          (10.0, "solid", "juxta_vascular")):
        nd = ph.place(d, kind, site, placed)
        assert nd is not None, site
        placed.append(nd)
    case = ph.case(placed)
    twins = [ChestPhantom(seed=5, shape_ijk=(128, 112, 80), spacing=(2.0, 2.0, 2.5)) for _ in range(2)]
    cases = [t.case(t.random_nodules([8.0, 12.0])) for t in twins]       # reproducible from the seed
    assert cases[0].table == cases[1].table and np.array_equal(cases[0].image.array, cases[1].image.array)
    from scipy import ndimage

    st = case.structures.array
    lungs = (st == RIGHT_LUNG) | (st == LEFT_LUNG)
    for row in case.table:
        n = row["label"]
        nod = case.nodules.array == n
        assert row["voxels"] == nod.sum() > 0
        assert np.all(st[nod] == NODULE0 + n)
        ring = ndimage.binary_dilation(nod, iterations=2) & ~nod
        if row["site"] == "juxta_pleural":
            assert (st[ring] == BODY).any()                     # touches the chest wall
        if row["site"] == "juxta_vascular":
            assert ((st[ring] >= VESSEL0) & (st[ring] < NODULE0)).any()   # touches a vessel
        if row["site"] == "free":
            assert lungs[ring].all()                            # surrounded by parenchyma only
    part = case.table[1]
    vals = case.image.array[case.nodules.array == part["label"]]
    assert (vals < -300).any() and (vals > -100).any()          # ground glass and a solid core


# ------------------------------------------------------------------------------------------ engine job
def test_engine_find_all_payload_crosses_the_process_protocol_and_a_cancel_changes_nothing():
    import pickle

    from SAM3DSegmentLib.inference.protocol import decode, encode
    from SAM3DSegmentLib.inference.session import SessionOptions
    from SAM3DSegmentLib.inference.worker import CANCELLED, DONE, ThreadEngine

    vol, labels = spheres_volume([(-12.0, -6.0, -8.0), (10.0, 12.0, 6.0)], [6.0, 7.0])
    engine = ThreadEngine(SessionOptions(region_size=32, spacing_mm=1.5), backend=ImageBackend())
    try:
        engine.call("set_volume", vol, "token")
        options = {"grid_spacing_mm": 5.0, "max_volume_ml": 10.0, "drop_cut": True, "region_overlap_mm": 16.0}
        job = engine.submit("find_all", options, None, "token")
        job.cancel()                                          # cancelled before it ran: nothing happens
        job.wait(30)
        assert job.state == CANCELLED
        result = engine.call("find_all", options, None, "token")
        with pytest.raises(RuntimeError, match="another volume"):
            engine.call("find_all", options, None, "other token")
        assert engine.engine.session.object_ids() == []       # the search made no object
    finally:
        engine.shutdown()
    back = decode(pickle.loads(pickle.dumps(encode(result))))
    assert [i["name"] for i in back["instances"]] == ["auto 001", "auto 002"] and back["report"]["count"] == 2
    truth = objects_of(labels)
    masks = [BoxMask.of(i["mask"], [a for a, _ in i["box"]]) for i in back["instances"]]
    assert match_instances(masks, truth)["tp"] == 2 and job.state != DONE
