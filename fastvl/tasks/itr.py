"""Image-text retrieval training: each of B matched pairs grouped with ``num_neg`` negatives sharing its text and
``num_neg`` sharing its image (random or in-batch hard), mean hinge; recall over the batch's matrix.

Full-matrix evaluation (every text against every image, exact or two-stage) is :mod:`fastvl.tasks.retrieval`.
The VILLA view scores each group [n_groups, 1 + 2 num_neg].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..batch import PackedVLBatch
from ..models.uniter import rank_hinge, select_examples
from . import metrics
from .base import FinetuneTask

__all__ = ["ITRTask", "pair_batch"]


def pair_batch(batch: PackedVLBatch, txt_idx: Sequence[int], img_idx: Sequence[int]) -> PackedVLBatch:
    """A packed batch whose example k is the text of example ``txt_idx[k]`` with the image of ``img_idx[k]``."""
    if len(txt_idx) != len(img_idx):
        raise ValueError(f"pair_batch: 'txt_idx' has {len(txt_idx)} entries but 'img_idx' has {len(img_idx)}")
    t = select_examples(batch, list(txt_idx))
    i = select_examples(batch, list(img_idx))
    return PackedVLBatch(input_ids=t.input_ids, txt_lens=t.txt_lens, img_feat=i.img_feat, img_pos=i.img_pos,
                         img_lens=i.img_lens, position_ids=t.position_ids, txt_type_ids=t.txt_type_ids,
                         img_type_ids=i.img_type_ids)


class ITRTask(FinetuneTask):
    """Image-text retrieval with in-batch negatives (see module doc); targets not needed.

    Args:
        num_neg: negatives per side (text-negatives and image-negatives); group size 1 + 2 num_neg.
        generator: torch.Generator (CPU) for the negative draw (default: torch's global RNG).
        hard_neg: False: negatives drawn at random among the batch's other pairs. True: hard negatives -- the whole
            b x b text x image score matrix of the batch is computed without gradient in eval mode (b^2 extra
            forwards per micro-batch) and each pair keeps its ``num_neg`` highest-scoring other images and other
            texts (the in-batch form of the official hard-negative training).
    """

    name = "itr"

    def __init__(self, model: nn.Module, num_neg: int = 1, generator: torch.Generator | None = None,
                 hard_neg: bool = False):
        super().__init__(model)
        if num_neg < 1:
            raise ValueError(f"fastvl.tasks.ITRTask: 'num_neg' must be >= 1, got {num_neg}")
        if not isinstance(hard_neg, bool):
            raise ValueError(f"fastvl.tasks.ITRTask: 'hard_neg' must be true or false, got {hard_neg!r}")
        self.num_neg = int(num_neg)
        self.generator = generator
        self.hard_neg = hard_neg

    def groups(self, b: int, scores: torch.Tensor | None = None) -> tuple[list[int], list[int]]:
        """(text index, image index) of every pair, group by group: positive, image negatives, text negatives.
        ``scores`` [b, b] (text x image): take each pair's highest-scoring negatives instead of random ones (when
        fewer than ``num_neg`` others exist, the hardest repeat)."""
        if b < 2:
            raise ValueError(f"fastvl.tasks.ITRTask: a batch needs >= 2 pairs to draw negatives, got {b}")
        n = self.num_neg
        if scores is not None:
            s = scores.float().masked_fill(torch.eye(b, dtype=torch.bool, device=scores.device), -math.inf)
            k = min(n, b - 1)
            reps = torch.arange(n) % k  # [n]: the hardest first, cycling when k < n
            img_neg = s.topk(k, dim=1).indices.cpu()[:, reps].tolist()  # per text: its hardest other images
            txt_neg = s.t().topk(k, dim=1).indices.cpu()[:, reps].tolist()  # per image: its hardest other texts
        ti, ii = [], []
        for i in range(b):
            if scores is None:
                others = [j for j in range(b) if j != i]
                draw = torch.randint(len(others), (2 * n,), generator=self.generator).tolist()
                neg = [others[d] for d in draw]
            else:
                neg = img_neg[i] + txt_neg[i]
            ti += [i] * (1 + n) + neg[n:]
            ii += [i] + neg[:n] + [i] * n
        return ti, ii

    def _hard_scores(self, batch: PackedVLBatch) -> torch.Tensor:
        """The batch's text x image scores [b, b] in eval mode (no gradient), for hard-negative mining."""
        was = self.model.training
        self.model.eval()
        try:
            return self.score_matrix(batch, range(batch.batch_size), range(batch.batch_size))
        finally:
            self.model.train(was)

    def adv_prepare(self, batch: PackedVLBatch) -> PackedVLBatch:
        if not isinstance(batch, PackedVLBatch):
            raise TypeError(f"fastvl.tasks.ITRTask: 'batch' must be a PackedVLBatch, got {type(batch).__name__}")
        ti, ii = self.groups(batch.batch_size, self._hard_scores(batch) if self.hard_neg else None)
        grouped = pair_batch(batch, ti, ii)
        grouped.sample_size = 1 + 2 * self.num_neg
        return grouped

    def adv_loss(self, h, layout, batch):
        ss = int(batch.sample_size)
        scores = self.model.head(h, layout, batch=batch)  # [n_groups * ss, 1]
        return rank_hinge(scores.float(), ss, self.model.margin).mean(), scores.reshape(-1, ss)

    def adv_count(self, batch: PackedVLBatch) -> int:
        return batch.batch_size // int(batch.sample_size)

    def forward(self, batch: PackedVLBatch) -> dict:
        grouped = self.adv_prepare(batch)
        loss = self.model(grouped, compute_loss=True, reduction="mean")
        return dict(loss=loss, logs={"itr_loss": loss.detach()}, count=batch.batch_size)

    @torch.no_grad()
    def score_matrix(self, batch: PackedVLBatch, txt: Sequence[int], img: Sequence[int], chunk: int = 256
                     ) -> torch.Tensor:
        """Scores [len(txt), len(img)] of every (text example, image example) combination, cross-encoded in packed
        chunks of ``chunk`` pairs (exact, brute force over the matrix)."""
        pairs = [(t, i) for t in txt for i in img]
        out = []
        for s in range(0, len(pairs), chunk):
            part = pairs[s:s + chunk]
            pb = pair_batch(batch, [p[0] for p in part], [p[1] for p in part])
            out.append(self.model(pb, compute_loss=False).squeeze(-1))
        flat = torch.cat(out) if out else torch.zeros(0)
        return flat.reshape(len(txt), len(img))

    @torch.no_grad()
    def evaluate(self, batch: PackedVLBatch) -> dict[str, float]:
        """Recall@1/5/10 over the batch's full text x image matrix (text i matches image i)."""
        b = batch.batch_size
        scores = self.score_matrix(batch, range(b), range(b))
        return metrics.retrieval_recall(scores, torch.arange(b))

    def check_batch(self, batch):  # targets are implicit (pair i matches)
        pass
