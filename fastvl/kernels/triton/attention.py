"""Triton kernels of fastvl.ops.cross_modal_attention: packed varlen FlashAttention-2 style forward and backward.

Layout: q [total_q, heads, head_dim], k / v [total_k, heads, head_dim] (last dim contiguous; token and head strides
are free, so views into a fused QKV projection need no copy), ``cu_seqlens_*`` [B+1]. No S x S matrix is ever
stored: the forward keeps a running max / sum per query row (online softmax, exp2 domain) and saves only the
log-sum-exp per row ([heads, total_q] float32); the backward recomputes the probabilities block by block.

Scheduling: one program per (query block, sequence, head) in the forward; in the backward one program per
(block index, sequence, head) that computes dK/dV of its key block (looping over query blocks) and then dQ of its
query block (looping over key blocks). No atomics, so the backward is deterministic (bitwise reproducible).
Programs whose block starts past their sequence's length exit at once (ragged batches waste no FLOPs beyond the
last partial block). Inside a program the key loop is split into blocks that need no mask (every key visible to
every query row of the block) and the few boundary blocks that do.

Masks (``MASK`` constexpr): 0 = every key of the sequence (bidirectional and cross), 1 = seq2seq (key j visible to
query i iff j < prefix_lens[b] or j <= i). A row with no visible key outputs 0 and stores lse = +inf, so that the
backward's recomputed probabilities of that row are 0 as well.

Dropout: Philox (``tl.rand``) keyed by a seed read from device memory and the element's global offset
((row * heads + head) * max_seqlen_k + key index within the sequence, int64), so the backward (and
:func:`dropout_keep_mask`, which tests use) regenerate exactly the forward's keep-mask. Kept probabilities are
scaled by 1 / (1 - p) (the normaliser uses all probabilities, as ``F.dropout`` after ``softmax`` does).

Block sizes come from a fixed table (:func:`fwd_config`, :func:`bwd_config`: short sequences, UNITER's 20-160
tokens, get 64-row tiles; long ones 128) unless ``FASTVL_TRITON_AUTOTUNE=1`` asks for autotuning over candidates
(keyed by length class, head_dim, mask, dropout, precision).

head_dim is padded to the next power of two inside the kernels (80 and 96 run as 128 with masked loads/stores).
float32 inputs use IEEE products (no TF32), so they meet the float32 tolerance of the tests.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

HEAD_DIMS = (16, 32, 64, 80, 96, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MASK_CODES = {"bidirectional": 0, "cross": 0, "seq2seq": 1}
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------------------
# Configurations: a fixed table by default (no tuning cost: every new shape class would otherwise compile and time
# every candidate); FASTVL_TRITON_AUTOTUNE=1 autotunes over the candidates instead. The interpreter always runs
# one small configuration.
# ----------------------------------------------------------------------------------------------------------

SHORT = 256  # sequences up to this length form one tuning class (UNITER: 20-160 tokens)


def autotune_enabled() -> bool:
    return os.environ.get("FASTVL_TRITON_AUTOTUNE") == "1" and not INTERPRET


def fwd_config(d_pad: int, dtype: torch.dtype, max_seqlen: int, dropout: bool = False) -> dict:
    """BLOCK_M, BLOCK_N, num_warps, num_stages of the forward.

    Chosen without spilling registers on sm_90 / sm_80 (checked by compiling ahead of time: ptxas resource usage);
    the Philox dropout needs the extra registers of 8 warps.
    """
    if INTERPRET:
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:  # IEEE products run on FMA units: small tiles
        tile = 32 if d_pad <= 64 else 16
        return dict(BLOCK_M=tile, BLOCK_N=tile, num_warps=4, num_stages=1)
    if d_pad > 64:
        if max_seqlen <= SHORT:
            return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2)
        return dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3)
    if max_seqlen <= SHORT:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8 if dropout else 4, num_stages=2)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)


def bwd_config(d_pad: int, dtype: torch.dtype, max_seqlen: int, dropout: bool = False) -> dict:
    """BLOCK_M1 / BLOCK_N1 (dK dV: query rows per step / keys per program), BLOCK_M2 / BLOCK_N2 (dQ), warps, stages.

    As for the forward, chosen without register spills on sm_90 / sm_80.
    """
    if INTERPRET:
        return dict(BLOCK_M1=16, BLOCK_N1=16, BLOCK_M2=16, BLOCK_N2=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M1=16, BLOCK_N1=16, BLOCK_M2=16, BLOCK_N2=16, num_warps=4, num_stages=1)
    if d_pad > 64:  # dK and dV accumulators of [BLOCK_N1, 128] float32 each
        return dict(BLOCK_M1=16, BLOCK_N1=32, BLOCK_M2=32, BLOCK_N2=16, num_warps=4, num_stages=2)
    if max_seqlen <= SHORT:
        return dict(BLOCK_M1=32, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=32, num_warps=8, num_stages=2)
    return dict(BLOCK_M1=32, BLOCK_N1=128, BLOCK_M2=128, BLOCK_N2=32, num_warps=8, num_stages=3)


def _fwd_candidates() -> list[triton.Config]:
    shapes = [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 2), (64, 64, 8, 2), (128, 32, 8, 3), (32, 32, 4, 1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def _bwd_candidates() -> list[triton.Config]:
    shapes = [(32, 128, 128, 32, 8, 3), (32, 64, 64, 32, 8, 2), (32, 64, 64, 32, 4, 2), (64, 64, 64, 64, 8, 2),
              (16, 32, 32, 16, 4, 2), (16, 16, 16, 16, 4, 1)]
    return [triton.Config({"BLOCK_M1": m1, "BLOCK_N1": n1, "BLOCK_M2": m2, "BLOCK_N2": n2}, num_warps=w,
                          num_stages=s) for m1, n1, m2, n2, w, s in shapes]


def _prune_by_size(configs, named_args, **kwargs):
    """Drop the largest tiles for wide heads / float32 (shared memory, registers), keeping at least one config."""
    d_pad = kwargs.get("D_PAD", named_args.get("D_PAD", 64))
    wide = d_pad * (2 if kwargs.get("PRECISION", named_args.get("PRECISION")) == "ieee" else 1) > 64
    keep = []
    for c in configs:
        tiles = [v for k, v in c.kwargs.items() if k.startswith("BLOCK")]
        if wide and max(tiles) * min(tiles) >= 128 * 128:
            continue
        keep.append(c)
    return keep or configs[-1:]


# ----------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, lo, hi, offs_m, offs_n, offs_d, seqlen_k,
               prefix, qk_scale, seed, rng_rows, dropout_p, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
               MASKED: tl.constexpr, MASK: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_N: tl.constexpr):
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            kt = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None],
                         mask=(cols[None, :] < seqlen_k) & d_ok[:, None], other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :],
                        mask=(cols[:, None] < seqlen_k) & d_ok[None, :], other=0.0)
        elif HEAD_DIM == D_PAD:
            kt = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None])
            v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :])
        else:
            kt = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None], mask=d_ok[:, None], other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        if MASKED:
            vis = cols[None, :] < seqlen_k
            if MASK == 1:
                vis = vis & ((cols[None, :] < prefix) | (cols[None, :] <= offs_m[:, None]))
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            keep = tl.rand(seed, rng_rows[:, None] + cols[None, :]) >= dropout_p
            p = tl.where(keep, p, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, OUT, LSE, CU_Q, CU_K, PREFIX, SEED, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
              stride_vh, stride_ot, stride_oh, total_q, nheads, max_seqlen_k, qk_scale, dropout_p, SEQ_BUCKET,
              HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, MASK: tl.constexpr, DROPOUT: tl.constexpr,
              PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(CU_Q + b).to(tl.int64)
    seqlen_q = (tl.load(CU_Q + b + 1) - q_start).to(tl.int32)
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    k_start = tl.load(CU_K + b).to(tl.int64)
    seqlen_k = (tl.load(CU_K + b + 1) - k_start).to(tl.int32)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    row_ok = offs_m < seqlen_q
    d_ok = offs_d < HEAD_DIM
    q_base = Q + q_start * stride_qt + h * stride_qh
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                other=0.0)
    k_base = K + k_start * stride_kt + h * stride_kh
    v_base = V + k_start * stride_vt + h * stride_vh

    if MASK == 1:
        prefix = tl.load(PREFIX + b).to(tl.int32)
        hi = tl.minimum(seqlen_k, tl.maximum(prefix, start_m + BLOCK_M))
        full = tl.minimum(seqlen_k, tl.maximum(prefix, start_m + 1))  # keys visible to every row of the block
    else:
        prefix = 0
        hi = seqlen_k
        full = seqlen_k
    full = (full // BLOCK_N) * BLOCK_N
    if DROPOUT:
        seed = tl.load(SEED)
        rng_rows = ((q_start + offs_m) * nheads + h) * max_seqlen_k
    else:
        seed = 0
        rng_rows = offs_m

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, 0, full, offs_m, offs_n,
                               offs_d, seqlen_k, prefix, qk_scale, seed, rng_rows, dropout_p, HEAD_DIM, D_PAD,
                               False, MASK, DROPOUT, PRECISION, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, full, hi, offs_m, offs_n,
                               offs_d, seqlen_k, prefix, qk_scale, seed, rng_rows, dropout_p, HEAD_DIM, D_PAD,
                               True, MASK, DROPOUT, PRECISION, BLOCK_N)

    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]
    if DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    lse = tl.where(has_key, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("inf"))
    o_base = OUT + q_start * stride_ot + h * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :], out.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + h * total_q + q_start + offs_m, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _bwd_preprocess(OUT, DO, DELTA, stride_ot, stride_oh, stride_dot, stride_doh, total_q, HEAD_DIM: tl.constexpr,
                    D_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """delta[h, t] = sum_d dO[t, h, d] * O[t, h, d] (the row term of the softmax gradient)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    h = tl.program_id(1)
    offs_d = tl.arange(0, D_PAD)
    ok = (rows[:, None] < total_q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(OUT + rows[:, None].to(tl.int64) * stride_ot + h * stride_oh + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DO + rows[:, None].to(tl.int64) * stride_dot + h * stride_doh + offs_d[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + h * total_q + rows, delta, mask=rows < total_q)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, lo, hi, cols,
                    offs_m, offs_d, seqlen_q, prefix, qk_scale, seed, rng_cols, rng_stride, dropout_p,
                    HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, DROPOUT: tl.constexpr,
                    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    d_ok = offs_d < HEAD_DIM
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < seqlen_q
        q = tl.load(q_base + rows[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                    other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                     other=0.0)
        lse2 = tl.load(lse_base + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # [BLOCK_N, BLOCK_M]
        pt = tl.exp2(st * qk_scale - lse2[None, :])
        if MASKED:  # seq2seq only: key j visible to query i iff j < prefix or j <= i
            pt = tl.where((cols[:, None] < prefix) | (cols[:, None] <= rows[None, :]), pt, 0.0)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        if DROPOUT:
            keep = tl.rand(seed, rng_cols[:, None] + rows[None, :].to(tl.int64) * rng_stride) >= dropout_p
            dv = tl.dot(tl.where(keep, pt, 0.0).to(do.dtype), do, dv, input_precision=PRECISION)
            dpt = tl.where(keep, dpt * (1.0 / (1.0 - dropout_p)), 0.0)
        else:
            dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, lo, hi, rows, offs_n, offs_d,
                  seqlen_k, prefix, qk_scale, seed, rng_rows, dropout_p, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                  MASKED: tl.constexpr, MASK: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            ld = (cols[:, None] < seqlen_k) & d_ok[None, :]
            k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :], mask=ld, other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=ld, other=0.0)
        elif HEAD_DIM == D_PAD:
            k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :])
            v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :])
        else:
            k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :], mask=d_ok[None, :], other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        p = tl.exp2(s * qk_scale - lse2[:, None])
        if MASKED:
            vis = cols[None, :] < seqlen_k
            if MASK == 1:
                vis = vis & ((cols[None, :] < prefix) | (cols[None, :] <= rows[:, None]))
            p = tl.where(vis, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            keep = tl.rand(seed, rng_rows[:, None] + cols[None, :]) >= dropout_p
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd(Q, K, V, DO, DQ, DK, DV, LSE, DELTA, CU_Q, CU_K, PREFIX, SEED, stride_qt, stride_qh, stride_kt,
              stride_kh, stride_vt, stride_vh, stride_dot, stride_doh, stride_dqt, stride_dqh, stride_dkt, stride_dkh,
              stride_dvt, stride_dvh, total_q, nheads, max_seqlen_k, sm_scale, qk_scale, dropout_p, SEQ_BUCKET,
              HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, MASK: tl.constexpr, DROPOUT: tl.constexpr,
              PRECISION: tl.constexpr, BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_M2: tl.constexpr,
              BLOCK_N2: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(CU_Q + b).to(tl.int64)
    seqlen_q = (tl.load(CU_Q + b + 1) - q_start).to(tl.int32)
    k_start = tl.load(CU_K + b).to(tl.int64)
    seqlen_k = (tl.load(CU_K + b + 1) - k_start).to(tl.int32)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    if MASK == 1:
        prefix = tl.load(PREFIX + b).to(tl.int32)
    else:
        prefix = 0
    if DROPOUT:
        seed = tl.load(SEED)
    else:
        seed = 0
    q_base = Q + q_start * stride_qt + h * stride_qh
    do_base = DO + q_start * stride_dot + h * stride_doh
    k_base = K + k_start * stride_kt + h * stride_kh
    v_base = V + k_start * stride_vt + h * stride_vh
    lse_base = LSE + h * total_q + q_start
    delta_base = DELTA + h * total_q + q_start

    # ---- dK, dV of key block [start_n, start_n + BLOCK_N1)
    start_n = pid * BLOCK_N1
    if start_n < seqlen_k:
        cols = start_n + tl.arange(0, BLOCK_N1)
        col_ok = cols < seqlen_k
        kv_ok = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=kv_ok, other=0.0)
        dk = tl.zeros([BLOCK_N1, D_PAD], tl.float32)
        dv = tl.zeros([BLOCK_N1, D_PAD], tl.float32)
        offs_m1 = tl.arange(0, BLOCK_M1)
        rng_cols = (q_start * nheads + h) * max_seqlen_k + cols  # + row * (nheads * max_seqlen_k)
        rng_stride = nheads * max_seqlen_k
        if MASK == 1:
            # rows that see no key of this block are skipped; rows below the block's last key need the mask
            lo = tl.where(start_n < prefix, 0, start_n)
            needs_mask = start_n + BLOCK_N1 > prefix
            n_masked = tl.where(needs_mask, tl.cdiv(start_n + BLOCK_N1 - 1 - lo, BLOCK_M1), 0)
            mid = lo + n_masked * BLOCK_M1
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, lo,
                                     tl.minimum(mid, seqlen_q), cols, offs_m1, offs_d, seqlen_q, prefix, qk_scale,
                                     seed, rng_cols, rng_stride, dropout_p, HEAD_DIM, True, DROPOUT, PRECISION,
                                     BLOCK_M1)
        else:
            mid = 0
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, mid,
                                 seqlen_q, cols, offs_m1, offs_d, seqlen_q, prefix, qk_scale, seed, rng_cols,
                                 rng_stride, dropout_p, HEAD_DIM, False, DROPOUT, PRECISION, BLOCK_M1)
        if DROPOUT:
            dv = dv * (1.0 / (1.0 - dropout_p))
        dk = dk * sm_scale
        dk_base = DK + k_start * stride_dkt + h * stride_dkh
        dv_base = DV + k_start * stride_dvt + h * stride_dvh
        tl.store(dk_base + cols[:, None] * stride_dkt + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_ok)
        tl.store(dv_base + cols[:, None] * stride_dvt + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_ok)

    # ---- dQ of query block [start_m, start_m + BLOCK_M2)
    start_m = pid * BLOCK_M2
    if start_m < seqlen_q:
        rows = start_m + tl.arange(0, BLOCK_M2)
        row_ok = rows < seqlen_q
        q_ok = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + rows[:, None] * stride_qt + offs_d[None, :], mask=q_ok, other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dot + offs_d[None, :], mask=q_ok, other=0.0)
        lse2 = tl.load(lse_base + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        if MASK == 1:
            hi = tl.minimum(seqlen_k, tl.maximum(prefix, start_m + BLOCK_M2))
            full = tl.minimum(seqlen_k, tl.maximum(prefix, start_m + 1))
        else:
            hi = seqlen_k
            full = seqlen_k
        full = (full // BLOCK_N2) * BLOCK_N2
        rng_rows = ((q_start + rows) * nheads + h) * max_seqlen_k
        dq = tl.zeros([BLOCK_M2, D_PAD], tl.float32)
        offs_n2 = tl.arange(0, BLOCK_N2)
        dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, 0, full, rows, offs_n2, offs_d,
                           seqlen_k, prefix, qk_scale, seed, rng_rows, dropout_p, HEAD_DIM, D_PAD, False, MASK,
                           DROPOUT, PRECISION, BLOCK_N2)
        dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, full, hi, rows, offs_n2,
                           offs_d, seqlen_k, prefix, qk_scale, seed, rng_rows, dropout_p, HEAD_DIM, D_PAD, True, MASK,
                           DROPOUT, PRECISION, BLOCK_N2)
        dq = dq * sm_scale
        dq_base = DQ + q_start * stride_dqt + h * stride_dqh
        tl.store(dq_base + rows[:, None] * stride_dqt + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=q_ok)


