"""LXMERT pre-training tasks on packed batches, with the port's losses, and their VILLA views.

One task per batch source of :func:`fastvl.data.build_pretrain_data` (each batch masks one modality) and one for QA:

- ``mlm``: mean cross-entropy of ``cls.predictions`` over the masked tokens (``txt_labels`` != -1);
- ``mrfr``: masked-object feature regression, ``obj_predict_head`` 'feat': smooth-L1 (mean over the feature
  dimension) on the masked regions, summed and divided by the batch's regions, x ``visual_loss_normalizer`` (the port
  averages over every region position with mask_conf 0 on the unmasked ones);
- ``mrc``: masked-object classification, ``obj_predict_head`` 'obj': cross-entropy to the detector's top class
  (argmax of ``soft_labels``, background 0 included) weighted by its probability (LXMERT's mask_conf = detector
  confidence), summed over the masked regions / the batch's regions x ``visual_loss_normalizer``;
- ``itm``: mean cross-entropy of ``cls.seq_relationship`` on the pooled [CLS] (``itm_targets``, 1 = matched);
- ``qa``: mean cross-entropy of ``answer_head`` on the pooled [CLS], the answer = argmax of the batch's soft scores
  ``targets`` [B, num_qa_labels] (a VQA batch).

``count`` is what the loss averages (masked tokens; regions of the batch; pairs; questions). VILLA
(:class:`LxmertView`): the packed encoder with the text delta on the word embeddings and the image delta on the raw
region features; consistency = symmetric KL (batchmean) on the vocabulary logits (mlm), object-class logits (mrc),
ITM scores (itm) and answer scores (qa), the mean squared difference of the regressed features (mrfr).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..batch import PackedVLBatch
from ..models.lxmert import LxmertForPreTraining, LxmertPackedOutput, visual_loss
from .base import AdvOutput, ViewCtx, consistency_loss, masked_text_targets

__all__ = ["LXMERT_TASKS", "LxmertPretrainTask", "LxmertView", "lxmert_tasks"]

LXMERT_TASKS = ("mlm", "mrfr", "mrc", "itm", "qa")
_NEEDS = {"mlm": ("txt_labels",), "mrfr": ("img_masks", "feat_targets"), "mrc": ("img_masks", "soft_labels"),
          "itm": ("itm_targets",), "qa": ("targets",)}


class LxmertPretrainTask(nn.Module):
    """One LXMERT pre-training task: ``forward(batch) -> dict(loss, logs, count)``.

    Args:
        model: the LxmertForPreTraining shared by all tasks.
        name: one of ``LXMERT_TASKS``.
    """

    def __init__(self, model: LxmertForPreTraining, name: str):
        super().__init__()
        if name not in LXMERT_TASKS:
            raise ValueError(f"fastvl.tasks.lxmert: task must be one of {LXMERT_TASKS}, got {name!r}")
        if not isinstance(model, LxmertForPreTraining):
            raise TypeError(f"fastvl.tasks.lxmert: 'model' must be an LxmertForPreTraining, got "
                            f"{type(model).__name__}")
        cfg = model.config
        need = {"mrfr": ("task_obj_predict", "visual_feat_loss"), "mrc": ("task_obj_predict", "visual_obj_loss"),
                "qa": ("task_qa",), "itm": ("task_matched",), "mlm": ("task_mask_lm",)}[name]
        off = [k for k in need if not getattr(cfg, k)]
        if off:
            raise ValueError(f"fastvl.tasks.lxmert: task {name!r} needs the model config's {off} to be true")
        self.model = model
        self.name = name

    def extra_repr(self) -> str:
        return f"name={self.name!r}"

    def check_batch(self, batch: PackedVLBatch) -> None:
        """TypeError / ValueError naming the field unless the batch carries this task's targets (host-side)."""
        if not isinstance(batch, PackedVLBatch):
            raise TypeError(f"fastvl.tasks.lxmert: task {self.name!r} needs a PackedVLBatch, got "
                            f"{type(batch).__name__}")
        for f in _NEEDS[self.name]:
            if getattr(batch, f) is None:
                raise ValueError(f"fastvl.tasks.lxmert: task {self.name!r} needs batch.{f}")
        cfg = self.model.config
        if self.name == "mrc" and batch.soft_labels.shape[-1] != cfg.num_object_labels:
            raise ValueError(f"fastvl.tasks.lxmert: batch.soft_labels has {batch.soft_labels.shape[-1]} classes but "
                             f"the model's num_object_labels is {cfg.num_object_labels}")
        if self.name == "qa" and batch.targets.shape[-1] != cfg.num_qa_labels:
            raise ValueError(f"fastvl.tasks.lxmert: batch.targets has {batch.targets.shape[-1]} answers but the "
                             f"model's num_qa_labels is {cfg.num_qa_labels}")

    def count(self, batch: PackedVLBatch) -> int | torch.Tensor:
        """Number of elements the loss averages."""
        if self.name == "mlm":
            return batch.n_txt_masked if batch.n_txt_masked is not None else (batch.txt_labels != -1).sum()
        if self.name in ("mrfr", "mrc"):
            return batch.n_img
        return batch.batch_size

    def context(self, batch: PackedVLBatch) -> ViewCtx:
        """The checked batch and the targets every pass uses (the masked rows are counted once, here)."""
        self.check_batch(batch)
        if self.name == "mlm":
            batch, targets = masked_text_targets(batch)
        elif self.name == "mrfr":
            targets = batch.feat_targets
        elif self.name == "mrc":
            targets = batch.soft_labels
        elif self.name == "itm":
            targets = batch.itm_targets
        else:
            targets = batch.targets.argmax(-1)
        return ViewCtx(batch, None, targets)

    def loss(self, out: LxmertPackedOutput, ctx: ViewCtx) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, prediction) from the encoder's packed outputs."""
        m, cfg, batch = self.model, self.model.config, ctx.batch
        if self.name == "mlm":
            rows = torch.nonzero_static(batch.txt_labels != -1, size=batch.n_txt_masked).squeeze(1)
            logits = m.cls.predictions(out.language_output[rows])
            if logits.shape[0] == 0:
                return logits.sum() * 0.0, logits
            return F.cross_entropy(logits.float(), ctx.targets), logits
        if self.name in ("mrfr", "mrc"):
            rows = torch.nonzero_static(batch.img_masks.bool(), size=ctx.targets.shape[0]).squeeze(1)
            key = "feat" if self.name == "mrfr" else "obj"
            scores = m.obj_predict_head(out.vision_output[rows], (key,))[key]
            if key == "feat":
                label, conf = ctx.targets, torch.ones(scores.shape[0], device=scores.device)
            else:
                conf, label = ctx.targets.float().max(-1)
            return visual_loss(key, scores, label, conf, batch.n_img, cfg.visual_loss_normalizer), scores
        if self.name == "itm":
            scores = m.cls.seq_relationship(out.pooled_output)
            return F.cross_entropy(scores.float(), ctx.targets), scores
        scores = m.answer_scores(out.pooled_output)
        return F.cross_entropy(scores.float(), ctx.targets), scores

    def forward(self, batch: PackedVLBatch) -> dict:
        ctx = self.context(batch)
        loss, _ = self.loss(self.model.forward_packed(ctx.batch), ctx)
        return dict(loss=loss, logs={f"{self.name}_loss": loss.detach()}, count=self.count(ctx.batch))

    def adversarial_view(self) -> LxmertView:
        """VILLA's view of this task (see :class:`LxmertView`)."""
        return LxmertView(self)


