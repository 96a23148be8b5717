"""``fastvl pretrain --model hero``: pre-train HERO on the built-in synthetic video corpus or the user's video and
subtitle dbs (the official HERO formats).

Shared run options (--steps, --lr, --output, --seed, --device, --threads, --resume, --adv ...) are those of
``fastvl pretrain``; ``--config`` takes 'tiny' or an official HERO config JSON (``hero_finetune.json`` layout);
``--init-checkpoint`` an official HERO checkpoint (.pt) or a run folder. The options below are HERO's own.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

from ..data.video import parse_video_tasks
from ..recipes.hero_pretrain import HeroPretrainSettings, check_settings, hero_pretrain
from .errors import UserError
from .options import (
    adv_from_args,
    check_paths,
    non_negative_float,
    positive_int,
    print_settings,
    probability,
    settings_table,
)

__all__ = ["add_arguments", "run", "settings_from_args"]

#: ``fastvl pretrain`` options that are UNITER's only: given with --model hero they are an error, not ignored.
UNITER_ONLY = ("data", "txt_db", "img_db", "val_txt_db", "val_img_db", "tasks", "ot_lambda", "train_config",
               "batch_tokens")
_RUN = ("steps", "lr", "warmup_steps", "grad_accum", "grad_clip", "weight_decay", "seed", "val_every", "ckpt_every",
        "log_every", "precision", "device", "threads", "output", "config")
_OWN = {"video_db": "video_db", "sub_db": "sub_db", "val_video_db": "val_video_db", "val_sub_db": "val_sub_db",
        "video_tasks": "tasks", "max_frames": "max_frames", "lw_st_ed": "lw_st_ed", "lw_neg_ctx": "lw_neg_ctx",
        "lw_neg_q": "lw_neg_q", "vsm_margin": "margin", "drop_svmr_prob": "drop_svmr_prob",
        "video_val_batches": "val_batches"}


def _video_tasks(text: str) -> str:
    try:
        parse_video_tasks(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {str(e).removeprefix('parse_video_tasks: ')} (e.g. "
                                         "mlm:2,mfm-nce:2,fom:1,vsm:2)") from None
    return text


def add_arguments(p: argparse._ArgumentGroup) -> None:
    """HERO's options (the run options of ``fastvl pretrain`` are shared)."""
    p.add_argument("--video-db", default=None, help="HERO video db folder (default: the synthetic video corpus)")
    p.add_argument("--sub-db", default=None, help="HERO subtitle db folder (with --video-db)")
    p.add_argument("--val-video-db", default=None, help="validation video db (with --val-sub-db)")
    p.add_argument("--val-sub-db", default=None)
    p.add_argument("--video-tasks", type=_video_tasks, default=None,
                   help="HERO task mix (default mlm:2,mfm-nce:2,fom:1,vsm:2; mffr too)")
    p.add_argument("--max-frames", type=positive_int, default=None, help="frame budget per micro-batch and process")
    p.add_argument("--lw-st-ed", type=non_negative_float, default=None, help="VSM span loss weight")
    p.add_argument("--lw-neg-ctx", type=non_negative_float, default=None, help="VSM query->video hinge weight (1)")
    p.add_argument("--lw-neg-q", type=non_negative_float, default=None, help="VSM video->query hinge weight (1)")
    p.add_argument("--vsm-margin", type=non_negative_float, default=None, help="VSM hinge margin (0.1)")
    p.add_argument("--drop-svmr-prob", type=probability, default=None,
                   help="probability of skipping the VSM span loss in a step (official 0.8)")
    p.add_argument("--video-val-batches", type=positive_int, default=None, help="validation batches per task (20)")


def settings_from_args(args: argparse.Namespace) -> tuple[HeroPretrainSettings, str]:
    """(settings, table of where each came from) from parsed ``fastvl pretrain --model hero`` arguments."""
    for name in UNITER_ONLY:
        value = getattr(args, name, None)
        if value not in (None, [], False):
            raise UserError("is a UNITER option; HERO takes --video-db / --sub-db / --video-tasks (see fastvl pretrain "
                            "--help, group '--model hero')", argument="--" + name.replace("_", "-"))
    for opt in ("video_db", "sub_db", "val_video_db", "val_sub_db"):
        check_paths("--" + opt.replace("_", "-"), getattr(args, opt))
    if args.init_checkpoint:
        check_paths("--init-checkpoint", args.init_checkpoint, kind="any")
    if args.config not in (None, "tiny"):
        check_paths("--config", args.config, kind="file")
    values, sources = {}, {}
    for name in _RUN:
        if getattr(args, name, None) is not None:
            values[name], sources[name] = getattr(args, name), "flag"
    for opt, field in _OWN.items():
        if getattr(args, opt) is not None:
            values[field], sources[field] = getattr(args, opt), "flag"
    s = HeroPretrainSettings(**values)
    s.resume, s.skip_bad_examples, s.progress = args.resume, args.skip_bad_examples, not args.no_progress
    s.init_checkpoint = args.init_checkpoint
    s.adv, adv_sources = adv_from_args(args)
    if s.adv is not None:
        sources["adv"] = "flag"
    for flag in ("resume", "skip_bad_examples", "init_checkpoint"):
        if getattr(args, flag):
            sources[flag] = "flag"
    try:
        check_settings(s)
    except ValueError as e:
        raise UserError(str(e), argument="--video-db" if "video" in str(e) else None) from None
    resolved = s.resolved()
    for f in fields(resolved):
        if f.name not in sources and getattr(s, f.name) is None and getattr(resolved, f.name) is not None:
            sources[f.name] = f"preset {s.preset()}"
    table = settings_table(resolved, sources, adv_sources=adv_sources, skip=("progress", "cache_dir"))
    if s.video_db is None:
        table += "\ndata: no --video-db / --sub-db given: the built-in synthetic video corpus"
    return s, table


def run(args: argparse.Namespace) -> int:
    """Print the resolved settings, pre-train, print the final validation line."""
    settings, table = settings_from_args(args)
    print_settings("fastvl pretrain --model hero settings (from: flag > preset / default):", table)
    result = hero_pretrain(settings)
    if result["validation"]:
        print("final validation:", json.dumps({k: round(v, 4) for k, v in result["validation"].items()}))
        print("chance:", json.dumps({k: round(v, 4) for k, v in result["chance"].items()}))
    return 0
