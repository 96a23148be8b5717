"""``fastvl finetune --task vqa`` (and the shared builders of gqa / ve): UNITER with the VQA head on soft scores.

Data: a VQA-style txt_db (``target {labels, scores}``) + ``ans2label.json`` (``--opt ans2label=PATH``), or the
synthetic VQA data. Metric: VQA soft accuracy; chance: a model that reads only the question (the best training answer
per question text).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ..data import BadExampleCounter, DataError
from ..data.finetune_data import VQADataset
from ..models.uniter import UniterForVisualEntailment, UniterForVisualQuestionAnswering
from ..tasks.vqa import VQATask
from .base import (
    COMMON_DEFAULTS,
    FinetuneData,
    FinetuneSettings,
    Recipe,
    SettingsError,
    build_uniter,
    bundle,
    data_paths,
    mean_of,
    model_config,
    open_split,
    val_batches,
)

__all__ = ["RECIPE", "VE_ANSWERS", "vqa_like"]

VE_ANSWERS = {"contradiction": 0, "entailment": 1, "neutral": 2}


def _vqa_data(task: str):
    def build(s: FinetuneSettings, rank: int, world: int) -> FinetuneData:
        paths = data_paths(s, task)
        ans = s.options.get("ans2label")
        if ans is None and paths["synthetic"]:
            ans = paths["syn"].ans2label(task)
        if ans is None and task == "ve":
            first = Path(paths["train_txt"][0])
            ans = next((p for p in (first / "ans2label.json", first.parent / "ans2label.json") if p.is_file()),
                       dict(VE_ANSWERS))
        counter = BadExampleCounter()
        train, val = open_split(VQADataset, s, paths, counter, ans2label=ans)
        for d in (train, val):
            if d is not None:
                d.task = task
        if task == "ve" and train.num_answers != 3:
            raise SettingsError(f"fastvl finetune ve: the answer vocabulary has {train.num_answers} entries; SNLI-VE "
                             "needs 3 (contradiction, entailment, neutral)")
        return bundle(s, paths, {task: train}, {task: val} if val else {}, rank, world, counter,
                       num_answers=train.num_answers)

    return build


def _vqa_model(s, data, init):
    if s.task == "ve":
        return build_uniter(UniterForVisualEntailment, s, data, init)
    return build_uniter(UniterForVisualQuestionAnswering, s, data, init, data.dims["num_answers"])


def _vqa_tasks(model: nn.Module, s: FinetuneSettings, data: FinetuneData) -> dict[str, nn.Module]:
    name = next(iter(data.sources))
    task = VQATask(model)
    task.name = name
    return {name: task}


def _vqa_eval(tasks, data, device, s):
    key = next(iter(data.val))
    task = tasks[key]
    scores = [task.evaluate(b.to(device))["score"].cpu() for b in val_batches(data, key, s)]
    return {"accuracy": mean_of(scores)}


def _vqa_chance(data: FinetuneData, max_train: int = 50_000) -> float:
    """The VQA score of a model that reads only the question: for each question text (token ids) the answer with
    the highest summed score over the training split (the first ``max_train`` questions), the most frequent answer
    for questions never seen in training; scored on the validation split."""
    if not data.val:
        return 0.0
    key = next(iter(data.val))
    train: VQADataset = data.sources[key].dataset
    per_q: dict[tuple, np.ndarray] = {}
    total = np.zeros(train.num_answers, np.float64)
    for i in range(min(len(train), max_train)):
        try:
            e = train.example(i)
        except DataError:
            continue
        q = tuple(e.rows[0].input_ids.tolist())
        per_q[q] = per_q.get(q, 0) + e.target
        total += e.target
    best = {q: int(np.argmax(v)) for q, v in per_q.items()}
    fallback = int(np.argmax(total))
    got, n = 0.0, 0
    for b in data.val[key].iter_epoch(0):
        for k, q in enumerate(b.input_ids.split(b.txt_lens)):
            got += float(b.targets[k, best.get(tuple(q.tolist()), fallback)])
            n += 1
    return got / max(n, 1)


def vqa_like(name: str, help: str, defaults: dict[str, Any], chance: Any = _vqa_chance) -> Recipe:
    """The recipe of a VQA-style job (vqa, gqa, ve): soft-score BCE, VQA accuracy."""
    return Recipe(model_config=model_config,
                  name=name, build_data=_vqa_data(name), build_model=_vqa_model, build_tasks=_vqa_tasks,
                  evaluate=_vqa_eval, metric="accuracy", chance=chance, defaults=defaults, help=help)


RECIPE = vqa_like("vqa", "VQA (soft-score BCE, VQA accuracy)",
                  dict(COMMON_DEFAULTS, steps=8000, val_every=1000, ckpt_every=1000))
