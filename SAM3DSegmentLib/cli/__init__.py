"""The ``sam3d`` command: ``segment`` and ``demo`` live here; ``train``, ``evaluate``, ``diagnose`` and
``download`` are dispatched to their modules (imported lazily, so ``sam3d segment`` never pays for them).

Exit status: 0 success, 1 runtime failure (unreadable image, click outside the volume, bad checkpoint,
missing output folder, ...), 2 usage error (malformed arguments). Every failure prints ONE line on stderr
naming the problem and the fix; the one exception is a model that cannot be found, whose line is followed
by a short indented list of the ways to get one. Outputs are written atomically, so a failed run leaves no
partial file.

``sam3d segment`` checks every output path before it reads the image or loads the model (file type,
existing folder, not a folder, not the input image, a file can be created in the folder). The mask and
the ``--timings`` JSON are then staged as complete, checked temporary files and put in place together
(:class:`SAM3DSegmentLib.core.atomic.AtomicGroup`): either both are written or neither replaces anything,
and the exit status is 1.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from ..core.atomic import write_json

PROG = "sam3d"
#: Output file types ``sam3d segment`` writes.
SEGMENT_OUTPUTS = (".nii.gz", ".nii", ".nrrd", ".mha", ".seg.nrrd")
#: ``--sample`` names of ``sam3d segment`` (bundled images, read by :mod:`SAM3DSegmentLib.data.sample_data`).
SAMPLES = ("chest",)
#: Colour of the segment in a ``.seg.nrrd`` written by ``sam3d segment`` (the demo's first colour).
DEFAULT_SEGMENT_COLOR = (230 / 255.0, 75 / 255.0, 60 / 255.0)

#: Sub-commands provided by other modules: name -> (module, attribute, one-line help).
EXTERNAL_COMMANDS = {
    "train": ("SAM3DSegmentLib.train", "main", "fine-tune or train a model on a labelled dataset"),
    "evaluate": ("SAM3DSegmentLib.eval.evaluate", "main", "score a model with simulated clicks (Dice, NSD, HD95)"),
    "diagnose": ("SAM3DSegmentLib.cli.diagnose", None, "print a report of the system, torch, devices and caches"),
    "download": ("SAM3DSegmentLib.weights", "main", "download and verify published checkpoints"),
}
OWN_COMMANDS = {
    "segment": "segment a 3D image from clicks and write the mask",
    "demo": "segment structures of the sample chest CT with scripted clicks (masks, overlay, timings, Dice)",
}


class UsageError(Exception):
    """Malformed command line (exit status 2)."""


class CliError(Exception):
    """A runtime failure with a message that names the problem and the fix (exit status 1).

    ``details``: optional short lines printed, indented, under the one-line message (e.g. the choices of
    model when none can be found)."""

    def __init__(self, message: str, details: Sequence[str] = ()):
        super().__init__(message)
        self.details = list(details)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``PROG CMD: error: ... (see --help)``) and exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def fail(prog: str, err: BaseException, status: int) -> int:
    lines = [f"{prog}: error: {_one_line(err)}"]
    lines += ["  " + " ".join(str(d).splitlines()) for d in getattr(err, "details", ())]
    sys.stderr.write("\n".join(lines) + "\n")
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
    p.add_argument("image", nargs="?", default=None,
                   help="input image file or DICOM series folder (or use --sample chest)")
    p.add_argument("--sample", choices=SAMPLES, default=None,
                   help="segment a bundled sample image instead of a file: 'chest' is the chest CT shipped in "
                        "slicerio (128x128x34 voxels, 3.05x3.05x10 mm); try it with --model demo")
    p.add_argument("--series", default=None, metavar="UID",
                   help="DICOM folder with several series: the SeriesInstanceUID to read (default: the series "
                        "with the most files; the choice is printed and recorded in --timings)")
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
    p.add_argument("--color", default=None, metavar="#RRGGBB|R,G,B",
                   help="segment colour in a .seg.nrrd output (default #e64b3c, red; R,G,B in 0..1 also work)")
    p.add_argument("--out", "-o", required=True, help="output mask: .nii.gz, .nii, .nrrd, .mha or .seg.nrrd")
    p.add_argument("--timings", default=None, metavar="JSON",
                   help="also write timings and run details here (written together with the mask: both or "
                        "neither)")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")
    return p


def _same_file(a: str, b: str) -> bool:
    """Do the two paths name the same file (``./x`` vs absolute, through symlinks, hard links)?"""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist yet: compare where they resolve
        return os.path.realpath(a) == os.path.realpath(b)


def _check_output_path(path: str, allowed: Sequence[str], flag: str, inputs: Sequence[str] = ()) -> str:
    """Refuse, before any work, an output that cannot be written or would overwrite an input.

    Checks the file type, that the folder exists and a file can be created in it, that the path is not a
    folder, and that it is not one of ``inputs`` (also through ``./``, symlinks or hard links). Returns the
    absolute path."""
    import tempfile

    from ..core.atomic import resolve_target
    from ..io.volumes import file_extension

    ext = file_extension(path)
    if ext not in allowed:
        raise UsageError(f"{flag} {path!r}: unsupported file type '{ext or '(none)'}'; use one of "
                         f"{', '.join(allowed)}")
    full = os.path.abspath(path)
    target = resolve_target(full)
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        raise CliError(f"{flag} {path}: the folder {folder} does not exist; create it first or choose "
                       "another output path")
    if os.path.isdir(target):
        raise CliError(f"{flag} {path} is a folder; give a file name")
    for src in inputs:
        if src and _same_file(full, src):
            raise CliError(f"{flag} {path} is the input image {src}; writing there would destroy it. Choose "
                           "another output file")
    try:  # the only reliable test (os.access ignores read-only mounts' details, ACLs, root...)
        fd, probe = tempfile.mkstemp(prefix=".sam3d-write-check-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise CliError(f"{flag} {path}: cannot create files in {folder} ({err.strerror or err}); choose a "
                       "writable folder") from err
    return full


def load_backend(model: Optional[str], checkpoint: Optional[str], device: str = "auto",
                 threads: Optional[int] = None, dtype: str = "float32"):
    """Resolve the checkpoint, load it and wrap it in a :class:`LocalBackend`. Returns (backend, info)."""
    from ..weights import DEFAULT_MODEL, get_weights, resolve_checkpoint

    name = checkpoint or model or DEFAULT_MODEL
    try:  # --checkpoint is always a path (a Path never means a model name); --model only a registered name
        path = resolve_checkpoint(Path(checkpoint) if checkpoint else get_weights(name).name)
    except Exception as err:  # WeightsError and friends carry the fix in their message
        if checkpoint or name.lower() == "demo":
            raise CliError(f"cannot find the model: {err}") from err
        raise _model_missing_error(model, name, err) from err
    try:
        import torch
    except ImportError as err:
        raise CliError("torch is not installed: install it (pip install torch; in 3D Slicer: the PyTorch "
                       "extension) to run the model") from err
    if threads:
        torch.set_num_threads(int(threads))
    from ..models.device import resolve_device

    try:
        dev = resolve_device(device)
    except Exception as err:
        raise CliError(f"--device {device}: {err}") from err
    from ..models import load_checkpoint

    try:
        net = load_checkpoint(str(path), map_location="cpu")
    except Exception as err:  # noqa: BLE001 - any loader failure is reported with the path
        hint = "" if "Pass " in str(err) else (" Pass a SAM-Med3D (.pth) checkpoint or one saved by sam3d train "
                                               "with --checkpoint, or a model name with --model")
        raise CliError(f"could not load checkpoint {path}: {err}{hint}") from err
    from ..inference.backends import LocalBackend

    label = model or (os.path.basename(str(path)) if checkpoint else name)
    try:
        backend = LocalBackend(net, device=str(dev), dtype=dtype, name=f"{label} [{getattr(net, 'description', '')}]")
    except ValueError as err:  # e.g. float16 on the CPU
        raise CliError(f"--dtype {dtype}: {err}") from err
    info = {"model": label, "checkpoint": str(path), "backend": backend.name, "device": str(dev),
            "architecture": getattr(getattr(net, "config", None), "name", None),
            "image_size": int(backend.image_size)}
    return backend, info


def _model_missing_error(model: Optional[str], name: str, err: BaseException) -> CliError:
    """A registered model that is neither cached nor downloadable: the reason, then the choices, one a line."""
    reason = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
    head = (f"no model given, and the default model {name} is not available: {reason}" if model is None
            else f"cannot find the model {name}: {reason}")
    details = ["choose one:",
               "--model demo        the small model bundled with sam3dsegment (works offline; rough masks, "
               "for trying things out)",
               "--checkpoint PATH   a SAM-Med3D .pth checkpoint file you already have"]
    try:
        from ..weights import checkpoint_dir, get_weights

        entry = get_weights(name)
        url = entry.download_url()
        where = f" (from {url})" if url else ""
        details.append(f"or copy {entry.filename}{where} into {checkpoint_dir()}")
    except Exception:  # noqa: BLE001 - the list above is still complete without the cache hint
        pass
    return CliError(head, details)


def _parse_color(text: str) -> Tuple[float, float, float]:
    """``#rrggbb`` or ``R,G,B`` (each 0..1) -> (r, g, b) in 0..1."""
    t = text.strip()
    try:
        if t.startswith("#") and len(t) == 7:
            rgb = tuple(int(t[i:i + 2], 16) / 255.0 for i in (1, 3, 5))
        else:
            rgb = tuple(float(v) for v in t.split(","))
    except ValueError:
        rgb = ()
    if len(rgb) != 3 or not all(0.0 <= c <= 1.0 for c in rgb):
        raise UsageError(f"malformed --color {text!r}: write #rrggbb (e.g. #e64b3c) or three numbers 0..1, "
                         "e.g. --color 0.9,0.3,0.2")
    return rgb


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


