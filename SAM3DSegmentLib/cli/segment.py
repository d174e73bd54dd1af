"""``sam3d segment``: segment one object of a 3D image from clicks and write the mask on the image's grid.

Every output path is checked before the image is read or the model loaded (file type, existing folder,
not a folder, not the input image, not an existing file unless ``--overwrite``, a file can be created in
the folder). The mask and the ``--timings`` JSON are then staged as complete, checked temporary files and
put in place together (:class:`SAM3DSegmentLib.core.atomic.AtomicGroup`): either both are written or
neither replaces anything, and the exit status is 1.
"""
from __future__ import annotations

import os
import re
import sys
import time
from typing import List, Optional, Sequence, Tuple

from ..core.atomic import write_json
from . import options as O
from .options import CliError, UsageError
from .runner import command_main

NAME = "segment"
HELP = "segment a 3D image from clicks and write the mask"
DESCRIPTION = ("Segment one object of a 3D image (NIfTI, NRRD, MHA or a DICOM folder) from clicks with a "
               "SAM-Med3D-family model and write the mask on the image's grid.")
#: Output file types ``sam3d segment`` writes.
SEGMENT_OUTPUTS = (".nii.gz", ".nii", ".nrrd", ".mha", ".seg.nrrd")
#: Colour of the segment in a ``.seg.nrrd`` written by ``sam3d segment`` (the demo's first colour).
DEFAULT_SEGMENT_COLOR = (230 / 255.0, 75 / 255.0, 60 / 255.0)

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


def normalise_argv(argv: Sequence[str]) -> List[str]:
    """Let ``--click -12,3,4`` and ``--clamp-hu -1000,1000`` work (argparse would read a value starting
    with '-' as an option)."""
    return O.join_option_values(argv, ("--click", "-c") + O.NEGATIVE_VALUE_OPTIONS, {"-c": "--click"})


def parse_color(text: str) -> Tuple[float, float, float]:
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


def configure(p) -> None:
    p.add_argument("image", nargs="?", default=None,
                   help="input image file or DICOM series folder (or use --sample chest)")
    O.add_sample_option(p)
    p.add_argument("--series", default=None, metavar="UID",
                   help="DICOM folder with several series: the SeriesInstanceUID to read (default: the series "
                        "with the most files; the choice is printed and recorded in --timings)")
    p.add_argument("--click", "-c", action="append", default=[], metavar="R,A,S[:+|-]",
                   help="a click in RAS millimetres (Slicer's coordinates), ':+' positive (default) or ':-' "
                        "negative; repeat for more clicks (applied in order)")
    p.add_argument("--voxel", action="store_true",
                   help="clicks are voxel indices i,j,k (0-based, as in Slicer's data probe) instead of RAS mm")
    p.add_argument("--init-mask", default=None, metavar="FILE",
                   help="refine an existing segmentation: start from this mask (a label file or .seg.nrrd on any "
                        "grid, placed in physical space) and let the clicks edit it; voxels outside the regions "
                        "around the clicks keep it exactly (such an object does not grow into neighbouring regions); "
                        "SAM-Med3D models only (a 3DSAM-adapter model has no previous-mask input)")
    p.add_argument("--init-segment", default=None, metavar="NAME|VALUE",
                   help="with --init-mask: the segment of a .seg.nrrd (name or id), or the label value of a label "
                        "map; needed when the file holds several")
    O.add_model_options(p)
    O.add_device_options(p)
    O.add_engine_options(p)
    O.add_upsampling_option(p)
    p.add_argument("--name", default="Segment_1", help="segment name in a .seg.nrrd output")
    p.add_argument("--color", default=None, metavar="#RRGGBB|R,G,B",
                   help="segment colour in a .seg.nrrd output (default #e64b3c, red; R,G,B in 0..1 also work)")
    p.add_argument("--out", "-o", required=True, help="output mask: .nii.gz, .nii, .nrrd, .mha or .seg.nrrd")
    p.add_argument("--timings", default=None, metavar="JSON",
                   help="also write timings and run details here (written together with the mask: both or "
                        "neither)")
    O.add_overwrite_option(p)
    O.add_quiet_option(p)
    O.add_server_options(p)


