"""VQA, GQA and SNLI-VE: soft-score answer classification (VQA accuracy) and its VILLA view.

Targets: ``batch.extras['targets']`` [B, A] soft scores (:func:`vqa_soft_targets` builds them from answer ids); loss =
per-instance BCE sum averaged over the batch (official), fused head + loss in the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..batch import PackedVLBatch
from . import metrics
from .base import AdvOutput, FinetuneTask, ViewCtx, consistency_loss

__all__ = ["VQATask", "VQAView", "vqa_soft_targets"]


def vqa_soft_targets(answer_ids: Sequence[Sequence[int]], scores: Sequence[Sequence[float]], num_answers: int,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Soft-score targets [B, num_answers] from per-example answer ids and their scores (official VQA target).

    Raises ValueError naming the example when an id is outside ``[0, num_answers)`` (an answer missing from the
    vocabulary must be dropped by the data pipeline, not wrapped), a score is outside [0, 1], or the lists differ.
    """
    if len(answer_ids) != len(scores):
        raise ValueError(f"vqa_soft_targets: 'answer_ids' has {len(answer_ids)} examples but 'scores' has "
                         f"{len(scores)}")
    out = torch.zeros(len(answer_ids), num_answers)
    for i, (ids, sc) in enumerate(zip(answer_ids, scores)):
        if len(ids) != len(sc):
            raise ValueError(f"vqa_soft_targets: example {i} has {len(ids)} answer ids but {len(sc)} scores")
        for a, s in zip(ids, sc):
            if not 0 <= int(a) < num_answers:
                raise ValueError(f"vqa_soft_targets: example {i} has answer id {int(a)} outside the answer "
                                 f"vocabulary [0, {num_answers})")
            if not 0.0 <= float(s) <= 1.0:
                raise ValueError(f"vqa_soft_targets: example {i} has score {float(s)} for answer {int(a)}; scores "
                                 f"must lie in [0, 1]")
            out[i, int(a)] = float(s)
    return out.to(device)


class VQATask(FinetuneTask):
    """VQA / GQA / SNLI-VE with a UniterForVisualQuestionAnswering / UniterForVisualEntailment model."""

    name = "vqa"

    def adversarial_view(self) -> VQAView:
        """VILLA's fine-tuning view (BCE on the soft scores, KL on the answer logits)."""
        return VQAView(self)

    @torch.no_grad()
    def evaluate(self, batch: PackedVLBatch) -> dict[str, torch.Tensor]:
        """-> ``{'score': [B]}`` soft accuracy (and ``'logits'`` [B, A])."""
        self._check(batch)
        logits = self.model(batch, compute_loss=False)
        return {"score": metrics.vqa_score(logits, batch.extras["targets"]), "logits": logits}


class VQAView:
    """:class:`AdvView` of the VQA / SNLI-VE fine-tuning task (VILLA's fine-tuning recipe): loss = BCE-with-logits
    against the soft scores, per-instance sum averaged over the batch (the task's official reduction); consistency =
    symmetric KL on the answer logits [B, A], batchmean (VILLA's ``kl.mean() * num_answers``)."""

    def __init__(self, task: nn.Module):
        self.task = task
        self.model = task.model
        self.hidden_size = int(self.model.uniter.config.hidden_size)

    def context(self, batch: PackedVLBatch) -> ViewCtx:
        task = self.task
        task._check(batch)
        return ViewCtx(batch, self.model.uniter.layout(batch), batch.extras["targets"])

    def forward(self, ctx: ViewCtx, txt_delta: torch.Tensor | None, img_delta: torch.Tensor | None) -> AdvOutput:
        logits = self.model.forward_packed(ctx.batch, compute_loss=False, layout=ctx.layout, txt_delta=txt_delta,
                                           img_delta=img_delta)
        loss = F.binary_cross_entropy_with_logits(logits.float(), ctx.targets.float(), reduction="sum") / \
            max(logits.shape[0], 1)
        return AdvOutput(loss, logits, {f"{self.task.name}_loss": loss.detach()})

    def consistency(self, pred: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        return consistency_loss("kl", pred, clean)

    def count(self, batch: PackedVLBatch) -> int | torch.Tensor:
        return self.task.count(batch)
