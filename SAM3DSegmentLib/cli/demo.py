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

import argparse
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..core.atomic import write_json
from . import CliError, UsageError, _join_click_values, _parse_clamp, _Parser, fail, load_backend

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
    from ..core.geometry import closest_canonical_axes

    spacing = np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
    perm, signs = closest_canonical_axes(ijk_to_ras[:3, :3] / spacing[None, :])
    arr = np.asarray(array_kji).transpose(2, 1, 0)        # (i, j, k)
    arr = arr.transpose(perm)                              # RAS axis r <- volume axis perm[r]
    for r in range(3):
        if signs[r] < 0:
            arr = np.flip(arr, axis=r)
    return arr, spacing[perm]


def _canonical_frame(volume) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(perm, signs, spacing, first)``: how :func:`_canonical` reorders the volume, the spacing per R/A/S
    axis and the RAS position (mm) of canonical voxel (0, 0, 0) along each axis (exact for volumes whose
    axes are aligned with RAS; for oblique ones the panels' mm labels are the closest-axis approximation)."""
    from ..core.geometry import closest_canonical_axes

    m = np.asarray(volume.ijk_to_ras, dtype=np.float64)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    perm, signs = closest_canonical_axes(m[:3, :3] / spacing[None, :])
    n = np.asarray(volume.shape_ijk)
    corner = np.array([0.0 if signs[r] > 0 else n[perm[r]] - 1.0 for r in range(3)])
    ijk0 = np.zeros(3)
    ijk0[list(perm)] = corner
    first = (m[:3, :3] @ ijk0 + m[:3, 3])
    return np.asarray(perm), np.asarray(signs), spacing[list(perm)], first


def _to_canonical_index(ijk: Sequence[int], volume) -> np.ndarray:
    perm, signs, _, _ = _canonical_frame(volume)
    n = np.asarray(volume.shape_ijk)
    return np.array([ijk[perm[r]] if signs[r] > 0 else n[perm[r]] - 1 - ijk[perm[r]] for r in range(3)])


def overlay_figure(volume, preds: Dict[str, np.ndarray], refs: Dict[str, np.ndarray],
                   window: Tuple[float, float] = (-1000.0, 400.0), *, title: Sequence[str] = (),
                   scores: Optional[Dict[str, str]] = None, clicks: Optional[Dict[str, list]] = None,
                   colors: Optional[Dict[str, Tuple[int, int, int]]] = None):
    """A matplotlib Figure: per structure an axial and a coronal CT slice through its first click (else
    its reference centroid) with the REFERENCE outlined in the structure's colour (solid line), the
    PREDICTION filled in the same colour (translucent, dashed border), the clicks in that slice (+ / x),
    patient R/L (radiological convention: patient right on the image left), A/P, S/I and the slice
    position in mm. ``title`` lines go on top; ``scores[name]`` is the structure's caption (e.g. Dice)."""
    import textwrap

    from matplotlib.figure import Figure

    title = [w for line in title for w in (textwrap.wrap(line, 150, subsequent_indent="  ") or [""])]
    ct, _ = _canonical(volume.array, volume.ijk_to_ras)
    _, _, sp, first = _canonical_frame(volume)
    names = list(preds)
    colors = colors or {n: COLORS[k % len(COLORS)] for k, n in enumerate(names)}
    lo, hi = window
    coords = [first[r] + sp[r] * np.arange(ct.shape[r]) for r in range(3)]   # mm along R, A, S
    per_row = 2
    n_rows = max(1, -(-len(names) // per_row))
    head = 0.30 * (len(title) + 1)
    height = 4.3 * n_rows + head
    fig = Figure(figsize=(16.0, height), dpi=80)
    fig.text(0.01, 1.0 - 0.12 / height, "\n".join(title), va="top", ha="left", fontsize=12,
             family="monospace")
    top = 1.0 - head / height
    grid = fig.add_gridspec(n_rows, 2 * per_row, left=0.03, right=0.99, bottom=0.02, top=top - 0.035,
                            wspace=0.25, hspace=0.42)
    for idx, name in enumerate(names):
        col = np.asarray(colors[name], dtype=float) / 255.0
        pred = _canonical(preds[name], volume.ijk_to_ras)[0].astype(bool)
        ref = _canonical(refs[name], volume.ijk_to_ras)[0].astype(bool) if name in refs else None
        its_clicks = (clicks or {}).get(name) or []
        if its_clicks:
            centre = _to_canonical_index(its_clicks[0]["ijk"], volume)
        elif ref is not None and ref.any():
            centre = np.round(np.argwhere(ref).mean(axis=0)).astype(int)
        else:
            centre = np.asarray(ct.shape) // 2
        row, c0 = divmod(idx, per_row)
        for panel, fixed in enumerate((2, 1)):  # axial (fix S), coronal (fix A)
            ax = fig.add_subplot(grid[row, 2 * c0 + panel])
            other = 1 if fixed == 2 else 2
            t = int(np.clip(centre[fixed], 0, ct.shape[fixed] - 1))
            sl = [slice(None)] * 3
            sl[fixed] = t
            sl = tuple(sl)
            x, y = coords[0], coords[other]
            half = [sp[0] / 2, sp[other] / 2]
            ax.imshow(np.clip(ct[sl].T.astype(np.float32), lo, hi), cmap="gray", vmin=lo, vmax=hi,
                      origin="lower", interpolation="nearest",
                      extent=[x[0] - half[0], x[-1] + half[0], y[0] - half[1], y[-1] + half[1]])
            p2 = pred[sl].T.astype(np.float32)
            if p2.any():
                ax.contourf(x, y, p2, levels=[0.5, 1.5], colors=[col], alpha=0.35)
                ax.contour(x, y, p2, levels=[0.5], colors=[col], linewidths=1.0, linestyles="dashed")
            if ref is not None and ref[sl].any():
                ax.contour(x, y, ref[sl].T.astype(np.float32), levels=[0.5], colors=[col], linewidths=2.0)
            for n_click, c in enumerate(its_clicks, 1):
                ci = _to_canonical_index(c["ijk"], volume)
                if ci[fixed] != t:
                    continue
                ax.plot(coords[0][ci[0]], coords[other][ci[other]], marker="P" if c["positive"] else "X",
                        markersize=11, color="lime" if c["positive"] else "red", markeredgecolor="black")
                ax.annotate(str(n_click), (coords[0][ci[0]], coords[other][ci[other]]), xytext=(6, 6),
                            textcoords="offset points", color="white", fontsize=9, weight="bold")
            ax.set_xlim(x[-1] + half[0], x[0] - half[0])      # patient right on the image left
            ax.set_ylim(y[0] - half[1], y[-1] + half[1])
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_facecolor("black")
            box = dict(boxstyle="round,pad=0.15", fc="black", ec="none", alpha=0.7)
            for text, (u, v) in (("R", (0.02, 0.5)), ("L", (0.98, 0.5)),
                                 ("A" if fixed == 2 else "S", (0.5, 0.97)), ("P" if fixed == 2 else "I", (0.5, 0.03))):
                ax.text(u, v, text, transform=ax.transAxes, ha="center", va="center", color="yellow",
                        fontsize=11, weight="bold", bbox=box)
            axis_name = "S" if fixed == 2 else "A"
            ax.set_title(f"{'axial' if fixed == 2 else 'coronal'}, {axis_name} = {coords[fixed][t]:.0f} mm",
                         fontsize=10)
            if panel == 0:
                caption = (scores or {}).get(name, "")
                ax.text(0.0, 1.11, f"{name}\n{caption}" if caption else name, transform=ax.transAxes,
                        fontsize=11, weight="bold", color=col * 0.8, ha="left", va="bottom", linespacing=1.3)
    return fig


def overlay_png(path: str, volume, preds: Dict[str, np.ndarray], refs: Dict[str, np.ndarray],
                window: Tuple[float, float] = (-1000.0, 400.0), **figure_kwargs) -> str:
    """Write :func:`overlay_figure` as a PNG (atomically); returns the absolute path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from ..core.atomic import atomic_write

    fig = overlay_figure(volume, preds, refs, window, **figure_kwargs)
    FigureCanvasAgg(fig)

    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=80, facecolor="white")

    return atomic_write(path, write)


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
             prompt_mode: str = "newest", spacing_mm: float = 1.5, max_regions: int = 8,
             log=print, volume=None, references: Optional[Dict[str, object]] = None,
             clamp_hu: Optional[Tuple[float, float]] = (-1000.0, 1000.0), extend: bool = True,
             title: Sequence[str] = ()) -> dict:
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
              "prompt_mode": prompt_mode, "spacing_mm": spacing_mm, "clamp_hu": clamp_hu, "extend": extend,
              "max_regions": max_regions,
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
        model, banner = choose_model(args.checkpoint, args.model)
        log = (lambda *a, **k: None) if args.quiet else print
        backend, info = load_backend(model, args.checkpoint, args.device, args.threads)
        info["kind"] = "bundled demo model" if model == "demo" else (
            "published" if model in PUBLISHED_MODELS else "user")
        title = [f"model: {_model_line(model, info)}"] + banner
        for line in title:  # first line: which model ran
            log(line)
        report = run_demo(backend, info, out, structures, args.corrections, args.prompt_mode, args.spacing,
                          args.max_regions, log=log, clamp_hu=clamp, extend=not args.no_extend, title=title)
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
