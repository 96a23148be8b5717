"""Options shared by the training commands: the run options, the VILLA options, ``--opt key=value``, the range-checked
argument types, and how a run's settings are resolved (official JSON, then the flags given) and reported.

Every option of a training command defaults to None, so a flag the user gave is told apart from one left out: the
settings are the dataclass defaults, then the ``--train-config`` JSON, then the flags given (a flag always wins), then
the job's defaults for what is still unset. :func:`settings_table` prints where each value came from.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..adversarial import AdvConfig
from .errors import UserError

__all__ = ["ADV_OPTIONS", "RUN_OPTIONS", "add_adv_arguments", "add_run_arguments", "adv_from_args", "check_config",
           "check_paths", "given_options", "non_negative_float", "non_negative_int", "parse_options", "positive_float",
           "positive_int", "print_settings", "probability", "set_given", "settings_table"]


# ----------------------------------------------------------------------------------------------------------------
# argument types: argparse reports "argument --steps: must be a positive integer, got '-5'"
# ----------------------------------------------------------------------------------------------------------------
def _number(text: str, kind: type, what: str, ok: Callable[[float], bool]) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, "a positive integer", lambda v: v > 0)


def non_negative_int(text: str) -> int:
    return _number(text, int, "an integer >= 0", lambda v: v >= 0)


def positive_float(text: str) -> float:
    return _number(text, float, "a finite number > 0", lambda v: v > 0)


def non_negative_float(text: str) -> float:
    return _number(text, float, "a finite number >= 0", lambda v: v >= 0)


def probability(text: str) -> float:
    return _number(text, float, "a probability in [0, 1)", lambda v: 0 <= v < 1)


def _task_mix(text: str) -> str:
    from ..data.pretrain_data import parse_tasks

    try:
        parse_tasks(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {str(e).removeprefix('parse_tasks: ')} (e.g. itm:2,mlm:2)") \
            from None
    return text


# ----------------------------------------------------------------------------------------------------------------
# options
# ----------------------------------------------------------------------------------------------------------------
#: The run options of :func:`add_run_arguments` copied onto the settings when given (None = not given).
RUN_OPTIONS = ("steps", "lr", "warmup_steps", "batch_tokens", "grad_accum", "grad_clip", "weight_decay", "seed",
               "val_every", "ckpt_every", "log_every", "precision", "device", "threads")


def add_run_arguments(p: argparse.ArgumentParser, threads_default: str) -> None:
    """The training-run options shared by ``fastvl pretrain`` and ``fastvl finetune`` (schedule, batch, cadence,
    device, resume, bad examples, progress)."""
    p.add_argument("--train-config", default=None,
                   help="official UNITER / VILLA training JSON: its hyper-parameters (explicit flags win; its data, "
                        "checkpoint and output paths are the authors' and are not used)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    p.add_argument("--steps", type=positive_int, default=None, help="optimizer steps")
    p.add_argument("--lr", type=positive_float, default=None, help="peak learning rate")
    p.add_argument("--warmup-steps", type=non_negative_int, default=None)
    p.add_argument("--batch-tokens", type=positive_int, default=None,
                   help="token budget per process and micro-batch (padded, as the official train_batch_size)")
    p.add_argument("--grad-accum", type=positive_int, default=None, help="micro-batches per optimizer step")
    p.add_argument("--grad-clip", type=non_negative_float, default=None, help="gradient-norm clip (0: none)")
    p.add_argument("--weight-decay", type=non_negative_float, default=None)
    p.add_argument("--seed", type=non_negative_int, default=None)
    p.add_argument("--val-every", type=non_negative_int, default=None, help="steps between validations (0: the end)")
    p.add_argument("--ckpt-every", type=non_negative_int, default=None, help="steps between checkpoints (0: the end)")
    p.add_argument("--log-every", type=positive_int, default=None)
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default=None)
    p.add_argument("--device", default=None, help="auto | cpu | cuda")
    p.add_argument("--threads", type=positive_int, default=None,
                   help=f"CPU threads per process ({threads_default}; OMP_NUM_THREADS wins)")
    p.add_argument("--skip-bad-examples", action="store_true", help="skip and count bad records instead of failing")
    p.add_argument("--no-progress", action="store_true")


def task_mix_type() -> Callable[[str], str]:
    """The argparse type of ``--tasks`` (a pre-training mix such as ``itm:2,mlm:2``)."""
    return _task_mix


def set_given(settings: Any, args: argparse.Namespace, names: Iterable[str]) -> None:
    """Copy the options in ``names`` that were given (not None) from ``args`` onto ``settings``."""
    for name, value in given_options(args, names).items():
        setattr(settings, name, value)


def given_options(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """{name: value} of the options in ``names`` the user gave (not None)."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


