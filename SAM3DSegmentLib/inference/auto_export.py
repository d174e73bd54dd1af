"""How automatic-mask instances are presented: segment names, colours and tags, the report rows, and the payload
(builtins + numpy arrays only) that crosses the engine process to the Slicer module.

The same names, colours and tags go into a ``.seg.nrrd`` written by ``sam3d auto`` and into the segments the
Slicer module's "Find all" adds, so a file and a scene agree. Tags (``Segment<N>_Tags`` in a ``.seg.nrrd``,
``vtkSegment.GetTag`` in Slicer) are prefixed :data:`TAG_PREFIX`.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np

__all__ = ["TAG_PREFIX", "PALETTE", "instance_name", "instance_color", "instance_tags", "payload", "csv_table"]

TAG_PREFIX = "SAM3D."
#: Distinct colours (0..1 RGB), used in turn.
PALETTE = ((0.90, 0.29, 0.24), (0.18, 0.55, 0.86), (0.30, 0.69, 0.31), (0.99, 0.67, 0.09), (0.61, 0.35, 0.71),
           (0.10, 0.74, 0.74), (0.91, 0.45, 0.67), (0.55, 0.76, 0.29), (0.96, 0.49, 0.16), (0.40, 0.45, 0.85),
           (0.80, 0.73, 0.27), (0.45, 0.30, 0.20))


def instance_name(n: int) -> str:
    """The name of the ``n``-th instance (1-based): ``auto 001``, ``auto 002``, ..."""
    return f"auto {int(n):03d}"


def instance_color(n: int) -> Tuple[float, float, float]:
    return PALETTE[(int(n) - 1) % len(PALETTE)]


def _num(v) -> str:
    return "n/a" if v is None else f"{float(v):.4g}"


def instance_tags(inst) -> Dict[str, str]:
    """Scores and provenance of an instance as segment tags (values without ':' or '|', as Slicer needs)."""
    p = inst.prompt
    how = p.kind if p.diameter_mm is None else f"{p.kind} {p.diameter_mm:g} mm"
    return {TAG_PREFIX + "PredictedIoU": _num(inst.predicted_iou), TAG_PREFIX + "Stability": _num(inst.stability),
            TAG_PREFIX + "Score": _num(inst.score), TAG_PREFIX + "VolumeMl": _num(inst.volume_ml),
            TAG_PREFIX + "CentroidRAS": " ".join(f"{v:.2f}" for v in inst.centroid_ras),
            TAG_PREFIX + "Prompt": f"{how} at " + " ".join(f"{v:.2f}" for v in p.ras),
            TAG_PREFIX + "CutByRegion": "1" if inst.cut_by_region else "0"}


def payload(result) -> dict:
    """``{"instances": [...], "report": {...}}``: per instance its name, colour, tags, report fields, ``box``
    ([[start, stop]] per k, j, i) and ``mask`` (uint8 on the box)."""
    report = result.report()
    out: List[dict] = []
    for n, (inst, row) in enumerate(zip(result.instances, report["instances"]), start=1):
        out.append(dict(row, name=instance_name(n), color=list(instance_color(n)), tags=instance_tags(inst),
                        box=[[int(s.start), int(s.stop)] for s in inst.mask.box],
                        mask=np.ascontiguousarray(inst.mask.mask, dtype=np.uint8)))
    return {"instances": out, "report": report}


CSV_COLUMNS = ("index", "name", "volume_ml", "voxels", "stability", "predicted_iou", "score", "centroid_r",
               "centroid_a", "centroid_s", "prompt_kind", "prompt_diameter_mm", "prompt_r", "prompt_a", "prompt_s",
               "region", "cut_by_region")


def csv_table(report: dict) -> Tuple[Tuple[str, ...], List[list]]:
    """``(header, rows)`` of a report's instances (one row each), for a CSV file."""
    rows = []
    for inst in report["instances"]:
        c, p = inst["centroid_ras"], inst["prompt"]
        rows.append([inst["index"], instance_name(inst["index"]), inst["volume_ml"], inst["voxels"],
                     inst["stability"], "" if inst["predicted_iou"] is None else inst["predicted_iou"], inst["score"],
                     *c, p["kind"], "" if p["diameter_mm"] is None else p["diameter_mm"], *p["ras"], inst["region"],
                     int(inst["cut_by_region"])])
    return CSV_COLUMNS, rows