def write_output_mask(path: str, mask_volume, reference, name: str = "Segment_1",
                      color: Optional[Sequence[float]] = None, group=None) -> str:
    """Write the mask as a label map (NIfTI/NRRD/MHA) or a one-segment ``.seg.nrrd`` (with ``color``,
    default :data:`DEFAULT_SEGMENT_COLOR`). ``group``: stage into an ``AtomicGroup`` instead of writing now."""
    from ..io import file_extension, write_mask, write_segmentation

    if file_extension(path) == ".seg.nrrd":
        rgb = tuple(color) if color is not None else DEFAULT_SEGMENT_COLOR
        return write_segmentation(path, {name: mask_volume}, reference, colors={name: rgb}, group=group)
    return write_mask(mask_volume, path, group=group)


def _read_input(args):
    """The input volume (file, DICOM folder or ``--sample``), with ``meta["source"]`` its path."""
    from ..io.volumes import read_volume

    try:
        if args.sample == "chest":
            from ..data.sample_data import chest_ct

            return chest_ct()
        return read_volume(args.image, series_uid=args.series)
    except (ValueError, OSError) as err:
        raise CliError(str(err)) from err


def _segment(args) -> int:
    t_start = time.perf_counter()
    if args.image is None and args.sample is None:
        raise UsageError("no input: give an image file or DICOM folder, or --sample chest for the bundled "
                         "chest CT")
    if args.image is not None and args.sample is not None:
        raise UsageError(f"give either an image ({args.image}) or --sample {args.sample}, not both")
    if args.series is not None and args.sample is not None:
        raise UsageError("--series chooses a series in a DICOM folder; it does not apply to --sample")
    if not args.click:
        raise UsageError("no clicks: give at least one --click R,A,S (RAS mm) or --click i,j,k with --voxel")
    clicks = [parse_click(c) for c in args.click]
    clamp = _parse_clamp(args.clamp_hu)
    color = _parse_color(args.color) if args.color is not None else None
    if args.max_regions < 1:
        raise UsageError(f"--max-regions must be >= 1, got {args.max_regions}")
    if not args.spacing > 0:
        raise UsageError(f"--spacing must be a positive number of mm, got {args.spacing}")
    inputs = [args.image] if args.image and os.path.isfile(args.image) else []
    out = _check_output_path(args.out, SEGMENT_OUTPUTS, "--out", inputs)
    timings_path = _check_output_path(args.timings, (".json",), "--timings", inputs) if args.timings else None
    if timings_path and _same_file(timings_path, out):
        raise UsageError("--timings and --out must be different files")

    import numpy as np

    from ..core.geometry import GeometryError

    t = time.perf_counter()
    volume = _read_input(args)
    read_s = time.perf_counter() - t
    source = str(volume.meta.get("source") or args.image)
    if args.sample:  # the bundled file is an input too
        for flag, path in (("--out", out), ("--timings", timings_path)):
            if path and _same_file(path, source):
                raise CliError(f"{flag} {path} is the sample image {source}; choose another output file")
    series = None
    if volume.meta.get("format") == "dicom":
        series = {"series_uid": volume.meta.get("series_uid"), "n_files": volume.meta.get("n_files"),
                  "other_series": list(volume.meta.get("other_series") or []),
                  "chosen_by": "--series" if args.series else "most files"}
        if series["other_series"] and not args.quiet:
            counts = volume.meta.get("series_files") or {}
            others = ", ".join(f"{u} ({counts.get(u, '?')} files)" for u in series["other_series"])
            how = "as asked with --series" if args.series else "the one with the most files"
            print(f"DICOM folder holds {1 + len(series['other_series'])} series; reading {series['series_uid']} "
                  f"({series['n_files']} files), {how}. Others: {others}. Choose one with --series UID")

    # Validate every click against the volume before loading the model.
    for xyz, _ in clicks:
        try:
            if args.voxel:
                if not bool(volume.contains_ijk(np.asarray(xyz, dtype=float))):
                    raise GeometryError(
                        f"voxel click i,j,k = {list(xyz)} lies outside the image (grid {list(volume.shape_ijk)}; "
                        "indices start at 0). Click inside the image")
            else:
                volume.ras_to_voxel(xyz)
        except GeometryError as err:
            raise CliError(f"--click {','.join(f'{v:g}' for v in xyz)}: {err}") from err

    t = time.perf_counter()
    backend, info = load_backend(args.model, args.checkpoint, args.device, args.threads, args.dtype)
    load_s = time.perf_counter() - t
    if not args.quiet:
        print(f"model: {backend.name}; checkpoint: {info['checkpoint']}")

    from ..inference.session import Session, SessionOptions

    opts = SessionOptions(prompt_mode=args.prompt_mode, region_size=backend.image_size, spacing_mm=args.spacing,
                          extend=not args.no_extend, max_regions=args.max_regions, clamp_hu=clamp)
    session = Session(backend, opts)
    try:
        session.set_volume(volume)
    except GeometryError as err:
        raise CliError(f"{args.image or 'sample ' + args.sample}: {err}") from err
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
    from ..core.atomic import AtomicGroup

    # Mask and timings are staged (written, checked) first and put in place together: both or neither.
    with AtomicGroup() as group:
        t = time.perf_counter()
        written = write_output_mask(out, volume.with_array(mask.copy()), volume, args.name, color, group=group)
        write_s = time.perf_counter() - t
        voxels = int(mask.sum())
        vol_ml = voxels * float(abs(np.linalg.det(volume.ijk_to_ras[:3, :3]))) / 1000.0
        if timings_path:
            report = {"image": os.path.abspath(source), "sample": args.sample, "output": written, **info,
                      "dicom_series": series,
                      "clicks_frame": "ijk" if args.voxel else "RAS", "prompt_mode": args.prompt_mode,
                      "spacing_mm": args.spacing, "extend": not args.no_extend, "max_regions": args.max_regions,
                      "regions": session.region_count(), "max_regions_reached": truncated,
                      "mask_voxels": voxels, "mask_ml": vol_ml,
                      "timings": {"read_s": read_s, "load_model_s": load_s, "write_s": write_s,
                                  "total_s": time.perf_counter() - t_start, "clicks": per_click},
                      "cache": session.cache.stats()}
            write_json(timings_path, report, group=group)
    if not args.quiet:
        print(f"wrote {written}: {voxels} voxels ({vol_ml:.1f} ml), {session.region_count()} model region(s), "
              f"{len(clicks)} click(s)" + (f"; details in {timings_path}" if timings_path else ""))
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
        from ..core.geometry import GeometryError

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
        from .. import __version__

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