class LxmertView:
    """:class:`~fastvl.tasks.base.AdvView` of an LXMERT task: the packed encoder with VILLA's perturbations (text on
    the word embeddings [T_txt, H], image on the raw region features [T_img, visual_feat_dim]), then the task's loss."""

    def __init__(self, task: LxmertPretrainTask):
        self.task = task
        self.hidden_size = int(task.model.config.hidden_size)
        self.kind = "mse" if task.name == "mrfr" else "kl"

    def context(self, batch: PackedVLBatch) -> ViewCtx:
        return self.task.context(batch)

    def forward(self, ctx: ViewCtx, txt_delta: torch.Tensor | None, img_delta: torch.Tensor | None) -> AdvOutput:
        out = self.task.model.forward_packed(ctx.batch, txt_delta=txt_delta, img_delta=img_delta)
        loss, pred = self.task.loss(out, ctx)
        return AdvOutput(loss, pred, {f"{self.task.name}_loss": loss.detach()})

    def consistency(self, pred: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        return consistency_loss(self.kind, pred, clean)

    def count(self, batch: PackedVLBatch) -> int | torch.Tensor:
        return self.task.count(batch)


def lxmert_tasks(model: LxmertForPreTraining, names: tuple[str, ...] | list[str] = LXMERT_TASKS
                 ) -> dict[str, LxmertPretrainTask]:
    """One task per name, all sharing ``model``."""
    return {n: LxmertPretrainTask(model, n) for n in names}
