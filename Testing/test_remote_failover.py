"""Two `sam3d serve` processes behind the client's own list of URLs: the one holding the session's
embedding is killed (SIGKILL) mid-session and the session finishes on the other with nothing lost — the
same logits and mask as an uninterrupted local run."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("fastapi")

from SAM3DSegmentLib.inference.backends import load_backend  # noqa: E402
from SAM3DSegmentLib.data.phantoms import sphere_phantom  # noqa: E402
from SAM3DSegmentLib.remote.client import RemoteBackend  # noqa: E402
from SAM3DSegmentLib.inference.session import Session, SessionOptions  # noqa: E402

from _remote_fixtures import KEY, serve_process  # noqa: E402


class Recorder:
    def __init__(self, backend):
        self.backend = backend
        self.name, self.image_size, self.low_res_size = backend.name, backend.image_size, backend.low_res_size
        self.logits, self.handles = [], []

    def encode(self, image):
        h = self.backend.encode(image)
        self.handles.append(h)
        return h

    def decode(self, embedding, points, labels, mask_logits):
        out = self.backend.decode(embedding, points, labels, mask_logits)
        self.logits.append(np.array(out))
        return out


def _session(backend, phantom):
    image, truth = phantom
    s = Session(backend, SessionOptions(clamp_hu=(-1000, 1000)))
    s.set_volume(image)
    s.new_object()
    return s, np.asarray(truth.meta["centre_ras"])


def _script(s, centre, between=lambda: None):
    """Two clicks, ``between()`` (the kill), two more clicks, then a second object elsewhere (new region)."""
    s.add_click(ras=centre, positive=True)
    s.add_click(ras=centre + [5.0, -3.0, 2.0], positive=True)
    between()
    s.add_click(ras=centre + [0.0, 18.0, 0.0], positive=False)
    s.add_click(ras=centre + [-4.0, 2.0, -3.0], positive=True)
    first = s.mask().copy()
    s.new_object()
    s.add_click(ras=centre + [-30.0, -25.0, 10.0], positive=True)
    return first, s.mask().copy()


@pytest.fixture(scope="module")
def phantom():
    return sphere_phantom(shape_ijk=(110, 100, 60), spacing=(1.5, 1.5, 2.0), radius_mm=12.0, noise=10.0, seed=4)


@pytest.fixture(scope="module")
def local_reference(phantom):
    backend, _ = load_backend("demo", None, "cpu")
    rec = Recorder(backend)
    s, centre = _session(rec, phantom)
    return _script(s, centre), rec


@pytest.mark.parametrize("mode", ["full", "split"])
def test_killed_server_mid_session_loses_nothing(phantom, local_reference, mode, tmp_path):
    key_file = tmp_path / "server.keys"
    key_file.write_text(f"# test keys\n{KEY}\n")
    args = ["--model", "demo", "--device", "cpu", "--threads", "1", "--port", "0", "--keys-file", str(key_file)]
    with serve_process(args) as (proc_a, url_a), serve_process(args) as (proc_b, url_b):
        procs = {url_a: proc_a, url_b: proc_b}
        rb = RemoteBackend([url_a, url_b], key=KEY, mode=mode, wire_dtype="float32", timeout_s=30)
        rec = Recorder(rb)
        s, centre = _session(rec, phantom)
        killed = []

        def kill_the_holder():
            holder = rec.handles[-1].server
            procs[holder].kill()
            procs[holder].wait(10)
            killed.append(holder)

        (first, second) = _script(s, centre, kill_the_holder)
        survivor = next(u for u in procs if u not in killed)
        assert procs[survivor].poll() is None
        (ref_first, ref_second), ref = local_reference
        np.testing.assert_array_equal(first, ref_first)
        np.testing.assert_array_equal(second, ref_second)
        assert first.sum() > 500 and second.sum() > 0
        assert len(rec.logits) == len(ref.logits)
        assert max(float(np.abs(a - b).max()) for a, b in zip(rec.logits, ref.logits)) <= 1e-4
        # the second object's region was encoded after the kill: on the survivor
        assert rec.handles[-1].server == survivor
        stats = rb.wire_stats()
        if mode == "full":
            assert stats["failovers"] >= 1        # the next click found its server dead and moved on
            assert rec.handles[0].server == survivor
        rb.close()
