"""The 3DSAM-adapter behind the engine: backend geometry (1 mm regions, full-grid logits, axes), the session's
use of it (spacing and prompt mode from the backend, exclude clicks refused, byte-sized cache), the input
normalisation (HU window + dataset statistics), family detection and loading through load_backend."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from _sam3d_adapter_fixtures import randomize_  # noqa: E402
from SAM3DSegmentLib.core.geometry import Volume  # noqa: E402
from SAM3DSegmentLib.core.intensity import DEFAULT_WINDOW_HU, WindowZNorm  # noqa: E402
from SAM3DSegmentLib.inference import regions as R  # noqa: E402
from SAM3DSegmentLib.inference.backends import load_backend, make_backend  # noqa: E402
from SAM3DSegmentLib.inference.backends_sam3d_adapter import Sam3DAdapterBackend  # noqa: E402
from SAM3DSegmentLib.inference.session import Session, SessionOptions  # noqa: E402
from SAM3DSegmentLib.models.checkpoint_file import CheckpointError  # noqa: E402
from SAM3DSegmentLib.models.families import SAM3D_ADAPTER, SAM_2D, SAM_MED3D, checkpoint_family, load_model  # noqa: E402
from SAM3DSegmentLib.models.sam3d_adapter import Sam3DAdapter, Sam3DAdapterConfig, Sam3DAdapterPredictor  # noqa: E402
from SAM3DSegmentLib.models.sam3d_adapter.checkpoint import save_published  # noqa: E402
from SAM3DSegmentLib.models.sam3d_adapter.files import save_model_file  # noqa: E402

DEMO = "SAM3DSegmentLib/resources/demo_model.pt"
STATS = WindowZNorm((-100.0, 200.0), 50.0, 40.0)


def tiny_model(seed=3):
    torch.manual_seed(seed)
    return randomize_(Sam3DAdapter(Sam3DAdapterConfig.tiny()), seed=seed, std=0.1).eval()


def ct_volume(shape=(40, 44, 48), spacing=(1.0, 1.0, 1.0)):
    """A CT-like phantom (k, j, i): air around a 'body', a bright ball inside; LPS-like axes (i -> L)."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    arr = np.full(shape, -1000.0, dtype=np.float32)
    arr[4:-4, 4:-4, 4:-4] = 40.0
    arr[(k - 20) ** 2 + (j - 22) ** 2 + (i - 24) ** 2 <= 36] = 150.0
    m = np.diag([-spacing[2], -spacing[1], spacing[0], 1.0])
    m[:3, 3] = [10.0, -5.0, 3.0]
    return Volume(arr, m)


@pytest.fixture(scope="module")
def backend():
    return Sam3DAdapterBackend(tiny_model(), intensity=STATS)


# ---------------------------------------------------------------------------------------------- backend
def test_backend_declares_its_geometry_and_limits(backend):
    assert (backend.image_size, backend.low_res_size, backend.spacing_mm) == (32, 32, 1.0)
    assert backend.supports_exclude is False and backend.supports_mask_prompt is False
    assert backend.family == "3dsam_adapter" and "exclude" in backend.limits_notice


def test_backend_feeds_axial_slices_and_transposes_back(backend):
    """Region arrays are [a, b, c]; the model's crop is [d, h, w] = [c, b, a] (slices along S)."""
    rng = np.random.default_rng(0)
    image = rng.normal(size=(32, 32, 32)).astype(np.float32)
    pts_abc = np.array([[3.0, 10.0, 20.0], [25.0, 4.5, 7.0]])
    emb = backend.encode(image)
    got = backend.decode(emb, pts_abc, np.ones(2), None)
    pred = Sam3DAdapterPredictor(backend.model)
    feats = pred.encode(torch.from_numpy(image.transpose(2, 1, 0).copy())[None, None])
    want = pred.decode(feats, pts_abc[:, ::-1].copy()).numpy().transpose(2, 1, 0)
    assert got.shape == (32, 32, 32) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)
    # and NOT the untransposed reading (the test can tell the two apart)
    assert np.abs(got - pred.decode(feats, pts_abc).numpy()).max() > 1e-3
    assert emb.nbytes == feats.nbytes > 0


def test_backend_refuses_exclude_points_and_empty_prompts(backend):
    emb = backend.encode(np.zeros((32, 32, 32), np.float32))
    with pytest.raises(ValueError, match="no exclude clicks"):
        backend.decode(emb, [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], [1, 0], None)
    with pytest.raises(ValueError, match="at least one include point"):
        backend.decode(emb, np.zeros((0, 3)), np.zeros(0), None)
    with pytest.raises(ValueError, match="32³ region"):
        backend.encode(np.zeros((32, 32, 16), np.float32))