# ------------------------------------------------------------------------------------------ outputs
def _same_file(a: str, b: str) -> bool:
    """Do the two paths name the same file (``./x`` vs absolute, through symlinks, hard links)?"""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist yet: compare where they resolve
        return os.path.realpath(a) == os.path.realpath(b)


def check_output_path(path: str, allowed: Sequence[str], flag: str, inputs: Sequence[str] = (),
                      overwrite: bool = False) -> str:
    """Refuse, before any work, an output that cannot be written, would overwrite an input, or exists
    without ``overwrite``.

    Checks the file type, that the folder exists and a file can be created in it, that the path is not a
    folder, that it is not one of ``inputs`` (also through ``./``, symlinks or hard links), and the
    overwrite rule. Returns the absolute path."""
    import tempfile

    from ..core.atomic import resolve_target
    from ..io import file_extension

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
    O.refuse_existing(flag, [full], overwrite)
    try:  # the only reliable test (os.access ignores read-only mounts' details, ACLs, root...)
        fd, probe = tempfile.mkstemp(prefix=".sam3d-write-check-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise CliError(f"{flag} {path}: cannot create files in {folder} ({err.strerror or err}); choose a "
                       "writable folder") from err
    return full


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
    from ..io import read_volume

    try:
        if args.sample == "chest":
            from ..data.sample_data import chest_ct

            return chest_ct()
        return read_volume(args.image, series_uid=args.series)
    except (ValueError, OSError) as err:
        raise CliError(str(err)) from err


def _dicom_series(volume, args) -> Optional[dict]:
    """The DICOM series choice (recorded in --timings; printed when the folder holds several series)."""
    if volume.meta.get("format") != "dicom":
        return None
    series = {"series_uid": volume.meta.get("series_uid"), "n_files": volume.meta.get("n_files"),
              "other_series": list(volume.meta.get("other_series") or []),
              "chosen_by": "--series" if args.series else "most files"}
    if series["other_series"] and not args.quiet:
        counts = volume.meta.get("series_files") or {}
        others = ", ".join(f"{u} ({counts.get(u, '?')} files)" for u in series["other_series"])
        how = "as asked with --series" if args.series else "the one with the most files"
        print(f"DICOM folder holds {1 + len(series['other_series'])} series; reading {series['series_uid']} "
              f"({series['n_files']} files), {how}. Others: {others}. Choose one with --series UID")
    return series


def _read_init_mask(args, volume):
    """The ``--init-mask`` on the image's grid (nearest neighbour in physical space), or None."""
    if args.init_mask is None:
        return None
    from ..io import AmbiguousMaskError, read_mask, resample_like

    try:
        mask = resample_like(read_mask(args.init_mask, args.init_segment), volume, "nearest")
    except AmbiguousMaskError as err:
        raise CliError(f"--init-mask: {err} with --init-segment NAME|VALUE") from err
    except (ValueError, OSError) as err:
        raise CliError(f"--init-mask: {err}") from err
    if not mask.array.any():
        raise CliError(f"--init-mask {args.init_mask}: no voxel of the mask lies inside the image (a mask of another "
                       "image, or placed elsewhere in space?); give a mask of this image")
    return mask


def _check_clicks(clicks, volume, voxel: bool) -> None:
    """Every click lies inside the volume (checked before the model is loaded)."""
    import numpy as np

    from ..core.geometry import GeometryError

    for xyz, _ in clicks:
        try:
            if voxel:
                if not bool(volume.contains_ijk(np.asarray(xyz, dtype=float))):
                    raise GeometryError(
                        f"voxel click i,j,k = {list(xyz)} lies outside the image (grid {list(volume.shape_ijk)}; "
                        "indices start at 0). Click inside the image")
            else:
                volume.ras_to_voxel(xyz)
        except GeometryError as err:
            raise CliError(f"--click {','.join(f'{v:g}' for v in xyz)}: {err}") from err


