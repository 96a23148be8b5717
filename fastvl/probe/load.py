"""Models to probe: a ``fastvl pretrain`` run folder (or one of its ``checkpoints/step_*`` folders) or an official /
public checkpoint file, each beside a random-weights control of the same architecture.

A checkpoint of another model family (an LXMERT or HERO run or file given as UNITER, a fine-tuning run) raises
:class:`~fastvl.train.checkpoint.CheckpointError` saying what it is.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from ..models.lxmert import LxmertConfig, LxmertForPreTraining, LxmertModel, load_lxmert_state
from ..models.uniter import UniterConfig, UniterForPretraining, UniterModel
from ..recipes.lxmert_pretrain import load_lxmert_run
from ..train import checkpoint as ckpt

__all__ = ["checkpoint_family", "load_lxmert", "load_model", "load_uniter", "lxmert_config_from_state",
           "random_control", "uniter_config_from_state"]

_FAMILY_KEYS = (("lxmert", re.compile(r"(^|\.)(x_layers|r_layers|visn_fc)\.|^lxmert\.")),
                ("hero", re.compile(r"(^|\.)(v_encoder|c_encoder|q_encoder)\.")),
                ("uniter", re.compile(r"(^|\.)img_embeddings\.img_linear\.weight$")))


def checkpoint_family(keys) -> str | None:
    """'uniter', 'lxmert' or 'hero' from a state dict's keys (None when none of them fits)."""
    keys = list(keys)
    for family, pattern in _FAMILY_KEYS:
        if any(pattern.search(k) for k in keys):
            return family
    return None


def _config_family(cfg: dict) -> str:
    if "l_layers" in cfg or "x_layers" in cfg:
        return "lxmert"
    if "f_config" in cfg or "c_config" in cfg:
        return "hero"
    return "uniter" if "num_hidden_layers" in cfg else "unknown"


def _run_folder(path: Path) -> Path | None:
    for run in (path, path.parent.parent):
        if (run / "model_config.json").is_file() or (run / "checkpoints").is_dir():
            return run
    return None


def _side_config(path: Path) -> Path | None:
    """A config JSON beside a checkpoint file (``model_config.json`` as fastvl writes, ``config.json`` as the
    ``transformers`` port does), else None."""
    for name in ("model_config.json", "config.json"):
        if (path.parent / name).is_file():
            return path.parent / name
    return None


