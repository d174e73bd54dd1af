"""``sam3d evaluate``: score a model with simulated clicks (the protocols: :mod:`SAM3DSegmentLib.eval.evaluate`,
and :mod:`SAM3DSegmentLib.eval.segfm` for ``--protocol segfm``; docs/evaluation.md). Writes per_case.csv,
summary.json and dice_vs_clicks.png (and, for segfm, per_class.csv) into ``--out``."""
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
#: 3dsam for the 3DSAM-adapter), "all" every protocol that applies to the model (SAM-Med3D: the reference one too);
#: "segfm" the CVPR 2025 challenge's.
PROTOCOL_CHOICES = ("engine", "legacy", "reference", "3dsam", "both", "all", "segfm")
#: The options only ``--protocol segfm`` takes (their defaults are None so a stray one is refused).
SEGFM_OPTIONS = ("box", "gts", "spacing_order", "npz_window")


def configure(p) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="DIR", help="nnU-Net raw dataset folder (imagesTr/ + labelsTr/ "
                     "[+ dataset.json]); binary or multi-label label maps; with --protocol segfm also a folder "
                     "of the challenge's .npz cases")
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
                        "reference: SAM-Med3D's inference code (validate_paired_img_gt) reproduced; 3dsam: the "
                        "3DSAM-adapter's (N points in the ground truth, one pass, NSD at 5 mm); both (default): "
                        "engine and the model family's own (legacy, or 3dsam for a 3DSAM-adapter); all: every "
                        "protocol that applies to the model; segfm: the CVPR 2025 interactive challenge's "
                        "protocol (DSC_AUC, NSD_AUC)")
    seg = p.add_argument_group("--protocol segfm")
    seg.add_argument("--box", choices=("auto", "none", "gt"), default=None,
                     help="initial box step: auto = the case's boxes when it has them (default), none, gt = boxes "
                          "derived from the ground truth; the box places the first region (one include click at "
                          "its centre on slice z_mid: the models take no box prompt)")
    seg.add_argument("--gts", metavar="DIR", default=None,
                     help="folder of ground-truth .npz files ('gts' only, same names as the cases)")
    seg.add_argument("--spacing-order", choices=("xyz", "zyx"), default=None,
                     help="order of the .npz 'spacing' (default xyz: SimpleITK's, as the challenge wrote it)")
    seg.add_argument("--npz-window", type=O.clamp_range, default=None, metavar="LO,HI",
                     help="map the .npz images (0..255) back onto LO..HI before the model, e.g. the CT window in HU "
                          "the cases were scaled from (--npz-window=-160,240); default: the 0..255 values")
    O.add_device_options(p)
    O.add_engine_options(p)
    O.add_upsampling_option(p)
    p.add_argument("--nsd-tolerance", type=O.non_negative_float, default=2.0, metavar="MM",
                   help="NSD tolerance in mm (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the legacy protocol's random clicks (default 0)")
    p.add_argument("--reference-seed", type=int, default=233,
                   help="reference protocol: numpy seed of each case's random clicks (default 233, "
                        "validate_paired_img_gt's)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    O.add_overwrite_option(p)
    O.add_quiet_option(p)
    O.add_server_options(p)


def normalise_argv(argv):
    """``--clamp-hu`` / ``--npz-window`` values may start with '-': glued to their flags."""
    return O.join_option_values(argv, O.NEGATIVE_VALUE_OPTIONS + ("--npz-window",))


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
    """The model, and its description for the summary (with the checkpoint's sha256; with ``--server``, the
    sha256 of the file the server serves)."""
    from ..inference.backends import load_backend
    from ..weights import DEFAULT_MODEL, sha256_file

    remote = O.remote_options(args)
    backend, info = load_backend(args.model, args.checkpoint, args.device, args.threads, args.dtype, remote=remote)
    if remote is not None:
        info.update(name=info["model"], dtype=args.dtype)
        return backend, info
    info.update(name=args.model or (None if args.checkpoint else DEFAULT_MODEL) or os.path.basename(info["checkpoint"]),
                checkpoint_sha256=sha256_file(info["checkpoint"]), dtype=args.dtype)
    return backend, info


def run(args) -> int:
    from ..eval.evaluate import run_evaluation
    from ..eval.protocols import FAMILY_PROTOCOLS, EvalConfig
    from ..eval.report import CSV_NAME, JSON_NAME, PNG_NAME

    quiet = args.quiet
    log = (lambda m: None) if quiet else (lambda m: (sys.stderr.write(m + "\n"), sys.stderr.flush()))
    out = O.output_folder(args.out)
    if args.protocol == "segfm":
        return _run_segfm(args, out, log)
    stray = [o for o in SEGFM_OPTIONS if getattr(args, o) is not None]
    if stray:
        raise O.UsageError(f"--{stray[0].replace('_', '-')} is an option of --protocol segfm only "
                           "(see 'sam3d evaluate --help')")
    outputs = [os.path.join(out, n) for n in (CSV_NAME, JSON_NAME, PNG_NAME)]
    O.refuse_existing("--out", outputs, args.overwrite, folder=out)
    cases, data_info = _cases(args)
    config = EvalConfig(clicks=args.clicks, prompt_mode=args.prompt_mode,
                        spacing_mm=args.spacing, clamp_hu=args.clamp_hu, extend=not args.no_extend,
                        max_regions=args.max_regions, honour_clicks=args.honour_clicks,
                        nsd_tolerance_mm=args.nsd_tolerance, seed=args.seed,
                        reference_seed=args.reference_seed, upsampling=args.upsampling, data=data_info)
    backend, model_info = _backend(args)
    O.apply_model_settings(backend, args, log)
    family = model_info.get("family", "sam_med3d")
    own = FAMILY_PROTOCOLS.get(family, FAMILY_PROTOCOLS["sam_med3d"])
    protocols = {"both": ("engine", own[0]), "all": ("engine",) + own}.get(args.protocol, (args.protocol,))
    wrong = [p for p in protocols if p != "engine" and p not in own]
    if wrong:
        raise O.UsageError(f"--protocol {wrong[0]} does not apply to this model ({family} family); use engine, "
                           f"{', '.join(own)}, both or all")
    config.protocols = protocols
    if not getattr(backend, "supports_mask_prompt", True):
        config.prompt_mode = "all-clicks"   # what the session gives a model without previous-mask input
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


def _run_segfm(args, out: str, log) -> int:
    """``--protocol segfm`` (:mod:`SAM3DSegmentLib.eval.segfm_run`)."""
    from ..eval.segfm import SegFMConfig
    from ..eval.segfm_report import CLASS_CSV_NAME, CSV_NAME, JSON_NAME, PNG_NAME
    from ..eval.segfm_run import run_segfm, segfm_data
    from ..eval.protocols import FAMILY_PROTOCOLS

    if args.upsampling != "trilinear":
        raise O.UsageError("--upsampling guided applies to the engine protocol; --protocol segfm runs trilinear only "
                           "(leave out --upsampling)")
    if args.sample:
        raise O.CliError("--protocol segfm scores a dataset: give --data (a folder of the challenge's .npz cases "
                         "or an nnU-Net dataset) instead of --sample")
    outputs = [os.path.join(out, n) for n in (CSV_NAME, CLASS_CSV_NAME, JSON_NAME, PNG_NAME)]
    O.refuse_existing("--out", outputs, args.overwrite, folder=out)
    data = segfm_data(args.data, args.gts, args.spacing_order or "xyz", args.split, args.labels, args.max_cases,
                      args.npz_window)
    config = SegFMConfig(clicks=args.clicks, box=args.box or "auto", prompt_mode=args.prompt_mode,
                         spacing_mm=args.spacing, clamp_hu=args.clamp_hu, extend=not args.no_extend,
                         max_regions=args.max_regions, nsd_tolerance_mm=args.nsd_tolerance, data=data.info)
    backend, model_info = _backend(args)
    if not getattr(backend, "supports_exclude", True):   # before any case runs
        raise O.UsageError(f"--protocol segfm clicks exclude points on false positives, but this model "
                           f"({model_info.get('family')} family) has no exclude clicks; use --protocol engine, "
                           f"{', '.join(FAMILY_PROTOCOLS.get(model_info.get('family'), ()))}, both or all")
    config.model = model_info
    config.spacing_mm = args.spacing or float(getattr(backend, "spacing_mm", None) or 1.5)   # the model's own
    log(f"sam3d evaluate: {config.model['backend']}; protocol segfm; {len(data.names)} case(s), "
        f"box {config.box}, {config.clicks} clicks per class")
    summary = run_segfm(data, backend, config, out, log)
    if not args.quiet:
        print_segfm_table(summary, sys.stdout)
        print(f"results: {', '.join(outputs)}")
    return 0


def print_segfm_table(summary: Dict[str, Any], stream) -> None:
    """Mean Dice / NSD per step, the AUCs and final scores, and the published reference figures."""
    stream.write(f"[segfm] {summary['label']}\n")
    for p in summary["per_step"]:
        step = "box" if p["step"] == "box" else f"click {p['step']}"
        stream.write(f"  {step:<8} Dice {p['dice_mean']:.4f}  NSD {p['nsd_mean']:.4f}  ({p['cases']} case(s), "
                     f"{p['seconds_mean']:.2f} s)\n")
    m, ref = summary["means"], summary["reference"]
    stream.write(f"  DSC_AUC {m['DSC_AUC']:.3f}  NSD_AUC {m['NSD_AUC']:.3f}  (max {summary['auc_max']:.1f})  "
                 f"final Dice {m['DSC_Final']:.4f}  final NSD {m['NSD_Final']:.4f}  ({summary['cases']} case(s))\n")
    stream.write(f"  published, for context only ({ref['entry']}): DSC_AUC {ref['DSC_AUC']}, NSD_AUC "
                 f"{ref['NSD_AUC']}, final Dice {ref['DSC_Final']}, final NSD {ref['NSD_Final']}: not comparable "
                 "(docs/evaluation.md)\n")


def print_table(summary: Dict[str, Any], stream) -> None:
    """Mean Dice per target after each click, per protocol with its click protocol (and the legacy best-of-N
    number)."""
    protocols = summary.get("click_protocols", {})
    for protocol, entry in summary["protocols"].items():
        stream.write(f"[{protocol}] {entry['label']}\n")
        cp = entry.get("click_protocol")
        if cp in protocols:
            stream.write(f"  click protocol: {cp} ({protocols[cp]})\n")
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

