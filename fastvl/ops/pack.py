"""Conversions between the packed layout ([total, ...] + cu_seqlens) and the padded layout ([B, max, ...]), and the
padded attention visibility mask (shared by ``attention`` and its peers).

Pure index arithmetic on the device: no host synchronisation (``max_seqlen`` is a Python int from collate).
"""

from __future__ import annotations

import torch


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, name: str = "cu_seqlens", op: str = "pack") -> None:
    """Validate metadata of a cu_seqlens tensor (int32/int64, 1-d, B+1 entries) without reading its values."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"fastvl.ops.{op}: argument '{name}' must be a tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"fastvl.ops.{op}: argument '{name}' must be 1-d with B+1 >= 1 entries, got shape "
                         f"{tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"fastvl.ops.{op}: argument '{name}' must be int32 or int64, got {cu_seqlens.dtype}")


def padded_index(cu_seqlens: torch.Tensor, max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index into the packed rows for every padded slot, and the padding mask.

    Args:
        cu_seqlens: [B+1] cumulative lengths.
        max_seqlen: Python int >= every length.
    Returns:
        index: [B, max_seqlen] long, row of the packed tensor (0 at padding, safe to gather).
        pad: [B, max_seqlen] bool, True at padding.
    """
    starts = cu_seqlens[:-1].long()
    lens = cu_seqlens[1:].long() - starts
    pos = torch.arange(max_seqlen, device=cu_seqlens.device)
    pad = pos[None, :] >= lens[:, None]  # [B, max]
    index = torch.where(pad, torch.zeros_like(pos)[None, :], starts[:, None] + pos[None, :])
    return index, pad


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


def unpack(x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, fill: float = 0.0
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed [total, *feat] -> padded [B, max_seqlen, *feat] (``fill`` at padding) and pad mask [B, max_seqlen]."""
    check_cu_seqlens(cu_seqlens, x.shape[0], op="unpack")
    index, pad = padded_index(cu_seqlens, max_seqlen)
    out = x[index.reshape(-1)].reshape(*index.shape, *x.shape[1:])  # [B, max, *feat]
    mask = pad.reshape(*pad.shape, *([1] * (x.dim() - 1)))
    return out.masked_fill(mask, fill), pad


def pack(padded: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """Padded [B, L, *feat] + pad mask [B, L] (True = padding, real rows first) -> packed [total, *feat].

    Note: boolean indexing sizes its output from the mask's values, which synchronises with the device;
    hot paths inside models use :func:`padded_index` and scatter instead.
    """
    if pad.shape != padded.shape[:2]:
        raise ValueError(f"fastvl.ops.pack: argument 'pad' must have shape {tuple(padded.shape[:2])}, got "
                         f"{tuple(pad.shape)}")
    return padded[~pad]
