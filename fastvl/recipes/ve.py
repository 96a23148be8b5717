"""``fastvl finetune --task ve``: SNLI-VE visual entailment (3-way soft scores; accuracy, majority-class chance)."""

from __future__ import annotations

from .base import COMMON_DEFAULTS, majority_chance
from .vqa import vqa_like

__all__ = ["RECIPE"]

RECIPE = vqa_like("ve", "SNLI-VE visual entailment (3-way)", dict(COMMON_DEFAULTS), chance=majority_chance)