# ---------------------------------------------------------------------------------------------- session
def test_session_takes_spacing_prompt_mode_and_region_from_the_backend(backend):
    s = Session(backend, SessionOptions(region_size=32, extend=False))
    assert s.options.spacing_mm == 1.0 and s.options.prompt_mode == "all-clicks" and s.low_res_size == 32
    vol = ct_volume()
    s.set_volume(vol)
    s.new_object()
    u = s.add_click(ijk=(24, 22, 20))
    (region,) = s.regions()
    assert region.size == 32 and region.spacing == 1.0
    np.testing.assert_allclose(np.linalg.norm(region.region_to_ras[:3, :3], axis=0), 1.0)
    np.testing.assert_allclose(region.centre_ras, vol.ijk_to_ras_points(np.array([24.0, 22.0, 20.0])), atol=1e-9)
    assert u.encoded_regions == 1
    # the logits pasted back are exactly the model's on the region (no low-res upsampling: 32 -> 32)
    image = R.model_input(vol, region, intensity=STATS)
    want = backend.decode(backend.encode(image), region.ras_to_index(np.asarray([s.clicks()[0].ras])), [1], None)
    assert np.array_equal(s._objects[s.current_object].regions[0].logits, want)
    # an explicit spacing still wins; SAM-Med3D-like backends keep 1.5 mm
    assert Session(backend, SessionOptions(region_size=32, spacing_mm=2.0)).options.spacing_mm == 2.0


def test_every_decode_sees_all_include_clicks_of_the_region():
    calls = []

    class Spy(Sam3DAdapterBackend):
        def decode(self, embedding, points, labels, mask_logits=None):
            calls.append(np.asarray(points).copy())
            return super().decode(embedding, points, labels, mask_logits)

    s = Session(Spy(tiny_model(), intensity=STATS), SessionOptions(region_size=32, extend=False,
                                                                    prompt_mode="newest"))
    s.set_volume(ct_volume())
    s.new_object()
    s.add_click(ijk=(24, 22, 20))
    s.add_click(ijk=(26, 22, 20))
    assert [len(c) for c in calls] == [1, 2]     # "newest" is not possible without a previous-mask input
    assert s.cache.stats()["misses"] == 1        # encoded once, decoded twice


def test_exclude_clicks_are_refused_and_nothing_changes(backend):
    s = Session(backend, SessionOptions(region_size=32, extend=False))
    s.set_volume(ct_volume())
    s.new_object()
    s.add_click(ijk=(24, 22, 20))
    before = s.mask().copy()
    with pytest.raises(ValueError, match="has no exclude clicks"):
        s.add_click(ijk=(10, 10, 10), positive=False)
    with pytest.raises(ValueError, match="has no exclude clicks"):
        s.set_clicks(s.clicks() + [type(s.clicks()[0])(ras=None, positive=False, ijk=(10, 10, 10))])
    assert len(s.clicks()) == 1 and np.array_equal(s.mask(), before) and len(s._object().history.undo) == 1


def test_refining_an_existing_mask_is_refused_and_nothing_changes(backend):
    """No previous-mask input: set_initial_mask says so plainly and leaves the object as it was."""
    s = Session(backend, SessionOptions(region_size=32, extend=False))
    s.set_volume(ct_volume())
    s.new_object()
    s.add_click(ijk=(24, 22, 20))
    before = s.mask().copy()
    init = np.zeros(s.volume.array.shape, dtype=np.uint8)
    init[15:25, 17:27, 19:29] = 1
    with pytest.raises(ValueError, match="has no previous-mask input.*cannot refine.*SAM-Med3D"):
        s.set_initial_mask(init)
    assert len(s.clicks()) == 1 and np.array_equal(s.mask(), before) and len(s._object().history.undo) == 1
    assert s._object().init is None


def test_cache_is_sized_by_the_features_and_bounded_in_bytes():
    be = Sam3DAdapterBackend(tiny_model(), intensity=STATS)
    emb = be.encode(np.zeros((32, 32, 32), np.float32))
    budget_mb = 2.5 * emb.nbytes / 2 ** 20            # room for two regions' features
    s = Session(be, SessionOptions(region_size=32, extend=False, cache_size=8, cache_mb=budget_mb))
    s.set_volume(ct_volume((40, 44, 120)))
    for n, i in enumerate((16, 56, 96)):               # three objects in three disjoint regions
        s.new_object()
        s.add_click(ijk=(i, 22, 20))
        assert s.cache.nbytes == min(n + 1, 2) * emb.nbytes
    assert s.cache.stats()["entries"] == 2 and s.cache.evictions == 1


