"""NLVR2: a statement about two images, true or false (mean cross-entropy, accuracy) with any of the three heads.

Paired / PairedAttn encode 2 sequences per example (left image type 1, right type 2), Triplet one;
``batch.targets`` [n] long. The VILLA view is the generic fine-tuning view (KL on the [n, 2] scores).
"""

from __future__ import annotations

import torch

from ..batch import PackedVLBatch
from . import metrics
from .base import FinetuneTask

__all__ = ["NLVR2Task"]


class NLVR2Task(FinetuneTask):
    """NLVR2 with any of the Paired / Triplet / PairedAttn models (count = statements)."""

    name = "nlvr2"

    def count(self, batch: PackedVLBatch) -> int:
        return int(batch.targets.shape[0])

    @torch.no_grad()
    def evaluate(self, batch: PackedVLBatch) -> dict[str, torch.Tensor]:
        self.check_batch(batch)
        return {"accuracy": metrics.accuracy(self.model(batch, compute_loss=False), batch.targets)}
