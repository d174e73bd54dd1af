#!/usr/bin/env python
"""Full-size 3DSAM-adapter through the engine: backend (``make_backend``) + ``Session`` on a CT phantom, one run.

What a user's clicks cost: the first click of a region (1 mm 128³ region sampled and normalised, encode, decode,
paste-back onto the volume grid) and each later click inside it (decode of all include clicks + paste-back),
plus the process's peak resident memory and the embedding cache's bytes. Each device runs in a fresh
subprocess (CPU always; CUDA too when a GPU is visible, with ``torch.cuda.max_memory_allocated``). Prints one
JSON object. Usage::

    python benchmarks/bench_sam3d_adapter_session.py [--threads 2] [--clicks 3]

Random weights (no published weights can be downloaded here); timings do not depend on the values.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

WORKER = r"""
import json, resource, sys, time
import numpy as np
import torch
device, threads, clicks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
torch.manual_seed(0)
def rss_gb(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
from SAM3DSegmentLib.core.intensity import WindowZNorm
from SAM3DSegmentLib.data.phantoms import ct_body_phantom
from SAM3DSegmentLib.inference.backends import make_backend
from SAM3DSegmentLib.inference.session import Session, SessionOptions
from SAM3DSegmentLib.models.sam3d_adapter import Sam3DAdapter, Sam3DAdapterConfig
volume, masks = ct_body_phantom(shape_ijk=(256, 256, 160), spacing=(1.0, 1.0, 1.5), seed=3)
liver = np.argwhere(np.asarray(masks["liver"].array) > 0)
rss0 = rss_gb()
net = Sam3DAdapter(Sam3DAdapterConfig.vit_b()).eval()
net.family, net.intensity = "3dsam_adapter", WindowZNorm((-160.0, 240.0), 60.0, 50.0)
backend = make_backend(net, device=device, name="3DSAM-adapter ViT-B (random weights)")
rss_model = rss_gb()
if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
session = Session(backend, SessionOptions(region_size=backend.image_size, extend=False))
session.set_volume(volume)
session.new_object("liver")
rng = np.random.default_rng(0)
centre = liver.mean(axis=0)
picks = [liver[np.argmin(np.abs(liver - centre).sum(1))]] + [liver[i] for i in rng.choice(len(liver), clicks)]
steps = []
for n, (k, j, i) in enumerate(picks):
    if device == "cuda": torch.cuda.synchronize()
    t = time.perf_counter()
    u = session.add_click(ijk=(float(i), float(j), float(k)))
    if device == "cuda": torch.cuda.synchronize()
    steps.append({"wall_s": time.perf_counter() - t, "encoded": u.encoded_regions, **u.timings,
                  "regions": session.region_count()})
later = [s["wall_s"] for s in steps[1:] if not s["encoded"]]
out = {"device": device, "threads": threads, "volume_ijk": list(volume.shape_ijk), "spacing_mm": list(volume.spacing),
       "region": {"size": backend.image_size, "spacing_mm": session.options.spacing_mm},
       "prompt_mode": session.options.prompt_mode, "first_click_s": steps[0]["wall_s"],
       "first_click_encode_s": steps[0]["encode_s"], "first_click_decode_s": steps[0]["decode_s"],
       "later_click_median_s": sorted(later)[len(later) // 2] if later else None, "later_click_times_s": later,
       "clicks": steps, "cache": session.cache.stats(), "rss_before_model_gb": rss0, "rss_after_model_gb": rss_model,
       "peak_rss_gb": rss_gb()}
if device == "cuda":
    out["gpu"] = {"name": torch.cuda.get_device_name(), "peak_gb": torch.cuda.max_memory_allocated() / 2**30}
print(json.dumps(out))
"""


def run(device: str, threads: int, clicks: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", WORKER, device, str(threads), str(clicks)], capture_output=True,
                         text=True, env=env, cwd=root, check=False)
    if out.returncode != 0:
        return {"device": device, "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip()
                else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clicks", type=int, default=3, help="later clicks inside the first region (default 3)")
    ap.add_argument("--skip-cpu", action="store_true")
    args = ap.parse_args()
    import torch

    t0 = time.time()
    result = {"benchmark": "sam3d_adapter_session", "model": "3DSAM-adapter ViT-B (original adapter)",
              "path": "make_backend -> Sam3DAdapterBackend -> Session.add_click", "torch": torch.__version__,
              "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
              "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
              "weights": "random (timing does not depend on values)"}
    runs = [] if args.skip_cpu else [run("cpu", args.threads, args.clicks)]
    if torch.cuda.is_available():
        runs.append(run("cuda", args.threads, args.clicks))
    else:
        result["cuda"] = "no GPU visible: not measured"
    for r in runs:
        result[r["device"]] = r
    result["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result["wall_s"] = time.time() - t0
    print(json.dumps(result, indent=2))
    return 1 if any("error" in r for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
