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

Backends (``fastvl.ops.attention.ATTENTION``; ``python -m fastvl.info`` shows which one serves an input):
``triton`` (fused packed kernels, forward + deterministic backward, dropout by Philox seed; the first choice on
CUDA), the peers of ``_attention_peers`` (flash-attn varlen, PyTorch varlen, xformers, FlexAttention, padded SDPA;
each only when importable and fitting) and ``reference`` (the CPU default and the ground truth). The fused
backends share one ``torch.library`` op pair (``fastvl::attention_fwd`` / ``fastvl::attention_bwd``, what
torch.compile traces) and one autograd formula, reached in eager mode through a ``torch.autograd.Function`` (far less
Python overhead per call); peers use their libraries' own autograd.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from . import _attention_peers as P
from . import _dispatch as D
from .pack import check_cu_seqlens, packed_positions, padded_index, visibility

__all__ = ["MASKS", "cross_modal_attention", "cross_modal_attention_reference", "draw_dropout_seed",
           "dropout_keep_mask", "packed_positions", "visibility"]

MASKS = ("bidirectional", "seq2seq", "cross")


# ----------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------


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
    scores = torch.matmul(qp, kp.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32)) * scale
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

ATTENTION = D.register_op("attention", ["triton", *P.NAMES, "reference"], doc="packed varlen cross-modal attention")


@ATTENTION.backend("reference", doc="pad per sequence + masked softmax in PyTorch (any device/dtype)")
def _reference_supports(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, prefix_lens,
                        dropout_p, softmax_scale, return_probs, deterministic=False) -> D.Reasons:
    return []


@ATTENTION.backend("triton", doc="fused FlashAttention-2 style varlen kernels, fwd + deterministic bwd (Triton)")
def _triton_supports(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, prefix_lens,
                     dropout_p, softmax_scale, return_probs, deterministic=False) -> D.Reasons:
    from ..kernels.triton.attention import DTYPES, HEAD_DIMS

    why = D.triton_reasons(q) + D.needs_dtype(q, DTYPES)
    if q.shape[-1] not in HEAD_DIMS:
        why.append(f"argument 'q' has head_dim {q.shape[-1]}; supported: {', '.join(map(str, HEAD_DIMS))}")
    if return_probs:
        why.append("return_probs needs the reference backend")
    return why


P.register(ATTENTION)


def _example(device: str, dtype: torch.dtype) -> tuple[tuple, dict]:
    q = torch.empty(300, 12, 64, device=device, dtype=dtype)
    cu = torch.tensor([0, 100, 300], dtype=torch.int32, device=device) if device != "meta" else None
    if cu is None:
        cu = torch.empty(3, dtype=torch.int32, device=device)
    return (q, q, q, cu, cu, 200, 200, "bidirectional", None, 0.0, None, False), {}


ATTENTION.example = _example


# ----------------------------------------------------------------------------------------------------------
# Fused backends: one torch.library op pair + one autograd formula; the backend name is an argument
# ----------------------------------------------------------------------------------------------------------


def _triton_fwd(*args):
    from ..kernels.triton.attention import attention_fwd_triton

    return attention_fwd_triton(*args)


def _triton_bwd(*args):
    from ..kernels.triton.attention import attention_bwd_triton

    return attention_bwd_triton(*args)


# name -> (fwd(q, k, v, cu_q, cu_k, max_q, max_k, mask, prefix, p, scale, seed) -> (out, lse [H, Tq] fp32),
#          bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, mask, prefix, p, scale, seed) -> (dq, dk, dv))
FUSED = {"triton": (_triton_fwd, _triton_bwd)}


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _fused_forward(backend, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, prefix_lens,
                   dropout_p, softmax_scale, seed):
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    return FUSED[backend][0](q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, prefix_lens,
                             dropout_p, softmax_scale, seed)


def _fused_backward(backend, dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask,
                    prefix_lens, dropout_p, softmax_scale, seed):
    dout, q, k, v, out = (_last_dim_contiguous(t) for t in (dout, q, k, v, out))
    return FUSED[backend][1](dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask,
                             prefix_lens, dropout_p, softmax_scale, seed)


@torch.library.custom_op("fastvl::attention_fwd", mutates_args=())
def _attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, mask: str,
                      prefix_lens: torch.Tensor | None, dropout_p: float, softmax_scale: float,
                      seed: torch.Tensor | None, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _fused_forward(backend, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask,
                          prefix_lens, dropout_p, softmax_scale, seed)


