"""VILLA's adversarial training step as a task module: ``AdversarialTask(task, config)`` is itself a task
(``forward(batch) -> dict(loss, logs, count)``), so the generic trainer runs it unchanged, on any UNITER task.

The algorithm (REFERENCE.md, VILLA; FreeLB gradient accumulation), per micro-batch::

    clean = f(x)                                         kept with its graph (gradients reach it through the KL)
    delta = 0 (or the scaled random init)
    for k in 0 .. K-1:
        for each pass of the mode (text / image / both: one pass; alter: a text-only and an image-only pass):
            adv = f(x + delta on the pass's modalities)
            L_k += (task(adv) + kl_weight * consistency(adv, clean)) * loss_scale     (1/K; alter 1/(2K))
        backward(L_k): parameter gradients accumulate, delta gets its gradient
        if k < K-1: delta += lr * g / max(||g||, 1e-8) per example, projected to max_norm  (no update after the last)

The returned ``loss`` has the value ``sum_k L_k`` and a gradient w.r.t. every parameter equal to that of the plain
loop above: the trainer's ``(loss * scale).backward()`` is all that is needed (count weighting, gradient
accumulation and DDP behave exactly as for a clean task, no trainer hook). How:

- Contract. The ascent steps 0..K-2 are back-propagated inside ``forward`` (the delta update needs their
  gradient) into fresh parameter ``.grad`` buffers (the micro-batches' accumulated gradients are set aside and
  put back, no copy); the last step's graph is returned. An autograd function on the returned loss hands the
  internal gradients back in the trainer's backward, multiplied by the gradient the trainer sends (its loss
  scale, count weight, 1/grad_accum), so they land in ``.grad`` through autograd like any gradient.
- DDP. All gradient of the micro-batch reaches the parameters in the trainer's single backward, so the
  all-reduce happens once, where the trainer wants it: on the last micro-batch of a cycle (``no_sync`` on the
  others). The internal backward calls run inside DDP's forward, before it prepares the reducer, so DDP ignores
  them (its autograd hooks are inactive until then).
- AMP. bf16 autocast needs nothing. With a ``grad_scaler`` (fp16), the internal backward calls are scaled by it,
  the delta gradients are unscaled before the step, a step whose delta gradient overflowed leaves delta unchanged
  (without reading the device), and the internal parameter gradients are unscaled before they are handed back
  (the trainer's own ``scaler.scale(loss).backward()`` scales them again; an overflow stays inf for the scaler).

Cost reductions (exact: same parameter gradients and delta trajectory as the plain loop; (1) only where it is exact):

1. Clean pass = step 0 (``reuse_clean``, zero init). With delta = 0 and no dropout the first perturbed pass IS the
   clean pass, so it is run once (alter: once, not twice); its consistency term is 0 with a zero gradient and is
   skipped. Saves 1 forward (alter: 2). With dropout active, upstream's step 0 is a separate pass with its own
   dropout masks (its KL against the clean pass is a dropout-consistency term, not 0), so reusing the clean pass
   would change the algorithm. Hence ``reuse_clean=None`` (the default) reuses only when the wrapped task has no
   active dropout (:func:`has_active_dropout`: an ``nn.Dropout`` with p > 0 or an ``nn.MultiheadAttention`` with
   dropout > 0, in training mode); every official config trains with dropout 0.1, and there the default runs the
   separate clean pass, as upstream. ``reuse_clean=True`` forces the reuse (with dropout on: an approximation),
   ``False`` forbids it. Random init (``adv_init_mag > 0``) always runs a separate clean pass.
2. One backward through the clean graph instead of K. Every step's consistency gradient w.r.t. the clean
   predictions is accumulated on a detached stand-in and sent through the clean graph once, at the end (linear,
   so the same parameter gradient). With (1), step 0's backward is split: the delta gradients now
   (``autograd.grad`` w.r.t. the deltas only: no weight gradients), the parameter gradients in that final pass.
   Plain loop: K backward passes through the clean graph plus K through the perturbed ones.
3. No delta gradient on the last step (nothing uses it): the deltas enter the last pass detached.
4. The fused delta step (``fastvl.ops.adv_perturb_step_multi``: norm, ascent, projection, both modalities in
   one call, in place on deltas allocated once per micro-batch); a pass that does not perturb a modality gets
   ``None`` (nothing added), not a zero tensor.
5. One packed layout and one set of selected targets per micro-batch, shared by all passes (MLM's masked count
   read once, not per pass); ``kl_weight = 0`` skips the consistency term and (without (1)) the clean pass.

Forward/backward count per micro-batch, K = 3, text/image/both: plain loop 4 forward + 6 backward traversals.
Counting a backward as 2 forwards and an input-gradient pass as 1: without dropout (the clean pass reused),
3 forward + 3 backward + 1 input-gradient pass = 10 forward-equivalents against a clean step's 3 (3.33x, the floor
of the exact algorithm at K = 3); with dropout (the default then runs upstream's separate clean pass),
4 forward + 4 backward = 12 (4.0x); the plain loop 16.

Measured (``python -m benchmarks.bench_villa --mode both --ablation``, CPU, 1 thread, 4 layers x 256, batch 8,
dropout off, so the default reuses the clean pass; time per micro-batch over a clean step, tasks mlm / itm /
mrfr): all reductions 3.50 / 3.38 / 3.53x; without (1) (a separate clean pass: the mode a run with dropout gets)
4.67 / 4.01 / 4.13x; with the eager delta step instead of (4) 3.60 / 3.42 / 3.53x (the step is a small share of a
step at these sizes on CPU); the plain loop 6.08 / 5.44 / 5.85x.

Opt-in approximation, ``AdvConfig(kl_clean_grad=False)``: the clean predictions are a constant target of the
consistency term (stop-gradient, as in several later adversarial fine-tuning methods). Step 0 (the clean pass) then
gets one ordinary backward right away (parameter and delta gradients together) and nothing flows back through the
clean graph later: 3 forward + 3 backward = 9 forward-equivalents, 3.0x a clean step at K = 3. The delta
trajectory is unchanged; the parameter gradient lacks the consistency term's share through the clean branch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..tasks.base import AdvView
from .config import AdvConfig
from .perturbation import Perturbation

__all__ = ["AdversarialTask", "adversarial_tasks", "has_active_dropout"]


class _HandBack(torch.autograd.Function):
    """value + extra in the forward; in the backward, ``grad * g_i`` to each tensor ``t_i`` (the deferred
    gradients ``g_i``, owned by the caller and scaled in place)."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, extra: torch.Tensor, n: int, *tensors_then_grads: torch.Tensor):
        ctx.grads = tensors_then_grads[n:]
        return value.detach() + extra

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grads = ctx.grads
        ctx.grads = None
        out = [g.mul_(grad.to(g.dtype)) for g in grads]
        return (grad, None, None, *out, *([None] * len(out)))


