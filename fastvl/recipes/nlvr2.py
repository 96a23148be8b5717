"""``fastvl finetune --task nlvr2``: NLVR2 with the paired, triplet or paired-attention head (``--opt variant=``);
the type table grows to 3 rows after loading pre-trained weights, as the official script does."""

from __future__ import annotations

from ..data import BadExampleCounter
from ..data.finetune_data import NLVR2Dataset
from ..models.uniter import UniterForNlvr2Paired, UniterForNlvr2PairedAttn, UniterForNlvr2Triplet
from ..tasks.nlvr2 import NLVR2Task
from .base import (
    COMMON_DEFAULTS,
    FinetuneSettings,
    Recipe,
    SettingsError,
    accuracy_eval,
    build_uniter,
    bundle,
    data_paths,
    majority_chance,
    model_config,
    open_split,
    single_task,
)

__all__ = ["NLVR2_MODELS", "RECIPE"]

NLVR2_MODELS = {"paired": UniterForNlvr2Paired, "triplet": UniterForNlvr2Triplet,
                "paired-attn": UniterForNlvr2PairedAttn}


def _variant(s: FinetuneSettings) -> str:
    v = str(s.options.get("variant", "paired"))
    if v not in NLVR2_MODELS:
        raise SettingsError(f"fastvl finetune nlvr2: --opt variant must be one of {sorted(NLVR2_MODELS)}, got {v!r}")
    return v


def _nlvr2_data(s, rank, world):
    paths = data_paths(s, "nlvr2")
    counter = BadExampleCounter()
    train, val = open_split(NLVR2Dataset, s, paths, counter, variant=_variant(s))
    return bundle(s, paths, {"nlvr2": train}, {"nlvr2": val} if val else {}, rank, world, counter)


def _nlvr2_model(s, data, init):
    model = build_uniter(NLVR2_MODELS[_variant(s)], s, data, init)
    model.init_type_embedding()
    return model


RECIPE = Recipe(model_config=model_config,
                name="nlvr2", build_data=_nlvr2_data, build_model=_nlvr2_model, build_tasks=single_task(NLVR2Task),
                evaluate=accuracy_eval, metric="accuracy", chance=majority_chance,
                defaults=dict(COMMON_DEFAULTS, steps=3000),
                help="NLVR2 (two images, true/false; --opt variant=paired|triplet|paired-attn)")