@_attention_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, prefix_lens, dropout_p, softmax_scale,
      seed, backend):
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    return out, q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("fastvl::attention_bwd", mutates_args=())
def _attention_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                      max_seqlen_k: int, mask: str, prefix_lens: torch.Tensor | None, dropout_p: float,
                      softmax_scale: float, seed: torch.Tensor | None, backend: str
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fused_backward(backend, dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           mask, prefix_lens, dropout_p, softmax_scale, seed)


@_attention_bwd_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, prefix_lens, dropout_p,
      softmax_scale, seed, backend):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


# The autograd formula (one for every fused backend): save the inputs, the output and the row log-sum-exp; the
# backward is the backend's. ``bwd`` is the library op under torch.compile and the plain function in eager mode.
_NO_GRAD = (None,) * 10


def _save(ctx, inputs, out, lse) -> None:
    q, k, v, cu_q, cu_k, max_q, max_k, mask, prefix_lens, dropout_p, scale, seed, backend = inputs
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, prefix_lens, seed)
    ctx.meta = (max_q, max_k, mask, dropout_p, scale, backend)


def _grads(ctx, dout, bwd) -> tuple:
    q, k, v, out, lse, cu_q, cu_k, prefix_lens, seed = ctx.saved_tensors
    max_q, max_k, mask, dropout_p, scale, backend = ctx.meta
    if bwd is _fused_backward:
        dq, dk, dv = bwd(backend, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, mask, prefix_lens, dropout_p,
                         scale, seed)
    else:
        dq, dk, dv = bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, mask, prefix_lens, dropout_p, scale, seed,
                         backend)
    return dq, dk, dv, *_NO_GRAD


def _setup_context(ctx, inputs, output) -> None:
    _save(ctx, inputs, *output)


def _backward(ctx, dout, dlse):
    return _grads(ctx, dout, _attention_bwd_op)


