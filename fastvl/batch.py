"""The native fastvl batch: all real tokens of a batch packed, lengths as Python ints.

Produced by ``fastvl.data`` collate functions, consumed by ``fastvl.models`` / ``fastvl.tasks``. It depends
on nothing but torch so that data/ and models/ can both use it without knowing each other.

Joint sequence i is ``[txt_i | img_i]`` (text first, then regions), so ``cu_seqlens`` runs over
``txt_lens[i] + img_lens[i]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch


@dataclass
class PackedVLBatch:
    """A packed V+L batch (every tensor on one device).

    Core fields:
        input_ids: [T_txt] long, all examples' text tokens ([CLS] ... [SEP]) concatenated.
        txt_lens: per-example text lengths (Python ints; 0 = image-only example).
        img_feat: [T_img, D_img] float, all examples' regions concatenated.
        img_pos: [T_img, 7] float box features (norm_bb ++ area).
        img_lens: per-example region counts (Python ints; 0 = text-only example).
    Optional model inputs:
        position_ids: [T_txt] long (default: 0..len-1 within each text).
        txt_type_ids: [T_txt] long (default 0). img_type_ids: [T_img] long (default 1).
        img_masks: [T_img] bool, regions masked for MRM (raw feature zeroed, mask embedding added).
    Task fields (None when the task does not use them):
        txt_labels: [T_txt] long, MLM targets, -1 where not masked.
        feat_targets: [n_masked_regions, D_img] MRFR targets (original features of masked regions).
        soft_labels: [n_masked_regions, n_classes] MRC / MRC-kl detector distributions (background incl.).
        itm_targets: [B] long, 1 = matched pair, 0 = negative.
        n_txt_masked: number of txt_labels != -1 (Python int from collate; lets MLM select the masked tokens
            without reading the device). None = unknown.
        extras: anything task-specific (e.g. VQA soft targets, retrieval groups).
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
    extras: dict = field(default_factory=dict)
    n_txt_masked: int | None = None

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
    def num_tokens(self) -> int:
        return sum(self.seq_lens)

    def cu_seqlens(self, which: str = "joint") -> torch.Tensor:
        """[B+1] int32 cumulative lengths of the 'joint', 'txt' or 'img' sequences (on the batch's device)."""
        lens = {"joint": self.seq_lens, "txt": self.txt_lens, "img": self.img_lens}[which]
        out = torch.zeros(len(lens) + 1, dtype=torch.int32)
        out[1:] = torch.tensor(lens, dtype=torch.int32).cumsum(0)
        return out.to(self.input_ids.device)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedVLBatch:
        """A copy with every tensor (including those in ``extras``) moved to ``device``."""
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                moved[f.name] = v.to(device, non_blocking=non_blocking)
        extras = {k: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v)
                  for k, v in self.extras.items()}
        return replace(self, **moved, extras=extras)
