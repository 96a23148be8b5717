"""``fastvl finetune --task vcr``: VCR, Q->A and QA->R mixed 1:1 (``--opt stages=qa,qar``); the type table grows to
4 rows and the word table by ``special_tokens`` (81) rows after loading, as officially; Q->A, QA->R, Q->AR accuracy."""

from __future__ import annotations

from ..data import BadExampleCounter
from ..data.finetune_data import VCRDataset
from ..models.uniter import UniterForVisualCommonsenseReasoning
from ..tasks.vcr import VCRTask
from .base import (
    COMMON_DEFAULTS,
    Recipe,
    SettingsError,
    build_uniter,
    bundle,
    data_paths,
    model_config,
    open_split,
    val_batches,
)

__all__ = ["RECIPE"]


def _vcr_data(s, rank, world):
    paths = data_paths(s, "vcr")
    counter = BadExampleCounter()
    special = int(s.options.get("special_tokens", 81))
    stages = [x.strip() for x in str(s.options.get("stages", "qa,qar")).split(",") if x.strip()]
    if not stages or set(stages) - {"qa", "qar"}:
        raise SettingsError(f"fastvl finetune vcr: --opt stages must list qa and/or qar, got {s.options['stages']!r}")
    train, val = {}, {}
    for stage in ("qa", "qar"):
        t, v = open_split(VCRDataset, s, paths, counter, stage=stage, special_tokens=special)
        if stage in stages:
            train[f"vcr_{stage}"] = t
        if v is not None:  # both stages are evaluated (Q->AR needs both)
            val[f"vcr_{stage}"] = v
    return bundle(s, paths, train, val, rank, world, counter, special_tokens=special)


def _vcr_model(s, data, init):
    model = build_uniter(UniterForVisualCommonsenseReasoning, s, data, init)
    model.init_type_embedding()
    if data.dims.get("special_tokens", 81):
        model.init_word_embedding(int(data.dims.get("special_tokens", 81)))
    return model


def _vcr_tasks(model, s, data):
    task = VCRTask(model)
    return {k: task for k in {*data.sources, *(data.val or {})}}


def _vcr_eval(tasks, data, device, s):
    right: dict[str, dict[str, float]] = {}
    for key in ("vcr_qa", "vcr_qar"):
        if key not in data.val:
            continue
        for b in val_batches(data, key, s):
            acc = tasks[key].evaluate(b.to(device))["accuracy"].cpu()
            right.setdefault(key, {}).update(zip(b.ids, acc.tolist()))
    qa, qar = right.get("vcr_qa", {}), right.get("vcr_qar", {})
    both = [qa[k] * qar[k] for k in qa if k in qar]
    out = {"q2a": sum(qa.values()) / max(len(qa), 1), "qa2r": sum(qar.values()) / max(len(qar), 1)}
    out["q2ar"] = sum(both) / max(len(both), 1)
    return out


RECIPE = Recipe(model_config=model_config,
                name="vcr", build_data=_vcr_data, build_model=_vcr_model, build_tasks=_vcr_tasks, evaluate=_vcr_eval,
                metric="q2ar", chance=1 / 16,
                defaults=dict(COMMON_DEFAULTS, steps=4000, val_every=1000, ckpt_every=1000),
                help="VCR (Q->A and QA->R mixed; Q->A, QA->R, Q->AR accuracy)")
