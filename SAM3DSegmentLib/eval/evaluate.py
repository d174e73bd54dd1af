"""``sam3d evaluate``: accuracy of a checkpoint / of the interactive engine under simulated clicks.

:func:`run_evaluation` runs the protocols of :mod:`.protocols` (``engine``: the interactive engine end to
end on the full volume; ``legacy``: comparable with SAM-Med3D's published tables) over the cases of
:mod:`.cases` and writes what :mod:`.report` writes into ``--out`` (``per_case.csv``, ``summary.json``,
``dice_vs_clicks.png``), re-written after every case so an interrupted run keeps what it finished.
See docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .cases import Case, EvaluationError, discover_dataset, load_case, sample_cases
from .cases import filter_targets as _filter_targets
from .protocols import PROTOCOLS, EvalConfig, Log, Row, evaluate_engine, evaluate_legacy
from .report import CSV_NAME, JSON_NAME, PNG_NAME, write_outputs

__all__ = ["run_evaluation", "build_parser", "main"]


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
            fn = evaluate_engine if protocol == "engine" else evaluate_legacy
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
def build_parser(prog: str = "sam3d evaluate") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Evaluate a SAM-Med3D-family checkpoint and the interactive engine with simulated clicks. "
                    "Writes per_case.csv, summary.json and dice_vs_clicks.png into --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="DIR", help="nnU-Net raw dataset folder (imagesTr/ + labelsTr/ "
                     "[+ dataset.json]); binary or multi-label label maps")
    src.add_argument("--sample", choices=["chest"], help="bundled sample: slicerio's chest CT, 7 segments")
    mdl = p.add_mutually_exclusive_group()
    mdl.add_argument("--model", metavar="NAME", help="registered model name (e.g. demo, sam-med3d-turbo); "
                     "default: the default model unless --checkpoint is given")
    mdl.add_argument("--checkpoint", metavar="PATH", help="checkpoint file (.pth/.pt)")
    p.add_argument("--clicks", type=int, default=5, help="simulated clicks per target")
    p.add_argument("--labels", nargs="+", metavar="LABEL", help="only these targets (names or label values)")
    p.add_argument("--split", default="Tr", choices=["Tr", "Ts"], help="use images<split>/labels<split>")
    p.add_argument("--max-cases", type=int, default=None, help="evaluate only the first N cases (by name)")
    p.add_argument("--protocol", choices=["engine", "legacy", "both"], default="both")
    p.add_argument("--prompt-mode", choices=["newest", "all"], default="newest",
                   help="engine: feed only the newest click + previous logits (reference) or all clicks")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] or mps")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (GPU only)")
    p.add_argument("--spacing-mm", type=float, default=1.5, help="model-input grid spacing")
    p.add_argument("--clamp-hu", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="clamp CT to [LO, HI] before normalising (the reference's training does -1000 1000)")
    p.add_argument("--no-extend", action="store_true", help="engine: do not grow past the first region")
    p.add_argument("--nsd-tolerance", type=float, default=2.0, metavar="MM", help="NSD tolerance (mm)")
    p.add_argument("--seed", type=int, default=0, help="seed of the legacy protocol's random clicks")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


def _load_backend(args) -> Tuple[Any, Dict[str, Any]]:
    from ..cli import CliError, load_backend
    from ..weights import DEFAULT_MODEL, sha256_file

    try:
        backend, info = load_backend(args.model, args.checkpoint, args.device, dtype=args.dtype)
    except CliError as err:
        raise EvaluationError(str(err)) from err
    info.update(name=args.model or (None if args.checkpoint else DEFAULT_MODEL) or os.path.basename(info["checkpoint"]),
                checkpoint_sha256=sha256_file(info["checkpoint"]), dtype=args.dtype)
    return backend, info


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``sam3d evaluate`` (``argv`` without the sub-command). Returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    log: Log = (lambda m: None) if args.quiet else (lambda m: (sys.stderr.write(m + "\n"), sys.stderr.flush()))
    try:
        out = os.path.abspath(args.out)
        if os.path.exists(out) and not os.path.isdir(out):
            raise EvaluationError(f"--out {out} is a file; give a folder")
        existing = [n for n in (CSV_NAME, JSON_NAME, PNG_NAME) if os.path.exists(os.path.join(out, n))]
        if existing and not args.overwrite:
            raise EvaluationError(f"--out {out} already holds {', '.join(existing)}; choose another folder "
                                  "or pass --overwrite")
        protocols = PROTOCOLS if args.protocol == "both" else (args.protocol,)
        if args.max_cases is not None and args.max_cases < 1:
            raise EvaluationError("--max-cases must be >= 1")
        if args.data:
            refs, names = discover_dataset(args.data, args.split)
            if args.max_cases:
                refs = refs[: args.max_cases]
            data_info = {"name": os.path.basename(os.path.abspath(args.data)), "path": os.path.abspath(args.data),
                         "split": args.split, "cases": [r.name for r in refs], "labels": args.labels}
            cases: Iterable[Case] = (load_case(r, names, args.labels) for r in refs)
        else:
            sample = sample_cases(args.sample)
            if args.max_cases:
                sample = sample[: args.max_cases]
            sample = [_filter_targets(c, args.labels) for c in sample]
            data_info = {"name": f"sample:{args.sample}", "cases": [c.name for c in sample],
                         "labels": args.labels}
            cases = sample
        config = EvalConfig(clicks=args.clicks, protocols=tuple(protocols), prompt_mode=args.prompt_mode,
                            spacing_mm=args.spacing_mm,
                            clamp_hu=tuple(args.clamp_hu) if args.clamp_hu else None,
                            extend=not args.no_extend, nsd_tolerance_mm=args.nsd_tolerance, seed=args.seed,
                            data=data_info)
        backend, model_info = _load_backend(args)
        config.model = model_info
        log(f"sam3d evaluate: {model_info['backend']}; protocols {', '.join(protocols)}; {args.clicks} clicks")
        summary = run_evaluation(cases, backend, config, out, log)
    except (EvaluationError, ValueError, FileNotFoundError, RuntimeError) as err:
        sys.stderr.write(f"sam3d evaluate: error: {err}\n")
        return 1
    _print_table(summary, sys.stdout)
    print(f"results: {os.path.join(out, CSV_NAME)}, {os.path.join(out, JSON_NAME)}, {os.path.join(out, PNG_NAME)}")
    return 0


def _print_table(summary: Dict[str, Any], stream) -> None:
    for protocol, entry in summary["protocols"].items():
        stream.write(f"[{protocol}] {entry['label']}\n")
        per_t = entry["per_target"]
        clicks = [p["click"] for p in entry["per_click"]]
        width = max([len(t) for t in per_t] + [6])
        stream.write("  " + "target".ljust(width) + "".join(f"  Dice@{c:<3d}" for c in clicks) + "\n")
        for t, per in list(per_t.items()) + [("MEAN", entry["per_click"])]:
            cells = "".join(f"  {p['dice_mean']:8.4f}" if p["dice_mean"] is not None else "       n/a"
                            for p in per)
            stream.write("  " + t.ljust(width) + cells + "\n")
        if protocol == "legacy" and entry.get("best_dice_mean") is not None:
            stream.write(f"  best Dice over clicks (published-style number): {entry['best_dice_mean']:.4f}\n")


if __name__ == "__main__":  # python -m SAM3DSegmentLib.eval.evaluate
    sys.exit(main())

