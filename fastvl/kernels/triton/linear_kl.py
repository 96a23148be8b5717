"""Triton row kernel of the fused linear + KL to soft targets (MRC-kl): per row, the loss and (in place)
the gradient ``softmax * sum(p) - p`` (scaled), or with per-element scales G: ``softmax * sum(G p) - G p``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._chunked import SCALE_PER_ELEMENT, as_rows, element_scale, row_block, row_scale, scale_stride


@triton.jit
def _kl_rows_kernel(x_ptr, x_stride, p_ptr, p_stride, loss_ptr, scale_ptr, g_stride, V,
                    SCALE_MODE: tl.constexpr, COMPUTE_GRAD: tl.constexpr, ELEMENTWISE: tl.constexpr,
                    BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    p_row = p_ptr + row * p_stride
    cols = tl.arange(0, BLOCK)
    m = float("-inf")
    d = 0.0
    sum_p = 0.0
    sum_px = 0.0
    sum_plogp = 0.0
    sum_gp = 0.0
    for start in range(0, V, BLOCK):
        c = start + cols
        inside = c < V
        x = tl.load(x_row + c, mask=inside, other=float("-inf")).to(tl.float32)
        p = tl.load(p_row + c, mask=inside, other=0.0).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
        sum_p += tl.sum(p, axis=0)
        sum_px += tl.sum(p * tl.where(inside, x, 0.0), axis=0)
        sum_plogp += tl.sum(p * tl.log(tl.where(p > 0.0, p, 1.0)), axis=0)  # 0 log 0 = 0
        if SCALE_MODE == SCALE_PER_ELEMENT:
            gs = element_scale(scale_ptr, row, g_stride, c, inside, 1.0, SCALE_MODE)
            sum_gp += tl.sum(gs * p, axis=0)
    lse = m + tl.log(d)
    if ELEMENTWISE:
        for start in range(0, V, BLOCK):
            c = start + cols
            inside = c < V
            x = tl.load(x_row + c, mask=inside, other=0.0).to(tl.float32)
            p = tl.load(p_row + c, mask=inside, other=0.0).to(tl.float32)
            elem = p * tl.log(tl.where(p > 0.0, p, 1.0)) - p * (x - lse)
            tl.store(loss_ptr + row * V + c, elem, mask=inside)
    else:
        tl.store(loss_ptr + row, sum_plogp - sum_px + lse * sum_p)
    if COMPUTE_GRAD:
        s = row_scale(scale_ptr, row, SCALE_MODE)
        for start in range(0, V, BLOCK):
            c = start + cols
            inside = c < V
            x = tl.load(x_row + c, mask=inside, other=0.0).to(tl.float32)
            p = tl.load(p_row + c, mask=inside, other=0.0).to(tl.float32)
            q = tl.exp(x - lse)
            if SCALE_MODE == SCALE_PER_ELEMENT:
                gs = element_scale(scale_ptr, row, g_stride, c, inside, s, SCALE_MODE)
                g = q * sum_gp - gs * p
            else:
                g = (q * sum_p - p) * s
            tl.store(x_row + c, g.to(x_ptr.dtype.element_ty), mask=inside)


def kl_rows(logits: torch.Tensor, soft: torch.Tensor, loss: torch.Tensor, scale: torch.Tensor, mode: int,
            compute_grad: bool, elementwise: bool) -> None:
    """logits [n, V] (overwritten by the scaled gradient when ``compute_grad``), soft [n, V] any float dtype,
    loss float32 out: [n, V] when ``elementwise`` (contiguous) else [n]; scale float32 0-d / [n] / [n, V]."""
    n, V = logits.shape
    if n == 0:
        return
    block, warps = row_block(V)
    soft, scale = as_rows(soft), as_rows(scale.float())
    _kl_rows_kernel[(n,)](logits, logits.stride(0), soft, soft.stride(0), loss, scale, scale_stride(scale, mode), V,
                          SCALE_MODE=mode, COMPUTE_GRAD=bool(compute_grad), ELEMENTWISE=bool(elementwise),
                          BLOCK=block, num_warps=warps)
