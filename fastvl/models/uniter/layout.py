"""Index bookkeeping between UNITER's padded interface and fastvl's packed layout.

Packed layout (DESIGN.md): example i's joint sequence ``[txt_i | img_i]`` occupies rows
``cu_seqlens[i] .. cu_seqlens[i+1]-1`` of one [T, H] tensor. Everything here is index arithmetic; lengths are
Python ints, so building a :class:`PackedLayout` from a :class:`~fastvl.batch.PackedVLBatch` never waits for
the device. The small index tensors are built on the host and sent in ONE transfer.

The official interface (padded ``input_ids`` [B, Lt], ``img_feat`` [B, Li, D], ``attn_masks`` [B, L],
``gather_index`` [B, L]) carries no Python lengths, so :func:`layout_from_official` reads them from the device
ONCE per call (a single ``.tolist()`` of the per-example lengths, plus any counts the caller needs, e.g. the
number of masked tokens). It assumes, as every official collate builds them, that ``attn_masks`` rows are 1 on
a prefix and that ``gather_index`` points the first ``tl_i`` joint positions at text positions ``0..tl_i-1``
and the next ``nbb_i`` at image positions; any order of those sources is honoured exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...batch import PackedLayout, layout_from_lengths, make_layout

__all__ = ["PackedLayout", "layout_from_lengths", "layout_from_official"]


def layout_from_official(input_ids: torch.Tensor | None, img_feat: torch.Tensor | None,
                         attention_mask: torch.Tensor, gather_index: torch.Tensor | None,
                         counts: Sequence[torch.Tensor] = ()) -> tuple[PackedLayout, list[int]]:
    """Layout of an official padded batch; reads per-example lengths from the device once (see module doc).

    Args:
        input_ids: [B, Lt] or None (image-only). img_feat: [B, Li, D] or None (text-only).
        attention_mask: [B, L], 1 on each example's real joint positions (a prefix).
        gather_index: [B, L] long (joint mode): joint position p of example i takes ``cat([txt, img], 1)[i, g]``.
        counts: extra 0-d integer tensors to read in the same transfer (e.g. number of masked tokens).
    Returns:
        (layout, the counts as Python ints). ``layout.joint_src`` follows ``gather_index``.
    """
    valid = attention_mask != 0
    seq = valid.sum(1)
    if input_ids is not None and img_feat is not None:
        tl = ((gather_index < input_ids.shape[1]) & valid).sum(1)
    elif input_ids is not None:
        tl = seq
    else:
        tl = torch.zeros_like(seq)
    host = torch.cat([seq.long(), tl.long(), *[c.reshape(1).long() for c in counts]]).tolist()  # the one sync
    b = attention_mask.shape[0]
    seq_lens, txt_lens, extra = host[:b], host[b:2 * b], host[2 * b:]
    img_lens = [s - t for s, t in zip(seq_lens, txt_lens)]
    device = attention_mask.device
    layout = make_layout(txt_lens, img_lens, device, None if input_ids is None else input_ids.shape[1],
                   None if img_feat is None else img_feat.shape[1])
    if input_ids is not None and img_feat is not None:
        # joint row (i, p) <- cat([txt_emb, img_emb])[src], from gather_index (device arithmetic, no sync)
        max_tl = input_ids.shape[1]
        width = attention_mask.shape[1]
        seg = layout.seq_of_row
        within = torch.arange(layout.total, device=device) - layout.cu_seqlens.long()[seg]
        g = gather_index.reshape(-1)[seg * width + within]
        is_txt = g < max_tl
        layout.joint_src = torch.where(is_txt, layout.cu_txt.long()[seg] + g,
                                       layout.n_txt + layout.cu_img.long()[seg] + (g - max_tl))
    return layout, extra
