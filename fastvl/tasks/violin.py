"""The VIOLIN baseline's task: each clip with its entailed and its contradicted statement; loss
``-log p(pos) - log(1 - p(neg))`` (mean over clips, as the official ``main.py``); accuracy over both statements."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..models.violin import violin_loss

__all__ = ["ViolinBaselineTask"]


class ViolinBaselineTask(nn.Module):
    """``model``: a :class:`fastvl.models.violin.ViolinBaseline`; batches: its padded batch dicts."""

    name = "violin"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any]) -> dict:
        if not isinstance(batch, dict):
            raise TypeError(f"fastvl.tasks.ViolinBaselineTask: 'batch' must be a dict, got {type(batch).__name__}")
        z_pos, z_neg = self.model(batch, "pos"), self.model(batch, "neg")
        loss = violin_loss(z_pos, z_neg)
        return dict(loss=loss, logs={"violin_loss": loss.detach()}, count=int(z_pos.shape[0]))

    @torch.no_grad()
    def evaluate(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """{'accuracy': [2B]: p(pos) >= 0.5 for every clip, then p(neg) < 0.5 (official threshold 0.5)}."""
        z_pos, z_neg = self.model(batch, "pos"), self.model(batch, "neg")
        return {"accuracy": torch.cat([(z_pos >= 0).float(), (z_neg < 0).float()])}
