"""The architecture is enforced, not hoped for: the import-linter contracts of pyproject.toml hold, no two modules
of the package import each other (directly or through others), and no source file grows past 800 lines."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 800


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of a directed graph given as ``{node: successors}``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_strongly_connected_finds_cycles():
    comps = strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert sorted(comps) == [["a", "b", "c"], ["d"]]


def test_import_contracts_kept():
    pytest.importorskip("importlinter")
    run = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command as c; c()",
                          "--no-cache", "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout


def test_no_import_cycles():
    graph = grimp.build_graph("fastvl")
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    cycles = [c for c in strongly_connected(edges) if len(c) > 1]
    assert not cycles, f"import cycles between fastvl modules: {cycles}"


def test_files_stay_small():
    big = {}
    for folder in ("fastvl", "benchmarks", "tests", "csrc"):
        for dirpath, _, files in os.walk(ROOT / folder):
            for name in files:
                if name.endswith((".py", ".cpp", ".cu", ".h")):
                    path = Path(dirpath) / name
                    n = sum(1 for _ in path.open(encoding="utf-8"))
                    if n > MAX_LINES:
                        big[str(path.relative_to(ROOT))] = n
    assert not big, f"files over {MAX_LINES} lines (split them by op, task or backend): {big}"
