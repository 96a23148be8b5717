"""Fused linear layer + binary cross-entropy with logits on soft scores: UNITER's VQA (3129 answers) and SNLI-VE.

Per element ``max(z, 0) - z y + log(1 + exp(-|z|))`` with ``z = (hidden[indices] @ weight.T + bias)``, as
``F.binary_cross_entropy_with_logits(z, y, reduction='none')``. Reductions:
- ``'none'``: [N, A] elementwise;
- ``'sum'``: the total;
- ``'mean'``: sum / (N A), ``F.binary_cross_entropy_with_logits``' default;
- ``'batchmean'`` (default): sum / N, the per-instance sum averaged over the batch. This is the official VQA /
  VILLA training loss ``bce(..., reduction='none').mean() * num_answers`` ("instance-level bce"), exactly.

Soft scores must lie in [0, 1] (VQA scores are min(1, #annotators / 3)); values outside, or non-finite, raise
``ValueError`` when checked: always on CPU, on GPU only with ``validate=True`` (the check reads values back).
The loss is float32 whatever the input dtype; an empty batch gives 0 (never NaN). Backends: ``triton`` (GPU),
``torch_chunked`` (CPU default) and ``reference`` (eager, all logits materialised).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels.scale_modes import SCALE_PER_ROW
from . import _chunked as C
from ._register import linear_loss, register_fused_loss

__all__ = ["bce_soft_reference", "fused_bce_soft"]

_OP = "fused_bce_soft"
REDUCTIONS = ("none", "sum", "mean", "batchmean")


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def _factor(reduction: str, n: int, a: int) -> float:
    if reduction == "batchmean":
        return 1.0 / max(n, 1)
    if reduction == "mean":
        return 1.0 / max(n * a, 1)
    return 1.0


# ----------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------


def bce_soft_reference(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       soft_scores: torch.Tensor, reduction: str = "batchmean",
                       indices: torch.Tensor | None = None) -> torch.Tensor:
    """Eager PyTorch, as the official VQA training step computes it.

    Args:
        hidden: [N_all, H]; indices: [N] rows or None; weight: [A, H]; bias: [A] or None;
        soft_scores: [N, A] targets in [0, 1].
    Returns:
        [N, A] for ``'none'``, else a scalar (0 for an empty batch).
    """
    h = hidden if indices is None else hidden.index_select(0, indices)
    logits = _upcast(F.linear(h, weight, bias))
    elem = F.binary_cross_entropy_with_logits(logits, soft_scores.to(logits.dtype), reduction="none")
    if reduction == "none":
        return elem
    return elem.sum() * _factor(reduction, elem.shape[0], elem.shape[1])


# ----------------------------------------------------------------------------------------------------------
# Row steps
# ----------------------------------------------------------------------------------------------------------


def _torch_step(logits, data, loss, scale, mode, compute, *, elementwise: bool) -> None:
    z = _upcast(logits)
    y = data[0].to(z.dtype)
    elem = F.binary_cross_entropy_with_logits(z, y, reduction="none")
    loss.copy_(elem if elementwise else elem.sum(1))
    if not compute:
        return
    s = scale.unsqueeze(1) if mode == SCALE_PER_ROW else scale
    if z is logits:
        logits.sigmoid_().sub_(y).mul_(s)
    else:
        logits.copy_(torch.sigmoid(z).sub_(y).mul_(s))


def _triton_step(logits, data, loss, scale, mode, compute, *, elementwise: bool) -> None:
    from ..kernels.triton.bce_soft import bce_rows

    bce_rows(logits, data[0], loss, scale, mode, compute, elementwise)


_STEPS = {"torch_chunked": _torch_step, "triton": _triton_step}

# ----------------------------------------------------------------------------------------------------------
# Backends and the custom op
# ----------------------------------------------------------------------------------------------------------

BCE_SOFT, _bce_op = register_fused_loss(linear_loss(
    "bce_soft", "fused linear + BCE with logits on soft scores (VQA, SNLI-VE)", "soft_scores", _STEPS,
    lambda reduction, soft_scores, answers: _factor(reduction, soft_scores.shape[0], answers)))

# ----------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------


def _validate_scores(soft_scores: torch.Tensor) -> None:
    if soft_scores.numel() == 0:
        return
    t = soft_scores.float()
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"fastvl.ops.{_OP}: argument 'soft_scores' has non-finite values")
    lo, hi = float(t.min()), float(t.max())
    if lo < 0 or hi > 1:
        raise ValueError(f"fastvl.ops.{_OP}: argument 'soft_scores' must lie in [0, 1], got values in "
                         f"[{lo:.4g}, {hi:.4g}]")


def fused_bce_soft(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   soft_scores: torch.Tensor, reduction: str = "batchmean", *, indices: torch.Tensor | None = None,
                   validate: bool | None = None, chunk_rows: int | None = None,
                   backend: str | None = None) -> torch.Tensor:
    """BCE with logits of ``hidden @ weight.T + bias`` against soft scores (module docstring).

    Args:
        hidden: [N_all, H] float (VQA: the 2H-d output of the head's GELU + LayerNorm); with ``indices`` only
            ``hidden[indices]`` is used.
        weight: [A, H] (the head's last nn.Linear), same dtype as hidden; bias: [A] or None.
        soft_scores: [N, A] float in [0, 1] (any float dtype; read as float32).
        reduction: ``'batchmean'`` (official VQA: sum / N), ``'mean'`` (sum / (N A)), ``'sum'``, ``'none'`` ([N, A]).
        indices: [N] int rows of ``hidden`` or None. validate: check values (default: on CPU yes, on GPU no).
        chunk_rows: rows per chunk (default from a memory budget). backend: force a backend.
    Returns:
        float32 loss, differentiable w.r.t. hidden, weight and bias (not soft_scores).
    """
    hidden, weight, bias = C.autocast_inputs(hidden, weight, bias)
    n, A, _ = C.check_linear_args(_OP, hidden, weight, bias, indices)
    C.check_tensor(_OP, "soft_scores", soft_scores, 2, f"2-d [N, {A}]", floating=True, device=hidden.device)
    C.check_rows(_OP, "soft_scores", soft_scores, n, "rows (indices)" if indices is not None else "rows in 'hidden'")
    if soft_scores.shape[1] != A:
        raise ValueError(f"fastvl.ops.{_OP}: argument 'soft_scores' has {soft_scores.shape[1]} answers but "
                         f"'weight' has {A} outputs")
    C.check_reduction(_OP, reduction, REDUCTIONS)
    C.check_chunk_rows(_OP, chunk_rows)
    if C.should_validate(validate, soft_scores):
        _validate_scores(soft_scores)
        C.validate_indices(_OP, indices, hidden.shape[0])
    name = C.select_backend(BCE_SOFT, (hidden, weight, bias, soft_scores, indices), n, A, backend)
    if name == "reference":
        return bce_soft_reference(hidden, weight, bias, soft_scores, reduction, indices)
    rows = chunk_rows or C.default_chunk_rows(n, A, hidden.dtype, hidden.device, name)
    mask = C.grad_mask(hidden, weight, bias) if reduction != "none" else 0
    mask |= C.defer_mode(mask, reduction, n, A, hidden.shape[1], rows)
    return _bce_op(hidden, weight, bias, soft_scores.detach(), indices, None, reduction, mask, int(rows), name)[0]


def _example(device: str, dtype: torch.dtype) -> tuple[tuple, dict]:
    """UNITER-base VQA: batch 256, head width 2H = 1536, 3129 answers."""
    hidden = torch.empty(256, 1536, device=device, dtype=dtype)
    weight = torch.empty(3129, 1536, device=device, dtype=dtype)
    return (hidden, weight, torch.empty(3129, device=device, dtype=dtype),
            torch.empty(256, 3129, device=device, dtype=dtype), None), {}


BCE_SOFT.example = _example
