"""Options shared by the training commands: the run options, the VILLA options, ``--opt key=value``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from typing import Any

__all__ = ["RUN_OPTIONS", "add_adv_arguments", "add_run_arguments", "adv_from_args", "parse_options", "set_given"]


#: The run options of :func:`add_run_arguments` copied onto the settings when given (None = the settings' default).
RUN_OPTIONS = ("steps", "lr", "warmup_steps", "batch_tokens", "grad_accum", "grad_clip", "seed", "val_every",
               "ckpt_every", "log_every", "precision", "device", "threads")


def add_run_arguments(p: argparse.ArgumentParser, threads_default: str) -> None:
    """The training-run options shared by ``fastvl pretrain`` and ``fastvl finetune`` (schedule, batch, cadence,
    device, resume, bad examples, progress)."""
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--batch-tokens", type=int, default=None, help="token budget per process and micro-batch")
    p.add_argument("--grad-accum", type=int, default=None)
    p.add_argument("--grad-clip", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--val-every", type=int, default=None)
    p.add_argument("--ckpt-every", type=int, default=None)
    p.add_argument("--log-every", type=int, default=None)
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default=None)
    p.add_argument("--device", default=None, help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=None,
                   help=f"CPU threads per process ({threads_default}; OMP_NUM_THREADS wins)")
    p.add_argument("--skip-bad-examples", action="store_true", help="skip and count bad records instead of failing")
    p.add_argument("--no-progress", action="store_true")


def set_given(settings: Any, args: argparse.Namespace, names: Iterable[str]) -> None:
    """Copy the options in ``names`` that were given (not None) from ``args`` onto ``settings``."""
    for name in names:
        value = getattr(args, name)
        if value is not None:
            setattr(settings, name, value)


def add_adv_arguments(p: argparse.ArgumentParser, what: str) -> None:
    """The VILLA options (``--adv`` and ``--adv-*``) of ``fastvl pretrain`` / ``fastvl finetune``."""
    adv = p.add_argument_group(f"VILLA adversarial {what} (--adv turns it on; defaults from REFERENCE.md)")
    adv.add_argument("--adv", action="store_true", help=f"adversarial {what} in the embedding space")
    adv.add_argument("--adv-modality", default="text", choices=["text", "image", "both", "alter"])
    adv.add_argument("--adv-norm", default="l2", choices=["l2", "linf"])
    adv.add_argument("--adv-steps", type=int, default=3)
    adv.add_argument("--adv-lr-txt", type=float, default=1e-3)
    adv.add_argument("--adv-lr-img", type=float, default=1e-3)
    adv.add_argument("--adv-init-mag", type=float, default=0.0)
    adv.add_argument("--adv-max-norm", type=float, default=0.0)
    adv.add_argument("--adv-kl-weight", type=float, default=1.5)
    adv.add_argument("--adv-detach-clean", action="store_true",
                     help="opt-in approximation: the clean predictions are a constant consistency target "
                          "(stop-gradient; 3.0x instead of 3.33x a clean step at K=3)")


def adv_from_args(args: argparse.Namespace) -> dict | None:
    """The AdvConfig fields given by :func:`add_adv_arguments`'s options (None without ``--adv``)."""
    if not args.adv:
        return None
    return dict(mode=args.adv_modality, norm=args.adv_norm, adv_steps=args.adv_steps, adv_lr_txt=args.adv_lr_txt,
                adv_lr_img=args.adv_lr_img, adv_init_mag=args.adv_init_mag, adv_max_norm=args.adv_max_norm,
                adv_kl_weight=args.adv_kl_weight, kl_clean_grad=not args.adv_detach_clean)


def parse_options(items: list[str]) -> dict[str, Any]:
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
