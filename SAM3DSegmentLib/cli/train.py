"""``sam3d train``: train or fine-tune a model (:mod:`SAM3DSegmentLib.train`, docs/training.md), and the
actions around a run: ``merge``, ``export-encoder``, ``make-demo-data``.

``sam3d train CONFIG ...`` is short for ``sam3d train run CONFIG ...``. A training config with an unknown
key or a wrong value is a usage error (exit status 2), like a malformed option: the config file and its
``--set`` overrides are the run's options. Data and checkpoint problems exit with 1.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional, Sequence

from . import options as O
from .options import CliError, UsageError
from .runner import command_main

NAME = "train"
HELP = "fine-tune or train a model on a labelled dataset"
DESCRIPTION = ("Train or fine-tune a SAM-Med3D-family model (reference interaction loop; docs/training.md). "
               "'sam3d train CONFIG' is short for 'sam3d train run CONFIG'.")
ACTIONS = ("run", "merge", "export-encoder", "make-demo-data")
#: Files of a finished or running training in its output folder (replaced only with --resume or --overwrite).
RUN_OUTPUTS = ("latest.pt", "best.pt", "final.pt", "encoder.pt", "metrics.csv")
BASE_HELP = "base checkpoint of a partial (adapter or decoder-only) file (default: the path recorded in it)"
OUTPUT_HELP = "output checkpoint file"


def normalise_argv(argv: Sequence[str]) -> List[str]:
    """``sam3d train CONFIG ...`` -> ``sam3d train run CONFIG ...`` (``--help`` stays the action list)."""
    argv = list(argv)
    if argv and (argv[0] in ACTIONS or argv[0] in ("-h", "--help")):
        return argv
    return ["run", *argv]


def configure(p) -> None:
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=O.Parser)
    r = actions.add_parser("run", prog="sam3d train run", help="train or fine-tune from a config (the default)",
                           description="Train or fine-tune from a JSON (or YAML) config; see configs/ and "
                                       "docs/training.md.")
    r.add_argument("config", nargs="?", help="JSON (or YAML) config file, see configs/")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set optim.lr=1e-4 (repeatable)")
    r.add_argument("--resume", help="resume: 'auto' (output_dir/latest.pt) or a checkpoint path")
    r.add_argument("--output-dir", help="shorthand for --set output_dir=DIR")
    O.add_device_options(r, dtype=False)
    r.add_argument("--nproc", type=O.positive_int, default=1,
                   help="spawn N local processes (DDP; gloo on CPU). Under torchrun leave it at 1")
    r.add_argument("--check", action="store_true",
                   help="quick system test: tiny model, synthetic batch, 2 steps; prints device/AMP/memory")
    r.add_argument("--amp", default="auto", help="AMP for --check (auto, off, bf16, fp16)")
    r.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    O.add_overwrite_option(r)

    m = actions.add_parser("merge", prog="sam3d train merge", help="base + partial (adapter) checkpoint -> full file",
                           description="base checkpoint + partial (adapter) checkpoint -> full file")
    m.add_argument("partial", help="partial checkpoint written by sam3d train (adapter or decoder-only mode)")
    m.add_argument("--out", "-o", required=True, help=OUTPUT_HELP)
    m.add_argument("--base", help=BASE_HELP)
    m.add_argument("--force", action="store_true", help="merge even if the base file's sha256 differs")
    O.add_overwrite_option(m)

    e = actions.add_parser("export-encoder", prog="sam3d train export-encoder",
                           help="write the image encoder alone", description="Write the image encoder alone.")
    e.add_argument("checkpoint", help="full or partial checkpoint")
    e.add_argument("--out", "-o", required=True, help=OUTPUT_HELP)
    e.add_argument("--base", help=BASE_HELP)
    O.add_overwrite_option(e)

    d = actions.add_parser("make-demo-data", prog="sam3d train make-demo-data",
                           help="write the demo training set (slicerio chest CT + phantoms)",
                           description="Write the demo training set (slicerio chest CT + phantoms).")
    d.add_argument("output", help="folder to write the nnU-Net-style data set into")
    d.add_argument("--phantoms", type=O.non_negative_int, default=8, help="synthetic cases (default 8)")
    O.add_overwrite_option(d)


def _config_overrides(args) -> List[str]:
    """``--set`` overrides plus the shorthands (--output-dir, --resume, --device, --threads), in that order."""
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    if args.device is not None:
        overrides.append(f"device={args.device}")
    if args.threads is not None:
        overrides.append(f"threads={args.threads}")
    return overrides


def _train(args) -> int:
    if args.check:
        from ..models.device import set_threads
        from ..train.loop import system_check

        set_threads(args.threads)
        return system_check(args.device or "auto", args.amp)
    if not args.config:
        raise UsageError("give a CONFIG file (or --check) (see 'sam3d train run --help')")
    from ..train.config import ConfigError, config_to_dict, load_config

    overrides = _config_overrides(args)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as err:  # the config is the run's options: a usage error
        raise UsageError(str(err)) from err
    if args.print_config:
        import json

        print(json.dumps(config_to_dict(cfg), indent=2))
        return 0
    existing = [n for n in RUN_OUTPUTS if os.path.lexists(os.path.join(cfg.output_dir, n))]
    if existing and not cfg.checkpoint.resume and not args.overwrite:  # a fresh run would replace them
        raise CliError(f"output_dir {cfg.output_dir} already holds {', '.join(existing)} of an earlier run; "
                       "continue it with --resume auto, choose another --output-dir, or pass --overwrite to "
                       "start again there")
    if args.nproc > 1:
        from ..train.distributed import launch_local

        argv = ["run", args.config, *(a for o in overrides for a in ("--set", o))]
        return launch_local(args.nproc, main, argv + (["--overwrite"] if args.overwrite else []))
    from ..train.loop import train

    train(cfg)
    return 0


def run(args) -> int:
    if args.action == "run":
        return _train(args)
    if args.action == "make-demo-data":
        from ..data.demo_data import make_demo_dataset

        out = os.path.abspath(args.output)
        O.refuse_existing("make-demo-data", [os.path.join(out, n) for n in ("dataset.json", "imagesTr", "labelsTr")],
                          args.overwrite, folder=out)
        print(f"wrote {make_demo_dataset(out, n_phantoms=args.phantoms)}")
        return 0
    O.refuse_existing("--out", [args.out], args.overwrite)
    from ..train import checkpointing

    if args.action == "merge":
        out = checkpointing.merge_checkpoint(args.partial, args.out, args.base, args.force)
    else:
        out = checkpointing.export_image_encoder(args.checkpoint, args.out, args.base)
    print(f"wrote {out}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``sam3d train`` (``argv`` without the sub-command): the same parser, messages and exit statuses.
    Also ``python -m SAM3DSegmentLib.train`` and each process :func:`~SAM3DSegmentLib.train.distributed.
    launch_local` starts."""
    return command_main(sys.modules[__name__], argv)
