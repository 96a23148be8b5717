"""BachGAN losses (SPADE's): hinge GAN, discriminator feature matching, VGG19 perceptual loss, hallucination NLL.

The discriminator outputs are SPADE's: a list over scales of lists of layer outputs, the logits last.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["VGG19_LAYERS", "VGG_WEIGHTS", "VGG19Features", "VGGLoss", "feature_matching_loss", "hinge_d_loss",
           "hinge_g_loss", "load_vgg19", "seg_nll_loss",
           "vgg_loss_or_none"]


def hinge_d_loss(pred_fake: list[list[torch.Tensor]], pred_real: list[list[torch.Tensor]]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Discriminator hinge terms, each the mean over scales of the patch mean:
    ``fake = mean_s mean(relu(1 + D_s(fake)))``, ``real = mean_s mean(relu(1 - D_s(real)))``. Returns (fake, real)."""
    fake = torch.stack([F.relu(1 + s[-1].float()).mean() for s in pred_fake]).mean()
    real = torch.stack([F.relu(1 - s[-1].float()).mean() for s in pred_real]).mean()
    return fake, real


def hinge_g_loss(pred_fake: list[list[torch.Tensor]]) -> torch.Tensor:
    """Generator hinge term: ``mean_s (-mean(D_s(fake)))``."""
    return torch.stack([-s[-1].float().mean() for s in pred_fake]).mean()


def feature_matching_loss(pred_fake: list[list[torch.Tensor]], pred_real: list[list[torch.Tensor]],
                          weight: float = 10.0) -> torch.Tensor:
    """``sum_s sum_j L1(fake_s_j, real_s_j.detach()) * weight / num_D`` over the intermediate features (the logits
    excluded)."""
    num_d = len(pred_fake)
    total = pred_fake[0][0].new_zeros((), dtype=torch.float32)
    for fs, rs in zip(pred_fake, pred_real, strict=True):
        for f, r in zip(fs[:-1], rs[:-1], strict=True):
            total = total + F.l1_loss(f.float(), r.detach().float()) * (weight / num_d)
    return total


def seg_nll_loss(seg_logp: torch.Tensor, label: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """NLL of the hallucination head: seg_logp [N, C, H, W] log-probabilities, label [N, H, W] int64."""
    return F.nll_loss(seg_logp.float(), label.long(), ignore_index=ignore_index)


# ---------------------------------------------------------------------------------------------------------------
# VGG19 perceptual loss
# ---------------------------------------------------------------------------------------------------------------
#: torchvision's ``vgg19().features`` layout: conv widths, "M" = max-pool.
VGG19_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
#: Feature slices ending at relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 (indices into ``features``) and weights.
VGG_SLICES = (2, 7, 12, 21, 30)
VGG_WEIGHTS = (1.0 / 32, 1.0 / 16, 1.0 / 8, 1.0 / 4, 1.0)


class VGG19Features(nn.Module):
    """``features`` with torchvision's module indices (conv at 0, 2, 5, ...; ReLU after each conv; max-pools), so
    a torchvision VGG19 state_dict (``features.<i>.weight``) loads. Frozen. Returns relu1_1 .. relu5_1."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in VGG19_LAYERS:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=False)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs, start = [], 0
        for end in VGG_SLICES:
            for i in range(start, end):
                x = self.features[i](x)
            outs.append(x)
            start = end
        return outs


def load_vgg19(path: str | Path) -> VGG19Features:
    """VGG19 features from a torchvision-layout state_dict file (``.pth`` / ``.pt`` read with weights_only, or
    ``.safetensors``); the classifier's keys are ignored. Raises FileNotFoundError / ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "no such VGG19 weights file", str(path))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"VGG19 weights {path}: expected a state_dict, got {type(state).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k.startswith("features.")}
    net = VGG19Features()
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"VGG19 weights {path} do not have torchvision's vgg19 'features' layout: "
                         f"{' '.join(str(e).split())[-300:]}") from None
    if missing or unexpected:
        raise ValueError(f"VGG19 weights {path} do not have torchvision's vgg19 'features' layout: missing "
                         f"{missing[:4]}, unexpected {unexpected[:4]}")
    return net.eval()


class VGGLoss(nn.Module):
    """SPADE's perceptual loss: ``sum_i w_i L1(vgg_i(fake), vgg_i(real).detach())`` over relu1_1 .. relu5_1 with
    weights 1/32, 1/16, 1/8, 1/4, 1 (the caller multiplies by lambda_vgg, 10). Images in [-1, 1] go in as they are,
    as the official code does."""

    def __init__(self, vgg: VGG19Features):
        super().__init__()
        self.vgg = vgg

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        xf = self.vgg(fake)
        with torch.no_grad():
            xr = self.vgg(real.to(fake.dtype))
        return sum(w * F.l1_loss(a.float(), b.float()) for w, a, b in zip(VGG_WEIGHTS, xf, xr, strict=True))


def vgg_loss_or_none(path: str | Path | None, log=print) -> VGGLoss | None:
    """A :class:`VGGLoss` from ``path``; None (said once through ``log``) when no file is given."""
    if path is None:
        log("BachGAN: no VGG19 weights given (--vgg FILE, torchvision's vgg19 layout): training without the "
            "perceptual loss")
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return VGGLoss(load_vgg19(path))
