"""The BachGAN model: generator (with the fusion module), discriminator and the retrieval memory in one module.

Optimizers select ``generator.*`` and ``discriminator.*``; ``memory`` holds buffers only (the bank and the
foreground set), so a checkpoint of this module is everything ``synthesize`` needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import init

from .config import BachGANConfig
from .discriminator import MultiscaleDiscriminator
from .generator import SPADEGenerator
from .retrieval import BackgroundMemory, paste_boxes

__all__ = ["BachGAN", "GeneratorInput", "init_weights"]


@dataclass
class GeneratorInput:
    """What the generator reads for one batch.

    box_map: [N, C, H, W] float box masks. retrieved: [N, k, C, H, W] box-pasted retrieved maps (None without
    retrieval). retrieved_maps: [N, k, H, W] int64 raw retrieved class maps (None without retrieval)."""

    box_map: torch.Tensor
    retrieved: torch.Tensor | None = None
    retrieved_maps: torch.Tensor | None = None


def init_weights(module: nn.Module, gain: float = 0.02) -> None:
    """Xavier-normal (gain) on every conv / linear weight (spectral norm's ``weight_orig``), zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            weight = getattr(m, "weight_orig", None)
            init.xavier_normal_(weight if weight is not None else m.weight, gain=gain)
            if m.bias is not None:
                init.zeros_(m.bias)


class BachGAN(nn.Module):
    """BachGAN (Li et al., CVPR 2020): boxes -> retrieved backgrounds -> fused layout -> SPADE image.

    ``cfg.retrieval=False`` builds the no-retrieval ablation (SPADE on the box map; no fusion, no memory).
    """

    def __init__(self, cfg: BachGANConfig):
        super().__init__()
        self.cfg = cfg
        self.generator = SPADEGenerator(cfg)
        self.discriminator = MultiscaleDiscriminator(cfg)
        if cfg.retrieval:
            self.memory = BackgroundMemory(cfg)
        init_weights(self, cfg.init_gain)
        if cfg.retrieval and cfg.fusion_init == "identity":
            for seq in (self.generator.encode_shared, self.generator.memory_shared):
                init.dirac_(seq[0].weight)
                init.zeros_(seq[0].bias)

    def generator_input(self, box_mask: torch.Tensor, index: torch.Tensor | None = None) -> GeneratorInput:
        """Retrieve (excluding the queries' own maps ``index`` [N], or None) and paste. box_mask [N, C, H, W] bool."""
        cfg = self.cfg
        if box_mask.dim() != 4 or box_mask.shape[1:] != (cfg.label_nc, cfg.height, cfg.width):
            raise ValueError(f"BachGAN: 'box_mask' must be [N, {cfg.label_nc}, {cfg.height}, {cfg.width}], got "
                             f"{list(box_mask.shape)}")
        box_map = box_mask.to(torch.float32)
        if not cfg.retrieval:
            return GeneratorInput(box_map)
        maps, _ = self.memory.retrieve(box_mask, index)
        pasted = paste_boxes(maps, box_mask.bool(), self.memory.foreground, cfg.ignore_index)
        return GeneratorInput(box_map, pasted, maps)

    def generate(self, inp: GeneratorInput) -> tuple[torch.Tensor, torch.Tensor]:
        """(image [N, 3, H, W] in [-1, 1], seg_logp [N, C, H, W]) for a :class:`GeneratorInput`."""
        return self.generator(inp.box_map, inp.retrieved)

    def discriminate(self, box_map: torch.Tensor, fake: torch.Tensor, real: torch.Tensor | None = None
                     ) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]] | None]:
        """Discriminator outputs for fake (and real) images in one pass (fake and real concatenated on the batch).

        Returns (per scale the layer outputs for fake, the same for real or None)."""
        if real is None:
            return self.discriminator(box_map, fake), None
        n = fake.shape[0]
        out = self.discriminator(torch.cat([box_map, box_map]), torch.cat([fake, real.to(fake.dtype)]))
        fake_out = [[t[:n] for t in scale] for scale in out]
        real_out = [[t[n:] for t in scale] for scale in out]
        return fake_out, real_out

    @torch.no_grad()
    def synthesize(self, box_mask: torch.Tensor) -> tuple[torch.Tensor, GeneratorInput]:
        """Images for user box layouts in eval mode (running statistics). box_mask [N, C, H, W] bool ->
        (image [N, 3, H, W] in [-1, 1], the generator input)."""
        was = self.training
        self.eval()
        try:
            inp = self.generator_input(box_mask.to(self.generator.fc.weight.device))
            image, _ = self.generate(inp)
        finally:
            self.train(was)
        return image, inp

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters of the generator and the discriminator."""
        return {name: sum(p.numel() for p in getattr(self, name).parameters() if p.requires_grad)
                for name in ("generator", "discriminator")}
