"""BachGAN discriminator: multi-scale PatchGAN on box map ++ RGB (SPADE's ``spectralinstance`` discriminator).

State-dict names follow the official code: ``discriminator_<i>.model<j>``; the first layer is a plain conv, the
next ones spectral-norm conv + InstanceNorm (``model<j>.0.0.weight_orig``), then LeakyReLU 0.2; the last is a plain
4x4 conv to one channel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

from .config import BachGANConfig

__all__ = ["MultiscaleDiscriminator", "NLayerDiscriminator"]


class NLayerDiscriminator(nn.Module):
    """PatchGAN: kernel 4, padding 2, channels ndf, 2 ndf, 4 ndf, 8 ndf (capped at 512), strides 2, 2, 2, 1, then a
    4x4 conv to 1 channel. ``forward`` returns every layer's output (the intermediate features, then the logits)."""

    def __init__(self, input_nc: int, ndf: int = 64, n_layers: int = 4):
        super().__init__()
        kw, pad = 4, int(math.ceil((4 - 1.0) / 2))
        nf = ndf
        seqs: list[nn.Sequential] = [nn.Sequential(nn.Conv2d(input_nc, nf, kw, stride=2, padding=pad),
                                                   nn.LeakyReLU(0.2, False))]
        for n in range(1, n_layers):
            nf_prev, nf = nf, min(nf * 2, 512)
            stride = 1 if n == n_layers - 1 else 2
            conv = spectral_norm(nn.Conv2d(nf_prev, nf, kw, stride=stride, padding=pad))
            seqs.append(nn.Sequential(nn.Sequential(conv, nn.InstanceNorm2d(nf, affine=False)),
                                      nn.LeakyReLU(0.2, False)))
        seqs.append(nn.Sequential(nn.Conv2d(nf, 1, kw, stride=1, padding=pad)))
        for j, s in enumerate(seqs):
            self.add_module(f"model{j}", s)
        self.num_layers = len(seqs)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x [N, input_nc, H, W] -> [feature_1, ..., feature_n_layers, logits [N, 1, h, w]]."""
        outs = []
        for j in range(self.num_layers):
            x = getattr(self, f"model{j}")(x)
            outs.append(x)
        return outs


class MultiscaleDiscriminator(nn.Module):
    """``num_d`` PatchGANs; scale i sees the input average-pooled (3x3, stride 2, padding 1) i times.

    Input: the box map [N, C, H, W] ++ the RGB image [N, 3, H, W] (never the retrieved or fused maps)."""

    def __init__(self, cfg: BachGANConfig):
        super().__init__()
        self.cfg = cfg
        for i in range(cfg.num_d):
            self.add_module(f"discriminator_{i}", NLayerDiscriminator(cfg.label_nc + 3, cfg.ndf, cfg.n_layers_d))

    def forward(self, box_map: torch.Tensor, image: torch.Tensor) -> list[list[torch.Tensor]]:
        """box_map [N, C, H, W], image [N, 3, H, W] -> per scale the list of layer outputs (logits last)."""
        x = torch.cat([box_map.to(image.dtype), image], dim=1)
        result = []
        for i in range(self.cfg.num_d):
            result.append(getattr(self, f"discriminator_{i}")(x))
            if i + 1 < self.cfg.num_d:
                x = F.avg_pool2d(x, kernel_size=3, stride=2, padding=1, count_include_pad=False)
        return result
