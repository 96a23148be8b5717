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
from dataclasses import dataclass

import torch

__all__ = ["PackedLayout", "layout_from_lengths", "layout_from_official"]


@dataclass
class PackedLayout:
    """Where every token of a batch lives in the packed [T, H] tensor.

    Attributes:
        txt_lens, img_lens, seq_lens: per-example Python ints (seq = txt + img).
        max_seqlen, max_txt, max_img: Python ints. n_txt, n_img, total: Python ints (T_txt, T_img, T).
        cu_seqlens: [B+1] int32 joint; cu_txt, cu_img: [B+1] int32 over text / image tokens.
        txt_rows: [T_txt] long, joint row of each packed text token; img_rows: [T_img] long, likewise.
        txt_pos: [T_txt] long, position of each text token within its text (default position ids).
        joint_src: [T] long, row of ``cat([txt_emb, img_emb])`` that fills each joint row.
        txt_src: [T_txt] / img_src: [T_img] long, flat index of each token in the PADDED inputs
            (``i * Lt + q`` / ``i * Li + r``; official path only, else None).
        seq_of_row: [T] long, example of each joint row.
    """

    txt_lens: list[int]
    img_lens: list[int]
    cu_seqlens: torch.Tensor
    cu_txt: torch.Tensor
    cu_img: torch.Tensor
    txt_rows: torch.Tensor
    img_rows: torch.Tensor
    txt_pos: torch.Tensor
    joint_src: torch.Tensor
    seq_of_row: torch.Tensor
    txt_src: torch.Tensor | None = None
    img_src: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return len(self.txt_lens)

    @property
    def seq_lens(self) -> list[int]:
        return [t + i for t, i in zip(self.txt_lens, self.img_lens)]

    @property
    def max_seqlen(self) -> int:
        return max(self.seq_lens, default=0)

    @property
    def max_txt(self) -> int:
        return max(self.txt_lens, default=0)

    @property
    def max_img(self) -> int:
        return max(self.img_lens, default=0)

    @property
    def n_txt(self) -> int:
        return sum(self.txt_lens)

    @property
    def n_img(self) -> int:
        return sum(self.img_lens)

    @property
    def total(self) -> int:
        return self.n_txt + self.n_img

    @property
    def first_rows(self) -> torch.Tensor:
        """[B] long: joint row of each example's first token (what the pooler reads)."""
        return self.cu_seqlens[:-1].long()


def _cumsum0(lens: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(lens.numel() + 1, dtype=torch.long)
    out[1:] = lens.cumsum(0)
    return out


def _host_indices(txt_lens: Sequence[int], img_lens: Sequence[int], txt_width: int | None,
                  img_width: int | None) -> dict[str, torch.Tensor]:
    """All index tensors, built on the host (cheap: O(B + T) integer ops)."""
    tl = torch.tensor(list(txt_lens), dtype=torch.long)
    il = torch.tensor(list(img_lens), dtype=torch.long)
    b = tl.numel()
    cu, cu_t, cu_i = _cumsum0(tl + il), _cumsum0(tl), _cumsum0(il)
    ar = torch.arange(b)
    seg_t = torch.repeat_interleave(ar, tl)
    seg_i = torch.repeat_interleave(ar, il)
    pos_t = torch.arange(int(cu_t[-1])) - cu_t[seg_t]
    pos_i = torch.arange(int(cu_i[-1])) - cu_i[seg_i]
    txt_rows = cu[seg_t] + pos_t
    img_rows = cu[seg_i] + tl[seg_i] + pos_i
    total = int(cu[-1])
    joint_src = torch.empty(total, dtype=torch.long)
    joint_src[torch.cat([txt_rows, img_rows])] = torch.arange(total)
    out = dict(cu=cu, cu_t=cu_t, cu_i=cu_i, txt_rows=txt_rows, img_rows=img_rows, txt_pos=pos_t, joint_src=joint_src,
               seq_of_row=torch.repeat_interleave(ar, tl + il))
    if txt_width is not None:
        out["txt_src"] = seg_t * txt_width + pos_t
    if img_width is not None:
        out["img_src"] = seg_i * img_width + pos_i
    return out


def _to_device(parts: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """One host-to-device transfer for all index tensors (views into one buffer on the device)."""
    names = list(parts)
    flat = torch.cat([parts[n].reshape(-1) for n in names])
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    elif device.type != "cpu":
        flat = flat.to(device)
    out, off = {}, 0
    for n in names:
        k = parts[n].numel()
        out[n] = flat[off:off + k]
        off += k
    return out


def _make(txt_lens: list[int], img_lens: list[int], device: torch.device, txt_width: int | None = None,
          img_width: int | None = None) -> PackedLayout:
    d = _to_device(_host_indices(txt_lens, img_lens, txt_width, img_width), device)
    return PackedLayout(txt_lens=list(txt_lens), img_lens=list(img_lens), cu_seqlens=d["cu"].to(torch.int32),
                        cu_txt=d["cu_t"].to(torch.int32), cu_img=d["cu_i"].to(torch.int32), txt_rows=d["txt_rows"],
                        img_rows=d["img_rows"], txt_pos=d["txt_pos"], joint_src=d["joint_src"],
                        seq_of_row=d["seq_of_row"], txt_src=d.get("txt_src"), img_src=d.get("img_src"))


def layout_from_lengths(txt_lens: Sequence[int], img_lens: Sequence[int], device: torch.device | str
                        ) -> PackedLayout:
    """Layout of a packed batch with ``[txt_i | img_i]`` sequences (lengths are Python ints: no host sync)."""
    return _make([int(x) for x in txt_lens], [int(x) for x in img_lens], torch.device(device))


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
    layout = _make(txt_lens, img_lens, device, None if input_ids is None else input_ids.shape[1],
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
