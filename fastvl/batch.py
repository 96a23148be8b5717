"""The native fastvl batch: all real tokens of a batch packed, lengths as Python ints, and its packed layout.

Produced by ``fastvl.data`` collate functions, consumed by ``fastvl.models`` / ``fastvl.tasks``. It depends on
nothing but torch so that data/ and models/ can both use it without knowing each other.

Joint sequence i is ``[txt_i | img_i]`` (text first, then regions), so ``cu_seqlens`` runs over
``txt_lens[i] + img_lens[i]``. Where every token lives in the packed [T, H] tensor is a :class:`PackedLayout`:
index arithmetic on the Python-int lengths, built on the host and sent to the device in ONE transfer, computed once
per batch (collate builds it; ``to()`` moves it with the batch) and read by every model pass of that batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

import torch

__all__ = ["PackedLayout", "PackedVLBatch", "layout_from_lengths", "make_layout"]

_INDEX_FIELDS = ("cu_seqlens", "cu_txt", "cu_img", "txt_rows", "img_rows", "txt_pos", "joint_src", "seq_of_row",
                 "txt_src", "img_src")


class _Lengths:
    """Sizes derived from the Python-int ``txt_lens`` / ``img_lens`` of a batch or a layout."""

    txt_lens: list[int]
    img_lens: list[int]

    @property
    def batch_size(self) -> int:
        return len(self.txt_lens)

    @property
    def seq_lens(self) -> list[int]:
        """Joint [text | regions] length per example."""
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
    def num_tokens(self) -> int:
        """T: real tokens of the batch (text and regions)."""
        return self.n_txt + self.n_img


@dataclass
class PackedLayout(_Lengths):
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
    def total(self) -> int:
        return self.num_tokens

    @property
    def first_rows(self) -> torch.Tensor:
        """[B] long: joint row of each example's first token (what the pooler reads)."""
        return self.cu_seqlens[:-1].long()

    @property
    def device(self) -> torch.device:
        return self.cu_seqlens.device

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedLayout:
        """The same layout with its index tensors on ``device`` (one transfer for all of them)."""
        device = torch.device(device)
        if self.device == device:
            return self
        names = [f for f in _INDEX_FIELDS if getattr(self, f) is not None]
        moved = _to_device({n: getattr(self, n).long() for n in names}, device)
        for n in ("cu_seqlens", "cu_txt", "cu_img"):
            moved[n] = moved[n].to(torch.int32)
        return replace(self, **moved)


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
    if flat.device != device:
        pin = device.type == "cuda" and flat.device.type == "cpu"
        flat = flat.pin_memory().to(device, non_blocking=True) if pin else flat.to(device)
    out, off = {}, 0
    for n in names:
        k = parts[n].numel()
        out[n] = flat[off:off + k]
        off += k
    return out


def make_layout(txt_lens: list[int], img_lens: list[int], device: torch.device, txt_width: int | None = None,
                img_width: int | None = None) -> PackedLayout:
    """The layout of ``[txt_i | img_i]`` sequences, index tensors built on the host and sent in one transfer;
    ``txt_width`` / ``img_width`` (padded widths) add ``txt_src`` / ``img_src`` for the official padded path."""
    d = _to_device(_host_indices(txt_lens, img_lens, txt_width, img_width), device)
    return PackedLayout(txt_lens=list(txt_lens), img_lens=list(img_lens), cu_seqlens=d["cu"].to(torch.int32),
                        cu_txt=d["cu_t"].to(torch.int32), cu_img=d["cu_i"].to(torch.int32), txt_rows=d["txt_rows"],
                        img_rows=d["img_rows"], txt_pos=d["txt_pos"], joint_src=d["joint_src"],
                        seq_of_row=d["seq_of_row"], txt_src=d.get("txt_src"), img_src=d.get("img_src"))


def layout_from_lengths(txt_lens: Sequence[int], img_lens: Sequence[int], device: torch.device | str
                        ) -> PackedLayout:
    """Layout of a packed batch with ``[txt_i | img_i]`` sequences (lengths are Python ints: no host sync)."""
    return make_layout([int(x) for x in txt_lens], [int(x) for x in img_lens], torch.device(device))


