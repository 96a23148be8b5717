"""Collate functions that build the OFFICIAL HERO batch dicts (same keys, shapes, dtypes and padding as
``data/data.py:video_collate`` and the per-task collates of linjieli222/HERO).

Text is padded with 1 (RoBERTa ``<pad>``), masks with 0, labels / targets with -1, features with 0. A subtitle
with no frame is one zero frame with attention 0. ``video_collate`` keys (S subtitles in the batch, B videos)::

    f_sub_input_ids [S, max_sl] long       f_sub_pos_ids [1, max_sl] (clipped at 511)
    f_v_feats [S, max_vl, D] float          f_v_pos_ids [1, max_vl]
    f_attn_masks [S, max(vl + sl)] long     f_gather_index [S, max(vl + sl)] long
    f_sub_input_attn_masks [S, max_sl]      c_v_feats [B, max_frames, D]
    c_pos_ids [B, max_frames] long          c_attn_masks [B, max_frames] long
    num_subs list[int]                      sub_idx2frame_idx list[list[(sub_idx, frames)]]

Every collate returns a :class:`VideoBatch`: a dict with ``.to(device)`` and ``num_tokens`` for the trainer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch.nn.utils.rnn import pad_sequence

__all__ = ["VideoInput", "VideoBatch", "video_collate", "mlm_collate", "mfm_collate", "fom_collate", "vsm_collate",
           "vcmr_collate", "video_qa_collate", "violin_collate", "tvc_collate", "pad_tensors", "get_gather_index",
           "MlmSegment", "TXT_PAD"]

TXT_PAD = 1  # official collates pad text with RoBERTa's <pad> id, hard coded


class VideoInput(NamedTuple):
    """One video as the official ``VideoFeatSubTokDataset.__getitem__`` returns it (same field order)."""

    f_input_ids: list[torch.Tensor]   # per subtitle [L_k] long: [</s>] + ids (+ task text)
    f_v_feats: list[torch.Tensor]     # per subtitle [nf_k or 1, D] float (one zero frame when nf_k = 0)
    f_attn_masks: list[torch.Tensor]  # per subtitle [nf_k + L_k] long (first entry 0 for the zero frame)
    c_v_feats: torch.Tensor           # [n, D] float: every frame
    c_attn_masks: torch.Tensor        # [n] long ones
    num_subs: int
    sub2frames: list[tuple[int, list[int]]]


class MlmSegment(NamedTuple):
    """One MLM example (a subtitle with its frames) as the official ``VideoMlmDataset`` builds it."""

    input_ids: torch.Tensor     # [L] long: [<s>] + masked ids
    v_feats: torch.Tensor       # [nf or 1, D]
    attn_masks: torch.Tensor    # [nf + L] long
    txt_mask_tgt: torch.Tensor  # [nf + L] bool: True at masked text positions
    txt_labels: torch.Tensor    # [L] long: original id at masked positions, -1 elsewhere


class VideoBatch(dict):
    """An official collate dict that the trainer can move (``to``) and size (``num_tokens``)."""

    num_tokens: int = 0

    def to(self, device: torch.device | str, non_blocking: bool = False) -> VideoBatch:
        out = VideoBatch({k: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v)
                          for k, v in self.items()})
        out.num_tokens = self.num_tokens
        return out


def pad_tensors(tensors: Sequence[torch.Tensor], lens: Sequence[int] | None = None, pad: float = 0) -> torch.Tensor:
    """B x [T_i, D] -> [B, max T_i, D] filled with ``pad``."""
    lens = [t.size(0) for t in tensors] if lens is None else list(lens)
    out = torch.full((len(tensors), max(lens), tensors[0].size(-1)), pad, dtype=tensors[0].dtype)
    for i, (t, n) in enumerate(zip(tensors, lens)):
        out[i, :n] = t[:n]
    return out


def get_gather_index(txt_lens: Sequence[int], num_frames: Sequence[int], batch_size: int, max_len: int,
                     out_size: int) -> torch.Tensor:
    """[B, out_size] long: row i maps joint slot j to cat([frames (max_len slots), text]) so that the frames come
    first and the text follows at slot num_frames[i] (official ``get_gather_index``)."""
    if not len(txt_lens) == len(num_frames) == batch_size:
        raise ValueError(f"get_gather_index: {len(txt_lens)} text lengths, {len(num_frames)} frame counts, "
                         f"batch_size {batch_size}")
    index = torch.arange(out_size, dtype=torch.long).unsqueeze(0).repeat(batch_size, 1)
    for i, (tl, nf) in enumerate(zip(txt_lens, num_frames)):
        index[i, nf:nf + tl] = torch.arange(max_len, max_len + tl, dtype=torch.long)
    return index


def _pos_ids(width: int, clip: bool = True) -> torch.Tensor:
    pos = torch.arange(width, dtype=torch.long).unsqueeze(0)
    return pos.clamp_max(511) if clip else pos


def _finish(batch: dict, tokens: int) -> VideoBatch:
    out = VideoBatch(batch)
    out.num_tokens = int(tokens)
    return out


def video_collate(inputs: Sequence[VideoInput]) -> VideoBatch:
    """The official ``video_collate`` dict of a list of videos (keys in the module docstring)."""
    if not inputs:
        raise ValueError("video_collate: no videos")
    ids = [t for v in inputs for t in v.f_input_ids]
    feats = [t for v in inputs for t in v.f_v_feats]
    attn = [t for v in inputs for t in v.f_attn_masks]
    txt_lens = [t.size(0) for t in ids]
    v_lens = [t.size(0) for t in feats]
    f_ids = pad_sequence(ids, batch_first=True, padding_value=TXT_PAD)
    f_attn = pad_sequence(attn, batch_first=True, padding_value=0)
    f_feats = pad_tensors(feats, v_lens)
    sub_attn = pad_sequence([torch.ones(n, dtype=torch.long) for n in txt_lens], batch_first=True, padding_value=0)
    gather = get_gather_index(txt_lens, v_lens, len(ids), f_feats.size(1), f_attn.size(1))
    nframes = [v.c_v_feats.size(0) for v in inputs]
    c_feats = pad_tensors([v.c_v_feats for v in inputs], nframes)
    c_pos = torch.arange(c_feats.size(1), dtype=torch.long).unsqueeze(0).expand(len(inputs), -1).clone()
    c_attn = pad_sequence([v.c_attn_masks for v in inputs], batch_first=True, padding_value=0)
    batch = {"f_sub_input_ids": f_ids, "f_sub_pos_ids": _pos_ids(f_ids.size(1)), "f_v_feats": f_feats,
             "f_v_pos_ids": _pos_ids(f_feats.size(1), clip=False), "f_attn_masks": f_attn,
             "f_gather_index": gather, "f_sub_input_attn_masks": sub_attn, "c_v_feats": c_feats,
             "c_pos_ids": c_pos, "c_attn_masks": c_attn, "num_subs": [v.num_subs for v in inputs],
             "sub_idx2frame_idx": [v.sub2frames for v in inputs]}
    return _finish(batch, sum(txt_lens) + sum(v_lens) + sum(nframes))


# ----------------------------------------------------------------------------------------------- pre-training
def mlm_collate(inputs: Sequence[Sequence[MlmSegment]]) -> VideoBatch:
    """Official ``mlm_collate``: every subtitle of every video is one row. Keys: input_ids [n, L] (pad 1),
    position_ids [1, L] (not clipped), v_feat [n, max_vl, D], attn_masks [n, W], gather_index [n, W],
    txt_mask_tgt [n, W] bool, txt_labels [n_masked] (the masked tokens' ids, row-major)."""
    segs = [s for per_video in inputs for s in per_video]
    if not segs:
        raise ValueError("mlm_collate: no subtitle with text in the batch")
    txt_lens = [s.input_ids.size(0) for s in segs]
    input_ids = pad_sequence([s.input_ids for s in segs], batch_first=True, padding_value=TXT_PAD)
    tgt = pad_sequence([s.txt_mask_tgt for s in segs], batch_first=True, padding_value=0)
    labels = pad_sequence([s.txt_labels for s in segs], batch_first=True, padding_value=-1)
    num_fs = [s.v_feats.size(0) for s in segs]
    v_feat = pad_tensors([s.v_feats for s in segs], num_fs)
    attn = pad_sequence([s.attn_masks for s in segs], batch_first=True, padding_value=0)
    batch = {"input_ids": input_ids, "position_ids": _pos_ids(input_ids.size(1), clip=False), "v_feat": v_feat,
             "attn_masks": attn, "gather_index": get_gather_index(txt_lens, num_fs, len(segs), v_feat.size(1),
                                                                  attn.size(1)),
             "txt_mask_tgt": tgt, "txt_labels": labels[labels != -1]}
    return _finish(batch, sum(txt_lens) + sum(num_fs))


def mfm_collate(inputs: Sequence[tuple[VideoInput, list[torch.Tensor], torch.Tensor]]) -> VideoBatch:
    """Official ``mfm_collate`` (MFM-NCE and MFFR): ``video_collate`` keys with the masked frames zeroed in
    ``f_v_feats`` and ``c_v_feats``, plus f_v_masks [S, max_vl] bool, c_v_masks [B, max_frames] bool and
    feat_targets [n_masked, D] (the original features of the masked frames, video-major)."""
    batch = video_collate([v for v, _, _ in inputs])
    f_masks = pad_sequence([m for _, seg_masks, _ in inputs for m in seg_masks], batch_first=True, padding_value=0)
    c_masks = pad_sequence([m for _, _, m in inputs], batch_first=True, padding_value=0)
    c_feats = batch["c_v_feats"]
    batch["feat_targets"] = c_feats[c_masks].contiguous().view(-1, c_feats.size(-1))
    batch["f_v_feats"] = batch["f_v_feats"].masked_fill(f_masks.unsqueeze(-1), 0)
    batch["c_v_feats"] = c_feats.masked_fill(c_masks.unsqueeze(-1), 0)
    batch["f_v_masks"] = f_masks
    batch["c_v_masks"] = c_masks
    return batch


def fom_collate(inputs: Sequence[tuple[VideoInput, torch.Tensor, torch.Tensor]]) -> VideoBatch:
    """Official ``fom_collate``: ``video_collate`` keys plus shuffled_orders [B, max_frames] (arange outside the
    video), targets [B, max_frames] (-1: not shuffled / padding), reordered_frame_idx and binary_targets (the
    pairwise order labels over shuffled frames)."""
    batch = video_collate([v for v, _, _ in inputs])
    bs, max_vl = batch["c_v_feats"].shape[:2]
    orders = torch.arange(max_vl, dtype=torch.long).unsqueeze(0).repeat(bs, 1)
    targets = torch.full((bs, max_vl), -1, dtype=torch.long)
    pair_idx: list[int] = []
    pair_tgt: list[int] = []
    for b, (_, order, target) in enumerate(inputs):
        n = order.size(0)
        orders[b, :n] = order
        targets[b, :n] = target
        t = target.tolist()
        chosen = [i for i in range(n) if t[i] != -1]
        for a, i in enumerate(chosen):
            for j in chosen[a + 1:]:
                pair_idx += [b * max_vl + i, b * max_vl + j]
                pair_tgt.append(0 if t[i] > t[j] else 1)
                pair_idx += [b * max_vl + j, b * max_vl + i]
                pair_tgt.append(0 if t[j] > t[i] else 1)
    batch["shuffled_orders"] = orders
    batch["targets"] = targets
    batch["reordered_frame_idx"] = torch.tensor(pair_idx, dtype=torch.long)
    batch["binary_targets"] = torch.tensor(pair_tgt, dtype=torch.long)
    return batch


def _query_part(ids: Sequence[torch.Tensor], attn: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> dict:
    q = pad_sequence(list(ids), batch_first=True, padding_value=TXT_PAD)
    return {"query_input_ids": q, "query_pos_ids": _pos_ids(q.size(1), clip=False),
            "query_attn_masks": pad_sequence(list(attn), batch_first=True, padding_value=0),
            "targets": pad_sequence(list(targets), batch_first=True, padding_value=-1)}


def vsm_collate(inputs: Sequence[tuple[VideoInput, str, Sequence[tuple[torch.Tensor, torch.Tensor, str,
                                                                         torch.Tensor]]]]) -> VideoBatch:
    """Official ``vsm_collate``: ``video_collate`` keys plus q_vidx [Q] (video of each query), query_input_ids
    [Q, Lq] (pad 1), query_pos_ids [1, Lq], query_attn_masks [Q, Lq], targets [Q, 2] (st, ed frame) and vids."""
    batch = video_collate([v for v, _, _ in inputs])
    vids = [vid for _, vid, _ in inputs]
    queries = [q for _, _, qs in inputs for q in qs]
    vid2idx = {vid: i for i, vid in enumerate(vids)}
    batch["q_vidx"] = torch.tensor([vid2idx[q[2]] for q in queries], dtype=torch.long)
    batch.update(_query_part([q[0] for q in queries], [q[1] for q in queries], [q[3] for q in queries]))
    batch["vids"] = vids
    batch.num_tokens += sum(q[0].size(0) for q in queries)
    return batch


# ----------------------------------------------------------------------------------------------- downstream
def vcmr_collate(inputs: Sequence[tuple[VideoInput, str, Sequence[tuple[torch.Tensor, torch.Tensor, str,
                                                                          torch.Tensor]]]]) -> VideoBatch:
    """Official ``vcmr_collate`` (TVR): query keys (query_input_ids, query_pos_ids, query_attn_masks, targets
    [Q, 2]) + ``video_collate`` keys + vids + q_vidx (a video repeated in the batch maps to its last position)."""
    batch = vsm_collate(inputs)
    return batch


def _txt_input_collate(ids: Sequence[torch.Tensor], attn: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    x = pad_sequence(list(ids), batch_first=True, padding_value=TXT_PAD if ids[0].dim() == 1 else 0)
    return x, _pos_ids(x.size(1)), pad_sequence(list(attn), batch_first=True, padding_value=0)


def video_qa_collate(inputs: Sequence[tuple[list[VideoInput], list[torch.Tensor], list[torch.Tensor], list[str],
                                            list[torch.Tensor], list[torch.Tensor]]]) -> VideoBatch:
    """Official ``video_qa_collate`` (TVQA): ``video_collate`` over every (question, answer) copy of the video
    (5 per question, [</s>] q [</s>] a appended to every subtitle), targets [Q, 1] (answer index), ts_targets
    [Q, 2] (st, ed frame; -1 unknown), qa_input_ids [5Q, L] (pad 1), qa_pos_ids [1, L], qa_attn_masks [5Q, L]."""
    videos = [v for ex in inputs for v in ex[0]]
    batch = video_collate(videos)
    qa_ids = [t for ex in inputs for t in ex[1]]
    qa_attn = [t for ex in inputs for t in ex[2]]
    batch["targets"] = pad_sequence([t for ex in inputs for t in ex[4]], batch_first=True, padding_value=-1)
    batch["ts_targets"] = pad_sequence([t for ex in inputs for t in ex[5]], batch_first=True, padding_value=-1)
    batch["qa_input_ids"], batch["qa_pos_ids"], batch["qa_attn_masks"] = _txt_input_collate(qa_ids, qa_attn)
    return batch


def violin_collate(inputs: Sequence[tuple[list[VideoInput], list[torch.Tensor], list[torch.Tensor], list[str],
                                          list[torch.Tensor]]]) -> VideoBatch:
    """Official ``violin_collate``: ``video_collate`` over every (video, statement) copy ([</s>] statement appended
    to every subtitle), targets [N, 1] (1 entailed, 0 contradicted), q_input_ids [N, L], q_pos_ids, q_attn_masks."""
    videos = [v for ex in inputs for v in ex[0]]
    batch = video_collate(videos)
    batch["targets"] = pad_sequence([t for ex in inputs for t in ex[4]], batch_first=True, padding_value=-1)
    q_ids = [t for ex in inputs for t in ex[1]]
    q_attn = [t for ex in inputs for t in ex[2]]
    batch["q_input_ids"], batch["q_pos_ids"], batch["q_attn_masks"] = _txt_input_collate(q_ids, q_attn)
    return batch


def tvc_collate(inputs: Sequence[tuple[VideoInput, list[tuple[int, int]],
                                       list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]]) -> VideoBatch:
    """Official ``TvcTrainDataset.collate``: cap_input_ids [C, L] ([<s>] + ids, pad 1), cap_pos_ids [1, L],
    cap_tgt_ids [C, L] (ids + [</s>], pad -1), cap_attn_mask [C, max clip frames], clip_ranges (per video a tuple of
    (st, ed) frame ranges, ed exclusive) + ``video_collate`` keys."""
    caps = [c for _, _, cs in inputs for c in cs]
    ids = pad_sequence([c[0] for c in caps], batch_first=True, padding_value=TXT_PAD)
    batch: dict[str, Any] = {
        "cap_input_ids": ids, "cap_pos_ids": _pos_ids(ids.size(1), clip=False),
        "cap_tgt_ids": pad_sequence([c[1] for c in caps], batch_first=True, padding_value=-1),
        "cap_attn_mask": pad_sequence([c[2] for c in caps], batch_first=True, padding_value=0),
        "clip_ranges": tuple(tuple(r) for _, r, _ in inputs)}
    vb = video_collate([v for v, _, _ in inputs])
    tokens = vb.num_tokens + sum(c[0].size(0) for c in caps)
    batch.update(vb)
    return _finish(batch, tokens)
