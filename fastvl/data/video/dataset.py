"""HERO examples: a video with its subtitle segments (official ``VideoFeatSubTokDataset``) and the per-task
conditional masking of pre-training (official ``data/mlm.py``, ``mfm.py``, ``fom.py``, ``vsm.py``).

Every random choice takes a ``numpy.random.Generator`` (the batch sources derive one per example from the seed,
the task, the epoch and the batch position), so batches are reproducible.

- MLM: each subtitle with text is one example: ``[<s>]`` + ids (cut to ``max_txt_len``) with BERT masking
  (p = mask_prob; 80% ``<mask>``, 10% a random id in v_range, 10% kept; at least one: the first token) and its
  frames; empty (pseudo-)subtitles are skipped.
- MFM (MFM-NCE / MFFR): 15% of the video's frames masked, at least one; each segment's mask is its frames' masks.
- FOM: each frame selected with p = 15%; the selected positions are shuffled among themselves.
- VSM: up to ``query_per_video`` subtitles WITH frames become queries (``[<s>]`` + ids), their text removed from
  their own segment (which keeps ``[</s>]`` and its frames), padded to ``query_per_video`` by repeating the last;
  target (st, ed) = (first frame, min(max(first + 1, last), n - 1)).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import BadExampleCounter, DataError
from .collate import MlmSegment, VideoInput
from .video_db import SubtitleDB, VideoFeatDB

__all__ = ["VideoSubData", "bert_mask", "mask_frames", "random_reorder"]


def bert_mask(ids: Sequence[int], rng: np.random.Generator, prob: float, mask_id: int, v_range: tuple[int, int]
              ) -> tuple[list[int], list[int]]:
    """Official ``random_word``: (masked ids, labels with -1 where not masked); at least one masked (the first)."""
    out, labels = list(ids), []
    for i, tok in enumerate(ids):
        p = rng.random()
        if p < prob:
            p /= prob
            if p < 0.8:
                out[i] = mask_id
            elif p < 0.9:
                out[i] = int(rng.integers(v_range[0], v_range[1]))
            labels.append(int(tok))
        else:
            labels.append(-1)
    if all(x == -1 for x in labels):
        labels[0], out[0] = int(ids[0]), mask_id
    return out, labels


def mask_frames(n: int, rng: np.random.Generator, prob: float) -> np.ndarray:
    """[n] bool: each frame with p = prob, at least one (official ``_get_img_mask``)."""
    m = rng.random(n) < prob
    if not m.any():
        m[int(rng.integers(n))] = True
    return m


def random_reorder(n: int, rng: np.random.Generator, prob: float) -> tuple[list[int], list[int]]:
    """Official ``random_reorder`` over positions 0..n-1: (order, target). Selected positions (p = prob) get a
    shuffled copy of themselves; target[new position] = original position, -1 for positions not selected."""
    chosen = [i for i in range(n) if rng.random() < prob]
    shuffled = list(chosen)
    rng.shuffle(shuffled)
    order, target = list(range(n)), [-1] * n
    for pos, new in zip(chosen, shuffled):
        order[pos] = new
        target[new] = pos
    return order, target


class VideoSubData:
    """Videos of a (video db, subtitle db) pair, checked on opening: every video of the subtitle db must be in
    the video db (else :class:`DataError`, or counted skips with ``skip_bad_examples``).

    Args:
        max_txt_len: subtitle tokens kept in MLM / VSM (official 60; -1 all).
        sub_ctx_len: previous subtitles prepended to each segment's text (official 0; 2 for VIOLIN).
    """

    def __init__(self, video_db: VideoFeatDB, sub_db: SubtitleDB, max_txt_len: int = 60, sub_ctx_len: int = 0,
                 skip_bad_examples: bool = False, counter: BadExampleCounter | None = None,
                 vids: Sequence[str] | None = None):
        if sub_ctx_len < 0:
            raise ValueError(f"VideoSubData: 'sub_ctx_len' must be >= 0, got {sub_ctx_len}")
        self.video_db, self.sub_db = video_db, sub_db
        self.max_txt_len, self.sub_ctx_len = max_txt_len, sub_ctx_len
        self.skip = skip_bad_examples
        self.bad = counter if counter is not None else BadExampleCounter()
        self.sep, self.cls_, self.mask = sub_db.sep, sub_db.cls_, sub_db.mask
        self.v_range = sub_db.v_range
        self.vids: list[str] = []
        for vid in (sub_db.vids if vids is None else vids):
            try:
                if vid not in sub_db:
                    raise DataError(sub_db.name, vid, "video has no subtitle record", "missing_video")
                if vid not in video_db:
                    raise DataError(video_db.name, vid, f"video of subtitle db {sub_db.name} is not in the video db",
                                    "missing_video")
            except DataError as e:
                self.bad.skip_or_raise(e, self.skip)
                continue
            self.vids.append(vid)
        if not self.vids:
            raise DataError(sub_db.name, None, "no usable videos", "no_examples")
        self.lens = [video_db.nframes(v) for v in self.vids]

    @property
    def vfeat_dim(self) -> int:
        return self.video_db.vfeat_dim

    def __len__(self) -> int:
        return len(self.vids)

    def subtitles(self, vid: str) -> tuple[list[list[int]], list[tuple[int, list[int]]]]:
        """(token ids per subtitle, sub2frames after the cut), checked against the video's frame count."""
        ids, pairs, _ = self.sub_db.read(vid, self.video_db.name2nframe[vid])
        return ids, pairs

    def _text(self, ids: list[list[int]], k: int, cut: bool, exclude: set[int] = frozenset()) -> list[int]:
        out: list[int] = []
        for j in range(k - self.sub_ctx_len, k + 1):
            if 0 <= j < len(ids) and j not in exclude:
                out += ids[j][:self.max_txt_len] if cut and self.max_txt_len != -1 else ids[j]
        return out

    def video_input(self, vid: str) -> VideoInput:
        """Official ``VideoFeatSubTokDataset[vid]``: per subtitle ``[</s>]`` + its text (and ``sub_ctx_len``
        previous ones) with its frames (one zero frame with attention 0 when it has none) + every frame."""
        feat = torch.from_numpy(self.video_db.get(vid))
        ids, pairs = self.subtitles(vid)
        seg_ids, seg_feats, seg_attn = [], [], []
        for k, frames in pairs:
            text = [self.sep] + self._text(ids, k, cut=False)
            frames = [f for f in frames if f < feat.shape[0]]
            seg_ids.append(torch.tensor(text, dtype=torch.long))
            if frames:
                seg_feats.append(feat[frames])
                seg_attn.append(torch.ones(len(text) + len(frames), dtype=torch.long))
            else:
                seg_feats.append(torch.zeros(1, feat.shape[1]))
                seg_attn.append(torch.tensor([0] + [1] * len(text), dtype=torch.long))
        return VideoInput(seg_ids, seg_feats, seg_attn, feat, torch.ones(feat.shape[0], dtype=torch.long), len(pairs),
                          pairs)

    # ------------------------------------------------------------------------------------------ tasks
    def mlm_example(self, vid: str, rng: np.random.Generator, mask_prob: float = 0.15) -> list[MlmSegment]:
        """Official ``VideoMlmDataset[vid]``: one masked example per subtitle with text."""
        feat = torch.from_numpy(self.video_db.get(vid))
        ids, pairs = self.subtitles(vid)
        out = []
        for k, frames in pairs:
            text = self._text(ids, k, cut=True)
            if not text:  # empty (pseudo-)subtitle: nothing to predict
                continue
            masked, labels = bert_mask(text, rng, mask_prob, self.mask, self.v_range)
            input_ids = torch.tensor([self.cls_] + masked, dtype=torch.long)
            txt_labels = torch.tensor([-1] + labels, dtype=torch.long)
            nf = len(frames)
            v = feat[frames] if nf else torch.zeros(1, feat.shape[1])
            attn = torch.ones(len(input_ids) + max(nf, 1), dtype=torch.long)
            if not nf:
                attn[0] = 0
            tgt = torch.cat([torch.zeros(max(nf, 1), dtype=torch.bool), txt_labels != -1])
            out.append(MlmSegment(input_ids, v, attn, tgt, txt_labels))
        return out

    def mfm_example(self, vid: str, rng: np.random.Generator, mask_prob: float = 0.15
                    ) -> tuple[VideoInput, list[torch.Tensor], torch.Tensor]:
        """Official ``MfmDataset[vid]``: (video, per-segment frame masks, video frame mask [n] bool)."""
        video = self.video_input(vid)
        c_mask = torch.from_numpy(mask_frames(video.c_v_feats.shape[0], rng, mask_prob))
        seg_masks = [c_mask[frames] if frames else torch.zeros(1, dtype=torch.bool) for _, frames in video.sub2frames]
        return video, seg_masks, c_mask

    def fom_example(self, vid: str, rng: np.random.Generator, reorder_prob: float = 0.15
                    ) -> tuple[VideoInput, torch.Tensor, torch.Tensor]:
        """Official ``FomDataset[vid]``: (video, shuffled order [n], target [n] with -1 where not shuffled)."""
        video = self.video_input(vid)
        order, target = random_reorder(video.c_v_feats.shape[0], rng, reorder_prob)
        return video, torch.tensor(order, dtype=torch.long), torch.tensor(target, dtype=torch.long)

    def has_matched_subtitle(self, vid: str) -> bool:
        return any(frames for _, frames in self.subtitles(vid)[1])

    def vsm_example(self, vid: str, rng: np.random.Generator, query_per_video: int = 5
                    ) -> tuple[VideoInput, str, tuple[tuple[torch.Tensor, torch.Tensor, str, torch.Tensor], ...]]:
        """Official ``VsmDataset[vid]``: (video with the query subtitles' text removed, vid, ``query_per_video``
        queries (ids [<s>] + text, attention, vid, [st, ed]))."""
        feat = torch.from_numpy(self.video_db.get(vid))
        n = feat.shape[0]
        ids, pairs = self.subtitles(vid)
        matched = [k for k, frames in pairs if frames]
        if not matched:
            raise DataError(self.sub_db.name, vid, "VSM needs a subtitle with frames; this video has none",
                            "no_matched_subtitle")
        picked = rng.choice(len(matched), size=min(len(matched), query_per_video), replace=False)
        queries = {matched[int(i)] for i in picked}
        seg_ids, seg_feats, seg_attn, q_out = [], [], [], []
        for k, frames in pairs:
            text = [self.sep] + self._text(ids, k, cut=True, exclude=queries)
            if frames:
                seg_feats.append(feat[frames])
                seg_attn.append(torch.ones(len(text) + len(frames), dtype=torch.long))
                if k in queries:
                    q = torch.tensor([self.cls_] + (ids[k][:self.max_txt_len] if self.max_txt_len != -1 else ids[k]),
                                     dtype=torch.long)
                    st = frames[0]
                    ed = min(max(frames[0] + 1, frames[-1]), n - 1)
                    q_out.append((q, torch.ones(len(q), dtype=torch.long), vid,
                                  torch.tensor([st, ed], dtype=torch.long)))
            else:
                seg_feats.append(torch.zeros(1, feat.shape[1]))
                seg_attn.append(torch.tensor([0] + [1] * len(text), dtype=torch.long))
            seg_ids.append(torch.tensor(text, dtype=torch.long))
        while len(q_out) < query_per_video:
            q_out.append(q_out[-1])
        video = VideoInput(seg_ids, seg_feats, seg_attn, feat, torch.ones(n, dtype=torch.long), len(pairs), pairs)
        return video, vid, tuple(q_out)