#: ``--adv-*`` option -> AdvConfig field.
ADV_OPTIONS = {"adv_modality": "mode", "adv_norm": "norm", "adv_steps": "adv_steps", "adv_lr_txt": "adv_lr_txt",
               "adv_lr_img": "adv_lr_img", "adv_init_mag": "adv_init_mag", "adv_max_norm": "adv_max_norm",
               "adv_kl_weight": "adv_kl_weight"}
_ADV_DEFAULT_KEYS = ("mode", "norm", "adv_steps", "adv_lr_txt", "adv_lr_img", "adv_init_mag", "adv_max_norm",
                     "adv_kl_weight", "kl_clean_grad")


def add_adv_arguments(p: argparse.ArgumentParser, what: str) -> None:
    """The VILLA options (``--adv`` and ``--adv-*``) of ``fastvl pretrain`` / ``fastvl finetune``."""
    d = AdvConfig()
    adv = p.add_argument_group(f"VILLA adversarial {what} (--adv, or a --train-config with adv_training, turns it "
                               "on; defaults from REFERENCE.md)")
    adv.add_argument("--adv", action="store_true", help=f"adversarial {what} in the embedding space")
    adv.add_argument("--adv-modality", default=None, choices=["text", "image", "both", "alter"],
                     help=f"default {d.mode}")
    adv.add_argument("--adv-norm", default=None, choices=["l2", "linf"], help=f"default {d.norm}")
    adv.add_argument("--adv-steps", type=positive_int, default=None, help=f"default {d.adv_steps}")
    adv.add_argument("--adv-lr-txt", type=non_negative_float, default=None, help=f"default {d.adv_lr_txt:g}")
    adv.add_argument("--adv-lr-img", type=non_negative_float, default=None, help=f"default {d.adv_lr_img:g}")
    adv.add_argument("--adv-init-mag", type=non_negative_float, default=None, help=f"default {d.adv_init_mag:g}")
    adv.add_argument("--adv-max-norm", type=non_negative_float, default=None, help=f"default {d.adv_max_norm:g}")
    adv.add_argument("--adv-kl-weight", type=non_negative_float, default=None, help=f"default {d.adv_kl_weight:g}")
    adv.add_argument("--adv-detach-clean", action="store_true", default=None,
                     help="opt-in approximation: the clean predictions are a constant consistency target "
                          "(stop-gradient; 3.0x instead of 3.33x a clean step at K=3)")


