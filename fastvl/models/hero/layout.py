"""The packed layout of an official HERO collate dict (``video_collate``): every subtitle segment
[valid frames ; subtitle tokens] back to back in ONE packed tensor, plus the index that fuses the segments'
frame outputs onto their video frames.

Lengths come from one host read of the mask sums (``f_attn_masks``, ``f_sub_input_attn_masks``, ``c_attn_masks``)
and from the Python lists ``num_subs`` / ``sub_idx2frame_idx``; after that every index is built on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["HeroSegmentLayout", "TextLayout", "ragged_rows"]


def ragged_rows(lens: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """For sequence i of length lens[i], the rows starts[i] + 0 .. starts[i] + lens[i] - 1, all concatenated.

    lens, starts: [N] int64 on one device -> [sum(lens)] int64.
    """
    total_starts = torch.repeat_interleave(starts, lens)
    first = torch.cumsum(lens, 0) - lens
    offsets = torch.arange(total_starts.shape[0], device=lens.device) - torch.repeat_interleave(first, lens)
    return total_starts + offsets


def _require(batch: dict[str, Any], key: str) -> Any:
    if batch.get(key) is None:
        raise KeyError(f"fastvl.models.hero: the batch has no {key!r} (an official video_collate dict is expected)")
    return batch[key]


@dataclass
class HeroSegmentLayout:
    """Where every token of a HERO batch goes in the packed segment tensor and in the frame grid.

    Attributes (N segments, B videos, L = c_v_feats.shape[1] frame slots per video):
        frm_lens, txt_lens: Python ints per segment (valid frames, subtitle tokens).
        clip_lens: Python ints per video (real frames).
        cu_seqlens: [N+1] int32 over the packed segments; max_seqlen the longest segment.
        frm_src, txt_src: flat indices into f_v_feats [N * max_vl] / f_sub_input_ids [N * max_sl] of the real rows.
        frm_dst, txt_dst: their rows in the packed tensor (frames first in each segment).
        fuse_src, fuse_dst: packed frame rows and their flat frame-grid index (video * L + frame) for the fusion.
        clip_rows: [sum(clip_lens)] flat indices (video * L + frame) of the real frames; cu_clip [B+1] int32.
    """

    frm_lens: list[int]
    txt_lens: list[int]
    clip_lens: list[int]
    cu_seqlens: torch.Tensor
    max_seqlen: int
    frm_src: torch.Tensor
    txt_src: torch.Tensor
    frm_dst: torch.Tensor
    txt_dst: torch.Tensor
    fuse_src: torch.Tensor
    fuse_dst: torch.Tensor
    clip_rows: torch.Tensor
    cu_clip: torch.Tensor

    @property
    def total(self) -> int:
        """Packed token count."""
        return sum(self.frm_lens) + sum(self.txt_lens)

    @classmethod
    def from_batch(cls, batch: dict[str, Any]) -> HeroSegmentLayout:
        """Build the layout from an official collate dict (see the module docstring for the keys read)."""
        f_ids = _require(batch, "f_sub_input_ids")
        f_feats = _require(batch, "f_v_feats")
        f_attn = _require(batch, "f_attn_masks")
        txt_attn = _require(batch, "f_sub_input_attn_masks")
        c_feats = _require(batch, "c_v_feats")
        c_attn = _require(batch, "c_attn_masks")
        num_subs = [int(n) for n in _require(batch, "num_subs")]
        sub2frames = _require(batch, "sub_idx2frame_idx")
        n_seg, max_sl = f_ids.shape
        max_vl = f_feats.shape[1]
        n_vid, n_frm = c_feats.shape[:2]
        if f_attn.shape[0] != n_seg or txt_attn.shape != f_ids.shape or f_feats.shape[0] != n_seg:
            raise ValueError(f"fastvl.models.hero: segment tensors disagree: f_sub_input_ids {tuple(f_ids.shape)}, "
                             f"f_sub_input_attn_masks {tuple(txt_attn.shape)}, f_attn_masks {tuple(f_attn.shape)}, "
                             f"f_v_feats {tuple(f_feats.shape)}")
        if c_attn.shape != (n_vid, n_frm):
            raise ValueError(f"fastvl.models.hero: c_attn_masks must be {(n_vid, n_frm)} (c_v_feats[:2]), "
                             f"got {tuple(c_attn.shape)}")
        if sum(num_subs) != n_seg or len(num_subs) != n_vid or len(sub2frames) != n_vid:
            raise ValueError(f"fastvl.models.hero: num_subs {num_subs} (sum {sum(num_subs)}) and sub_idx2frame_idx "
                             f"(len {len(sub2frames)}) must describe the {n_seg} segments of {n_vid} videos")
        # the one host read: per-segment attended and text lengths, per-video frame counts
        seg_sums = torch.stack([f_attn.sum(1), txt_attn.sum(1)]).long().tolist()
        clip_lens = c_attn.sum(1).long().tolist()
        txt_lens = seg_sums[1]
        frm_lens = [a - t for a, t in zip(seg_sums[0], txt_lens)]
        for s, nf in enumerate(frm_lens):
            if nf < 0 or nf > max_vl:
                raise ValueError(f"fastvl.models.hero: segment {s} has {nf} attended frames (f_attn_masks minus "
                                 f"f_sub_input_attn_masks), expected 0..{max_vl}")
        if min(clip_lens) < 1:
            raise ValueError(f"fastvl.models.hero: every video needs >= 1 frame, c_attn_masks sums are {clip_lens}")
        device = f_ids.device
        seg_lens = [nf + tl for nf, tl in zip(frm_lens, txt_lens)]
        if min(seg_lens) < 1:
            raise ValueError(f"fastvl.models.hero: every segment needs >= 1 attended token, got lengths {seg_lens}")
        # fusion index: segment (video start + sid) frame j -> frame grid (video, frame index)
        seg_start = [0]
        for s_len in seg_lens:
            seg_start.append(seg_start[-1] + s_len)
        fuse_src: list[int] = []
        fuse_dst: list[int] = []
        first_seg = 0
        for vid, pairs in enumerate(sub2frames):
            for sid, frames in pairs:
                if len(frames) == 0:
                    continue
                seg = first_seg + int(sid)
                if not 0 <= int(sid) < num_subs[vid] or len(frames) > frm_lens[seg]:
                    raise ValueError(f"fastvl.models.hero: sub_idx2frame_idx[{vid}] entry ({sid}, {len(frames)} "
                                     f"frames) does not fit its segment ({num_subs[vid]} subtitles, segment frames "
                                     f"{frm_lens[seg] if 0 <= int(sid) < num_subs[vid] else 'n/a'})")
                for j, f in enumerate(frames):
                    if not 0 <= int(f) < clip_lens[vid]:
                        raise ValueError(f"fastvl.models.hero: sub_idx2frame_idx[{vid}] aligns subtitle {sid} to "
                                         f"frame {f}, outside the video (frames 0..{clip_lens[vid] - 1})")
                    fuse_src.append(seg_start[seg] + j)
                    fuse_dst.append(vid * n_frm + int(f))
            first_seg += num_subs[vid]
        as_long = dict(dtype=torch.long, device=device)
        frm_t = torch.tensor(frm_lens, **as_long)
        txt_t = torch.tensor(txt_lens, **as_long)
        seg_ids = torch.arange(n_seg, **as_long)
        cu = torch.tensor(seg_start, **as_long)
        clip_t = torch.tensor(clip_lens, **as_long)
        cu_clip = torch.cat([clip_t.new_zeros(1), torch.cumsum(clip_t, 0)])
        return cls(
            frm_lens=frm_lens, txt_lens=txt_lens, clip_lens=clip_lens,
            cu_seqlens=cu.to(torch.int32), max_seqlen=max(seg_lens),
            frm_src=ragged_rows(frm_t, seg_ids * max_vl), txt_src=ragged_rows(txt_t, seg_ids * max_sl),
            frm_dst=ragged_rows(frm_t, cu[:-1]), txt_dst=ragged_rows(txt_t, cu[:-1] + frm_t),
            fuse_src=torch.tensor(fuse_src, **as_long), fuse_dst=torch.tensor(fuse_dst, **as_long),
            clip_rows=ragged_rows(clip_t, torch.arange(n_vid, **as_long) * n_frm), cu_clip=cu_clip.to(torch.int32))


@dataclass
class TextLayout:
    """Packed rows of a padded text batch (queries, QA / statement text): the rows whose attention mask is 1.

    Attributes (N sequences of padded length L):
        rows: [T] int64 flat indices (n * L + position) of the real tokens, sequence by sequence.
        cols: [T] int64 their positions inside the padded sequence.
        seg_ids: [T] int64 the sequence of every row.
        lens: Python ints per sequence; cu_seqlens [N+1] int32; max_seqlen the longest.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    seg_ids: torch.Tensor
    lens: list[int]
    cu_seqlens: torch.Tensor
    max_seqlen: int

    @property
    def n(self) -> int:
        """Number of sequences."""
        return len(self.lens)

    @classmethod
    def from_mask(cls, attn_masks: torch.Tensor, name: str = "attn_masks", allow_empty: bool = False
                  ) -> TextLayout:
        """attn_masks [N, L] (1 = real token) -> the layout (one host read of the per-sequence counts)."""
        if not isinstance(attn_masks, torch.Tensor) or attn_masks.dim() != 2:
            shape = tuple(attn_masks.shape) if isinstance(attn_masks, torch.Tensor) else type(attn_masks).__name__
            raise ValueError(f"fastvl.models.hero: {name} must be a [N, L] tensor, got {shape}")
        real = attn_masks.ne(0)
        lens_t = real.sum(1)
        lens = [int(v) for v in lens_t.tolist()]
        if not allow_empty and lens and min(lens) < 1:
            raise ValueError(f"fastvl.models.hero: every sequence of {name} needs >= 1 token, got lengths {lens}")
        rows = real.reshape(-1).nonzero().squeeze(1)
        width = attn_masks.shape[1]
        cu = torch.zeros(len(lens) + 1, dtype=torch.long, device=attn_masks.device)
        cu[1:] = torch.cumsum(lens_t, 0)
        return cls(rows=rows, cols=rows % max(width, 1), seg_ids=rows // max(width, 1), lens=lens,
                   cu_seqlens=cu.to(torch.int32), max_seqlen=max(lens) if lens else 0)
