"""``fastvl finetune --task gqa``: GQA's relational questions with the VQA head and metric."""

from __future__ import annotations

from .base import COMMON_DEFAULTS
from .vqa import vqa_like

__all__ = ["RECIPE"]

RECIPE = vqa_like("gqa", "GQA (relational questions; VQA head and metric)",
                  dict(COMMON_DEFAULTS, steps=4000, val_every=1000, ckpt_every=1000))
