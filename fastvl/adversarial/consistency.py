"""What the VILLA loop needs from a task: a forward that takes the perturbations and returns the task loss together
with the predictions the consistency term compares, and that consistency term.

An :class:`AdvView` wraps one task module. :func:`adversarial_view` builds it: a task may provide its own (a method
``adversarial_view()`` returning an object with this interface: the way fine-tuning tasks plug in), and the UNITER
pre-training tasks of :mod:`fastvl.tasks.pretrain` get :class:`PretrainView` here, without changes to them.

Consistency terms (VILLA's regulariser; one per task, chosen so that it is 0 with a zero gradient when the
perturbed prediction equals the clean one, which the loop relies on for its step-0 reuse):

    mlm      symmetric KL on the masked tokens' vocabulary logits [n, V], batchmean (sum / n)
    mrc      symmetric KL on the masked regions' class logits [n, C], batchmean
    mrc-kl   symmetric KL on the masked regions' class logits [n, C], batchmean
    itm      symmetric KL on the pair scores [B, 2], batchmean (VILLA's ``kl.mean() * num_classes``)
    mrfr     mean squared difference of the regressed features [n, img_dim] (element mean, as the MRFR loss)
    wra      no term: the OT loss is part of ITM's task loss on every pass, unchanged
    vqa/ve   symmetric KL on the answer logits [B, A], batchmean (fine-tuning)
    nlvr2, itr, re, vcr: symmetric KL on the task's scores (their ``adversarial_view``, fastvl.tasks.finetune)
    caption  symmetric KL on the masked caption tokens' vocabulary logits [n, V] (fastvl.tasks.caption)

Task losses are computed from the predictions with the head loss functions of
:mod:`fastvl.models.uniter.heads` (an identity head), so they are the task modules' official reductions.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..batch import PackedVLBatch
from ..models.uniter import heads as H
from ..models.uniter.pretrain import canonical_task
from ..ops.symmetric_kl import symmetric_kl

__all__ = ["AdvOutput", "AdvView", "PretrainView", "VQAView", "adversarial_view", "consistency_loss",
           "masked_text_targets"]


@dataclass
class AdvOutput:
    """One forward pass: ``loss`` (scalar, the task's training reduction), ``pred`` (the tensor the consistency term
    compares, e.g. logits [n, C]) and ``logs`` (detached 0-d tensors)."""

    loss: torch.Tensor
    pred: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


class AdvView(Protocol):
    """The adversarial interface of a task (see the module docstring)."""

    hidden_size: int

    def context(self, batch: Any) -> Any:
        """Per-micro-batch state shared by the clean and every perturbed pass (layout, selected targets)."""
        ...

    def forward(self, ctx: Any, txt_delta: torch.Tensor | None, img_delta: torch.Tensor | None) -> AdvOutput:
        """One pass with the given perturbations (None = not perturbed)."""
        ...

    def consistency(self, pred: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        """The consistency term between a perturbed prediction and the clean one (gradients to both)."""
        ...

    def count(self, batch: Any) -> int | torch.Tensor:
        """Number of elements the task loss averages (the trainer's weighting)."""
        ...


def consistency_loss(kind: str, pred: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """``kind`` 'kl' (symmetric KL, batchmean, over the last dim) or 'mse' (element mean). pred, clean: [n, C]."""
    if kind == "kl":
        return symmetric_kl(pred, clean, "batchmean")
    if kind == "mse":
        return F.mse_loss(pred.float(), clean.float(), reduction="sum") / max(pred.numel(), 1)
    raise ValueError(f"fastvl.adversarial.consistency_loss: argument 'kind' must be 'kl' or 'mse', got {kind!r}")


def masked_text_targets(batch: PackedVLBatch) -> tuple[PackedVLBatch, torch.Tensor]:
    """(the batch with ``n_txt_masked`` set, the labels [n] of its n masked tokens in packed order): the count is
    read from the device once here, not once per pass."""
    sel = batch.txt_labels != -1
    if batch.n_txt_masked is None:
        batch = replace(batch, n_txt_masked=int(sel.sum()))
    return batch, batch.txt_labels[torch.nonzero_static(sel, size=batch.n_txt_masked).squeeze(1)]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass
class _Ctx:
    batch: PackedVLBatch
    layout: Any
    targets: torch.Tensor | None


class PretrainView:
    """:class:`AdvView` of a :class:`fastvl.tasks.pretrain.PretrainTask` (mlm, mrfr, mrc, mrc-kl, itm + WRA).

    Passes call ``model.forward_packed(batch, task, compute_loss=False, layout=..., txt_delta=, img_delta=)``: one
    packed layout per micro-batch for all of them, heads on the masked rows only.
    """

    def __init__(self, task: nn.Module):
        self.task = task
        self.model = task.model
        self.name = canonical_task(task.name)
        self.hidden_size = int(self.model.uniter.config.hidden_size)
        self.ot_lambda = float(getattr(task, "ot_lambda", 0.0)) if self.name == "itm" else 0.0
        self.kind = "mse" if self.name == "mrfr" else "kl"

    def context(self, batch: PackedVLBatch) -> _Ctx:
        if not isinstance(batch, PackedVLBatch):
            raise TypeError(f"fastvl.adversarial: task {self.name!r} needs a PackedVLBatch, got {type(batch).__name__}")
        targets = None
        if self.name == "mlm":
            batch, targets = masked_text_targets(batch)
        elif self.name == "mrfr":
            targets = batch.feat_targets
        elif self.name in ("mrc", "mrc-kl"):
            targets = batch.soft_labels
        else:
            targets = batch.itm_targets
        return _Ctx(batch, self.model.uniter.layout(batch), targets)

    def forward(self, ctx: _Ctx, txt_delta: torch.Tensor | None, img_delta: torch.Tensor | None) -> AdvOutput:
        name = self.name
        out = self.model.forward_packed(ctx.batch, name, compute_loss=False, with_ot=self.ot_lambda > 0,
                                        layout=ctx.layout, check_finite=self.task.check_finite,
                                        txt_delta=txt_delta, img_delta=img_delta)
        if name == "itm":
            scores, dist = out
            itm = H.itm_loss(_identity, scores, ctx.targets, "mean")
            logs = {"itm_loss": itm.detach()}
            loss = itm
            if dist is not None:
                ot = H.wra_loss(dist, ctx.targets)
                logs["ot_loss"] = ot.detach()
                loss = itm + self.ot_lambda * ot
            return AdvOutput(loss, scores, logs)
        fn = {"mlm": H.mlm_loss, "mrfr": H.mrfr_loss, "mrc": H.mrc_loss, "mrc-kl": H.mrc_kl_loss}[name]
        loss = fn(_identity, out, ctx.targets, "mean")
        return AdvOutput(loss, out, {f"{name}_loss": loss.detach()})

    def consistency(self, pred: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        return consistency_loss(self.kind, pred, clean)

    def count(self, batch: PackedVLBatch) -> int | torch.Tensor:
        return self.task.count(batch)


class VQAView:
    """:class:`AdvView` of the VQA / SNLI-VE fine-tuning task (VILLA's fine-tuning recipe): loss = BCE-with-logits
    against the soft scores, per-instance sum averaged over the batch (the task's official reduction); consistency =
    symmetric KL on the answer logits [B, A], batchmean (VILLA's ``kl.mean() * num_answers``)."""

    def __init__(self, task: nn.Module):
        self.task = task
        self.model = task.model
        self.hidden_size = int(self.model.uniter.config.hidden_size)

    def context(self, batch: PackedVLBatch) -> _Ctx:
        task = self.task
        task._check(batch)
        return _Ctx(batch, self.model.uniter.layout(batch), batch.extras["targets"])

    def forward(self, ctx: _Ctx, txt_delta: torch.Tensor | None, img_delta: torch.Tensor | None) -> AdvOutput:
        logits = self.model.forward_packed(ctx.batch, compute_loss=False, layout=ctx.layout, txt_delta=txt_delta,
                                           img_delta=img_delta)
        loss = F.binary_cross_entropy_with_logits(logits.float(), ctx.targets.float(), reduction="sum") / \
            max(logits.shape[0], 1)
        return AdvOutput(loss, logits, {f"{self.task.name}_loss": loss.detach()})

    def consistency(self, pred: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        return consistency_loss("kl", pred, clean)

    def count(self, batch: PackedVLBatch) -> int | torch.Tensor:
        return self.task.count(batch)


def adversarial_view(task: nn.Module) -> AdvView:
    """The :class:`AdvView` of ``task``: its own ``adversarial_view()`` if it has one, else the built-in view of the
    UNITER pre-training tasks and of VQA / SNLI-VE fine-tuning."""
    own = getattr(task, "adversarial_view", None)
    if callable(own):
        return own()
    from ..tasks.finetune import VQATask
    from ..tasks.pretrain import PretrainTask

    if isinstance(task, PretrainTask):
        return PretrainView(task)
    if isinstance(task, VQATask):
        return VQAView(task)
    raise TypeError(f"fastvl.adversarial: task {type(task).__name__} has no adversarial interface: give it an "
                    "'adversarial_view()' method returning an AdvView (context, forward, consistency, count, "
                    "hidden_size), as fastvl.adversarial.consistency describes")
