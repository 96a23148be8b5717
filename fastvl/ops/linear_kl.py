"""Fused linear layer + KL divergence to soft targets: UNITER's MRC-kl.

``loss = F.kl_div(log_softmax(hidden[indices] @ weight.T + bias), soft_targets, reduction)``: per element
``p * (log p - log q)`` with ``0 log 0 = 0`` (``F.kl_div``'s ``xlogy``), computed chunk by chunk with the
gradients of hidden, weight and bias in the same pass (see :mod:`fastvl.ops._chunked`). The official MRC-kl
loss is ``kl_div(..., reduction='none').mean()``: the element mean over N x V, our default
``'elementwise_mean'`` (``'mean'`` is the same).

Soft targets need not sum to 1: the loss and gradient (``dloss/dlogit_k = softmax_k * sum(p) - p_k``) are those
of ``F.kl_div`` for any non-negative targets. The detector's soft labels are stored in float16 and sum to 1 only
to ~1e-3, so rows whose sum is off by more than :data:`SUM_TOLERANCE` only raise a ``UserWarning``; negative or
non-finite targets raise ``ValueError``. Both checks read values back to the host: always on CPU, on GPU
only with ``validate=True``.

Losses are float32 whatever the input dtype; an empty batch gives 0 (never NaN) for every scalar reduction.
Backends: ``triton`` (GPU), ``torch_chunked`` (CPU default), ``reference`` (eager, all logits materialised).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ..kernels.scale_modes import SCALE_PER_ELEMENT
from . import _chunked as C
from ._register import linear_loss, register_fused_loss

__all__ = ["fused_linear_kl", "linear_kl_reference"]

_OP = "fused_linear_kl"
REDUCTIONS = ("none", "sum", "batchmean", "mean", "elementwise_mean")
SUM_TOLERANCE = 1e-2


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def _factor(reduction: str, n: int, v: int) -> float:
    if reduction == "batchmean":
        return 1.0 / max(n, 1)
    if reduction in ("mean", "elementwise_mean"):
        return 1.0 / max(n * v, 1)
    return 1.0


# ----------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------


def linear_kl_reference(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        soft_targets: torch.Tensor, reduction: str = "elementwise_mean",
                        indices: torch.Tensor | None = None) -> torch.Tensor:
    """Eager PyTorch: ``F.kl_div(F.log_softmax(F.linear(h, weight, bias)), soft_targets, reduction)``.

    Args:
        hidden: [N_all, H]; indices: [N] rows or None; weight: [V, H]; bias: [V] or None;
        soft_targets: [N, V] non-negative (rows ideally summing to 1).
    Returns:
        [N, V] for ``'none'``, else a scalar (0 for an empty batch).
    """
    h = hidden if indices is None else hidden.index_select(0, indices)
    logp = F.log_softmax(_upcast(F.linear(h, weight, bias)), dim=-1)
    elem = F.kl_div(logp, soft_targets.to(logp.dtype), reduction="none")
    if reduction == "none":
        return elem
    return elem.sum() * _factor(reduction, elem.shape[0], elem.shape[1])


# ----------------------------------------------------------------------------------------------------------
# Row steps
# ----------------------------------------------------------------------------------------------------------


def _torch_step(logits, data, loss, scale, mode, compute, *, elementwise: bool) -> None:
    logq = torch.log_softmax(_upcast(logits), dim=1)
    p = data[0].to(logq.dtype)
    if elementwise:
        loss.copy_(torch.xlogy(p, p).sub_(p * logq))
    else:  # sum p log p - sum p log q; clamping p only changes 0 log 0 (= 0 either way)
        loss.copy_((p * p.clamp_min(torch.finfo(p.dtype).tiny).log_().sub_(logq)).sum(1))
    if not compute:
        return
    q = torch.exp(logq, out=logq)
    if mode == SCALE_PER_ELEMENT:
        gp = p * scale
        q.mul_(gp.sum(1, keepdim=True)).sub_(gp)
    else:
        q.mul_(p.sum(1, keepdim=True)).sub_(p).mul_(scale.unsqueeze(-1) if scale.dim() else scale)
    logits.copy_(q)


def _triton_step(logits, data, loss, scale, mode, compute, *, elementwise: bool) -> None:
    from ..kernels.triton.linear_kl import kl_rows

    kl_rows(logits, data[0], loss, scale, mode, compute, elementwise)


_STEPS = {"torch_chunked": _torch_step, "triton": _triton_step}

# ----------------------------------------------------------------------------------------------------------
# Backends and the custom op
# ----------------------------------------------------------------------------------------------------------

LINEAR_KL, _linear_kl_op = register_fused_loss(linear_loss(
    "linear_kl", "fused linear + KL to soft targets (MRC-kl)", "soft_targets", _STEPS,
    lambda reduction, soft_targets, classes: _factor(reduction, soft_targets.shape[0], classes)))

# ----------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------


def validate_soft_targets(op: str, soft_targets: torch.Tensor, name: str = "soft_targets") -> None:
    """ValueError for negative / non-finite values; UserWarning for rows not summing to 1 (+- SUM_TOLERANCE)."""
    if soft_targets.numel() == 0:
        return
    t = soft_targets.float()
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"fastvl.ops.{op}: argument '{name}' has non-finite values")
    if bool((t < 0).any()):
        raise ValueError(f"fastvl.ops.{op}: argument '{name}' must be non-negative (a distribution per row), "
                         f"got a minimum of {float(t.min()):.4g}")
    off = (t.sum(1) - 1).abs()
    if bool((off > SUM_TOLERANCE).any()):
        row = int(off.argmax())
        warnings.warn(f"fastvl.ops.{op}: rows of '{name}' should sum to 1; {int((off > SUM_TOLERANCE).sum())} "
                      f"row(s) do not (row {row} sums to {float(t[row].sum()):.4g}); the KL is computed as "
                      "F.kl_div would", UserWarning, stacklevel=3)


def fused_linear_kl(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    soft_targets: torch.Tensor, reduction: str = "elementwise_mean", *,
                    indices: torch.Tensor | None = None, validate: bool | None = None, chunk_rows: int | None = None,
                    backend: str | None = None) -> torch.Tensor:
    """KL(soft_targets || softmax(hidden @ weight.T + bias)) without materialising all logits.

    Args:
        hidden: [N_all, H] float; with ``indices`` only ``hidden[indices]`` is used.
        weight: [V, H] (nn.Linear layout), same dtype as hidden; bias: [V] or None.
        soft_targets: [N, V] float (any float dtype; read as float32), one distribution per row.
        reduction: ``'none'`` ([N, V] float32, as ``F.kl_div``), ``'sum'``, ``'batchmean'`` (sum / N),
            ``'mean'`` = ``'elementwise_mean'`` (sum / (N V): the official MRC-kl reduction).
        indices: [N] int rows of ``hidden`` or None.
        validate: check target values (see module docstring); default: on CPU yes, on GPU no.
        chunk_rows: rows per chunk (default from a memory budget). backend: force a backend.
    Returns:
        float32 loss, differentiable w.r.t. hidden, weight and bias (not w.r.t. soft_targets).
    """
    hidden, weight, bias = C.autocast_inputs(hidden, weight, bias)
    n, V, _ = C.check_linear_args(_OP, hidden, weight, bias, indices)
    C.check_tensor(_OP, "soft_targets", soft_targets, 2, f"2-d [N, {V}]", floating=True, device=hidden.device)
    C.check_rows(_OP, "soft_targets", soft_targets, n, "rows (indices)" if indices is not None else "rows in 'hidden'")
    if soft_targets.shape[1] != V:
        raise ValueError(f"fastvl.ops.{_OP}: argument 'soft_targets' has {soft_targets.shape[1]} classes but "
                         f"'weight' has {V} outputs")
    C.check_reduction(_OP, reduction, REDUCTIONS)
    C.check_chunk_rows(_OP, chunk_rows)
    if C.should_validate(validate, soft_targets):
        validate_soft_targets(_OP, soft_targets)
        C.validate_indices(_OP, indices, hidden.shape[0])
    name = C.select_backend(LINEAR_KL, (hidden, weight, bias, soft_targets, indices), n, V, backend)
    if name == "reference":
        return linear_kl_reference(hidden, weight, bias, soft_targets, reduction, indices)
    rows = chunk_rows or C.default_chunk_rows(n, V, hidden.dtype, hidden.device, name)
    mask = C.grad_mask(hidden, weight, bias) if reduction != "none" else 0
    mask |= C.defer_mode(mask, reduction, n, V, hidden.shape[1], rows)
    return _linear_kl_op(hidden, weight, bias, soft_targets.detach(), indices, None, reduction, mask, int(rows),
                         name)[0]


def _example(device: str, dtype: torch.dtype) -> tuple[tuple, dict]:
    """UNITER-base MRC-kl: 1536 masked regions, hidden 768, 1601 region classes."""
    hidden = torch.empty(1536, 768, device=device, dtype=dtype)
    weight = torch.empty(1601, 768, device=device, dtype=dtype)
    return (hidden, weight, torch.empty(1601, device=device, dtype=dtype),
            torch.empty(1536, 1601, device=device, dtype=dtype), None), {}


LINEAR_KL.example = _example
