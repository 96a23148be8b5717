"""HERO configuration: the official three-block JSON (``f_config`` / ``c_config`` / ``q_config``).

``VideoModelConfig`` reads the official file (``config/hero_finetune.json`` layout) or an equivalent dict. Each
block becomes a :class:`HeroSubConfig` with attribute access (``cfg.f_config.hidden_size``), defaulted the way the
official ``RobertaModelConfig.from_dict`` defaults a block (``layer_norm_eps`` 1e-12 inside the transformer layers,
``max_position_embeddings`` 512, ...), and keeping any extra key of the block as an attribute too.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

__all__ = ["HeroSubConfig", "VideoModelConfig"]

_ACTS = ("gelu", "gelu_new", "relu", "swish")

# Defaults of the official RobertaModelConfig when a block is built from a dict (vocab_size -1: not used).
_DEFAULTS: dict[str, Any] = {
    "vocab_size": -1,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "output_attentions": False,
    "output_hidden_states": False,
}
_INT_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "max_position_embeddings", "type_vocab_size")


class HeroSubConfig:
    """One block of the HERO config (a RoBERTa-style transformer description), with attribute access.

    Args:
        values: the block's keys (official names); missing keys take the official defaults.
        name: the block name (``f_config``, ...) used in error messages.
    """

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str
    hidden_dropout_prob: float
    attention_probs_dropout_prob: float
    max_position_embeddings: int
    type_vocab_size: int
    vocab_size: int
    initializer_range: float
    layer_norm_eps: float

    def __init__(self, values: dict[str, Any], name: str = "config"):
        if not isinstance(values, dict):
            raise TypeError(f"fastvl.models.hero: {name} must be a dict, got {type(values).__name__}")
        merged = {**_DEFAULTS, **copy.deepcopy(values)}
        for key in _INT_KEYS:
            if not isinstance(merged[key], int) or isinstance(merged[key], bool):
                raise ValueError(f"fastvl.models.hero: {name}.{key} must be an int, got {merged[key]!r}")
        if merged["hidden_act"] not in _ACTS:
            raise ValueError(f"fastvl.models.hero: {name}.hidden_act must be one of {_ACTS}, "
                             f"got {merged['hidden_act']!r}")
        if merged["hidden_size"] % merged["num_attention_heads"]:
            raise ValueError(f"fastvl.models.hero: {name}.hidden_size ({merged['hidden_size']}) must be a multiple "
                             f"of num_attention_heads ({merged['num_attention_heads']})")
        self.__dict__.update(merged)
        self._name = name

    def to_dict(self) -> dict[str, Any]:
        """The block as a plain dict (official keys plus the defaults filled in)."""
        return {k: copy.deepcopy(v) for k, v in self.__dict__.items() if not k.startswith("_")}

    def __repr__(self) -> str:
        return f"HeroSubConfig({self._name}: {json.dumps(self.to_dict(), sort_keys=True)})"


class VideoModelConfig:
    """The HERO model config: ``f_config`` (cross-modal transformer), ``c_config`` (temporal transformer) and
    ``q_config`` (query encoder) and ``d_config`` (the TVC caption decoder); each of the last two is ``None`` when
    the file has no such block, as in the official class.

    Args:
        json_path_or_dict: path to the official JSON file, or the same content as a dict.
    """

    def __init__(self, json_path_or_dict: str | Path | dict[str, Any]):
        if isinstance(json_path_or_dict, (str, Path)):
            with open(json_path_or_dict, encoding="utf-8") as f:
                raw = json.load(f)
        elif isinstance(json_path_or_dict, dict):
            raw = json_path_or_dict
        else:
            raise TypeError("fastvl.models.hero: VideoModelConfig(json_path_or_dict) takes a path or a dict, got "
                            f"{type(json_path_or_dict).__name__}")
        for block in ("f_config", "c_config"):
            if block not in raw:
                raise ValueError(f"fastvl.models.hero: json_path_or_dict has no {block!r} block "
                                 f"(keys: {sorted(raw)})")
        self.f_config = HeroSubConfig(raw["f_config"], "f_config")
        self.c_config = HeroSubConfig(raw["c_config"], "c_config")
        self.q_config = HeroSubConfig(raw["q_config"], "q_config") if "q_config" in raw else None
        self.d_config = HeroSubConfig(raw["d_config"], "d_config") if "d_config" in raw else None
        if self.f_config.vocab_size <= 0:
            raise ValueError(f"fastvl.models.hero: f_config.vocab_size must be > 0, got {self.f_config.vocab_size}")
        self.initializer_range = self.f_config.initializer_range

    @classmethod
    def from_json_file(cls, json_file: str | Path) -> VideoModelConfig:
        """The official constructor name."""
        return cls(json_file)

    def to_dict(self) -> dict[str, Any]:
        """The blocks as a dict (``q_config`` / ``d_config`` left out when absent)."""
        out = {"f_config": self.f_config.to_dict(), "c_config": self.c_config.to_dict()}
        for name in ("q_config", "d_config"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name).to_dict()
        return out
