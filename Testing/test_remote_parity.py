"""Parity: a session driven through RemoteBackend (full mode; split mode with the ONNX decoder and with a
local torch decoder) gives the same logits and masks as LocalBackend on the same clicks, with the bundled
demo model on a phantom, over HTTP on loopback. Also: ONNX decoder vs torch decoder directly."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("fastapi")

from SAM3DSegmentLib.data.phantoms import sphere_phantom  # noqa: E402
from SAM3DSegmentLib.remote.client import RemoteBackend  # noqa: E402
from SAM3DSegmentLib.remote.serve import load_models  # noqa: E402
from SAM3DSegmentLib.inference.session import Session, SessionOptions  # noqa: E402

from _remote_fixtures import serving  # noqa: E402

ATOL = 1e-4


@pytest.fixture(scope="module")
def demo_server():
    torch.manual_seed(0)
    models = load_models(["demo"], device="cpu", threads=2)
    with serving(models) as srv:
        yield srv, models[0]


class Recorder:
    """Forwards to a backend and keeps every decode's logits."""

    def __init__(self, backend):
        self.backend = backend
        self.name, self.image_size, self.low_res_size = backend.name, backend.image_size, backend.low_res_size
        self.logits = []
        self.encodes = 0

    def encode(self, image):
        self.encodes += 1
        return self.backend.encode(image)

    def decode(self, embedding, points, labels, mask_logits):
        out = self.backend.decode(embedding, points, labels, mask_logits)
        self.logits.append(np.array(out))
        return out


def _phantom():
    return sphere_phantom(shape_ijk=(72, 70, 60), spacing=(1.2, 1.2, 1.5), radius_mm=14.0, noise=15.0, seed=3)


def _drive(backend):
    image, truth = _phantom()
    rec = Recorder(backend)
    s = Session(rec, SessionOptions(clamp_hu=(-1000, 1000)))
    s.set_volume(image)
    s.new_object()
    centre = np.asarray(truth.meta["centre_ras"])
    s.add_click(ras=centre, positive=True)
    s.add_click(ras=centre + [6.0, -4.0, 3.0], positive=True)
    s.add_click(ras=centre + [0.0, 20.0, 0.0], positive=False)
    s.undo()
    s.add_click(ras=centre + [-5.0, 2.0, -4.0], positive=True)
    return s.mask().copy(), rec


@pytest.fixture(scope="module")
def local_run(demo_server):
    _, served = demo_server
    return _drive(served.backend)


@pytest.mark.parametrize("mode", ["full", "split-onnx", "split-torch"])
def test_session_through_remote_backend_matches_local(demo_server, local_run, mode):
    srv, served = demo_server
    kwargs = {"mode": mode.split("-")[0], "wire_dtype": "float32"}
    if mode == "split-torch":
        kwargs.update(local_decoder=served.backend, expected_sha256=served.sha256)
    rb = RemoteBackend(srv.url, **kwargs)
    assert rb.mode == mode.split("-")[0]
    assert ("ONNX" in rb.name) == (mode == "split-onnx")
    mask, rec = _drive(rb)
    ref_mask, ref = local_run
    assert ref_mask.sum() > 1000                                  # the demo model segments the sphere
    assert len(rec.logits) == len(ref.logits) >= 3 and rec.encodes == ref.encodes
    worst = max(float(np.abs(a - b).max()) for a, b in zip(rec.logits, ref.logits))
    assert worst <= ATOL, worst
    np.testing.assert_array_equal(mask, ref_mask)
    stats = rb.wire_stats()
    assert stats["failovers"] == 0 and stats["requests"] >= 2
    rb.close()


def test_float16_wire_changes_the_mask_by_a_few_voxels_at_most(demo_server, local_run):
    srv, _ = demo_server
    rb = RemoteBackend(srv.url, mode="full", wire_dtype="float16")
    mask, rec = _drive(rb)
    ref_mask, ref = local_run
    dice = 2 * np.logical_and(mask, ref_mask).sum() / (mask.sum() + ref_mask.sum())
    assert dice >= 0.999, dice
    assert max(float(np.abs(a - b).max()) for a, b in zip(rec.logits, ref.logits)) < 0.1


def test_onnx_decoder_matches_torch_decoder(demo_server):
    from SAM3DSegmentLib.models.onnx_export import export_decoder_onnx
    from SAM3DSegmentLib.remote.onnx_decoder import OnnxDecoder

    _, served = demo_server
    backend = served.backend
    dec = OnnxDecoder(export_decoder_onnx(backend.model))
    rng = np.random.default_rng(1)
    emb = backend.encode_numpy(rng.normal(size=(128,) * 3).astype(np.float32))
    for n in (1, 3, 6):
        pts = rng.uniform(0, 127, size=(n, 3)).astype(np.float32)
        lab = rng.integers(0, 2, size=n)
        for mask in (None, rng.normal(scale=5, size=(32,) * 3).astype(np.float32)):
            ref = backend.decode(emb, pts, lab, mask)
            got = dec.decode(emb, pts, lab, mask)
            assert got.shape == ref.shape == (32, 32, 32)
            assert float(np.abs(got - ref).max()) <= ATOL


def test_onnx_decoder_file_errors_are_clear():
    from SAM3DSegmentLib.remote.onnx_decoder import OnnxDecoder, OnnxDecoderError

    with pytest.raises(OnnxDecoderError, match="could not be loaded"):
        OnnxDecoder(b"not an onnx file")
