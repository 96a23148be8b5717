"""``fastvl pretrain``: pre-train UNITER (default: UNITER-tiny on the built-in synthetic corpus).

Distributed: ``torchrun --nproc_per_node N -m fastvl.cli pretrain ...`` (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from ..recipes.official import ADV_KEY_FIELDS, pretrain_from_official, read_official
from ..recipes.pretrain import PRESETS, PretrainSettings, pretrain
from . import pretrain_hero, pretrain_lxmert
from .errors import UserError
from .options import (
    RUN_OPTIONS,
    add_adv_arguments,
    add_run_arguments,
    adv_from_args,
    check_config,
    check_paths,
    given_options,
    non_negative_float,
    print_settings,
    settings_table,
    task_mix_type,
)

__all__ = ["HELP", "add_arguments", "resolve", "run", "settings_from_args"]

HELP = "pre-train UNITER (default: UNITER-tiny on the built-in synthetic corpus)"


#: ``fastvl pretrain --model NAME`` for the families other than UNITER: a module with ``add_arguments(parser)`` (its
#: own options, named so they clash with no other family's) and ``run(args) -> exit code``; the run options
#: (--steps, --lr, --output, --seed, --device, ...) are shared.
OTHER_MODELS = {"hero": pretrain_hero, "lxmert": pretrain_lxmert}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="uniter", choices=["uniter", *OTHER_MODELS],
                   help="the model family to pre-train (default uniter)")
    p.add_argument("--config", default=None, help="model config: tiny | base | large | path (.json / .yaml) "
                                                  "(default: tiny; with --train-config: its model_config's size)")
    p.add_argument("--data", default=None, help="folder holding txt_db/ and img_db/ (instead of --txt-db/--img-db)")
    p.add_argument("--txt-db", nargs="*", default=[], help="training txt_db folder(s) (default: synthetic corpus)")
    p.add_argument("--img-db", nargs="*", default=[], help="img_db folder(s), one per --txt-db")
    p.add_argument("--val-txt-db", nargs="*", default=[])
    p.add_argument("--val-img-db", nargs="*", default=[])
    p.add_argument("--output", default=None, help="checkpoints, metrics.jsonl, settings.json (default runs/pretrain)")
    p.add_argument("--tasks", type=task_mix_type(), default=None, help="task mix, e.g. itm:3,mlm:4,mrfr:2,mrc-kl:2")
    p.add_argument("--init-checkpoint", default=None, help="weights to start from (e.g. an official .pt)")
    p.add_argument("--ot-lambda", type=non_negative_float, default=None, help="weight of the OT (WRA) loss in ITM")
    add_run_arguments(p, "tiny default: 1")
    add_adv_arguments(p, "pre-training")
    for name, module in OTHER_MODELS.items():
        module.add_arguments(p.add_argument_group(f"--model {name}"))


def _data_paths(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    txt, img = list(args.txt_db), list(args.img_db)
    check_paths("--txt-db", txt)
    check_paths("--img-db", img)
    check_paths("--val-txt-db", args.val_txt_db)
    check_paths("--val-img-db", args.val_img_db)
    if args.data:
        check_paths("--data", args.data)
        root = Path(args.data)
        txt = txt or [str(p) for p in sorted(root.glob("txt*db*")) if p.is_dir()]
        img = img or [str(p) for p in sorted(root.glob("img*")) if p.is_dir()]
        if not txt or not img:
            raise UserError(f"{root} holds no txt_db / img_db folders", argument="--data")
        if len(img) == 1 and len(txt) > 1:
            img = img * len(txt)
    if len(txt) != len(img):
        raise UserError(f"{len(txt)} txt_db path(s) but {len(img)} img_db path(s) {img}: give one img_db per txt_db",
                        argument="--img-db")
    return txt, img


def resolve(args: argparse.Namespace) -> tuple[PretrainSettings, str]:
    """(settings, the table of where each setting came from): defaults, then --train-config, then the flags given,
    then the model size's preset for what is still unset."""
    json_values: dict = {}
    unused: dict = {}
    cfg: dict = {}
    if args.train_config:
        cfg = read_official(args.train_config)
        json_values, unused = pretrain_from_official(cfg)
    flags = given_options(args, (*RUN_OPTIONS, "config", "tasks", "init_checkpoint", "ot_lambda", "output"))
    check_config("--config", flags.get("config"))
    if flags.get("init_checkpoint"):
        check_paths("--init-checkpoint", flags["init_checkpoint"], kind="file")
    txt, img = _data_paths(args)
    s = PretrainSettings(**{**json_values, **flags})
    s.txt_db, s.img_db = txt, img
    s.val_txt_db, s.val_img_db = list(args.val_txt_db), list(args.val_img_db)
    s.resume, s.skip_bad_examples, s.progress = args.resume, args.skip_bad_examples, not args.no_progress
    adv_json = None
    adv_fields: list[str] = []
    if cfg.get("adv_training"):  # a VILLA pre-training JSON
        from ..adversarial import AdvConfig

        adv_json = AdvConfig.from_official(cfg).to_dict()
        adv_fields = [ADV_KEY_FIELDS[k] for k in cfg if k in ADV_KEY_FIELDS]
        json_values["adv"] = adv_json
    s.adv, adv_sources = adv_from_args(args, adv_json, adv_fields)
    sources = {**dict.fromkeys(json_values, "JSON"), **dict.fromkeys(flags, "flag")}
    for name in ("txt_db", "img_db", "val_txt_db", "val_img_db"):
        if getattr(s, name):
            sources[name] = "flag"
    for name in ("resume", "skip_bad_examples"):
        if getattr(args, name):
            sources[name] = "flag"
    if s.adv is not None:
        sources["adv"] = "flag" if args.adv else "JSON"
    resolved = s.resolved()
    preset = s.config if s.config in PRESETS else ("base" if s.txt_db else "tiny")
    for f in fields(s):
        if f.name not in sources and getattr(s, f.name) is None and getattr(resolved, f.name) is not None:
            sources[f.name] = f"preset {preset}"
    table = settings_table(resolved, sources, json_values, unused, adv_sources)
    if cfg and not s.txt_db:
        table += "\ndata: no --txt-db / --data given: the built-in synthetic corpus"
    return s, table


def settings_from_args(args: argparse.Namespace) -> PretrainSettings:
    """PretrainSettings from parsed ``fastvl pretrain`` arguments (see :func:`resolve`)."""
    return resolve(args)[0]


def run(args: argparse.Namespace) -> int:
    """Print the resolved settings, train; print the final validation line."""
    if args.model != "uniter":
        return OTHER_MODELS[args.model].run(args)
    settings, table = resolve(args)
    print_settings("fastvl pretrain settings (from: flag > JSON > preset / default):", table)
    result = pretrain(settings)
    if result["validation"]:
        print("final validation:", json.dumps({k: round(v, 4) for k, v in result["validation"].items()}))
    return 0
