"""Triton IPOT: one program per (text, image) pair; the [N, M] plan stays in registers for all iterations."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def tile_shape(n: int, m: int) -> tuple[int, int]:
    """Register tile (powers of two, >= 16) that holds an [n, m] pair."""
    return max(16, triton.next_power_of_2(n)), max(16, triton.next_power_of_2(m))


@triton.jit
def _ipot_kernel(cost_ptr, txt_pad_ptr, img_pad_ptr, plan_ptr, N, M, beta, iterations, k,
                 BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_M)
    in_n = rows < N
    in_m = cols < M
    txt_pad = tl.load(txt_pad_ptr + b * N + rows, mask=in_n, other=1) != 0
    img_pad = tl.load(img_pad_ptr + b * M + cols, mask=in_m, other=1) != 0
    txt_ok = in_n & (txt_pad == 0)
    img_ok = in_m & (img_pad == 0)
    n_len = tl.sum(txt_ok.to(tl.float32), axis=0)
    m_len = tl.sum(img_ok.to(tl.float32), axis=0)
    live = txt_ok[:, None] & img_ok[None, :]
    offs = b * N * M + rows[:, None] * M + cols[None, :]
    box = in_n[:, None] & in_m[None, :]
    cost = tl.load(cost_ptr + offs, mask=box, other=0.0)
    A = tl.where(live, tl.exp(-cost / beta), 0.0)
    txt_penalty = tl.where(txt_ok, 0.0, 1e4)
    img_penalty = tl.where(img_ok, 0.0, 1e4)
    sigma = tl.where(txt_ok, 1.0 / tl.maximum(n_len, 1.0), 0.0)
    delta = tl.full([BLOCK_M], 1.0, tl.float32)
    P = tl.where(live, 1.0, 0.0)
    for _ in range(iterations):
        Q = A * P
        for _ in range(k):
            # (a zero denominator only arises when one side is all padding; that plan is zeroed below)
            den = m_len * tl.sum(Q * sigma[:, None], axis=0) + img_penalty
            delta = 1.0 / tl.where(den == 0.0, 1.0, den)
            den = n_len * tl.sum(Q * delta[None, :], axis=1) + txt_penalty
            sigma = 1.0 / tl.where(den == 0.0, 1.0, den)
        P = sigma[:, None] * Q * delta[None, :]
    P = tl.where(live, P, 0.0)
    P = tl.where(n_len * m_len > 0, P, 0.0)  # an all-padding side transports nothing
    tl.store(plan_ptr + offs, P, mask=box)


def ipot_plan_triton(cost: torch.Tensor, txt_pad: torch.Tensor, img_pad: torch.Tensor, beta: float, iterations: int,
                     k: int) -> torch.Tensor:
    """Launcher. cost [B, N, M] float32, pads bool -> plan [B, N, M] float32."""
    cost = cost.contiguous()
    B, N, M = cost.shape
    plan = torch.empty_like(cost)
    if plan.numel() == 0:
        return plan
    bn, bm = tile_shape(N, M)
    _ipot_kernel[(B,)](cost, txt_pad.contiguous().view(torch.uint8), img_pad.contiguous().view(torch.uint8), plan,
                       N, M, float(beta), int(iterations), int(k), BLOCK_N=bn, BLOCK_M=bm,
                       num_warps=4 if bn * bm <= 4096 else 8)
    return plan
