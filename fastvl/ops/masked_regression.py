"""Fused linear layer + feature regression: UNITER's MRFR and HERO's MFFR.

The prediction is ``pred = hidden[indices] @ weight_t + bias`` with ``weight_t`` of shape [H, D]. UNITER ties
the MRFR output layer to the image embedding: ``img_linear = nn.Linear(D_img, H)`` stores ``weight`` as
[H, D_img] = [768, 2048], and MRFR computes ``F.linear(h, img_linear.weight.t(), bias)``, i.e.
``h @ img_linear.weight + bias``: pass ``weight_t = img_linear.weight`` itself (no transpose, no copy). For an
untied ``nn.Linear(H, D)`` head pass ``weight_t = head.weight.t()`` (a view).

Losses (``loss=``):
- ``'mse'`` (UNITER MRFR): per element ``(pred - target)^2``; ``reduction='none'`` gives [N, D] (as
  ``F.mse_loss(..., reduction='none')``), ``'sum'``, ``'mean'`` = sum / (N D): the official MRFR loss
  ``mse_loss(pred, feat, reduction='none').mean()``.
- ``'l2'`` (HERO MFFR): per row the Euclidean distance ``||pred - target||_2``; ``'none'`` gives [N],
  ``'sum'``, ``'mean'`` = sum / N: HERO's ``sqrt(mse_loss(..., 'none').sum(1)).mean()``. Where a distance is
  exactly 0 its gradient is taken as 0 (PyTorch's ``sqrt`` would give NaN there).

The loss is float32 whatever the input dtype (the product in the input dtype, the loss in float32); an empty
batch gives 0, never NaN. Backends: ``triton`` (GPU), ``torch_chunked`` (CPU default), ``reference``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels.scale_modes import SCALE_PER_ROW
from . import _chunked as C
from ._register import LINEAR_DOCS, linear_loss, register_fused_loss

__all__ = ["fused_masked_regression", "masked_regression_reference"]

_OP = "fused_masked_regression"
REDUCTIONS = ("none", "sum", "mean")
LOSSES = ("mse", "l2")


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


# ----------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------


def masked_regression_reference(hidden: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None,
                                targets: torch.Tensor, reduction: str = "mean", loss: str = "mse",
                                indices: torch.Tensor | None = None) -> torch.Tensor:
    """Eager PyTorch, as UNITER MRFR (``loss='mse'``) and HERO MFFR (``loss='l2'``) compute it.

    Args:
        hidden: [N_all, H]; indices: [N] rows or None; weight_t: [H, D]; bias: [D] or None;
        targets: [N, D] regression targets (any float dtype).
    Returns:
        ``'none'``: [N, D] (mse) or [N] (l2); else a scalar (0 for an empty batch).
    """
    h = hidden if indices is None else hidden.index_select(0, indices)
    pred = _upcast(F.linear(h, weight_t.t(), bias))
    tgt = targets.to(pred.dtype)
    if loss == "mse":
        if reduction == "mean" and pred.numel() == 0:
            return F.mse_loss(pred, tgt, reduction="sum")
        return F.mse_loss(pred, tgt, reduction=reduction)
    dist = (pred - tgt).pow(2).sum(1).sqrt()
    if reduction == "none":
        return dist
    return dist.sum() if reduction == "sum" or dist.numel() == 0 else dist.mean()


# ----------------------------------------------------------------------------------------------------------
# Row steps
# ----------------------------------------------------------------------------------------------------------


def _torch_step(pred, data, loss, scale, mode, compute, *, elementwise: bool, loss_kind: str) -> None:
    l2 = loss_kind == "l2"
    x = _upcast(pred)
    diff = x - data[0].to(x.dtype)
    sq = diff * diff
    if l2:
        dist = sq.sum(1).sqrt_()
        loss.copy_(dist)
    else:
        loss.copy_(sq if elementwise else sq.sum(1))
    if not compute:
        return
    if l2:
        inv = torch.where(dist > 0, 1.0 / dist, 0.0)
        g = diff.mul_((inv * scale).unsqueeze(1))
    else:
        g = diff.mul_(2.0 * (scale.unsqueeze(1) if mode == SCALE_PER_ROW else scale))
    pred.copy_(g)


def _triton_step(pred, data, loss, scale, mode, compute, *, elementwise: bool, loss_kind: str) -> None:
    from ..kernels.triton.masked_regression import regression_rows

    regression_rows(pred, data[0], loss, scale, mode, compute, loss_kind == "l2", elementwise)


_STEPS = {"torch_chunked": _torch_step, "triton": _triton_step}

# ----------------------------------------------------------------------------------------------------------
# Backends and the custom op
# ----------------------------------------------------------------------------------------------------------


def _factor(reduction: str, targets: torch.Tensor, features: int, loss_kind: str) -> float:
    """'mean' averages over rows (l2) or elements (mse)."""
    n = targets.shape[0]
    return 1.0 / max(n if loss_kind == "l2" else n * features, 1) if reduction == "mean" else 1.0


MASKED_REGRESSION, _regression_op = register_fused_loss(linear_loss(
    "masked_regression", "fused linear + feature regression (MRFR mse, MFFR l2)", "targets", _STEPS, _factor,
    options="str loss_kind", per_element=lambda loss_kind: loss_kind != "l2", weight="weight_t", transposed=True,
    backend_docs=("eager PyTorch: all predictions materialised", "row-chunked PyTorch, gradients in the forward",
                  LINEAR_DOCS[2])))

# ----------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------


def fused_masked_regression(hidden: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None,
                            targets: torch.Tensor, reduction: str = "mean", loss: str = "mse", *,
                            indices: torch.Tensor | None = None, validate: bool | None = None,
                            chunk_rows: int | None = None, backend: str | None = None) -> torch.Tensor:
    """Regression loss of ``hidden @ weight_t + bias`` against ``targets`` (module docstring).

    Args:
        hidden: [N_all, H] float; with ``indices`` only ``hidden[indices]`` is used.
        weight_t: [H, D], same dtype as hidden (UNITER: ``img_linear.weight`` as stored, tied).
        bias: [D] or None.
        targets: [N, D] float (any float dtype; read as float32): the raw region / frame features.
        reduction: ``'none'``, ``'sum'``, ``'mean'`` (see module docstring for each ``loss``).
        loss: ``'mse'`` (UNITER MRFR) or ``'l2'`` (HERO MFFR).
        indices: [N] int rows of ``hidden`` or None. validate: check index values (CPU default: yes).
        chunk_rows: rows per chunk (default from a memory budget). backend: force a backend.
    Returns:
        float32 loss, differentiable w.r.t. hidden, weight_t and bias (not targets).
    """
    hidden, weight_t, bias = C.autocast_inputs(hidden, weight_t, bias)
    if loss not in LOSSES:
        raise ValueError(f"fastvl.ops.{_OP}: argument 'loss' must be one of {list(LOSSES)}, got {loss!r}")
    n, D_out, _ = C.check_linear_args(_OP, hidden, weight_t, bias, indices, weight_name="weight_t", transposed=True)
    C.check_tensor(_OP, "targets", targets, 2, f"2-d [N, {D_out}]", floating=True, device=hidden.device)
    C.check_rows(_OP, "targets", targets, n, "rows (indices)" if indices is not None else "rows in 'hidden'")
    if targets.shape[1] != D_out:
        raise ValueError(f"fastvl.ops.{_OP}: argument 'targets' has {targets.shape[1]} features but 'weight_t' "
                         f"predicts {D_out}")
    C.check_reduction(_OP, reduction, REDUCTIONS)
    C.check_chunk_rows(_OP, chunk_rows)
    if C.should_validate(validate, hidden):
        C.validate_indices(_OP, indices, hidden.shape[0])
    name = C.select_backend(MASKED_REGRESSION, (hidden, weight_t, bias, targets, indices), n, D_out, backend)
    if name == "reference":
        return masked_regression_reference(hidden, weight_t, bias, targets, reduction, loss, indices)
    rows = chunk_rows or C.default_chunk_rows(n, D_out, hidden.dtype, hidden.device, name)
    mask = C.grad_mask(hidden, weight_t, bias) if reduction != "none" else 0
    mask |= C.defer_mode(mask, reduction, n, D_out, hidden.shape[1], rows)
    return _regression_op(hidden, weight_t, bias, targets.detach(), indices, None, reduction, mask, int(rows), name,
                          loss)[0]


def _example(device: str, dtype: torch.dtype) -> tuple[tuple, dict]:
    """UNITER-base MRFR: 1536 masked regions, hidden 768, 2048-d features."""
    hidden = torch.empty(1536, 768, device=device, dtype=dtype)
    weight_t = torch.empty(768, 2048, device=device, dtype=dtype)
    return (hidden, weight_t, torch.empty(2048, device=device, dtype=dtype),
            torch.empty(1536, 2048, device=device, dtype=dtype), None), {}


MASKED_REGRESSION.example = _example
