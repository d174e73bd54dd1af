"""``sam3d demo``: segment structures of the sample chest CT (shipped in slicerio) from scripted clicks.

For each reference segment the first click is a POSITIVE click at its deepest interior point (the voxel
farthest from the segment's border, in mm), then ``--corrections`` clicks each at the deepest point of
the larger error region (positive in a miss, negative in a leak) — the RITM / SAM-Med3D evaluation
policy of :mod:`SAM3DSegmentLib.clicker`. Writes into ``--out``:

* ``demo.seg.nrrd`` — the predicted masks (one segment per structure, on the CT grid; Slicer opens it);
* ``overlay.png`` — axial and coronal slices of the CT with predicted (coloured) and reference (white)
  contours (PIL only);
* ``demo.json`` — model, per-structure Dice after each click vs the reference segments, clicks, timings.

The default model is the small embedded ``demo`` model (``SAM3DSegmentLib/resources/demo_model.pt``);
``--checkpoint PATH`` runs any other checkpoint (e.g. the published SAM-Med3D turbo).
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from .atomic import write_json
from .cli import CliError, UsageError, _join_click_values, _parse_clamp, _Parser, fail, load_backend

#: The segments of slicerio's sample chest CT segmentation.
ALL_STRUCTURES = ("ribs", "cervical vertebral column", "thoracic vertebral column", "lumbar vertebral column",
                  "right lung", "left lung", "tissue")
COLORS = [(230, 75, 60), (60, 160, 230), (250, 200, 40), (120, 220, 90), (200, 100, 230), (250, 140, 40),
          (40, 220, 210), (240, 90, 170)]


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sam3d demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="checkpoint file (default: the embedded demo model)")
    p.add_argument("--model", default=None, help="registered model name instead of --checkpoint (default: demo)")
    p.add_argument("--out", default="sam3d_demo", help="output folder (created if missing; default ./sam3d_demo)")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--structures", default="all",
                   help="comma-separated reference segment names, or 'all' (default: every segment of the "
                        "sample segmentation: " + ", ".join(ALL_STRUCTURES) + ")")
    p.add_argument("--corrections", type=int, default=2, help="correction clicks per structure (default 2)")
    p.add_argument("--prompt-mode", choices=("newest", "all"), default="newest")
    p.add_argument("--spacing", type=float, default=1.5, help="model input spacing in mm (default 1.5)")
    p.add_argument("--max-regions", type=int, default=8)
    p.add_argument("--no-extend", action="store_true", help="no region extension (one model region per object)")
    p.add_argument("--clamp-hu", default="-1000,1000", metavar="LO,HI|none",
                   help="CT clamp before normalising, as in training (default -1000,1000; 'none' disables)")
    p.add_argument("--quiet", "-q", action="store_true")
    return p


# ------------------------------------------------------------------------------------------ overlay
def _canonical(array_kji: np.ndarray, ijk_to_ras: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Array reoriented to (R, A, S) axis order (closest canonical axes) and its spacing."""
    from .geometry import closest_canonical_axes

    spacing = np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
    perm, signs = closest_canonical_axes(ijk_to_ras[:3, :3] / spacing[None, :])
    arr = np.asarray(array_kji).transpose(2, 1, 0)        # (i, j, k)
    arr = arr.transpose(perm)                              # RAS axis r <- volume axis perm[r]
    for r in range(3):
        if signs[r] < 0:
            arr = np.flip(arr, axis=r)
    return arr, spacing[perm]


def _contour(mask2d: np.ndarray) -> np.ndarray:
    m = mask2d.astype(bool)
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return m & ~inner


