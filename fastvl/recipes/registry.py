"""The recipe registry: ``fastvl finetune --task NAME`` runs the recipe registered as NAME.

The built-in recipes are registered by explicit lines in :mod:`fastvl.recipes`; a user's own recipe (a file of
theirs) registers with :func:`register_recipe` before the run. An unknown name is an error that lists what exists.
"""

from __future__ import annotations

from dataclasses import fields

from .base import FinetuneSettings, Recipe

__all__ = ["get_recipe", "list_recipes", "register_recipe", "unregister_recipe"]

_RECIPES: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe, *, replace_existing: bool = False) -> Recipe:
    """Register ``recipe`` under ``recipe.name`` (ValueError if the name is taken, unless ``replace_existing``).

    Unknown keys in ``recipe.defaults`` (not FinetuneSettings fields) are an error. Returns ``recipe``.
    """
    if not isinstance(recipe, Recipe):
        raise TypeError(f"register_recipe: argument 'recipe' must be a fastvl.recipes.Recipe, got "
                        f"{type(recipe).__name__}")
    if not recipe.name or not isinstance(recipe.name, str):
        raise ValueError(f"register_recipe: recipe.name must be a non-empty string, got {recipe.name!r}")
    known = {f.name for f in fields(FinetuneSettings)}
    unknown = sorted(set(recipe.defaults) - known)
    if unknown:
        raise ValueError(f"register_recipe({recipe.name!r}): defaults {unknown} are not FinetuneSettings fields")
    for name in ("build_data", "build_model", "build_tasks", "evaluate"):
        if not callable(getattr(recipe, name)):
            raise TypeError(f"register_recipe({recipe.name!r}): recipe.{name} must be callable")
    if recipe.name in _RECIPES and not replace_existing:
        raise ValueError(f"register_recipe: recipe {recipe.name!r} is already registered")
    _RECIPES[recipe.name] = recipe
    return recipe


def list_recipes() -> list[str]:
    """Registered recipe names, sorted."""
    return sorted(_RECIPES)


def get_recipe(name: str) -> Recipe:
    """The recipe registered as ``name`` (ValueError naming the registered ones otherwise)."""
    if name not in _RECIPES:
        raise ValueError(f"fastvl finetune: unknown task {name!r}; registered: {list_recipes()}")
    return _RECIPES[name]


def unregister_recipe(name: str) -> None:
    """Remove the recipe registered as ``name`` (nothing if there is none)."""
    _RECIPES.pop(name, None)
