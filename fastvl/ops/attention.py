"""Cross-modal attention on packed, ragged V+L sequences.

q [total_q, heads, head_dim], k / v [total_k, heads, head_dim] hold all sequences of the batch
concatenated; ``cu_seqlens_q`` / ``cu_seqlens_k`` ([B+1] int32) delimit them and ``max_seqlen_q`` /
``max_seqlen_k`` (Python ints from collate) bound their lengths. Sequence b's queries attend only to
sequence b's keys, under one of three masks:

- ``bidirectional``: every key of the sequence (UNITER's single stream: [text | regions]).
- ``seq2seq``: key j (index within the sequence) is visible to query i iff j < prefix_lens[b] or j <= i
  (image and text prefix bidirectional first, caption causal after; captioning).
- ``cross``: queries of one sequence set over keys of another (two-stream models, NLVR2 pair attention);
  every key of pair b is visible.

A query row with no visible key outputs 0 (never NaN).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _dispatch as D
from .pack import check_cu_seqlens, padded_index

__all__ = ["MASKS", "cross_modal_attention", "cross_modal_attention_reference", "packed_positions"]

MASKS = ("bidirectional", "seq2seq", "cross")


# ----------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------


def packed_positions(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every packed row t in [0, total): its sequence index b [total] and position within it [total]."""
    rows = torch.arange(total, device=cu_seqlens.device)
    seq = torch.searchsorted(cu_seqlens[1:].long(), rows, right=True)
    return seq, rows - cu_seqlens.long()[seq]


def visibility(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
               mask: str, prefix_lens: torch.Tensor | None) -> torch.Tensor:
    """[B, Lq, Lk] bool: key j visible to query i of sequence b (False at padding)."""
    lens_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    lens_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
    i = torch.arange(max_seqlen_q, device=cu_seqlens_q.device)[None, :, None]
    j = torch.arange(max_seqlen_k, device=cu_seqlens_q.device)[None, None, :]
    vis = (i < lens_q[:, None, None]) & (j < lens_k[:, None, None])
    if mask == "seq2seq":
        prefix = prefix_lens.long()[:, None, None]
        vis = vis & ((j < prefix) | (j <= i))
    return vis


