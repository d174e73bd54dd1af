"""How far our NSD (voxel-count surfaces) is from the surface-area-weighted surface Dice the SegFM challenge computes.

The challenge scores NSD with DeepMind's ``surface-distance`` (surfels weighted by their area); our
:func:`SAM3DSegmentLib.eval.metrics.normalized_surface_dice` counts surface voxels. MONAI's
``compute_surface_dice(..., use_subvoxels=True)`` implements the area-weighted original, so this script runs
the SegFM protocol (:mod:`SAM3DSegmentLib.eval.segfm`) with a model over a ``--data`` folder, keeps the label
map of the box step and of clicks 3 and 5, and compares, per class, our NSD at 2 mm with MONAI's, and with
MONAI's fed the spacing in reverse axis order (what the challenge script does with the (x, y, z) ``spacing`` of
its ``.npz`` files on (z, y, x) arrays). Prints one JSON object.

Needs MONAI (``pip install monai``; not a dependency of the project) and torch.

    python benchmarks/bench_segfm_nsd.py --data /path/to/npz_or_nnunet [--npz-window -1000,1000] [--model demo]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder of SegFM .npz cases or an nnU-Net dataset")
    p.add_argument("--npz-window", default=None, help="LO,HI: map .npz images back onto this window")
    p.add_argument("--model", default="demo")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--box", default="gt", choices=("auto", "none", "gt"))
    args = p.parse_args()
    try:
        import torch
        from monai.metrics import compute_surface_dice
    except ImportError as err:
        sys.stderr.write(f"bench_segfm_nsd: needs torch and MONAI ({err}); pip install monai\n")
        return 1
    from SAM3DSegmentLib.eval.metrics import normalized_surface_dice
    from SAM3DSegmentLib.eval.segfm import SegFMConfig, run_case
    from SAM3DSegmentLib.eval.segfm_run import segfm_data
    from SAM3DSegmentLib.inference.backends import load_backend

    torch.set_num_threads(args.threads)
    window = None if args.npz_window is None else tuple(float(v) for v in args.npz_window.split(","))
    backend, _ = load_backend(args.model, None, "cpu", args.threads)
    data = segfm_data(args.data, npz_window=window)

    def monai_nsd(pred, gt, spacing):
        t = lambda m: torch.from_numpy(np.stack([~m, m])[None].astype(np.float32))  # noqa: E731
        return float(compute_surface_dice(t(pred), t(gt), [2.0], spacing=[list(spacing)], use_subvoxels=True)[0, 0])

    rows = []
    t0 = time.perf_counter()
    for task in data.tasks():
        segs = {}
        run_case(backend, task, SegFMConfig(box=args.box),
                 on_step=lambda step, seg: segs.__setitem__(step, seg.copy()))
        spacing = np.asarray(task.image.spacing, dtype=np.float64)[::-1]
        for step in [s for s in ("box", 3, 5) if s in segs]:
            for c in task.classes:
                g, pr = task.gts == c, segs[step] == c
                rows.append({"case": task.name, "step": step, "class": c,
                             "ours": normalized_surface_dice(pr, g, 2.0, spacing),
                             "area_weighted": monai_nsd(pr, g, spacing),
                             "area_weighted_reversed_spacing": monai_nsd(pr, g, spacing[::-1])})
    ok = [r for r in rows if all(np.isfinite(r[k]) for k in ("ours", "area_weighted", "area_weighted_reversed_spacing"))]
    ours = np.array([r["ours"] for r in ok])
    ref = np.array([r["area_weighted"] for r in ok])
    rev = np.array([r["area_weighted_reversed_spacing"] for r in ok])
    print(json.dumps({
        "command": " ".join(sys.argv), "data": os.path.abspath(args.data), "model": args.model,
        "npz_window": window, "pairs": len(ok), "seconds": round(time.perf_counter() - t0, 1),
        "mean_ours": float(ours.mean()), "mean_area_weighted": float(ref.mean()),
        "mean_ours_minus_area_weighted": float((ours - ref).mean()),
        "mean_abs_difference": float(np.abs(ours - ref).mean()), "max_abs_difference": float(np.abs(ours - ref).max()),
        "mean_abs_difference_reversed_spacing_vs_area_weighted": float(np.abs(rev - ref).mean()),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