# ------------------------------------------------------------------------------------------ run
def run(args) -> int:
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
    if args.init_segment is not None and args.init_mask is None:
        raise UsageError("--init-segment chooses a segment of --init-mask; give --init-mask FILE too")
    clicks = [parse_click(c) for c in args.click]
    color = parse_color(args.color) if args.color is not None else None
    inputs = [args.image] if args.image and os.path.isfile(args.image) else []
    out = check_output_path(args.out, SEGMENT_OUTPUTS, "--out", inputs, args.overwrite)
    timings_path = (check_output_path(args.timings, (".json",), "--timings", inputs, args.overwrite)
                    if args.timings else None)
    if timings_path and _same_file(timings_path, out):
        raise UsageError("--timings and --out must be different files")
    remote = O.remote_options(args)  # the key file is read now: a bad one fails before any work

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
    series = _dicom_series(volume, args)
    _check_clicks(clicks, volume, args.voxel)
    init = _read_init_mask(args, volume)

    from ..inference.backends import load_backend

    t = time.perf_counter()
    backend, info = load_backend(args.model, args.checkpoint, args.device, args.threads, args.dtype, remote=remote)
    load_s = time.perf_counter() - t
    if not args.quiet:
        print(f"model: {backend.name}; checkpoint: {info['checkpoint']}")
    O.apply_model_settings(backend, args)
    if getattr(backend, "intensity", None) is not None:
        info["intensity"] = backend.intensity.to_dict()
    if not getattr(backend, "supports_exclude", True) and not all(positive for _, positive in clicks):
        raise UsageError(f"{sum(1 for _, p in clicks if not p)} exclude click(s) (:-) given, but this model "
                         "(3DSAM-adapter family) has no exclude clicks: its points carry no include/exclude label. "
                         "Give include clicks only, or use a SAM-Med3D model")
    if init is not None and not getattr(backend, "supports_mask_prompt", True):
        raise UsageError(f"--init-mask {args.init_mask} given, but this model (3DSAM-adapter family) has no "
                         "previous-mask input: it cannot refine an existing mask. Leave out --init-mask to segment "
                         "from the clicks alone, or use a SAM-Med3D model to refine the mask")

    from ..inference.session import Session, SessionOptions

    opts = SessionOptions(prompt_mode=args.prompt_mode, region_size=backend.image_size, spacing_mm=args.spacing,
                          extend=not args.no_extend, max_regions=args.max_regions, clamp_hu=args.clamp_hu,
                          honour_clicks=args.honour_clicks, upsampling=args.upsampling)
    session = Session(backend, opts)
    try:
        session.set_volume(volume)
    except GeometryError as err:
        raise CliError(f"{args.image or 'sample ' + args.sample}: {err}") from err
    session.new_object(args.name)
    if init is not None:
        session.set_initial_mask(init)
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
                      "clicks_frame": "ijk" if args.voxel else "RAS", "prompt_mode": session.options.prompt_mode,
                      "spacing_mm": session.options.spacing_mm, "clamp_hu": args.clamp_hu,
                      "znorm": args.znorm, "extend": not args.no_extend,
                      "max_regions": args.max_regions, "upsampling": args.upsampling,
                      "init_mask": None if init is None else {
                          "path": os.path.abspath(args.init_mask), "segment": args.init_segment,
                          "voxels_on_image_grid": int(init.array.sum()), "extend": opts.init_extend},
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``sam3d segment`` (``argv`` without the sub-command): the same parser, messages and exit statuses."""
    return command_main(sys.modules[__name__], argv)
