"""The ``sam3d`` command: one argparse root with a sub-command per module of this package.

``sam3d segment | demo | evaluate | train | download | diagnose | serve``; ``sam3d COMMAND --help`` lists a
command's options. Options that several commands take (model, checkpoint, device, threads, dtype,
spacing, clamp, region growth, overwrite, quiet) are defined once in :mod:`.options`: same spelling,
default and meaning everywhere. Unknown arguments are refused. Exit statuses and error messages come from
:mod:`.runner`, the one place that maps failures to them: 0 success, 1 bad data or a runtime failure,
2 a usage error, 130 interrupted. An output that already exists is refused unless ``--overwrite``.

The command modules import the library lazily, inside their ``run``: building the parser stays cheap and
``sam3d segment`` never pays for training or evaluation code.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from . import demo, diagnose, download, evaluate, segment, serve, train
from .options import PROG, CliError, Parser, UsageError
from .runner import add_command, execute, fail, normalised, parse

__all__ = ["main", "build_parser", "COMMANDS", "CliError", "UsageError"]

#: The sub-commands, in the order ``sam3d --help`` lists them.
COMMANDS = {m.NAME: m for m in (segment, demo, evaluate, train, download, diagnose, serve)}


def build_parser() -> Parser:
    """The ``sam3d`` root parser with every sub-command's parser under it."""
    from .. import __version__

    root = Parser(prog=PROG, description="Click-based 3D segmentation of CT with SAM-Med3D-family models. Exit "
                                         "status: 0 success, 1 bad data or a runtime failure, 2 a usage error.",
                  epilog=f"'{PROG} COMMAND --help' lists a command's options.")
    root.add_argument("--version", "-V", action="version", version=f"{PROG} {__version__}")
    sub = root.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for command in COMMANDS.values():
        add_command(sub, command)
    return root


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``sam3d`` console script and ``python -m SAM3DSegmentLib``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] == "help":
        parser.print_help(sys.stdout)
        return 2 if not argv else 0
    command = COMMANDS.get(argv[0])
    if command is None and not argv[0].startswith("-"):
        return fail(PROG, f"unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)} "
                          f"(see '{PROG} --help')", 2)
    if command is not None:
        argv = [argv[0], *normalised(command, argv[1:])]
    args, status = parse(parser, argv, command.NAME if command else "")
    if args is None:
        return status
    if command is None:  # only root options, none of which runs anything
        parser.print_help(sys.stdout)
        return 2
    return execute(command.NAME, command.run, args)


if __name__ == "__main__":
    sys.exit(main())
