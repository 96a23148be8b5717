"""Caption data: caption masking, training batches of captions and evaluation images with all their references.

Any official txt_db / img_db pair whose examples are captions of the image they name (``img2txts.json`` groups the
references) serves; the default is the synthetic corpus. Masking (:func:`mask_caption`): every caption token after
[CLS] -- [SEP] included, so a model learns to stop -- is chosen with probability ``prob``, at least one per caption; a
chosen token becomes [MASK] (80%), a random id of the vocabulary range (10%) or stays (10%).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..batch import PackedVLBatch
from .collate import Example
from .errors import BadExampleCounter, DataError
from .lmdb_db import ImageDB, TxtDB
from .pretrain_data import PretrainData, VLExamples

__all__ = ["CaptionEvalData", "CaptionImage", "CaptionTrainData", "mask_caption"]


def mask_caption(ids: np.ndarray, rng: np.random.Generator, prob: float, mask_id: int, v_range: tuple[int, int]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Caption masking of ``ids`` [L] = ``[CLS] w_1 .. w_n [SEP]`` (see the module doc) -> (input ids, labels [L]).

    Positions 1..L-1 ([SEP] included) can be chosen, each with p=``prob``, at least one; chosen: [MASK] 80%, a random
    id in ``v_range`` 10%, unchanged 10%. labels: the original id at chosen positions, -1 elsewhere.
    """
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 1 or len(ids) < 2:
        raise ValueError(f"mask_caption: 'ids' must be [CLS] ... [SEP] with at least 2 tokens, got shape "
                         f"{list(ids.shape)}")
    if not 0.0 < prob <= 1.0:
        raise ValueError(f"mask_caption: 'prob' must be in (0, 1], got {prob}")
    n = len(ids) - 1
    chosen = rng.random(n) < prob
    if not chosen.any():
        chosen[int(rng.integers(n))] = True
    how = rng.random(n)
    rand_ids = rng.integers(v_range[0], v_range[1], n)
    out, labels = ids.copy(), np.full_like(ids, -1)
    tail = ids[1:]
    labels[1:] = np.where(chosen, tail, -1)
    out[1:] = np.where(chosen & (how < 0.8), mask_id, np.where(chosen & (how >= 0.8) & (how < 0.9), rand_ids, tail))
    return out, labels


class CaptionTrainData(PretrainData):
    """Training batches of captions (one source, ``'caption'``): the pre-training batching machinery (token
    buckets, deterministic per-example randomness, resumable sources) with :func:`mask_caption` as the masking."""

    def __init__(self, examples: VLExamples, max_tokens: int, seed: int, rank: int, world_size: int,
                 mask_prob: float = 0.15, num_workers: int = 0):
        super().__init__(examples, {"caption": 1.0}, max_tokens, seed, rank, world_size, train=True,
                         mask_prob=mask_prob, num_workers=num_workers)

    def make_example(self, task: str, i: int, rng: np.random.Generator) -> Example:
        ex = self.examples
        p, id_, name = ex.items[i]
        ids, labels = mask_caption(np.asarray(ex.text(i), dtype=np.int64), rng, self.mask_prob, ex.mask, ex.v_range)
        img = ex.image(p, name)
        return Example(id=id_, img_fname=name, input_ids=ids, img_feat=img.feat, img_pos=img.pos, txt_labels=labels)


@dataclass
class CaptionImage:
    """One evaluation image: its db pair, name and reference captions (token ids without [CLS] / [SEP])."""

    pair: int
    img_fname: str
    refs: list[list[int]]


class CaptionEvalData:
    """Evaluation images of (txt_db, img_db) pairs, each with all its reference captions (from ``img2txts.json``).

    Images missing from the img_db, or with no readable caption, raise :class:`DataError` (or are counted and left
    out with ``skip_bad_examples``). :meth:`batches` yields ``(PackedVLBatch of images, list of CaptionImage)``.
    """

    def __init__(self, pairs: Sequence[tuple[TxtDB, ImageDB]], batch_size: int = 64, skip_bad_examples: bool = False,
                 counter: BadExampleCounter | None = None):
        if batch_size < 1:
            raise ValueError(f"CaptionEvalData: 'batch_size' must be >= 1, got {batch_size}")
        self.pairs, self.batch_size = list(pairs), int(batch_size)
        self.bad = counter if counter is not None else BadExampleCounter()
        self.images: list[CaptionImage] = []
        for p, (txt, img) in enumerate(self.pairs):
            for name, ids in sorted(txt.img2txts.items()):
                try:
                    if name not in img:
                        raise DataError(img.name, name, f"image with captions in {txt.name} is not in the img_db",
                                        "missing_image")
                    refs = [txt.input_ids(i) for i in ids]
                except DataError as e:
                    self.bad.skip_or_raise(e, skip_bad_examples)
                    continue
                if refs:
                    self.images.append(CaptionImage(p, name, refs))
        if not self.images:
            raise DataError(", ".join(t.name for t, _ in self.pairs), None, "no evaluation images with captions",
                            "no_examples")

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, max_batches: int | None = None) -> Iterator[tuple[PackedVLBatch, list[CaptionImage]]]:
        """Batches of ``batch_size`` images in a fixed order (the first ``max_batches`` only, if given)."""
        for k, start in enumerate(range(0, len(self.images), self.batch_size)):
            if max_batches is not None and k >= max_batches:
                return
            items = self.images[start:start + self.batch_size]
            recs = [self.pairs[it.pair][1].get(it.img_fname) for it in items]
            batch = PackedVLBatch(input_ids=torch.zeros(0, dtype=torch.long), txt_lens=[0] * len(items),
                                  img_feat=torch.from_numpy(np.concatenate([r.feat for r in recs]).astype(np.float32)),
                                  img_pos=torch.from_numpy(np.concatenate([r.pos for r in recs]).astype(np.float32)),
                                  img_lens=[r.nbb for r in recs], img_fnames=[it.img_fname for it in items])
            yield batch, items
