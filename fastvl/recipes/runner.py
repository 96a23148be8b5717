"""Run a fine-tuning recipe end to end (settings -> data -> model -> task modules -> Trainer) and evaluate a run.

``fastvl finetune --task vqa`` with no other argument fine-tunes UNITER-tiny on the synthetic VQA data; ``--init``
takes the output of ``fastvl pretrain`` (a run folder, a ``checkpoints/step_*`` folder, or an official ``.pt``).
Nothing here is task-specific: each job is a :class:`~fastvl.recipes.base.Recipe`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adversarial import AdvConfig, adversarial_tasks
from ..train import checkpoint as ckpt
from ..train import distributed as D
from ..train.loop import TrainConfig, Trainer
from .base import FinetuneSettings, SettingsError, get_recipe, last_losses, load_init_state, save_run

__all__ = ["evaluate_finetune", "finetune", "finetune_cpu_threads", "head_lr_mults", "set_dropout"]


def set_dropout(model: nn.Module, p: float) -> int:
    """Every dropout of ``model`` to probability ``p``, as the official ``set_dropout`` (every ``nn.Dropout``; here
    also a rate the fused attention keeps as a plain float ``dropout_p`` attribute, and
    ``nn.MultiheadAttention.dropout``). Returns the number of modules changed."""
    if not 0.0 <= p < 1.0:
        raise SettingsError(f"fastvl finetune: 'dropout' must be in [0, 1), got {p!r}")
    changed = 0
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            changed += m.p != p
            m.p = p
        elif isinstance(m, nn.MultiheadAttention):
            changed += m.dropout != p
            m.dropout = p
        elif isinstance(getattr(m, "dropout_p", None), float) and \
                not isinstance(getattr(type(m), "dropout_p", None), property):  # a property reads an nn.Dropout
            changed += m.dropout_p != p
            m.dropout_p = p
    return changed


def head_lr_mults(model: nn.Module, tasks: dict[str, nn.Module], mult: float) -> dict[str, float]:
    """The Trainer's ``lr_mults`` that give ``model``'s heads (its top-level modules other than ``uniter``)
    learning-rate multiplier ``mult``; {} for ``mult == 1``.

    The Trainer names parameters through its task router (``tasks.<task>.<path to the model>.<head>.*``; an
    adversarial task wraps the plain one), so the prefixes are found from where ``model`` sits in each task.
    """
    if mult == 1.0:
        return {}
    heads = sorted({n.split(".")[0] for n, _ in model.named_parameters() if not n.startswith("uniter.")})
    out: dict[str, float] = {}
    for name, task in tasks.items():
        for path, module in task.named_modules(remove_duplicate=False):
            if module is model:
                base = f"tasks.{name}." + (f"{path}." if path else "")
                out.update({f"{base}{h}.": mult for h in heads})
    if heads and not out:
        raise SettingsError(f"fastvl finetune: head_lr_mult {mult}: the model is in none of the task modules "
                            f"{sorted(tasks)}")
    return out


def finetune_cpu_threads(threads: int | None, model: nn.Module, device: torch.device) -> int | None:
    """Apply the CPU thread setting (see :attr:`FinetuneSettings.threads`); returns the threads in use on CPU."""
    if threads is None:
        hidden = getattr(getattr(getattr(model, "uniter", None), "config", None), "hidden_size", None)
        threads = 1 if hidden is not None and hidden <= 256 else None
    return D.set_cpu_threads(threads, device)


def finetune(settings: FinetuneSettings, log: Callable[[str], None] = print) -> dict:
    """Run fine-tuning; returns {'history', 'validation', 'metric', 'chance', 'checkpoint', 'seconds', ...}."""
    spec = get_recipe(settings.task, settings.model)
    s = settings.resolved(spec)
    info = D.init_distributed(s.device)
    torch.manual_seed(s.seed)
    data = spec.build_data(s, info.rank, info.world_size)
    init_state = load_init_state(s.init)[0] if s.init else None
    model = spec.build_model(s, data, init_state)
    if s.dropout is not None:
        set_dropout(model, s.dropout)
    tasks = spec.build_tasks(model, s, data)
    plain_tasks = dict(tasks)
    chance = spec.chance_level(data)
    threads = finetune_cpu_threads(s.threads, model, info.device)
    if info.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        log(f"fastvl finetune {spec.name}: {type(model).__name__} ({n_params / 1e6:.2f}M parameters), data "
            f"{data.info.get('source', 'synthetic')}, sources {data.mix}, {s.steps} steps, init "
            f"{s.init or 'random'}, {info.world_size} process(es) on {info.device}"
            + (f" ({threads} thread(s) each)" if threads else "") + f"; metric {spec.metric} (chance {chance:.4f})")
    if s.adv is not None:  # VILLA: every task under the K-step adversarial loop
        adv_cfg = AdvConfig(**s.adv)
        tasks = adversarial_tasks(tasks, adv_cfg)
        if info.is_main:
            log(f"adversarial fine-tuning (VILLA): {adv_cfg}")
    lr_mults = head_lr_mults(model, tasks, s.head_lr_mult)
    cfg = TrainConfig(steps=s.steps, lr=s.lr, warmup_steps=s.warmup_steps, weight_decay=s.weight_decay,
                      betas=tuple(s.betas), grad_accum=s.grad_accum, grad_clip=s.grad_clip, seed=s.seed,
                      precision=s.precision, log_every=s.log_every, val_every=s.val_every, ckpt_every=s.ckpt_every,
                      progress=s.progress, lr_mults=lr_mults)
    validate = None
    if data.val is not None:
        validate = lambda: spec.evaluate(plain_tasks, data, info.device, s)  # noqa: E731
    trainer = Trainer(model, tasks, data.sources, data.mix, cfg, s.output, info, validate, log)
    if info.is_main:
        save_run(s, data, spec)
    run = trainer.run(resume=s.resume)
    last_val = run["validation"]
    validation = {k.removeprefix("val/"): v for k, v in last_val.items() if k.startswith("val/")} if last_val \
        else None
    result = {**run, "task": spec.name, "metric_name": spec.metric, "chance": chance, "validation": validation,
              "metric": validation.get(spec.metric) if validation else None,
              "bad_examples": data.bad.as_dict() if data.bad is not None else {},
              "checkpoint": str(ckpt.latest_checkpoint(Path(s.output)))}
    if info.is_main:
        log(f"trained {len(run['history'])} steps in {run['seconds']:.1f} s ({run['tokens_per_s']:.0f} tokens/s); "
            "final loss: " + ", ".join(f"{k} {v:.3f}" for k, v in last_losses(run["history"]).items()))
        if result["metric"] is not None:
            log(f"{spec.name}: {spec.metric} {result['metric']:.4f} (chance {chance:.4f})")
        if result["bad_examples"]:
            log(f"skipped bad examples: {result['bad_examples']}")
    D.cleanup()
    return result


def evaluate_finetune(checkpoint: str | Path, task: str | None = None, overrides: dict[str, Any] | None = None,
                      log: Callable[[str], None] = print) -> dict:
    """Evaluate a fine-tuned checkpoint (a ``fastvl finetune`` output folder or one of its ``checkpoints/step_*``).

    The run's settings and data sizes are read from its folder; ``overrides`` replace settings (e.g. other
    ``val_txt_db`` / ``val_img_db``, ``device``, ``val_batches``). Returns {'task', 'metric', 'chance', 'metrics'}.
    """
    folder = Path(checkpoint)
    if not folder.exists():
        raise FileNotFoundError(f"fastvl eval: --checkpoint {folder}: no such file or folder")
    run = folder if (folder / "checkpoints").is_dir() or (folder / "finetune.json").is_file() else folder.parent.parent
    if not (run / "finetune.json").is_file():
        kind = "a fastvl pretrain run: evaluate it with --task pretrain" if (run / "model_config.json").is_file() \
            else "not a fastvl run folder nor one of its checkpoints/step_* folders"
        raise ckpt.CheckpointError(f"fastvl eval: --checkpoint {folder} is {kind} (no finetune.json in {run})")
    saved = json.loads((run / "settings.json").read_text())
    saved["betas"] = tuple(saved.get("betas", (0.9, 0.98)))
    meta = json.loads((run / "finetune.json").read_text())
    name = task or meta["task"]
    if name != meta["task"]:
        raise ckpt.CheckpointError(f"fastvl eval: --checkpoint {run} was fine-tuned for task {meta['task']!r}, not "
                                   f"{name!r}: evaluate it with --task {meta['task']}")
    spec = get_recipe(name, meta.get("model", "uniter"))
    known = {f.name for f in fields(FinetuneSettings)}
    s = FinetuneSettings(**{k: v for k, v in saved.items() if k in known})
    overrides = dict(overrides or {})
    if "options" in overrides:
        overrides["options"] = {**s.options, **overrides["options"]}
    s = replace(s, resume=False, progress=False, **overrides)
    if folder == run:
        folder = ckpt.latest_checkpoint(run)
        if folder is None:
            raise ckpt.CheckpointError(f"fastvl eval: --checkpoint {run} holds no complete checkpoint")
    device = torch.device("cuda" if s.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if s.device == "auto" else s.device))
    data = spec.build_data(s, 0, 1)
    data.dims = {**data.dims, **meta["dims"]}
    if (run / "model_config.json").is_file():
        s = replace(s, config=str(run / "model_config.json"))
    s = replace(s, init=None)
    model = spec.build_model(s, data, None)
    ckpt.load_checkpoint(folder, model, trainer_state=False)
    model.to(device).eval()
    tasks = spec.build_tasks(model, s, data)
    if data.val is None:
        raise ValueError(f"fastvl eval: task {name} built no validation data")
    with torch.no_grad():
        metrics = spec.evaluate(tasks, data, device, s)
    return {"task": name, "checkpoint": str(folder), "metric_name": spec.metric, "metric": metrics.get(spec.metric),
            "chance": spec.chance_level(data), "metrics": metrics}
