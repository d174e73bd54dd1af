"""What ``sam3d evaluate --protocol segfm`` writes: ``per_case.csv`` (one row per case, the challenge's figures),
``per_class.csv`` (one row per case, class and step: the click and that class's scores), ``summary.json``
(means, per-step means, settings, the published reference figures) and ``dice_vs_clicks.png`` (mean Dice and
NSD against the click number). Every file is written atomically; see docs/evaluation.md for the columns.
"""
from __future__ import annotations

import csv
import io as _io
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..core.atomic import write_json, write_text
from .metrics import SEGFM_NSD_DICE_GATE
from .segfm import TIME_BUDGET_S_PER_CLASS, CaseResult, SegFMConfig
from .segfm_clicks import PAD_FRACTION

__all__ = ["SEGFM_LABEL", "BOX_USE", "REFERENCE", "CSV_NAME", "CLASS_CSV_NAME", "JSON_NAME", "PNG_NAME",
           "case_row", "summarize", "write_outputs"]

SEGFM_LABEL = ("segfm: CVPR 2025 interactive 3D segmentation challenge protocol; optional box step, then "
               "5 clicks per class at the deepest voxel of the largest 26-connected error component; "
               "Dice / NSD (2 mm, only when Dice > 0.2) per step, DSC_AUC / NSD_AUC over the click steps")
BOX_USE = ("our models take no box prompt: the box places the model's first region, as one include click at "
           "the centre of the box's rectangle on slice z_mid; the box is not used otherwise")
#: Published figures for context (docs/evaluation.md): not comparable with a run of this command.
REFERENCE = {"entry": "a SAM-Med3D-based entry of the CVPR 2025 challenge, CT cases",
             "DSC_AUC": 3.35, "NSD_AUC": 3.47, "DSC_Final": 0.846, "NSD_Final": 0.880,
             "note": "the challenge's own CT test cases and a model fine-tuned on the challenge data; "
                     "different cases and model, so not comparable with this run"}

CSV_NAME = "per_case.csv"
CLASS_CSV_NAME = "per_class.csv"
JSON_NAME = "summary.json"
PNG_NAME = "dice_vs_clicks.png"
CLASS_FIELDS = ["case", "class", "name", "step", "positive", "index_zyx", "dice", "nsd", "seconds"]


def _case_fields(clicks: int) -> List[str]:
    n = range(1, clicks + 1)
    return (["case", "classes", "box_step", "DSC_AUC", "NSD_AUC", "DSC_Final", "NSD_Final", "DSC_box", "NSD_box"]
            + [f"DSC_{i}" for i in n] + [f"NSD_{i}" for i in n] + ["RunningTime_box"]
            + [f"RunningTime_{i}" for i in n]
            + ["TotalRunningTime", "time_budget_s", "over_time_budget", "overlap_voxels_final"])


def case_row(result: CaseResult) -> Dict[str, Any]:
    """The per-case CSV row of one result (box columns empty when the case had no box step)."""
    by_step = {s["step"]: s for s in result.steps}
    box = by_step.get("box")
    budget = TIME_BUDGET_S_PER_CLASS * len(result.classes)
    row: Dict[str, Any] = {
        "case": result.name, "classes": " ".join(str(c) for c in result.classes), "box_step": int(result.box_step),
        "DSC_AUC": result.dsc_auc, "NSD_AUC": result.nsd_auc, "DSC_Final": result.dsc_final,
        "NSD_Final": result.nsd_final, "DSC_box": "" if box is None else box["dice"],
        "NSD_box": "" if box is None else box["nsd"], "RunningTime_box": "" if box is None else box["seconds"],
        "TotalRunningTime": result.total_seconds, "time_budget_s": budget,
        "over_time_budget": int(result.total_seconds > budget),
        "overlap_voxels_final": result.steps[-1]["overlap_voxels"]}
    for s in result.steps:
        if s["step"] != "box":
            row[f"DSC_{s['step']}"], row[f"NSD_{s['step']}"] = s["dice"], s["nsd"]
            row[f"RunningTime_{s['step']}"] = s["seconds"]
    return row


def _mean(values: Sequence[float]) -> Optional[float]:
    return float(np.mean(values)) if len(values) else None


