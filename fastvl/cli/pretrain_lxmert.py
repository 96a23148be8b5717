"""``fastvl pretrain --model lxmert``: pre-train LXMERT (default: a tiny LXMERT on the built-in synthetic corpus).

Shared run options (--steps --lr --output --seed --device --precision ..., --init-checkpoint, --config tiny|base|
config.json) and VILLA's --adv / --adv-* apply; ``--lxmert-tasks`` sets the task mix (mlm, mrfr, mrc, itm, qa).
"""

from __future__ import annotations

import argparse
import json

from ..models.lxmert import LxmertCheckpointError
from ..recipes.lxmert_pretrain import LxmertPretrainSettings, lxmert_pretrain, parse_lxmert_tasks
from .errors import UserError
from .options import (
    RUN_OPTIONS,
    adv_from_args,
    check_paths,
    given_options,
    positive_int,
    print_settings,
    settings_table,
)

__all__ = ["add_arguments", "run", "settings_from_args"]

#: UNITER-only options of ``fastvl pretrain`` that an LXMERT run refuses (it trains on the synthetic corpus)
_UNITER_ONLY = {"train_config": "--train-config", "data": "--data", "txt_db": "--txt-db", "img_db": "--img-db",
                "val_txt_db": "--val-txt-db", "val_img_db": "--val-img-db", "ot_lambda": "--ot-lambda",
                "skip_bad_examples": "--skip-bad-examples"}


def add_arguments(p: argparse._ArgumentGroup) -> None:
    """The options of this model family (the run options of ``fastvl pretrain`` are shared)."""
    p.add_argument("--lxmert-tasks", default=None,
                   help="LXMERT task mix, e.g. itm:2,mlm:2,mrc:1,mrfr:1,qa:1 (the default; tasks: mlm, mrfr, mrc, "
                        "itm, qa); --tasks is taken too when it names only these")
    p.add_argument("--lxmert-synthetic-images", type=positive_int, nargs=2, default=None, metavar=("TRAIN", "VAL"),
                   help="images of the synthetic corpora (default: the corpora's sizes, 3000/300 and 2000/200 for QA)")


def settings_from_args(args: argparse.Namespace) -> tuple[LxmertPretrainSettings, str]:
    """(settings, the table of where each came from) of a ``fastvl pretrain --model lxmert`` command line."""
    for name, flag in _UNITER_ONLY.items():
        if getattr(args, name, None):
            raise UserError("is not available with --model lxmert (it pre-trains on the built-in synthetic corpus)",
                            argument=flag)
    flags = given_options(args, (*RUN_OPTIONS, "config", "init_checkpoint", "output"))
    if flags.get("init_checkpoint"):
        check_paths("--init-checkpoint", flags["init_checkpoint"], kind="file")
    cfg = flags.get("config")
    if cfg is not None and cfg not in ("tiny", "base") and not str(cfg).endswith(".json"):
        raise UserError(f"{cfg!r}: LXMERT sizes are tiny | base, or an LXMERT config.json", argument="--config")
    if cfg is not None and str(cfg).endswith(".json"):
        check_paths("--config", cfg, kind="file")
    tasks_flag = "--lxmert-tasks" if args.lxmert_tasks else "--tasks"
    tasks = args.lxmert_tasks or args.tasks
    if tasks is not None:
        try:
            parse_lxmert_tasks(tasks)
        except ValueError as e:
            raise UserError(str(e), argument=tasks_flag) from None
        flags["tasks"] = tasks
    s = LxmertPretrainSettings(**flags)
    sources = dict.fromkeys(flags, "flag")
    s.resume, s.progress = args.resume, not args.no_progress
    if args.lxmert_synthetic_images:
        s.synthetic_images, s.synthetic_val_images = args.lxmert_synthetic_images
        sources["synthetic_images"] = sources["synthetic_val_images"] = "flag"
    s.adv, adv_sources = adv_from_args(args)
    if s.adv is not None:
        sources["adv"] = "flag"
    resolved = s.resolved()
    for k in ("steps", "lr", "warmup_steps", "batch_tokens", "grad_accum", "val_every", "ckpt_every", "log_every",
              "threads"):
        sources.setdefault(k, "lxmert default")
    return s, settings_table(resolved, sources, adv_sources=adv_sources, skip=("progress",))


def run(args: argparse.Namespace) -> int:
    """Print the resolved settings, train, print the final validation line."""
    settings, table = settings_from_args(args)
    print_settings("fastvl pretrain --model lxmert settings (from: flag > default):", table)
    try:
        result = lxmert_pretrain(settings)
    except LxmertCheckpointError as e:
        raise UserError(str(e), argument="--init-checkpoint") from None
    if result["validation"]:
        print("final validation:", json.dumps({k: round(v, 4) for k, v in result["validation"].items()}))
    return 0