class AdversarialTask(nn.Module):
    """VILLA / FreeLB adversarial training of ``task`` (see the module docstring).

    Args:
        task: a task module (``forward(batch) -> dict(loss, logs, count)``) with an adversarial view: the UNITER
            pre-training tasks, or any task with an ``adversarial_view()`` method (see
            :mod:`fastvl.adversarial.consistency`). It is a submodule (the trainer sees its parameters).
        config: the adversarial settings (:class:`~fastvl.adversarial.AdvConfig`).
        reuse_clean: run the clean pass once as step 0 when the init is zero. None (default): only where that is
            exact, i.e. when the task has no active dropout at the call (:func:`has_active_dropout`); True: always
            (with dropout on, an approximation of upstream); False: never (upstream's separate clean pass).
        grad_scaler: a ``torch.amp.GradScaler`` when training in fp16 (see AMP above); None otherwise.
        generator: for the random init (``config.adv_init_mag > 0``).
        backend: force a backend of the fused delta ops.

    In eval mode or under ``torch.no_grad`` the call is the wrapped task's plain forward.
    ``on_step(k, perturbation)``, when set, is called with the deltas used by step k (before their update).
    """

    def __init__(self, task: nn.Module, config: AdvConfig, *, reuse_clean: bool | None = None,
                 grad_scaler: torch.amp.GradScaler | None = None, generator: torch.Generator | None = None,
                 backend: str | None = None):
        super().__init__()
        if not isinstance(config, AdvConfig):
            raise TypeError(f"fastvl.adversarial.AdversarialTask: argument 'config' must be an AdvConfig, got "
                            f"{type(config).__name__}")
        self.task = task
        self.config = config
        self.view: AdvView = adversarial_view(task)
        if reuse_clean not in (None, True, False):
            raise ValueError(f"fastvl.adversarial.AdversarialTask: argument 'reuse_clean' must be None (auto), True "
                             f"or False, got {reuse_clean!r}")
        self.reuse_clean = reuse_clean
        self.grad_scaler = grad_scaler
        self.generator = generator
        self.backend = backend
        self.on_step: Callable[[int, Perturbation], None] | None = None

    def extra_repr(self) -> str:
        return f"config={self.config}, reuse_clean={self.reuse_clean}"

    def reuses_clean_pass(self) -> bool:
        """Whether the next training call runs the clean pass as step 0 (see ``reuse_clean``): a zero init, and
        ``reuse_clean`` True, or None with no active dropout in the task now."""
        if self.config.adv_init_mag != 0 or self.reuse_clean is False:
            return False
        return self.reuse_clean is True or not has_active_dropout(self.task)

    # ------------------------------------------------------------------------------------------------------
    def _scaled(self, loss: torch.Tensor) -> torch.Tensor:
        return self.grad_scaler.scale(loss) if self.grad_scaler is not None else loss

    def _inv_scale(self, like: torch.Tensor) -> torch.Tensor | None:
        if self.grad_scaler is None:
            return None
        return 1.0 / self.grad_scaler.scale(torch.ones((), device=like.device, dtype=torch.float32))

    def _ascend(self, k: int, pert: Perturbation, inv: torch.Tensor | None) -> None:
        """The delta update after step k: unscale (AMP: an overflowed gradient becomes 0, so no update), fused step."""
        if inv is not None:
            for d in pert.active:
                g = d.tensor.grad
                if g is not None:
                    bad = ~torch.isfinite(g).all()
                    d.tensor.grad = torch.where(bad, torch.zeros_like(g), g * inv.to(g.dtype))
        pert.step()

    def forward(self, batch) -> dict:
        if not self.training or not torch.is_grad_enabled():
            return self.task(batch)
        cfg, view = self.config, self.view
        K, w, scale = cfg.adv_steps, cfg.adv_kl_weight, cfg.loss_scale
        ctx = view.context(batch)
        pert = Perturbation.packed(cfg, getattr(ctx, "batch", batch), view.hidden_size, generator=self.generator,
                                   backend=self.backend)
        params = [p for p in self.task.parameters() if p.requires_grad]
        reuse = self.reuses_clean_pass()
        inv = self._inv_scale(pert.active[0].tensor)
        graph_loss = None  # the part of the returned loss whose graph the trainer's backward traverses
        stash: list[torch.Tensor | None] | None = None
        internal_value = torch.zeros((), dtype=torch.float32)
        task_sum, kl_sum, n_pass = 0.0, 0.0, 0
        clean_pred = proxy = None
        if reuse:  # (1) step 0 is the clean pass
            deltas = [d.tensor for d in pert.active]
            if self.on_step is not None:
                self.on_step(0, pert)
            clean = view.forward(ctx, *pert.deltas(cfg.modalities))
            clean_pred = clean.pred
            task_sum, n_pass = clean.loss.detach() * len(cfg.passes), len(cfg.passes)
            if K > 1 and not cfg.kl_clean_grad:  # one ordinary backward now: parameters and deltas together
                clean_pred = clean_pred.detach()
                stash = [p.grad for p in params]
                for p in params:
                    p.grad = None
                step0 = clean.loss * (scale * len(cfg.passes))  # = clean.loss / K (alter: two passes at 1/2K)
                self._scaled(step0).backward()
                internal_value = step0.detach().float()
                self._ascend(0, pert, inv)
            elif K > 1:
                graph_loss = clean.loss / K
                grads = torch.autograd.grad(self._scaled(clean.loss * scale), deltas, retain_graph=True,
                                            allow_unused=True)
                for d, g in zip(deltas, grads, strict=True):
                    d.grad = g
                self._ascend(0, pert, inv)
            else:
                graph_loss = clean.loss / K
            first = 1
        else:
            clean = None
            if w > 0:
                with torch.set_grad_enabled(cfg.kl_clean_grad):
                    clean = view.forward(ctx, None, None)
                clean_pred = clean.pred
            first = 0
        logs = {k: v for k, v in clean.logs.items()} if clean is not None else {}
        if clean_pred is not None and w > 0 and K > 1 and cfg.kl_clean_grad:
            proxy = clean_pred.detach().requires_grad_()
        for k in range(first, K):
            last = k == K - 1
            if not last and stash is None:  # set the accumulated gradients aside (no copy)
                stash = [p.grad for p in params]
                for p in params:
                    p.grad = None
            if self.on_step is not None:
                self.on_step(k, pert)
            step_loss = None
            for modalities in cfg.passes:
                txt, img = pert.deltas(modalities)
                if last:  # (3) no delta gradient after the last step
                    txt = txt.detach() if txt is not None else None
                    img = img.detach() if img is not None else None
                out = view.forward(ctx, txt, img)
                loss = out.loss
                task_sum, n_pass = task_sum + out.loss.detach(), n_pass + 1
                if w > 0:
                    kl = view.consistency(out.pred, clean_pred if last or proxy is None else proxy)
                    kl_sum = kl_sum + kl.detach()
                    loss = loss + w * kl
                loss = loss * scale
                step_loss = loss if step_loss is None else step_loss + loss
            if last:
                graph_loss = step_loss if graph_loss is None else graph_loss + step_loss
            else:
                self._scaled(step_loss).backward()
                internal_value = internal_value.to(step_loss.device) + step_loss.detach().float()
                self._ascend(k, pert, inv)
        pert.zero_grad()
        tensors, deferred = [], []
        if proxy is not None and proxy.grad is not None:  # (2) the clean graph's share, in the final backward
            tensors.append(clean_pred)
            deferred.append(proxy.grad.mul_(inv.to(proxy.grad.dtype)) if inv is not None else proxy.grad)
        if stash is not None:
            for p, saved in zip(params, stash, strict=True):
                g, p.grad = p.grad, saved
                if g is not None:
                    tensors.append(p)
                    deferred.append(g.mul_(inv.to(g.dtype)) if inv is not None else g)
        total = _HandBack.apply(graph_loss, internal_value.to(graph_loss.device, graph_loss.dtype), len(tensors),
                                *tensors, *deferred)
        logs.update(adv_task_loss=task_sum / max(n_pass, 1), total_loss=total.detach())
        if w > 0:
            logs["adv_kl"] = (kl_sum if torch.is_tensor(kl_sum) else torch.tensor(kl_sum)) / max(n_pass, 1)
        return dict(loss=total, logs=logs, count=view.count(getattr(ctx, "batch", batch)))


