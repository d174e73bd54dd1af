"""The ``sam3d`` command: ``segment`` and ``demo`` live here; ``train``, ``evaluate``, ``diagnose`` and
``download`` are dispatched to their modules (imported lazily, so ``sam3d segment`` never pays for them).

Exit status: 0 success, 1 runtime failure (unreadable image, click outside the volume, bad checkpoint,
missing output folder, ...), 2 usage error (malformed arguments). Every failure prints ONE line on stderr
naming the problem and the fix; outputs are written atomically, so a failed run leaves no partial file.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import time
from typing import List, Optional, Sequence, Tuple

from .atomic import write_json

PROG = "sam3d"
#: Output file types ``sam3d segment`` writes.
SEGMENT_OUTPUTS = (".nii.gz", ".nii", ".nrrd", ".mha", ".seg.nrrd")

#: Sub-commands provided by other modules: name -> (module, attribute, one-line help).
EXTERNAL_COMMANDS = {
    "train": ("SAM3DSegmentLib.train", "main", "fine-tune or train a model on a labelled dataset"),
    "evaluate": ("SAM3DSegmentLib.evaluate", "main", "score a model with simulated clicks (Dice, NSD, HD95)"),
    "diagnose": ("SAM3DSegmentLib.diagnose", None, "print a report of the system, torch, devices and caches"),
    "download": ("SAM3DSegmentLib.weights", "main", "download and verify published checkpoints"),
    "serve": ("SAM3DSegmentLib.remote.server", "main", "serve models over HTTP for remote inference (docs/remote.md)"),
}
OWN_COMMANDS = {
    "segment": "segment a 3D image from clicks and write the mask",
    "demo": "segment structures of the sample chest CT with scripted clicks (masks, overlay, timings, Dice)",
}


class UsageError(Exception):
    """Malformed command line (exit status 2)."""


class CliError(Exception):
    """A runtime failure with a message that names the problem and the fix (exit status 1)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``PROG CMD: error: ... (see --help)``) and exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def fail(prog: str, err: BaseException, status: int) -> int:
    sys.stderr.write(f"{prog}: error: {_one_line(err)}\n")
    sys.stderr.flush()
    return status


# ------------------------------------------------------------------------------------------ clicks
_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_CLICK_RE = re.compile(rf"^\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*(?::\s*([+\-]|pos|neg|positive|negative))?\s*$")


def parse_click(text: str) -> Tuple[Tuple[float, float, float], bool]:
    """``"R,A,S"`` / ``"R,A,S:+"`` / ``"R,A,S:-"`` -> ((x, y, z), positive)."""
    m = _CLICK_RE.match(text)
    if not m:
        raise UsageError(f"malformed --click {text!r}: write three comma-separated numbers with an optional "
                         "sign, e.g. --click=-12.5,30,41:+ (positive) or --click=10,20,30:- (negative)")
    sign = (m.group(4) or "+").lower()
    return (float(m.group(1)), float(m.group(2)), float(m.group(3))), sign in ("+", "pos", "positive")


def _join_click_values(argv: Sequence[str], flags: Sequence[str] = ("--click", "-c", "--clamp-hu")) -> List[str]:
    """Let ``--click -12,3,4`` (and ``--clamp-hu -1000,1000``) work: argparse would read a value starting
    with '-' as an option."""
    out: List[str] = []
    it = iter(argv)
    for tok in it:
        if tok in flags:
            nxt = next(it, None)
            if nxt is None:
                out.append(tok)
            else:
                out.append(f"{'--click' if tok == '-c' else tok}={nxt}")
        else:
            out.append(tok)
    return out


