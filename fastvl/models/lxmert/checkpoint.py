"""Loading LXMERT weights: the port's state_dict (``pytorch_model.bin`` / ``model.safetensors`` / a dict), strictly,
with an error that names a checkpoint of another model family (UNITER, HERO) instead of a list of missing keys."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = ["LxmertCheckpointError", "adapt_lxmert_state", "load_lxmert_state", "lxmert_from_pretrained",
           "read_state_file"]

_TIED = ("cls.predictions.decoder.weight", "lxmert.embeddings.word_embeddings.weight")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pt", "model.pt")

#: key prefixes that give away another family's checkpoint
_FAMILIES = (("uniter.", "UNITER"), ("img_embeddings.", "UNITER"), ("v_encoder.", "HERO"), ("c_encoder.", "HERO"),
             ("bert.", "BERT"))


class LxmertCheckpointError(ValueError):
    """A checkpoint that is not an LXMERT state dict of this config."""


def read_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.bin`` / ``.pt`` (tensors only, ``weights_only``) or ``.safetensors`` file; a
    ``{'model': state}`` wrapper (fastvl checkpoints) is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"fastvl.models.lxmert: checkpoint {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (unpickling refusals, corrupt files)
        raise LxmertCheckpointError(f"fastvl.models.lxmert: checkpoint {path} is not a loadable state dict of "
                                    f"tensors ({' '.join(str(e).split())[:160]})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LxmertCheckpointError(f"fastvl.models.lxmert: checkpoint {path} is not a state dict (name -> tensor)")
    return dict(state)


def _family(keys: list[str]) -> str | None:
    for prefix, name in _FAMILIES:
        if any(k.startswith(prefix) for k in keys):
            return name
    return None


def adapt_lxmert_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "state_dict"
                       ) -> dict[str, torch.Tensor]:
    """``state`` renamed for ``model``: 'module.' (DDP) stripped; the 'lxmert.' prefix stripped for an encoder-only
    LxmertModel (the port's base_model_prefix), added for LxmertForPreTraining given encoder-only weights.
    Raises :class:`LxmertCheckpointError` when the keys are not LXMERT's."""
    keys = list(state)
    if keys and all(k.startswith("module.") for k in keys):
        state = {k[len("module."):]: v for k, v in state.items()}
    want = set(model.state_dict())
    has_prefix = any(k.startswith("lxmert.") for k in want)
    if not has_prefix and any(k.startswith("lxmert.") for k in state):
        state = {k[len("lxmert."):]: v for k, v in state.items() if k.startswith("lxmert.")}
    elif has_prefix and not any(k.startswith("lxmert.") for k in state) \
            and any(k.startswith("encoder.") for k in state):
        state = {f"lxmert.{k}": v for k, v in state.items()}
    if _TIED[0] in want and _TIED[0] not in state and _TIED[1] in state:  # tied: files saved with ties drop it
        state = {**state, _TIED[0]: state[_TIED[1]]}
    marker = "lxmert.encoder.x_layers" if has_prefix else "encoder.x_layers"
    core = "lxmert.embeddings.word_embeddings.weight" if has_prefix else "embeddings.word_embeddings.weight"
    if core not in state or not any(k.startswith(marker) or k.startswith("lxmert.encoder.visn_fc")
                                    or k.startswith("encoder.visn_fc") for k in state):
        family = _family(list(state))
        what = f"it looks like a {family} checkpoint" if family else "its keys are not LXMERT's"
        sample = ", ".join(repr(k) for k in list(state)[:3])
        raise LxmertCheckpointError(f"fastvl.models.lxmert: {source} is not an LXMERT state dict: {what} (keys "
                                    f"{sample}, ...); LXMERT checkpoints hold '{core}' and '{marker}.*'")
    return dict(state)


def load_lxmert_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "state_dict",
                      strict: bool = True) -> tuple[list[str], list[str]]:
    """Load ``state`` (see :func:`adapt_lxmert_state`) into ``model``; fp16 tensors become the model's dtype.

    strict: every key must match and every shape must agree, else :class:`LxmertCheckpointError` naming the keys
    (a config mismatch: e.g. another vocabulary size). Returns (missing, unexpected) keys (empty when strict)."""
    state = adapt_lxmert_state(model, state, source)
    own = model.state_dict()
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
           if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise LxmertCheckpointError(f"fastvl.models.lxmert: {source} does not fit this config: "
                                    f"{'; '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}")
    state = {k: v.to(own[k].dtype) if k in own and v.is_floating_point() else v for k, v in state.items()}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if strict and (missing or unexpected):
        raise LxmertCheckpointError(f"fastvl.models.lxmert: {source} does not match the model: missing "
                                    f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected "
                                    f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    model.load_state_dict(state, strict=False)
    return missing, unexpected


def lxmert_from_pretrained(cls: type, path: str | Path, config=None, strict: bool = True) -> nn.Module:
    """``cls(config)`` with the weights of ``path``: a folder in the port's layout (``config.json`` beside
    ``model.safetensors`` or ``pytorch_model.bin``, as ``save_pretrained`` writes it and the hub holds it) or a weights
    file (then ``config``, an LxmertConfig or a config.json path, or a ``config.json`` beside the file)."""
    from .config import LxmertConfig

    path = Path(path)
    if path.is_dir():
        weights = next((path / f for f in _WEIGHT_FILES if (path / f).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"fastvl.models.lxmert: {path} holds none of {list(_WEIGHT_FILES)}")
    elif path.is_file():
        weights = path
    else:
        raise FileNotFoundError(f"fastvl.models.lxmert: checkpoint {path}: no such file or folder")
    if config is None:
        config = weights.parent / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"fastvl.models.lxmert: no config given and no config.json beside {weights}")
    cfg = config if isinstance(config, LxmertConfig) else LxmertConfig.from_json_file(config)
    model = cls(cfg)
    load_lxmert_state(model, read_state_file(weights), source=str(weights), strict=strict)
    return model
