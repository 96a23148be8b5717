"""BachGAN generator: the Background Fusion Module and the SPADE generator with its hallucination head.

State-dict names follow the official code (Cold-Winter/BachGAN on NVlabs/SPADE): ``encode_shared.0`` /
``memory_shared.0`` (fusion), ``fc``, ``head_0``, ``G_middle_0``, ``G_middle_1``, ``up_0`` .. ``up_3``, ``conv_img``,
``conv_seg``; each block ``conv_0`` / ``conv_1`` / ``conv_s`` (spectral norm: ``weight_orig``, ``weight_u``,
``weight_v``) and ``norm_0`` / ``norm_1`` / ``norm_s`` (SPADE: ``param_free_norm`` running statistics,
``mlp_shared.0``, ``mlp_gamma``, ``mlp_beta``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

from ...ops import spade_norm
from .config import BachGANConfig

__all__ = ["SPADE", "BackgroundFusion", "SPADEGenerator", "SPADEResnetBlock", "fuse_backgrounds"]


class SPADE(nn.Module):
    """Parameter-free batch norm of x modulated by the layout: ``x_hat * (1 + gamma(seg)) + beta(seg)``.

    The layout is nearest-resized to x, then conv3x3 (C -> hidden) + ReLU and two conv3x3 (hidden -> ch) give gamma
    and beta; :func:`fastvl.ops.spade_norm` does the normalisation and the modulation in one op. The running
    statistics live in ``param_free_norm`` (a BatchNorm2d without affine, as the official keys), read in eval mode.
    """

    def __init__(self, norm_nc: int, label_nc: int, hidden: int = 128):
        super().__init__()
        self.param_free_norm = nn.BatchNorm2d(norm_nc, affine=False)
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_nc, hidden, 3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(hidden, norm_nc, 3, padding=1)
        self.mlp_beta = nn.Conv2d(hidden, norm_nc, 3, padding=1)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        """x [N, ch, h, w], seg [N, C, H, W] (real-valued layout) -> [N, ch, h, w]."""
        seg = F.interpolate(seg, size=x.shape[2:], mode="nearest")
        actv = self.mlp_shared(seg)
        gamma, beta = self.mlp_gamma(actv), self.mlp_beta(actv)
        bn = self.param_free_norm
        training = self.training or bn.running_mean is None
        if self.training and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
        return spade_norm(x, gamma.to(x.dtype), beta.to(x.dtype), norm="batch", eps=bn.eps,
                          running_mean=bn.running_mean, running_var=bn.running_var, momentum=bn.momentum,
                          training=training)


class SPADEResnetBlock(nn.Module):
    """SPADE ResBlock: (SPADE -> LeakyReLU 0.2 -> conv3x3) twice, plus a learned 1x1 shortcut (no bias, own SPADE)
    when the widths differ; spectral norm on the convs. x [N, fin, h, w] -> [N, fout, h, w]."""

    def __init__(self, fin: int, fout: int, label_nc: int, hidden: int = 128):
        super().__init__()
        self.learned_shortcut = fin != fout
        fmiddle = min(fin, fout)
        self.conv_0 = spectral_norm(nn.Conv2d(fin, fmiddle, 3, padding=1))
        self.conv_1 = spectral_norm(nn.Conv2d(fmiddle, fout, 3, padding=1))
        self.norm_0 = SPADE(fin, label_nc, hidden)
        self.norm_1 = SPADE(fmiddle, label_nc, hidden)
        if self.learned_shortcut:
            self.conv_s = spectral_norm(nn.Conv2d(fin, fout, 1, bias=False))
            self.norm_s = SPADE(fin, label_nc, hidden)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        x_s = self.conv_s(self.norm_s(x, seg)) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, seg), 0.2))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, seg), 0.2))
        return x_s + dx


def fuse_backgrounds(encode_shared: nn.Module, memory_shared: nn.Module, box_map: torch.Tensor,
                     retrieved: torch.Tensor) -> torch.Tensor:
    """The fusion formula: ``e = encode_shared(map)`` for the box map and each retrieved map (one shared module);
    ``m0 = e_box + mean(e_1 .. e_k)``; ``fused = memory_shared(m0) + e_box``.

    box_map [N, C, H, W], retrieved [N, k, C, H, W] (box-pasted one-hot maps) -> fused [N, C, H, W]."""
    n, k, c, h, w = retrieved.shape
    if box_map.shape != (n, c, h, w):
        raise ValueError(f"fuse_backgrounds: 'box_map' must be [N={n}, C={c}, H={h}, W={w}] like 'retrieved' "
                         f"[N, k, C, H, W], got {list(box_map.shape)}")
    both = torch.cat([box_map.unsqueeze(1), retrieved.to(box_map.dtype)], dim=1).reshape(n * (k + 1), c, h, w)
    e = encode_shared(both)
    e = e.reshape(n, k + 1, *e.shape[1:])
    e_box = e[:, 0]
    m0 = e_box + e[:, 1:].mean(dim=1)
    return memory_shared(m0) + e_box


def _fusion_convs(label_nc: int) -> tuple[nn.Sequential, nn.Sequential]:
    return (nn.Sequential(nn.Conv2d(label_nc, label_nc, 3, padding=1), nn.ReLU()),
            nn.Sequential(nn.Conv2d(label_nc, label_nc, 3, padding=1), nn.ReLU()))


class BackgroundFusion(nn.Module):
    """Background Fusion Module: the box map and the k retrieved maps through ONE shared conv3x3 (C -> C) + ReLU;
    ``m0 = e_box + mean(e_1 .. e_k)``, ``m1 = ReLU(conv3x3(m0))``, ``fused = m1 + e_box`` (no spectral norm).

    Inside :class:`SPADEGenerator` the two convs sit on the generator itself (official keys ``encode_shared.0`` and
    ``memory_shared.0``); this module is the same computation standing alone.
    """

    def __init__(self, label_nc: int):
        super().__init__()
        self.encode_shared, self.memory_shared = _fusion_convs(label_nc)

    def forward(self, box_map: torch.Tensor, retrieved: torch.Tensor) -> torch.Tensor:
        """box_map [N, C, H, W], retrieved [N, k, C, H, W] -> fused [N, C, H, W]."""
        return fuse_backgrounds(self.encode_shared, self.memory_shared, box_map, retrieved)


class SPADEGenerator(nn.Module):
    """The BachGAN generator: (fusion) -> SPADE generator -> image (tanh) and hallucinated segmentation (log-softmax).

    The fused map (or, without retrieval, the box map) is nearest-downsampled as the input of ``fc`` and is the
    SPADE input of every block. No noise input.
    """

    def __init__(self, cfg: BachGANConfig):
        super().__init__()
        self.cfg = cfg
        nf, c, hid = cfg.ngf, cfg.label_nc, cfg.spade_hidden
        if cfg.retrieval:
            self.encode_shared, self.memory_shared = _fusion_convs(c)
        self.fc = nn.Conv2d(c, 16 * nf, 3, padding=1)
        self.head_0 = SPADEResnetBlock(16 * nf, 16 * nf, c, hid)
        self.G_middle_0 = SPADEResnetBlock(16 * nf, 16 * nf, c, hid)
        self.G_middle_1 = SPADEResnetBlock(16 * nf, 16 * nf, c, hid)
        self.up_0 = SPADEResnetBlock(16 * nf, 8 * nf, c, hid)
        self.up_1 = SPADEResnetBlock(8 * nf, 4 * nf, c, hid)
        self.up_2 = SPADEResnetBlock(4 * nf, 2 * nf, c, hid)
        self.up_3 = SPADEResnetBlock(2 * nf, nf, c, hid)
        self.conv_img = nn.Conv2d(nf, 3, 3, padding=1)
        self.conv_seg = nn.Conv2d(nf, c, 3, padding=1)

    def layout(self, box_map: torch.Tensor, retrieved: torch.Tensor | None) -> torch.Tensor:
        """The SPADE layout: fused map (retrieval) or the box map itself (ablation). [N, C, H, W]."""
        if not self.cfg.retrieval:
            return box_map
        if retrieved is None:
            raise ValueError("SPADEGenerator: 'retrieved' maps are required (the config has retrieval=True)")
        return fuse_backgrounds(self.encode_shared, self.memory_shared, box_map, retrieved)

    def forward(self, box_map: torch.Tensor, retrieved: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """box_map [N, C, H, W] float; retrieved [N, k, C, H, W] box-pasted maps (None for the ablation).

        Returns (image [N, 3, H, W] in [-1, 1], seg_logp [N, C, H, W] log-probabilities)."""
        cfg = self.cfg
        if box_map.shape[1:] != (cfg.label_nc, cfg.height, cfg.width):
            raise ValueError(f"SPADEGenerator: 'box_map' must be [N, {cfg.label_nc}, {cfg.height}, {cfg.width}], got "
                             f"{list(box_map.shape)}")
        seg = self.layout(box_map, retrieved)
        x = self.fc(F.interpolate(seg, size=cfg.latent_size, mode="nearest"))
        x = self.head_0(x, seg)
        if cfg.num_up >= 5:
            x = _up(x)
        x = self.G_middle_0(x, seg)
        if cfg.num_up >= 6:
            x = _up(x)
        x = self.G_middle_1(x, seg)
        for block in (self.up_0, self.up_1, self.up_2, self.up_3):
            x = block(_up(x), seg)
        x = F.leaky_relu(x, 0.2)
        seg_logp = torch.log_softmax(self.conv_seg(x).float(), dim=1)
        return torch.tanh(self.conv_img(x)), seg_logp


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")
