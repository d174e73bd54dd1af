"""Interactive click latency of the engine (SAM3DSegmentLib.inference.session) with the full-size ViT-B model.

Prints one JSON object. For each volume — a 512x512x300 int16 synthetic CT (phantoms.ct_body_phantom) and the
slicerio sample chest CT — it measures, on ``--threads`` CPU threads (default 2):

* ``set_volume_s``: content hashing when a volume is loaded (once per volume);
* ``first_click_s``: the first click of an object (model_input + encode + decode + write-back);
* ``later_click_median_s`` (and p90/max) over ``--clicks`` later clicks inside the same region (decode +
  write-back into the full grid), and the engine's share of it (everything but ``backend.decode``);
* ``engine_only``: the same later clicks with a stub model that returns a fixed ~100 mm object and with one
  that returns "everything positive" (the worst case: the whole 192 mm region pasted), so the write-back
  cost is measured on realistic and worst-case masks independently of random weights.

The model is ``SamMed3DConfig.vit_b_ori()`` with RANDOM weights (no checkpoint can be downloaded here): the
timings are those of the published architecture, the masks are meaningless. Extension is off for the
latency runs (random weights predict arbitrary masks that would trigger region growth; the first-click
number is one encode, as for a real click inside one region). Peak RSS is the process maximum.
Timings are wall-clock on a shared machine: other processes can inflate them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from SAM3DSegmentLib.inference.session import Session, SessionOptions  # noqa: E402


def peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 1024.0 / 1024.0


class FixedLogitsBackend:
    """Stub model for engine-only timing: decode returns fixed logits (a ball of ``radius`` region voxels
    around the region centre, or everything positive)."""

    name = "fixed-logits stub"
    image_size = 128
    low_res_size = 32

    def __init__(self, radius: float = None):
        c = np.arange(32) * 4 + 1.5
        g = np.stack(np.meshgrid(c, c, c, indexing="ij"), -1)
        if radius is None:
            self.logits = np.full((32, 32, 32), 5.0, np.float32)
        else:
            self.logits = ((radius - np.linalg.norm(g - 64.0, axis=-1)) / 4.0).astype(np.float32)

    def encode(self, image):
        return None

    def decode(self, embedding, points, labels, mask_logits):
        return self.logits


def click_points(volume, centre_ijk, n, radius_mm, seed=0):
    rng = np.random.default_rng(seed)
    centre = volume.ijk_to_ras_points(np.asarray(centre_ijk, float))
    pts = []
    while len(pts) < n:
        p = centre + rng.uniform(-radius_mm, radius_mm, 3)
        if volume.contains_ijk(volume.ras_to_ijk_points(p)):
            pts.append(p)
    return centre, pts


def time_session(backend, volume, centre_ijk, n_clicks, extend=False):
    s = Session(backend, SessionOptions(extend=extend))
    t = time.perf_counter()
    s.set_volume(volume)
    set_volume_s = time.perf_counter() - t
    s.new_object()
    centre, pts = click_points(volume, centre_ijk, n_clicks, 40.0)
    t = time.perf_counter()
    u = s.add_click(ras=centre)
    first = time.perf_counter() - t
    first_t = u.timings
    later, overhead, decode = [], [], []
    for n, p in enumerate(pts):
        t = time.perf_counter()
        u = s.add_click(ras=p, positive=(n % 3 != 2))
        dt = time.perf_counter() - t
        assert u.encoded_regions == 0
        later.append(dt)
        decode.append(u.timings["decode_s"])
        overhead.append(dt - u.timings["decode_s"])
    later_sorted = sorted(later)
    return {
        "set_volume_s": set_volume_s,
        "first_click_s": first,
        "first_click_parts_s": {k: first_t[k] for k in ("encode_s", "decode_s", "paste_s")},
        "later_click_median_s": statistics.median(later),
        "later_click_p90_s": later_sorted[int(0.9 * (len(later) - 1))],
        "later_click_max_s": later_sorted[-1],
        "later_decode_median_s": statistics.median(decode),
        "later_engine_overhead_median_s": statistics.median(overhead),
        "clicks": len(later),
        "mask_voxels_after": int(s.mask().sum()),
        "regions": s.region_count(),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clicks", type=int, default=20)
    ap.add_argument("--skip-model", action="store_true", help="only the engine-only stub timings")
    ap.add_argument("--phantom-shape", default="512,512,300")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from SAM3DSegmentLib.data.phantoms import ct_body_phantom
    from SAM3DSegmentLib.data.sample_data import chest_ct

    shape = tuple(int(v) for v in args.phantom_shape.split(","))
    t = time.perf_counter()
    phantom, masks = ct_body_phantom(shape)
    kidney = masks["right_kidney"].array
    kidney_ijk = tuple(int(v) for v in np.argwhere(kidney).mean(axis=0)[::-1])
    del masks
    phantom_s = time.perf_counter() - t
    chest = chest_ct()
    volumes = {
        f"phantom_{'x'.join(map(str, shape))}_int16": (phantom, kidney_ijk),
        "slicerio_chest_ct_128x128x34": (chest, tuple(int(v) // 2 for v in chest.shape_ijk)),
    }
    result = {
        "benchmark": "bench_session",
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
                    "cpu_count": os.cpu_count(), "load_avg_1m_at_start": os.getloadavg()[0]},
        "note": ("vit_b_ori with RANDOM weights (timing only; masks meaningless); extension off for latency; "
                 "wall-clock on a shared 2-core machine, other processes may inflate numbers"),
        "targets": {"first_click_s": 1.5, "later_click_median_s": 0.060},
        "phantom_build_s": phantom_s,
        "volumes": {},
    }
    if not args.skip_model:
        from SAM3DSegmentLib.inference.backends import LocalBackend
        from SAM3DSegmentLib.models import SamMed3DConfig, build_sam_med3d

        torch.manual_seed(0)
        t = time.perf_counter()
        model = build_sam_med3d(SamMed3DConfig.vit_b_ori())
        backend = LocalBackend(model, name="vit_b_ori (random weights)")
        result["model"] = {"name": backend.name, "build_s": time.perf_counter() - t,
                           "parameters": int(sum(p.numel() for p in model.parameters()))}
        # warm-up (first torch calls allocate and pick kernels)
        emb = backend.encode(np.zeros((128,) * 3, np.float32))
        backend.decode(emb, np.zeros((1, 3), np.float32), np.ones(1), None)
    for name, (vol, centre_ijk) in volumes.items():
        entry = {"shape_ijk": list(vol.shape_ijk), "spacing_mm": [round(float(v), 4) for v in vol.spacing],
                 "dtype": str(vol.array.dtype), "mb": round(vol.array.nbytes / 2 ** 20, 1)}
        if not args.skip_model:
            entry["vit_b_ori"] = time_session(backend, vol, centre_ijk, args.clicks)
        entry["engine_only"] = {
            "ball_100mm": time_session(FixedLogitsBackend(radius=33.0), vol, centre_ijk, args.clicks),
            "all_positive_region": time_session(FixedLogitsBackend(radius=None), vol, centre_ijk, args.clicks),
        }
        result["volumes"][name] = entry
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    result["load_avg_1m_at_end"] = os.getloadavg()[0]
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
