"""Task modules: ``task(batch) -> dict(loss=scalar tensor, logs=dict, count=loss elements)``; the trainer knows
nothing else.

Tasks hold the model they train as a submodule (every task of a run shares one model), so the trainer can wrap
all tasks in one module (DDP) and checkpoint the model alone. Registry: ``build_task(name, model=..., **kw)``,
``list_tasks()``, ``@register_task(name, *aliases)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["build_task", "list_tasks", "register_task"]

_TASKS: dict[str, Callable[..., nn.Module]] = {}


def register_task(name: str, *aliases: str) -> Callable[[type], type]:
    """Class decorator registering a task under ``name`` (and aliases)."""

    def deco(cls: type) -> type:
        for n in (name, *aliases):
            if n in _TASKS:
                raise ValueError(f"fastvl.tasks: task {n!r} is already registered")
            _TASKS[n] = cls
        return cls

    return deco


def list_tasks() -> list[str]:
    """Registered task names (aliases included), sorted."""
    _load()
    return sorted(_TASKS)


def build_task(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate the task registered as ``name`` with its keyword arguments."""
    _load()
    if name not in _TASKS:
        raise ValueError(f"fastvl.tasks.build_task: unknown task {name!r}; registered: {sorted(_TASKS)}")
    return _TASKS[name](**kwargs)


def _load() -> None:
    from . import caption, finetune, pretrain  # noqa: F401  (register the fine-tuning and pre-training tasks)
