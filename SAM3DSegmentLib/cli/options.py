"""What every ``sam3d`` sub-command shares: the parser class, the two error types, and the option groups.

An option that several sub-commands take is defined ONCE here, so it has the same spelling, default,
choices and help everywhere (``Testing/test_cli_options.py`` checks the whole table). Nothing here imports
torch or the library's heavy parts: building the ``sam3d`` parser stays cheap.
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Iterable, List, Optional, Sequence, Tuple

from ..core.click_protocols import CLICK_PROTOCOLS, NEWEST_CLICK, click_protocol

PROG = "sam3d"
#: ``--sample`` names (bundled images, read by :mod:`SAM3DSegmentLib.data.sample_data`).
SAMPLES = ("chest",)
DTYPES = ("float32", "bfloat16", "float16")
#: The CT clamp SAM-Med3D's training applied (and ``sam3d train``'s ``data.ct_clamp`` default).
TRAINING_CLAMP_HU = (-1000.0, 1000.0)


class UsageError(Exception):
    """Malformed command line: an unknown or malformed option, a missing or contradictory one (exit status 2)."""


class CliError(Exception):
    """A failure with a message that names the problem and the fix (exit status 1).

    ``details``: optional short lines printed, indented, under the one-line message (e.g. the choices of
    model when none can be found)."""

    def __init__(self, message: str, details: Sequence[str] = ()):
        super().__init__(message)
        self.details = list(details)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``... (see 'sam3d CMD --help')``) raised as :class:`UsageError`, and
    no abbreviated options (``--over`` is refused rather than guessed)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UsageError(f"{message} (see '{self.prog} --help')")


# ------------------------------------------------------------------------------------------ value types
def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {minimum} or more, got {text}")
    return value


def positive_int(text: str) -> int:
    return _whole_number(text, 1)


def non_negative_int(text: str) -> int:
    return _whole_number(text, 0)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be 0 or a positive number, got {text}")
    return value


def clamp_range(text: str) -> Optional[Tuple[float, float]]:
    """``"LO,HI"`` -> (lo, hi); ``"none"`` / ``"off"`` -> None (no clamp)."""
    if text.strip().lower() in ("none", "off"):
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"malformed value {text!r}: write LO,HI, e.g. --clamp-hu=-1000,1000, "
                                         "or none") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise argparse.ArgumentTypeError(f"{text!r}: LO must be below HI, both finite")
    return (lo, hi)


def mean_std(text: str) -> Tuple[float, float]:
    """``"MEAN,STD"`` -> (mean, std), both finite, std > 0."""
    try:
        mean, std = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"malformed value {text!r}: write MEAN,STD, e.g. --znorm=60,55") from None
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: MEAN must be finite and STD positive")
    return (mean, std)


def click_protocol_name(text: str) -> str:
    """A click protocol (``newest-click`` | ``all-clicks``; the older ``newest`` / ``all`` accepted) -> its name."""
    try:
        return click_protocol(text, "the click protocol")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


#: Options whose values may start with '-' (``--clamp-hu -1000,1000``): argparse would read such a value
#: as an option; :func:`join_option_values` glues it to its flag instead.
NEGATIVE_VALUE_OPTIONS = ("--clamp-hu", "--znorm")


def join_option_values(argv: Sequence[str], flags: Iterable[str] = NEGATIVE_VALUE_OPTIONS,
                       aliases: Optional[dict] = None) -> List[str]:
    """``[flag, value]`` -> ``[flag=value]`` for ``flags`` (``aliases`` maps a short flag to its long one)."""
    flags, aliases = tuple(flags), dict(aliases or {})
    out: List[str] = []
    it = iter(argv)
    for tok in it:
        if tok in flags:
            nxt = next(it, None)
            out.append(tok if nxt is None else f"{aliases.get(tok, tok)}={nxt}")
        else:
            out.append(tok)
    return out


# ------------------------------------------------------------------------------------------ option groups
MODEL_HELP = ("registered model name (see 'sam3d download --list'), downloaded into the model cache on first "
              "use; default: sam-med3d-turbo (sam3d demo: a published model already in the cache, else the "
              "bundled demo model)")
CHECKPOINT_HELP = "checkpoint file (.pth/.pt: a SAM-Med3D release or a file written by sam3d train) instead of --model"
DEVICE_HELP = ("where the model runs: auto (default: CUDA if available, else Apple MPS, else CPU), cpu, cuda, "
               "cuda:N or mps")
THREADS_HELP = "CPU threads for torch (default: torch's choice)"
DTYPE_HELP = "compute precision (default float32; float16 needs a GPU; see docs/precision.md)"
SPACING_HELP = ("model input spacing in mm (default: the model's own, 1.5 for SAM-Med3D and 1.0 for the "
                "3DSAM-adapter, the spacings they were trained at; larger = bigger field of view, coarser)")
CLAMP_HELP = ("clamp CT values to LO,HI HU before normalising, e.g. --clamp-hu=-1000,1000 as SAM-Med3D's "
              "training did. Default: none, because SAM-Med3D's reference inference (which produced its "
              "published scores) and the Slicer module do not clamp: every command then gives the Slicer "
              "module's masks for the same model and clicks. For a 3DSAM-adapter model this is its HU window "
              "(default: the model file's or registry entry's, else -1000,1000)")
ZNORM_HELP = ("3DSAM-adapter models only: the dataset's foreground mean and std (HU, after the window clip) the "
              "model was trained with, e.g. --znorm=60,55 (default: the model file's or registry entry's, else "
              "each region's own mean and std)")
OVERWRITE_HELP = "replace output files that already exist (default: refuse, and change nothing)"
QUIET_HELP = "print nothing but errors"
PROMPT_MODE_HELP = ("the click protocol: newest-click: each click alone with the previous mask (SAM-Med3D's training "
                    "and published evaluation; default); all-clicks: every click so far in the click's region with "
                    "the previous mask (SAM-Med3D's inference code). The older spellings newest and all are "
                    "accepted. A model without previous-mask input (the 3DSAM-adapter) always gets all-clicks")
NO_EXTEND_HELP = "do not grow beyond the first model region when the mask touches its border"
NO_HONOUR_HELP = ("show the model's mask as it is: by default an include click's voxel is always in the mask and "
                  "an exclude click's never (with the connected-component cleanup that implies)")
MAX_REGIONS_HELP = "most model regions per object (default 8)"
SAMPLE_HELP = ("use a bundled sample image instead of a file: 'chest' is the chest CT shipped in slicerio "
               "(128x128x34 voxels, 3.05x3.05x10 mm, 7 reference segments)")


def add_model_options(p: argparse.ArgumentParser) -> None:
    """``--model NAME`` | ``--checkpoint PATH`` (one or the other)."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="NAME", default=None, help=MODEL_HELP)
    src.add_argument("--checkpoint", metavar="PATH", default=None, help=CHECKPOINT_HELP)