# ------------------------------------------------------------------------------------------ segment
def build_segment_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=f"{PROG} segment",
                description="Segment one object of a 3D image (NIfTI, NRRD, MHA or a DICOM folder) from clicks "
                            "with a SAM-Med3D-family model and write the mask on the image's grid.")
    p.add_argument("image", help="input image file or DICOM series folder")
    p.add_argument("--click", "-c", action="append", default=[], metavar="R,A,S[:+|-]",
                   help="a click in RAS millimetres (Slicer's coordinates), ':+' positive (default) or ':-' "
                        "negative; repeat for more clicks (applied in order)")
    p.add_argument("--voxel", action="store_true",
                   help="clicks are voxel indices i,j,k (0-based, as in Slicer's data probe) instead of RAS mm")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="registered model name (see 'sam3d download --list'); default: the "
                                     "SAM-Med3D turbo checkpoint from the cache")
    src.add_argument("--checkpoint", help="path to a checkpoint file (.pth/.pt)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="compute precision (default float32; float16 on a GPU only; see docs/precision.md)")
    p.add_argument("--prompt-mode", choices=("newest", "all"), default="newest",
                   help="newest: each click with the previous mask (the model's training protocol, default); "
                        "all: every click so far with the previous mask")
    p.add_argument("--no-extend", action="store_true",
                   help="do not grow beyond the first model region when the mask touches its border")
    p.add_argument("--max-regions", type=int, default=8, help="most model regions per object (default 8)")
    p.add_argument("--spacing", type=float, default=1.5,
                   help="model input spacing in mm (default 1.5; larger = bigger field of view, coarser)")
    p.add_argument("--clamp-hu", default=None, metavar="LO,HI",
                   help="clamp CT values to LO,HI HU before normalising (training used -1000,1000)")
    p.add_argument("--name", default="Segment_1", help="segment name in a .seg.nrrd output")
    p.add_argument("--out", "-o", required=True, help="output mask: .nii.gz, .nii, .nrrd, .mha or .seg.nrrd")
    p.add_argument("--timings", default=None, metavar="JSON", help="also write timings and run details here")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")
    from .remote.options import add_server_arguments

    add_server_arguments(p)  # --server URL ...: remote inference (remote/options.py)
    return p


def _check_output_path(path: str, allowed: Sequence[str], flag: str) -> str:
    from .io import file_extension

    ext = file_extension(path)
    if ext not in allowed:
        raise UsageError(f"{flag} {path!r}: unsupported file type '{ext or '(none)'}'; use one of "
                         f"{', '.join(allowed)}")
    full = os.path.abspath(path)
    folder = os.path.dirname(full)
    if not os.path.isdir(folder):
        raise CliError(f"{flag} {path}: the folder {folder} does not exist; create it first or choose "
                       "another output path")
    if os.path.isdir(full):
        raise CliError(f"{flag} {path} is a folder; give a file name")
    return full


def load_backend(model: Optional[str], checkpoint: Optional[str], device: str = "auto",
                 threads: Optional[int] = None, dtype: str = "float32", remote=None):
    """Resolve the checkpoint, load it and wrap it in a :class:`LocalBackend`. Returns (backend, info).

    With ``remote`` (``remote.options.RemoteOptions``, from ``--server``) the model runs on those servers
    instead: a :class:`~SAM3DSegmentLib.remote.client.RemoteBackend`."""
    if remote is not None:
        from .remote.options import load_remote_backend

        try:
            return load_remote_backend(remote, model, checkpoint,
                                       lambda: load_backend(None, checkpoint, device, threads, dtype)[0])
        except (RuntimeError, ValueError) as err:  # RemoteError, bad URL: one line naming the fix
            raise CliError(f"--server: {err}") from err
    from .weights import DEFAULT_MODEL, resolve_checkpoint

    name = checkpoint or model or DEFAULT_MODEL
    try:
        path = resolve_checkpoint(name)
    except Exception as err:  # WeightsError and friends carry the fix in their message
        raise CliError(f"cannot find the model: {err}") from err
    try:
        import torch
    except ImportError as err:
        raise CliError("torch is not installed: install it (pip install torch; in 3D Slicer: the PyTorch "
                       "extension) to run the model") from err
    if threads:
        torch.set_num_threads(int(threads))
    from .models.device import resolve_device

    try:
        dev = resolve_device(device)
    except Exception as err:
        raise CliError(f"--device {device}: {err}") from err
    from .models import load_checkpoint

    try:
        net = load_checkpoint(str(path), map_location="cpu")
    except Exception as err:  # noqa: BLE001 - any loader failure is reported with the path
        hint = "" if "Pass " in str(err) else (" Pass a SAM-Med3D (.pth) checkpoint or one saved by sam3d train "
                                               "with --checkpoint, or a model name with --model")
        raise CliError(f"could not load checkpoint {path}: {err}{hint}") from err
    from .backends import LocalBackend

    label = model or (os.path.basename(str(path)) if checkpoint else name)
    try:
        backend = LocalBackend(net, device=str(dev), dtype=dtype, name=f"{label} [{getattr(net, 'description', '')}]")
    except ValueError as err:  # e.g. float16 on the CPU
        raise CliError(f"--dtype {dtype}: {err}") from err
    info = {"model": label, "checkpoint": str(path), "backend": backend.name, "device": str(dev),
            "architecture": getattr(getattr(net, "config", None), "name", None),
            "image_size": int(backend.image_size)}
    return backend, info


def _parse_clamp(text: Optional[str]):
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"malformed --clamp-hu {text!r}: write LO,HI, e.g. --clamp-hu=-1000,1000") from None
    if not lo < hi:
        raise UsageError(f"--clamp-hu {text!r}: LO must be below HI")
    return (lo, hi)


