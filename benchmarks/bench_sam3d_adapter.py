#!/usr/bin/env python
"""Full-size 3DSAM-adapter (ViT-B, 128³ crop): encode time, per-click decode time and peak memory, one run.

Each device is measured in a fresh subprocess, so its peak resident memory (model + one encode + clicks) is
its own. CPU always; CUDA too when a GPU is visible (peak GPU memory from ``torch.cuda.max_memory_allocated``).
Prints one JSON object. Usage::

    python benchmarks/bench_sam3d_adapter.py [--threads 2] [--clicks 3] [--full-decode] [--adapter original|dualpath]

Random weights (no published weights can be downloaded here); timings do not depend on the values.
``decode_per_click_s`` is the predictor's per-click path (prompt encoder + decoder level 3 + fusion; the
click-independent decoder part is computed once in ``encode``). ``--full-decode`` also times the published
computation (all 4 decoder levels every click) once.
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
import torch
device, threads, clicks, full, adapter = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]
torch.set_num_threads(threads)
torch.manual_seed(0)
from SAM3DSegmentLib.models.device import tune_cpu_allocator
tuned = tune_cpu_allocator() if device == "cpu" else False
from SAM3DSegmentLib.models.sam3d_adapter import Sam3DAdapter, Sam3DAdapterConfig, Sam3DAdapterPredictor
def rss_gb(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
def sync():
    if device == "cuda": torch.cuda.synchronize()
rss0 = rss_gb()
model = Sam3DAdapter(Sam3DAdapterConfig.vit_b(adapter=adapter)).eval()
params = sum(p.numel() for p in model.parameters())
pred = Sam3DAdapterPredictor(model, device=device)
rss_model = rss_gb()
gpu = {}
if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
    gpu["model_gb"] = torch.cuda.memory_allocated() / 2**30
crop = torch.randn(1, 1, 128, 128, 128)
sync(); t = time.perf_counter(); feats = pred.encode(crop); sync(); encode_s = time.perf_counter() - t
rss_enc = rss_gb()
if device == "cuda":
    gpu["encode_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
g = torch.Generator().manual_seed(1)
times = []
for i in range(clicks + 1):  # the first click warms up
    pts = torch.rand(i + 1, 3, generator=g) * 100 + 14
    sync(); t = time.perf_counter(); fg = pred.decode(feats, pts); sync(); dt = time.perf_counter() - t
    if i: times.append(dt)
out = {"device": device, "threads": threads, "allocator_tuned": tuned, "parameters": params, "encode_s": encode_s,
       "decode_per_click_s": sorted(times)[len(times) // 2], "decode_click_times_s": times,
       "features_cache_mb": feats.nbytes / 2**20, "rss_after_import_gb": rss0, "rss_after_model_gb": rss_model,
       "peak_rss_after_encode_gb": rss_enc, "encode_transient_gb": rss_enc - rss_model}
if full:
    with torch.inference_mode():
        p = pts[None].to(pred.device)
        sync(); t = time.perf_counter(); model.decode(feats.features, feats.crop, p); sync()
        out["decode_full_published_s"] = time.perf_counter() - t
out["peak_rss_gb"] = rss_gb()
if device == "cuda":
    gpu["decode_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    gpu["name"] = torch.cuda.get_device_name()
    out["gpu"] = gpu
print(json.dumps(out))
"""


def run(device: str, threads: int, clicks: int, full: bool, adapter: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", WORKER, device, str(threads), str(clicks), "1" if full else "0",
                          adapter], capture_output=True, text=True, env=env, cwd=root, check=False)
    if out.returncode != 0:
        return {"device": device, "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip()
                else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clicks", type=int, default=3)
    ap.add_argument("--full-decode", action="store_true", help="also time the published all-levels decode once")
    ap.add_argument("--adapter", choices=("original", "dualpath"), default="original")
    ap.add_argument("--skip-cpu", action="store_true")
    args = ap.parse_args()
    import torch

    t0 = time.time()
    result = {"benchmark": "sam3d_adapter", "model": "3DSAM-adapter ViT-B (" + args.adapter + " adapter)",
              "input": [1, 1, 128, 128, 128], "torch": torch.__version__,
              "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
              "weights": "random (timing does not depend on values)"}
    runs = [] if args.skip_cpu else [run("cpu", args.threads, args.clicks, args.full_decode, args.adapter)]
    if torch.cuda.is_available():
        runs.append(run("cuda", args.threads, args.clicks, args.full_decode, args.adapter))
    else:
        result["cuda"] = "no GPU visible: not measured"
    for r in runs:
        result[r["device"]] = r
    result["wall_s"] = time.time() - t0
    print(json.dumps(result, indent=2))
    return 1 if any("error" in r for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
