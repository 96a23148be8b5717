"""Symmetric KL between two sets of logits: VILLA's adversarial regulariser.

``symmetric_kl(a, b) = KL(softmax b || softmax a) + KL(softmax a || softmax b)`` over the last dim, i.e.
``F.kl_div(log_softmax(a), softmax(b)) + F.kl_div(log_softmax(b), softmax(a))`` exactly as VILLA writes it,
with ``F.kl_div``'s reductions: ``'none'`` (elementwise, the input's shape), ``'sum'``, ``'batchmean'``
(sum / size(0)) and ``'mean'`` (sum / numel). VILLA's ``kl.mean() * num_answers`` on [B, A] logits is
``'batchmean'`` (the default). Gradients flow to both sides; detach one side before the call to stop them.

Elementwise the loss is ``(p_a - p_b) (log p_a - log p_b)``; the gradient per row with per-element weights G
(G constant for the scalar reductions) is, with ``d = log p_a - log p_b``,
``dL/da = p_a (G d - sum G p_a d) + G (p_a - p_b) - p_a sum G (p_a - p_b)`` and the mirror image for b.

Backends: ``triton`` (GPU: one program per row, three passes over the row in registers), ``torch_chunked``
(CPU default: the closed-form gradient above in PyTorch, rows in chunks), ``reference`` (eager autograd).
The loss is float32 whatever the input dtype; an empty input gives 0 for every scalar reduction.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..kernels.scale_modes import SCALE_PER_ROW, SCALE_SCALAR
from . import _chunked as C
from ._register import FusedLoss, register_fused_loss

__all__ = ["symmetric_kl", "symmetric_kl_reference"]

_OP = "symmetric_kl"
REDUCTIONS = ("none", "sum", "batchmean", "mean")
GRAD_A, GRAD_B = 1, 2


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def _factor(reduction: str, batch: int, numel: int) -> float:
    if reduction == "batchmean":
        return 1.0 / max(batch, 1)
    if reduction == "mean":
        return 1.0 / max(numel, 1)
    return 1.0


# ----------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------


def symmetric_kl_reference(logits_a: torch.Tensor, logits_b: torch.Tensor, reduction: str = "batchmean"
                           ) -> torch.Tensor:
    """Eager PyTorch. logits_a, logits_b: [..., C] -> loss ([..., C] for 'none').

    VILLA's ``kl_div(log p_a, p_b) + kl_div(log p_b, p_a)`` written elementwise as ``(p_a - p_b)(log p_a - log p_b)``
    (the same value): autograd through ``kl_div`` differentiates ``p log p`` at p = 0 and returns NaN gradients
    when both sides mask a class with a large negative logit (-1e4 underflows to p = 0); this form stays finite."""
    a, b = _upcast(logits_a), _upcast(logits_b)
    la, lb = F.log_softmax(a, dim=-1), F.log_softmax(b, dim=-1)
    elem = (la.exp() - lb.exp()) * (la - lb)
    if reduction == "none":
        return elem
    return elem.sum() * _factor(reduction, a.shape[0], a.numel())


# ----------------------------------------------------------------------------------------------------------
# Row steps and the custom op
# ----------------------------------------------------------------------------------------------------------


def _torch_rows(a: torch.Tensor, b: torch.Tensor, loss: torch.Tensor, ga: torch.Tensor | None,
                gb: torch.Tensor | None, scale: torch.Tensor, mode: int, elementwise: bool) -> None:
    """One chunk of rows: a, b [n, C]; loss [n] or [n, C]; ga, gb [n, C] outputs (or None)."""
    la = torch.log_softmax(_upcast(a), dim=-1)
    lb = torch.log_softmax(_upcast(b), dim=-1)
    pa, pb = la.exp(), lb.exp()
    d = la.sub_(lb)
    dp = pa - pb
    elem = dp * d
    loss.copy_(elem if elementwise else elem.sum(1))
    if ga is None and gb is None:
        return
    g = scale.unsqueeze(1) if mode == SCALE_PER_ROW else scale
    gd = d.mul_(g)
    gdp = dp.mul_(g)
    s = gdp.sum(1, keepdim=True)
    if ga is not None:
        a1 = (pa * gd).sum(1, keepdim=True)
        ga.copy_(pa * (gd - a1 - s) + gdp)
    if gb is not None:
        b1 = (pb * gd).sum(1, keepdim=True)
        gb.copy_(pb * (b1 - gd + s) - gdp)


def _run(backend: str, a, b, loss, ga, gb, scale, mode, elementwise, chunk_rows) -> None:
    if backend == "triton":
        from ..kernels.triton.sym_kl import symmetric_kl_rows

        symmetric_kl_rows(a, b, loss, ga, gb, scale, mode, elementwise)
        return
    for s in range(0, a.shape[0], chunk_rows):
        e = min(a.shape[0], s + chunk_rows)
        sc = scale if mode == SCALE_SCALAR else scale[s:e]
        _torch_rows(a[s:e], b[s:e], loss[s:e], ga[s:e] if ga is not None else None,
                    gb[s:e] if gb is not None else None, sc, mode, elementwise)


def _run_op(inputs, options, loss, scale, mode, mask, elementwise) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = inputs
    _factor_value, chunk_rows, backend = options
    ga = torch.empty_like(a) if mask & GRAD_A else None
    gb = torch.empty_like(b) if mask & GRAD_B else None
    _run(backend, a, b, loss, ga, gb, scale, mode, elementwise, chunk_rows)
    return (ga if ga is not None else a.new_empty(0)), (gb if gb is not None else b.new_empty(0))


def _fake_grads(inputs, options, mask) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = inputs
    return (torch.empty_like(a) if mask & GRAD_A else a.new_empty(0)), \
        (torch.empty_like(b) if mask & GRAD_B else b.new_empty(0))


SYMMETRIC_KL, _skl_op = register_fused_loss(FusedLoss(
    "symmetric_kl", "symmetric KL between two logit sets (VILLA)", "Tensor a, Tensor b",
    "float factor, SymInt chunk_rows, str backend", (GRAD_A, GRAD_B), lambda a, b: a.shape,
    lambda reduction, inputs, options: options[0], _run_op, _fake_grads,
    backend_docs=("eager PyTorch autograd", "closed-form gradient in the forward, row chunks",
                  "one program per row: loss and both gradients in three passes")))

# ----------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------


def symmetric_kl(logits_a: torch.Tensor, logits_b: torch.Tensor, reduction: str = "batchmean", *,
                 chunk_rows: int | None = None, backend: str | None = None) -> torch.Tensor:
    """KL(softmax b || softmax a) + KL(softmax a || softmax b) over the last dim.

    Args:
        logits_a: [..., C] float (VILLA: the adversarial pass's logits).
        logits_b: same shape and dtype as logits_a (VILLA: the clean pass's logits, not detached).
        reduction: ``'none'`` (float32, the inputs' shape), ``'sum'``, ``'batchmean'`` (sum / size(0); VILLA's
            ``mean() * C`` on 2-d logits), ``'mean'`` (sum / numel).
        chunk_rows: rows per chunk of the ``torch_chunked`` backend. backend: force a backend.
    Returns:
        float32 loss, differentiable w.r.t. both inputs (once).
    """
    logits_a, logits_b = C.autocast_inputs(logits_a, logits_b)
    for name, t in (("logits_a", logits_a), ("logits_b", logits_b)):
        C.check_tensor(_OP, name, t, range(1, 64), "at least 1-d [..., C]", floating=True)
    if logits_b.device != logits_a.device:
        raise ValueError(f"fastvl.ops.{_OP}: argument 'logits_b' is on {logits_b.device} but 'logits_a' is on "
                         f"{logits_a.device}; both must be on one device")
    if logits_b.shape != logits_a.shape:
        raise ValueError(f"fastvl.ops.{_OP}: argument 'logits_b' has shape {list(logits_b.shape)} but 'logits_a' "
                         f"has {list(logits_a.shape)}; they must match")
    if logits_b.dtype != logits_a.dtype:
        raise TypeError(f"fastvl.ops.{_OP}: argument 'logits_b' has dtype {logits_b.dtype} but 'logits_a' has "
                        f"{logits_a.dtype}")
    C.check_reduction(_OP, reduction, REDUCTIONS)
    C.check_chunk_rows(_OP, chunk_rows)
    width = logits_a.shape[-1]
    name = C.select_backend(SYMMETRIC_KL, (logits_a, logits_b), logits_a.numel() // max(width, 1), width, backend)
    if name == "reference":
        return symmetric_kl_reference(logits_a, logits_b, reduction)
    shape = logits_a.shape
    c = shape[-1]
    rows_total = math.prod(shape[:-1])
    a2 = logits_a.reshape(rows_total, c)
    b2 = logits_b.reshape(rows_total, c)
    if c and a2.stride(-1) != 1:
        a2 = a2.contiguous()
    if c and b2.stride(-1) != 1:
        b2 = b2.contiguous()
    mask = 0
    if reduction != "none" and torch.is_grad_enabled():
        mask = (GRAD_A if logits_a.requires_grad else 0) | (GRAD_B if logits_b.requires_grad else 0)
    # the torch_chunked step holds ~6 float32 [rows, C] temporaries: a quarter of the usual budget
    rows = chunk_rows or max(1, C.default_chunk_rows(rows_total, c, a2.dtype, a2.device, name) // 4)
    factor = _factor(reduction, shape[0], logits_a.numel())
    loss = _skl_op(a2, b2, None, reduction, mask, factor, int(rows), name)[0]
    return loss.reshape(shape) if reduction == "none" else loss


def _example(device: str, dtype: torch.dtype) -> tuple[tuple, dict]:
    """VILLA VQA: batch 256, 3129 answers."""
    return (torch.empty(256, 3129, device=device, dtype=dtype), torch.empty(256, 3129, device=device, dtype=dtype)), {}


SYMMETRIC_KL.example = _example