def overlay_png(path: str, volume, preds: Dict[str, np.ndarray], refs: Dict[str, np.ndarray],
                window: Tuple[float, float] = (-1000.0, 400.0)) -> str:
    """Axial + coronal CT slices through the structures' centre with contours: prediction coloured,
    reference white. Radiological convention (patient right on the image left)."""
    from PIL import Image

    from .io import atomic_write

    ct, sp = _canonical(volume.array, volume.ijk_to_ras)
    canon = {n: _canonical(m, volume.ijk_to_ras)[0] for n, m in preds.items()}
    canon_ref = {n: _canonical(m, volume.ijk_to_ras)[0] for n, m in refs.items()}
    union = np.zeros(ct.shape, bool)
    for m in canon_ref.values():
        union |= m.astype(bool)
    if union.any():
        centre = np.round(np.argwhere(union).mean(axis=0)).astype(int)
    else:
        centre = np.asarray(ct.shape) // 2
    lo, hi = window

    def gray(img2d):
        g = np.clip((img2d.astype(np.float32) - lo) / (hi - lo), 0, 1) * 255
        return np.repeat(g.astype(np.uint8)[..., None], 3, axis=2)

    def panel(axis_fixed: int):
        # axial: fix S -> image rows = A (top anterior), cols = R (left = patient right)
        # coronal: fix A -> rows = S (top superior), cols = R
        sl = [slice(None)] * 3
        sl[axis_fixed] = int(np.clip(centre[axis_fixed], 0, ct.shape[axis_fixed] - 1))
        sl = tuple(sl)
        rgb = gray(ct[sl])

        def orient(a):  # axes (R, other[, rgb]) -> rows: other descending, cols: R descending
            return np.flip(np.flip(np.swapaxes(a, 0, 1), axis=0), axis=1)

        rgb = np.ascontiguousarray(orient(rgb))
        for n, name in enumerate(canon):
            color = COLORS[n % len(COLORS)]
            if name in canon_ref:
                rgb[_contour(orient(canon_ref[name][sl]))] = (255, 255, 255)
            rgb[_contour(orient(canon[name][sl]))] = color
        other = 1 if axis_fixed == 2 else 2
        img = Image.fromarray(rgb)
        extent = np.asarray(ct.shape) * sp
        mm_per_px = max(1.0, float(extent.max()) / 600.0)     # ~1 mm pixels, at most ~600 px per panel
        w = max(1, int(round(rgb.shape[1] * sp[0] / mm_per_px)))
        h = max(1, int(round(rgb.shape[0] * sp[other] / mm_per_px)))
        return img.resize((w, h), Image.NEAREST)

    a, c = panel(2), panel(1)
    canvas = Image.new("RGB", (a.width + c.width + 10, max(a.height, c.height) + 14 * (len(canon) + 1)),
                       (0, 0, 0))
    canvas.paste(a, (0, 0))
    canvas.paste(c, (a.width + 10, 0))
    try:
        from PIL import ImageDraw

        draw = ImageDraw.Draw(canvas)
        y = max(a.height, c.height) + 2
        for n, name in enumerate(canon):
            draw.text((4, y + 14 * n), f"{name} (prediction; white = reference)", fill=COLORS[n % len(COLORS)])
    except Exception:  # noqa: BLE001 - the legend is optional (fonts)
        pass

    def write(tmp: str) -> None:
        canvas.save(tmp, format="PNG")

    return atomic_write(path, write)