def add_device_options(p: argparse.ArgumentParser, dtype: bool = True) -> None:
    """``--device``, ``--threads`` and (unless ``dtype=False``) ``--dtype``."""
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--threads", type=positive_int, default=None, metavar="N", help=THREADS_HELP)
    if dtype:
        p.add_argument("--dtype", default="float32", choices=DTYPES, help=DTYPE_HELP)


def add_region_options(p: argparse.ArgumentParser) -> None:
    """What the model's regions see: ``--spacing`` (None: the model's own) and ``--clamp-hu``."""
    p.add_argument("--spacing", type=positive_float, default=None, metavar="MM", help=SPACING_HELP)
    p.add_argument("--clamp-hu", type=clamp_range, default=None, metavar="LO,HI|none", help=CLAMP_HELP)


UPSAMPLING_HELP = ("how the model's low-res answer (one logit per 6 mm cell) reaches the image's voxels: trilinear "
                   "(default: interpolated, as SAM-Med3D's own code does) or guided (refined near the boundary with "
                   "the CT itself: crisper thin structures; docs/guided_upsampling.md)")


def add_upsampling_option(p: argparse.ArgumentParser) -> None:
    """``--upsampling trilinear|guided`` (``SessionOptions.upsampling``)."""
    from ..inference.guided import UPSAMPLING_MODES

    p.add_argument("--upsampling", choices=UPSAMPLING_MODES, default="trilinear", help=UPSAMPLING_HELP)


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """How the interactive engine turns clicks into a mask: prompt mode, spacing, clamp, region growth, click
    honouring."""
    p.add_argument("--prompt-mode", type=click_protocol_name, choices=tuple(CLICK_PROTOCOLS), default=NEWEST_CLICK,
                   help=PROMPT_MODE_HELP)
    p.add_argument("--spacing", type=positive_float, default=None, metavar="MM", help=SPACING_HELP)
    p.add_argument("--clamp-hu", type=clamp_range, default=None, metavar="LO,HI|none", help=CLAMP_HELP)
    p.add_argument("--znorm", type=mean_std, default=None, metavar="MEAN,STD", help=ZNORM_HELP)
    p.add_argument("--no-extend", action="store_true", help=NO_EXTEND_HELP)
    p.add_argument("--max-regions", type=positive_int, default=8, metavar="N", help=MAX_REGIONS_HELP)
    p.add_argument("--no-honour-clicks", dest="honour_clicks", action="store_false", help=NO_HONOUR_HELP)


SERVER_HELP = ("run the model on 'sam3d serve' at URL instead of here (docs/remote.md); repeat (or comma-separate) "
               "for equivalent servers to fail over between. --model then names a model the server offers; "
               "--device/--dtype/--threads apply only to a local torch decoder (--checkpoint)")