_TUNE_KEY = ["SEQ_BUCKET", "HEAD_DIM", "MASK", "DROPOUT", "PRECISION"]
_attn_fwd_tuned = triton.autotune(configs=_fwd_candidates(), key=_TUNE_KEY,
                                  prune_configs_by={"early_config_prune": _prune_by_size})(_attn_fwd)
_attn_bwd_tuned = triton.autotune(configs=_bwd_candidates(), key=_TUNE_KEY,
                                  prune_configs_by={"early_config_prune": _prune_by_size})(_attn_bwd)


# ----------------------------------------------------------------------------------------------------------
# Dropout keep-mask (tests and debugging only: materialises [B, heads, Lq, Lk])
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _keep_mask_kernel(KEEP, CU_Q, CU_K, SEED, nheads, max_seqlen_q, max_seqlen_k, dropout_p, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(CU_Q + b).to(tl.int64)
    seqlen_q = (tl.load(CU_Q + b + 1) - q_start).to(tl.int32)
    seqlen_k = (tl.load(CU_K + b + 1) - tl.load(CU_K + b)).to(tl.int32)
    seed = tl.load(SEED)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rng_rows = ((q_start + rows) * nheads + h) * max_seqlen_k
    base = KEEP + ((b.to(tl.int64) * nheads + h) * max_seqlen_q) * max_seqlen_k
    for start_n in range(0, max_seqlen_k, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        keep = tl.rand(seed, rng_rows[:, None] + cols[None, :]) >= dropout_p
        keep = keep & (rows[:, None] < seqlen_q) & (cols[None, :] < seqlen_k)
        tl.store(base + rows[:, None] * max_seqlen_k + cols[None, :], keep.to(tl.int8),
                 mask=(rows[:, None] < max_seqlen_q) & (cols[None, :] < max_seqlen_k))


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


def _bucket(n: int) -> int:
    """Autotuning key: sequences up to SHORT share one tuning, longer ones tune per power of two."""
    return max(SHORT, triton.next_power_of_2(max(n, 1)))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def attention_fwd_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                         cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, mask: str,
                         prefix_lens: torch.Tensor | None, dropout_p: float, softmax_scale: float,
                         seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward. q [Tq, H, D], k / v [Tk, H, D] -> out [Tq, H, D] (q's dtype), lse [H, Tq] float32 (+inf = no key)."""
    total_q, nheads, head_dim = q.shape
    batch = cu_seqlens_q.numel() - 1
    out = torch.empty(total_q, nheads, head_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(nheads, total_q, dtype=torch.float32, device=q.device)
    if total_q == 0 or batch == 0 or max_seqlen_q == 0:
        return out, lse.fill_(float("inf"))
    dropout = dropout_p > 0.0
    prefix = prefix_lens if prefix_lens is not None else cu_seqlens_q
    seed_t = seed if dropout else cu_seqlens_q

    d_pad = max(16, triton.next_power_of_2(head_dim))
    if autotune_enabled():
        kernel, cfg = _attn_fwd_tuned, {}
    else:
        kernel, cfg = _attn_fwd, fwd_config(d_pad, q.dtype, max(max_seqlen_q, max_seqlen_k), dropout)

    def grid(meta):
        return triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), batch, nheads

    kernel[grid](q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, prefix, seed_t, q.stride(0), q.stride(1),
                 k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1), total_q, nheads,
                 max(max_seqlen_k, 1), softmax_scale * LOG2E, float(dropout_p),
                 _bucket(max(max_seqlen_q, max_seqlen_k)), HEAD_DIM=head_dim, D_PAD=d_pad, MASK=MASK_CODES[mask],
                 DROPOUT=dropout, PRECISION=_precision(q.dtype), **cfg)
    return out, lse


def attention_bwd_triton(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                         lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                         max_seqlen_k: int, mask: str, prefix_lens: torch.Tensor | None, dropout_p: float,
                         softmax_scale: float, seed: torch.Tensor | None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: dq [Tq, H, D], dk / dv [Tk, H, D] in the inputs' dtype. Deterministic (no atomics)."""
    total_q, nheads, head_dim = q.shape
    batch = cu_seqlens_q.numel() - 1
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if batch == 0 or (max_seqlen_q == 0 and max_seqlen_k == 0):
        return dq.zero_(), dk.zero_(), dv.zero_()
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    d_pad = max(16, triton.next_power_of_2(head_dim))
    delta = torch.empty(nheads, total_q, dtype=torch.float32, device=q.device)
    if total_q:
        pre_block = 64 if d_pad <= 64 else 32
        _bwd_preprocess[(triton.cdiv(total_q, pre_block), nheads)](
            out, dout, delta, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), total_q,
            HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK=pre_block)
    dropout = dropout_p > 0.0
    prefix = prefix_lens if prefix_lens is not None else cu_seqlens_q
    seed_t = seed if dropout else cu_seqlens_q

    if autotune_enabled():
        kernel, cfg = _attn_bwd_tuned, {}
    else:
        kernel, cfg = _attn_bwd, bwd_config(d_pad, q.dtype, max(max_seqlen_q, max_seqlen_k), dropout)

    def grid(meta):
        blocks = max(triton.cdiv(max_seqlen_k, meta["BLOCK_N1"]), triton.cdiv(max_seqlen_q, meta["BLOCK_M2"]))
        return max(blocks, 1), batch, nheads

    kernel[grid](q, k, v, dout, dq, dk, dv, lse, delta, cu_seqlens_q, cu_seqlens_k, prefix, seed_t,
                 q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0),
                 dout.stride(1), dq.stride(0), dq.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
                 total_q, nheads, max(max_seqlen_k, 1), softmax_scale, softmax_scale * LOG2E, float(dropout_p),
                 _bucket(max(max_seqlen_q, max_seqlen_k)), HEAD_DIM=head_dim, D_PAD=d_pad, MASK=MASK_CODES[mask],
                 DROPOUT=dropout, PRECISION=_precision(q.dtype), **cfg)
    return dq, dk, dv


def dropout_keep_mask(seed: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                      max_seqlen_k: int, nheads: int, dropout_p: float) -> torch.Tensor:
    """The keep-mask the kernels draw for ``seed``: [B, heads, max_seqlen_q, max_seqlen_k] bool (False at padding).

    Materialises B * heads * Lq * Lk bytes: for tests and debugging at small sizes.
    """
    batch = cu_seqlens_q.numel() - 1
    keep = torch.zeros(batch, nheads, max_seqlen_q, max_seqlen_k, dtype=torch.int8, device=seed.device)
    if keep.numel() == 0:
        return keep.bool()
    block = 16 if INTERPRET else 64
    _keep_mask_kernel[(triton.cdiv(max_seqlen_q, block), batch, nheads)](
        keep, cu_seqlens_q, cu_seqlens_k, seed, nheads, max_seqlen_q, max(max_seqlen_k, 1), float(dropout_p),
        BLOCK_M=block, BLOCK_N=block)
    return keep.bool()