def summarize(results: List[CaseResult], config: SegFMConfig, skipped: Sequence[Dict[str, str]] = (),
              timing: Optional[dict] = None) -> Dict[str, Any]:
    """The summary JSON object (see docs/evaluation.md)."""
    from .. import __version__

    steps: List[Any] = (["box"] if any(r.box_step for r in results) else []) + list(range(1, config.clicks + 1))
    per_step = []
    for step in steps:
        hits = [s for r in results for s in r.steps if s["step"] == step]
        per_step.append({"step": step, "cases": len(hits), "dice_mean": _mean([s["dice"] for s in hits]),
                         "nsd_mean": _mean([s["nsd"] for s in hits]),
                         "seconds_mean": _mean([s["seconds"] for s in hits])})
    budget = [r.total_seconds > TIME_BUDGET_S_PER_CLASS * len(r.classes) for r in results]
    return {
        "tool": "sam3d evaluate", "protocol": "segfm", "version": __version__,
        "written_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "label": SEGFM_LABEL, "model": config.model, "data": config.data,
        "settings": {"clicks": int(config.clicks), "box": config.box, "box_use": BOX_USE,
                     "nsd_tolerance_mm": float(config.nsd_tolerance_mm), "nsd_dice_gate": SEGFM_NSD_DICE_GATE,
                     "click_seed": int(config.seed), "click_distance": "voxels (no spacing), as the challenge",
                     "error_connectivity": 26, "edt_zero_pad_fraction": PAD_FRACTION,
                     "overlap": "where two classes' masks overlap, the higher label gets the voxel",
                     "time_budget_s_per_class": TIME_BUDGET_S_PER_CLASS, "prompt_mode": config.prompt_mode,
                     "model_grid_spacing_mm": float(config.spacing_mm), "clamp_hu": config.clamp_hu,
                     "extend": bool(config.extend), "max_regions": int(config.max_regions)},
        "cases": len(results), "case_names": [r.name for r in results], "skipped": list(skipped),
        "means": {"DSC_AUC": _mean([r.dsc_auc for r in results]), "NSD_AUC": _mean([r.nsd_auc for r in results]),
                  "DSC_Final": _mean([r.dsc_final for r in results]),
                  "NSD_Final": _mean([r.nsd_final for r in results]),
                  "TotalRunningTime": _mean([r.total_seconds for r in results]),
                  "classes_per_case": _mean([len(r.classes) for r in results])},
        "auc_max": float(config.clicks - 1), "cases_over_time_budget": int(sum(budget)),
        "per_step": per_step, "reference": REFERENCE, "timing": timing or {},
    }


def _csv_text(rows: List[Dict[str, Any]], fields: List[str]) -> str:
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{r[k]:.6g}" if isinstance(r.get(k), float) else r.get(k, "")) for k in fields})
    return buf.getvalue()




def _plot(summary: Dict[str, Any], path: str) -> str:
    from .report import plot_dice_vs_clicks

    clicks = [p for p in summary["per_step"] if p["step"] != "box"]
    nan = float("nan")
    series = {"Dice (mean over cases)": [nan if p["dice_mean"] is None else p["dice_mean"] for p in clicks],
              "NSD 2 mm (mean over cases)": [nan if p["nsd_mean"] is None else p["nsd_mean"] for p in clicks]}
    model = summary.get("model", {}).get("name") or "model"
    title = (f"SegFM protocol - {model} ({summary['data'].get('name', '')}): "
             f"DSC_AUC {summary['means']['DSC_AUC'] or 0:.2f}, NSD_AUC {summary['means']['NSD_AUC'] or 0:.2f}")
    return plot_dice_vs_clicks(series, path, title, emphasis=["Dice (mean over cases)"], y_label="score")


def write_outputs(out_dir: str, results: List[CaseResult], config: SegFMConfig,
                  skipped: Sequence[Dict[str, str]] = (), timing: Optional[dict] = None,
                  plot: bool = True) -> Dict[str, Any]:
    """Write the CSVs and ``summary.json`` (and the plot, with ``plot``) into ``out_dir``; returns the summary."""
    summary = summarize(results, config, skipped, timing)
    write_text(os.path.join(out_dir, CSV_NAME),
                _csv_text([case_row(r) for r in results], _case_fields(int(config.clicks))))
    write_text(os.path.join(out_dir, CLASS_CSV_NAME),
                _csv_text([c for r in results for c in r.clicks], CLASS_FIELDS))
    write_json(os.path.join(out_dir, JSON_NAME), summary)
    if plot and results:
        _plot(summary, os.path.join(out_dir, PNG_NAME))
    return summary