# ---------------------------------------------------------------------------------------------- normalisation
def test_window_and_dataset_statistics_normalise_the_region():
    vol = ct_volume()
    region = R.Region.around(vol, vol.ijk_to_ras_points(np.array([5.0, 5.0, 5.0])), size=32, spacing=1.0)
    raw = R.sample_volume(vol, region)                 # zero outside the volume
    inside = R.sample_volume(vol, region, outside=-7.0) != -7.0
    assert not inside.all() and inside.any()           # the region pokes out of the volume
    got = R.model_input(vol, region, intensity=STATS)
    want = (np.clip(raw, -100, 200) - 50.0) / 40.0
    np.testing.assert_allclose(got[inside], want[inside], atol=1e-5)
    np.testing.assert_allclose(got[~inside], (-100 - 50.0) / 40.0)   # outside = the window's low end (air)
    # --clamp-hu replaces the window; the statistics stay
    got2 = R.model_input(vol, region, clamp_hu=(-1000, 1000), intensity=STATS)
    np.testing.assert_allclose(got2[inside], ((np.clip(raw, -1000, 1000) - 50.0) / 40.0)[inside], atol=1e-5)
    # without statistics each crop uses its own mean/std after the clip
    own = R.model_input(vol, region, intensity=WindowZNorm())
    assert abs(float(own.mean())) < 1e-4 and abs(float(own.std()) - 1.0) < 1e-3
    assert WindowZNorm().window == DEFAULT_WINDOW_HU


def test_intensity_settings_are_checked():
    with pytest.raises(ValueError, match="low < high"):
        WindowZNorm((200, -100))
    with pytest.raises(ValueError, match="both"):
        WindowZNorm((-100, 200), 50.0, None)
    with pytest.raises(ValueError, match="std positive"):
        WindowZNorm((-100, 200), 50.0, 0.0)
    with pytest.raises(ValueError, match="unknown intensity keys"):
        WindowZNorm.from_dict({"window": [0, 1], "scale": 2})
    assert WindowZNorm.from_dict(STATS.to_dict()) == STATS


# ---------------------------------------------------------------------------------------------- files
def _sam_2d_file(path):
    from _sam3d_adapter_fixtures import tiny_sam_encoder

    enc = tiny_sam_encoder()
    torch.save({f"image_encoder.{k}": v for k, v in enc.state_dict().items()}, path)
    return path


def test_families_are_told_apart_from_the_table_of_contents(tmp_path):
    model = tiny_model()
    ours = save_model_file(model, tmp_path / "ours.pth", intensity=STATS, recipe="original")
    published = save_published(model, tmp_path / "published.pth")
    assert checkpoint_family(ours) == checkpoint_family(published) == SAM3D_ADAPTER
    assert checkpoint_family(DEMO) == SAM_MED3D


def test_a_2d_sam_file_is_recognised_and_refused_for_clicking(tmp_path):
    path = _sam_2d_file(tmp_path / "sam2d.pth")
    assert checkpoint_family(path) == SAM_2D
    with pytest.raises(CheckpointError, match="start point for TRAINING a 3DSAM-adapter"):
        load_model(path)
    from SAM3DSegmentLib.inference.backends import BackendError

    with pytest.raises(BackendError, match="not a 3D model to click with"):
        load_backend(checkpoint=str(path), device="cpu")


def test_load_backend_builds_the_family_backend_with_the_files_statistics(tmp_path):
    model = tiny_model()
    path = save_model_file(model, tmp_path / "tiny.pth", intensity=STATS, recipe="original", name="tiny run")
    backend, info = load_backend(checkpoint=str(path), device="cpu")
    assert isinstance(backend, Sam3DAdapterBackend) and backend.intensity == STATS
    assert info["family"] == "3dsam_adapter" and info["intensity"] == STATS.to_dict() and info["image_size"] == 32
    img = np.random.default_rng(1).normal(size=(32, 32, 32)).astype(np.float32)
    ref = Sam3DAdapterBackend(model)
    np.testing.assert_array_equal(backend.decode(backend.encode(img), [[4.0, 5.0, 6.0]], [1]),
                                  ref.decode(ref.encode(img), [[4.0, 5.0, 6.0]], [1]))
    # a published file without statistics: the family default, said in words
    pub = save_published(model, tmp_path / "pub.pth")
    with pytest.raises(CheckpointError, match="does not match"):   # the published ViT-B is assumed without config
        load_model(pub)
    net = load_model(path)
    net.intensity = None
    assert make_backend(net).intensity == WindowZNorm()
    assert make_backend(net, intensity={"window": [-50, 150], "mean": 1, "std": 2}).intensity.window == (-50, 150)
    _, demo_info = load_backend(checkpoint=DEMO, device="cpu")
    assert demo_info["family"] == "sam_med3d" and "intensity" not in demo_info


def test_a_downloaded_3dsam_adapter_file_passes_the_payload_check(tmp_path):
    from SAM3DSegmentLib.weights.verify import payload_problem

    assert payload_problem(save_published(tiny_model(), tmp_path / "pub.pth")) is None
    assert payload_problem(DEMO) is None
    torch.save({"encoder_dict": {"a": 1}, "decoder_dict": {}, "feature_dict": []}, tmp_path / "bad.pth")
    assert "do not all hold tensors" in payload_problem(tmp_path / "bad.pth")
    (tmp_path / "page.pth").write_text("<html>login</html>")
    assert "HTML page" in payload_problem(tmp_path / "page.pth")
