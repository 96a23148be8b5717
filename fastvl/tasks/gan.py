"""The BachGAN training task: one module, two phases (``discriminator`` then ``generator``) for the Trainer's
two-optimiser step.

Batch: the dict of :func:`fastvl.data.layouts.collate_layouts` (``image`` [N, 3, H, W] in [-1, 1], ``label``
[N, H, W] int64, ``box_mask`` [N, C, H, W] bool, ``index`` [N] int64). Retrieval runs once per batch (the phases of a
step share the batch; the generator input is kept on the batch dict under ``"generator_input"``).

- ``discriminator``: the generator runs without gradient; loss = hinge(fake) + hinge(real), each the mean over the
  D scales.
- ``generator``: D runs with its parameters frozen (no D weight gradients are built: the generator optimizer does
  not step them and the trainer clears them anyway); loss = -mean D(fake) (mean over scales) + feature matching (L1
  on every intermediate D feature, weight lambda_feat / num_D) + lambda_vgg * VGG19 perceptual loss (when a VGG is
  given) + lambda_seg * NLL of the hallucination head against the real label map (with ``seg``; ignore 255).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..models.bachgan import (
    BachGAN,
    GeneratorInput,
    VGGLoss,
    feature_matching_loss,
    hinge_d_loss,
    hinge_g_loss,
    seg_nll_loss,
)

__all__ = ["PHASES", "BachGANTask"]

#: The phases in the order the Trainer's optimizers must step them.
PHASES = ("discriminator", "generator")


class BachGANTask(nn.Module):
    """BachGAN losses over a layout batch (module docstring). ``vgg``: a :class:`VGGLoss` or None (no perceptual
    term); it is held outside the module tree, so its frozen weights never enter checkpoints or optimizers."""

    def __init__(self, model: BachGAN, vgg: VGGLoss | None = None, seg: bool = False, lambda_feat: float = 10.0,
                 lambda_vgg: float = 10.0, lambda_seg: float = 1.0):
        super().__init__()
        self.model = model
        self._vgg = (vgg,)  # a tuple: not a registered sub-module
        self.seg, self.lambda_feat, self.lambda_vgg, self.lambda_seg = seg, lambda_feat, lambda_vgg, lambda_seg

    @property
    def vgg(self) -> VGGLoss | None:
        return self._vgg[0]

    def generator_input(self, batch: dict[str, Any]) -> GeneratorInput:
        """Retrieval + pasting for ``batch`` (computed once per batch, kept on the batch dict)."""
        cached = batch.get("generator_input")
        if cached is not None:
            return cached
        device = self.model.generator.fc.weight.device
        index = batch.get("index") if self.training else None
        inp = self.model.generator_input(batch["box_mask"].to(device), None if index is None else index.to(device))
        batch["generator_input"] = inp
        return inp

    def forward(self, batch: dict[str, Any], phase: str = "generator") -> dict[str, Any]:
        """Returns dict(loss, logs, count=N) for ``phase`` 'discriminator' or 'generator'."""
        if phase not in PHASES:
            raise ValueError(f"BachGANTask: unknown phase {phase!r}; phases are {PHASES}")
        device = self.model.generator.fc.weight.device
        real = batch["image"].to(device)
        inp = self.generator_input(batch)
        n = real.shape[0]
        if phase == "discriminator":
            with torch.no_grad():
                fake, _ = self.model.generate(inp)
            pred_fake, pred_real = self.model.discriminate(inp.box_map, fake.detach(), real)
            d_fake, d_real = hinge_d_loss(pred_fake, pred_real)
            loss = d_fake + d_real
            return {"loss": loss, "count": n, "logs": {"d_fake": d_fake.detach(), "d_real": d_real.detach()}}
        fake, seg_logp = self.model.generate(inp)
        with _frozen(self.model.discriminator):  # gradients flow through D to G; D's own are not needed here
            pred_fake, pred_real = self.model.discriminate(inp.box_map, fake, real)
        g_gan = hinge_g_loss(pred_fake)
        g_feat = feature_matching_loss(pred_fake, pred_real, self.lambda_feat)
        loss = g_gan + g_feat
        logs = {"g_gan": g_gan.detach(), "g_feat": g_feat.detach()}
        if self.vgg is not None:
            vgg = self.vgg.to(device)
            g_vgg = vgg(fake, real) * self.lambda_vgg
            loss = loss + g_vgg
            logs["g_vgg"] = g_vgg.detach()
        if self.seg:
            g_seg = seg_nll_loss(seg_logp, batch["label"].to(device), self.model.cfg.ignore_index) * self.lambda_seg
            loss = loss + g_seg
            logs["g_seg"] = g_seg.detach()
        return {"loss": loss, "count": n, "logs": logs}


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """``module``'s parameters do not require gradients inside the block (the autograd graph built there holds no
    weight-gradient nodes); their flags are restored afterwards."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
