"""Running one ``sam3d`` sub-command: the ONE place where exceptions become exit statuses and messages.

Exit status: 0 success; 1 bad data or a runtime failure (an unreadable image, a click outside the volume,
a bad checkpoint, a missing dataset, an output that exists without ``--overwrite``, a failed download, a
full disk, ...); 2 a usage error (an unknown, malformed, missing or contradictory option, or a training
config with an unknown key or a wrong value); 130 interrupted. Every failure prints ONE line on stderr,
``sam3d CMD: error: ...``, naming the problem and the fix; the one exception is a model that cannot be
found, whose line is followed by a short indented list of the ways to get one.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

from .options import PROG, CliError, Parser, UsageError

#: Library errors (GeometryError, CheckpointError, VolumeReadError, DataError, EvaluationError, WeightsError,
#: BackendError, CheckpointWriteError, ...) derive from these: their messages name the problem and the fix.
LIBRARY_ERRORS = (ValueError, OSError, RuntimeError)


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def fail(prog: str, err: object, status: int) -> int:
    """Print ``prog: error: err`` (one line, then ``err.details`` indented, one a line); return ``status``."""
    lines = [f"{prog}: error: {one_line(err)}"]
    lines += ["  " + one_line(d) for d in getattr(err, "details", ())]
    sys.stderr.write("\n".join(lines) + "\n")
    sys.stderr.flush()
    return status


def execute(command: str, run: Callable[[object], Optional[int]], args: object) -> int:
    """``run(args)`` with every failure turned into its one-line message and exit status."""
    prog = f"{PROG} {command}".strip()
    try:
        return int(run(args) or 0)
    except UsageError as err:
        return fail(prog, err, 2)
    except CliError as err:
        return fail(prog, err, 1)
    except KeyboardInterrupt as err:
        return fail(prog, str(err) or "interrupted", 130)
    except ImportError as err:
        return fail(prog, f"the '{command}' command is not available in this installation ({err}); reinstall "
                          "sam3dsegment with its dependencies (pip install -e .; torch for the model)", 1)
    except LIBRARY_ERRORS as err:
        return fail(prog, err, 1)
    except Exception as err:  # noqa: BLE001 - last resort: still one clear line, non-zero exit
        return fail(prog, f"unexpected {type(err).__name__}: {err} (please report this with "
                          "'sam3d diagnose' output)", 1)


def parse(parser, argv: Sequence[str], command: str):
    """``(args, None)``, or ``(None, status)`` when parsing ended the run (``--help``: 0, a usage error such
    as an unknown argument: 2)."""
    prog = f"{PROG} {command}".strip()
    try:
        args, unknown = parser.parse_known_args(list(argv))
        if unknown:
            raise UsageError(f"unrecognized arguments: {' '.join(unknown)} (see '{prog} --help')")
        return args, None
    except UsageError as err:
        return None, fail(prog, err, 2)
    except SystemExit as exc:  # --help / --version printed their text
        return None, int(exc.code or 0)


# ------------------------------------------------------------------------------------------ commands
# A command is a module with NAME, HELP (one line), DESCRIPTION, configure(parser), run(args) -> status and,
# optionally, normalise_argv(argv) -> argv (applied before parsing).
def _parser_kwargs(command) -> dict:
    return {"prog": f"{PROG} {command.NAME}", "description": command.DESCRIPTION}


def add_command(subparsers, command) -> None:
    """Add ``command``'s parser to the ``sam3d`` root's sub-parsers."""
    p = subparsers.add_parser(command.NAME, help=command.HELP, **_parser_kwargs(command))
    command.configure(p)


def command_parser(command):
    """``command``'s parser on its own: the same options as under the ``sam3d`` root."""
    p = Parser(**_parser_kwargs(command))
    command.configure(p)
    return p


def normalised(command, argv: Sequence[str]) -> list:
    fix = getattr(command, "normalise_argv", None)
    return list(fix(argv)) if fix else list(argv)


def command_main(command, argv: Optional[Sequence[str]] = None) -> int:
    """Run ``command`` alone (``argv`` without the sub-command name), exactly as ``sam3d NAME argv`` would."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, status = parse(command_parser(command), normalised(command, argv), command.NAME)
    if args is None:
        return status
    return execute(command.NAME, command.run, args)