_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _FusedAttention(torch.autograd.Function):
    """Eager-mode entry to the same formula: ~15 us of Python per call where the library op costs ~130 us, which
    matters at UNITER's sizes (tens of microseconds of kernel time). torch.compile traces the library op instead."""

    @staticmethod
    def forward(ctx, *inputs):
        out, lse = _fused_forward(inputs[-1], *inputs[:-1])
        _save(ctx, inputs, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        return _grads(ctx, dout, _fused_backward)


def draw_dropout_seed(device: torch.device | str) -> torch.Tensor:
    """A fresh Philox seed for the fused kernels: int64 [1] on ``device``, drawn from torch's RNG (no host sync)."""
    return torch.randint(2**62, (1,), dtype=torch.int64, device=device)


def dropout_keep_mask(seed: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                      max_seqlen_k: int, heads: int, dropout_p: float) -> torch.Tensor:
    """The keep-mask the fused kernels apply for ``seed``: [B, heads, max_seqlen_q, max_seqlen_k] bool.

    Pass it as the reference's ``dropout_keep`` to reproduce a fused call with dropout (small sizes only: it
    materialises every (query, key) pair).
    """
    from ..kernels.triton.attention import dropout_keep_mask as keep_mask

    return keep_mask(seed, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, heads, dropout_p)


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
    if not q.is_floating_point():
        raise TypeError(f"fastvl.ops.{_OP}: argument 'q' must be a float tensor, got {q.dtype}")
    if q.shape[1] < 1 or q.shape[2] < 1:
        raise ValueError(f"fastvl.ops.{_OP}: argument 'q' needs heads >= 1 and head_dim >= 1, got shape "
                         f"{tuple(q.shape)}")
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
        if not isinstance(val, int) or isinstance(val, bool) or val < 0:
            raise ValueError(f"fastvl.ops.{_OP}: argument '{name}' must be a Python int >= 0, got {val!r}")
    if mask not in MASKS:
        raise ValueError(f"fastvl.ops.{_OP}: argument 'mask' must be one of {MASKS}, got {mask!r}")
    if mask == "seq2seq":
        if prefix_lens is None:
            raise ValueError(f"fastvl.ops.{_OP}: mask='seq2seq' needs argument 'prefix_lens' (int32 [B])")
        if tuple(prefix_lens.shape) != (cu_seqlens_q.numel() - 1,):
            raise ValueError(f"fastvl.ops.{_OP}: argument 'prefix_lens' must have shape [B] = "
                             f"[{cu_seqlens_q.numel() - 1}], got {list(prefix_lens.shape)}")
        if prefix_lens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"fastvl.ops.{_OP}: argument 'prefix_lens' must be int32 or int64, got {prefix_lens.dtype}")
        if prefix_lens.device != q.device:
            raise ValueError(f"fastvl.ops.{_OP}: argument 'prefix_lens' is on {prefix_lens.device} but 'q' is on "
                             f"{q.device}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"fastvl.ops.{_OP}: argument 'dropout_p' must be in [0, 1), got {dropout_p}")


def _check_values(cu_seqlens_q, cu_seqlens_k, total_q, total_k, max_seqlen_q, max_seqlen_k, mask, prefix_lens):
    """Checks that read tensor VALUES (a host read: done on CPU, or on GPU only when asked, see ``validate``)."""
    for name, cu, rows, total, max_name, mx in (("cu_seqlens_q", cu_seqlens_q, "q", total_q, "max_seqlen_q",
                                                 max_seqlen_q),
                                                ("cu_seqlens_k", cu_seqlens_k, "k", total_k, "max_seqlen_k",
                                                 max_seqlen_k)):
        c = cu.tolist()
        if c[0] != 0:
            raise ValueError(f"fastvl.ops.{_OP}: argument '{name}' must start at 0, got {name}[0] = {c[0]}")
        lens = [b - a for a, b in zip(c[:-1], c[1:])]
        for i, n in enumerate(lens):
            if n < 0:
                raise ValueError(f"fastvl.ops.{_OP}: argument '{name}' must be non-decreasing, but {name}[{i}] = "
                                 f"{c[i]} > {name}[{i + 1}] = {c[i + 1]}")
        if c[-1] != total:
            raise ValueError(f"fastvl.ops.{_OP}: argument '{name}' ends at {c[-1]} but '{rows}' has {total} rows")
        if lens and max(lens) > mx:
            b = lens.index(max(lens))
            raise ValueError(f"fastvl.ops.{_OP}: argument '{max_name}' = {mx} is smaller than sequence {b}'s "
                             f"length {lens[b]} (from '{name}')")
    if mask == "seq2seq" and prefix_lens.numel() and int(prefix_lens.min()) < 0:
        raise ValueError(f"fastvl.ops.{_OP}: argument 'prefix_lens' must be >= 0, got {prefix_lens.tolist()}")


def cross_modal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                          cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                          mask: str = "bidirectional", prefix_lens: torch.Tensor | Sequence[int] | None = None,
                          dropout_p: float = 0.0, softmax_scale: float | None = None, return_probs: bool = False,
                          *, backend: str | None = None, deterministic: bool | None = None,
                          dropout_seed: torch.Tensor | None = None, validate: bool | None = None):
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
        return_probs: also return per-sequence probabilities [B, heads, max_seqlen_q, max_seqlen_k] (forward only;
            only the reference serves it, so forcing another backend raises ``BackendUnavailableError``).
        backend: force a backend; default: the fastest that fits.
        deterministic: require a bitwise-reproducible backward (default: ``torch.are_deterministic_algorithms_
            enabled()``); peers without one are skipped. The Triton backward is always deterministic (no atomics).
        dropout_seed: int64 [1] Philox seed for the fused backends' dropout (default: drawn from torch's RNG);
            :func:`dropout_keep_mask` turns it into the keep-mask. The reference and peers use their own RNG.
        validate: check the VALUES of cu_seqlens / prefix_lens against the tensors and max lengths. Reading them
            synchronises with the device, so the default is on for CPU tensors (or ``FASTVL_VALIDATE=1``) and off
            for GPU tensors and inside ``torch.compile``; on a GPU, inconsistent values give undefined rows.
    Returns:
        out [total_q, heads, head_dim] (a tuple (out, probs) with return_probs).
    """
    if prefix_lens is not None and not isinstance(prefix_lens, torch.Tensor):
        prefix_lens = torch.tensor(list(prefix_lens), dtype=torch.int32, device=q.device)
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, prefix_lens, dropout_p)
    if mask != "seq2seq":
        prefix_lens = None
    if validate is None:
        validate = (q.device.type == "cpu" or os.environ.get("FASTVL_VALIDATE") == "1") and \
            not torch.compiler.is_compiling()
    if validate:
        _check_values(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k, mask,
                      prefix_lens)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, prefix_lens, dropout_p,
            softmax_scale, return_probs)
    name = ATTENTION.select(*args, backend=backend, deterministic=deterministic)  # only the reference returns probs
    if name == "reference":
        return cross_modal_attention_reference(*args)
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    if name in FUSED:
        seed = None
        if dropout_p > 0.0:
            seed = dropout_seed if dropout_seed is not None else draw_dropout_seed(q.device)
        fused = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, prefix_lens, float(dropout_p),
                 scale, seed, name)
        if torch.compiler.is_compiling():
            return _attention_fwd_op(*fused)[0]
        return _FusedAttention.apply(*fused)
    return P.RUNNERS[name](q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, prefix_lens,
                           float(dropout_p), scale, deterministic)
