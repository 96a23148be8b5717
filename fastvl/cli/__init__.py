"""The ``fastvl`` command: ``fastvl <command> [options]``; ``fastvl <command> --help`` for each.

Every command is one module of this package with ``HELP``, ``add_arguments(parser)`` and ``run(args) -> exit
code``, listed once in :data:`COMMANDS` (explicit imports: a broken command fails loudly).

A user error (a bad value, a missing file or folder, the wrong kind of checkpoint, bad data) ends a command with one
line, ``fastvl <command>: error: ...`` naming the argument and the path, and exit code 2 (see :mod:`.errors`); a
traceback means a bug (``--debug`` shows the traceback of user errors too).
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from . import bench, finetune, gan, info, make_data, pretrain, probe
from . import eval as eval_cmd
from .errors import USER_ERRORS, UserError, report

__all__ = ["COMMANDS", "UserError", "build_parser", "main"]

COMMANDS: dict[str, ModuleType] = {
    "pretrain": pretrain,
    "finetune": finetune,
    "eval": eval_cmd,
    "probe": probe,
    "gan": gan,
    "make-data": make_data,
    "info": info,
    "bench": bench,
}


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``fastvl <command>: error: argument --x: ...``), exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``fastvl`` argument parser with one sub-command per entry of :data:`COMMANDS`."""
    parser = _Parser(prog="fastvl", description="fastvl: fast vision-and-language pre-training")
    sub = parser.add_subparsers(dest="command", metavar="command", parser_class=_Parser)
    for name, mod in COMMANDS.items():
        sp = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(sp)
        if name != "bench":  # bench passes its remaining arguments on to the benchmark
            sp.add_argument("--debug", action="store_true", help="show the traceback of a user error too")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: sys.argv) and run the command; returns its exit code (2 for a user error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command].run(args)
    except USER_ERRORS as e:
        if getattr(args, "debug", False):
            raise
        sys.stdout.flush()
        return report(args.command, e, args)