# ------------------------------------------------------------------------------------------ demo run
def run_demo(backend, info: dict, out_dir: str, structures: Sequence[str], corrections: int = 2,
             prompt_mode: str = "newest", spacing_mm: float = 1.5, max_regions: int = 8,
             log=print, volume=None, references: Optional[Dict[str, object]] = None,
             clamp_hu: Optional[Tuple[float, float]] = (-1000.0, 1000.0), extend: bool = True) -> dict:
    """Segment ``structures`` of the chest CT (or of ``volume`` with ``references``); write the outputs."""
    from .clicker import next_click
    from .io import write_segmentation
    from .metrics import dice
    from .session import Session, SessionOptions

    if volume is None:
        from .sample_data import chest_ct, chest_segments

        volume = chest_ct()
        references = chest_segments(volume)
    if list(structures) == ["all"]:
        structures = list(references)
    missing = [s for s in structures if s not in references]
    if missing:
        raise UsageError(f"unknown structure(s) {missing}; the sample segmentation has {sorted(references)}")
    session = Session(backend, SessionOptions(prompt_mode=prompt_mode, region_size=backend.image_size,
                                              spacing_mm=spacing_mm, max_regions=max_regions,
                                              clamp_hu=clamp_hu, extend=extend))
    session.set_volume(volume)
    spacing_kji = volume.spacing[::-1]
    results = {}
    preds: Dict[str, np.ndarray] = {}
    for name in structures:
        gt = np.asarray(references[name].array) > 0
        oid = session.new_object(name)
        steps = []
        for step in range(1 + int(corrections)):
            click = next_click(gt, None if step == 0 else session.mask(oid), spacing_kji,
                               avoid_ijk=[st["ijk"] for st in steps])   # never the same voxel twice
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
    png_path = overlay_png(os.path.join(out_dir, "overlay.png"), volume, preds,
                           {n: np.asarray(references[n].array) > 0 for n in preds})
    first = [r["clicks"][0]["wall_s"] for r in results.values() if r["clicks"]]
    later = [c["wall_s"] for r in results.values() for c in r["clicks"][1:]]
    report = {"model": info, "image": volume.meta.get("name", volume.meta.get("source")),
              "protocol": f"first click at the deepest point of the reference segment, then {corrections} "
                          "click(s) at the deepest point of the larger error region; Dice on the full CT grid",
              "prompt_mode": prompt_mode, "spacing_mm": spacing_mm, "clamp_hu": clamp_hu, "extend": extend,
              "max_regions": max_regions,
              "structures": results,
              "mean_dice": float(np.mean([r["dice"] for r in results.values()])) if results else 0.0,
              "timings": {"first_click_median_s": float(np.median(first)) if first else None,
                          "later_click_median_s": float(np.median(later)) if later else None},
              "cache": session.cache.stats(),
              "outputs": {"segmentation": seg_path, "overlay": png_path}}
    json_path = os.path.join(out_dir, "demo.json")
    write_json(json_path, report)
    report["outputs"]["report"] = os.path.abspath(json_path)
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    prog = "sam3d demo"
    try:
        args = build_parser().parse_args(_join_click_values(list(argv or []), ("--clamp-hu",)))
        structures = [s.strip() for s in args.structures.split(",") if s.strip()]
        if not structures:
            raise UsageError("--structures is empty; name at least one reference segment")
        if args.corrections < 0:
            raise UsageError("--corrections must be >= 0")
        clamp = None if args.clamp_hu.strip().lower() in ("none", "off", "") else _parse_clamp(args.clamp_hu)
        out = os.path.abspath(args.out)
        if os.path.exists(out) and not os.path.isdir(out):
            raise CliError(f"--out {out} is a file; give a folder")
        parent = os.path.dirname(out)
        if not os.path.isdir(parent):
            raise CliError(f"--out {out}: its parent folder {parent} does not exist; create it first")
        if not args.checkpoint and not args.model:
            from .weights import resolve_checkpoint

            try:
                resolve_checkpoint("demo")
            except Exception as err:  # noqa: BLE001
                raise CliError("the embedded demo model is not in this installation yet "
                               "(SAM3DSegmentLib/resources/demo_model.pt); run the demo with "
                               "--checkpoint PATH (any SAM-Med3D or sam3d-trained checkpoint)") from err
        log = (lambda *a, **k: None) if args.quiet else print
        backend, info = load_backend(args.model or ("demo" if not args.checkpoint else None), args.checkpoint,
                                     args.device, args.threads)
        log(f"model: {backend.name}; checkpoint: {info['checkpoint']}")
        report = run_demo(backend, info, out, structures, args.corrections, args.prompt_mode, args.spacing,
                          args.max_regions, log=log, clamp_hu=clamp, extend=not args.no_extend)
        for name, r in report["structures"].items():
            log(f"{name:28s} Dice {r['dice']:.3f} after {len(r['clicks'])} click(s)")
        log(f"mean Dice {report['mean_dice']:.3f}; wrote {', '.join(report['outputs'].values())}")
        return 0
    except UsageError as err:
        return fail(prog, err, 2)
    except CliError as err:
        return fail(prog, err, 1)
    except (ValueError, OSError, RuntimeError) as err:
        return fail(prog, err, 1)
