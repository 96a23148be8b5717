"""UNITER model configuration: the official JSON keys, loadable from the official JSON, a dict or fastvl YAML."""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["CONFIG_DIR", "UniterConfig", "resolve_config"]

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
_ACTS = ("gelu", "gelu_new", "relu", "swish")


@dataclass
class UniterConfig:
    """Configuration of a UNITER model.

    The first eleven fields are the keys of the official config JSON (``uniter-base.json``). ``img_dim`` and
    ``img_label_dim`` are fastvl additions used only when a model is built without them (the official
    constructors take them as arguments); they are not required in a JSON file. As in the official class,
    the first positional argument may be a path to a JSON file instead of the vocabulary size.
    """

    vocab_size: int = 28996
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    img_dim: int = 2048
    img_label_dim: int = 1601
    extra: dict = field(default_factory=dict)  # unknown keys of an official JSON, kept for round trips

    def __post_init__(self) -> None:
        if isinstance(self.vocab_size, (str, Path)):  # official: UniterConfig(vocab_size_or_config_json_file)
            loaded = UniterConfig.from_json_file(self.vocab_size)
            for f in fields(self):
                setattr(self, f.name, getattr(loaded, f.name))
            return
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size", "img_dim", "img_label_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"UniterConfig: '{name}' must be a positive int, got {v!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"UniterConfig: 'hidden_size' ({self.hidden_size}) must be a multiple of "
                             f"'num_attention_heads' ({self.num_attention_heads})")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                raise ValueError(f"UniterConfig: '{name}' must be in [0, 1), got {v!r}")
        if self.hidden_act not in _ACTS:
            raise ValueError(f"UniterConfig: 'hidden_act' must be one of {_ACTS}, got {self.hidden_act!r}")
        if not self.initializer_range > 0:
            raise ValueError(f"UniterConfig: 'initializer_range' must be > 0, got {self.initializer_range!r}")

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_dict(cls, d: dict[str, Any], strict: bool = False) -> UniterConfig:
        """Build from a dict of config keys. Unknown keys raise with ``strict``, else warn and go to ``extra``."""
        if not isinstance(d, dict):
            raise TypeError(f"UniterConfig.from_dict: expected a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)} - {"extra"}
        unknown = {k: v for k, v in d.items() if k not in known and k != "extra"}
        if unknown and strict:
            raise ValueError(f"UniterConfig: unknown keys {sorted(unknown)}; known keys are {sorted(known)}")
        if unknown:
            warnings.warn(f"UniterConfig: ignoring unknown keys {sorted(unknown)}", stacklevel=2)
        kw = {k: v for k, v in d.items() if k in known}
        return cls(**kw, extra={**d.get("extra", {}), **unknown})

    @classmethod
    def from_json_file(cls, json_file: str | Path) -> UniterConfig:
        """Read an official UNITER config JSON (e.g. ``uniter-base.json``)."""
        path = Path(json_file)
        if not path.is_file():
            raise FileNotFoundError(f"UniterConfig.from_json_file: no such file {str(path)!r}")
        with open(path, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"UniterConfig.from_json_file: {str(path)!r} is not valid JSON ({err})") from err
        return cls.from_dict(d)

    @classmethod
    def from_yaml(cls, yaml_file: str | Path) -> UniterConfig:
        """Read a fastvl YAML config: its ``model:`` section (or the top level), keys as in the JSON.

        ``arch`` / ``name`` entries of the section are descriptive and ignored; any other unknown key is an error.
        """
        import yaml

        path = Path(yaml_file)
        if not path.is_file():
            raise FileNotFoundError(f"UniterConfig.from_yaml: no such file {str(path)!r}")
        with open(path, encoding="utf-8") as f:
            d = yaml.safe_load(f) or {}
        if not isinstance(d, dict):
            raise ValueError(f"UniterConfig.from_yaml: {str(path)!r} must hold a mapping, got {type(d).__name__}")
        d = dict(d.get("model", d))
        for k in ("arch", "name"):
            d.pop(k, None)
        return cls.from_dict(d, strict=True)

    # ----------------------------------------------------------------------------------------------- saving
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        return {**extra, **d}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json_string(), encoding="utf-8")

    def replace(self, **changes: Any) -> UniterConfig:
        """A validated copy with some fields changed."""
        d = copy.deepcopy(asdict(self))
        unknown = set(changes) - set(d)
        if unknown:
            raise ValueError(f"UniterConfig.replace: unknown fields {sorted(unknown)}")
        d.update(changes)
        return UniterConfig(**d)


def resolve_config(config: UniterConfig | dict | str | Path | None, **overrides: Any) -> UniterConfig:
    """A config from a UniterConfig, a dict, a size name (``tiny``/``base``/``large``: the YAML files in
    ``fastvl/configs``), or a path (``.json`` = official format, ``.yaml``/``.yml`` = fastvl format), then
    ``overrides`` applied."""
    if config is None:
        config = "base"
    if isinstance(config, UniterConfig):
        cfg = config
    elif isinstance(config, dict):
        cfg = UniterConfig.from_dict(config, strict=True)
    elif isinstance(config, (str, Path)):
        path = Path(config)
        named = CONFIG_DIR / f"uniter-{config}.yaml"
        if isinstance(config, str) and "/" not in config and not path.suffix and named.is_file():
            cfg = UniterConfig.from_yaml(named)
        elif path.suffix == ".json":
            cfg = UniterConfig.from_json_file(path)
        elif path.suffix in (".yaml", ".yml"):
            cfg = UniterConfig.from_yaml(path)
        else:
            names = sorted(p.stem.removeprefix("uniter-") for p in CONFIG_DIR.glob("uniter-*.yaml"))
            raise ValueError(f"UNITER config {str(config)!r} is neither a known size {names} nor a .json/.yaml path")
    else:
        raise TypeError(f"UNITER config must be a UniterConfig, dict, name or path, got {type(config).__name__}")
    return cfg.replace(**overrides) if overrides else cfg