def has_active_dropout(module: nn.Module) -> bool:
    """True when a forward of ``module`` in its current mode draws dropout: some submodule in training mode is an
    ``nn.Dropout`` with p > 0 (fastvl keeps every dropout rate, the fused attention's included, in one) or an
    ``nn.MultiheadAttention`` with dropout > 0."""
    for m in module.modules():
        if not m.training:
            continue
        if isinstance(m, nn.Dropout) and m.p > 0:
            return True
        if isinstance(m, nn.MultiheadAttention) and m.dropout > 0:
            return True
    return False


def adversarial_tasks(tasks: dict[str, nn.Module], config: AdvConfig) -> dict[str, nn.Module]:
    """Every task module of a run under :class:`AdversarialTask` with ``config`` (one wrapper per module: several
    batch sources may share a task module)."""
    wrapped: dict[int, nn.Module] = {}
    for t in tasks.values():
        if id(t) not in wrapped:
            wrapped[id(t)] = AdversarialTask(t, config)
    return {k: wrapped[id(t)] for k, t in tasks.items()}


def adversarial_view(task: nn.Module) -> AdvView:
    """The :class:`~fastvl.tasks.base.AdvView` of ``task`` (its ``adversarial_view()`` method)."""
    own = getattr(task, "adversarial_view", None)
    if not callable(own):
        raise TypeError(f"fastvl.adversarial: task {type(task).__name__} has no adversarial interface: give it an "
                        "'adversarial_view()' method returning an AdvView (context, forward, consistency, count, "
                        "hidden_size), as fastvl.tasks.base describes")
    return own()
