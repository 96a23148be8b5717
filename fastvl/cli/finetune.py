"""``fastvl finetune --task T``: fine-tune on any registered recipe (vqa, gqa, ve, nlvr2, itr, re, vcr, caption, and
recipes registered by the user); default UNITER-tiny on the task's synthetic data.

Distributed: ``torchrun --nproc_per_node N -m fastvl.cli finetune ...``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..data import DataError
from ..recipes import FinetuneSettings, finetune, list_recipes
from .options import RUN_OPTIONS, add_adv_arguments, add_run_arguments, adv_from_args, parse_options, set_given

__all__ = ["HELP", "add_arguments", "run", "settings_from_args"]

HELP = "fine-tune UNITER on a downstream task (default: UNITER-tiny on the task's synthetic data)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, choices=list_recipes(), help="the downstream task")
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
    p.add_argument("--head-lr-mult", type=float, default=None, help="learning-rate multiplier of the task head")
    p.add_argument("--max-txt-len", type=int, default=None)
    p.add_argument("--val-batches", type=int, default=None, help="validation batches per evaluation (default all)")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="task option, e.g. variant=triplet (nlvr2), ans2label=PATH (vqa), eval_images=200 (itr)")
    add_run_arguments(p, "default: 1 for hidden size <= 256")
    add_adv_arguments(p, "fine-tuning")


def settings_from_args(args: argparse.Namespace) -> FinetuneSettings:
    """FinetuneSettings from parsed ``fastvl finetune`` arguments."""
    s = FinetuneSettings(task=args.task, init=args.init, config=args.config, data=args.data,
                         txt_db=list(args.txt_db), img_db=list(args.img_db), val_txt_db=list(args.val_txt_db),
                         val_img_db=list(args.val_img_db), output=args.output, resume=args.resume,
                         skip_bad_examples=args.skip_bad_examples, progress=not args.no_progress,
                         options=parse_options(args.opt))
    set_given(s, args, (*RUN_OPTIONS, "head_lr_mult", "max_txt_len", "val_batches"))
    s.adv = adv_from_args(args)
    return s


def run(args: argparse.Namespace) -> int:
    """Fine-tune; print a one-line JSON summary (task, metric, chance, minutes, checkpoint)."""
    t0 = time.perf_counter()
    try:
        result = finetune(settings_from_args(args))
    except (DataError, FileNotFoundError) as e:  # bad or missing data: the message names the db and key
        print(f"fastvl finetune: error: {e}", file=sys.stderr)
        return 2
    summary = {"task": result["task"], "metric": result["metric_name"], "value": result["metric"],
               "chance": round(result["chance"], 4), "minutes": round((time.perf_counter() - t0) / 60, 2),
               "checkpoint": result["checkpoint"]}
    if result["validation"]:
        summary["validation"] = {k: round(v, 4) for k, v in result["validation"].items()}
    if result["bad_examples"]:
        summary["bad_examples"] = result["bad_examples"]
    print("final:", json.dumps(summary))
    return 0
