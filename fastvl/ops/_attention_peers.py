"""Peer backends of ``cross_modal_attention``: installed libraries that serve the packed varlen layout.

Each peer is optional (imported only when selected), runs on CUDA only, and lists why it cannot take an input.
Peers use their library's own autograd (their backward kernels), so gradients flow without fastvl code.

- ``flash_attn``: flash-attn 2 ``flash_attn_varlen_func`` (fp16/bf16; bidirectional / cross; dropout; has a
  deterministic backward).
- ``sdpa_varlen``: PyTorch's ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention kernels inside PyTorch;
  fp16/bf16; bidirectional / cross; no dropout).
- ``xformers``: ``memory_efficient_attention`` with a ``BlockDiagonalMask`` (reads the lengths on the host: one
  synchronisation per call).
- ``flex``: FlexAttention (compiled) with a document-id block mask over the packed tokens; every mask mode; no
  dropout. The block mask is rebuilt per call (a model would build it once per batch).
- ``sdpa_padded``: PyTorch SDPA on the padded [B, H, L, D] layout with a boolean mask (efficient / cuDNN / math,
  as SDPA picks); every mask mode and dropout; pays for padding.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from . import _dispatch as D
from .pack import packed_positions, padded_index, visibility

NAMES = ("flash_attn", "sdpa_varlen", "xformers", "flex", "sdpa_padded")
HALF = (torch.float16, torch.bfloat16)
FLOATS = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def _installed(module: str) -> bool:
    """Cached: looking up a module that is not installed scans sys.path (~100 us), too slow for every call."""
    return importlib.util.find_spec(module) is not None


def _needs_module(module: str) -> D.Reasons:
    return [] if _installed(module) else [f"{module} is not installed"]


@functools.cache
def _has_attr(module: str, attr: str) -> bool:
    if not _installed(module.split(".")[0]):
        return False
    try:
        return hasattr(importlib.import_module(module), attr)
    except Exception:  # noqa: BLE001  (a broken optional install only makes the peer unavailable)
        return False


def _common(q, mask, dropout_p, return_probs, modes=("bidirectional", "seq2seq", "cross"), dtypes=FLOATS,
            dropout=True) -> D.Reasons:
    why = D.needs_device(q, "cuda")
    if why:
        return why
    why = D.needs_dtype(q, dtypes)
    if mask not in modes:
        why.append(f"mask {mask!r} not supported (supports {', '.join(modes)})")
    if dropout_p > 0.0 and not dropout:
        why.append("no attention dropout")
    if return_probs:
        why.append("return_probs needs the reference backend")
    return why


def _flash_dims(q) -> D.Reasons:
    d = q.shape[-1]
    return [] if d % 8 == 0 and d <= 256 else [f"argument 'q' has head_dim {d}; needs a multiple of 8 <= 256"]


def flash_attn_supports(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, prefix_lens,
                        dropout_p, softmax_scale, return_probs, deterministic=False) -> D.Reasons:
    why = _common(q, mask, dropout_p, return_probs, ("bidirectional", "cross"), HALF)
    if why:
        return why
    return _needs_module("flash_attn") + _flash_dims(q)


def sdpa_varlen_supports(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, prefix_lens,
                         dropout_p, softmax_scale, return_probs, deterministic=False) -> D.Reasons:
    why = _common(q, mask, dropout_p, return_probs, ("bidirectional", "cross"), HALF, dropout=False)
    if why:
        return why
    if not _has_attr("torch.nn.attention.varlen", "varlen_attn"):
        return ["torch.nn.attention.varlen.varlen_attn is not in this torch"]
    if not torch.backends.cuda.is_flash_attention_available():
        why.append("this torch was built without FlashAttention kernels")
    if deterministic:
        why.append("no deterministic backward (dQ is accumulated with atomics)")
    return why + _flash_dims(q)


def xformers_supports(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, prefix_lens,
                      dropout_p, softmax_scale, return_probs, deterministic=False) -> D.Reasons:
    why = _common(q, mask, dropout_p, return_probs, ("bidirectional", "cross"))
    if why:
        return why
    why = _needs_module("xformers")
    if deterministic:
        why.append("no deterministic backward guarantee")
    return why


def flex_supports(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, prefix_lens,
                  dropout_p, softmax_scale, return_probs, deterministic=False) -> D.Reasons:
    why = _common(q, mask, dropout_p, return_probs, dropout=False)
    if why:
        return why
    if not _has_attr("torch.nn.attention.flex_attention", "flex_attention"):
        return ["torch.nn.attention.flex_attention is not in this torch"]
    if deterministic:
        why.append("no deterministic backward guarantee")
    return why


def sdpa_padded_supports(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, prefix_lens,
                         dropout_p, softmax_scale, return_probs, deterministic=False) -> D.Reasons:
    why = _common(q, mask, dropout_p, return_probs)
    if deterministic and not torch.are_deterministic_algorithms_enabled():
        why.append("deterministic backward only under torch.use_deterministic_algorithms(True)")
    return why


def register(op: D.Op) -> None:
    """Add the peers to ``op``'s backend table (priority order is the op's)."""
    docs = {
        "flash_attn": (flash_attn_supports, "flash-attn 2 varlen (fp16/bf16, bidirectional/cross)"),
        "sdpa_varlen": (sdpa_varlen_supports, "torch.nn.attention.varlen.varlen_attn (FlashAttention in PyTorch)"),
        "xformers": (xformers_supports, "xformers memory_efficient_attention + BlockDiagonalMask (host read)"),
        "flex": (flex_supports, "FlexAttention (compiled) with a document-id block mask"),
        "sdpa_padded": (sdpa_padded_supports, "SDPA on padded [B, H, L, D] with a boolean mask (pays for padding)"),
    }
    for name in NAMES:
        fn, doc = docs[name]
        op.backend(name, kind="peer", doc=doc)(fn)


# ----------------------------------------------------------------------------------------------------------
# Runners: (q, k, v, cu_q, cu_k, max_q, max_k, mask, prefix_lens, dropout_p, scale, deterministic) -> out
# ----------------------------------------------------------------------------------------------------------


def run_flash_attn(q, k, v, cu_q, cu_k, max_q, max_k, mask, prefix_lens, dropout_p, scale, deterministic):
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k, v, cu_q.int(), cu_k.int(), max_q, max_k, dropout_p=dropout_p,
                                  softmax_scale=scale, causal=False, deterministic=deterministic)


def run_sdpa_varlen(q, k, v, cu_q, cu_k, max_q, max_k, mask, prefix_lens, dropout_p, scale, deterministic):
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k, v, cu_q.int(), cu_k.int(), max_q, max_k, scale=scale)


def run_xformers(q, k, v, cu_q, cu_k, max_q, max_k, mask, prefix_lens, dropout_p, scale, deterministic):
    from xformers.ops import fmha

    lens_q = (cu_q[1:] - cu_q[:-1]).tolist()  # host read: xformers builds its mask from Python lists
    lens_k = (cu_k[1:] - cu_k[:-1]).tolist()
    bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(lens_q, lens_k)
    out = fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias, p=dropout_p, scale=scale)
    return out[0]


_FLEX_COMPILED = None


def flex_block_mask(cu_q: torch.Tensor, cu_k: torch.Tensor, total_q: int, total_k: int, mask: str,
                    prefix_lens: torch.Tensor | None, compile: bool = True):
    """FlexAttention BlockMask over the packed tokens: same sequence (document id), plus the seq2seq rule.

    ``compile=True`` builds it block-wise (no [total_q, total_k] tensor); ``False`` evaluates every pair (tests).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    seq_q, pos_q = packed_positions(cu_q, total_q)
    seq_k, pos_k = packed_positions(cu_k, total_k)
    if mask == "seq2seq":
        prefix = prefix_lens.long()

        def mask_mod(b, h, qi, kj):
            return (seq_q[qi] == seq_k[kj]) & ((pos_k[kj] < prefix[seq_q[qi]]) | (pos_k[kj] <= pos_q[qi]))
    else:

        def mask_mod(b, h, qi, kj):
            return seq_q[qi] == seq_k[kj]

    return create_block_mask(mask_mod, None, None, total_q, total_k, device=cu_q.device, _compile=compile)


