"""Triton row kernel of the fused linear + cross-entropy: per row, the loss and (in place) the gradient."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._chunked import as_rows, row_block, row_scale


@triton.jit
def _cross_entropy_rows_kernel(x_ptr, x_stride, t_ptr, loss_ptr, scale_ptr, V, ignore_index,
                               SCALE_MODE: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    t = tl.load(t_ptr + row).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = float("-inf")
    d = 0.0
    x_t = 0.0
    for start in range(0, V, BLOCK):
        c = start + cols
        x = tl.load(x_row + c, mask=c < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
        x_t += tl.sum(tl.where((c == t) & (c < V), x, 0.0), axis=0)
    lse = m + tl.log(d)
    valid = t != ignore_index
    tl.store(loss_ptr + row, tl.where(valid, lse - x_t, 0.0))
    if COMPUTE_GRAD:
        s = tl.where(valid, row_scale(scale_ptr, row, SCALE_MODE), 0.0)
        for start in range(0, V, BLOCK):
            c = start + cols
            x = tl.load(x_row + c, mask=c < V, other=0.0).to(tl.float32)
            g = (tl.exp(x - lse) - tl.where(c == t, 1.0, 0.0)) * s
            tl.store(x_row + c, g.to(x_ptr.dtype.element_ty), mask=c < V)


def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor, scale: torch.Tensor,
                       mode: int, compute_grad: bool, ignore_index: int) -> None:
    """logits [n, V] (overwritten by the scaled gradient when ``compute_grad``), targets [n] int,
    loss [n] float32 out, scale float32 0-d (``mode`` SCALE_SCALAR) or [n] (SCALE_PER_ROW)."""
    n, V = logits.shape
    if n == 0:
        return
    block, warps = row_block(V)
    _cross_entropy_rows_kernel[(n,)](logits, logits.stride(0), as_rows(targets), loss, as_rows(scale.float()), V,
                                     int(ignore_index), SCALE_MODE=mode, COMPUTE_GRAD=bool(compute_grad),
                                     BLOCK=block, num_warps=warps)
