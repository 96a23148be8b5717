"""What the HERO-family jobs share: the tiny HERO config for CPU runs, resolving a config name or official JSON,
loading ``--init`` weights (a ``fastvl pretrain --model hero`` run folder or an official checkpoint), and the
synthetic video corpus paths when no dbs are given."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.video import VideoSyntheticConfig, video_synthetic_corpus
from ..models.hero import VideoModelConfig
from ..models.hero.model import load_hero_state_dict
from .base import SettingsError, load_init_state, run_folder

__all__ = ["HERO_CONFIG_FILE", "hero_config", "hero_tiny_config", "load_hero_init", "video_data_paths"]

HERO_CONFIG_FILE = "model_config.json"


def hero_tiny_config(vocab_size: int, hidden: int = 64, f_layers: int = 2, c_layers: int = 2, heads: int = 4,
                     dropout: float = 0.1) -> dict[str, Any]:
    """A HERO config in the ``hero_finetune.json`` layout at CPU size (vocab padded to a multiple of 8, 2 type rows;
    q_config 0 layers, 1 type row)."""
    vocab = (vocab_size + 7) // 8 * 8
    common = dict(attention_probs_dropout_prob=dropout, hidden_act="gelu", hidden_dropout_prob=dropout,
                  hidden_size=hidden, initializer_range=0.02, intermediate_size=2 * hidden,
                  max_position_embeddings=514, num_attention_heads=heads)
    return {"f_config": {**common, "num_hidden_layers": f_layers, "type_vocab_size": 2, "vocab_size": vocab},
            "c_config": {**common, "num_hidden_layers": c_layers, "type_vocab_size": 2},
            "q_config": {**common, "num_hidden_layers": 0, "type_vocab_size": 1, "vocab_size": vocab}}


def hero_config(config: str | None, vocab_size: int, init: str | None = None) -> VideoModelConfig:
    """The run's HERO config: ``config`` 'tiny' (or None without an ``--init`` run folder) -> :func:`hero_tiny_config`;
    a path -> that official JSON; None with ``init`` a fastvl run folder -> its ``model_config.json``. Raises
    SettingsError when the vocabulary cannot hold the data's token ids."""
    if config is None and init:
        p = Path(init)
        run = run_folder(p if p.is_dir() else p.parent)
        if run is not None:
            config = str(run / HERO_CONFIG_FILE)
    if config in (None, "tiny"):
        cfg = VideoModelConfig(hero_tiny_config(vocab_size))
    else:
        p = Path(config)
        if not p.is_file():
            raise SettingsError(f"HERO config {config}: not 'tiny' nor an official config JSON file")
        try:
            cfg = VideoModelConfig(p)
        except (ValueError, TypeError, KeyError, json.JSONDecodeError) as e:
            raise SettingsError(f"HERO config {config}: {e}") from None
    if cfg.f_config.vocab_size < vocab_size:
        raise SettingsError(f"HERO config {config or 'tiny'}: f_config.vocab_size {cfg.f_config.vocab_size} is smaller "
                            f"than the data's vocabulary ({vocab_size} ids)")
    return cfg


def load_hero_init(model: nn.Module, init: str | dict | None, log=print) -> dict[str, int]:
    """Load ``init`` (a path for :func:`fastvl.recipes.base.load_init_state`, or a state_dict) into ``model``
    non-strictly, as the official fine-tuning scripts do (a pre-training checkpoint has no fine-tuning head; a
    fine-tuning model may lack the VSM heads). Returns {'loaded', 'missing', 'unexpected'}; SettingsError when
    nothing matches or a shared weight has another shape."""
    if init is None:
        return {"loaded": 0, "missing": 0, "unexpected": 0}
    state = load_init_state(init)[0] if not isinstance(init, dict) else init
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if isinstance(v, torch.Tensor) and k in own and v.shape != own[k].shape]
    if wrong:
        raise SettingsError(f"--init {init if not isinstance(init, dict) else '<state_dict>'}: weights of another "
                            f"shape than the model's config: {wrong[:3]}")
    load_hero_state_dict(model, {k: v for k, v in state.items() if k in own}, strict=False)
    loaded = sum(1 for k in state if k in own)
    if loaded == 0:
        raise SettingsError(f"--init {init}: no weight matches the HERO model (is it a HERO checkpoint?)")
    stats = {"loaded": loaded, "missing": len(set(own) - set(state)), "unexpected": len(set(state) - set(own))}
    log(f"--init: loaded {stats['loaded']} tensors; {stats['missing']} model tensors kept their initialisation "
        f"(task heads), {stats['unexpected']} checkpoint tensors unused")
    return stats


def video_data_paths(video_db: str | None, sub_db: str | None, cache_dir: str | None = None,
                     qa_events: int | str | None = None, train_videos: int | str | None = None) -> dict[str, Any]:
    """{'video_db', 'sub_db', 'corpus' (the synthetic VideoCorpus or None), 'synthetic'}: the given dbs, or the
    synthetic video corpus (generated into the cache on first use) when both are None. Synthetic corpus knobs:
    ``qa_events`` (``VideoSyntheticConfig.qa_events``: TVQA questions / VIOLIN pairs per video, 0 = every event) and
    ``train_videos`` (``n_train_videos``; the first videos and the validation split are the same for every
    count)."""
    if (video_db is None) != (sub_db is None):
        raise SettingsError("give both a video db and a subtitle db (--video-db and --sub-db), or neither for the "
                            "synthetic video corpus")
    if video_db is None:
        knobs: dict[str, int] = {}
        for opt, value, field, low, what in (("qa_events", qa_events, "qa_events", 0, ">= 0 (0 = every event)"),
                                             ("train_videos", train_videos, "n_train_videos", 2, ">= 2")):
            if value is None:
                continue
            try:
                n = int(value)
            except (TypeError, ValueError):
                n = None
            if n is None or n < low:
                raise SettingsError(f"--opt {opt}={value}: an integer {what} expected")
            knobs[field] = n
        corpus = video_synthetic_corpus(cache_dir, VideoSyntheticConfig(**knobs) if knobs else None)
        return {"video_db": str(corpus.video_db), "sub_db": str(corpus.sub_db), "corpus": corpus, "synthetic": True}
    return {"video_db": video_db, "sub_db": sub_db, "corpus": None, "synthetic": False}
