"""Triton row kernel of the fused linear + feature regression: squared error (MRFR) or per-row Euclidean
distance (HERO MFFR); loss per row / element and (in place) the scaled gradient."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._chunked import as_rows, element_scale, row_block, row_scale, scale_stride


@triton.jit
def _regression_rows_kernel(x_ptr, x_stride, y_ptr, y_stride, loss_ptr, scale_ptr, g_stride, D,
                            SCALE_MODE: tl.constexpr, COMPUTE_GRAD: tl.constexpr, L2: tl.constexpr,
                            ELEMENTWISE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    y_row = y_ptr + row * y_stride
    cols = tl.arange(0, BLOCK)
    s = row_scale(scale_ptr, row, SCALE_MODE)
    ss = 0.0
    for start in range(0, D, BLOCK):
        c = start + cols
        inside = c < D
        diff = tl.load(x_row + c, mask=inside, other=0.0).to(tl.float32) - \
            tl.load(y_row + c, mask=inside, other=0.0).to(tl.float32)
        ss += tl.sum(diff * diff, axis=0)
        if ELEMENTWISE:
            tl.store(loss_ptr + row * D + c, diff * diff, mask=inside)
        if COMPUTE_GRAD and not L2:
            g = 2.0 * diff * element_scale(scale_ptr, row, g_stride, c, inside, s, SCALE_MODE)
            tl.store(x_row + c, g.to(x_ptr.dtype.element_ty), mask=inside)
    if L2:
        dist = tl.sqrt(ss)
        tl.store(loss_ptr + row, dist)
        if COMPUTE_GRAD:
            inv = tl.where(dist > 0.0, 1.0 / tl.where(dist > 0.0, dist, 1.0), 0.0) * s
            for start in range(0, D, BLOCK):
                c = start + cols
                inside = c < D
                diff = tl.load(x_row + c, mask=inside, other=0.0).to(tl.float32) - \
                    tl.load(y_row + c, mask=inside, other=0.0).to(tl.float32)
                tl.store(x_row + c, (diff * inv).to(x_ptr.dtype.element_ty), mask=inside)
    elif not ELEMENTWISE:
        tl.store(loss_ptr + row, ss)


def regression_rows(pred: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor, scale: torch.Tensor, mode: int,
                    compute_grad: bool, l2: bool, elementwise: bool) -> None:
    """pred [n, D] (overwritten by the scaled gradient when ``compute_grad``), targets [n, D] any float dtype,
    loss float32 out: [n, D] when ``elementwise`` (contiguous), else [n] (sum of squares, or distance for l2)."""
    n, D = pred.shape
    if n == 0:
        return
    block, warps = row_block(D)
    targets, scale = as_rows(targets), as_rows(scale.float())
    _regression_rows_kernel[(n,)](pred, pred.stride(0), targets, targets.stride(0), loss, scale,
                                  scale_stride(scale, mode), D, SCALE_MODE=mode, COMPUTE_GRAD=bool(compute_grad),
                                  L2=bool(l2), ELEMENTWISE=bool(elementwise), BLOCK=block, num_warps=warps)
