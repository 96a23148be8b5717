"""Triton IPOT: one program per (text, image) pair, all iterations in one launch.

Two kernels serve every size the op accepts:

* ``_ipot_kernel`` (register tile): the whole [N, M] pair (next powers of two) stays in registers for all
  iterations. Used while the tile has at most :data:`REGISTER_TILE_MAX` elements: 64 x 128 fp32 at 8 warps
  compiles to 255 registers and no spills for sm_80 / sm_90; 128 x 128 spills (``benchmarks/aot_report.py``).
* ``_ipot_tiled_kernel`` (workspace): larger pairs. Q lives in the output buffer (global memory, L2-resident
  for WRA sizes) and the scalings sigma [N] / delta [M] in a small global workspace; every pass walks the pair
  in [TILED_BLOCK_N, TILED_BLOCK_M] tiles: a column pass (Q = A .* P fused with the column sums that give
  delta) and a row pass (the row dots that give sigma), with a CTA barrier between passes so that every
  thread sees the other threads' global writes. A = exp(-C / beta) is recomputed from the cost each
  iteration (one load either way), so no [N, M] workspace beyond the output is needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

REGISTER_TILE_MAX = 64 * 128  # elements of the register tile; above it the tiled kernel runs
TILED_BLOCK_N = 64
TILED_BLOCK_M = 64
TILED_WARPS = 8


def tile_shape(n: int, m: int) -> tuple[int, int]:
    """Register tile (powers of two, >= 16) that holds an [n, m] pair."""
    return max(16, triton.next_power_of_2(n)), max(16, triton.next_power_of_2(m))


def uses_register_tile(n: int, m: int) -> bool:
    """True when an [n, m] pair runs in the register-tile kernel (else the tiled workspace kernel)."""
    bn, bm = tile_shape(n, m)
    return bn * bm <= REGISTER_TILE_MAX


def register_warps(bn: int, bm: int) -> int:
    return 4 if bn * bm <= 4096 else 8


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


@triton.jit
def _valid_count(pad_ptr, L, BLOCK: tl.constexpr):
    count = 0.0
    for l0 in range(0, L, BLOCK):
        idx = l0 + tl.arange(0, BLOCK)
        ok = (idx < L) & (tl.load(pad_ptr + idx, mask=idx < L, other=1) == 0)
        count += tl.sum(ok.to(tl.float32), axis=0)
    return count


@triton.jit
def _ipot_tiled_kernel(cost_ptr, txt_pad_ptr, img_pad_ptr, plan_ptr, vec_ptr, N, M, beta, iterations, k,
                       BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    tpad = txt_pad_ptr + b * N
    ipad = img_pad_ptr + b * M
    C = cost_ptr + b * N * M
    Q = plan_ptr + b * N * M  # Q lives in the output until the final pass turns it into the plan
    sig = vec_ptr + b * (N + M)  # sigma [N], then delta [M]
    dlt = sig + N
    n_len = _valid_count(tpad, N, BLOCK_N)
    m_len = _valid_count(ipad, M, BLOCK_M)
    for i0 in range(0, N, BLOCK_N):
        rows = i0 + tl.arange(0, BLOCK_N)
        ok = (rows < N) & (tl.load(tpad + rows, mask=rows < N, other=1) == 0)
        tl.store(sig + rows, tl.where(ok, 1.0 / tl.maximum(n_len, 1.0), 0.0), mask=rows < N)
    tl.debug_barrier()
    for it in range(iterations):
        for r in range(k):
            # Column pass: (r == 0) Q = A .* (sigma Q delta) of the last iteration (P = 1 at it == 0), then
            # delta_j = 1 / (m_len * sum_i Q_ij sigma_i + pad penalty). Column tile j reads and then rewrites
            # only its own delta entries.
            for j0 in range(0, M, BLOCK_M):
                cols = j0 + tl.arange(0, BLOCK_M)
                in_m = cols < M
                img_ok = in_m & (tl.load(ipad + cols, mask=in_m, other=1) == 0)
                d_old = tl.load(dlt + cols, mask=in_m, other=0.0, cache_modifier=".cg")
                acc = tl.zeros([BLOCK_M], tl.float32)
                for i0 in range(0, N, BLOCK_N):
                    rows = i0 + tl.arange(0, BLOCK_N)
                    in_n = rows < N
                    s = tl.load(sig + rows, mask=in_n, other=0.0, cache_modifier=".cg")
                    offs = rows[:, None] * M + cols[None, :]
                    box = in_n[:, None] & in_m[None, :]
                    if r == 0:
                        txt_ok = in_n & (tl.load(tpad + rows, mask=in_n, other=1) == 0)
                        live = txt_ok[:, None] & img_ok[None, :]
                        A = tl.where(live, tl.exp(-tl.load(C + offs, mask=box, other=0.0) / beta), 0.0)
                        if it == 0:
                            q = A
                        else:
                            q_old = tl.load(Q + offs, mask=box, other=0.0, cache_modifier=".cg")
                            q = A * (s[:, None] * q_old * d_old[None, :])
                        tl.store(Q + offs, q, mask=box)
                    else:
                        q = tl.load(Q + offs, mask=box, other=0.0, cache_modifier=".cg")
                    acc += tl.sum(q * s[:, None], axis=0)
                den = m_len * acc + tl.where(img_ok, 0.0, 1e4)
                tl.debug_barrier()  # every thread has read d_old before any thread overwrites it
                tl.store(dlt + cols, 1.0 / tl.where(den == 0.0, 1.0, den), mask=in_m)
            tl.debug_barrier()
            # Row pass: sigma_i = 1 / (n_len * sum_j Q_ij delta_j + pad penalty).
            for i0 in range(0, N, BLOCK_N):
                rows = i0 + tl.arange(0, BLOCK_N)
                in_n = rows < N
                txt_ok = in_n & (tl.load(tpad + rows, mask=in_n, other=1) == 0)
                acc = tl.zeros([BLOCK_N], tl.float32)
                for j0 in range(0, M, BLOCK_M):
                    cols = j0 + tl.arange(0, BLOCK_M)
                    in_m = cols < M
                    d = tl.load(dlt + cols, mask=in_m, other=0.0, cache_modifier=".cg")
                    q = tl.load(Q + rows[:, None] * M + cols[None, :], mask=in_n[:, None] & in_m[None, :], other=0.0,
                                cache_modifier=".cg")
                    acc += tl.sum(q * d[None, :], axis=1)
                den = n_len * acc + tl.where(txt_ok, 0.0, 1e4)
                tl.store(sig + rows, 1.0 / tl.where(den == 0.0, 1.0, den), mask=in_n)
            tl.debug_barrier()
    # Final pass: P = sigma Q delta (P = 1 with no iteration), 0 at pads and for an all-padding side.
    for i0 in range(0, N, BLOCK_N):
        rows = i0 + tl.arange(0, BLOCK_N)
        in_n = rows < N
        txt_ok = in_n & (tl.load(tpad + rows, mask=in_n, other=1) == 0)
        s = tl.load(sig + rows, mask=in_n, other=0.0, cache_modifier=".cg")
        for j0 in range(0, M, BLOCK_M):
            cols = j0 + tl.arange(0, BLOCK_M)
            in_m = cols < M
            img_ok = in_m & (tl.load(ipad + cols, mask=in_m, other=1) == 0)
            live = txt_ok[:, None] & img_ok[None, :]
            offs = rows[:, None] * M + cols[None, :]
            box = in_n[:, None] & in_m[None, :]
            if iterations > 0:
                d = tl.load(dlt + cols, mask=in_m, other=0.0, cache_modifier=".cg")
                q = tl.load(Q + offs, mask=box, other=0.0, cache_modifier=".cg")
                p = s[:, None] * q * d[None, :]
            else:
                p = tl.full([BLOCK_N, BLOCK_M], 1.0, tl.float32)
            p = tl.where(live, p, 0.0)
            tl.store(Q + offs, tl.where(n_len * m_len > 0, p, 0.0), mask=box)


def ipot_plan_triton(cost: torch.Tensor, txt_pad: torch.Tensor, img_pad: torch.Tensor, beta: float, iterations: int,
                     k: int, *, tiled: bool | None = None, block: tuple[int, int] | None = None) -> torch.Tensor:
    """Launcher. cost [B, N, M] float32, pads bool -> plan [B, N, M] float32.

    ``tiled`` (default: only when the register tile is too large) and ``block`` (the tiled kernel's tile,
    default (TILED_BLOCK_N, TILED_BLOCK_M)) exist for tests that cover the workspace path at small sizes.
    """
    cost = cost.contiguous()
    B, N, M = cost.shape
    plan = torch.empty_like(cost)
    if plan.numel() == 0:
        return plan
    tp, ip = txt_pad.contiguous().view(torch.uint8), img_pad.contiguous().view(torch.uint8)
    if tiled is None:
        tiled = not uses_register_tile(N, M)
    if not tiled:
        bn, bm = tile_shape(N, M)
        _ipot_kernel[(B,)](cost, tp, ip, plan, N, M, float(beta), int(iterations), int(k), BLOCK_N=bn, BLOCK_M=bm,
                           num_warps=register_warps(bn, bm))
        return plan
    bn, bm = block or (TILED_BLOCK_N, TILED_BLOCK_M)
    vec = torch.empty(B, N + M, device=cost.device, dtype=torch.float32)
    _ipot_tiled_kernel[(B,)](cost, tp, ip, plan, vec, N, M, float(beta), int(iterations), int(k), BLOCK_N=bn,
                             BLOCK_M=bm, num_warps=TILED_WARPS)
    return plan