def write_output_mask(path: str, mask_volume, reference, name: str = "Segment_1") -> str:
    from .io import file_extension, write_mask, write_segmentation

    if file_extension(path) == ".seg.nrrd":
        return write_segmentation(path, {name: mask_volume}, reference)
    return write_mask(mask_volume, path)


def _segment(args) -> int:
    t_start = time.perf_counter()
    if not args.click:
        raise UsageError("no clicks: give at least one --click R,A,S (RAS mm) or --click i,j,k with --voxel")
    clicks = [parse_click(c) for c in args.click]
    clamp = _parse_clamp(args.clamp_hu)
    if args.max_regions < 1:
        raise UsageError(f"--max-regions must be >= 1, got {args.max_regions}")
    if not args.spacing > 0:
        raise UsageError(f"--spacing must be a positive number of mm, got {args.spacing}")
    out = _check_output_path(args.out, SEGMENT_OUTPUTS, "--out")
    timings_path = _check_output_path(args.timings, (".json",), "--timings") if args.timings else None
    if timings_path == out:
        raise UsageError("--timings and --out must be different files")

    from .geometry import GeometryError
    from .io import read_volume

    t = time.perf_counter()
    try:
        volume = read_volume(args.image)
    except (ValueError, OSError) as err:
        raise CliError(str(err)) from err
    read_s = time.perf_counter() - t

    # Validate every click against the volume before loading the model.
    for xyz, _ in clicks:
        try:
            if args.voxel:
                import numpy as np

                if not bool(volume.contains_ijk(np.asarray(xyz, dtype=float))):
                    raise GeometryError(
                        f"voxel click i,j,k = {list(xyz)} lies outside the image (grid {list(volume.shape_ijk)}; "
                        "indices start at 0). Click inside the image")
            else:
                volume.ras_to_voxel(xyz)
        except GeometryError as err:
            raise CliError(f"--click {','.join(f'{v:g}' for v in xyz)}: {err}") from err

    from .remote.options import remote_options

    try:
        remote = remote_options(args)
    except ValueError as err:
        raise CliError(str(err)) from err
    t = time.perf_counter()
    backend, info = load_backend(args.model, args.checkpoint, args.device, args.threads, args.dtype, remote=remote)
    load_s = time.perf_counter() - t
    if not args.quiet:
        print(f"model: {backend.name}; checkpoint: {info['checkpoint']}")

    from .session import Session, SessionOptions

    opts = SessionOptions(prompt_mode=args.prompt_mode, region_size=backend.image_size, spacing_mm=args.spacing,
                          extend=not args.no_extend, max_regions=args.max_regions, clamp_hu=clamp)
    session = Session(backend, opts)
    try:
        session.set_volume(volume)
    except GeometryError as err:
        raise CliError(f"{args.image}: {err}") from err
    session.new_object(args.name)
    per_click = []
    truncated = False
    for xyz, positive in clicks:
        u = (session.add_click(ijk=xyz, positive=positive) if args.voxel
             else session.add_click(ras=xyz, positive=positive))
        truncated = truncated or u.truncated
        per_click.append({"click": list(xyz), "positive": positive, "encoded_regions": u.encoded_regions,
                          **{k: v for k, v in u.timings.items()}})
    mask = session.mask()
    t = time.perf_counter()
    written = write_output_mask(out, volume.with_array(mask.copy()), volume, args.name)
    write_s = time.perf_counter() - t
    voxels = int(mask.sum())
    vol_ml = voxels * float(abs(__import__("numpy").linalg.det(volume.ijk_to_ras[:3, :3]))) / 1000.0
    report = {"image": os.path.abspath(args.image), "output": written, **info,
              "clicks_frame": "ijk" if args.voxel else "RAS", "prompt_mode": args.prompt_mode,
              "spacing_mm": args.spacing, "extend": not args.no_extend, "max_regions": args.max_regions,
              "regions": session.region_count(), "max_regions_reached": truncated,
              "mask_voxels": voxels, "mask_ml": vol_ml,
              "timings": {"read_s": read_s, "load_model_s": load_s, "write_s": write_s,
                          "total_s": time.perf_counter() - t_start, "clicks": per_click},
              "cache": session.cache.stats()}
    if timings_path:
        write_json(timings_path, report)
    if not args.quiet:
        print(f"wrote {written}: {voxels} voxels ({vol_ml:.1f} ml), {session.region_count()} model region(s), "
              f"{len(clicks)} click(s)")
        if truncated:
            print(f"warning: the object reached --max-regions {args.max_regions} and may be cut; "
                  "raise --max-regions or use a coarser --spacing")
    return 0