def uniter_config_from_state(state: dict[str, torch.Tensor]) -> UniterConfig:
    """A UniterConfig with the sizes a UNITER state dict implies (heads = hidden / 64, as base and large)."""
    def find(suffix: str) -> torch.Tensor:
        for k, v in state.items():
            if k.endswith(suffix):
                return v
        raise ckpt.CheckpointError(f"UNITER state dict has no '*{suffix}' key")

    words = find("embeddings.word_embeddings.weight")
    layers = {int(m.group(1)) for k in state for m in [re.search(r"encoder\.layer\.(\d+)\.", k)] if m}
    hidden = int(words.shape[1])
    return UniterConfig(vocab_size=int(words.shape[0]), hidden_size=hidden, num_hidden_layers=max(layers) + 1,
                        num_attention_heads=max(1, hidden // 64),
                        intermediate_size=int(find("intermediate.dense.weight").shape[0]),
                        max_position_embeddings=int(find("embeddings.position_embeddings.weight").shape[0]),
                        type_vocab_size=int(find("embeddings.token_type_embeddings.weight").shape[0]),
                        img_dim=int(find("img_embeddings.img_linear.weight").shape[1]),
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:  # tensors only: a pickled object in a file someone handed over is refused, never run
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (UnpicklingError, a corrupt zip, a bad safetensors header ...)
        raise ckpt.CheckpointError(f"--checkpoint {path}: not a loadable state dict of tensors "
                                   f"({' '.join(str(e).split())[:160]})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ckpt.CheckpointError(f"--checkpoint {path}: not a state dict (name -> tensor)")
    return state


def load_uniter(path: str | Path, config: str | Path | None = None) -> tuple[nn.Module, dict]:
    """A UNITER model (eval mode) from a ``fastvl pretrain`` run folder / checkpoint folder or a checkpoint file
    (``.pt`` / ``.safetensors``: an official UNITER checkpoint; its config is ``config`` (an official JSON), else a
    ``model_config.json`` / ``config.json`` beside the file, else the sizes its shapes imply with heads = hidden / 64
    as UNITER-base and -large). Returns (model, info: {'source', 'checkpoint', 'kind', 'config'})."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint {path}: no such file or folder")
    if path.is_dir():
        run = _run_folder(path)
        if run is None:
            raise ckpt.CheckpointError(f"--checkpoint {path} is not a fastvl pretrain run folder nor one of its "
                                       f"checkpoints/step_* folders (no model_config.json)")
        if (run / "finetune.json").is_file():
            task = json.loads((run / "finetune.json").read_text()).get("task", "?")
            raise ckpt.CheckpointError(f"--checkpoint {path} is a fastvl finetune run (task {task}); the probes "
                                       f"read pre-trained encoders: give a fastvl pretrain run")
        cfg_file = run / "model_config.json"
        if not cfg_file.is_file():
            raise ckpt.CheckpointError(f"--checkpoint {path}: run folder {run} has no model_config.json")
        raw = json.loads(cfg_file.read_text())
        family = _config_family(raw)
        settings = json.loads((run / "settings.json").read_text()) if (run / "settings.json").is_file() else {}
        family = settings.get("model", family) if settings.get("model") in ("lxmert", "hero") else family
        if family != "uniter":
            raise ckpt.CheckpointError(f"--checkpoint {path} is an LXMERT run, not UNITER: use --model lxmert"
                                       if family == "lxmert" else f"--checkpoint {path} is a {family} run, not UNITER")
        folder = path if (path / "model.safetensors").is_file() else ckpt.latest_checkpoint(run)
        if folder is None:
            raise ckpt.CheckpointError(f"--checkpoint {run} holds no complete checkpoint")
        cfg = UniterConfig.from_json_file(cfg_file)
        model = UniterForPretraining(cfg, cfg.img_dim, cfg.img_label_dim)
        ckpt.load_checkpoint(folder, model, trainer_state=False)
        info = {"source": str(path), "checkpoint": str(folder), "kind": "fastvl pretrain run"}
    else:
        state = _read_state(path)
        family = checkpoint_family(state)
        if family != "uniter":
            what = f"an {family.upper()} checkpoint" if family == "lxmert" else (
                f"a {family.upper()} checkpoint" if family else "not a UNITER checkpoint (no img_embeddings keys)")
            hint = " (use --model lxmert)" if family == "lxmert" else ""
            raise ckpt.CheckpointError(f"--checkpoint {path} is {what}, not UNITER{hint}")
        config = config or _side_config(path)
        cfg = UniterConfig.from_json_file(config) if config else uniter_config_from_state(state)
        model = UniterModel.from_pretrained(cfg, state, cfg.img_dim)
        if not any(k.startswith("encoder.layer.") for k in model.state_dict() if k not in
                   model.loading_info["missing_keys"]):
            raise ckpt.CheckpointError(f"--checkpoint {path}: no encoder weight loaded (keys not UNITER's)")
        info = {"source": str(path), "checkpoint": str(path), "kind": "checkpoint file",
                "config": str(config) if config else "sizes read from the weights (heads = hidden / 64)",
                "missing_keys": len(model.loading_info["missing_keys"])}
    model.eval()
    info["model_config"] = model.config.to_dict()
    return model, info


def lxmert_config_from_state(state: dict[str, torch.Tensor]) -> LxmertConfig:
    """An LxmertConfig with the sizes an LXMERT state dict implies (heads = hidden / 64, as the released model)."""
    def find(suffix: str) -> torch.Tensor:
        for k, v in state.items():
            if k.endswith(suffix):
                return v
        raise ckpt.CheckpointError(f"LXMERT state dict has no '*{suffix}' key")

    def count(part: str) -> int:
        found = {int(m.group(1)) for k in state for m in [re.search(rf"encoder\.{part}\.(\d+)\.", k)] if m}
        return max(found) + 1 if found else 0

    words = find("embeddings.word_embeddings.weight")
    hidden = int(words.shape[1])
    kw = dict(vocab_size=int(words.shape[0]), hidden_size=hidden, num_attention_heads=max(1, hidden // 64),
              intermediate_size=int(find("encoder.layer.0.intermediate.dense.weight").shape[0]),
              max_position_embeddings=int(find("embeddings.position_embeddings.weight").shape[0]),
              type_vocab_size=int(find("embeddings.token_type_embeddings.weight").shape[0]),
              l_layers=count("layer"), x_layers=count("x_layers"), r_layers=count("r_layers"),
              visual_feat_dim=int(find("visn_fc.visn_fc.weight").shape[1]),
              visual_pos_dim=int(find("visn_fc.box_fc.weight").shape[1]),
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return LxmertConfig(**kw)


def load_lxmert(path: str | Path, config: str | Path | None = None) -> tuple[nn.Module, dict]:
    """An LXMERT model (eval mode) from a ``fastvl pretrain --model lxmert`` run folder / checkpoint folder or a
    checkpoint file (the ``transformers`` port's state dict; sizes from ``config`` (the port's config.json), else a
    ``config.json`` / ``model_config.json`` beside the file, else the shapes with heads = hidden / 64; the encoder is
    loaded strictly). Returns (model, info)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint {path}: no such file or folder")
    if path.is_dir():
        run = _run_folder(path)
        if run is not None and (run / "finetune.json").is_file():
            raise ckpt.CheckpointError(f"--checkpoint {path} is a fastvl finetune run; the probes read pre-trained "
                                       f"encoders: give a fastvl pretrain --model lxmert run")
        try:
            model, folder = load_lxmert_run(path)
        except ckpt.CheckpointError as e:
            hint = " (use --model uniter)" if "UNITER" in str(e) else ""
            raise ckpt.CheckpointError(f"--checkpoint {path}: {e}{hint}") from None
        info = {"source": str(path), "checkpoint": str(folder), "kind": "fastvl pretrain --model lxmert run"}
    else:
        state = _read_state(path)
        family = checkpoint_family(state)
        if family != "lxmert":
            what = f"a {family.upper()} checkpoint" if family else "not an LXMERT checkpoint (no x_layers keys)"
            hint = " (use --model uniter)" if family == "uniter" else ""
            raise ckpt.CheckpointError(f"--checkpoint {path} is {what}, not LXMERT{hint}")
        config = config or _side_config(path)
        cfg = LxmertConfig.from_json_file(config) if config else lxmert_config_from_state(state)
        model = LxmertModel(cfg)
        try:
            load_lxmert_state(model, {k: v for k, v in state.items() if not k.startswith(("cls.", "answer_head.",
                                                                                          "obj_predict_head."))},
                              str(path))
        except ValueError as e:
            raise ckpt.CheckpointError(f"--checkpoint {path}: {e}") from None
        info = {"source": str(path), "checkpoint": str(path), "kind": "checkpoint file",
                "config": str(config) if config else "sizes read from the weights (heads = hidden / 64)"}
    model.eval()
    info["model_config"] = getattr(model, "lxmert", model).config.to_dict()
    return model, info


def load_model(family: str, path: str | Path, config: str | Path | None = None) -> tuple[nn.Module, dict]:
    """:func:`load_uniter` or :func:`load_lxmert` by ``family`` ('uniter' / 'lxmert')."""
    loaders = {"uniter": load_uniter, "lxmert": load_lxmert}
    if family not in loaders:
        raise ValueError(f"fastvl.probe.load_model: 'family' must be one of {sorted(loaders)}, got {family!r}")
    return loaders[family](path, config)


def random_control(model: nn.Module, seed: int = 0) -> nn.Module:
    """The random-weights control of ``model``: a fresh ENCODER of the same config (UniterModel / LxmertModel, the
    part the probes read) with the official random initialisation drawn from ``seed``, in eval mode. It depends
    only on the config and the seed, so a run folder and the same weights as a file get the same control."""
    if isinstance(model, (UniterForPretraining, UniterModel)):
        enc = getattr(model, "uniter", model)
        build = lambda: UniterModel(enc.config, enc.img_dim)  # noqa: E731
    elif isinstance(model, (LxmertForPreTraining, LxmertModel)):
        enc = getattr(model, "lxmert", model)
        build = lambda: LxmertModel(enc.config)  # noqa: E731
    else:
        raise TypeError(f"random_control: no control for a {type(model).__name__}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        control = build()
    return control.eval()
