"""UNITER pre-training heads and their losses: one small function per task, on masked rows only.

Each ``*_loss`` function takes the head and the hidden states of the selected rows (not logits) so that a fused
kernel (gather + head + output projection + loss in one pass) can replace the body without changing callers.
``reduction``: ``'none'`` gives the official per-element losses, ``'mean'`` the official training reduction
(the mean of those elements; an empty selection gives 0, not NaN), ``'sum'`` their sum.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ...nn.bert import LAYER_NORM_EPS, BertOnlyMLMHead
from ...ops import optimal_transport_dist_packed
from ...ops.linear_cross_entropy import fused_linear_cross_entropy
from ...ops.linear_kl import fused_linear_kl
from ...ops.masked_regression import fused_masked_regression

__all__ = [
    "RegionClassification",
    "RegionFeatureRegression",
    "itm_loss",
    "mlm_loss",
    "mrc_kl_loss",
    "mrc_loss",
    "mrc_targets",
    "mrfr_loss",
    "wra_distance",
    "wra_loss",
]

REDUCTIONS = ("none", "mean", "sum")


class RegionFeatureRegression(nn.Module):
    """MRFR head: Linear(H, H) -> GELU -> LayerNorm, then ``h @ img_linear.weight + bias`` (weight TIED, transposed).

    Args:
        img_linear_weight: the image embedding's ``img_linear.weight`` Parameter [H, img_dim] (shared).
    """

    def __init__(self, hidden_size: int, feat_dim: int, img_linear_weight: nn.Parameter):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(),
                                 nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS))
        self.weight = img_linear_weight
        self.bias = nn.Parameter(torch.zeros(feat_dim))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, H] -> predicted raw features [n, img_dim]."""
        return F.linear(self.net(hidden), self.weight.t(), self.bias)


class RegionClassification(nn.Module):
    """MRC head: Linear(H, H) -> GELU -> LayerNorm -> Linear(H, label_dim) (keys ``net.0``, ``net.2``, ``net.3``)."""

    def __init__(self, hidden_size: int, label_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(),
                                 nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS), nn.Linear(hidden_size, label_dim))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, H] -> class logits [n, label_dim]."""
        return self.net(hidden)


def _reduce(per_elem: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_elem
    if reduction == "sum":
        return per_elem.sum()
    if reduction == "mean":
        return per_elem.sum() / max(per_elem.numel(), 1)
    raise ValueError(f"fastvl: argument 'reduction' must be one of {REDUCTIONS}, got {reduction!r}")


def mlm_loss(head: BertOnlyMLMHead, hidden: torch.Tensor, labels: torch.Tensor, reduction: str = "none"
             ) -> torch.Tensor:
    """Masked language modelling. hidden [n, H] of the masked tokens, labels [n] long -> CE [n] (or reduced).

    ``reduction='mean'`` (the training loss) runs the fused linear-cross-entropy over the tied decoder: the
    [n, vocab] logits are never materialised whole."""
    if reduction == "mean" and isinstance(head, BertOnlyMLMHead):
        pred = head.predictions
        return fused_linear_cross_entropy(pred.transform(hidden), pred.decoder.weight, pred.bias, labels,
                                          ignore_index=-1, reduction="mean")
    return _reduce(F.cross_entropy(head(hidden).float(), labels, reduction="none"), reduction)


def mrfr_loss(head: RegionFeatureRegression, hidden: torch.Tensor, targets: torch.Tensor, reduction: str = "none"
              ) -> torch.Tensor:
    """Masked region feature regression. hidden [n, H], targets [n, img_dim] -> squared error [n, img_dim]."""
    if reduction == "mean" and isinstance(head, RegionFeatureRegression):
        # fused: h @ img_linear.weight + bias and the MSE in one pass
        return fused_masked_regression(head.net(hidden), head.weight, head.bias, targets, reduction="mean", loss="mse")
    pred = head(hidden)
    return _reduce(F.mse_loss(pred.float(), targets.float(), reduction="none"), reduction)


def mrc_targets(soft_labels: torch.Tensor) -> torch.Tensor:
    """Hard MRC targets from detector distributions [n, C]: argmax over classes 1.. (background 0 excluded)."""
    return soft_labels[:, 1:].argmax(dim=-1) + 1


def mrc_loss(head: RegionClassification, hidden: torch.Tensor, soft_labels: torch.Tensor, reduction: str = "none"
             ) -> torch.Tensor:
    """Masked region classification (hard label). hidden [n, H], soft_labels [n, C] -> CE [n], ignore_index 0."""
    if reduction == "mean" and isinstance(head, RegionClassification):
        # targets are never 0 (argmax over classes 1..), so both means divide by n
        out = head.net[3]
        return fused_linear_cross_entropy(head.net[:3](hidden), out.weight, out.bias, mrc_targets(soft_labels),
                                          ignore_index=0, reduction="mean")
    logits = head(hidden).float()
    return _reduce(F.cross_entropy(logits, mrc_targets(soft_labels), ignore_index=0, reduction="none"), reduction)


def mrc_kl_loss(head: RegionClassification, hidden: torch.Tensor, soft_labels: torch.Tensor, reduction: str = "none"
                ) -> torch.Tensor:
    """MRC with KL to the detector distribution. -> kl_div terms [n, C]; 'mean' is the element mean (official)."""
    if reduction == "mean" and isinstance(head, RegionClassification):
        out = head.net[3]
        return fused_linear_kl(head.net[:3](hidden), out.weight, out.bias, soft_labels, reduction="elementwise_mean")
    log_probs = F.log_softmax(head(hidden).float(), dim=-1)
    return _reduce(F.kl_div(log_probs, soft_labels.float(), reduction="none"), reduction)


def itm_loss(head: nn.Linear, pooled: torch.Tensor, targets: torch.Tensor, reduction: str = "none") -> torch.Tensor:
    """Image-text matching. pooled [B, H], targets [B] long (1 = match) -> CE [B] (or reduced)."""
    if reduction == "mean" and isinstance(head, nn.Linear):
        return fused_linear_cross_entropy(pooled, head.weight, head.bias, targets, reduction="mean")
    return _reduce(F.cross_entropy(head(pooled).float(), targets, reduction="none"), reduction)


def wra_distance(txt_emb: torch.Tensor, img_emb: torch.Tensor, cu_txt: torch.Tensor, cu_img: torch.Tensor,
                 max_txt: int, max_img: int) -> torch.Tensor:
    """Word-region alignment OT distance per example, computed in float32 (as official).

    Args:
        txt_emb: [T_txt, H] encoder outputs of all text tokens. img_emb: [T_img, H] of all regions.
        cu_txt, cu_img: [B+1] int32. max_txt, max_img: Python ints.
    Returns:
        [B] float32 distances trace(C @ T), T detached.
    """
    return optimal_transport_dist_packed(txt_emb.float(), img_emb.float(), cu_txt, cu_img, max_txt, max_img)


def wra_loss(ot_dist: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(sum of positive-pair distances - sum of negative-pair distances) / (n_pos + n_neg). ot_dist, targets: [B]."""
    sign = targets.to(ot_dist.dtype) * 2 - 1
    return (ot_dist * sign).sum() / max(ot_dist.numel(), 1)
