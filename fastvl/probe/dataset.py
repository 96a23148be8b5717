"""Probe examples: a grounded caption tokenised word by word beside its image's regions, and the official padded
batch of a list of them.

Each whitespace word is tokenised on its own, so word k of the caption is text tokens ``word_tokens[k]`` = [start,
end) of the model's input (``[CLS]`` at 0, ``[SEP]`` last); phrases map to token spans through it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..data import WordPieceTokenizer, position_features
from ..data.probe_annotations import GroundedCaption, check_grounding

__all__ = ["ProbeExample", "batches_of", "make_example", "official_batch"]


@dataclass
class ProbeExample:
    """One caption + image for probing.

    caption: its grounding. input_ids [Lt] int64 with [CLS] / [SEP]. word_tokens: per word, its text-token span.
    img_feat [n, D] float32, norm_bb [n, 6] float32 (the image's kept regions, in db order).
    """

    caption: GroundedCaption
    input_ids: np.ndarray
    word_tokens: list[tuple[int, int]]
    img_feat: np.ndarray
    norm_bb: np.ndarray

    @property
    def txt_len(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_regions(self) -> int:
        return int(self.img_feat.shape[0])

    def phrase_tokens(self, start: int, end: int) -> tuple[int, int]:
        """Text-token span of words [start, end)."""
        return self.word_tokens[start][0], self.word_tokens[end - 1][1]


def make_example(caption: GroundedCaption, img_feat: np.ndarray, norm_bb: np.ndarray, tok: WordPieceTokenizer,
                 max_txt_len: int = 60) -> ProbeExample:
    """Tokenise ``caption`` word by word (at most ``max_txt_len`` tokens besides [CLS] / [SEP]; a longer caption
    raises ValueError naming it) and check its grounding against the ``len(img_feat)`` regions."""
    check_grounding(caption, int(img_feat.shape[0]), "probe annotations")
    ids, spans = [tok.cls_id], []
    for w in caption.words:
        pieces = tok.encode(w)
        if not pieces:
            pieces = [tok.unk_id]
        spans.append((len(ids), len(ids) + len(pieces)))
        ids += pieces
    if len(ids) - 1 > max_txt_len:
        raise ValueError(f"probe example {caption.id!r}: caption has {len(ids) - 1} tokens > max_txt_len "
                         f"{max_txt_len}")
    ids.append(tok.sep_id)
    return ProbeExample(caption, np.asarray(ids, np.int64), spans, np.asarray(img_feat, np.float32),
                        np.asarray(norm_bb, np.float32))


def official_batch(examples: list[ProbeExample], device: torch.device | str = "cpu") -> dict:
    """The official padded collate dict of ``examples``: input_ids [B, Lt] (0-padded), position_ids [1, Lt],
    img_feat [B, Li, D], img_pos_feat [B, Li, 7], attn_masks [B, L] long, gather_index [B, L] (text then regions,
    L = max(text + regions)); plus ``ids`` (caption ids)."""
    if not examples:
        raise ValueError("official_batch: no examples")
    tl = [e.txt_len for e in examples]
    nbb = [e.n_regions for e in examples]
    b, max_tl, max_nbb = len(examples), max(tl), max(nbb)
    out_size = max(t + n for t, n in zip(tl, nbb))
    dim = examples[0].img_feat.shape[1]
    ids = torch.zeros(b, max_tl, dtype=torch.long)
    feat = torch.zeros(b, max_nbb, dim)
    pos = torch.zeros(b, max_nbb, 7)
    attn = torch.zeros(b, out_size, dtype=torch.long)
    gather = torch.arange(out_size, dtype=torch.long).unsqueeze(0).repeat(b, 1)
    for i, e in enumerate(examples):
        if e.img_feat.shape[1] != dim:
            raise ValueError(f"official_batch: example {e.caption.id!r} has {e.img_feat.shape[1]}-d features, the "
                             f"first example {dim}-d")
        ids[i, :tl[i]] = torch.from_numpy(e.input_ids)
        feat[i, :nbb[i]] = torch.from_numpy(e.img_feat)
        pos[i, :nbb[i]] = torch.from_numpy(position_features(e.norm_bb).astype(np.float32))
        attn[i, :tl[i] + nbb[i]] = 1
        gather[i, tl[i]:tl[i] + nbb[i]] = torch.arange(max_tl, max_tl + nbb[i])
    out = {"input_ids": ids, "position_ids": torch.arange(max_tl, dtype=torch.long).unsqueeze(0), "img_feat": feat,
           "img_pos_feat": pos, "attn_masks": attn, "gather_index": gather}
    out = {k: v.to(device) for k, v in out.items()}
    out["ids"] = [e.caption.id for e in examples]
    return out


def batches_of(examples: Iterable[ProbeExample], batch_size: int) -> Iterator[list[ProbeExample]]:
    """Consecutive lists of ``batch_size`` examples (the last may be shorter)."""
    chunk: list[ProbeExample] = []
    for e in examples:
        chunk.append(e)
        if len(chunk) == batch_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
