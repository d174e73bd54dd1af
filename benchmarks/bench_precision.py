#!/usr/bin/env python
"""Deviation of reduced-precision inference (bf16 / fp16 autocast) from float32, per available device.

Prints JSON. Random weights scaled like a trained ViT (the published weights cannot be downloaded here);
re-run with --checkpoint sam_med3d_turbo.pth on a machine that has it for the real figure.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    from SAM3DSegmentLib.inference.backends import LocalBackend
    from SAM3DSegmentLib.models import build_sam_med3d, load_checkpoint
    from SAM3DSegmentLib.models.device import available_devices

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_checkpoint(args.checkpoint) if args.checkpoint else build_sam_med3d()
    rng = np.random.default_rng(0)
    image = rng.standard_normal((128, 128, 128)).astype(np.float32)
    points, labels = np.array([[64.0, 60.0, 70.0]]), np.array([1])
    out = {"benchmark": "precision", "weights": args.checkpoint or "random", "devices": {}}
    for dev in available_devices():
        base = LocalBackend(model, device=dev, dtype="float32")
        emb32 = base.encode(image)
        log32 = base.decode(emb32, points, labels, None)
        res = {}
        for dtype in (["bfloat16", "float16"] if dev != "cpu" else ["bfloat16"]):
            be = LocalBackend(model, device=dev, dtype=dtype)
            t = time.perf_counter()
            emb = be.encode(image)
            t_enc = time.perf_counter() - t
            logits = be.decode(emb, points, labels, None)
            e32 = emb32.float().cpu().numpy()
            e = emb.float().cpu().numpy()
            res[dtype] = {
                "embedding_max_abs_diff": float(np.abs(e - e32).max()),
                "embedding_rel_rms_diff": float(np.sqrt(np.mean((e - e32) ** 2) / np.mean(e32 ** 2))),
                "logits_max_abs_diff": float(np.abs(logits - log32).max()),
                "mask_agreement": float(np.mean((logits > 0) == (log32 > 0))),
                "encode_s": t_enc,
            }
        out["devices"][dev] = res
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
