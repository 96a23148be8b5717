"""Task modules: ``task(batch) -> dict(loss=scalar tensor, logs=dict, count=loss elements)``; the trainer knows
nothing else. One module per task: the task, its metrics per batch and its VILLA view (:mod:`fastvl.tasks.base`
defines the view protocol).

Tasks hold the model they train as a submodule (every task of a run shares one model), so the trainer can wrap all
tasks in one module (DDP) and checkpoint the model alone. ``build_task(name, model=..., **kw)`` builds one by name.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import AdvOutput, AdvView, FinetuneTask
from .caption import CaptionTask
from .itr import ITRTask
from .nlvr2 import NLVR2Task
from .pretrain import ITMTask, MLMTask, MRCKLTask, MRCTask, MRFRTask, PretrainTask
from .re import RETask
from .vcr import VCRTask
from .vqa import VQATask

__all__ = ["TASKS", "AdvOutput", "AdvView", "CaptionTask", "FinetuneTask", "ITMTask", "ITRTask", "MLMTask",
           "MRCKLTask", "MRCTask", "MRFRTask", "NLVR2Task", "PretrainTask", "RETask", "VCRTask", "VQATask",
           "build_task", "list_tasks"]

#: Task classes by name (aliases included).
TASKS: dict[str, type[nn.Module]] = {
    "mlm": MLMTask, "mrfr": MRFRTask, "mrc": MRCTask, "mrc-kl": MRCKLTask, "mrckl": MRCKLTask, "itm": ITMTask,
    "vqa": VQATask, "gqa": VQATask, "ve": VQATask, "nlvr2": NLVR2Task, "itr": ITRTask, "re": RETask, "vcr": VCRTask,
    "caption": CaptionTask,
}


def list_tasks() -> list[str]:
    """Task names (aliases included), sorted."""
    return sorted(TASKS)


def build_task(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate the task ``name`` with its keyword arguments."""
    if name not in TASKS:
        raise ValueError(f"fastvl.tasks.build_task: unknown task {name!r}; known: {list_tasks()}")
    return TASKS[name](**kwargs)
