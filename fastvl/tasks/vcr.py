"""VCR (Q->A or QA->R stage): groups of 4 consecutive (question, choice) rows, ``batch.targets`` [4n]
long (1 = correct choice), optional ``num_choices``; mean cross-entropy over rows; accuracy per question.

VILLA view (:class:`VCRAdvView`), as the official VCR adversarial loop (VILLA ``train_vcr_adv.py``): every pass
scores each row with the 2-way head, [4n, 2]; the task loss is the 2-way cross-entropy, mean over rows; the
consistency term is the symmetric KL between each row's 2-way softmax of the perturbed and the clean scores,
reduced by the mean over all 4n x 2 elements (not per question, not across the choices), weighted by
``adv_kl_weight``.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..batch import PackedVLBatch
from ..ops import symmetric_kl
from . import metrics
from .base import FinetuneAdvView, FinetuneTask

__all__ = ["VCRAdvView", "VCRTask"]


class VCRAdvView(FinetuneAdvView):
    """The VCR task's VILLA view: predictions are the 2-way scores [4n, 2]; consistency = symmetric KL of each row's
    2-way softmax, element mean (the official VCR loop's ``kl.mean()``)."""

    def consistency(self, pred: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        return symmetric_kl(pred, clean, "mean")


class VCRTask(FinetuneTask):
    """VCR (Q->A or QA->R stage) with UniterForVisualCommonsenseReasoning: 4 rows per question."""

    name = "vcr"
    num_choices = 4

    def check_batch(self, batch: PackedVLBatch) -> None:
        super().check_batch(batch)
        given = batch.num_choices
        if given is not None:
            bad = [i for i, n in enumerate(given) if int(n) != self.num_choices]
            if bad:
                raise ValueError(f"fastvl.tasks.VCRTask: question(s) {bad} have {[int(given[i]) for i in bad]} "
                                 f"choices; VCR needs exactly {self.num_choices} per question")
            if sum(int(n) for n in given) != batch.batch_size:
                raise ValueError(f"fastvl.tasks.VCRTask: num_choices sums to {sum(given)} but the batch has "
                                 f"{batch.batch_size} rows")
        if batch.batch_size % self.num_choices:
            raise ValueError(f"fastvl.tasks.VCRTask: the batch has {batch.batch_size} rows, not a multiple of "
                             f"{self.num_choices} (one row per (question, choice), 4 choices per question)")

    def count(self, batch: PackedVLBatch) -> int:
        return batch.batch_size

    def adv_loss(self, h, layout, batch):
        """(2-way cross-entropy, mean over rows; the 2-way scores [B, 2] the consistency term compares)."""
        scores = self.model.vcr_output(self.model.pooled(h, layout))  # [B, 2]
        loss = F.cross_entropy(scores.float(), batch.targets)
        return loss, scores

    def adversarial_view(self) -> VCRAdvView:
        return VCRAdvView(self)

    @torch.no_grad()
    def evaluate(self, batch: PackedVLBatch) -> dict[str, torch.Tensor]:
        """-> ``{'accuracy': [n_questions]}``: the highest-scored choice is the correct one."""
        self.check_batch(batch)
        scores = self.model(batch, compute_loss=False).reshape(-1, self.num_choices)
        right = batch.targets.reshape(-1, self.num_choices).argmax(1)
        return {"accuracy": metrics.accuracy(scores, right), "scores": scores}
