"""VQA, GQA and SNLI-VE: soft-score answer classification (VQA accuracy) and its VILLA view.

Targets: ``batch.targets`` [B, A] soft scores (:func:`vqa_soft_targets` builds them from answer ids); loss =
per-instance BCE sum averaged over the batch (official), fused head + loss in the model (the VILLA view uses the same
loss through the model's public ``head``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..batch import PackedVLBatch
from . import metrics
from .base import FinetuneTask

__all__ = ["VQATask", "vqa_soft_targets"]


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
    """VQA / GQA / SNLI-VE with a UniterForVisualQuestionAnswering / UniterForVisualEntailment model.

    Its VILLA view is the generic fine-tuning view (:class:`~fastvl.tasks.base.FinetuneAdvView`, VILLA's fine-tuning
    recipe) with :meth:`adv_loss`: the loss is the model's own fused BCE (the one VQA loss), consistency = symmetric
    KL on the answer logits [B, A], batchmean (VILLA's ``kl.mean() * num_answers``).
    """

    name = "vqa"

    def adv_loss(self, h: torch.Tensor, layout, batch: PackedVLBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(the training loss: BCE-with-logits against the soft scores ``targets`` [B, A], per-instance sum
        averaged over the batch, fused in the model's head; the answer logits [B, A]) from h [T, H]."""
        loss = self.model.head(h, layout, targets=batch.targets, compute_loss=True, reduction="mean")
        return loss.float(), self.model.head(h, layout)

    @torch.no_grad()
    def evaluate(self, batch: PackedVLBatch) -> dict[str, torch.Tensor]:
        """-> ``{'score': [B]}`` soft accuracy (and ``'logits'`` [B, A])."""
        self.check_batch(batch)
        logits = self.model(batch, compute_loss=False)
        return {"score": metrics.vqa_score(logits, batch.targets), "logits": logits}
