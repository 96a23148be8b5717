"""Official UNITER / VILLA training JSONs (``--train-config``) -> fastvl settings, key by key.

The official scripts (``train_vqa.py``, ``train_vqa_adv.py``, ``pretrain.py`` ...) read a JSON with
``parse_with_config``; the keys below are the ones they read for the hyper-parameters. :func:`finetune_from_official`
and :func:`pretrain_from_official` return ``{setting: value}`` in fastvl's units plus ``{json key: why it is not
used}``. Data paths, the checkpoint and the output folder in these files point into the authors' containers: they
are never used (the user's flags give data, ``--init`` and ``--output``).

Batch size: the official token-bucket scripts (VQA, VE, NLVR2, VCR, pre-training) count ``train_batch_size`` in
padded tokens per GPU, which is fastvl's ``batch_tokens``; the retrieval and referring-expression scripts
(``train_itm.py``, ``train_re.py``) count examples, which fastvl's token-bucket batches cannot express: that key is
reported as not used for them (give ``--batch-tokens``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..adversarial import AdvConfig
from .base import SettingsError

__all__ = ["ADV_KEY_FIELDS", "EXAMPLE_BATCH_TASKS", "PATH_KEYS", "finetune_from_official", "model_size",
           "pretrain_from_official", "read_official"]

#: Keys holding the authors' container paths (never used).
PATH_KEYS = ("train_txt_dbs", "train_img_dbs", "train_txt_db", "train_img_db", "val_txt_db", "val_img_db",
             "val_txt_dbs", "val_img_dbs", "test_txt_db", "test_img_db", "checkpoint", "output_dir", "train_datasets",
             "val_datasets")
#: Keys that do not change training in fastvl.
_NOT_APPLICABLE = {"n_workers": "data loading runs in the training process", "pin_mem": "no pinned host memory",
                   "compressed_db": "the img_db format is read from its files",
                   "val_batch_size": "validation batches use batch_tokens",
                   "inf_minibatch_size": "evaluation batches are sized by fastvl"}
_REGION_KEYS = ("conf_th", "max_bb", "min_bb", "num_bb")
#: Fine-tuning jobs whose official script counts ``train_batch_size`` in examples.
EXAMPLE_BATCH_TASKS = frozenset({"itr", "re"})
#: The adversarial keys :meth:`AdvConfig.from_official` reads -> the AdvConfig field each sets.
ADV_KEY_FIELDS = {"adv_modality": "mode", "norm_type": "norm", "adv_steps": "adv_steps", "adv_lr_txt": "adv_lr_txt",
                  "adv_lr_img": "adv_lr_img", "adv_max_norm": "adv_max_norm", "adv_kl_weight": "adv_kl_weight",
                  "adv_init_mag": "adv_init_mag"}


def read_official(path: str | Path) -> dict[str, Any]:
    """The JSON object of an official training config; FileNotFoundError / ValueError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--train-config {p}: no such file")
    try:
        cfg = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SettingsError(f"--train-config {p}: not a JSON file ({e})") from None
    if not isinstance(cfg, dict):
        raise SettingsError(f"--train-config {p}: expected a JSON object of training options, got {type(cfg).__name__}")
    return cfg


def model_size(cfg: dict[str, Any], known: tuple[str, ...] = ("tiny", "base", "large")) -> str | None:
    """``uniter-base.json`` -> ``base`` (the config file itself is the authors' path; only its size name is used)."""
    if "model_config" not in cfg:
        return None
    name = Path(str(cfg["model_config"])).name.removesuffix(".json").removeprefix("uniter-")
    return name if name in known else None


