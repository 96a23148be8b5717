"""The ``fastvl`` command: ``fastvl <command> [options]``; ``fastvl <command> --help`` for each.

Commands register themselves in :data:`COMMANDS` (name -> (help, add_arguments, run)), so a new task or
model adds a command without editing the others.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

PLUGINS = ("fastvl.data.commands", "fastvl.train.commands", "fastvl.tasks.commands")
Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None] | None = None):
    """Decorator registering ``run(args) -> exit code`` as ``fastvl <name>``; ``arguments`` adds its options."""

    def deco(run: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (help, arguments or (lambda p: None), run)
        return run

    return deco


# ---------------------------------------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------------------------------------


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


@command("info", "build information and which backend serves each op here", _info_args)
def _info(args: argparse.Namespace) -> int:
    from fastvl import info

    return info.main(["--json"] if args.json else [])



# ---------------------------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------------------------


def _repo_root() -> Path | None:
    root = Path(__file__).resolve().parent.parent
    return root if (root / "benchmarks" / "_harness.py").exists() else None


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="benchmark stem, e.g. 'ot' for benchmarks/bench_ot.py (omit to list)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the benchmark (e.g. --quick)")


@command("bench", "run a benchmark from benchmarks/ (source checkout)", _bench_args)
def _bench(args: argparse.Namespace) -> int:
    root = _repo_root()
    if root is None:
        print("fastvl bench: the benchmarks/ folder ships with the source checkout, not the installed package",
              file=sys.stderr)
        return 2
    names = sorted(p.stem.removeprefix("bench_") for p in (root / "benchmarks").glob("bench_*.py"))
    if not args.name:
        print("benchmarks:", ", ".join(names))
        return 0
    if args.name not in names:
        print(f"fastvl bench: unknown benchmark {args.name!r}; available: {', '.join(names)}", file=sys.stderr)
        return 2
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    return subprocess.call([sys.executable, "-m", f"benchmarks.bench_{args.name}", *args.rest], cwd=root, env=env)



# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    _load_plugins()
    parser = argparse.ArgumentParser(prog="fastvl", description="fastvl: fast vision-and-language pre-training")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, (help_, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_, description=help_))
    return parser


def _load_plugins() -> None:
    """Import the modules that add commands (training, data, evaluation) when they are present."""
    import importlib

    for mod in PLUGINS:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as err:  # the plugin (or its package) is not part of this build
            if err.name is None or not mod.startswith(err.name):
                raise


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return COMMANDS[args.command][2](args)


if __name__ == "__main__":  # python -m fastvl.cli: run the package module, where plugins register their commands
    from fastvl.cli import main as _package_main

    raise SystemExit(_package_main())
