"""Triton row kernel of the fused linear + BCE with logits on soft scores: per element
``max(z, 0) - z y + log(1 + exp(-|z|))`` (summed per row, or stored per element) and, in place, the scaled
gradient ``sigmoid(z) - y``. One pass over the row."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._chunked import as_rows, element_scale, row_block, row_scale, scale_stride


@triton.jit
def _bce_rows_kernel(z_ptr, z_stride, y_ptr, y_stride, loss_ptr, scale_ptr, g_stride, A,
                     SCALE_MODE: tl.constexpr, COMPUTE_GRAD: tl.constexpr, ELEMENTWISE: tl.constexpr,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    y_row = y_ptr + row * y_stride
    cols = tl.arange(0, BLOCK)
    s = row_scale(scale_ptr, row, SCALE_MODE)
    total = 0.0
    for start in range(0, A, BLOCK):
        c = start + cols
        inside = c < A
        z = tl.load(z_row + c, mask=inside, other=0.0).to(tl.float32)
        y = tl.load(y_row + c, mask=inside, other=0.0).to(tl.float32)
        e = tl.exp(-tl.abs(z))
        elem = tl.maximum(z, 0.0) - z * y + tl.log(1.0 + e)
        elem = tl.where(inside, elem, 0.0)
        total += tl.sum(elem, axis=0)
        if ELEMENTWISE:
            tl.store(loss_ptr + row * A + c, elem, mask=inside)
        if COMPUTE_GRAD:
            sig = tl.where(z >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e))
            g = (sig - y) * element_scale(scale_ptr, row, g_stride, c, inside, s, SCALE_MODE)
            tl.store(z_row + c, g.to(z_ptr.dtype.element_ty), mask=inside)
    if not ELEMENTWISE:
        tl.store(loss_ptr + row, total)


def bce_rows(logits: torch.Tensor, soft: torch.Tensor, loss: torch.Tensor, scale: torch.Tensor, mode: int,
             compute_grad: bool, elementwise: bool) -> None:
    """logits [n, A] (overwritten by the scaled gradient when ``compute_grad``), soft [n, A] any float dtype,
    loss float32 out: [n, A] when ``elementwise`` (contiguous) else [n]; scale float32 0-d / [n] / [n, A]."""
    n, A = logits.shape
    if n == 0:
        return
    block, warps = row_block(A)
    soft, scale = as_rows(soft), as_rows(scale.float())
    _bce_rows_kernel[(n,)](logits, logits.stride(0), soft, soft.stride(0), loss, scale, scale_stride(scale, mode), A,
                           SCALE_MODE=mode, COMPUTE_GRAD=bool(compute_grad), ELEMENTWISE=bool(elementwise),
                           BLOCK=block, num_warps=warps)
