"""Triton kernel of the symmetric KL (VILLA): one program per row; pass 1 the two log-sum-exps, pass 2 the
loss and the row sums the gradient needs, pass 3 both gradients (see fastvl/ops/sym_kl.py)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._chunked import as_rows, element_scale, row_block, row_scale, scale_stride


@triton.jit
def _symmetric_kl_kernel(a_ptr, a_stride, b_ptr, b_stride, loss_ptr, ga_ptr, gb_ptr, g_stride_out, scale_ptr,
                         s_stride, C, SCALE_MODE: tl.constexpr, GRAD_A: tl.constexpr, GRAD_B: tl.constexpr,
                         ELEMENTWISE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    a_row = a_ptr + row * a_stride
    b_row = b_ptr + row * b_stride
    cols = tl.arange(0, BLOCK)
    ma = float("-inf")
    mb = float("-inf")
    da = 0.0
    db = 0.0
    for start in range(0, C, BLOCK):
        c = start + cols
        inside = c < C
        a = tl.load(a_row + c, mask=inside, other=float("-inf")).to(tl.float32)
        b = tl.load(b_row + c, mask=inside, other=float("-inf")).to(tl.float32)
        ma_new = tl.maximum(ma, tl.max(a, axis=0))
        mb_new = tl.maximum(mb, tl.max(b, axis=0))
        da = da * tl.exp(ma - ma_new) + tl.sum(tl.exp(a - ma_new), axis=0)
        db = db * tl.exp(mb - mb_new) + tl.sum(tl.exp(b - mb_new), axis=0)
        ma = ma_new
        mb = mb_new
    lse_a = ma + tl.log(da)
    lse_b = mb + tl.log(db)
    s = row_scale(scale_ptr, row, SCALE_MODE)
    total = 0.0
    a1 = 0.0
    b1 = 0.0
    sdp = 0.0
    for start in range(0, C, BLOCK):
        c = start + cols
        inside = c < C
        la = tl.load(a_row + c, mask=inside, other=0.0).to(tl.float32) - lse_a
        lb = tl.load(b_row + c, mask=inside, other=0.0).to(tl.float32) - lse_b
        pa = tl.where(inside, tl.exp(la), 0.0)
        pb = tl.where(inside, tl.exp(lb), 0.0)
        d = la - lb
        elem = (pa - pb) * d
        total += tl.sum(elem, axis=0)
        if ELEMENTWISE:
            tl.store(loss_ptr + row * C + c, elem, mask=inside)
        if GRAD_A or GRAD_B:
            g = element_scale(scale_ptr, row, s_stride, c, inside, s, SCALE_MODE)
            a1 += tl.sum(pa * g * d, axis=0)
            b1 += tl.sum(pb * g * d, axis=0)
            sdp += tl.sum(g * (pa - pb), axis=0)
    if not ELEMENTWISE:
        tl.store(loss_ptr + row, total)
    if GRAD_A or GRAD_B:
        for start in range(0, C, BLOCK):
            c = start + cols
            inside = c < C
            la = tl.load(a_row + c, mask=inside, other=0.0).to(tl.float32) - lse_a
            lb = tl.load(b_row + c, mask=inside, other=0.0).to(tl.float32) - lse_b
            pa = tl.exp(la)
            pb = tl.exp(lb)
            g = element_scale(scale_ptr, row, s_stride, c, inside, s, SCALE_MODE)
            gd = g * (la - lb)
            gdp = g * (pa - pb)
            if GRAD_A:
                ga = pa * (gd - a1 - sdp) + gdp
                tl.store(ga_ptr + row * g_stride_out + c, ga.to(ga_ptr.dtype.element_ty), mask=inside)
            if GRAD_B:
                gb = pb * (b1 - gd + sdp) - gdp
                tl.store(gb_ptr + row * g_stride_out + c, gb.to(gb_ptr.dtype.element_ty), mask=inside)


def symmetric_kl_rows(a: torch.Tensor, b: torch.Tensor, loss: torch.Tensor, ga: torch.Tensor | None,
                      gb: torch.Tensor | None, scale: torch.Tensor, mode: int, elementwise: bool) -> None:
    """a, b [n, C] (unit stride along C); loss float32 out [n, C] (contiguous) when ``elementwise`` else [n];
    ga, gb contiguous [n, C] outputs or None; scale float32 0-d / [n] / [n, C]."""
    n, C = a.shape
    if n == 0 or C == 0:
        if not elementwise:
            loss.zero_()
        for g in (ga, gb):
            if g is not None:
                g.zero_()
        return
    block, warps = row_block(C)
    scale = as_rows(scale.float())
    dummy = loss
    _symmetric_kl_kernel[(n,)](a, a.stride(0), b, b.stride(0), loss, ga if ga is not None else dummy,
                               gb if gb is not None else dummy, C, scale, scale_stride(scale, mode), C,
                               SCALE_MODE=mode, GRAD_A=ga is not None, GRAD_B=gb is not None,
                               ELEMENTWISE=bool(elementwise), BLOCK=block, num_warps=warps)
