"""Fused linear layer + cross-entropy: MLM (tied decoder), MRC, ITM, HERO FOM and MFM-NCE.

``loss = cross_entropy(hidden[indices] @ weight.T + bias, targets)`` with the semantics of ``F.cross_entropy``
(``ignore_index``, reductions ``none`` / ``sum`` / ``mean``), computed chunk by chunk so that the logits of all
rows never exist at once, with the gradients of hidden, weight and bias computed in the same pass (see
:mod:`fastvl.ops._chunked`).

Differences from ``F.cross_entropy`` (all deliberate, all tested):
- ``reduction='mean'`` of a batch whose targets are all ``ignore_index`` (or that has no rows) is 0 with zero
  gradients, not NaN.
- The loss is float32 whatever the input dtype (logits are computed in the input dtype, the softmax in
  float32: what ``torch.autocast`` does). Gradients have the dtypes of their inputs.
- Out-of-range targets (not in [0, V) and not ``ignore_index``) raise ``ValueError`` when checked: always on
  CPU, on GPU only with ``validate=True`` (the check reads a value back to the host). Unchecked on GPU, such a
  row's loss is its log-sum-exp (no target logit) and nothing faults.

Backends: ``triton`` (GPU; the per-row loss and gradient in one Triton kernel per chunk, the products on
cuBLAS), ``torch_chunked`` (the same chunked pass in PyTorch: CPU default, any device and float dtype) and
``reference`` (the eager PyTorch below, materialising all logits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _chunked as C
from ._register import linear_loss, register_fused_loss

__all__ = ["fused_linear_cross_entropy", "linear_cross_entropy_reference"]

_OP = "fused_linear_cross_entropy"
REDUCTIONS = ("none", "sum", "mean")


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


# ----------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                   targets: torch.Tensor, ignore_index: int = -1, reduction: str = "mean",
                                   indices: torch.Tensor | None = None) -> torch.Tensor:
    """Eager PyTorch: gather, ``F.linear`` in the input dtype, ``F.cross_entropy`` in (at least) float32.

    Args:
        hidden: [N_all, H]; indices: [N] rows to use or None (N = N_all).
        weight: [V, H]; bias: [V] or None; targets: [N] int in [0, V) or ``ignore_index``.
    Returns:
        [N] per-row losses (0 at ignored rows) for ``'none'``, else a scalar; ``'mean'`` divides by the number of
        non-ignored rows, and gives 0 when there is none.
    """
    h = hidden if indices is None else hidden.index_select(0, indices)
    logits = _upcast(F.linear(h, weight, bias))
    if reduction == "mean":
        total = F.cross_entropy(logits, targets.long(), ignore_index=ignore_index, reduction="sum")
        return total / (targets != ignore_index).sum().clamp(min=1)
    return F.cross_entropy(logits, targets.long(), ignore_index=ignore_index, reduction=reduction)


# ----------------------------------------------------------------------------------------------------------
# Row steps (loss + dloss/dlogits of one chunk)
# ----------------------------------------------------------------------------------------------------------


def _torch_step(logits: torch.Tensor, data, loss: torch.Tensor, scale: torch.Tensor, mode: int, compute: bool, *,
                elementwise: bool, ignore_index: int) -> None:
    (targets,) = data
    logq = torch.log_softmax(_upcast(logits), dim=1)
    valid = targets != ignore_index
    tgt = torch.where(valid, targets, 0).long().unsqueeze(1)
    loss.copy_(torch.where(valid, logq.gather(1, tgt).squeeze(1).neg(), 0.0))
    if not compute:
        return
    s = (valid.float() * scale).unsqueeze(1)  # [n, 1] float32 (scale is 0-d or [n])
    g = torch.exp(logq, out=logits) if logits.dtype == torch.float32 else logq.exp_()  # in float32 either way
    g.mul_(s).scatter_add_(1, tgt, -s)
    if g is not logits:
        logits.copy_(g)


def _triton_step(logits, data, loss, scale, mode, compute, *, elementwise: bool, ignore_index: int) -> None:
    from ..kernels.triton.linear_cross_entropy import cross_entropy_rows

    cross_entropy_rows(logits, data[0], loss, scale, mode, compute, ignore_index)


_STEPS = {"torch_chunked": _torch_step, "triton": _triton_step}

# ----------------------------------------------------------------------------------------------------------
# Backends and the custom op
# ----------------------------------------------------------------------------------------------------------


def _scale(reduction: str, targets: torch.Tensor, vocab: int, ignore_index: int) -> float | torch.Tensor:
    """'mean' divides by the number of non-ignored rows (a device tensor: no host read; 1 when there is none)."""
    return 1.0 / (targets != ignore_index).sum().clamp(min=1).float() if reduction == "mean" else 1.0


LINEAR_CE, _linear_ce_op = register_fused_loss(linear_loss(
    "linear_cross_entropy", "fused linear + cross-entropy (MLM, MRC, ITM)", "targets", _STEPS, _scale,
    options="SymInt ignore_index", per_element=lambda ignore_index: False))

# ----------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------


def _validate_targets(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        value = int(targets[bad][0])
        raise ValueError(f"fastvl.ops.{_OP}: argument 'targets' must hold class ids in [0, {vocab}) or "
                         f"ignore_index={ignore_index}, got {value} (at row {int(bad.nonzero()[0, 0])})")


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               targets: torch.Tensor, ignore_index: int = -1, reduction: str = "mean", *,
                               indices: torch.Tensor | None = None, validate: bool | None = None,
                               chunk_rows: int | None = None, backend: str | None = None) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` without materialising all logits.

    Args:
        hidden: [N_all, H] float. With ``indices``, only rows ``hidden[indices]`` are used (gathered chunk by
            chunk, never as a whole copy) and grad_hidden is zero elsewhere.
        weight: [V, H], same dtype as hidden (nn.Linear layout; for a tied MLM decoder the word embeddings).
        bias: [V] or None.
        targets: [N] int64/int32 class ids in [0, V), or ``ignore_index`` (row contributes 0).
        ignore_index: ignored target value (UNITER MLM: -1; MRC: 0).
        reduction: ``'none'`` ([N] float32), ``'sum'``, ``'mean'`` (over non-ignored rows; 0 if none).
        indices: [N] int64/int32 rows of ``hidden`` (duplicates allowed), or None (N = N_all).
        validate: check target (and index) values; default: on CPU yes, on GPU no (it costs a host sync).
        chunk_rows: rows per chunk (default: a memory budget, see :mod:`fastvl.ops._chunked`).
        backend: ``'triton'``, ``'torch_chunked'`` or ``'reference'``; default: the fastest that fits.
    Returns:
        float32 loss: [N] for ``'none'``, else a scalar. Differentiable w.r.t. hidden, weight and bias (once).
    """
    hidden, weight, bias = C.autocast_inputs(hidden, weight, bias)
    n, V, _ = C.check_linear_args(_OP, hidden, weight, bias, indices)
    C.check_tensor(_OP, "targets", targets, 1, "1-d [N] class ids", floating=False, device=hidden.device)
    C.check_rows(_OP, "targets", targets, n, "rows (indices)" if indices is not None else "rows in 'hidden'")
    C.check_reduction(_OP, reduction, REDUCTIONS)
    C.check_chunk_rows(_OP, chunk_rows)
    if C.should_validate(validate, targets):
        _validate_targets(targets, V, ignore_index)
        C.validate_indices(_OP, indices, hidden.shape[0])
    name = C.select_backend(LINEAR_CE, (hidden, weight, bias, targets, indices), n, V, backend)
    if name == "reference":
        return linear_cross_entropy_reference(hidden, weight, bias, targets, ignore_index, reduction, indices)
    rows = chunk_rows or C.default_chunk_rows(n, V, hidden.dtype, hidden.device, name)
    mask = C.grad_mask(hidden, weight, bias) if reduction != "none" else 0
    mask |= C.defer_mode(mask, reduction, n, V, hidden.shape[1], rows)
    out = _linear_ce_op(hidden, weight, bias, targets, indices, None, reduction, mask, int(rows), name,
                        int(ignore_index))
    return out[0]


def _example(device: str, dtype: torch.dtype) -> tuple[tuple, dict]:
    """UNITER-base MLM: 1536 masked tokens, hidden 768, vocabulary 28996."""
    hidden = torch.empty(1536, 768, device=device, dtype=dtype)
    weight = torch.empty(28996, 768, device=device, dtype=dtype)
    bias = torch.empty(28996, device=device, dtype=dtype)
    targets = torch.zeros(1536, dtype=torch.long, device=device)
    return (hidden, weight, bias, targets, None), {}


LINEAR_CE.example = _example
