"""What every task shares: the fine-tuning task base, and the VILLA view protocol a task offers the adversarial loop.

A task is an ``nn.Module`` with ``forward(batch) -> dict(loss=scalar, logs=dict, count=loss elements)`` (the trainer's
contract). A task that VILLA can train also has ``adversarial_view() -> AdvView``: a forward that takes the text /
image perturbations and returns the task loss with the predictions its consistency term compares. The generic
K-step loop (:mod:`fastvl.adversarial`) knows only this protocol.

Consistency terms are chosen so that they are 0 with a zero gradient when the perturbed prediction equals the clean
one (the loop's step-0 reuse relies on it): symmetric KL on logits / scores (batchmean), or the mean squared
difference for regressed features.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..batch import PackedVLBatch
from ..ops.sym_kl import symmetric_kl

__all__ = ["AdvOutput", "AdvView", "FinetuneAdvView", "ViewCtx", "FinetuneTask", "consistency_loss",
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
    raise ValueError(f"fastvl.tasks.consistency_loss: argument 'kind' must be 'kl' or 'mse', got {kind!r}")


def masked_text_targets(batch: PackedVLBatch) -> tuple[PackedVLBatch, torch.Tensor]:
    """(the batch with ``n_txt_masked`` set, the labels [n] of its n masked tokens in packed order): the count is
    read from the device once here, not once per pass."""
    sel = batch.txt_labels != -1
    if batch.n_txt_masked is None:
        batch = replace(batch, n_txt_masked=int(sel.sum()))
    return batch, batch.txt_labels[torch.nonzero_static(sel, size=batch.n_txt_masked).squeeze(1)]


class FinetuneTask(nn.Module):
    """Base: ``forward(batch) -> dict(loss=scalar, logs=dict of detached 0-d tensors, count=examples)``."""

    name = ""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def check_batch(self, batch: PackedVLBatch) -> None:
        """Raise (TypeError / ValueError naming the field) unless ``batch`` is a PackedVLBatch this task can train
        on: ``targets`` given (subclasses add their own checks). Host-side, no device read."""
        if not isinstance(batch, PackedVLBatch):
            raise TypeError(f"fastvl.tasks.{type(self).__name__}: 'batch' must be a PackedVLBatch, got "
                            f"{type(batch).__name__}")
        if batch.targets is None:
            raise ValueError(f"fastvl.tasks.{type(self).__name__}: batch.targets is required")

    def count(self, batch: PackedVLBatch) -> int:
        return batch.batch_size

    def forward(self, batch: PackedVLBatch) -> dict:
        self.check_batch(batch)
        loss = self.model(batch, compute_loss=True, reduction="mean")
        return dict(loss=loss, logs={f"{self.name}_loss": loss.detach()}, count=self.count(batch))

    def extra_repr(self) -> str:
        return f"name={self.name!r}"

    # VILLA hooks (see adversarial_view) ---------------------------------------------------------------------
    def adv_prepare(self, batch: PackedVLBatch) -> PackedVLBatch:
        """The batch every adversarial pass encodes (checked; ITR: grouped with its negatives)."""
        self.check_batch(batch)
        return batch

    def adv_loss(self, h: torch.Tensor, layout, batch: PackedVLBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(training loss, scores for the consistency term) from the packed encoder output h [T, H]."""
        scores = self.model.head(h, layout, batch=batch)
        return F.cross_entropy(scores.float(), batch.targets), scores

    def adversarial_view(self):
        """The :class:`AdvView` of this task: the packed encoder with the perturbations, then :meth:`adv_loss`."""
        return FinetuneAdvView(self)


class FinetuneAdvView:
    """:class:`AdvView` of a fine-tuning task: one packed layout per micro-batch, the
    encoder run with the perturbations, then the task's ``adv_loss`` (loss, scores); consistency = symmetric KL on
    the scores, batchmean."""

    def __init__(self, task: FinetuneTask):
        self.task = task
        self.model = task.model
        self.hidden_size = int(self.model.uniter.config.hidden_size)

    def context(self, batch: PackedVLBatch) -> ViewCtx:
        batch = self.task.adv_prepare(batch)
        return ViewCtx(batch, self.model.uniter.layout(batch))

    def forward(self, ctx: ViewCtx, txt_delta: torch.Tensor | None, img_delta: torch.Tensor | None):
        h = self.model.uniter.forward_packed(ctx.batch, layout=ctx.layout, txt_delta=txt_delta, img_delta=img_delta)
        loss, pred = self.task.adv_loss(h, ctx.layout, ctx.batch)
        return AdvOutput(loss, pred, {f"{self.task.name}_loss": loss.detach()})

    def consistency(self, pred: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        return consistency_loss("kl", pred, clean)

    def count(self, batch: PackedVLBatch) -> int:
        fn = getattr(self.task, "adv_count", None)
        return fn(batch) if fn is not None else self.task.count(batch)


@dataclass
class ViewCtx:
    """Per-micro-batch state every pass of a view shares: the batch, its packed layout, selected targets."""

    batch: PackedVLBatch
    layout: Any
    targets: torch.Tensor | None = None
