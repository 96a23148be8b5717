"""LXMERT configuration: the keyword names of the widely used ``transformers`` port, loadable from its config.json."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["LxmertConfig", "PRESETS", "resolve_lxmert_config"]

_ACTS = ("gelu", "gelu_new", "relu", "swish")
_POSITIVE = ("vocab_size", "hidden_size", "num_attention_heads", "num_qa_labels", "num_object_labels",
             "num_attr_labels", "intermediate_size", "max_position_embeddings", "type_vocab_size", "visual_feat_dim",
             "visual_pos_dim")


@dataclass
class LxmertConfig:
    """Configuration of an LXMERT model (Tan & Bansal, EMNLP 2019): language (``l_layers``), object-relationship
    (``r_layers``) and cross-modality (``x_layers``) encoders plus the pre-training heads.

    Field names and defaults are those of the port's ``LxmertConfig`` (``unc-nlp/lxmert-base-uncased``), so its
    ``config.json`` loads with :meth:`from_json_file`; keys of the file that are not fields here (``architectures``,
    ``model_type``, ``transformers_version``, ...) are kept in ``extra`` and written back by :meth:`to_dict`.
    ``layer_norm_eps`` is kept for older files; every LayerNorm uses 1e-12, as the port's modules do.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_attention_heads: int = 12
    num_qa_labels: int = 9500
    num_object_labels: int = 1600
    num_attr_labels: int = 400
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    l_layers: int = 9
    x_layers: int = 5
    r_layers: int = 5
    visual_feat_dim: int = 2048
    visual_pos_dim: int = 4
    visual_loss_normalizer: float = 6.67
    task_matched: bool = True
    task_mask_lm: bool = True
    task_obj_predict: bool = True
    task_qa: bool = True
    visual_obj_loss: bool = True
    visual_attr_loss: bool = True
    visual_feat_loss: bool = True
    extra: dict = field(default_factory=dict)  # other keys of a config.json, kept for round trips

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_hidden_layers(self) -> dict[str, int]:
        """Layers per encoder, as the port reports them: {'vision': r, 'cross_encoder': x, 'language': l}."""
        return {"vision": self.r_layers, "cross_encoder": self.x_layers, "language": self.l_layers}

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        for name in _POSITIVE:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"LxmertConfig: '{name}' must be a positive int, got {v!r}")
        for name in ("l_layers", "x_layers", "r_layers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"LxmertConfig: '{name}' must be an int >= 0, got {v!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"LxmertConfig: 'hidden_size' ({self.hidden_size}) must be a multiple of "
                             f"'num_attention_heads' ({self.num_attention_heads})")
        if self.hidden_act not in _ACTS:
            raise ValueError(f"LxmertConfig: 'hidden_act' must be one of {_ACTS}, got {self.hidden_act!r}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            v = getattr(self, name)
            if not 0.0 <= float(v) < 1.0:
                raise ValueError(f"LxmertConfig: '{name}' must be in [0, 1), got {v!r}")

    @property
    def visual_losses(self) -> dict[str, int]:
        """The object-head outputs this config builds, {name: width}, in the port's order (obj, attr, feat)."""
        out = {}
        if self.visual_obj_loss:
            out["obj"] = self.num_object_labels
        if self.visual_attr_loss:
            out["attr"] = self.num_attr_labels
        if self.visual_feat_loss:
            out["feat"] = self.visual_feat_dim
        return out

    # -------------------------------------------------------------------------------------------- (de)serialise
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LxmertConfig:
        """From a dict such as the port's config.json; unknown keys go to ``extra``."""
        if not isinstance(d, dict):
            raise TypeError(f"LxmertConfig.from_dict: expected a dict, got {type(d).__name__}")
        names = {f.name for f in fields(cls)} - {"extra"}
        model_type = d.get("model_type")
        if model_type is not None and model_type != "lxmert":
            raise ValueError(f"LxmertConfig: the config is of model_type {model_type!r}, not 'lxmert'")
        known = {k: v for k, v in d.items() if k in names}
        extra = {**d.get("extra", {}), **{k: v for k, v in d.items() if k not in names and k != "extra"}}
        extra.pop("num_hidden_layers", None)  # derived from l/x/r_layers
        return cls(**known, extra=extra)

    @classmethod
    def from_json_file(cls, json_file: str | Path) -> LxmertConfig:
        """From a config.json (the port's, or one written by :meth:`to_json_file`)."""
        path = Path(json_file)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"LxmertConfig: config file {path}: no such file") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"LxmertConfig: config file {path} is not valid JSON ({e})") from None
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{e} (in {path})") from None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        return {**extra, "model_type": "lxmert", **d}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json_string())

    def replace(self, **changes: Any) -> LxmertConfig:
        """A copy with ``changes`` applied (validated)."""
        names = {f.name for f in fields(self)}
        bad = sorted(set(changes) - names)
        if bad:
            raise ValueError(f"LxmertConfig.replace: unknown fields {bad}")
        d = copy.deepcopy(asdict(self))
        d.update(changes)
        return LxmertConfig(**d)


#: Sizes by name: ``base`` is the released model (9 language, 5 object-relationship, 5 cross layers); ``tiny`` is
#: the CPU default of ``fastvl pretrain --model lxmert`` (its vocabulary / feature sizes come from the data).
PRESETS: dict[str, dict[str, Any]] = {
    "base": {},
    "tiny": dict(hidden_size=128, num_attention_heads=4, intermediate_size=256, l_layers=2, x_layers=2, r_layers=1,
                 hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=128,
                 num_qa_labels=64, num_object_labels=17, num_attr_labels=9, visual_feat_dim=64,
                 visual_attr_loss=False),
}


def resolve_lxmert_config(config: LxmertConfig | dict | str | Path | None, **overrides: Any) -> LxmertConfig:
    """An LxmertConfig from a config, a dict, a size name (``tiny`` / ``base``) or a config.json path; then
    ``overrides`` applied."""
    if config is None:
        config = "base"
    if isinstance(config, LxmertConfig):
        cfg = config
    elif isinstance(config, dict):
        cfg = LxmertConfig.from_dict(config)
    elif isinstance(config, str) and config in PRESETS:
        cfg = LxmertConfig(**PRESETS[config])
    elif isinstance(config, (str, Path)) and str(config).endswith(".json"):
        cfg = LxmertConfig.from_json_file(config)
    else:
        raise ValueError(f"LxmertConfig: 'config' must be one of {sorted(PRESETS)}, a .json path, a dict or an "
                         f"LxmertConfig, got {config!r}")
    return cfg.replace(**overrides) if overrides else cfg