def cross_modal_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                    cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                                    mask: str = "bidirectional", prefix_lens: torch.Tensor | None = None,
                                    dropout_p: float = 0.0, softmax_scale: float | None = None,
                                    return_probs: bool = False, dropout_keep: torch.Tensor | None = None):
    """Plain PyTorch: pad per sequence, masked softmax, pack back. Differentiable through autograd.

    Args:
        dropout_keep: optional [B, heads, Lq, Lk] bool keep-mask to apply instead of sampling one (tests use it
            to reproduce a fused kernel's dropout); kept probabilities are scaled by 1 / (1 - dropout_p).
    Returns:
        out [total_q, heads, head_dim] (and probs [B, heads, Lq, Lk], 0 at padding, with return_probs).
    """
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    iq, pad_q = padded_index(cu_seqlens_q, max_seqlen_q)  # [B, Lq]
    ik, _ = padded_index(cu_seqlens_k, max_seqlen_k)  # [B, Lk]
    qp = q[iq].transpose(1, 2)  # [B, h, Lq, d]
    kp = k[ik].transpose(1, 2)  # [B, h, Lk, d]
    vp = v[ik].transpose(1, 2)
    vis = visibility(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, prefix_lens)[:, None]  # [B,1,Lq,Lk]
    scores = torch.matmul(qp, kp.transpose(-1, -2)).float() * scale
    scores = scores.masked_fill(~vis, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no visible key -> 0
    probs = probs.masked_fill(~vis, 0.0)
    attn = probs
    if dropout_keep is not None:
        attn = attn * dropout_keep / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        attn = torch.nn.functional.dropout(attn, dropout_p, training=True)
    out_p = torch.matmul(attn.to(vp.dtype), vp).transpose(1, 2)  # [B, Lq, h, d]
    seq, pos = packed_positions(cu_seqlens_q, q.shape[0])
    out = out_p[seq, pos]  # [total_q, h, d]
    return (out, probs.to(q.dtype)) if return_probs else out


# ----------------------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------------------

ATTENTION = D.register_op("attention", ["triton", "reference"], doc="packed varlen cross-modal attention")


@ATTENTION.backend("reference", doc="pad per sequence + masked softmax in PyTorch (any device/dtype)")
def _reference_supports(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, prefix_lens,
                        dropout_p, softmax_scale, return_probs) -> D.Reasons:
    return []


def _example(device: str, dtype: torch.dtype) -> tuple[tuple, dict]:
    q = torch.empty(300, 12, 64, device=device, dtype=dtype)
    cu = torch.tensor([0, 100, 300], dtype=torch.int32, device=device) if device != "meta" else None
    if cu is None:
        cu = torch.empty(3, dtype=torch.int32, device=device)
    return (q, q, q, cu, cu, 200, 200, "bidirectional", None, 0.0, None, False), {}


ATTENTION.example = _example


# ----------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------

_OP = "cross_modal_attention"


def _check(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, prefix_lens, dropout_p):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fastvl.ops.{_OP}: argument '{name}' must be a tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"fastvl.ops.{_OP}: argument '{name}' must be 3-d [total, heads, head_dim], got shape "
                             f"{tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"fastvl.ops.{_OP}: argument '{name}' has dtype {t.dtype} but 'q' has {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"fastvl.ops.{_OP}: argument '{name}' is on {t.device} but 'q' is on {q.device}")
        if t.shape[1:] != q.shape[1:]:
            raise ValueError(f"fastvl.ops.{_OP}: argument '{name}' has [heads, head_dim] = {list(t.shape[1:])} but "
                             f"'q' has {list(q.shape[1:])}")
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"fastvl.ops.{_OP}: argument 'v' has {v.shape[0]} rows but 'k' has {k.shape[0]}")
    check_cu_seqlens(cu_seqlens_q, q.shape[0], "cu_seqlens_q", _OP)
    check_cu_seqlens(cu_seqlens_k, k.shape[0], "cu_seqlens_k", _OP)
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if t.device != q.device:
            raise ValueError(f"fastvl.ops.{_OP}: argument '{name}' is on {t.device} but 'q' is on {q.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"fastvl.ops.{_OP}: 'cu_seqlens_q' has {cu_seqlens_q.numel() - 1} sequences but "
                         f"'cu_seqlens_k' has {cu_seqlens_k.numel() - 1}")
    for name, val in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(val, int) or val < 0:
            raise ValueError(f"fastvl.ops.{_OP}: argument '{name}' must be a Python int >= 0, got {val!r}")
    if mask not in MASKS:
        raise ValueError(f"fastvl.ops.{_OP}: argument 'mask' must be one of {MASKS}, got {mask!r}")
    if mask == "seq2seq":
        if prefix_lens is None:
            raise ValueError(f"fastvl.ops.{_OP}: mask='seq2seq' needs argument 'prefix_lens' (int32 [B])")
        if tuple(prefix_lens.shape) != (cu_seqlens_q.numel() - 1,):
            raise ValueError(f"fastvl.ops.{_OP}: argument 'prefix_lens' must have shape [B] = "
                             f"[{cu_seqlens_q.numel() - 1}], got {list(prefix_lens.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"fastvl.ops.{_OP}: argument 'dropout_p' must be in [0, 1), got {dropout_p}")


def cross_modal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                          cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                          mask: str = "bidirectional", prefix_lens: torch.Tensor | Sequence[int] | None = None,
                          dropout_p: float = 0.0, softmax_scale: float | None = None, return_probs: bool = False,
                          *, backend: str | None = None):
    """Attention over packed ragged sequences (see module docstring for the masks).

    Args:
        q: [total_q, heads, head_dim]. k, v: [total_k, heads, head_dim], same dtype/device as q.
        cu_seqlens_q, cu_seqlens_k: [B+1] int32 cumulative lengths (for bidirectional/seq2seq both describe
            the same sequences).
        max_seqlen_q, max_seqlen_k: Python ints >= every length.
        mask: 'bidirectional' | 'seq2seq' | 'cross'.
        prefix_lens: [B] int32 tensor or list of ints; bidirectional prefix per sequence (seq2seq only).
        dropout_p: attention-probability dropout (training).
        softmax_scale: default head_dim ** -0.5.
        return_probs: also return per-sequence probabilities [B, heads, max_seqlen_q, max_seqlen_k] (forward only).
        backend: force a backend; default: the fastest that fits.
    Returns:
        out [total_q, heads, head_dim] (a tuple (out, probs) with return_probs).
    """
    if prefix_lens is not None and not isinstance(prefix_lens, torch.Tensor):
        prefix_lens = torch.tensor(list(prefix_lens), dtype=torch.int32, device=q.device)
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, prefix_lens, dropout_p)
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, prefix_lens, dropout_p,
            softmax_scale, return_probs)
    name = "reference" if return_probs else ATTENTION.select(*args, backend=backend)
    if name == "reference":
        return cross_modal_attention_reference(*args)
    raise AssertionError(f"unhandled backend {name!r}")
