"""``sam3d evaluate``: score a model with simulated clicks (the protocols: :mod:`SAM3DSegmentLib.eval.evaluate`,
docs/evaluation.md). Writes per_case.csv, summary.json and dice_vs_clicks.png into ``--out``."""
from __future__ import annotations

import os
import sys
from typing import Any, Dict, Optional, Sequence

from . import options as O
from .runner import command_main

NAME = "evaluate"
HELP = "score a model with simulated clicks (Dice, NSD, HD95)"
DESCRIPTION = ("Evaluate a SAM-Med3D or 3DSAM-adapter checkpoint and the interactive engine with simulated clicks. "
               "Writes per_case.csv, summary.json and dice_vs_clicks.png into --out.")
#: What ``--protocol`` takes; "both" runs the engine protocol and the model family's own (legacy for SAM-Med3D,
#: 3dsam for the 3DSAM-adapter).
PROTOCOL_CHOICES = ("engine", "legacy", "3dsam", "both")


def configure(p) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="DIR", help="nnU-Net raw dataset folder (imagesTr/ + labelsTr/ "
                     "[+ dataset.json]); binary or multi-label label maps")
    O.add_sample_option(p, target=src)
    O.add_model_options(p)
    p.add_argument("--clicks", type=O.positive_int, default=5, metavar="N",
                   help="simulated clicks per target (default 5)")
    p.add_argument("--labels", nargs="+", metavar="LABEL", help="only these targets (names or label values)")
    p.add_argument("--split", default="Tr", choices=("Tr", "Ts"),
                   help="use images<split>/ and labels<split>/ of --data (default Tr)")
    p.add_argument("--max-cases", type=O.positive_int, default=None, metavar="N",
                   help="evaluate only the first N cases (by name)")
    p.add_argument("--protocol", choices=PROTOCOL_CHOICES, default="both",
                   help="engine: the interactive engine on the full volume; legacy: SAM-Med3D's crop protocol; "
                        "3dsam: the 3DSAM-adapter's (N points in the ground truth, one pass, NSD at 5 mm); both "
                        "(default): engine and the model family's own (legacy or 3dsam)")
    O.add_device_options(p)
    O.add_engine_options(p)
    p.add_argument("--nsd-tolerance", type=O.non_negative_float, default=2.0, metavar="MM",
                   help="NSD tolerance in mm (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the legacy protocol's random clicks (default 0)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    O.add_overwrite_option(p)
    O.add_quiet_option(p)


normalise_argv = O.join_option_values


def _cases(args):
    """``(cases, data description for the summary)`` of ``--data`` or ``--sample``."""
    from ..eval.cases import discover_dataset, filter_targets, load_case, sample_cases

    if args.data:
        refs, names = discover_dataset(args.data, args.split)
        if args.max_cases:
            refs = refs[: args.max_cases]
        data_info = {"name": os.path.basename(os.path.abspath(args.data)), "path": os.path.abspath(args.data),
                     "split": args.split, "cases": [r.name for r in refs], "labels": args.labels}
        return (load_case(r, names, args.labels) for r in refs), data_info
    sample = sample_cases(args.sample)
    if args.max_cases:
        sample = sample[: args.max_cases]
    sample = [filter_targets(c, args.labels) for c in sample]
    data_info = {"name": f"sample:{args.sample}", "cases": [c.name for c in sample], "labels": args.labels}
    return sample, data_info


def _backend(args):
    """The model, and its description for the summary (with the checkpoint's sha256)."""
    from ..inference.backends import load_backend
    from ..weights import DEFAULT_MODEL, sha256_file

    backend, info = load_backend(args.model, args.checkpoint, args.device, args.threads, args.dtype)
    info.update(name=args.model or (None if args.checkpoint else DEFAULT_MODEL) or os.path.basename(info["checkpoint"]),
                checkpoint_sha256=sha256_file(info["checkpoint"]), dtype=args.dtype)
    return backend, info


def run(args) -> int:
    from ..eval.evaluate import run_evaluation
    from ..eval.protocols import FAMILY_PROTOCOL, EvalConfig
    from ..eval.report import CSV_NAME, JSON_NAME, PNG_NAME

    quiet = args.quiet
    log = (lambda m: None) if quiet else (lambda m: (sys.stderr.write(m + "\n"), sys.stderr.flush()))
    out = O.output_folder(args.out)
    outputs = [os.path.join(out, n) for n in (CSV_NAME, JSON_NAME, PNG_NAME)]
    O.refuse_existing("--out", outputs, args.overwrite, folder=out)
    cases, data_info = _cases(args)
    config = EvalConfig(clicks=args.clicks, prompt_mode=args.prompt_mode,
                        spacing_mm=args.spacing, clamp_hu=args.clamp_hu, extend=not args.no_extend,
                        max_regions=args.max_regions, nsd_tolerance_mm=args.nsd_tolerance, seed=args.seed,
                        data=data_info)
    backend, model_info = _backend(args)
    O.apply_model_settings(backend, args, log)
    family = model_info.get("family", "sam_med3d")
    own = FAMILY_PROTOCOL.get(family, "legacy")
    protocols = ("engine", own) if args.protocol == "both" else (args.protocol,)
    wrong = [p for p in protocols if p not in ("engine", own)]
    if wrong:
        raise O.UsageError(f"--protocol {wrong[0]} does not apply to this model ({family} family); use engine, "
                           f"{own} or both")
    config.protocols = protocols
    config.spacing_mm = args.spacing or float(getattr(backend, "spacing_mm", None) or 1.5)
    if getattr(backend, "intensity", None) is not None:
        model_info["intensity"] = backend.intensity.to_dict()
    config.model = model_info
    log(f"sam3d evaluate: {model_info['backend']}; protocols {', '.join(protocols)}; {args.clicks} clicks")
    summary = run_evaluation(cases, backend, config, out, log)
    if not quiet:
        print_table(summary, sys.stdout)
        print(f"results: {', '.join(outputs)}")
    return 0


def print_table(summary: Dict[str, Any], stream) -> None:
    """Mean Dice per target after each click, per protocol (and the legacy best-of-N number)."""
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``sam3d evaluate`` (``argv`` without the sub-command): the same parser, messages and exit statuses."""
    return command_main(sys.modules[__name__], argv)