SERVER_KEY_FILE_HELP = ("file holding the server's key on its first line (default: $SAM3D_SERVER_KEY); a key is never "
                        "a command-line argument")
SERVER_MODE_HELP = ("split: decode clicks here (ONNX, or torch with --checkpoint of the served file); full: the server "
                    "decodes; auto (default): split when onnxruntime is installed")
SERVER_TIMEOUT_HELP = "seconds to wait for one server's answer (default 60)"
SERVER_CA_HELP = "CA certificate to trust for an https server (e.g. a self-signed one)"
WIRE_DTYPE_HELP = "precision of the region and embedding on the wire (float32: exact, twice the bytes)"


def add_server_options(p: argparse.ArgumentParser) -> None:
    """``--server URL`` (+ key file, mode, time limit, CA, wire precision): remote inference. The key comes
    from ``--server-key-file`` or ``$SAM3D_SERVER_KEY``, never from the command line (other users can read a
    process's arguments). :func:`remote_options` turns the parsed values into the library's options."""
    g = p.add_argument_group("remote inference (docs/remote.md)")
    g.add_argument("--server", action="append", default=None, metavar="URL", help=SERVER_HELP)
    g.add_argument("--server-key-file", metavar="PATH", default=None, help=SERVER_KEY_FILE_HELP)
    g.add_argument("--server-mode", choices=("auto", "split", "full"), default="auto", help=SERVER_MODE_HELP)
    g.add_argument("--server-timeout", type=positive_float, default=60.0, metavar="S", help=SERVER_TIMEOUT_HELP)
    g.add_argument("--server-ca", metavar="PEM", default=None, help=SERVER_CA_HELP)
    g.add_argument("--wire-dtype", choices=("float16", "float32"), default="float16", help=WIRE_DTYPE_HELP)


def remote_options(args: argparse.Namespace):
    """:class:`~SAM3DSegmentLib.remote.options.RemoteOptions` from :func:`add_server_options`' values (the key
    read from its file or the environment), or None when no ``--server`` was given."""
    servers = [u.strip() for item in (getattr(args, "server", None) or []) for u in item.split(",") if u.strip()]
    if not servers:
        return None
    from ..remote.options import RemoteOptions, read_key

    try:
        key = read_key(args.server_key_file)
    except ValueError as err:
        raise CliError(str(err)) from err
    return RemoteOptions(servers=servers, key=key, mode=args.server_mode, timeout_s=args.server_timeout,
                         ca_file=args.server_ca, wire_dtype=args.wire_dtype)


def add_sample_option(p: argparse.ArgumentParser, target=None) -> None:
    (target or p).add_argument("--sample", choices=SAMPLES, default=None, help=SAMPLE_HELP)


def add_overwrite_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def add_quiet_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", "-q", action="store_true", help=QUIET_HELP)


# ------------------------------------------------------------------------------------------ outputs
def refuse_existing(flag: str, paths: Sequence[str], overwrite: bool, folder: Optional[str] = None) -> None:
    """The one overwrite rule of every command: an output that already exists is refused (exit 1, nothing
    changed) unless ``--overwrite`` is given. ``paths``: the output files (of ``folder`` when given)."""
    existing = [p for p in paths if os.path.lexists(p)]
    if not existing or overwrite:
        return
    if folder is None:
        raise CliError(f"{flag} {existing[0]} already exists; pass --overwrite to replace it, or choose another "
                       "file")
    names = ", ".join(os.path.basename(p) for p in existing)
    raise CliError(f"{flag} {folder} already holds {names}; pass --overwrite to replace "
                   f"{'them' if len(existing) > 1 else 'it'}, or choose another folder")


def output_folder(path: str, flag: str = "--out") -> str:
    """Absolute path of an output folder that may not exist yet but whose parent must (not a file)."""
    out = os.path.abspath(path)
    if os.path.exists(out) and not os.path.isdir(out):
        raise CliError(f"{flag} {out} is a file; give a folder")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise CliError(f"{flag} {out}: its parent folder {parent} does not exist; create it first")
    return out


def apply_model_settings(backend, args, log=print) -> None:
    """After the model is loaded: ``--znorm`` sets a 3DSAM-adapter's dataset statistics (refused for other
    models), and a model's limits and input normalisation are said once (``log``, unless ``--quiet``)."""
    znorm = getattr(args, "znorm", None)
    intensity = getattr(backend, "intensity", None)
    if znorm is not None:
        if intensity is None:
            raise UsageError("--znorm applies to 3DSAM-adapter models only; this model normalises each region "
                             "itself (leave --znorm out)")
        backend.intensity = intensity = intensity.replaced(mean_std=znorm)
    if getattr(args, "quiet", False):
        return
    notice = getattr(backend, "limits_notice", None)
    if notice:
        log(f"note: {notice}")
    if intensity is not None:
        clamp = getattr(args, "clamp_hu", None)
        log("input: " + (intensity.replaced(window=clamp) if clamp else intensity).describe())