def flex_compiled():
    """``torch.compile(flex_attention)``, built once (eager FlexAttention is an unfused reference)."""
    global _FLEX_COMPILED
    if _FLEX_COMPILED is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX_COMPILED = torch.compile(flex_attention)
    return _FLEX_COMPILED


def run_flex(q, k, v, cu_q, cu_k, max_q, max_k, mask, prefix_lens, dropout_p, scale, deterministic, block_mask=None):
    if block_mask is None:
        block_mask = flex_block_mask(cu_q, cu_k, q.shape[0], k.shape[0], mask, prefix_lens)
    t = lambda x: x.transpose(0, 1).unsqueeze(0)  # [T, H, D] -> [1, H, T, D]
    out = flex_compiled()(t(q), t(k), t(v), block_mask=block_mask, scale=scale)
    return out[0].transpose(0, 1)


def run_sdpa_padded(q, k, v, cu_q, cu_k, max_q, max_k, mask, prefix_lens, dropout_p, scale, deterministic):

    if k.shape[0] == 0:  # no key anywhere: every row outputs 0
        return q * 0
    iq, pad_q = padded_index(cu_q, max_q)
    ik, _ = padded_index(cu_k, max_k)
    has_key = (cu_k[1:] - cu_k[:-1]) > 0  # [B]
    vis = visibility(cu_q, cu_k, max_q, max_k, mask, prefix_lens)
    # padded query rows and rows of key-less sequences see every slot (no NaN); their outputs are dropped / zeroed
    vis = vis | pad_q[:, :, None] | ~has_key[:, None, None]
    qp, kp, vp = (x[i].transpose(1, 2) for x, i in ((q, iq), (k, ik), (v, ik)))  # [B, H, L, D]
    out = torch.nn.functional.scaled_dot_product_attention(qp, kp, vp, attn_mask=vis[:, None], dropout_p=dropout_p,
                                                           scale=scale)
    seq, pos = packed_positions(cu_q, q.shape[0])
    out = out.transpose(1, 2)[seq, pos]  # [Tq, H, D]
    return torch.where(has_key[seq][:, None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))


RUNNERS = {"flash_attn": run_flash_attn, "sdpa_varlen": run_sdpa_varlen, "xformers": run_xformers, "flex": run_flex,
           "sdpa_padded": run_sdpa_padded}
