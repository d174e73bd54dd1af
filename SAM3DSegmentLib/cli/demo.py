"""``sam3d demo``: segment structures of the sample chest CT (shipped in slicerio) from scripted clicks.

For each reference segment the first click is a POSITIVE click at its deepest interior point (the voxel
farthest from the segment's border, in mm), then ``--corrections`` clicks each at the deepest point of
the larger error region (positive in a miss, negative in a leak) — the RITM / SAM-Med3D evaluation
policy of :mod:`SAM3DSegmentLib.eval.clicker`. Writes into ``--out``:

* ``demo.seg.nrrd`` — the predicted masks (one segment per structure, on the CT grid; Slicer opens it);
* ``overlay.png`` — per structure an axial and a coronal CT slice through its first click with the
  reference outlined and the prediction filled in the structure's colour, its Dice, the slice position
  and the patient's R/L (matplotlib);
* ``demo.json`` — model, per-structure Dice after each click vs the reference segments, clicks, timings.

Model: ``--checkpoint PATH`` / ``--model NAME`` when given; else a published SAM-Med3D checkpoint when it
is already in the model cache (``sam3d download sam-med3d-turbo`` puts it there); else the small bundled
``demo`` model (``SAM3DSegmentLib/resources/demo_model.pt``), announced as such with the command that
gets the real one. The first printed line (and the picture's first line) names the model that ran.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..core.atomic import write_json
from . import options as O
from .options import CliError, UsageError
from .overlay import COLORS, overlay_figure, overlay_png  # noqa: F401 - overlay_figure: part of this command's API
from .runner import command_main

NAME = "demo"
HELP = "segment structures of the sample chest CT with scripted clicks (masks, overlay, timings, Dice)"
DESCRIPTION = __doc__.split("\n\n")[0]
#: The segments of slicerio's sample chest CT segmentation.
ALL_STRUCTURES = ("ribs", "cervical vertebral column", "thoracic vertebral column", "lumbar vertebral column",
                  "right lung", "left lung", "tissue")
#: What the demo writes into ``--out``.
OUTPUT_FILES = ("demo.seg.nrrd", "overlay.png", "demo.json")


def configure(p) -> None:
    O.add_model_options(p)
    p.add_argument("--out", default="sam3d_demo",
                   help="output folder (created if missing; default ./sam3d_demo)")
    O.add_device_options(p)
    p.add_argument("--structures", default="all",
                   help="comma-separated reference segment names, or 'all' (default: every segment of the "
                        "sample segmentation: " + ", ".join(ALL_STRUCTURES) + ")")
    p.add_argument("--corrections", type=O.non_negative_int, default=2, metavar="N",
                   help="correction clicks per structure (default 2)")
    O.add_engine_options(p)
    O.add_overwrite_option(p)
    O.add_quiet_option(p)


normalise_argv = O.join_option_values


# ------------------------------------------------------------------------------------------ model
#: Published checkpoints the demo prefers, best first, when they are already in the model cache.
PUBLISHED_MODELS = ("sam-med3d-turbo", "sam-med3d")
#: The command that fetches the real model (printed with the bundled model's banner).
GET_REAL_MODEL = "sam3d download sam-med3d-turbo"
DEMO_BANNER = (
    "THIS IS A SMALL OFFLINE DEMONSTRATION MODEL (2 M parameters, trained for 25 minutes on one chest CT "
    "and synthetic phantoms; see docs/demo_model.md), not SAM-Med3D: expect rough masks.",
    f"Get the real model (SAM-Med3D turbo, 402 MB) with:  {GET_REAL_MODEL}   "
    "- sam3d demo then uses it automatically.")


def choose_model(checkpoint: Optional[str], model: Optional[str]) -> Tuple[Optional[str], List[str]]:
    """``(model name for load_backend, banner lines)``.

    ``--checkpoint`` / ``--model`` win. Otherwise the first of :data:`PUBLISHED_MODELS` whose file is in
    the model cache (``sam3d download`` puts it there; nothing is downloaded here), else the bundled
    ``demo`` model with :data:`DEMO_BANNER`.
    """
    from ..weights import cached_path, resolve_checkpoint

    if checkpoint or model:
        return model, []
    for name in PUBLISHED_MODELS:
        if cached_path(name).is_file():
            return name, []
    try:
        resolve_checkpoint("demo")
    except Exception as err:  # noqa: BLE001
        raise CliError("no published model is in the cache and the bundled demo model is not in this "
                       "installation (SAM3DSegmentLib/resources/demo_model.pt); run the demo with "
                       f"--checkpoint PATH (any SAM-Med3D or sam3d-trained checkpoint), or `{GET_REAL_MODEL}`"
                       ) from err
    return "demo", list(DEMO_BANNER)


def _model_line(model: Optional[str], info: dict) -> str:
    if model == "demo":
        return "demo - the bundled demonstration model (SAM3DSegmentLib/resources/demo_model.pt)"
    if model in PUBLISHED_MODELS:
        return f"{model} - published SAM-Med3D checkpoint from the model cache ({info['checkpoint']})"
    return f"{info['model']} ({info['checkpoint']})"


# ------------------------------------------------------------------------------------------ demo run
def run_demo(backend, info: dict, out_dir: str, structures: Sequence[str], corrections: int = 2,
             prompt_mode: str = "newest-click", spacing_mm: Optional[float] = None, max_regions: int = 8,
             log=print, volume=None, references: Optional[Dict[str, object]] = None,
             clamp_hu: Optional[Tuple[float, float]] = None, extend: bool = True,
             title: Sequence[str] = (), honour_clicks: bool = True) -> dict:
    """Segment ``structures`` of the chest CT (or of ``volume`` with ``references``); write the outputs.

    ``title``: lines printed on top of the overlay picture (which model ran, ...)."""
    from ..eval.clicker import next_click
    from ..io.segmentations import write_segmentation
    from ..eval.metrics import dice
    from ..inference.session import Session, SessionOptions

    if volume is None:
        from ..data.sample_data import chest_ct, chest_segments

        volume = chest_ct()
        references = chest_segments(volume)
    if list(structures) == ["all"]:
        structures = list(references)
    missing = [s for s in structures if s not in references]
    if missing:
        raise UsageError(f"unknown structure(s) {missing}; the sample segmentation has {sorted(references)}")
    session = Session(backend, SessionOptions(prompt_mode=prompt_mode, region_size=backend.image_size,
                                              spacing_mm=spacing_mm, max_regions=max_regions,
                                              clamp_hu=clamp_hu, extend=extend, honour_clicks=honour_clicks))
    session.set_volume(volume)
    exclude_ok = getattr(backend, "supports_exclude", True)
    spacing_kji = volume.spacing[::-1]
    results = {}
    preds: Dict[str, np.ndarray] = {}
    for name in structures:
        gt = np.asarray(references[name].array) > 0
        oid = session.new_object(name)
        steps = []
        for step in range(1 + int(corrections)):
            pred = None if step == 0 else session.mask(oid)
            if pred is not None and not exclude_ok:
                pred = pred & gt   # a model without exclude clicks: correct the missed parts only
            click = next_click(gt, pred, spacing_kji, avoid_ijk=[st["ijk"] for st in steps])   # never twice
            if click is None:
                break
            t = time.perf_counter()
            u = session.add_click(ijk=click.ijk, positive=click.positive)
            wall = time.perf_counter() - t
            d = dice(session.mask(oid), gt)
            steps.append({"ijk": list(click.ijk), "positive": bool(click.positive), "dice": d,
                          "encoded_regions": u.encoded_regions, "wall_s": wall, "regions": u.regions,
                          "timings": u.timings})
            log(f"  {name}: click {step + 1} {'+' if click.positive else '-'} at ijk {tuple(click.ijk)} -> "
                f"Dice {d:.3f} ({wall * 1000:.0f} ms, {u.encoded_regions} encode(s))")
        preds[name] = session.mask(oid).copy()
        results[name] = {"dice": steps[-1]["dice"] if steps else 0.0, "clicks": steps,
                         "reference_voxels": int(gt.sum()), "predicted_voxels": int(preds[name].sum())}
    os.makedirs(out_dir, exist_ok=True)
    seg_path = write_segmentation(os.path.join(out_dir, "demo.seg.nrrd"),
                                  {n: volume.with_array(m) for n, m in preds.items()}, volume,
                                  colors={n: tuple(c / 255.0 for c in COLORS[k % len(COLORS)])
                                          for k, n in enumerate(preds)})
    mean_dice = float(np.mean([r["dice"] for r in results.values()])) if results else 0.0
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    scores = {n: f"Dice {r['dice']:.2f} after {len(r['clicks'])} click(s); "
                 f"{r['reference_voxels'] * voxel_ml:.0f} ml reference, {r['predicted_voxels'] * voxel_ml:.0f} ml "
                 "predicted" for n, r in results.items()}
    image_name = volume.meta.get("name", volume.meta.get("source", "image"))
    sp = ", ".join(f"{v:.2g}" for v in volume.spacing)
    lines = list(title) + [
        f"image: {image_name} ({sp} mm voxels); mean Dice {mean_dice:.2f} over {len(results)} structure(s), "
        f"first click at the deepest point of the reference, then up to {corrections} correction click(s)",
        "solid line = reference segment, filled = model prediction (same colour per structure); "
        "+ / x = include / exclude click; patient right on the image left"]
    png_path = overlay_png(os.path.join(out_dir, "overlay.png"), volume, preds,
                           {n: np.asarray(references[n].array) > 0 for n in preds}, title=lines,
                           scores=scores, clicks={n: r["clicks"] for n, r in results.items()},
                           colors={n: COLORS[k % len(COLORS)] for k, n in enumerate(preds)})
    first = [r["clicks"][0]["wall_s"] for r in results.values() if r["clicks"]]
    later = [c["wall_s"] for r in results.values() for c in r["clicks"][1:]]
    report = {"model": info, "image": volume.meta.get("name", volume.meta.get("source")),
              "protocol": f"first click at the deepest point of the reference segment, then {corrections} "
                          "click(s) at the deepest point of the larger error region; Dice on the full CT grid",
              "prompt_mode": session.options.prompt_mode, "spacing_mm": session.options.spacing_mm,
              "clamp_hu": clamp_hu, "extend": extend, "max_regions": max_regions,
              "structures": results,
              "mean_dice": mean_dice,
              "timings": {"first_click_median_s": float(np.median(first)) if first else None,
                          "later_click_median_s": float(np.median(later)) if later else None},
              "cache": session.cache.stats(),
              "outputs": {"segmentation": seg_path, "overlay": png_path}}
    json_path = os.path.join(out_dir, "demo.json")
    write_json(json_path, report)
    report["outputs"]["report"] = os.path.abspath(json_path)
    return report


def run(args) -> int:
    structures = [s.strip() for s in args.structures.split(",") if s.strip()]
    if not structures:
        raise UsageError("--structures is empty; name at least one reference segment")
    out = O.output_folder(args.out)
    O.refuse_existing("--out", [os.path.join(out, n) for n in OUTPUT_FILES], args.overwrite, folder=out)
    model, banner = choose_model(args.checkpoint, args.model)
    log = (lambda *a, **k: None) if args.quiet else print
    from ..inference.backends import load_backend

    backend, info = load_backend(model, args.checkpoint, args.device, args.threads, args.dtype)
    info["kind"] = "bundled demo model" if model == "demo" else (
        "published" if model in PUBLISHED_MODELS else "user")
    title = [f"model: {_model_line(model, info)}"] + banner
    for line in title:  # first line: which model ran
        log(line)
    O.apply_model_settings(backend, args, log)
    report = run_demo(backend, info, out, structures, args.corrections, args.prompt_mode, args.spacing,
                      args.max_regions, log=log, clamp_hu=args.clamp_hu, extend=not args.no_extend, title=title,
                      honour_clicks=args.honour_clicks)
    for name, r in report["structures"].items():
        log(f"{name:28s} Dice {r['dice']:.3f} after {len(r['clicks'])} click(s)")
    log(f"mean Dice {report['mean_dice']:.3f}; wrote {', '.join(report['outputs'].values())}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``sam3d demo`` (``argv`` without the sub-command): the same parser, messages and exit statuses."""
    return command_main(sys.modules[__name__], argv)
