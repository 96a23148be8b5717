"""fastvl models and a small registry: ``create_model(name, **kw)``, ``list_models()``, ``register_model``.

Registered names:
    ``uniter``            UniterModel (encoder only); kw: config, img_dim, and config-field overrides.
    ``uniter-pretrain``   UniterForPretraining; kw: config, img_dim, img_label_dim, overrides.
    ``uniter-tiny`` / ``uniter-base`` / ``uniter-large``: UniterForPretraining with that size's config.

``config`` is a UniterConfig, a dict, a size name (``tiny``/``base``/``large``) or a ``.json`` / ``.yaml`` path.
Other modules register more models with the decorator: ``@register_model("name")`` on a factory
``fn(**kw) -> nn.Module``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["create_model", "list_models", "register_model"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a factory under ``name`` (an error if the name is taken)."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"fastvl.models: model {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` with keyword arguments for its factory."""
    if name not in _REGISTRY:
        raise ValueError(f"fastvl.models.create_model: unknown model {name!r}; registered: {list_models()}")
    return _REGISTRY[name](**kwargs)


@register_model("uniter")
def _uniter(config: Any = "base", img_dim: int | None = None, **overrides: Any) -> nn.Module:
    from .uniter import UniterModel, resolve_config

    return UniterModel(resolve_config(config, **overrides), img_dim)


@register_model("uniter-pretrain")
def _uniter_pretrain(config: Any = "base", img_dim: int | None = None, img_label_dim: int | None = None,
                     **overrides: Any) -> nn.Module:
    from .uniter import UniterForPretraining, resolve_config

    return UniterForPretraining(resolve_config(config, **overrides), img_dim, img_label_dim)


def _sized(size: str) -> Callable[..., nn.Module]:
    def factory(img_dim: int | None = None, img_label_dim: int | None = None, **overrides: Any) -> nn.Module:
        return _uniter_pretrain(size, img_dim, img_label_dim, **overrides)

    factory.__doc__ = f"UniterForPretraining with the {size} config (fastvl/configs/uniter-{size}.yaml)."
    return factory


for _size in ("tiny", "base", "large"):
    register_model(f"uniter-{_size}")(_sized(_size))
