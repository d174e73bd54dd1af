#!/usr/bin/env python
"""Encoder and per-click decoder speed of our SAM-Med3D vs the reference code (medim), in one run.

Each measurement runs in a fresh subprocess, so its peak resident memory (model + one encode) is its own.
Prints one JSON object. Usage::

    python benchmarks/bench_model.py [--threads 2] [--repeats 2] [--clicks 30] [--rounds 2] [--skip-oracle]

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
import torch
impl, threads, repeats, clicks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
torch.manual_seed(0)
if sys.argv[5] == "1":  # the same allocator setting for every side (LocalBackend applies it for users)
    from SAM3DSegmentLib.models.device import tune_cpu_allocator
    tuned = tune_cpu_allocator()
else:
    tuned = False
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if impl == "oracle":
    import medim.models.sam_med3d as ref
    model = ref.build_sam3D_vit_b_ori().eval()
    def encode(x): return model.image_encoder(x)
    def decode(emb, p, l, m):
        s, d = model.prompt_encoder(points=(p, l), boxes=None, masks=m)
        return model.mask_decoder(image_embeddings=emb, image_pe=model.prompt_encoder.get_dense_pe(),
                                  sparse_prompt_embeddings=s, dense_prompt_embeddings=d, multimask_output=False)[0]
else:
    from SAM3DSegmentLib.models import SamMed3DConfig, build_sam_med3d
    model = build_sam_med3d(SamMed3DConfig.vit_b_ori(attention_impl=impl)).eval()
    def encode(x): return model.image_encoder(x)
    def decode(emb, p, l, m): return model.predict_low_res(emb, p, l, m)
rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
x = torch.randn(1, 1, 128, 128, 128)
enc = []
with torch.inference_mode():
    for _ in range(repeats):
        t = time.perf_counter(); emb = encode(x); enc.append(time.perf_counter() - t)
    rss_enc = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    logits = torch.zeros(1, 1, 32, 32, 32)
    dec = []
    g = torch.Generator().manual_seed(1)
    for i in range(clicks + 3):
        p = torch.rand(1, 1, 3, generator=g) * 127
        l = torch.tensor([[i % 2]])
        t = time.perf_counter(); logits = decode(emb, p, l, logits); dt = time.perf_counter() - t
        if i >= 3: dec.append(dt)
dec.sort()
print(json.dumps({"allocator_tuned": tuned, "encode_s": enc, "encode_best_s": min(enc), "decode_median_ms": 1000 * dec[len(dec) // 2],
                  "decode_p90_ms": 1000 * dec[int(len(dec) * 0.9)],
                  "peak_rss_gb": rss_enc / 2**20, "rss_after_import_gb": rss0 / 2**20,
                  "rss_after_model_gb": rss_model / 2**20, "encode_transient_gb": (rss_enc - rss_model) / 2**20}))
"""


def run(impl: str, threads: int, repeats: int, clicks: int, tune: bool) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", WORKER, impl, str(threads), str(repeats), str(clicks),
                          "1" if tune else "0"],
                         capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--clicks", type=int, default=30)
    ap.add_argument("--skip-oracle", action="store_true")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds; each side keeps its best")
    ap.add_argument("--with-padded", action="store_true", help="also time our reference (padded) attention path")
    ap.add_argument("--no-allocator-tuning", action="store_true",
                    help="leave glibc malloc at its defaults for every side (see models.device.tune_cpu_allocator)")
    args = ap.parse_args()
    import torch

    t0 = time.time()
    result = {"benchmark": "model", "threads": args.threads, "input": [1, 1, 128, 128, 128],
              "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "weights": "random (timing does not depend on values)",
              "allocator_tuning": not args.no_allocator_tuning}
    # Alternate ours / oracle over several rounds and keep each one's best round, so that a burst of
    # load from elsewhere on the machine cannot favour either side.
    impls = [("ours_fast", "fast")] + ([("ours_padded", "reference")] if args.with_padded else []) \
        + ([] if args.skip_oracle else [("oracle_medim", "oracle")])
    rounds = {key: [] for key, _ in impls}
    for _ in range(args.rounds):
        for key, impl in impls:
            rounds[key].append(run(impl, args.threads, args.repeats, args.clicks, not args.no_allocator_tuning))
    for key, runs in rounds.items():
        ok = [r for r in runs if "error" not in r]
        result[key] = min(ok, key=lambda r: r["encode_best_s"]) if ok else runs[0]
        result[key]["rounds_encode_best_s"] = [r.get("encode_best_s") for r in runs]
    if not args.skip_oracle:
        o, f = result["oracle_medim"], result["ours_fast"]
        if "error" not in o and "error" not in f:
            result["encoder_speedup_vs_oracle"] = o["encode_best_s"] / f["encode_best_s"]
            result["decoder_speedup_vs_oracle"] = o["decode_median_ms"] / f["decode_median_ms"]
    f = result["ours_fast"]
    if "error" not in f:
        result["targets"] = {
            "encoder_10x_faster_than_oracle": result.get("encoder_speedup_vs_oracle", 0) >= 10,
            "peak_rss_under_1GB": f["peak_rss_gb"] < 1.0,
            "decode_under_25ms": f["decode_median_ms"] < 25.0,
        }
    result["wall_s"] = time.time() - t0
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
