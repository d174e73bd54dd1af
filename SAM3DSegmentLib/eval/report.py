"""What an evaluation writes: ``per_case.csv`` (one row per target and click), ``summary.json`` (per-click and
per-target statistics, the model and data, timings) and ``dice_vs_clicks.png`` (drawn with matplotlib).

Every file is written atomically (:func:`SAM3DSegmentLib.core.atomic.atomic_write`); see docs/evaluation.md
for the columns and keys.
"""
from __future__ import annotations

import csv
import io as _io
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..core.atomic import atomic_write, write_json, write_text
from .points_protocol import NSD_TOLERANCE_MM
from .protocols import CLICK_PROTOCOLS, PROTOCOL_LABELS, EvalConfig, Row, click_protocol_of

__all__ = ["CSV_NAME", "JSON_NAME", "PNG_NAME", "CSV_FIELDS", "summarize", "plot_dice_vs_clicks",
           "write_outputs"]

CSV_NAME = "per_case.csv"
JSON_NAME = "summary.json"
PNG_NAME = "dice_vs_clicks.png"
CSV_FIELDS = ["protocol", "case", "target", "click", "positive", "index", "dice", "nsd", "hd95", "seconds",
              "encodes", "regions"]


def _stats(rows: List[Row]) -> Dict[str, Any]:
    d = [r["dice"] for r in rows]
    s = [r["nsd"] for r in rows]
    h = [r["hd95"] for r in rows]
    return {"n": len(rows),
            "dice_mean": float(np.mean(d)) if d else None, "dice_median": float(np.median(d)) if d else None,
            "nsd_mean": float(np.mean(s)) if s else None, "nsd_median": float(np.median(s)) if s else None,
            # HD95 is inf when the prediction is empty; the median stays meaningful, the mean would not.
            "hd95_median_mm": (float(np.median(h)) if h and math.isfinite(float(np.median(h))) else None)}


def summarize(rows: List[Row], config: EvalConfig, timing: Optional[dict] = None) -> Dict[str, Any]:
    """The summary JSON object (see docs/evaluation.md)."""
    from .. import __version__

    out: Dict[str, Any] = {
        "tool": "sam3d evaluate", "version": __version__,
        "written_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": config.model, "data": config.data,
        "clicks": int(config.clicks), "prompt_mode": config.prompt_mode,
        "engine_upsampling": config.upsampling,
        "model_grid_spacing_mm": None if config.spacing_mm is None else float(config.spacing_mm),
        "clamp_hu": config.clamp_hu, "engine_honours_clicks": bool(config.honour_clicks),
        "nsd_tolerance_mm": float(config.nsd_tolerance_mm), "legacy_seed": int(config.seed),
        "reference_seed": int(config.reference_seed), "click_protocols": dict(CLICK_PROTOCOLS),
        "protocols": {}, "timing": timing or {},
    }
    for protocol in config.protocols:
        pr = [r for r in rows if r["protocol"] == protocol]
        pairs = list(dict.fromkeys((r["case"], r["target"]) for r in pr))
        targets = list(dict.fromkeys(t for _, t in pairs))
        entry: Dict[str, Any] = {
            "label": PROTOCOL_LABELS[protocol],
            "click_protocol": click_protocol_of(protocol, config),
            "cases": len({c for c, _ in pairs}), "case_targets": len(pairs),
            "per_click": [{"click": n, **_stats([r for r in pr if r["click"] == n])}
                          for n in range(1, config.clicks + 1)],
            "per_target": {t: [{"click": n, **_stats([r for r in pr if r["target"] == t and r["click"] == n])}
                               for n in range(1, config.clicks + 1)] for t in targets},
        }
        if protocol == "legacy":
            best = {}
            for c, t in pairs:
                best[(c, t)] = max(r["dice"] for r in pr if r["case"] == c and r["target"] == t)
            vals = list(best.values())
            entry["best_dice_mean"] = float(np.mean(vals)) if vals else None
            entry["best_dice_median"] = float(np.median(vals)) if vals else None
            entry["best_dice_per_target"] = {t: float(np.mean([v for (c, tt), v in best.items() if tt == t]))
                                             for t in targets}
            entry["note"] = ("Dice inside the crop; 'best_dice_*' is the number comparable with SAM-Med3D's "
                             "published tables (docs/reference/SAM_MED3D.md section 7), per_click is the crop "
                             "Dice after exactly N clicks")
        if protocol == "reference":
            entry["note"] = ("Dice on the full volume; after the last click the masks are what "
                             "validate_paired_img_gt computes with num_clicks = clicks, before it merges them "
                             "into one label map (per_click before that comes from the same run: the targets "
                             "of a case share one random stream)")
        if protocol == "3dsam":
            entry["nsd_tolerance_mm"] = NSD_TOLERANCE_MM
            entry["note"] = ("one pass per row: click n is the model's output for the first n points; Dice, NSD "
                             "and HD95 inside the 1 mm crop")
        out["protocols"][protocol] = entry
    return out


