"""``fastvl info``: build information and which backend serves each op here (as ``python -m fastvl.info``)."""

from __future__ import annotations

import argparse

from .. import info

__all__ = ["HELP", "add_arguments", "run"]

HELP = "build information and which backend serves each op here"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    return info.main(["--json"] if args.json else [])
