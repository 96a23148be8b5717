"""CLI commands of the downstream tasks: ``fastvl finetune`` and ``fastvl eval`` for fine-tuned checkpoints.

``fastvl finetune --task T`` runs :func:`fastvl.train.finetune.finetune` for any registered fine-tuning task
(vqa, gqa, ve, nlvr2, itr, re, vcr, and those other modules register, e.g. caption). ``fastvl eval`` is
re-registered here as a dispatcher: ``--task pretrain`` (the default) runs the pre-training evaluation of
:mod:`fastvl.train.commands` unchanged, any fine-tuning task runs :func:`fastvl.train.finetune.evaluate_finetune`.

Distributed: ``torchrun --nproc_per_node N -m fastvl.cli finetune ...``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..cli import COMMANDS, command
from ..train.commands import RUN_OPTIONS, add_adv_arguments, add_run_arguments, adv_from_args, set_given

_pretrain_eval = COMMANDS.get("eval")  # fastvl.train.commands registers it first (plugin order)


def _tasks() -> list[str]:
    from ..train.finetune import list_finetune_tasks

    return list_finetune_tasks()


def parse_options(items: list[str]) -> dict:
    """``["k=v", ...]`` -> {k: v} with v read as JSON when it parses (numbers, true/false, lists), else a string."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"fastvl: --opt expects key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, choices=_tasks(), help="the downstream task")
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


def settings_from_args(args: argparse.Namespace):
    """FinetuneSettings from parsed ``fastvl finetune`` arguments."""
    from ..train.finetune import FinetuneSettings

    s = FinetuneSettings(task=args.task, init=args.init, config=args.config, data=args.data,
                         txt_db=list(args.txt_db), img_db=list(args.img_db), val_txt_db=list(args.val_txt_db),
                         val_img_db=list(args.val_img_db), output=args.output, resume=args.resume,
                         skip_bad_examples=args.skip_bad_examples, progress=not args.no_progress,
                         options=parse_options(args.opt))
    set_given(s, args, (*RUN_OPTIONS, "head_lr_mult", "max_txt_len", "val_batches"))
    s.adv = adv_from_args(args)
    return s


@command("finetune", "fine-tune UNITER on a downstream task (default: UNITER-tiny on the task's synthetic data)",
         _finetune_args)
def _finetune(args: argparse.Namespace) -> int:
    from ..data.errors import DataError
    from ..train.finetune import finetune

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


# ----------------------------------------------------------------------------------------------------------------
def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a run folder (pretrain / finetune) or checkpoints/step_*")
    p.add_argument("--task", default="pretrain", choices=["pretrain", *_tasks()],
                   help="pretrain: ITM / MLM / MRC metrics; a fine-tuning task: its metrics on the validation split")
    p.add_argument("--txt-db", nargs="*", default=[], help="validation txt_db(s) (default: the run's validation data)")
    p.add_argument("--img-db", nargs="*", default=[])
    p.add_argument("--batches", type=int, default=None, help="batches to evaluate (pretrain default 50; fine-tuning "
                                                             "default all)")
    p.add_argument("--device", default="auto")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="task option (fine-tuning)")


@command("eval", "evaluate a checkpoint: pre-training metrics (--task pretrain) or a fine-tuning task's metrics",
         _eval_args)
def _eval(args: argparse.Namespace) -> int:
    if args.task == "pretrain":
        if _pretrain_eval is None:
            raise SystemExit("fastvl eval --task pretrain: fastvl.train.commands is not part of this build")
        if args.batches is None:
            args.batches = 50
        return _pretrain_eval[2](args)
    from ..train.finetune import evaluate_finetune

    over: dict = {"device": args.device}
    if args.txt_db:
        over.update(val_txt_db=list(args.txt_db), val_img_db=list(args.img_db))
    if args.batches is not None:
        over["val_batches"] = args.batches
    if args.opt:
        over["options"] = parse_options(args.opt)
    result = evaluate_finetune(args.checkpoint, args.task, over)
    out = {"task": result["task"], "checkpoint": result["checkpoint"], result["metric_name"]: result["metric"],
           "chance": round(result["chance"], 4), **{k: round(v, 4) for k, v in result["metrics"].items()}}
    print(json.dumps(out, indent=1))
    return 0
