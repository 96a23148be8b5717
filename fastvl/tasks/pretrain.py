"""UNITER pre-training tasks (MLM, MRFR, MRC, MRC-kl, ITM + WRA) on packed batches, with the official reductions.

A task holds the (shared) model and maps a :class:`~fastvl.batch.PackedVLBatch` to
``dict(loss=scalar, logs=dict, count=number of loss elements)``; it calls ``model(batch, name, ...)`` (the model's
native packed API: heads on the masked rows only, no host synchronisation) and reduces as the official training
loop does:

- ``mlm``: mean cross-entropy over masked tokens;  ``mrfr``: mean squared error over n_masked x img_dim;
- ``mrc``: mean cross-entropy over masked regions (target argmax of the detector classes 1..);
- ``mrc-kl``: element mean of the KL terms (n_masked x classes, not batchmean);
- ``itm``: mean cross-entropy over pairs + ``ot_lambda`` (0.1) x WRA loss, where WRA =
  (sum of positive-pair OT distances - sum of negative-pair distances) / number of pairs.

``count`` is the number of elements the loss averages (masked tokens; masked regions x feature dims for mrfr,
masked regions for mrc, x classes for mrc-kl; pairs for itm), so that a trainer can weight micro-batches or
ranks into the global mean. An empty selection (no masked token) gives loss 0, not NaN. Logs are detached 0-d
tensors (no host sync); ``ot_pos`` / ``ot_neg`` (mean distances) are NaN when the batch has no pair of that kind.

VILLA (:class:`PretrainView`): consistency = symmetric KL (batchmean) on the masked tokens' vocabulary logits (mlm),
the masked regions' class logits (mrc, mrc-kl), the pair scores [B, 2] (itm; the OT loss is part of ITM's task loss on
every pass, no term of its own); mean squared difference of the regressed features (mrfr).
"""

from __future__ import annotations

import torch
from torch import nn

from ..batch import PackedVLBatch
from ..models.uniter import canonical_task
from ..models.uniter import heads as H
from .base import AdvOutput, ViewCtx, consistency_loss, masked_text_targets

__all__ = ["ITMTask", "MLMTask", "MRCKLTask", "MRCTask", "MRFRTask", "PretrainTask", "PretrainView", "pretrain_tasks"]


class PretrainTask(nn.Module):
    """Base: ``forward(batch) -> dict(loss=..., logs=..., count=...)``.

    Args:
        model: the UniterForPretraining shared by all tasks (a submodule, so a wrapper sees its parameters).
        check_finite: check features / targets for NaN or inf (reads the device); None = the model's setting.
    """

    name = ""

    def __init__(self, model: nn.Module, check_finite: bool | None = None):
        super().__init__()
        self.model = model
        self.check_finite = check_finite

    def _model_loss(self, batch: PackedVLBatch, **kw):
        if not isinstance(batch, PackedVLBatch):
            raise TypeError(f"fastvl.tasks.{type(self).__name__}: 'batch' must be a PackedVLBatch, got "
                            f"{type(batch).__name__}")
        return self.model(batch, self.name, compute_loss=True, check_finite=self.check_finite, **kw)

    def count(self, batch: PackedVLBatch) -> int | torch.Tensor:
        """Number of elements the loss averages."""
        raise NotImplementedError

    def forward(self, batch: PackedVLBatch) -> dict:
        loss = self._model_loss(batch, reduction="mean")
        return dict(loss=loss, logs={f"{self.name}_loss": loss.detach()}, count=self.count(batch))

    def extra_repr(self) -> str:
        return f"name={self.name!r}"

    def adversarial_view(self) -> PretrainView:
        """VILLA's pre-training view of this task (see :class:`PretrainView`)."""
        return PretrainView(self)


class MLMTask(PretrainTask):
    """Masked language modelling (batch fields: txt_labels, optionally n_txt_masked)."""

    name = "mlm"

    def count(self, batch: PackedVLBatch) -> int | torch.Tensor:
        return batch.n_txt_masked if batch.n_txt_masked is not None else (batch.txt_labels != -1).sum()


class MRFRTask(PretrainTask):
    """Masked region feature regression (batch fields: img_masks, feat_targets)."""

    name = "mrfr"

    def count(self, batch: PackedVLBatch) -> int:
        return batch.feat_targets.numel()


class MRCTask(PretrainTask):
    """Masked region classification, hard labels (batch fields: img_masks, soft_labels)."""

    name = "mrc"

    def count(self, batch: PackedVLBatch) -> int:
        return batch.soft_labels.shape[0]


class MRCKLTask(PretrainTask):
    """Masked region classification, KL to the detector distribution (batch fields: img_masks, soft_labels)."""

    name = "mrc-kl"

    def count(self, batch: PackedVLBatch) -> int:
        return batch.soft_labels.numel()


class ITMTask(PretrainTask):
    """Image-text matching with word-region alignment (batch field: itm_targets).

    Args:
        ot_lambda: weight of the WRA (optimal transport) loss; 0 skips computing it. Official: 0.1.
    """

    name = "itm"

    def __init__(self, model: nn.Module, ot_lambda: float = 0.1, check_finite: bool | None = None):
        super().__init__(model, check_finite)
        if ot_lambda < 0:
            raise ValueError(f"fastvl.tasks.ITMTask: 'ot_lambda' must be >= 0, got {ot_lambda}")
        self.ot_lambda = float(ot_lambda)

    def count(self, batch: PackedVLBatch) -> int:
        return batch.batch_size

    def forward(self, batch: PackedVLBatch) -> dict:
        itm, dist = self._model_loss(batch, reduction="mean", with_ot=self.ot_lambda > 0)
        logs = {"itm_loss": itm.detach()}
        if dist is None:
            return dict(loss=itm, logs=logs, count=self.count(batch))
        targets = batch.itm_targets
        ot = H.wra_loss(dist, targets)
        pos = targets.to(dist.dtype)
        d = dist.detach()
        logs.update(ot_loss=ot.detach(), ot_pos=(d * pos).sum() / pos.sum(),
                    ot_neg=(d * (1 - pos)).sum() / (1 - pos).sum())
        return dict(loss=itm + self.ot_lambda * ot, logs=logs, count=self.count(batch))


def pretrain_tasks(model: nn.Module, ot_lambda: float = 0.1, check_finite: bool | None = None
                   ) -> dict[str, PretrainTask]:
    """One instance of every pre-training task, by name, all sharing ``model``."""
    return {"mlm": MLMTask(model, check_finite), "mrfr": MRFRTask(model, check_finite),
            "mrc": MRCTask(model, check_finite), "mrc-kl": MRCKLTask(model, check_finite),
            "itm": ITMTask(model, ot_lambda, check_finite)}


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class PretrainView:
    """:class:`AdvView` of a :class:`PretrainTask` (mlm, mrfr, mrc, mrc-kl, itm + WRA).

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

    def context(self, batch: PackedVLBatch) -> ViewCtx:
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
        return ViewCtx(batch, self.model.uniter.layout(batch), targets)

    def forward(self, ctx: ViewCtx, txt_delta: torch.Tensor | None, img_delta: torch.Tensor | None) -> AdvOutput:
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
