"""``fastvl finetune --task re``: referring expressions (RefCOCO layout; region CE or rank loss, ``--opt loss=``,
``mlp=``); accuracy at IoU >= 0.5; chance: a region picked at random."""

from __future__ import annotations

from ..data import BadExampleCounter
from ..data.finetune_data import REDataset
from ..models.uniter import UniterForReferringExpressionComprehension
from ..tasks.re import RETask
from .base import (
    COMMON_DEFAULTS,
    Recipe,
    accuracy_eval,
    build_uniter,
    bundle,
    data_paths,
    model_config,
    open_split,
    single_task,
)

__all__ = ["RECIPE"]


def _re_data(s, rank, world):
    paths = data_paths(s, "re")
    counter = BadExampleCounter()
    train, val = open_split(REDataset, s, paths, counter)
    return bundle(s, paths, {"re": train}, {"re": val} if val else {}, rank, world, counter)


def _re_model(s, data, init):
    return build_uniter(UniterForReferringExpressionComprehension, s, data, init,
                        loss=str(s.options.get("loss", "cls")), margin=float(s.options.get("margin", 0.2)),
                        mlp=int(s.options.get("mlp", 2)))


def _re_chance(data):
    """Accuracy of picking a region at random: the mean of 1 / regions over the validation examples."""
    if not data.val:
        return 0.0
    ds: REDataset = data.val["re"].dataset
    return sum(1.0 / ds.n_regions[item] for item in ds.items) / max(len(ds), 1)


RECIPE = Recipe(model_config=model_config,
                name="re", build_data=_re_data, build_model=_re_model, build_tasks=single_task(RETask),
                evaluate=accuracy_eval, metric="accuracy", chance=_re_chance, defaults=dict(COMMON_DEFAULTS),
                help="referring expressions (region CE; accuracy at IoU >= 0.5)")
