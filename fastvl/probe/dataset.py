"""Probe examples: a grounded caption tokenised word by word beside its image's regions, and the official padded
batch of a list of them.

Each whitespace word is tokenised on its own, so word k of the caption is text tokens ``word_tokens[k]`` = [start,
end) of the model's input (``[CLS]`` at 0, ``[SEP]`` last); phrases map to token spans through it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..data import WordPieceTokenizer, position_features
from ..data.probe_annotations import GroundedCaption, check_grounding

__all__ = ["ProbeExample", "batches_of", "make_example", "mask_stated_relations", "official_batch"]


@dataclass
class ProbeExample:
    """One caption + image for probing.

    caption: its grounding. input_ids [Lt] int64 with [CLS] / [SEP]. word_tokens: per word, its text-token span.
    img_feat [n, D] float32, norm_bb [n, 6] float32 (the image's kept regions, in db order). mask_id: [MASK]'s id.
    """

    caption: GroundedCaption
    input_ids: np.ndarray
    word_tokens: list[tuple[int, int]]
    img_feat: np.ndarray
    norm_bb: np.ndarray
    mask_id: int | None = None  # the tokenizer's [MASK] id (for :func:`mask_stated_relations`)

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
                        np.asarray(norm_bb, np.float32), tok.mask_id)


def mask_stated_relations(e: ProbeExample) -> tuple[ProbeExample, list[int | None]]:
    """``e`` with the predicate words of every relation its caption states (``source == 'caption'``) replaced by ONE
    [MASK] token each, and, per relation of ``e.caption.relations``, the text-token index of its [MASK] slot (None
    for relations the caption does not state).

    One slot whatever the predicate ("left of" and "above" both become one [MASK]) so the masked text is the same
    for every predicate: nothing in the text (words, length, positions) tells the relation; only the image can.
    Example: words "a cup left of the ball ." with tokens [CLS] a cup left of the ball . [SEP] (one token per word)
    and the relation stated by words [2, 4) -> tokens [CLS] a cup [MASK] the ball . [SEP], slot 3. Phrases and
    relation spans of the returned caption point at the new words; a phrase overlapping a predicate raises
    ValueError.
    """
    stated = sorted({(r.start, r.end) for r in e.caption.relations if r.source == "caption"})
    if not stated:
        return e, [None] * len(e.caption.relations)
    if e.mask_id is None:
        raise ValueError(f"mask_stated_relations: example {e.caption.id!r} has no 'mask_id' (build it with "
                         "make_example)")
    for (s0, e0), (s1, _) in zip(stated, stated[1:]):
        if s1 < e0:
            raise ValueError(f"mask_stated_relations: example {e.caption.id!r} states relations with overlapping "
                             f"words [{s0}, {e0}) and [{s1}, ...)")
    starts = {s0: e0 for s0, e0 in stated}
    ids, spans, words, new_index = [int(e.input_ids[0])], [], [], {}
    k = 0
    while k < len(e.caption.words):
        new_index[k] = len(words)
        if k in starts:
            spans.append((len(ids), len(ids) + 1))
            ids.append(e.mask_id)
            words.append("[MASK]")
            for j in range(k + 1, starts[k]):
                new_index[j] = len(words) - 1
            k = starts[k]
            continue
        t0, t1 = e.word_tokens[k]
        spans.append((len(ids), len(ids) + t1 - t0))
        ids += e.input_ids[t0:t1].tolist()
        words.append(e.caption.words[k])
        k += 1
    ids.append(int(e.input_ids[-1]))
    new_index[len(e.caption.words)] = len(words)
    masked_words = {j for s0, e0 in stated for j in range(s0, e0)}
    phrases = []
    for p in e.caption.phrases:
        if masked_words & set(range(p.start, p.end)):
            raise ValueError(f"mask_stated_relations: example {e.caption.id!r}: phrase words [{p.start}, {p.end}) "
                             "overlap a stated predicate")
        phrases.append(replace(p, start=new_index[p.start], end=new_index[p.end - 1] + 1))
    relations = [replace(r, start=new_index[r.start], end=new_index[r.start] + 1) if r.source == "caption" else r
                 for r in e.caption.relations]
    cap = replace(e.caption, words=words, phrases=phrases, relations=relations)
    slots = [spans[r.start][0] if r.source == "caption" else None for r in relations]
    return replace(e, caption=cap, input_ids=np.asarray(ids, np.int64), word_tokens=spans), slots


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
