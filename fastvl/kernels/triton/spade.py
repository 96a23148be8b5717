"""Triton SPADE normalisation: parameter-free batch / instance norm, then ``x_hat * (1 + gamma) + beta``.

(See fastvl/ops/spade.py for the op.) x, gamma, beta and the output are contiguous [N, C, HW]. A *group* is what
one statistic covers: channel c for batch norm (N segments of HW elements, segment n at ``c HW + n C HW``),
plane (n, c) for instance norm (one segment at ``g HW``). Statistics are float32 whatever the input dtype.

Two plans, chosen per launch from the group's size (:func:`plan`):

- ``single``: one program holds a whole group ([S, HW] padded to powers of two, at most ``MAX_TILE`` elements):
  statistics, normalisation and modulation in registers; the backward likewise.
- ``two_phase``: every segment is cut into blocks of ``BLOCK`` elements, one program per (group, block). Forward
  phase 1 writes each block's count-weighted mean and M2 (sum of squared deviations from the block mean); a
  finalize program per group combines them in a fixed order (Chan's formula, two passes over the partials) into
  mean and biased variance; phase 2 normalises and modulates. Backward phase 1 writes d_gamma, d_beta and the
  block sums of ``dxh = dy (1 + gamma)`` and ``dxh x_hat``; a finalize sums them per group; phase 2 writes dx.
  Deterministic: no atomics.

With running statistics (eval) the given mean / variance normalise: no statistics pass, and the backward is
elementwise (``dx = rstd dxh``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_TILE = 4096  # elements one program holds in the single plan
BLOCK = 1024  # elements per program in the two-phase plan
BLOCK_P = 256  # partials a finalize program combines per step


def plan(segments: int, hw: int) -> str:
    """'single' when one program can hold a group of ``segments`` x ``hw`` elements, else 'two_phase'."""
    return "single" if triton.next_power_of_2(segments) * triton.next_power_of_2(hw) <= MAX_TILE else "two_phase"


def _layout(x: torch.Tensor, instance: bool) -> tuple[int, int, int, int]:
    """(groups, segments per group, elements per segment HW, stride between segments) of [N, C, H, W] x."""
    n, c = x.shape[0], x.shape[1]
    hw = x.shape[2] * x.shape[3]
    return (n * c, 1, hw, 0) if instance else (c, n, hw, c * hw)


# ----------------------------------------------------------------------------------------------------------
# Single plan: one program per group
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _tile(g, S, HW, SEG_STRIDE, S_P2: tl.constexpr, HW_P2: tl.constexpr):
    s = tl.arange(0, S_P2)[:, None]
    j = tl.arange(0, HW_P2)[None, :]
    offs = g.to(tl.int64) * HW + s.to(tl.int64) * SEG_STRIDE + j
    return offs, (s < S) & (j < HW)


@triton.jit
def _fwd_single_kernel(x_ptr, gamma_ptr, beta_ptr, out_ptr, mean_ptr, var_ptr, S, HW, SEG_STRIDE, count, eps,
                       USE_INPUT_STATS: tl.constexpr, S_P2: tl.constexpr, HW_P2: tl.constexpr):
    g = tl.program_id(0)
    offs, m = _tile(g, S, HW, SEG_STRIDE, S_P2, HW_P2)
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if USE_INPUT_STATS:
        mean = tl.sum(tl.sum(x, axis=1), axis=0) / count
        d = tl.where(m, x - mean, 0.0)
        var = tl.sum(tl.sum(d * d, axis=1), axis=0) / count
        tl.store(mean_ptr + g, mean)
        tl.store(var_ptr + g, var)
    else:
        mean = tl.load(mean_ptr + g)
        var = tl.load(var_ptr + g)
    rstd = 1.0 / tl.sqrt(var + eps)
    gamma = tl.load(gamma_ptr + offs, mask=m, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + offs, mask=m, other=0.0).to(tl.float32)
    y = (x - mean) * rstd * (1.0 + gamma) + beta
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bwd_single_kernel(dy_ptr, x_ptr, gamma_ptr, mean_ptr, var_ptr, dx_ptr, dgamma_ptr, dbeta_ptr, S, HW, SEG_STRIDE,
                       count, eps, USE_INPUT_STATS: tl.constexpr, S_P2: tl.constexpr, HW_P2: tl.constexpr):
    g = tl.program_id(0)
    offs, m = _tile(g, S, HW, SEG_STRIDE, S_P2, HW_P2)
    dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    gamma = tl.load(gamma_ptr + offs, mask=m, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + g)
    rstd = 1.0 / tl.sqrt(tl.load(var_ptr + g) + eps)
    xhat = tl.where(m, (x - mean) * rstd, 0.0)
    dxh = dy * (1.0 + gamma)
    tl.store(dgamma_ptr + offs, (dy * xhat).to(dgamma_ptr.dtype.element_ty), mask=m)
    tl.store(dbeta_ptr + offs, dy.to(dbeta_ptr.dtype.element_ty), mask=m)
    if USE_INPUT_STATS:
        a = tl.sum(tl.sum(dxh, axis=1), axis=0) / count
        b = tl.sum(tl.sum(dxh * xhat, axis=1), axis=0) / count
        dx = rstd * (dxh - a - xhat * b)
    else:
        dx = rstd * dxh
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------------------------
# Two-phase plan: one program per (group, block); partials indexed g * P + p with p = s * NB + b
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _block(pid, P, NB, HW, SEG_STRIDE, BLOCK: tl.constexpr):
    """(group, partial index, element offsets, mask, valid count) of program ``pid``."""
    g = pid // P
    p = pid % P
    s = p // NB
    b = p % NB
    j = b * BLOCK + tl.arange(0, BLOCK)
    offs = g.to(tl.int64) * HW + s.to(tl.int64) * SEG_STRIDE + j
    return g, p, offs, j < HW, tl.minimum(HW - b * BLOCK, BLOCK)


@triton.jit
def _fwd_partial_kernel(x_ptr, pmean_ptr, pm2_ptr, P, NB, HW, SEG_STRIDE, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    g, p, offs, m, cnt = _block(pid, P, NB, HW, SEG_STRIDE, BLOCK)
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / cnt.to(tl.float32)
    d = tl.where(m, x - mean, 0.0)
    tl.store(pmean_ptr + pid, mean)
    tl.store(pm2_ptr + pid, tl.sum(d * d, axis=0))


@triton.jit
def _fwd_finalize_kernel(pmean_ptr, pm2_ptr, mean_ptr, var_ptr, P, NB, HW, total, BLOCK: tl.constexpr,
                         BLOCK_P: tl.constexpr):
    g = tl.program_id(0)
    base = g.to(tl.int64) * P
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for start in range(0, P, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P)
        cnt = tl.where(p < P, tl.minimum(HW - (p % NB) * BLOCK, BLOCK), 0).to(tl.float32)
        acc += cnt * tl.load(pmean_ptr + base + p, mask=p < P, other=0.0)
    mean = tl.sum(acc, axis=0) / total
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for start in range(0, P, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P)
        cnt = tl.where(p < P, tl.minimum(HW - (p % NB) * BLOCK, BLOCK), 0).to(tl.float32)
        d = tl.load(pmean_ptr + base + p, mask=p < P, other=0.0) - mean
        acc += tl.load(pm2_ptr + base + p, mask=p < P, other=0.0) + cnt * d * d
    tl.store(mean_ptr + g, mean)
    tl.store(var_ptr + g, tl.sum(acc, axis=0) / total)


@triton.jit
def _fwd_apply_kernel(x_ptr, gamma_ptr, beta_ptr, out_ptr, mean_ptr, var_ptr, P, NB, HW, SEG_STRIDE, eps,
                      BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    g, p, offs, m, cnt = _block(pid, P, NB, HW, SEG_STRIDE, BLOCK)
    mean = tl.load(mean_ptr + g)
    rstd = 1.0 / tl.sqrt(tl.load(var_ptr + g) + eps)
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    gamma = tl.load(gamma_ptr + offs, mask=m, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + offs, mask=m, other=0.0).to(tl.float32)
    y = (x - mean) * rstd * (1.0 + gamma) + beta
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bwd_partial_kernel(dy_ptr, x_ptr, gamma_ptr, mean_ptr, var_ptr, dx_ptr, dgamma_ptr, dbeta_ptr, ps1_ptr, ps2_ptr,
                        P, NB, HW, SEG_STRIDE, eps, USE_INPUT_STATS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    g, p, offs, m, cnt = _block(pid, P, NB, HW, SEG_STRIDE, BLOCK)
    mean = tl.load(mean_ptr + g)
    rstd = 1.0 / tl.sqrt(tl.load(var_ptr + g) + eps)
    dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    gamma = tl.load(gamma_ptr + offs, mask=m, other=0.0).to(tl.float32)
    xhat = tl.where(m, (x - mean) * rstd, 0.0)
    dxh = dy * (1.0 + gamma)
    tl.store(dgamma_ptr + offs, (dy * xhat).to(dgamma_ptr.dtype.element_ty), mask=m)
    tl.store(dbeta_ptr + offs, dy.to(dbeta_ptr.dtype.element_ty), mask=m)
    if USE_INPUT_STATS:
        tl.store(ps1_ptr + pid, tl.sum(dxh, axis=0))
        tl.store(ps2_ptr + pid, tl.sum(dxh * xhat, axis=0))
    else:  # running statistics: the backward is elementwise, no phase 2
        tl.store(dx_ptr + offs, (rstd * dxh).to(dx_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bwd_finalize_kernel(ps1_ptr, ps2_ptr, a_ptr, b_ptr, P, total, BLOCK_P: tl.constexpr):
    g = tl.program_id(0)
    base = g.to(tl.int64) * P
    acc1 = tl.zeros([BLOCK_P], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_P], dtype=tl.float32)
    for start in range(0, P, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P)
        acc1 += tl.load(ps1_ptr + base + p, mask=p < P, other=0.0)
        acc2 += tl.load(ps2_ptr + base + p, mask=p < P, other=0.0)
    tl.store(a_ptr + g, tl.sum(acc1, axis=0) / total)
    tl.store(b_ptr + g, tl.sum(acc2, axis=0) / total)


@triton.jit
def _bwd_apply_kernel(dy_ptr, x_ptr, gamma_ptr, mean_ptr, var_ptr, a_ptr, b_ptr, dx_ptr, P, NB, HW, SEG_STRIDE, eps,
                      BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    g, p, offs, m, cnt = _block(pid, P, NB, HW, SEG_STRIDE, BLOCK)
    mean = tl.load(mean_ptr + g)
    rstd = 1.0 / tl.sqrt(tl.load(var_ptr + g) + eps)
    dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    gamma = tl.load(gamma_ptr + offs, mask=m, other=0.0).to(tl.float32)
    xhat = (x - mean) * rstd
    dx = rstd * (dy * (1.0 + gamma) - tl.load(a_ptr + g) - xhat * tl.load(b_ptr + g))
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


def spade_norm_fwd_triton(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, mean: torch.Tensor | None,
                          var: torch.Tensor | None, instance: bool, eps: float
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward. x, gamma, beta: contiguous [N, C, H, W]; mean, var: float32 [G] running statistics (eval) or None
    (statistics from x). Returns (out [N, C, H, W] in x's dtype, mean [G], biased var [G]) with G = C (batch) or
    N C (instance); mean / var are new float32 tensors (copies of the given ones in eval)."""
    groups, segs, hw, seg_stride = _layout(x, instance)
    out = torch.empty_like(x)
    use_stats = mean is None
    if use_stats:
        mean = torch.empty(groups, dtype=torch.float32, device=x.device)
        var = torch.empty(groups, dtype=torch.float32, device=x.device)
    else:
        mean, var = mean.to(torch.float32, copy=True), var.to(torch.float32, copy=True)
    if out.numel() == 0:
        return out, mean, var
    if plan(segs, hw) == "single":
        _fwd_single_kernel[(groups,)](x, gamma, beta, out, mean, var, segs, hw, seg_stride, float(segs * hw),
                                      eps, use_stats,
                                      triton.next_power_of_2(segs), triton.next_power_of_2(hw))
        return out, mean, var
    nb = triton.cdiv(hw, BLOCK)
    parts = segs * nb
    grid = (groups * parts,)
    if use_stats:
        pmean = torch.empty(groups * parts, dtype=torch.float32, device=x.device)
        pm2 = torch.empty_like(pmean)
        _fwd_partial_kernel[grid](x, pmean, pm2, parts, nb, hw, seg_stride, BLOCK)
        _fwd_finalize_kernel[(groups,)](pmean, pm2, mean, var, parts, nb, hw, float(segs * hw), BLOCK,
                                        BLOCK_P)
    _fwd_apply_kernel[grid](x, gamma, beta, out, mean, var, parts, nb, hw, seg_stride, eps, BLOCK)
    return out, mean, var


