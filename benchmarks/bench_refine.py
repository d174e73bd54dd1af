"""Refining an existing segment: which previous-mask prompt an initial mask should give the model.

Prints one JSON object. ``Session.set_initial_mask`` (SAM3DSegmentLib/inference/prior.py) turns an initial mask into
the previous-mask prompt (32^3 low-res logits) of every region it touches; this script measures, for each way of
doing that (``SessionOptions.init_prompt`` x ``init_logit``), the Dice of the object's mask after 0, 1, 2 and 3
simulated corrective clicks, with the bundled demo model (or ``--checkpoint FILE``) on CPU, and compares with
starting from scratch (no initial mask: the same clicks on an empty object).

Cases (ground truth from the image's own labels):

* ``chest``: the slicerio sample chest CT (3.05 x 3.05 x 10 mm). The demo model was TRAINED on this image
  (docs/demo_model.md), so its figures are optimistic;
* ``body003``: the demo data's body phantom ``body003`` (phantoms.ct_body_phantom, 170 x 170 x 60 voxels of
  1.5 x 1.5 x 3.5 mm, seed 103), held out of the demo model's training (it chose the checkpoint).

Initial masks are the ground truth spoiled four ways, in millimetres: ``eroded`` (4 mm off the surface),
``dilated`` (4 mm added), ``shifted`` (moved 6 mm along the image's i axis, to the nearest voxel), ``partial``
(the part above its centroid along S removed). Clicks: :func:`SAM3DSegmentLib.eval.clicker.next_click` (the
deepest point of the deeper error region, never the same voxel twice) on the object's full mask. Click 0 is the
initial mask itself (the same for every encoding); ``scratch`` has no click-0 mask (Dice 0).

``--costs-only``: the engine's own cost instead, for a liver mask on a 512 x 512 x 300 grid: ``set_initial_mask``,
one region's prompt per encoding, and the median later click inside an encoded region with and without the
initial mask (a stub model returning a fixed ~100 mm ball, so only the engine is timed).

Run: ``.venv/bin/python benchmarks/bench_refine.py [--threads 2] [--clicks 3]`` (1127 s measured on 2 busy CPU
cores, most of it in the rows with region growth; ``--no-extension`` skips them).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
from scipy import ndimage

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from SAM3DSegmentLib.eval.clicker import next_click  # noqa: E402
from SAM3DSegmentLib.eval.metrics import dice  # noqa: E402
from SAM3DSegmentLib.inference.cache import EmbeddingCache  # noqa: E402
from SAM3DSegmentLib.inference.session import Session, SessionOptions  # noqa: E402

#: (name, init_prompt, init_logit, init_width_mm, extend); "scratch": no initial mask at all. Region extension
#: is off for the comparison of encodings (one region per click: fast, and the encodings see the same regions);
#: the last three rows measure it on.
CONFIGS = [("scratch", None, None, None, False), ("zeros", "zeros", 8.0, 6.0, False),
           ("binary_8", "binary", 8.0, 6.0, False), ("occupancy_8", "occupancy", 8.0, 6.0, False),
           ("distance_8", "distance", 8.0, 6.0, False), ("distance_4", "distance", 4.0, 6.0, False),
           ("distance_8_w3", "distance", 8.0, 3.0, False),
           ("scratch_extend", None, None, None, True), ("binary_8_extend", "binary", 8.0, 6.0, True),
           ("distance_8_extend", "distance", 8.0, 6.0, True)]
SPOILS = ("eroded", "dilated", "shifted", "partial")


def cases():
    from SAM3DSegmentLib.data.phantoms import ct_body_phantom
    from SAM3DSegmentLib.data.sample_data import chest_ct, chest_segments

    ct = chest_ct()
    segs = chest_segments(ct)
    yield "chest", ct, {n: segs[n].array > 0 for n in ("right lung", "left lung", "thoracic vertebral column")}
    img, masks = ct_body_phantom(shape_ijk=(170, 170, 60), spacing=(1.5, 1.5, 3.5), seed=103, large_object=True)
    yield "body003", img, {n: masks[n].array > 0 for n in ("liver", "spine", "right_kidney")}


def spoil(gt: np.ndarray, how: str, volume) -> np.ndarray:
    sp = volume.spacing[::-1]                                     # mm per (k, j, i) axis
    if how == "eroded":
        return ndimage.distance_transform_edt(gt, sampling=sp) > 4.0
    if how == "dilated":
        return ndimage.distance_transform_edt(~gt, sampling=sp) <= 4.0
    if how == "shifted":
        step = np.zeros(3)
        step[2] = 6.0 / volume.spacing[0]
        return ndimage.shift(gt.astype(np.uint8), np.round(step), order=0) > 0
    k, j, i = np.nonzero(gt)
    ras = volume.ijk_to_ras_points(np.stack([i, j, k], -1).astype(float))
    out = gt.copy()
    above = ras[:, 2] > ras[:, 2].mean()
    out[k[above], j[above], i[above]] = False
    return out


def run(backend, vol, gt, init, config, n_clicks, cache):
    name, prompt, logit, width, extend = config
    opts = SessionOptions(extend=extend) if prompt is None else SessionOptions(
        extend=extend, init_extend=extend, init_prompt=prompt, init_logit=logit, init_width_mm=width)
    s = Session(backend, opts)
    s.cache = cache                       # embeddings shared across runs (same volume and region = same key)
    s.set_volume(vol)
    s.new_object()
    pred = None
    if prompt is not None:
        s.set_initial_mask(init)
        pred = s.mask() > 0
    scores = [0.0 if pred is None else dice(pred, gt)]
    avoid, t = [], time.perf_counter()
    for _ in range(n_clicks):
        click = next_click(gt, pred, vol.spacing[::-1], avoid)
        if click is None:
            scores.append(scores[-1])
            continue
        avoid.append(click.ijk)
        s.add_click(ijk=click.ijk, positive=click.positive)
        pred = s.mask() > 0
        scores.append(dice(pred, gt))
    return scores, time.perf_counter() - t


def costs() -> dict:
    """Engine cost of an initial mask on a 512 x 512 x 300 CT grid (the phantom's liver): ``set_initial_mask``
    (crop and store) and one region's prompt per encoding (sampling, block means, distance transform)."""
    from SAM3DSegmentLib.data.phantoms import ct_body_phantom
    from SAM3DSegmentLib.inference.prior import INIT_PROMPTS, InitialMask
    from SAM3DSegmentLib.inference.regions import Region

    img, masks = ct_body_phantom(large_object=True)
    liver = masks["liver"].array
    out = {"grid": list(img.shape_ijk), "mask_voxels": int(liver.sum())}
    s = Session(_NullBackend(), SessionOptions())
    s.set_volume(img)
    s.new_object()
    t = time.perf_counter()
    s.set_initial_mask(liver)
    out["set_initial_mask_s"] = round(time.perf_counter() - t, 3)
    k, j, i = (int(np.median(a)) for a in np.nonzero(liver[::4, ::4, ::4]))
    region = Region.around(img, img.ijk_to_ras_points(np.array([i * 4.0, j * 4.0, k * 4.0])))
    out["region_prompt_s"] = {}
    for prompt in INIT_PROMPTS[:3]:
        best = np.inf
        for _ in range(3):   # best of 3 (the first call also pays one-time warm-up)
            init = InitialMask.of(liver, img, SessionOptions(init_prompt=prompt), 32)
            t = time.perf_counter()
            init.region_prompt(region)
            best = min(best, time.perf_counter() - t)
        out["region_prompt_s"][prompt] = round(best, 3)
    # a later click inside an encoded region (stub model: a fixed ball), with and without the initial mask
    centre = img.ijk_to_ras_points(np.array([i * 4.0, j * 4.0, k * 4.0]))
    for name, mask in (("later_click_s_without_initial_mask", None), ("later_click_s_with_initial_mask", liver)):
        s = Session(_BallBackend(), SessionOptions(extend=False))
        s.set_volume(img)
        s.new_object()
        if mask is not None:
            s.set_initial_mask(mask)
        s.add_click(ras=centre)
        times = []
        for n in range(5):
            t = time.perf_counter()
            s.add_click(ras=centre + np.array([3.0 * (n + 1), 0.0, 0.0]), positive=n % 2 == 0)
            times.append(time.perf_counter() - t)
        out[name] = round(float(np.median(times)), 3)
    return out


class _NullBackend:
    name, image_size, low_res_size = "none", 128, 32


class _BallBackend(_NullBackend):
    """Stub model: the same ~100 mm ball every time (the engine's own cost is what is timed)."""

    def encode(self, image):
        return None

    def decode(self, embedding, points, labels, mask_logits):
        c = np.arange(32) * 4 + 1.5
        g = np.stack(np.meshgrid(c, c, c, indexing="ij"), -1)
        return ((33.0 - np.linalg.norm(g - 64.0, axis=-1)) / 4.0).astype(np.float32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clicks", type=int, default=3)
    ap.add_argument("--no-extension", action="store_true", help="skip the configurations with region extension")
    ap.add_argument("--costs-only", action="store_true", help="only the engine costs on a 512 x 512 x 300 grid")
    ap.add_argument("--checkpoint", default=None, help="another model's checkpoint file (default: the demo model)")
    args = ap.parse_args(argv)
    if args.costs_only:
        print(json.dumps({"benchmark": "refine_initial_mask_costs", **costs()}, indent=1))
        return 0
    configs = [c for c in CONFIGS if not (args.no_extension and c[4])]
    import torch

    from SAM3DSegmentLib.inference.backends import LocalBackend
    from SAM3DSegmentLib.models import load_checkpoint

    torch.set_num_threads(args.threads)
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    backend = LocalBackend(load_checkpoint(args.checkpoint or os.path.join(root, "SAM3DSegmentLib", "resources",
                                                                           "demo_model.pt")))
    rows = []
    t0 = time.perf_counter()
    for case, vol, targets in cases():
        cache = EmbeddingCache(1024)
        for target, gt in targets.items():
            for how in SPOILS:
                init = spoil(gt, how, vol)
                for config in configs:
                    scores, secs = run(backend, vol, gt, init, config, args.clicks, cache)
                    rows.append({"case": case, "target": target, "spoil": how, "config": config[0],
                                 "dice": [round(float(d), 4) for d in scores], "clicks_s": round(secs, 2)})
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    summary = {}
    for config in configs:
        mine = [r for r in rows if r["config"] == config[0]]
        mean = np.mean([r["dice"] for r in mine], axis=0)
        by_spoil = {how: [round(float(v), 4) for v in np.mean([r["dice"] for r in mine if r["spoil"] == how], axis=0)]
                    for how in SPOILS}
        by_case = {c: [round(float(v), 4) for v in np.mean([r["dice"] for r in mine if r["case"] == c], axis=0)]
                   for c in sorted({r["case"] for r in mine})}
        summary[config[0]] = {"init_prompt": config[1], "init_logit": config[2], "init_width_mm": config[3],
                              "extend": config[4],
                              "mean_dice_after_clicks": [round(float(v), 4) for v in mean],
                              "by_spoil": by_spoil, "by_case": by_case}
    print(json.dumps({"benchmark": "refine_initial_mask", "model": backend.name, "threads": args.threads,
                      "clicks": args.clicks, "runs": len(rows), "wall_s": round(time.perf_counter() - t0, 1),
                      "summary": summary, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
