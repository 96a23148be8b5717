"""Referring expressions: pick the region a phrase names (region cross-entropy or ranking; accuracy at IoU >= 0.5).

``batch.targets`` [B] long region index (< the example's region count). The VILLA view compares the region
scores [B, max regions] (padded / masked regions at -1e4: probability 0, zero gradient).
"""

from __future__ import annotations

import torch

from ..batch import PackedVLBatch
from . import metrics
from .base import FinetuneTask

__all__ = ["RETask"]


class RETask(FinetuneTask):
    """Referring expressions with UniterForReferringExpressionComprehension (loss 'cls' or 'rank')."""

    name = "re"

    def check_batch(self, batch: PackedVLBatch) -> None:
        super().check_batch(batch)
        t = batch.targets
        if t.dim() != 1 or t.shape[0] != batch.batch_size:
            raise ValueError(f"fastvl.tasks.RETask: targets must have shape [{batch.batch_size}], got "
                             f"{list(t.shape)}")
        if t.device.type == "cpu":
            nbb = torch.tensor(batch.img_lens)
            bad = (t < 0) | (t >= nbb)
            if bool(bad.any()):
                i = int(bad.nonzero()[0])
                raise ValueError(f"fastvl.tasks.RETask: example {i} targets region {int(t[i])} but has "
                                 f"{batch.img_lens[i]} regions")

    def adv_loss(self, h, layout, batch):
        """Consistency scores: the region scores [B, max regions], padded / masked regions at -1e4 (probability 0,
        zero gradient in :func:`fastvl.ops.symmetric_kl`)."""
        loss = self.model.head(h, layout, targets=batch.targets, compute_loss=True, reduction="mean",
                               batch=batch)
        return loss, self.model.region_scores(h, layout, batch.obj_masks)

    @torch.no_grad()
    def evaluate(self, batch: PackedVLBatch) -> dict[str, torch.Tensor]:
        """-> ``{'accuracy': [B]}``: IoU >= 0.5 between the top-scored region's box and the ground-truth box when
        ``boxes`` (packed [T_img, 4] region boxes) and ``gt_boxes`` [B, 4] are given (with
        optional ``image_sizes`` [B, 2]); else whether the top region is the target."""
        self.check_batch(batch)
        scores = self.model(batch, compute_loss=False)
        pred = scores.argmax(1)
        if batch.boxes is None or batch.gt_boxes is None:
            return {"accuracy": (pred == batch.targets).float(), "pred": pred}
        cu = batch.cu_seqlens("img").long()
        pred_boxes = batch.boxes[cu[:-1] + pred]
        acc = metrics.re_accuracy(pred_boxes, batch.gt_boxes, batch.image_sizes)
        return {"accuracy": acc, "pred": pred}
