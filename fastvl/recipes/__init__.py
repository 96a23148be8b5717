"""Runnable jobs: one module per job (data builder, model factory, task modules, evaluation, chance level, defaults).

``fastvl pretrain`` runs :mod:`fastvl.recipes.pretrain`; ``fastvl finetune [--model MODEL] --task NAME`` runs the
recipe registered as (MODEL, NAME) (:mod:`fastvl.recipes.runner`). The built-in recipes are registered below, one
explicit line each: a broken one fails the import, never silently disappears. A recipe written elsewhere registers
itself with :func:`register_recipe` (see the README, "Adding a task").
"""

from . import caption, gqa, hero_finetune, itr, nlvr2, re, vcr, ve, violin_baseline, vqa
from .base import (
           FinetuneData,
           FinetuneSettings,
           Recipe,
           get_recipe,
           list_models,
           list_recipes,
           register_recipe,
           unregister_recipe,
)
from .runner import evaluate_finetune, finetune

__all__ = ["FinetuneData", "FinetuneSettings", "Recipe", "evaluate_finetune", "finetune", "get_recipe", "list_models",
           "list_recipes",
           "register_recipe", "unregister_recipe"]

register_recipe(vqa.RECIPE)
register_recipe(gqa.RECIPE)
register_recipe(ve.RECIPE)
register_recipe(nlvr2.RECIPE)
register_recipe(itr.RECIPE)
register_recipe(re.RECIPE)
register_recipe(vcr.RECIPE)
register_recipe(caption.RECIPE)
register_recipe(hero_finetune.TVR_RECIPE)
register_recipe(hero_finetune.VIDEOQA_RECIPE)
register_recipe(hero_finetune.VIOLIN_RECIPE)
register_recipe(hero_finetune.TVC_RECIPE)
register_recipe(violin_baseline.RECIPE)