def segment_main(argv: Optional[Sequence[str]] = None) -> int:
    """``sam3d segment`` (argv without the sub-command). Returns the exit status."""
    prog = f"{PROG} segment"
    try:
        args = build_segment_parser().parse_args(_join_click_values(list(argv or [])))
        return _segment(args)
    except UsageError as err:
        return fail(prog, err, 2)
    except CliError as err:
        return fail(prog, err, 1)
    except KeyboardInterrupt:
        return fail(prog, "interrupted", 130)
    except Exception as err:  # noqa: BLE001 - last resort: still one clear line, non-zero exit
        from .geometry import GeometryError

        if isinstance(err, (GeometryError, ValueError, OSError, RuntimeError)):
            return fail(prog, err, 1)
        return fail(prog, f"unexpected {type(err).__name__}: {err} (please report this with "
                          "'sam3d diagnose' output)", 1)


# ------------------------------------------------------------------------------------------ dispatcher
def _usage() -> str:
    width = max(len(n) for n in list(OWN_COMMANDS) + list(EXTERNAL_COMMANDS))
    lines = [f"usage: {PROG} COMMAND [options]   ({PROG} COMMAND --help for a command's options)", "",
             "commands:"]
    for name, text in OWN_COMMANDS.items():
        lines.append(f"  {name.ljust(width)}  {text}")
    for name, (_, _, text) in EXTERNAL_COMMANDS.items():
        lines.append(f"  {name.ljust(width)}  {text}")
    return "\n".join(lines) + "\n"


def _run_external(name: str, argv: List[str]) -> int:
    module_name, attr, _ = EXTERNAL_COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        return fail(f"{PROG} {name}", f"the '{name}' command is not available in this installation "
                                      f"({module_name} cannot be imported: {err}); reinstall sam3dsegment "
                                      "with its dependencies", 1)
    if name == "diagnose" and attr is None:
        if any(a in ("-h", "--help") for a in argv):
            print(f"usage: {PROG} diagnose [--verify]\n\nPrint a plain-text report of the system, torch, "
                  "devices and model caches (--verify: hash cached checkpoints now).")
            return 0
        main = getattr(module, "main", None)
        if main is not None:
            return int(main(argv) or 0)
        print(module.diagnose_report(verify_checksums="--verify" in argv), end="")
        return 0
    main = getattr(module, attr, None)
    if main is None:
        return fail(f"{PROG} {name}", f"the '{name}' command is not available in this installation "
                                      f"({module_name} has no {attr}()); update sam3dsegment", 1)
    return int(main(argv) or 0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``sam3d`` console script and ``python -m SAM3DSegmentLib``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(_usage())
        return 0 if argv else 2
    if argv[0] in ("--version", "-V"):
        from . import __version__

        print(f"{PROG} {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "segment":
        return segment_main(rest)
    if cmd == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    if cmd in EXTERNAL_COMMANDS:
        return _run_external(cmd, rest)
    known = ", ".join(list(OWN_COMMANDS) + list(EXTERNAL_COMMANDS))
    return fail(PROG, f"unknown command {cmd!r}; choose one of {known} (see '{PROG} --help')", 2)


if __name__ == "__main__":
    sys.exit(main())
