"""Triton VILLA adversarial step and init scaling (see fastvl/ops/adv_perturb.py for the math).

Two-phase reduction, like the CUDA kernels: every example is cut into chunks of whole rows (~8K elements),
one program per chunk. Phase 1 writes each chunk's sums (g^2, d^2, d*g, max |g|); phase 2 combines the
example's partials in a fixed order, derives the step and updates its chunk in place. Two perturbations
(text and image) share each launch: programs [0, N0) serve the first, the rest the second.

A padded slot's example b is rows [b L, b L + L) with its mask row; a packed slot's example b is rows
[cu[b], cu[b+1]) (at most max_seqlen = L of them), all valid.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK_ELEMS = 8192
BLOCK = 1024
NORM_EPS = tl.constexpr(1e-8)


def chunking(L: int, D: int) -> tuple[int, int]:
    """(rows per chunk, chunks per example) for an example of L rows of D elements."""
    rows = max(1, min(L, CHUNK_ELEMS // max(D, 1)))
    return rows, -(-L // rows)


@triton.jit
def _example_rows(m_ptr, b, L, HAS_CU: tl.constexpr):
    """(first row, row count) of example b."""
    if HAS_CU:
        row0 = tl.load(m_ptr + b).to(tl.int64)
        n = tl.maximum(tl.minimum(tl.load(m_ptr + b + 1) - tl.load(m_ptr + b), L), 0)
    else:
        row0 = b * L
        n = L
    return row0, n


@triton.jit
def _valid(m_ptr, b, L, e, D, inb, HAS_CU: tl.constexpr):
    if HAS_CU:
        return inb
    else:
        return inb & (tl.load(m_ptr + b * L + e // D, mask=inb, other=0) != 0)


@triton.jit
def _slot_stats(d_ptr, g_ptr, m_ptr, part_ptr, pid, local, L, D, ROWS, CHUNKS, HAS_CU: tl.constexpr,
                NEED_D: tl.constexpr, BLOCK: tl.constexpr):
    b = (local // CHUNKS).to(tl.int64)
    c = local % CHUNKS
    row0, n = _example_rows(m_ptr, b, L, HAS_CU)
    r0 = c * ROWS
    end = tl.minimum(r0 + ROWS, n) * D
    base = row0 * D
    offs = tl.arange(0, BLOCK)
    acc_gg = tl.zeros([BLOCK], tl.float32)
    acc_dd = tl.zeros([BLOCK], tl.float32)
    acc_dg = tl.zeros([BLOCK], tl.float32)
    acc_max = tl.zeros([BLOCK], tl.float32)
    for start in range(r0 * D, end, BLOCK):
        e = start + offs
        inb = e < end
        valid = _valid(m_ptr, b, L, e, D, inb, HAS_CU)
        g = tl.load(g_ptr + base + e, mask=valid, other=0.0).to(tl.float32)
        acc_gg += g * g
        acc_max = tl.maximum(acc_max, tl.abs(g))
        if NEED_D:
            d = tl.load(d_ptr + base + e, mask=valid, other=0.0).to(tl.float32)
            acc_dd += d * d
            acc_dg += d * g
    gmax = tl.max(acc_max, axis=0)
    tl.store(part_ptr + pid * 4 + 0, tl.sum(acc_gg, axis=0))
    tl.store(part_ptr + pid * 4 + 1, tl.sum(acc_dd, axis=0))
    tl.store(part_ptr + pid * 4 + 2, tl.sum(acc_dg, axis=0))
    tl.store(part_ptr + pid * 4 + 3, gmax)


@triton.jit
def _stats_kernel(d0, g0, m0, L0, D0, ROWS0, CHUNKS0, N0, d1, g1, m1, L1, D1, ROWS1, CHUNKS1, part_ptr,
                  CU0: tl.constexpr, CU1: tl.constexpr, NEED_D: tl.constexpr, TWO: tl.constexpr,
                  BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if TWO:
        if pid < N0:
            _slot_stats(d0, g0, m0, part_ptr, pid, pid, L0, D0, ROWS0, CHUNKS0, CU0, NEED_D, BLOCK)
        else:
            _slot_stats(d1, g1, m1, part_ptr, pid, pid - N0, L1, D1, ROWS1, CHUNKS1, CU1, NEED_D, BLOCK)
    else:
        _slot_stats(d0, g0, m0, part_ptr, pid, pid, L0, D0, ROWS0, CHUNKS0, CU0, NEED_D, BLOCK)


@triton.jit
def _slot_update(d_ptr, g_ptr, m_ptr, part_ptr, first, local, L, D, ROWS, CHUNKS, lr, max_norm, HAS_CU: tl.constexpr,
                 L2: tl.constexpr, MAX_CHUNKS: tl.constexpr, BLOCK: tl.constexpr):
    b = (local // CHUNKS).to(tl.int64)
    c = local % CHUNKS
    k = tl.arange(0, MAX_CHUNKS)
    p = part_ptr + (first + b * CHUNKS + k) * 4
    km = k < CHUNKS
    gg = tl.sum(tl.load(p + 0, mask=km, other=0.0), axis=0)
    if L2:
        gnorm = tl.sqrt(gg)
    else:
        gnorm = tl.max(tl.load(p + 3, mask=km, other=0.0), axis=0)
        gnorm = tl.where(gg != gg, gg, gnorm)  # max may drop a NaN gradient; the sum of squares never does
    scale = lr / tl.maximum(gnorm, NORM_EPS, propagate_nan=tl.PropagateNan.ALL)
    if L2:
        dd = tl.sum(tl.load(p + 1, mask=km, other=0.0), axis=0)
        dg = tl.sum(tl.load(p + 2, mask=km, other=0.0), axis=0)
        n = tl.sqrt(tl.maximum(dd + 2.0 * scale * dg + scale * scale * gg, 0.0))
        project = (max_norm > 0) & (n > max_norm)
        factor = tl.where(project, max_norm / tl.where(project, n, 1.0), 1.0)
    else:
        factor = 1.0
    row0, n = _example_rows(m_ptr, b, L, HAS_CU)
    r0 = c * ROWS
    end = tl.minimum(r0 + ROWS, n) * D
    base = row0 * D
    offs = tl.arange(0, BLOCK)
    for start in range(r0 * D, end, BLOCK):
        e = start + offs
        inb = e < end
        valid = _valid(m_ptr, b, L, e, D, inb, HAS_CU)
        d = tl.load(d_ptr + base + e, mask=valid, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + base + e, mask=valid, other=0.0).to(tl.float32)
        out = (d + scale * g) * factor
        if not L2:
            out = tl.where(max_norm > 0, tl.minimum(tl.maximum(out, -max_norm), max_norm), out)
        out = tl.where(valid, out, 0.0)
        tl.store(d_ptr + base + e, out.to(d_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _update_kernel(d0, g0, m0, L0, D0, ROWS0, CHUNKS0, N0, lr0, mx0, d1, g1, m1, L1, D1, ROWS1, CHUNKS1, lr1, mx1,
                   part_ptr, CU0: tl.constexpr, CU1: tl.constexpr, L2: tl.constexpr, TWO: tl.constexpr,
                   MAX_CHUNKS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if TWO:
        if pid < N0:
            _slot_update(d0, g0, m0, part_ptr, 0, pid, L0, D0, ROWS0, CHUNKS0, lr0, mx0, CU0, L2, MAX_CHUNKS, BLOCK)
        else:
            _slot_update(d1, g1, m1, part_ptr, N0, pid - N0, L1, D1, ROWS1, CHUNKS1, lr1, mx1, CU1, L2, MAX_CHUNKS,
                         BLOCK)
    else:
        _slot_update(d0, g0, m0, part_ptr, 0, pid, L0, D0, ROWS0, CHUNKS0, lr0, mx0, CU0, L2, MAX_CHUNKS, BLOCK)


@triton.jit
def _init_kernel(x_ptr, m_ptr, L, D, ROWS, CHUNKS, init_mag, HAS_CU: tl.constexpr, L2: tl.constexpr,
                 BLOCK_L: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // CHUNKS).to(tl.int64)
    c = pid % CHUNKS
    row0, n = _example_rows(m_ptr, b, L, HAS_CU)
    if HAS_CU:
        n_valid = n.to(tl.float32)
    else:
        lo = tl.arange(0, BLOCK_L)
        count = tl.zeros([BLOCK_L], tl.float32)
        for s in range(0, L, BLOCK_L):
            count += (tl.load(m_ptr + b * L + s + lo, mask=s + lo < L, other=0) != 0).to(tl.float32)
        n_valid = tl.sum(count, axis=0)
    if L2:
        coeff = tl.where(n_valid > 0, init_mag / tl.sqrt(tl.maximum(n_valid, 1.0) * D), 0.0)
    else:
        coeff = init_mag
    r0 = c * ROWS
    end = tl.minimum(r0 + ROWS, n) * D
    base = row0 * D
    offs = tl.arange(0, BLOCK)
    for start in range(r0 * D, end, BLOCK):
        e = start + offs
        inb = e < end
        valid = _valid(m_ptr, b, L, e, D, inb, HAS_CU)
        v = tl.load(x_ptr + base + e, mask=valid, other=0.0).to(tl.float32) * coeff
        if not L2:
            v = tl.minimum(tl.maximum(v, -init_mag), init_mag)
        tl.store(x_ptr + base + e, tl.where(valid, v, 0.0).to(x_ptr.dtype.element_ty), mask=inb)


def _mask_arg(mask: torch.Tensor) -> torch.Tensor:
    """bool masks as bytes; cu_seqlens (int32) as they are."""
    return mask.contiguous().view(torch.uint8) if mask.dtype == torch.bool else mask.contiguous()


def _slot(delta: torch.Tensor, mask: torch.Tensor, max_seqlen: int) -> tuple[int, int, int, int, int, bool]:
    """(B, L, D, rows per chunk, chunks per example, packed) of a padded [B, L, D] or packed [T, D] delta."""
    packed = delta.dim() == 2
    B, L, D = (mask.shape[0] - 1, max_seqlen, delta.shape[1]) if packed else tuple(delta.shape)
    return (B, L, D, *chunking(L, D), packed)


def adv_perturb_step_triton(deltas: list[torch.Tensor], grads: list[torch.Tensor], masks: list[torch.Tensor],
                            lrs: list[float], norm: str, max_norms: list[float], max_seqlens: list[int]) -> None:
    """Launcher: updates every contiguous delta (padded [B, L, D] + bool mask, or packed [T, D] + int32 cu_seqlens)
    in place, two perturbations per launch."""
    live = [k for k, d in enumerate(deltas) if d.numel() > 0]
    for i in range(0, len(live), 2):
        pair = live[i:i + 2]
        slots = [_slot(deltas[k], masks[k], max_seqlens[k]) for k in pair]
        counts = [sl[0] * sl[4] for sl in slots]
        if sum(counts) == 0:
            continue
        two = len(pair) == 2
        a, z = pair[0], pair[-1]
        (_, La, Da, Ra, Ca, Pa), (_, Lz, Dz, Rz, Cz, Pz) = slots[0], slots[-1]
        ma, mz = _mask_arg(masks[a]), _mask_arg(masks[z])
        partials = torch.empty(sum(counts), 4, dtype=torch.float32, device=deltas[a].device)
        need_d = norm == "l2" and any(max_norms[k] > 0 for k in pair)
        grid = (sum(counts),)
        _stats_kernel[grid](deltas[a], grads[a], ma, La, Da, Ra, max(Ca, 1), counts[0],
                            deltas[z], grads[z], mz, Lz, Dz, Rz, max(Cz, 1), partials,
                            CU0=Pa, CU1=Pz, NEED_D=need_d, TWO=two, BLOCK=BLOCK, num_warps=4)
        max_chunks = max(16, triton.next_power_of_2(max(Ca, Cz)))
        _update_kernel[grid](deltas[a], grads[a], ma, La, Da, Ra, max(Ca, 1), counts[0], float(lrs[a]),
                             float(max_norms[a]), deltas[z], grads[z], mz, Lz, Dz, Rz, max(Cz, 1),
                             float(lrs[z]), float(max_norms[z]), partials, CU0=Pa, CU1=Pz, L2=norm == "l2",
                             TWO=two, MAX_CHUNKS=max_chunks, BLOCK=BLOCK, num_warps=4)


def adv_perturb_init_triton(noise: torch.Tensor, mask: torch.Tensor, init_mag: float, norm: str,
                            max_seqlen: int) -> None:
    """Launcher: scales contiguous noise (padded [B, L, D] + bool mask, or packed [T, D] + int32 cu_seqlens) in
    place into the init perturbation."""
    if noise.numel() == 0:
        return
    B, L, D, rows, chunks, packed = _slot(noise, mask, max_seqlen)
    if B * chunks == 0:
        return
    _init_kernel[(B * chunks,)](noise, _mask_arg(mask), L, D, rows, chunks, float(init_mag), HAS_CU=packed,
                                L2=norm == "l2", BLOCK_L=min(1024, triton.next_power_of_2(max(L, 1))), BLOCK=BLOCK,
                                num_warps=4)
