"""Examples -> :class:`~fastvl.batch.PackedVLBatch` (the native packed batch), and -> the official padded dict.

An :class:`Example` is one (caption, image) pair after a task's conditional masking; :func:`collate` concatenates
a list of them. Lengths stay Python ints, so nothing downstream reads the device to learn them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from ..batch import PackedVLBatch, layout_from_lengths

__all__ = ["Example", "collate", "to_official"]

_HAS_N_MASKED = "n_txt_masked" in {f.name for f in fields(PackedVLBatch)}


@dataclass
class Example:
    """One example (numpy arrays; n = regions, L = text tokens incl. [CLS] and [SEP]).

    input_ids [L] int64 (after MLM masking), txt_labels [L] int64 (-1 = not masked) or None,
    img_feat [n, D] float32 (raw features, masked rows NOT yet zeroed), img_pos [n, 7] float32,
    img_mask [n] bool or None, feat_targets [m, D] / soft_labels [m, C] for the m masked regions or None,
    itm_target 0/1 or None.
    """

    id: str
    img_fname: str
    input_ids: np.ndarray
    img_feat: np.ndarray
    img_pos: np.ndarray
    txt_labels: np.ndarray | None = None
    img_mask: np.ndarray | None = None
    feat_targets: np.ndarray | None = None
    soft_labels: np.ndarray | None = None
    itm_target: int | None = None


def _cat(arrays: list[np.ndarray], dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.concatenate(arrays, axis=0), dtype=dtype))


def collate(examples: list[Example], task: str) -> PackedVLBatch:
    """Concatenate examples into a packed batch for ``task``.

    Sets ``txt_labels`` + ``n_txt_masked`` (mlm), ``img_masks`` + zeroed masked features + ``feat_targets``
    (mrfr) or ``soft_labels`` (mrc / mrc-kl: the detector distributions of the masked regions, background
    included), ``itm_targets`` (itm); ``task``, ``ids`` (text ids), ``img_fnames``; the packed ``layout``.
    """
    if not examples:
        raise ValueError(f"collate({task}): no examples")
    txt_lens = [int(e.input_ids.shape[0]) for e in examples]
    img_lens = [int(e.img_feat.shape[0]) for e in examples]
    img_feat = np.concatenate([e.img_feat for e in examples], axis=0).astype(np.float32, copy=False)
    kw: dict = {}
    if examples[0].txt_labels is not None:
        labels = _cat([e.txt_labels for e in examples], np.int64)
        kw["txt_labels"] = labels
        if _HAS_N_MASKED:
            kw["n_txt_masked"] = int(sum(int((e.txt_labels != -1).sum()) for e in examples))
    if examples[0].img_mask is not None:
        mask = np.concatenate([e.img_mask for e in examples], axis=0)
        img_feat = np.where(mask[:, None], np.float32(0.0), img_feat)
        kw["img_masks"] = torch.from_numpy(mask.astype(bool))
        if examples[0].feat_targets is not None:
            kw["feat_targets"] = _cat([e.feat_targets for e in examples], np.float32)
        if examples[0].soft_labels is not None:
            kw["soft_labels"] = _cat([e.soft_labels for e in examples], np.float32)
    if examples[0].itm_target is not None:
        kw["itm_targets"] = torch.tensor([int(e.itm_target) for e in examples], dtype=torch.long)
    return PackedVLBatch(
        input_ids=_cat([e.input_ids for e in examples], np.int64),
        txt_lens=txt_lens,
        img_feat=torch.from_numpy(np.ascontiguousarray(img_feat)),
        img_pos=_cat([e.img_pos for e in examples], np.float32),
        img_lens=img_lens,
        task=task, ids=[e.id for e in examples], img_fnames=[e.img_fname for e in examples],
        layout=layout_from_lengths(txt_lens, img_lens, "cpu"),
        **kw,
    )


def _pad(seqs: list[torch.Tensor], width: int, value) -> torch.Tensor:
    out = seqs[0].new_full((len(seqs), width, *seqs[0].shape[1:]), value)
    for i, s in enumerate(seqs):
        out[i, :s.shape[0]] = s
    return out


def to_official(batch: PackedVLBatch, task: str) -> dict:
    """The official padded batch dict of a packed batch (as the official collates build it).

    Keys: input_ids [B, Lt] (0-padded), position_ids [1, Lt], img_feat [B, Li, D], img_pos_feat [B, Li, 7],
    attn_masks [B, L] long, gather_index [B, L]; mlm: txt_labels [B, Lt] (-1 pad); mrfr / mrc: img_masks
    [B, Li] bool, img_mask_tgt [B, L] bool, feat_targets / label_targets; itm: targets [B] and ot_inputs
    (ot_scatter [B, L], scatter_max int, txt_pad [B, Lt] bool, img_pad [B, Li] bool).
    """
    tl, nbb = batch.txt_lens, batch.img_lens
    b, max_tl, max_nbb = len(tl), max(tl), max(nbb)
    out_size = max(t + n for t, n in zip(tl, nbb))
    ids = _pad(list(batch.input_ids.split(tl)), max_tl, 0)
    feat = _pad(list(batch.img_feat.split(nbb)), max_nbb, 0.0)
    pos = _pad(list(batch.img_pos.split(nbb)), max_nbb, 0.0)
    attn = torch.zeros(b, out_size, dtype=torch.long)
    gather = torch.arange(out_size, dtype=torch.long).unsqueeze(0).repeat(b, 1)
    for i, (t, n) in enumerate(zip(tl, nbb)):
        attn[i, :t + n] = 1
        gather[i, t:t + n] = torch.arange(max_tl, max_tl + n)
    out = {"input_ids": ids, "position_ids": torch.arange(max_tl, dtype=torch.long).unsqueeze(0), "img_feat": feat,
           "img_pos_feat": pos, "attn_masks": attn, "gather_index": gather}
    if task == "mlm":
        out["txt_labels"] = _pad(list(batch.txt_labels.split(tl)), max_tl, -1)
    elif task in ("mrfr", "mrc", "mrc-kl"):
        masks = _pad(list(batch.img_masks.split(nbb)), max_nbb, False)
        tgt = torch.zeros(b, out_size, dtype=torch.bool)
        for i, t in enumerate(tl):
            tgt[i, t:t + nbb[i]] = masks[i, :nbb[i]]
        out.update(img_masks=masks, img_mask_tgt=tgt)
        if task == "mrfr":
            out["feat_targets"] = batch.feat_targets
        else:
            out["label_targets"] = batch.soft_labels
    elif task == "itm":
        scatter = torch.arange(out_size, dtype=torch.long).unsqueeze(0).repeat(b, 1)
        for i, t in enumerate(tl):
            scatter[i, t:] = torch.arange(max_tl, max_tl + out_size - t)
        txt_pad = torch.arange(max_tl).unsqueeze(0) >= torch.tensor(tl).unsqueeze(1)
        img_pad = torch.arange(max_nbb).unsqueeze(0) >= torch.tensor(nbb).unsqueeze(1)
        out["targets"] = batch.itm_targets
        out["ot_inputs"] = {"ot_scatter": scatter, "scatter_max": int(scatter.max()), "txt_pad": txt_pad,
                            "img_pad": img_pad}
    else:
        raise ValueError(f"to_official: unknown task {task!r}; expected mlm, mrfr, mrc, mrc-kl or itm")
    return out
