"""AdamW with UNITER's parameter groups and the warmup-linear schedule."""

from __future__ import annotations

import inspect

import torch

NO_DECAY = ("bias", "LayerNorm.weight", "LayerNorm.bias", "layer_norm.weight", "layer_norm.bias")


def param_groups(model: torch.nn.Module, weight_decay: float, lr_mults: dict[str, float] | None = None) -> list[dict]:
    """Two groups per learning-rate multiplier: decayed weights and no-decay (bias, LayerNorm) as official.

    ``lr_mults`` maps a parameter-name prefix to a multiplier (e.g. ``{"vqa_output": 10.0}`` for heads).
    Tied parameters appear once.
    """
    lr_mults = lr_mults or {}
    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        mult = next((m for prefix, m in lr_mults.items() if name.startswith(prefix)), 1.0)
        decay = not any(nd in name for nd in NO_DECAY)
        groups.setdefault((mult, decay), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr_mult": mult}
            for (mult, decay), ps in groups.items()]


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.01, betas=(0.9, 0.98),
                    eps: float = 1e-6, lr_mults: dict[str, float] | None = None) -> torch.optim.AdamW:
    """AdamW (the fused implementation on CUDA where available; foreach elsewhere)."""
    groups = param_groups(model, weight_decay, lr_mults)
    for g in groups:
        g["lr"] = lr * g["lr_mult"]
    kwargs = {}
    on_cuda = any(p.is_cuda for g in groups for p in g["params"])
    if on_cuda and "fused" in inspect.signature(torch.optim.AdamW).parameters:
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **kwargs)


def warmup_linear(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier: linear warm-up to 1 over ``warmup_steps``, then linear decay to 0 at the end."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, step: int, warmup_steps: int, total_steps: int) -> float:
    """Apply the schedule for ``step`` (0-based) to every group (times its ``lr_mult``); returns the base lr."""
    lr = base_lr * warmup_linear(step, warmup_steps, total_steps)
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
    return lr
