"""Headless training of SAM-Med3D-family models: ``sam3d train CONFIG [--set key=value ...]``.

Never imports Slicer. torch is imported lazily (importing this package is light). Entry point:
:func:`main` (``sam3d train`` and ``python -m SAM3DSegmentLib.train``); library use:
``from SAM3DSegmentLib.train.loop import train``; config schema in :mod:`.config`. See docs/training.md.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence

__all__ = ["main", "build_parser"]

_SUBCOMMANDS = ("merge", "export-encoder", "make-demo-data")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sam3d train",
        description="Train or fine-tune a SAM-Med3D-family model (reference interaction loop). "
                    "Other actions: `sam3d train merge PARTIAL -o FULL.pt [--base BASE]`, "
                    "`sam3d train export-encoder CKPT -o ENCODER.pt`, `sam3d train make-demo-data DIR`.")
    p.add_argument("config", nargs="?", help="JSON (or YAML) config file, see configs/")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set optim.lr=1e-4 (repeatable)")
    p.add_argument("--resume", help="resume: 'auto' (output_dir/latest.pt) or a checkpoint path")
    p.add_argument("--output-dir", help="shorthand for --set output_dir=DIR")
    p.add_argument("--nproc", type=int, default=1,
                   help="spawn N local processes (DDP; gloo on CPU). Under torchrun leave it at 1")
    p.add_argument("--check", action="store_true",
                   help="quick system test: tiny model, synthetic batch, 2 steps; prints device/AMP/memory")
    p.add_argument("--device", default="auto", help="device for --check (auto, cpu, cuda, ...)")
    p.add_argument("--amp", default="auto", help="AMP for --check (auto, off, bf16, fp16)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    return p


def _sub_main(argv: List[str]) -> int:
    cmd, rest = argv[0], argv[1:]
    if cmd == "merge":
        p = argparse.ArgumentParser(prog="sam3d train merge",
                                    description="base checkpoint + partial (adapter) checkpoint -> full file")
        p.add_argument("partial")
        p.add_argument("-o", "--output", required=True)
        p.add_argument("--base", help="base checkpoint (default: the path recorded in the partial file)")
        p.add_argument("--force", action="store_true", help="merge even if the base file's sha256 differs")
        a = p.parse_args(rest)
        from .checkpointing import merge_checkpoint

        out = merge_checkpoint(a.partial, a.output, a.base, a.force)
        print(f"wrote {out}")
        return 0
    if cmd == "export-encoder":
        p = argparse.ArgumentParser(prog="sam3d train export-encoder")
        p.add_argument("checkpoint")
        p.add_argument("-o", "--output", required=True)
        p.add_argument("--base", help="base checkpoint of a partial file")
        a = p.parse_args(rest)
        from .checkpointing import export_image_encoder

        print(f"wrote {export_image_encoder(a.checkpoint, a.output, a.base)}")
        return 0
    if cmd == "make-demo-data":
        p = argparse.ArgumentParser(prog="sam3d train make-demo-data",
                                    description="write the demo training set (slicerio chest CT + phantoms)")
        p.add_argument("output")
        p.add_argument("--phantoms", type=int, default=8)
        a = p.parse_args(rest)
        from ..data.demo_data import make_demo_dataset

        print(f"wrote {make_demo_dataset(a.output, n_phantoms=a.phantoms)}")
        return 0
    raise AssertionError(cmd)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; returns the exit status (0 OK, 1 failure during training, 2 bad config/data)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from .config import ConfigError, config_to_dict, load_config

    try:
        if argv and argv[0] in _SUBCOMMANDS:
            return _sub_main(argv)
        args = build_parser().parse_args(argv)
        if args.check:
            from .loop import system_check

            return system_check(args.device, args.amp)
        if not args.config:
            build_parser().error("give a CONFIG file (or --check)")
        overrides = list(args.overrides)
        if args.output_dir:
            overrides.append(f"output_dir={args.output_dir}")
        if args.resume:
            overrides.append(f"checkpoint.resume={args.resume}")
        cfg = load_config(args.config, overrides)
        if args.print_config:
            import json

            print(json.dumps(config_to_dict(cfg), indent=2))
            return 0
        if args.nproc > 1:
            from .distributed import launch_local

            rest = [a for a in argv]
            i = rest.index("--nproc") if "--nproc" in rest else -1
            if i >= 0:
                del rest[i:i + 2]
            rest = [a for a in rest if not a.startswith("--nproc=")]
            return launch_local(args.nproc, rest)
        from .loop import train

        train(cfg)
        return 0
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as err:
        # DataError, CheckpointError and friends: clear message, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
