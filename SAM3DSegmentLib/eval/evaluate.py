"""``sam3d evaluate``: accuracy of a checkpoint / of the interactive engine under simulated clicks.

:func:`run_evaluation` runs the protocols of :mod:`.protocols` (``engine``: the interactive engine end to
end on the full volume; ``legacy``: comparable with SAM-Med3D's published tables; ``reference``: SAM-Med3D's
inference code, ``validate_paired_img_gt``, reproduced) and :mod:`.points_protocol` (``3dsam``: the
3DSAM-adapter's own) over the cases of
:mod:`.cases` and writes what :mod:`.report` writes into ``--out`` (``per_case.csv``, ``summary.json``,
``dice_vs_clicks.png``), re-written after every case so an interrupted run keeps what it finished.
See docs/evaluation.md.
"""
from __future__ import annotations

import os
import time
from typing import Any, Dict, Iterable, List

import numpy as np

from .cases import Case, EvaluationError
from .points_protocol import evaluate_points
from .protocols import EvalConfig, Log, Row, evaluate_engine, evaluate_legacy, evaluate_reference
from .report import write_outputs

__all__ = ["run_evaluation"]


def run_evaluation(cases: Iterable[Case], backend, config: EvalConfig, out_dir: str,
                   log: Log = lambda m: None) -> Dict[str, Any]:
    """Run the chosen protocols over ``cases`` with ``backend``; write CSV/JSON/PNG into ``out_dir``
    (created if missing) after every case; return the summary dict."""
    os.makedirs(out_dir, exist_ok=True)
    rows: List[Row] = []
    t_start = time.perf_counter()
    per_protocol_s = {p: 0.0 for p in config.protocols}
    n_cases = 0
    summary: Dict[str, Any] = {}
    for case in cases:
        n_cases += 1
        log(f"case {n_cases}: {case.name} ({len(case.targets)} target(s), grid {list(case.image.shape_ijk)} "
            f"i,j,k, spacing {np.round(case.image.spacing, 3).tolist()} mm)")
        for protocol in config.protocols:
            t0 = time.perf_counter()
            fn = {"engine": evaluate_engine, "legacy": evaluate_legacy, "reference": evaluate_reference,
                  "3dsam": evaluate_points}[protocol]
            rows.extend(fn(backend, case, config, log))
            per_protocol_s[protocol] += time.perf_counter() - t0
        timing = {"total_s": time.perf_counter() - t_start, "per_protocol_s": dict(per_protocol_s),
                  "cases": n_cases}
        for p in config.protocols:
            clicks = [r["seconds"] for r in rows if r["protocol"] == p and r["positive"] != ""]
            timing[f"{p}_mean_click_s"] = float(np.mean(clicks)) if clicks else None
            timing[f"{p}_encodes"] = int(sum(r["encodes"] for r in rows if r["protocol"] == p))
        summary = write_outputs(out_dir, rows, config, timing, plot=False)
    if n_cases == 0:
        raise EvaluationError("no cases to evaluate")
    summary = write_outputs(out_dir, rows, config, summary.get("timing", {}), plot=True)
    return summary


# ------------------------------------------------------------------------------------------ CLI