def spade_norm_bwd_triton(dy: torch.Tensor, x: torch.Tensor, gamma: torch.Tensor, mean: torch.Tensor,
                          var: torch.Tensor, instance: bool, use_input_stats: bool, eps: float
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward. dy, x, gamma: contiguous [N, C, H, W]; mean, var: the forward's float32 [G]. ``use_input_stats``:
    the statistics came from x (their gradient flows into dx). Returns (dx, d_gamma, d_beta), each [N, C, H, W]."""
    groups, segs, hw, seg_stride = _layout(x, instance)
    dx, dgamma, dbeta = torch.empty_like(x), torch.empty_like(gamma), torch.empty_like(gamma)
    if x.numel() == 0:
        return dx, dgamma, dbeta
    if plan(segs, hw) == "single":
        _bwd_single_kernel[(groups,)](dy, x, gamma, mean, var, dx, dgamma, dbeta, segs, hw, seg_stride,
                                      float(segs * hw), eps, use_input_stats, triton.next_power_of_2(segs),
                                      triton.next_power_of_2(hw))
        return dx, dgamma, dbeta
    nb = triton.cdiv(hw, BLOCK)
    parts = segs * nb
    grid = (groups * parts,)
    ps1 = torch.empty(groups * parts if use_input_stats else 1, dtype=torch.float32, device=x.device)
    ps2 = torch.empty_like(ps1)
    _bwd_partial_kernel[grid](dy, x, gamma, mean, var, dx, dgamma, dbeta, ps1, ps2, parts, nb, hw, seg_stride, eps,
                              use_input_stats, BLOCK)
    if use_input_stats:
        a = torch.empty(groups, dtype=torch.float32, device=x.device)
        b = torch.empty_like(a)
        _bwd_finalize_kernel[(groups,)](ps1, ps2, a, b, parts, float(segs * hw), BLOCK_P)
        _bwd_apply_kernel[grid](dy, x, gamma, mean, var, a, b, dx, parts, nb, hw, seg_stride, eps, BLOCK)
    return dx, dgamma, dbeta
