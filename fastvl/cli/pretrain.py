"""``fastvl pretrain``: pre-train UNITER (default: UNITER-tiny on the built-in synthetic corpus).

Distributed: ``torchrun --nproc_per_node N -m fastvl.cli pretrain ...`` (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..recipes.pretrain import PretrainSettings, pretrain, settings_from_official
from .options import RUN_OPTIONS, add_adv_arguments, add_run_arguments, adv_from_args, set_given

__all__ = ["HELP", "add_arguments", "run", "settings_from_args"]

HELP = "pre-train UNITER (default: UNITER-tiny on the built-in synthetic corpus)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny", help="model config: tiny | base | large | path (.json / .yaml)")
    p.add_argument("--train-config", default=None,
                   help="official UNITER training JSON: its hyper-parameters (data paths come from --txt-db/--img-db)")
    p.add_argument("--data", default=None, help="folder holding txt_db/ and img_db/ (instead of --txt-db/--img-db)")
    p.add_argument("--txt-db", nargs="*", default=[], help="training txt_db folder(s) (default: synthetic corpus)")
    p.add_argument("--img-db", nargs="*", default=[], help="img_db folder(s), one per --txt-db")
    p.add_argument("--val-txt-db", nargs="*", default=[])
    p.add_argument("--val-img-db", nargs="*", default=[])
    p.add_argument("--output", default="runs/pretrain", help="checkpoints, metrics.jsonl, settings.json")
    p.add_argument("--tasks", default=None, help="task mix, e.g. itm:3,mlm:4,mrfr:2,mrc-kl:2")
    p.add_argument("--init-checkpoint", default=None, help="weights to start from (e.g. an official .pt)")
    add_run_arguments(p, "tiny default: 1")
    add_adv_arguments(p, "pre-training")


def settings_from_args(args: argparse.Namespace) -> PretrainSettings:
    """PretrainSettings from parsed ``fastvl pretrain`` arguments."""
    s = settings_from_official(args.train_config) if args.train_config else PretrainSettings()
    txt, img = list(args.txt_db), list(args.img_db)
    if args.data:
        root = Path(args.data)
        txt = txt or [str(p) for p in sorted(root.glob("txt*db*")) if p.is_dir()]
        img = img or [str(p) for p in sorted(root.glob("img*")) if p.is_dir()]
        if not txt or not img:
            raise SystemExit(f"fastvl pretrain: --data {root} holds no txt_db / img_db folders")
        if len(img) == 1 and len(txt) > 1:
            img = img * len(txt)
    if args.train_config and not txt:
        raise SystemExit("fastvl pretrain: --train-config needs --txt-db/--img-db (its paths are the authors')")
    if args.config != "tiny" or not args.train_config:
        s.config = args.config
    s.txt_db, s.img_db = txt, img
    s.val_txt_db, s.val_img_db = list(args.val_txt_db), list(args.val_img_db)
    s.output, s.resume, s.skip_bad_examples = args.output, args.resume, args.skip_bad_examples
    s.progress = not args.no_progress
    s.adv = adv_from_args(args)
    set_given(s, args, (*RUN_OPTIONS, "tasks", "init_checkpoint"))
    return s


def run(args: argparse.Namespace) -> int:
    """Train; print the final validation line."""
    result = pretrain(settings_from_args(args))
    if result["validation"]:
        print("final validation:", json.dumps({k: round(v, 4) for k, v in result["validation"].items()}))
    return 0
