"""``sam3d auto``: find every object at once with the automatic mask generator (docs/automatic.md).

Writes one segment per instance (``.seg.nrrd``: named ``auto 001``..., coloured, scores in segment tags) or an
instance label map (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``: instance n = label n), and optionally a JSON
report (``--json``) and a CSV table (``--csv``). Every output is checked before the image is read (as ``sam3d
segment``); all are staged and put in place together: either all are written or none replaces anything (exit 1).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional, Sequence

from . import options as O
from .options import CliError, UsageError
from .runner import command_main

NAME = "auto"
HELP = "find every object at once (automatic masks): one segment per instance, with scores"
DESCRIPTION = ("Prompt a SAM-Med3D-family model everywhere (a point grid and/or bright blobs), keep the stable "
               "masks, drop duplicates, and write one segment per instance with its scores. Presets: 'nodules' "
               "(blob prompts of 4-30 mm, objects up to 20 ml) and 'everything' (a 20 mm grid, default).")
OUTPUTS = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")


def _mm_or_none(text: str) -> Optional[float]:
    if text.strip().lower() in ("none", "off", "0"):
        return None
    return O.positive_float(text)


def _diameters(text: str) -> tuple:
    if text.strip().lower() in ("none", "off"):
        return ()
    try:
        out = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"malformed value {text!r}: write diameters in mm, e.g. 4,8,16,30, or "
                                         "none") from None
    if not out or any(not d > 0 for d in out):
        raise argparse.ArgumentTypeError(f"{text!r}: diameters must be positive mm")
    return out


def _fraction(text: str) -> float:
    value = O.non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _hu_or_none(text: str) -> Optional[float]:
    if text.strip().lower() in ("none", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (HU) or none") from None


def _roi(text: str):
    """``R,A,S,DR,DA,DS`` (centre and size in RAS mm) -> RoiBox."""
    from ..inference.candidates import RoiBox

    try:
        v = [float(x) for x in text.split(",")]
        if len(v) != 6:
            raise ValueError
        return RoiBox(tuple(v[:3]), tuple(v[3:]))
    except ValueError as err:
        detail = f" ({err})" if str(err) else ""
        raise argparse.ArgumentTypeError(f"malformed --roi {text!r}{detail}: write the centre and the size in RAS "
                                         "mm, R,A,S,DR,DA,DS, e.g. --roi=-60,20,-150,120,100,90") from None


def configure(p) -> None:
    from ..inference.auto_options import PRESETS, RANK_BY

    p.add_argument("image", nargs="?", default=None, help="input image file or DICOM series folder (or --sample)")
    O.add_sample_option(p)
    p.add_argument("--roi", type=_roi, default=None, metavar="R,A,S,DR,DA,DS",
                   help="search only inside this box: its centre and size in RAS mm (default: the whole body)")
    p.add_argument("--preset", choices=tuple(PRESETS), default="everything",
                   help="starting settings (the options below change them): everything (a 20 mm prompt grid, "
                        "default) or nodules (blob prompts of 4, 8, 16 and 30 mm, objects up to 20 ml)")
    p.add_argument("--grid", type=_mm_or_none, default=argparse.SUPPRESS, metavar="MM|none",
                   help="prompt grid spacing in mm, or none")
    p.add_argument("--blobs", type=_diameters, default=argparse.SUPPRESS, metavar="D1,D2,...|none",
                   help="blob prompt diameters in mm (Laplacian-of-Gaussian detectors), or none")
    p.add_argument("--blob-min-response", type=O.positive_float, default=argparse.SUPPRESS, metavar="HU",
                   help="weakest blob kept, in HU of contrast (default 150)")
    p.add_argument("--min-stability", type=_fraction, default=argparse.SUPPRESS, metavar="S",
                   help="keep masks whose stability score is at least S (0..1, default 0.8)")
    p.add_argument("--min-iou", type=_fraction, default=argparse.SUPPRESS, metavar="S",
                   help="keep masks whose predicted IoU is at least S (released SAM-Med3D checkpoints never "
                        "trained their IoU head: off by default)")
    p.add_argument("--rank-by", choices=RANK_BY, default=argparse.SUPPRESS,
                   help="what ranks masks for duplicate removal (default stability)")
    p.add_argument("--min-volume", type=O.non_negative_float, default=argparse.SUPPRESS, metavar="ML",
                   help="smallest instance kept, in ml (default 0)")
    p.add_argument("--max-volume", type=_mm_or_none, default=argparse.SUPPRESS, metavar="ML|none",
                   help="largest instance kept, in ml, or none")
    p.add_argument("--nms-iou", type=_fraction, default=argparse.SUPPRESS, metavar="T",
                   help="drop a mask whose IoU with a better one exceeds T (default 0.5)")
    p.add_argument("--max-instances", type=O.positive_int, default=argparse.SUPPRESS, metavar="N",
                   help="keep at most N instances, best first")
    p.add_argument("--points-per-batch", type=O.positive_int, default=argparse.SUPPRESS, metavar="N",
                   help="prompts per decoder call (default 32)")
    p.add_argument("--body-threshold", type=_hu_or_none, default=argparse.SUPPRESS, metavar="HU|none",
                   help="the body is what lies above this (default -500 HU); none searches the whole volume")
    O.add_model_options(p)
    O.add_device_options(p)
    O.add_region_options(p)
    p.add_argument("--out", "-o", required=True,
                   help="output FILE: .seg.nrrd (one segment per instance, scores in its tags) or a label map "
                        ".nii.gz/.nii/.nrrd/.mha (instance n = label n)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the report (instances, scores, timings)")
    p.add_argument("--csv", default=None, metavar="FILE", help="also write one CSV row per instance")
    O.add_overwrite_option(p)
    O.add_quiet_option(p)


#: option dest -> AutoOptions field
_FIELDS = {"grid": "grid_spacing_mm", "blobs": "blob_diameters_mm", "blob_min_response": "blob_min_response",
           "min_stability": "min_stability", "min_iou": "min_predicted_iou", "rank_by": "rank_by",
           "min_volume": "min_volume_ml", "max_volume": "max_volume_ml", "nms_iou": "nms_iou",
           "max_instances": "max_instances", "points_per_batch": "points_per_batch",
           "body_threshold": "body_threshold_hu"}


def normalise_argv(argv: Sequence[str]) -> List[str]:
    """Let ``--roi -60,...``, ``--body-threshold -500`` and ``--clamp-hu -1000,1000`` work."""
    return O.join_option_values(argv, ("--roi", "--body-threshold") + O.NEGATIVE_VALUE_OPTIONS)


def auto_options(args, region_size: int, backend=None):
    """The :class:`~SAM3DSegmentLib.inference.auto_options.AutoOptions` of a command line (preset + changes);
    ``--spacing`` left out is the model's own (``backend``'s; before it is loaded, the SAM-Med3D default)."""
    from ..inference.auto_options import AutoOptions, preset
    from ..inference.options import model_spacing

    changes = {field: getattr(args, dest) for dest, field in _FIELDS.items() if hasattr(args, dest)}
    try:
        return AutoOptions(region_size=region_size, spacing_mm=model_spacing(backend, args.spacing),
                           clamp_hu=args.clamp_hu,
                           **preset(args.preset, **changes))
    except ValueError as err:
        raise UsageError(str(err)) from err


def run(args) -> int:
    t_start = time.perf_counter()
    from .segment import check_output_path

    if (args.image is None) == (args.sample is None):
        raise UsageError("give one input: an image file or DICOM folder, or --sample chest")
    auto_options(args, 128)        # settings checked before anything is read
    inputs = [args.image] if args.image and os.path.isfile(args.image) else []
    out = check_output_path(args.out, OUTPUTS, "--out", inputs, args.overwrite)
    extra = {flag: check_output_path(path, (ext,), flag, inputs, args.overwrite)
             for flag, path, ext in (("--json", args.json, ".json"), ("--csv", args.csv, ".csv")) if path}
    if len({os.path.realpath(p) for p in [out, *extra.values()]}) < 1 + len(extra):
        raise UsageError("--out, --json and --csv must be different files")
    from ..io import read_volume

    try:
        if args.sample == "chest":
            from ..data.sample_data import chest_ct

            volume = chest_ct()
        else:
            volume = read_volume(args.image)
    except (ValueError, OSError) as err:
        raise CliError(str(err)) from err
    from ..inference.backends import load_backend

    backend, info = load_backend(args.model, args.checkpoint, args.device, args.threads, args.dtype)
    opts = auto_options(args, backend.image_size, backend)
    if not args.quiet:
        print(f"model: {backend.name}; checkpoint: {info['checkpoint']}")
    from ..inference.automatic import AutomaticMaskGenerator3D

    progress = None if args.quiet else (lambda f, msg: print(f"  {100 * f:5.1f} %  {msg}", flush=True))
    result = AutomaticMaskGenerator3D(backend, opts).generate(volume, args.roi, progress=progress)
    _write(args, out, extra, volume, result, opts, info, time.perf_counter() - t_start)
    return 0


def _write(args, out, extra, volume, result, opts, info, run_s) -> None:
    import csv
    import io
    from types import SimpleNamespace

    from ..core.atomic import AtomicGroup, atomic_write, write_json
    from ..inference.auto_export import csv_table, payload
    from ..io import file_extension
    from ..io.instances import write_instance_labelmap, write_instance_segmentation

    data = payload(result)
    items = [SimpleNamespace(box=tuple(slice(a, b) for a, b in d["box"]), **{k: d[k] for k in
                             ("mask", "name", "color", "tags")}) for d in data["instances"]]
    report = dict(data["report"], image=str(volume.meta.get("source") or args.image), sample=args.sample,
                  output=out, roi=None if args.roi is None else args.roi.to_dict(), options=opts.to_dict(),
                  model=info, run_s=round(run_s, 3))
    with AtomicGroup() as group:
        if file_extension(out) == ".seg.nrrd":
            write_instance_segmentation(out, items, volume, group=group)
        else:
            write_instance_labelmap(out, items, volume, group=group)
        if "--json" in extra:
            write_json(extra["--json"], report, group=group)
        if "--csv" in extra:
            header, rows = csv_table(report)
            text = io.StringIO()
            csv.writer(text, lineterminator="\n").writerows([header, *rows])

            def write_csv(tmp: str, body: str = text.getvalue()) -> None:
                with open(tmp, "w", encoding="utf-8", newline="") as f:
                    f.write(body)

            atomic_write(extra["--csv"], write_csv, group=group)
    if not args.quiet:
        t = result.timings
        print(f"wrote {out}: {len(result.instances)} instance(s) from {result.decoded} decoded prompt(s) in "
              f"{len(result.regions)} region(s), {t['total_s']:.1f} s" +
              "".join(f"; {flag[2:]} {path}" for flag, path in extra.items()))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``sam3d auto`` (``argv`` without the sub-command): the same parser, messages and exit statuses."""
    return command_main(sys.modules[__name__], argv)
