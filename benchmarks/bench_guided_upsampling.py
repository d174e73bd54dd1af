"""Image-guided upsampling (SessionOptions.upsampling="guided") against the plain trilinear paste-back.

Prints one JSON object with three parts:

* ``best_fit``: model-free. For each labelled structure, the engine's own regions (a Session, region growth
  on, one click at the deepest point of each connected part of the label larger than 1 % of the largest) are
  given the low-res logits that best represent the label (``eval.logit_fit.fit_logits``: least squares, then
  L-BFGS on the logistic loss, through the paste-back operator of each region) instead of a model's answer;
  the mask is then pasted back by the engine with and without guidance (click honouring off: the upsampling
  alone) and scored against the label: Dice and surface Dice (NSD) at 1 mm. Structures: the seven segments
  of the chest CT bundled in slicerio (3.05 x 3.05 x 10 mm voxels) and synthetic phantoms with partial-volume
  edges, blur and noise (``data.fine_phantoms``): a 5 mm bone shell, a 5 mm soft-tissue wall, spheres of 3, 5
  and 8 mm radius, an organ and its low-contrast neighbour, each on an axis-aligned and an oblique grid.
* ``demo_model``: the bundled demo model, 5 simulated clicks (``eval.clicker.next_click``, clicks honoured as
  in the Slicer module) per structure with and without guidance: Dice after each click, and the mean time
  per later click.
* ``timing``: later clicks on a 512x512x300 synthetic CT (``phantoms.ct_body_phantom``) with a stub model
  (fixed logits: a ~100 mm ball, and a region that is positive everywhere), the engine's time per click with
  and without guidance; with ``--full-model`` also the full-size ``vit_b_ori`` (random weights: timing only).

The session's region predictor is swapped for the oracle (``Session._predictor.decode``): the benchmark uses
the engine's private attribute on purpose, so that regions, growth, merging and paste-back are the engine's
own. OpenBLAS is limited to one thread (set before numpy is imported): its threaded kernels stall on a busy
2-core machine. Timings are wall-clock: other processes inflate them.
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from SAM3DSegmentLib.core.types import Click  # noqa: E402
from SAM3DSegmentLib.eval.clicker import deepest_point, next_click  # noqa: E402
from SAM3DSegmentLib.eval.logit_fit import fit_logits, paste_operator  # noqa: E402
from SAM3DSegmentLib.eval.metrics import dice, normalized_surface_dice  # noqa: E402
from SAM3DSegmentLib.inference.session import Session, SessionOptions  # noqa: E402

MODES = ("trilinear", "guided")
LARGE = ("right lung", "left lung", "tissue", "organ", "neighbour")
SHELLS = ("bone_shell_5mm", "wall_shell_5mm")


class _NoModel:
    name, image_size, low_res_size = "oracle", 128, 32

    def encode(self, image):
        return None

    def decode(self, *args):  # pragma: no cover - replaced by the oracle
        raise AssertionError("the oracle answers instead of a model")


def structures(quick: bool):
    """``(case, structure, image, label)`` of the chest CT and the fine phantoms."""
    from SAM3DSegmentLib.data.fine_phantoms import FINE_CASES, fine_case
    from SAM3DSegmentLib.data.sample_data import chest_ct, chest_segments

    chest = chest_ct()
    for name, seg in chest_segments(chest).items():
        if not quick or name in ("right lung", "thoracic vertebral column"):
            yield "chest_ct", name, chest, seg.array
    for case in FINE_CASES:
        for oblique in (False, True):
            if quick and (oblique or case == "organ"):
                continue
            image, labels = fine_case(case, oblique=oblique)
            for label, mask in labels.items():
                if label in ("content", "lumen"):   # the inside of a shell: a plain large blob
                    continue
                yield f"{case}{'_oblique' if oblique else ''}", label, image, mask.array


def component_clicks(label: np.ndarray, spacing_kji) -> list:
    from scipy import ndimage

    comps, _ = ndimage.label(label)
    sizes = np.bincount(comps.ravel())[1:]
    clicks = []
    for c in np.argsort(-sizes):
        if sizes[c] < max(20, 0.01 * sizes.max()):
            break
        idx, _ = deepest_point(comps == c + 1, spacing_kji)
        clicks.append(Click(ijk=tuple(float(v) for v in idx[::-1])))
    return clicks


def oracle_mask(image, label, mode: str, fits: dict) -> Session:
    """A session whose regions answer with the best-fit logits of ``label`` (cached in ``fits``)."""
    s = Session(_NoModel(), SessionOptions(max_regions=64, honour_clicks=False, upsampling=mode))
    s.set_volume(image)
    pred = s._predictor

    def decode(rs, points, labels, mask_in, stats):
        key = tuple(np.round(rs.region.region_to_ras, 4).ravel())
        if key not in fits:
            t = time.perf_counter()
            fits[key] = fit_logits(label, paste_operator(image, rs.region))
            fits["fit_s"] = fits.get("fit_s", 0.0) + time.perf_counter() - t
        logits = fits[key].copy()
        logits.flags.writeable = False
        return replace(rs, logits=logits, pos_box=pred.composer.positive_box(rs.region, rs.box, logits))

    pred.decode = decode
    s.new_object()
    t = time.perf_counter()
    s.add_clicks(component_clicks(label, image.spacing[::-1]))
    s.paste_and_fit_s = time.perf_counter() - t
    return s


def scores(mask, label, spacing_kji) -> dict:
    return {"dice": round(dice(mask, label), 4),
            "nsd_1mm": round(normalized_surface_dice(mask, label, 1.0, spacing_kji), 4)}


def best_fit(quick: bool, log) -> list:
    rows = []
    for case, name, image, label in structures(quick):
        fits: dict = {}
        row = {"case": case, "structure": name, "voxels": int(label.sum()),
               "spacing_mm": [round(float(v), 3) for v in image.spacing]}
        for mode in MODES:
            s = oracle_mask(image, label, mode, fits)
            row[mode] = scores(s.mask(), label, image.spacing[::-1])
            row["regions"] = s.region_count()
        row["fit_s"] = round(fits.get("fit_s", 0.0), 1)
        row["dice_gain"] = round(row["guided"]["dice"] - row["trilinear"]["dice"], 4)
        log(f"best fit {case} / {name}: {row['trilinear']} -> {row['guided']}")
        rows.append(row)
    return rows


def demo_clicks(quick: bool, n_clicks: int, log) -> list:
    from SAM3DSegmentLib.inference.backends import load_backend

    backend, _ = load_backend(model="demo", device="cpu", threads=2)
    rows = []
    for case, name, image, label in structures(quick):
        row = {"case": case, "structure": name}
        for mode in MODES:
            s = Session(backend, SessionOptions(region_size=backend.image_size, upsampling=mode))
            s.set_volume(image)
            s.new_object()
            mask, done, curve, later = None, [], [], []
            for n in range(n_clicks):
                c = next_click(label, mask, image.spacing[::-1], done)
                if c is None:
                    break
                done.append(c.ijk)
                u = s.add_click(ijk=c.ijk, positive=c.positive)
                if n > 0:
                    later.append(u.timings["total_s"])
                mask = s.mask()
                curve.append(round(dice(mask, label), 4))
            row[mode] = {"dice_per_click": curve, "dice_final": curve[-1] if curve else None,
                         "later_click_mean_ms": round(1000 * statistics.mean(later), 1) if later else None}
        row["not_lower"] = (row["guided"]["dice_final"] or 0) >= (row["trilinear"]["dice_final"] or 0)
        log(f"demo {case} / {name}: {row['trilinear']['dice_final']} -> {row['guided']['dice_final']}")
        rows.append(row)
    return rows


class _Stub:
    """Fixed logits: a ball of ``radius`` region voxels around the region centre, or everything positive."""

    name, image_size, low_res_size = "fixed-logits stub", 128, 32

    def __init__(self, radius=None):
        c = np.arange(32) * 4 + 1.5
        g = np.stack(np.meshgrid(c, c, c, indexing="ij"), -1)
        self.logits = (np.full((32,) * 3, 5.0, np.float32) if radius is None
                       else ((radius - np.linalg.norm(g - 64.0, axis=-1)) / 4.0).astype(np.float32))

    def encode(self, image):
        return None

    def decode(self, embedding, points, labels, mask_logits):
        return self.logits


def later_clicks(backend, volume, centre_ijk, mode: str, n: int) -> dict:
    s = Session(backend, SessionOptions(extend=False, upsampling=mode, region_size=backend.image_size))
    s.set_volume(volume)
    s.new_object()
    rng = np.random.default_rng(0)
    centre = volume.ijk_to_ras_points(np.asarray(centre_ijk, float))
    s.add_click(ras=centre)
    total, engine = [], []
    for q in range(n):
        p = centre + rng.uniform(-40.0, 40.0, 3)
        t = time.perf_counter()
        u = s.add_click(ras=p, positive=(q % 3 != 2))
        total.append(time.perf_counter() - t)
        engine.append(total[-1] - u.timings["decode_s"])
    return {"later_click_median_ms": round(1000 * statistics.median(total), 1),
            "later_click_p90_ms": round(1000 * sorted(total)[int(0.9 * (n - 1))], 1),
            "engine_share_median_ms": round(1000 * statistics.median(engine), 1)}


def timing(n: int, full_model: bool, log) -> dict:
    from SAM3DSegmentLib.data.phantoms import ct_body_phantom

    volume, masks = ct_body_phantom((512, 512, 300))
    kidney = masks["right_kidney"].array
    centre = tuple(int(v) for v in np.argwhere(kidney).mean(axis=0)[::-1])
    del masks, kidney
    backends = {"stub_ball_100mm": _Stub(33.0), "stub_all_positive_region": _Stub(None)}
    if full_model:
        import torch

        from SAM3DSegmentLib.inference.backends import LocalBackend
        from SAM3DSegmentLib.models import SamMed3DConfig, build_sam_med3d

        torch.set_num_threads(2)
        torch.manual_seed(0)
        backends["vit_b_ori_random_weights"] = LocalBackend(build_sam_med3d(SamMed3DConfig.vit_b_ori()),
                                                            name="vit_b_ori (random weights)")
    out = {"volume": "phantoms.ct_body_phantom 512x512x300 int16, 0.8x0.8x1.5 mm", "clicks": n}
    for name, backend in backends.items():
        out[name] = {mode: later_clicks(backend, volume, centre, mode, n) for mode in MODES}
        log(f"timing {name}: {out[name]}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few structures only (a smoke run)")
    ap.add_argument("--clicks", type=int, default=5, help="demo-model clicks per structure (default 5)")
    ap.add_argument("--timing-clicks", type=int, default=20)
    ap.add_argument("--full-model", action="store_true", help="also time the full-size vit_b_ori (random weights)")
    ap.add_argument("--out", default=None,
                    help="also write the JSON here (default: benchmarks/results/guided_upsampling.json for a full run, "
                         "nothing with --quick or --skip)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: best_fit, demo_model, timing")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    if args.out is None and not (args.quick or skip):
        args.out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "guided_upsampling.json")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    result = {"benchmark": "bench_guided_upsampling",
              "machine": {"python": platform.python_version(), "numpy": np.__version__,
                          "cpu_count": os.cpu_count(), "load_avg_1m_at_start": os.getloadavg()[0],
                          "gpu": "none: CPU only, OpenBLAS 1 thread, torch 2 threads (demo model, --full-model)"},
              "args": vars(args),
              "goals": {"best_fit_dice_large_structures": 0.99, "best_fit_dice_5mm_shells": 0.97,
                        "demo_model_guided_not_lower": True, "later_click_ms": 60}}
    if "best_fit" not in skip:
        rows = best_fit(args.quick, log)
        result["best_fit"] = rows
        large = [r["guided"]["dice"] for r in rows if r["structure"] in LARGE]
        shells = [r["guided"]["dice"] for r in rows if r["case"].replace("_oblique", "") in SHELLS]
        result["best_fit_goals"] = {"large_min_dice_guided": min(large) if large else None,
                                    "shells_min_dice_guided": min(shells) if shells else None,
                                    "large_met": bool(large) and min(large) >= 0.99,
                                    "shells_met": bool(shells) and min(shells) >= 0.97}
    if "demo_model" not in skip:
        rows = demo_clicks(args.quick, args.clicks, log)
        result["demo_model"] = rows
        result["demo_model_goal_met"] = all(r["not_lower"] for r in rows)
    if "timing" not in skip:
        result["timing"] = timing(args.timing_clicks, args.full_model, log)
    result["load_avg_1m_at_end"] = os.getloadavg()[0]
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
