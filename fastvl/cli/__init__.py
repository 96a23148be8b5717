"""The ``fastvl`` command: ``fastvl <command> [options]``; ``fastvl <command> --help`` for each.

Every command is one module of this package with ``HELP``, ``add_arguments(parser)`` and ``run(args) -> exit
code``, listed once in :data:`COMMANDS` (explicit imports: a broken command fails loudly).
"""

from __future__ import annotations

import argparse
from types import ModuleType

from . import bench, finetune, info, make_data, pretrain
from . import eval as eval_cmd

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS: dict[str, ModuleType] = {
    "pretrain": pretrain,
    "finetune": finetune,
    "eval": eval_cmd,
    "make-data": make_data,
    "info": info,
    "bench": bench,
}


def build_parser() -> argparse.ArgumentParser:
    """The ``fastvl`` argument parser with one sub-command per entry of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(prog="fastvl", description="fastvl: fast vision-and-language pre-training")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, mod in COMMANDS.items():
        mod.add_arguments(sub.add_parser(name, help=mod.HELP, description=mod.HELP))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: sys.argv) and run the command; returns its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return COMMANDS[args.command].run(args)