def _common(cfg: dict[str, Any], values: dict[str, Any], unused: dict[str, str]) -> None:
    mapping = {"learning_rate": "lr", "num_train_steps": "steps", "warmup_steps": "warmup_steps",
               "gradient_accumulation_steps": "grad_accum", "weight_decay": "weight_decay", "seed": "seed",
               "max_txt_len": "max_txt_len", "valid_steps": "val_every"}
    for key, name in mapping.items():
        if key in cfg:
            values[name] = cfg[key]
    if "grad_norm" in cfg:  # official: -1 = no clipping; fastvl: 0 = no clipping
        values["grad_clip"] = 0.0 if float(cfg["grad_norm"]) < 0 else float(cfg["grad_norm"])
    if "betas" in cfg:
        values["betas"] = tuple(float(b) for b in cfg["betas"])
    size = model_size(cfg)
    if size is not None:
        values["config"] = size
    elif "model_config" in cfg:
        unused["model_config"] = "an authors' path of no known size (tiny / base / large): give --config"
    if cfg.get("optim", "adamw") != "adamw":
        unused["optim"] = f"{cfg['optim']!r}: fastvl trains with AdamW (decoupled weight decay)"
    for key in PATH_KEYS:
        if key in cfg:
            unused[key] = "the authors' container path: data, --init and --output come from the flags"
    for key, why in _NOT_APPLICABLE.items():
        if key in cfg:
            unused[key] = why
    for key in _REGION_KEYS:
        if key in cfg:
            unused[key] = "the img_db folder fixes the regions (feat_th*_max*_min*)"


def finetune_from_official(cfg: dict[str, Any], task: str) -> tuple[dict[str, Any], dict[str, str]]:
    """(FinetuneSettings values, {json key: why not used}) of an official fine-tuning JSON for job ``task``.

    ``lr_mul`` -> ``head_lr_mult`` (the task head's learning-rate multiplier), ``dropout`` -> ``dropout`` (every
    dropout of the model, as the official ``set_dropout``), ``fp16`` -> ``precision`` ``auto`` (bf16 autocast on a
    GPU, fp32 on the CPU; false: ``fp32``), VILLA's ``adv_*`` keys -> ``adv`` (:meth:`AdvConfig.from_official`).
    """
    values: dict[str, Any] = {}
    unused: dict[str, str] = {}
    _common(cfg, values, unused)
    if "train_batch_size" in cfg:
        if task in EXAMPLE_BATCH_TASKS:
            unused["train_batch_size"] = (f"counted in examples by the official {task} script; fastvl batches by "
                                          "tokens: give --batch-tokens")
        else:
            values["batch_tokens"] = int(cfg["train_batch_size"])
    if "lr_mul" in cfg:
        values["head_lr_mult"] = float(cfg["lr_mul"])
    if "dropout" in cfg:
        values["dropout"] = float(cfg["dropout"])
    if "fp16" in cfg:
        values["precision"] = "auto" if cfg["fp16"] else "fp32"
    adv = AdvConfig.from_official(cfg)
    if adv is not None:
        values["adv"] = adv.to_dict()
    elif any(k in cfg for k in ADV_KEY_FIELDS):
        unused["adv_*"] = "adv_training is off"
    return values, unused


def pretrain_from_official(cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """(PretrainSettings values, {json key: why not used}) of an official pre-training JSON: token budget,
    accumulation, lr, schedule, clipping, mix ratios (``train_datasets``' tasks, ``mrckl`` = ``mrc-kl``), masking,
    the OT weight; ``fp16`` -> ``precision`` ``bf16``."""
    values: dict[str, Any] = {}
    unused: dict[str, str] = {}
    _common(cfg, values, unused)
    if "train_batch_size" in cfg:
        values["batch_tokens"] = int(cfg["train_batch_size"])
    mix: dict[str, float] = {}
    for ds in cfg.get("train_datasets", []):
        for t, ratio in zip(ds["tasks"], ds["mix_ratio"]):
            t = {"mrckl": "mrc-kl"}.get(t, t)
            mix[t] = mix.get(t, 0) + ratio
    if mix:
        values["tasks"] = ",".join(f"{t}:{r}" for t, r in mix.items())
    for key, name in {"itm_ot_lambda": "ot_lambda", "mrm_prob": "mask_prob", "itm_neg_prob": "itm_neg_prob"}.items():
        if key in cfg:
            values[name] = cfg[key]
    if cfg.get("fp16"):
        values["precision"] = "bf16"
    if "config" not in values:  # as before: a pre-training JSON of no known size trains base
        values["config"] = "base"
        unused.pop("model_config", None)
    if "dropout" in cfg:
        unused["dropout"] = "pre-training keeps the model config's dropout (base / large: 0.1)"
    return values, unused