def adv_from_args(args: argparse.Namespace, from_json: Mapping[str, Any] | None = None,
                  json_fields: Iterable[str] = ()) -> tuple[dict | None, dict[str, str]]:
    """(AdvConfig fields or None when adversarial training is off, {field: 'flag' | 'JSON' | 'default'}).

    On with ``--adv`` or a JSON with ``adv_training`` (``from_json``: its AdvConfig fields, ``json_fields`` those the
    JSON itself gave); the ``--adv-*`` flags given win over the JSON. ``--adv-*`` flags with adversarial training
    off are an error.
    """
    given = {field: getattr(args, flag) for flag, field in ADV_OPTIONS.items() if getattr(args, flag) is not None}
    if args.adv_detach_clean:
        given["kl_clean_grad"] = False
    if not args.adv and from_json is None:
        if given:
            flag = next(f for f, field in ADV_OPTIONS.items() if field in given) if "kl_clean_grad" not in given \
                else "adv_detach_clean"
            raise UserError("adversarial training is off: add --adv (or a --train-config with adv_training)",
                            argument="--" + flag.replace("_", "-"))
        return None, {}
    default = AdvConfig()
    values = {k: getattr(default, k) for k in _ADV_DEFAULT_KEYS}
    sources = dict.fromkeys(values, "default")
    if from_json is not None:
        values.update(from_json)
        sources.update({k: "JSON" if k in set(json_fields) else "default" for k in from_json})
    values.update(given)
    sources.update(dict.fromkeys(given, "flag"))
    return values, sources


def parse_options(items: list[str]) -> dict[str, Any]:
    """``["k=v", ...]`` -> {k: v} with v read as JSON when it parses (numbers, true/false, lists), else a string."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"expects key=value, got {item!r}", argument="--opt")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


# ----------------------------------------------------------------------------------------------------------------
# checks of paths and names, before any work
# ----------------------------------------------------------------------------------------------------------------
def check_paths(option: str, paths: Iterable[str] | str | None, kind: str = "dir") -> None:
    """UserError naming ``option`` unless every path exists as a folder (``kind='dir'``), a file or either."""
    for path in [paths] if isinstance(paths, str) else list(paths or []):
        p = Path(path)
        if not p.exists():
            what = {"dir": "folder", "file": "file"}.get(kind, "file or folder")
            raise UserError(f"{path}: no such {what}", argument=option)
        if kind == "dir" and not p.is_dir():
            raise UserError(f"{path}: not a folder", argument=option)
        if kind == "file" and not p.is_file():
            raise UserError(f"{path}: not a file", argument=option)


def check_config(option: str, config: str | None) -> None:
    """UserError naming ``option`` unless ``config`` is a model size name or a readable config file."""
    if config is None:
        return
    from ..models.uniter import resolve_config

    try:
        resolve_config(config)
    except (ValueError, OSError, TypeError) as e:
        raise UserError(" ".join(str(e).split()), argument=option) from None


# ----------------------------------------------------------------------------------------------------------------
# where each setting came from
# ----------------------------------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]" if value else "[]"
    if isinstance(value, dict):
        return json.dumps(value) if value else "{}"
    return str(value)


def settings_table(resolved: Any, sources: Mapping[str, str], json_values: Mapping[str, Any] | None = None,
                   unused: Mapping[str, str] | None = None, adv_sources: Mapping[str, str] | None = None,
                   skip: Iterable[str] = ("progress",)) -> str:
    """A compact table: setting, value, where it came from (flag, JSON, a job default, default) and, with a JSON,
    the JSON's value of that setting; then the JSON keys that are not used and why."""
    json_values = dict(json_values or {})
    rows = [("setting", "value", "from", "JSON" if json_values or unused else "")]
    skip = set(skip)
    for f in fields(resolved):
        name = f.name
        if name in skip:
            continue
        value = getattr(resolved, name)
        if name == "adv" and isinstance(value, dict):
            adv_json = json_values.get("adv") or {}
            for k, v in value.items():
                rows.append((f"adv.{k}", _fmt(v), (adv_sources or {}).get(k, "default"),
                             _fmt(adv_json[k]) if k in adv_json else ""))
            continue
        rows.append((name, _fmt(value), sources.get(name, "default"),
                     _fmt(json_values[name]) if name in json_values else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    for key, why in (unused or {}).items():
        lines.append(f"JSON {key}: not used ({why})")
    return "\n".join(lines)


def print_settings(title: str, table: str) -> None:
    """Print the settings table (main process only: RANK unset or 0)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{title}\n{table}", flush=True)
