"""AdamW with UNITER's parameter groups and the warmup-linear schedule; named optimizers for multi-phase steps.

One optimizer (the default): :func:`build_optimizer` over every trainable parameter. Several (a GAN's generator and
discriminator): an :class:`OptimizerSpec` per name selects model sub-modules and overrides the run's hyper-parameters;
:func:`build_optimizers` checks that every trainable parameter belongs to exactly one of them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

NO_DECAY = ("bias", "LayerNorm.weight", "LayerNorm.bias", "layer_norm.weight", "layer_norm.bias")


def param_groups(model: torch.nn.Module, weight_decay: float, lr_mults: dict[str, float] | None = None,
                 select: Callable[[str], bool] | None = None) -> list[dict]:
    """Two groups per learning-rate multiplier: decayed weights and no-decay (bias, LayerNorm) as official.

    ``lr_mults`` maps a parameter-name prefix to a multiplier (e.g. ``{"vqa_output": 10.0}`` for heads).
    Tied parameters appear once. ``select`` (a parameter name -> bool), when given, keeps only the parameters it
    accepts (the others are left to other optimizers).
    """
    lr_mults = lr_mults or {}
    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        if select is not None and not select(name):
            continue
        seen.add(id(p))
        mult = next((m for prefix, m in lr_mults.items() if name.startswith(prefix)), 1.0)
        decay = not any(nd in name for nd in NO_DECAY)
        groups.setdefault((mult, decay), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr_mult": mult}
            for (mult, decay), ps in groups.items()]


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.01, betas=(0.9, 0.98),
                    eps: float = 1e-6, lr_mults: dict[str, float] | None = None,
                    select: Callable[[str], bool] | None = None) -> torch.optim.AdamW:
    """AdamW (the fused implementation on CUDA where available; foreach elsewhere) over :func:`param_groups`."""
    groups = param_groups(model, weight_decay, lr_mults, select)
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


@dataclass(frozen=True)
class OptimizerSpec:
    """One named optimizer of a multi-phase step (e.g. ``"generator"``, ``"discriminator"``).

    ``modules``: names of the model's sub-modules (or single parameters) it steps: ``"generator"`` selects
    ``generator.*``; every trainable model parameter must be selected by exactly one spec. The other fields override
    the run's :class:`~fastvl.train.loop.TrainConfig` value of the same name when not None (``lr_mults`` prefixes
    are model parameter names). ``every``: the phase runs on steps ``s`` (0-based) with ``s % every == 0`` (e.g. a
    WGAN critic at every step and the generator at ``every=5``).
    """

    modules: tuple[str, ...]
    lr: float | None = None
    betas: tuple[float, float] | None = None
    weight_decay: float | None = None
    eps: float | None = None
    warmup_steps: int | None = None
    grad_clip: float | None = None
    lr_mults: dict[str, float] = field(default_factory=dict)
    every: int = 1

    def selects(self, name: str) -> bool:
        """Whether parameter ``name`` (as ``model.named_parameters()`` spells it) belongs to this optimizer."""
        return any(name == m or name.startswith(m + ".") for m in self.modules)

    def resolved(self, defaults) -> OptimizerSpec:
        """This spec with every None field taken from ``defaults`` (any object with those attributes)."""
        fill = {k: getattr(defaults, k) for k in ("lr", "betas", "weight_decay", "eps", "warmup_steps", "grad_clip")
                if getattr(self, k) is None}
        return replace(self, **fill)


def build_optimizers(model: torch.nn.Module, specs: dict[str, OptimizerSpec]) -> dict[str, torch.optim.AdamW]:
    """One AdamW per spec (fully resolved: no None hyper-parameter), in the specs' order.

    Raises ValueError when a spec is malformed or a trainable parameter is selected by no spec or by several
    (tied parameters count once, under their first name).
    """
    if not specs:
        raise ValueError("build_optimizers: no optimizer specs given")
    for name, spec in specs.items():
        if isinstance(spec.modules, str) or not spec.modules or not all(spec.modules):
            raise ValueError(f"optimizer {name!r}: 'modules' must be a non-empty tuple of sub-module names, "
                             f"got {spec.modules!r}")
        if spec.every < 1:
            raise ValueError(f"optimizer {name!r}: 'every' must be >= 1, got {spec.every}")
        missing = [k for k in ("lr", "betas", "weight_decay", "eps") if getattr(spec, k) is None]
        if missing:
            raise ValueError(f"optimizer {name!r}: unresolved hyper-parameters {missing}")
    seen: set[int] = set()
    unowned, shared, sizes = [], [], dict.fromkeys(specs, 0)
    for pname, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        owners = [n for n, s in specs.items() if s.selects(pname)]
        for n in owners:
            sizes[n] += 1
        if not owners:
            unowned.append(pname)
        elif len(owners) > 1:
            shared.append(f"{pname} ({', '.join(owners)})")
    if unowned or shared:
        raise ValueError(f"optimizer specs must select every trainable parameter exactly once: unselected "
                         f"{unowned[:5]}, selected twice {shared[:5]} (freeze a parameter with requires_grad=False)")
    empty = [n for n, k in sizes.items() if k == 0]
    if empty:
        raise ValueError(f"optimizers {empty} select no trainable parameter")
    return {name: build_optimizer(model, spec.lr, spec.weight_decay, spec.betas, spec.eps, spec.lr_mults,
                                  select=spec.selects) for name, spec in specs.items()}
