"""``fastvl finetune --task T``: fine-tune on any registered recipe (vqa, gqa, ve, nlvr2, itr, re, vcr, caption, and
recipes registered by the user); default UNITER-tiny on the task's synthetic data.

``--train-config`` takes an official UNITER / VILLA fine-tuning JSON (``uniter-train-vqa-base-4gpu.json``,
``villa-train-vqa-base-4gpu-adv.json``): its hyper-parameters (see :mod:`fastvl.recipes.official`), explicit flags
winning. Distributed: ``torchrun --nproc_per_node N -m fastvl.cli finetune ...``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields

from ..recipes import FinetuneSettings, finetune, get_recipe, list_models, list_recipes
from ..recipes.official import ADV_KEY_FIELDS, finetune_from_official, read_official
from .errors import UserError
from .options import (
    RUN_OPTIONS,
    add_adv_arguments,
    add_run_arguments,
    adv_from_args,
    check_config,
    check_paths,
    given_options,
    parse_options,
    positive_float,
    positive_int,
    print_settings,
    probability,
    settings_table,
)

__all__ = ["HELP", "add_arguments", "resolve", "run", "settings_from_args"]

HELP = "fine-tune UNITER on a downstream task (default: UNITER-tiny on the task's synthetic data)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, choices=list_recipes(), help="the downstream task")
    p.add_argument("--model", default="uniter", choices=list_models(),
                   help="the model family (default uniter); each (model, task) pair is one registered recipe")
    p.add_argument("--init", default=None,
                   help="pre-trained weights: a `fastvl pretrain` output folder, a checkpoints/step_* folder, a "
                        ".safetensors file or an official .pt (default: random init)")
    p.add_argument("--config", default=None, help="model config: tiny | base | large | path (default: the --init "
                                                  "run's model_config.json, else tiny)")
    p.add_argument("--data", default=None, help="folder holding txt_db/*.db and img_db/<name>/ (validation txt_dbs "
                                                "named *val*); default: the task's synthetic data")
    p.add_argument("--txt-db", nargs="*", default=[], help="training txt_db folder(s)")
    p.add_argument("--img-db", nargs="*", default=[], help="img_db folder(s), one per --txt-db")
    p.add_argument("--val-txt-db", nargs="*", default=[])
    p.add_argument("--val-img-db", nargs="*", default=[])
    p.add_argument("--output", default=None, help="run folder (default runs/finetune-<task>): checkpoints, "
                                                  "metrics.jsonl, settings.json")
    p.add_argument("--head-lr-mult", type=positive_float, default=None,
                   help="learning-rate multiplier of the task head (official lr_mul)")
    p.add_argument("--dropout", type=probability, default=None,
                   help="every dropout of the model (official set_dropout; default: the model config's)")
    p.add_argument("--max-txt-len", type=positive_int, default=None)
    p.add_argument("--val-batches", type=positive_int, default=None, help="validation batches per evaluation "
                                                                          "(default all)")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="task option, e.g. variant=triplet (nlvr2), ans2label=PATH (vqa), eval_images=200 (itr)")
    add_run_arguments(p, "default: 1 for hidden size <= 256")
    add_adv_arguments(p, "fine-tuning")


_FLAG_FIELDS = (*RUN_OPTIONS, "init", "config", "data", "output", "head_lr_mult", "dropout", "max_txt_len",
                "val_batches")


def resolve(args: argparse.Namespace) -> tuple[FinetuneSettings, str]:
    """(settings, the table of where each setting came from): defaults, then --train-config, then the flags given,
    then the task's defaults for what is still unset."""
    try:
        spec = get_recipe(args.task, args.model)
    except ValueError as e:
        raise UserError(str(e).split(": ", 1)[-1], argument="--task") from None
    json_values: dict = {}
    unused: dict = {}
    cfg: dict = {}
    if args.train_config:
        cfg = read_official(args.train_config)
        json_values, unused = finetune_from_official(cfg, args.task)
    flags = given_options(args, _FLAG_FIELDS)
    check_config("--config", flags.get("config"))
    if flags.get("init"):
        check_paths("--init", flags["init"], kind="any")
    if flags.get("data"):
        check_paths("--data", flags["data"])
    for opt in ("txt_db", "img_db", "val_txt_db", "val_img_db"):
        check_paths("--" + opt.replace("_", "-"), getattr(args, opt))
    values = {k: v for k, v in json_values.items() if k != "adv"}
    values.update(flags)
    s = FinetuneSettings(task=args.task, model=args.model, txt_db=list(args.txt_db), img_db=list(args.img_db),
                         val_txt_db=list(args.val_txt_db), val_img_db=list(args.val_img_db), resume=args.resume,
                         skip_bad_examples=args.skip_bad_examples, progress=not args.no_progress,
                         options=parse_options(args.opt), **values)
    adv_fields = [ADV_KEY_FIELDS[k] for k in cfg if k in ADV_KEY_FIELDS]
    s.adv, adv_sources = adv_from_args(args, json_values.get("adv"), adv_fields)
    sources = {**dict.fromkeys(json_values, "JSON"), **dict.fromkeys(flags, "flag"), "task": "flag", "model": "flag"}
    for name in ("txt_db", "img_db", "val_txt_db", "val_img_db", "options"):
        if getattr(s, name):
            sources[name] = "flag"
    for name in ("resume", "skip_bad_examples"):
        if getattr(args, name):
            sources[name] = "flag"
    if s.adv is not None:
        sources["adv"] = "flag" if args.adv else "JSON"
    resolved = s.resolved(spec)
    for f in fields(s):
        if f.name not in sources and getattr(s, f.name) is None:
            sources[f.name] = f"{spec.name} default" if f.name in spec.defaults else "default"
    table = settings_table(resolved, sources, json_values, unused, adv_sources)
    if cfg and not (s.data or s.txt_db):
        table += f"\ndata: no --data / --txt-db given: the synthetic {spec.name} data"
    return s, table


def settings_from_args(args: argparse.Namespace) -> FinetuneSettings:
    """FinetuneSettings from parsed ``fastvl finetune`` arguments (see :func:`resolve`)."""
    return resolve(args)[0]


def run(args: argparse.Namespace) -> int:
    """Print the resolved settings, fine-tune; print a one-line JSON summary (task, metric, chance, minutes,
    checkpoint). Bad or missing data ends in one error line (:func:`fastvl.cli.main`)."""
    t0 = time.perf_counter()
    settings, table = resolve(args)
    print_settings(f"fastvl finetune {args.task} settings (from: flag > JSON > task default > default):", table)
    result = finetune(settings)
    summary = {"task": result["task"], "metric": result["metric_name"], "value": result["metric"],
               "chance": round(result["chance"], 4), "minutes": round((time.perf_counter() - t0) / 60, 2),
               "checkpoint": result["checkpoint"]}
    if result["validation"]:
        summary["validation"] = {k: round(v, 4) for k, v in result["validation"].items()}
    if result["bad_examples"]:
        summary["bad_examples"] = result["bad_examples"]
    print("final:", json.dumps(summary))
    return 0
