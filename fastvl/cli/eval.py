"""``fastvl eval``: the metrics of a checkpoint -- pre-training metrics (``--task pretrain``, the default) or a
fine-tuning recipe's metrics on its validation split."""

from __future__ import annotations

import argparse
import json

from ..recipes import evaluate_finetune, list_recipes
from ..recipes.pretrain import evaluate_checkpoint
from .errors import UserError
from .options import check_paths, parse_options, positive_int

__all__ = ["HELP", "add_arguments", "run"]

HELP = "evaluate a checkpoint: pre-training metrics (--task pretrain) or a fine-tuning task's metrics"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a run folder (pretrain / finetune) or checkpoints/step_*")
    p.add_argument("--task", default="pretrain", choices=["pretrain", *list_recipes()],
                   help="pretrain: ITM / MLM / MRC metrics; a fine-tuning task: its metrics on the validation split")
    p.add_argument("--txt-db", nargs="*", default=[], help="validation txt_db(s) (default: the run's validation data)")
    p.add_argument("--img-db", nargs="*", default=[])
    p.add_argument("--batches", type=positive_int, default=None, help="batches to evaluate (pretrain default 50; "
                                                                      "fine-tuning default all)")
    p.add_argument("--device", default="auto")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="task option (fine-tuning)")


def run(args: argparse.Namespace) -> int:
    """Evaluate and print the metrics as JSON."""
    check_paths("--checkpoint", args.checkpoint, kind="any")
    check_paths("--txt-db", args.txt_db)
    check_paths("--img-db", args.img_db)
    if args.task == "pretrain":
        if args.txt_db and len(args.img_db) != len(args.txt_db):
            raise UserError(f"{len(args.txt_db)} txt_db path(s) but {len(args.img_db)} img_db path(s): give one "
                            "img_db per txt_db", argument="--img-db")
        metrics = evaluate_checkpoint(args.checkpoint, args.txt_db, args.img_db, 50 if args.batches is None
                                      else args.batches, args.device)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}, indent=1))
        return 0
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
