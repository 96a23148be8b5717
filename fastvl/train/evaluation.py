"""Evaluation-only runs: task modules over batch sources in eval mode, no gradients, no optimizer.

Same task protocol as training: ``task(batch)`` returns ``dict(loss=<optional scalar>, logs=<dict of scalars>,
count=<optional number of elements, default 1>)``. Every log (and the loss, when given) is averaged over the run
weighted by ``count``, across processes too; a ``consume(task, batch, out)`` callback sees every output (the probing
suite streams model outputs through it). The record goes to ``<output_dir>/metrics.jsonl`` on the main process.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed as D


def evaluate(tasks: dict[str, nn.Module], sources: dict[str, Any], *, batches: int | None = None,
             device: torch.device | str | None = None, precision: torch.dtype | None = None,
             output_dir: str | Path | None = None, step: int | None = None, tag: str = "eval",
             consume: Callable[[str, Any, dict], None] | None = None) -> dict[str, float]:
    """Run ``tasks[name]`` over ``sources[name]`` for every name of ``sources`` (in its order).

    A source is a finite iterable of batches (read to its end, or to ``batches``), or a batch source with
    ``next_batch()`` (read ``batches`` times; required then). Batches with ``.to`` move to ``device`` (default: the
    device of the task's first parameter). Every module of the tasks is put in eval mode and given back its own
    training flag afterwards; parameters, gradients and the sources' other state are not touched, the sources'
    positions advance. ``precision``: autocast dtype (None: fp32).

    Returns ``{"<task>/<key>": count-weighted mean, "<task>/count": total count, "<task>/batches": batches}``
    (all processes agree); with ``output_dir``, the main process appends ``{"step": step, "<tag>/<key>": v, ...}``
    to ``metrics.jsonl``. Collective under DDP: every process must call it (batch counts may differ).
    """
    unknown = set(sources) - set(tasks)
    if unknown:
        raise ValueError(f"evaluate: sources for unknown tasks {sorted(unknown)} (tasks: {sorted(tasks)})")
    modes = {id(m): (m, m.training) for t in tasks.values() for m in t.modules()}
    result: dict[str, float] = {}
    try:
        for m, _ in modes.values():
            m.eval()
        with torch.no_grad():
            for name, source in sources.items():
                result.update(_evaluate_task(name, tasks[name], source, batches, device, precision, consume))
    finally:
        for m, training in modes.values():
            m.train(training)
    if output_dir is not None and _is_main():
        path = Path(output_dir)
        path.mkdir(parents=True, exist_ok=True)
        with open(path / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **{f"{tag}/{k}": v for k, v in result.items()}}) + "\n")
    return result


def _evaluate_task(name: str, task: nn.Module, source, batches: int | None, device, precision, consume) -> dict:
    if device is None:
        first = next(task.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    n_batches, total = 0, 0.0
    for batch in _batches(name, source, batches):
        batch = batch.to(device) if hasattr(batch, "to") else batch
        ctx = torch.autocast(device.type, dtype=precision) if precision is not None else contextlib.nullcontext()
        with ctx:
            out = task(batch)
        count = float(out.get("count", 1.0))
        values = dict(out.get("logs", {}))
        if out.get("loss") is not None:
            values["loss"] = out["loss"]
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + float(v) * count
            weights[k] = weights.get(k, 0.0) + count
        n_batches += 1
        total += count
        if consume is not None:
            consume(name, batch, out)
    keys = _all_keys(sums)
    stats = torch.tensor([sums.get(k, 0.0) for k in keys] + [weights.get(k, 0.0) for k in keys] + [total, n_batches],
                         dtype=torch.float64, device=_collective_device(device))
    stats = D.all_reduce_sum(stats).cpu().tolist()
    n = len(keys)
    out = {f"{name}/{k}": stats[i] / stats[n + i] if stats[n + i] else float("nan") for i, k in enumerate(keys)}
    out[f"{name}/count"] = stats[2 * n]
    out[f"{name}/batches"] = int(stats[2 * n + 1])
    return out


def _batches(name: str, source, batches: int | None) -> Iterable:
    if hasattr(source, "next_batch") and not isinstance(source, Iterable):
        if batches is None:
            raise ValueError(f"evaluate: source {name!r} has no end (next_batch only); give 'batches'")
        return (source.next_batch() for _ in range(batches))
    return source if batches is None else itertools.islice(source, batches)


def _all_keys(sums: dict[str, float]) -> list[str]:
    """Every process's log keys, sorted (a key some process never saw weighs 0 there)."""
    keys = set(sums)
    if D.active():
        gathered: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, sorted(keys))
        keys = set().union(*map(set, gathered))
    return sorted(keys)


def _collective_device(device: torch.device) -> torch.device:
    if D.active() and torch.distributed.get_backend() == "nccl":
        return device
    return torch.device("cpu")


def _is_main() -> bool:
    return not D.active() or torch.distributed.get_rank() == 0
