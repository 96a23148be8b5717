"""``fastvl bench NAME``: run ``benchmarks/bench_NAME.py`` of a source checkout (the benchmarks do not ship)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from .errors import UserError

__all__ = ["HELP", "add_arguments", "run"]

HELP = "run a benchmark from benchmarks/ (source checkout)"


def _repo_root() -> Path | None:
    root = Path(__file__).resolve().parents[2]
    return root if (root / "benchmarks" / "_harness.py").exists() else None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="benchmark stem, e.g. 'ot' for benchmarks/bench_ot.py (omit to list)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the benchmark (e.g. --quick)")


def run(args: argparse.Namespace) -> int:
    """List the benchmarks, or run one in a subprocess from the checkout root."""
    root = _repo_root()
    if root is None:
        raise UserError("the benchmarks/ folder ships with the source checkout, not the installed package",
                        argument="name")
    names = sorted(p.stem.removeprefix("bench_") for p in (root / "benchmarks").glob("bench_*.py"))
    if not args.name:
        print("benchmarks:", ", ".join(names))
        return 0
    if args.name not in names:
        raise UserError(f"unknown benchmark {args.name!r}; available: {', '.join(names)}", argument="name")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    return subprocess.call([sys.executable, "-m", f"benchmarks.bench_{args.name}", *args.rest], cwd=root, env=env)
