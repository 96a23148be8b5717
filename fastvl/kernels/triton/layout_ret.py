"""Triton layout retrieval (BachGAN): the F-restricted intersection counts of box layouts against class maps.

(See fastvl/ops/layout_ret.py for the op.) For query q and memory map m,

    inter(q, m) = sum_{c in F(q)} |q_c & m_c| = #{pixels p : m[p] is a class c and q_c covers p}

since q_c is empty for every class outside F(q). The query side is packed once into class bit words
(:func:`query_words`): word w of pixel p holds bit ``c - 32 w`` for every class c in [32 w, 32 w + 32) whose box
mask covers p (the ``ignore_index`` class never, since no memory pixel carries it). The kernel then counts, per
(query, map), the pixels where bit ``m[p] & 31`` of word ``m[p] >> 5`` is set: no one-hot map is built, ids outside
the words (``ignore_index`` >= C, negative ids, padding lanes set to -1) match nothing.

One program per (block of ``BLOCK_Q`` queries, block of ``BLOCK_M`` maps) walks the pixels in tiles of ``BLOCK_P``:
a [BLOCK_M, BLOCK_P] tile of class ids and, per word, a [BLOCK_Q, BLOCK_P] tile of query bits; counts are exact
int32. The caller adds the unions from cached per-map class areas and keeps the running top-k (the op module).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

WORD_BITS = 32
BLOCK_Q = 16  # queries per program
BLOCK_M = 32  # memory maps per program
BLOCK_P = 32  # pixels per step
NUM_WARPS = 8  # a [BLOCK_Q, BLOCK_M, BLOCK_P] step is 64 int32 per thread: no spills on sm_80 / sm_90


def query_words(query: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Pack [Q, C, H, W] bool box masks into [Q, W, H W] int32 class bit words, W = ceil(C / 32).

    Bit ``c % 32`` of word ``c // 32`` is set where class c's mask covers the pixel; class ``ignore_index`` (when
    inside [0, C)) is left out. Built one class at a time (a [Q, H W] int64 buffer per word)."""
    n_q, n_cls, h, w = query.shape
    hw = h * w
    n_words = triton.cdiv(n_cls, WORD_BITS)
    flat = query.reshape(n_q, n_cls, hw)
    out = torch.empty(n_q, n_words, hw, dtype=torch.int32, device=query.device)
    for word in range(n_words):
        acc = torch.zeros(n_q, hw, dtype=torch.int64, device=query.device)
        for c in range(word * WORD_BITS, min(n_cls, (word + 1) * WORD_BITS)):
            if c != ignore_index:
                acc |= flat[:, c].to(torch.int64) << (c - word * WORD_BITS)
        out[:, word] = torch.where(acc >= 2**31, acc - 2**32, acc).to(torch.int32)  # the same 32 bits, signed
    return out


@triton.jit
def _intersections_kernel(qw_ptr, mem_ptr, out_ptr, Q, B, HW, W, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_P: tl.constexpr):
    pid_q = tl.program_id(0)
    pid_m = tl.program_id(1)
    qi = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mi = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_ok = qi < Q
    m_ok = mi < B
    q_row = qi.to(tl.int64) * W * HW
    m_row = mi.to(tl.int64) * HW
    acc = tl.zeros([BLOCK_Q, BLOCK_M], dtype=tl.int32)
    for p0 in range(0, HW, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_ok = p < HW
        mm = m_ok[:, None] & p_ok[None, :]
        ids = tl.load(mem_ptr + m_row[:, None] + p[None, :], mask=mm, other=0).to(tl.int32)
        ids = tl.where(mm, ids, -1)  # padding lanes: no class
        word = ids >> 5  # arithmetic: negative ids stay negative
        bit = ids & 31
        for w in range(W):
            qb = tl.load(qw_ptr + q_row[:, None] + w * HW + p[None, :], mask=q_ok[:, None] & p_ok[None, :], other=0)
            hit = (qb[:, None, :] >> bit[None, :, :]) & 1
            hit = tl.where(word[None, :, :] == w, hit, 0)
            acc += tl.sum(hit, axis=2)
    out_offs = qi.to(tl.int64)[:, None] * B + mi[None, :]
    tl.store(out_ptr + out_offs, acc, mask=q_ok[:, None] & m_ok[None, :])


def layout_intersections_triton(words: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """inter [Q, B] int32 of query words [Q, W, HW] int32 (:func:`query_words`) against maps [B, H, W] (uint8 or
    int16 class ids; any id with no query bit counts nothing)."""
    n_q, n_words, hw = words.shape
    b = maps.shape[0]
    maps = maps.reshape(b, hw).contiguous()
    out = torch.empty(n_q, b, dtype=torch.int32, device=maps.device)
    if out.numel() == 0:
        return out
    grid = (triton.cdiv(n_q, BLOCK_Q), triton.cdiv(b, BLOCK_M))
    _intersections_kernel[grid](words.contiguous(), maps, out, n_q, b, hw, n_words, BLOCK_Q, BLOCK_M, BLOCK_P,
                                num_warps=NUM_WARPS)
    return out