# ----------------------------------------------------------------------------------------- plot
def plot_dice_vs_clicks(series: Dict[str, Sequence[float]], path: str, title: str,
                        emphasis: Sequence[str] = (), dashed: Sequence[str] = (),
                        y_label: str = "Dice", x_label: str = "clicks", dotted: Sequence[str] = ()) -> str:
    """Draw Dice (0..1) against click number 1..N with matplotlib; one line per series.

    ``series``: ``{legend text: [value after click 1, 2, ...]}`` (NaN: no value); names in ``emphasis`` are
    drawn black and thick (the mean), names in ``dashed`` grey and dashed, names in ``dotted`` black and
    dotted (another protocol's mean), the others in the ``tab10`` colours but its grey in turn. Written atomically to ``path`` (PNG).
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(9.6, 5.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    palette = [c for n, c in enumerate(colormaps["tab10"].colors) if n != 7]  # grey: the dashed line's
    n = max([len(v) for v in series.values()] + [1])
    k = 0
    for name, values in series.items():
        x = np.arange(1, len(values) + 1)
        y = np.asarray(values, dtype=np.float64)
        if name in emphasis:
            style = dict(color="black", linewidth=4, marker="o", markersize=6, zorder=2)
        elif name in dashed:
            style = dict(color="dimgrey", linewidth=2, linestyle="--", marker="o", markersize=4, zorder=3)
        elif name in dotted:
            style = dict(color="black", linewidth=2.5, linestyle=":", marker="s", markersize=5, zorder=3)
        else:
            style = dict(color=palette[k % len(palette)], linewidth=2, marker="o", markersize=4, zorder=3)
            k += 1
        label = name if len(name) <= 34 else name[:33] + "…"
        ax.plot(x, y, label=label, **style)
    ax.set_xlim(0.5, n + 0.5)
    ax.set_ylim(0.0, 1.0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=12))
    ax.grid(True, color="0.88")
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small", frameon=False)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def _plot_from_summary(summary: Dict[str, Any], path: str) -> Optional[str]:
    series: Dict[str, List[float]] = {}
    emphasis, dashed, dotted = [], [], []
    engine = summary["protocols"].get("engine")
    crop_name = "legacy" if "legacy" in summary["protocols"] else "3dsam"   # the two crop-Dice protocols
    legacy = summary["protocols"].get(crop_name)
    reference = summary["protocols"].get("reference")
    main_p = engine or reference or legacy
    if main_p is None:
        return None
    # The mean first in the legend; plot_dice_vs_clicks draws the thinner per-target lines over it.
    mean_name = "mean (full volume)" if main_p is not legacy else f"mean ({crop_name} crop Dice)"
    series[mean_name] = [p["dice_mean"] if p["dice_mean"] is not None else float("nan")
                         for p in main_p["per_click"]]
    emphasis.append(mean_name)
    for t, per in main_p["per_target"].items():
        series[t] = [p["dice_mean"] if p["dice_mean"] is not None else float("nan") for p in per]
    if reference and main_p is not reference:
        name = "reference mean (full volume)"
        series[name] = [p["dice_mean"] if p["dice_mean"] is not None else float("nan")
                        for p in reference["per_click"]]
        dotted.append(name)
    if legacy and main_p is not legacy:
        name = f"{crop_name} mean (crop Dice)"
        series[name] = [p["dice_mean"] if p["dice_mean"] is not None else float("nan") for p in legacy["per_click"]]
        dashed.append(name)
    model = summary.get("model", {}).get("name") or "model"
    which = ("engine, full-volume Dice" if main_p is engine else
             "reference, full-volume Dice" if main_p is reference else f"{crop_name} crop Dice")
    title = f"Dice vs clicks - {model} ({which}, {summary['data'].get('name', '')})"
    return plot_dice_vs_clicks(series, path, title, emphasis=emphasis, dashed=dashed, dotted=dotted)


# ------------------------------------------------------------------------------------- writing

def _csv_text(rows: List[Row]) -> str:
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in CSV_FIELDS})
    return buf.getvalue()



def write_outputs(out_dir: str, rows: List[Row], config: EvalConfig, timing: dict,
                  plot: bool = True) -> Dict[str, Any]:
    """Write ``per_case.csv`` and ``summary.json`` (and the plot, with ``plot``) into ``out_dir``; returns the
    summary."""
    summary = summarize(rows, config, timing)
    write_text(os.path.join(out_dir, CSV_NAME), _csv_text(rows))
    write_json(os.path.join(out_dir, JSON_NAME), summary)
    if plot and rows:
        try:
            _plot_from_summary(summary, os.path.join(out_dir, PNG_NAME))
        except ImportError:
            sys.stderr.write("sam3d evaluate: matplotlib is not installed; no plot written "
                             "(pip install matplotlib)\n")
    return summary