@dataclass
class PackedVLBatch(_Lengths):
    """A packed V+L batch (every tensor on one device).

    Core fields:
        input_ids: [T_txt] long, all examples' text tokens ([CLS] ... [SEP]) concatenated.
        txt_lens: per-example text lengths (Python ints; 0 = image-only example).
        img_feat: [T_img, D_img] float, all examples' regions concatenated.
        img_pos: [T_img, 7] float box features (norm_bb ++ area).
        img_lens: per-example region counts (Python ints; 0 = text-only example).
        layout: the :class:`PackedLayout` of these lengths (collate builds it; None: built on first use).
    Optional model inputs:
        position_ids: [T_txt] long (default: 0..len-1 within each text).
        txt_type_ids: [T_txt] long (default 0). img_type_ids: [T_img] long (default 1).
        img_masks: [T_img] bool, regions masked for MRM (raw feature zeroed, mask embedding added).
    Pre-training fields (None when the task does not use them):
        txt_labels: [T_txt] long, MLM targets, -1 where not masked.
        feat_targets: [n_masked_regions, D_img] MRFR targets (original features of masked regions).
        soft_labels: [n_masked_regions, n_classes] MRC / MRC-kl detector distributions (background incl.).
        itm_targets: [B] long, 1 = matched pair, 0 = negative.
        n_txt_masked: number of txt_labels != -1 (Python int from collate; lets MLM select the masked tokens
            without reading the device). None = unknown.
    Fine-tuning fields (None when the task does not use them):
        targets: the task's targets: [B, A] soft scores (VQA / GQA / SNLI-VE), [n] long labels (NLVR2), [B] long
            region index (referring expressions), [4n] long 1 = right choice (VCR).
        sample_size: pairs per group of a grouped retrieval batch (positive + negatives), a Python int.
        num_choices: choices per question (VCR), Python ints.
        obj_masks: [B, max regions] bool, True where a region is not an object (referring expressions; scored -1e4).
        boxes: [T_img, 4] region boxes in pixels; gt_boxes: [B, 4] the referred boxes; image_sizes: [B, 2]
            (width, height) (referring expressions).
    Bookkeeping: task (the source name), ids (example ids), img_fnames (each example's image name).
    """

    input_ids: torch.Tensor
    txt_lens: list[int]
    img_feat: torch.Tensor
    img_pos: torch.Tensor
    img_lens: list[int]
    position_ids: torch.Tensor | None = None
    txt_type_ids: torch.Tensor | None = None
    img_type_ids: torch.Tensor | None = None
    img_masks: torch.Tensor | None = None
    txt_labels: torch.Tensor | None = None
    feat_targets: torch.Tensor | None = None
    soft_labels: torch.Tensor | None = None
    itm_targets: torch.Tensor | None = None
    n_txt_masked: int | None = None
    targets: torch.Tensor | None = None
    sample_size: int | None = None
    num_choices: list[int] | None = None
    obj_masks: torch.Tensor | None = None
    boxes: torch.Tensor | None = None
    gt_boxes: torch.Tensor | None = None
    image_sizes: torch.Tensor | None = None
    task: str | None = None
    ids: list | None = None
    img_fnames: list[str] | None = None
    layout: PackedLayout | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if len(self.txt_lens) != len(self.img_lens):
            raise ValueError(f"PackedVLBatch: 'txt_lens' has {len(self.txt_lens)} examples but 'img_lens' has "
                             f"{len(self.img_lens)}")
        if self.input_ids.shape[0] != sum(self.txt_lens):
            raise ValueError(f"PackedVLBatch: 'input_ids' has {self.input_ids.shape[0]} tokens but sum(txt_lens) = "
                             f"{sum(self.txt_lens)}")
        for name in ("img_feat", "img_pos"):
            if getattr(self, name).shape[0] != sum(self.img_lens):
                raise ValueError(f"PackedVLBatch: '{name}' has {getattr(self, name).shape[0]} rows but "
                                 f"sum(img_lens) = {sum(self.img_lens)}")
        if self.layout is not None and (self.layout.txt_lens != list(self.txt_lens)
                                        or self.layout.img_lens != list(self.img_lens)):
            raise ValueError("PackedVLBatch: 'layout' was built for other lengths than 'txt_lens' / 'img_lens' "
                             "(build a new batch, or pass layout=None, when the lengths change)")

    def packed_layout(self) -> PackedLayout:
        """The batch's :class:`PackedLayout` on its device: the one collate built (moved by :meth:`to`), else built
        now from the Python-int lengths and kept, so every pass over this batch shares it."""
        device = self.input_ids.device
        if self.layout is None or self.layout.device != device:
            self.layout = layout_from_lengths(self.txt_lens, self.img_lens, device) if self.layout is None \
                else self.layout.to(device)
        return self.layout

    def cu_seqlens(self, which: str = "joint") -> torch.Tensor:
        """[B+1] int32 cumulative lengths of the 'joint', 'txt' or 'img' sequences (on the batch's device)."""
        layout = self.packed_layout()
        names = {"joint": "cu_seqlens", "txt": "cu_txt", "img": "cu_img"}
        if which not in names:
            raise ValueError(f"PackedVLBatch.cu_seqlens: 'which' must be one of {sorted(names)}, got {which!r}")
        return getattr(layout, names[which])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedVLBatch:
        """A copy with every tensor (the layout's included) moved to ``device``."""
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                moved[f.name] = v.to(device, non_blocking=non_blocking)
        layout = None if self.layout is None else self.layout.to(device, non_blocking)
        return replace(self, **moved, layout=layout)
