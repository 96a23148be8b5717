"""UNITER fine-tuning tasks on packed batches: ``task(batch) -> dict(loss, logs, count)`` (the trainer's contract).

Each task holds one of the fine-tuning models of :mod:`fastvl.models.uniter` (``UniterForVisualQuestionAnswering``
...) and calls its native packed API; targets travel in ``batch.extras``:

- ``vqa`` / ``gqa`` / ``ve``: ``extras['targets']`` [B, A] soft scores; loss = per-instance BCE sum averaged over
  the batch (official), fused head + loss. :func:`vqa_soft_targets` builds the targets from answer ids.
- ``nlvr2``: 2 sequences per example for Paired / PairedAttn (left image type 1, right type 2), one for Triplet;
  ``extras['targets']`` [n] long; mean cross-entropy.
- ``itr``: a batch of B matched pairs (text i with image i); each pair is grouped with ``num_neg`` negatives
  sharing its text and ``num_neg`` sharing its image, drawn from the other pairs of the batch; mean hinge.
- ``re``: ``extras['targets']`` [B] long region index (< the example's region count); mean cross-entropy.
- ``vcr``: groups of 4 consecutive (question, choice) rows; ``extras['targets']`` [B] long (1 = correct choice),
  optional ``extras['num_choices']`` (Python ints per question, all must be 4); mean cross-entropy over rows.

``evaluate(batch)`` (no gradient) returns per-example metric values (see :mod:`fastvl.tasks.metrics`).

VILLA: ``adversarial_view()`` of nlvr2 / itr / re / vcr gives :class:`fastvl.adversarial.AdversarialTask` what it
needs (one encoder pass with the perturbations, the task loss and the scores its consistency KL compares: NLVR2
[n, 2], ITR each group's [n_groups, 1 + 2 num_neg], RE [B, max regions] (padding at -30 below the best region),
VCR each question's [n, 4]); vqa / gqa / ve use the built-in view of :mod:`fastvl.adversarial.consistency`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..batch import PackedVLBatch
from ..models.uniter.finetune import rank_hinge, select_examples
from . import metrics, register_task

__all__ = ["FinetuneTask", "ITRTask", "NLVR2Task", "RETask", "VCRTask", "VQATask", "pair_batch", "vqa_soft_targets"]


def vqa_soft_targets(answer_ids: Sequence[Sequence[int]], scores: Sequence[Sequence[float]], num_answers: int,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Soft-score targets [B, num_answers] from per-example answer ids and their scores (official VQA target).

    Raises ValueError naming the example when an id is outside ``[0, num_answers)`` (an answer missing from the
    vocabulary must be dropped by the data pipeline, not wrapped), a score is outside [0, 1], or the lists differ.
    """
    if len(answer_ids) != len(scores):
        raise ValueError(f"vqa_soft_targets: 'answer_ids' has {len(answer_ids)} examples but 'scores' has "
                         f"{len(scores)}")
    out = torch.zeros(len(answer_ids), num_answers)
    for i, (ids, sc) in enumerate(zip(answer_ids, scores)):
        if len(ids) != len(sc):
            raise ValueError(f"vqa_soft_targets: example {i} has {len(ids)} answer ids but {len(sc)} scores")
        for a, s in zip(ids, sc):
            if not 0 <= int(a) < num_answers:
                raise ValueError(f"vqa_soft_targets: example {i} has answer id {int(a)} outside the answer "
                                 f"vocabulary [0, {num_answers})")
            if not 0.0 <= float(s) <= 1.0:
                raise ValueError(f"vqa_soft_targets: example {i} has score {float(s)} for answer {int(a)}; scores "
                                 f"must lie in [0, 1]")
            out[i, int(a)] = float(s)
    return out.to(device)


def pair_batch(batch: PackedVLBatch, txt_idx: Sequence[int], img_idx: Sequence[int]) -> PackedVLBatch:
    """A packed batch whose example k is the text of example ``txt_idx[k]`` with the image of ``img_idx[k]``."""
    if len(txt_idx) != len(img_idx):
        raise ValueError(f"pair_batch: 'txt_idx' has {len(txt_idx)} entries but 'img_idx' has {len(img_idx)}")
    t = select_examples(batch, list(txt_idx))
    i = select_examples(batch, list(img_idx))
    return PackedVLBatch(input_ids=t.input_ids, txt_lens=t.txt_lens, img_feat=i.img_feat, img_pos=i.img_pos,
                         img_lens=i.img_lens, position_ids=t.position_ids, txt_type_ids=t.txt_type_ids,
                         img_type_ids=i.img_type_ids)


class FinetuneTask(nn.Module):
    """Base: ``forward(batch) -> dict(loss=scalar, logs=dict of detached 0-d tensors, count=examples)``."""

    name = ""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def _check(self, batch: PackedVLBatch) -> None:
        if not isinstance(batch, PackedVLBatch):
            raise TypeError(f"fastvl.tasks.{type(self).__name__}: 'batch' must be a PackedVLBatch, got "
                            f"{type(batch).__name__}")
        if batch.extras.get("targets") is None:
            raise ValueError(f"fastvl.tasks.{type(self).__name__}: batch.extras['targets'] is required")

    def count(self, batch: PackedVLBatch) -> int:
        return batch.batch_size

    def forward(self, batch: PackedVLBatch) -> dict:
        self._check(batch)
        loss = self.model(batch, compute_loss=True, reduction="mean")
        return dict(loss=loss, logs={f"{self.name}_loss": loss.detach()}, count=self.count(batch))

    def extra_repr(self) -> str:
        return f"name={self.name!r}"

    # VILLA hooks (see adversarial_view) ---------------------------------------------------------------------
    def adv_prepare(self, batch: PackedVLBatch) -> PackedVLBatch:
        """The batch every adversarial pass encodes (checked; ITR: grouped with its negatives)."""
        self._check(batch)
        return batch

    def adv_loss(self, h: torch.Tensor, layout, batch: PackedVLBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(training loss, scores for the consistency term) from the packed encoder output h [T, H]."""
        scores = self.model._head(h, layout, None, False, "none", batch.extras)
        return F.cross_entropy(scores.float(), batch.extras["targets"]), scores

    def adversarial_view(self):
        """The :class:`fastvl.adversarial.consistency.AdvView` of this task (see the module docstring)."""
        return _FinetuneAdvView(self)


@register_task("vqa", "gqa", "ve")
class VQATask(FinetuneTask):
    """VQA / GQA / SNLI-VE with a UniterForVisualQuestionAnswering / UniterForVisualEntailment model."""

    name = "vqa"

    def adversarial_view(self):
        """VILLA's fine-tuning view (BCE on the soft scores, KL on the answer logits)."""
        from ..adversarial.consistency import VQAView

        return VQAView(self)

    @torch.no_grad()
    def evaluate(self, batch: PackedVLBatch) -> dict[str, torch.Tensor]:
        """-> ``{'score': [B]}`` soft accuracy (and ``'logits'`` [B, A])."""
        self._check(batch)
        logits = self.model(batch, compute_loss=False)
        return {"score": metrics.vqa_score(logits, batch.extras["targets"]), "logits": logits}


@register_task("nlvr2")
class NLVR2Task(FinetuneTask):
    """NLVR2 with any of the Paired / Triplet / PairedAttn models (count = statements)."""

    name = "nlvr2"

    def count(self, batch: PackedVLBatch) -> int:
        return int(batch.extras["targets"].shape[0])

    @torch.no_grad()
    def evaluate(self, batch: PackedVLBatch) -> dict[str, torch.Tensor]:
        self._check(batch)
        return {"accuracy": metrics.accuracy(self.model(batch, compute_loss=False), batch.extras["targets"])}


@register_task("itr")
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
        grouped.extras["sample_size"] = 1 + 2 * self.num_neg
        return grouped

    def adv_loss(self, h, layout, batch):
        ss = int(batch.extras["sample_size"])
        scores = self.model._head(h, layout, None, False, "none", batch.extras)  # [n_groups * ss, 1]
        return rank_hinge(scores.float(), ss, self.model.margin).mean(), scores.reshape(-1, ss)

    def adv_count(self, batch: PackedVLBatch) -> int:
        return batch.batch_size // int(batch.extras["sample_size"])

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

    def _check(self, batch):  # targets are implicit (pair i matches)
        pass


@register_task("re")
class RETask(FinetuneTask):
    """Referring expressions with UniterForReferringExpressionComprehension (loss 'cls' or 'rank')."""

    name = "re"

    def _check(self, batch: PackedVLBatch) -> None:
        super()._check(batch)
        t = batch.extras["targets"]
        if t.dim() != 1 or t.shape[0] != batch.batch_size:
            raise ValueError(f"fastvl.tasks.RETask: extras['targets'] must have shape [{batch.batch_size}], got "
                             f"{list(t.shape)}")
        if t.device.type == "cpu":
            nbb = torch.tensor(batch.img_lens)
            bad = (t < 0) | (t >= nbb)
            if bool(bad.any()):
                i = int(bad.nonzero()[0])
                raise ValueError(f"fastvl.tasks.RETask: example {i} targets region {int(t[i])} but has "
                                 f"{batch.img_lens[i]} regions")

    def adv_loss(self, h, layout, batch):
        """Consistency scores: the region scores [B, max regions], padded / masked regions at -1e4 (probability 0,
        zero gradient in :func:`fastvl.ops.symmetric_kl`)."""
        loss = self.model._head(h, layout, batch.extras["targets"], True, "mean", batch.extras)
        return loss, self.model.region_scores(h, layout, batch.extras.get("obj_masks"))

    @torch.no_grad()
    def evaluate(self, batch: PackedVLBatch) -> dict[str, torch.Tensor]:
        """-> ``{'accuracy': [B]}``: IoU >= 0.5 between the top-scored region's box and the ground-truth box when
        ``extras['boxes']`` (packed [T_img, 4] region boxes) and ``extras['gt_boxes']`` [B, 4] are given (with
        optional ``extras['image_sizes']`` [B, 2]); else whether the top region is the target."""
        self._check(batch)
        scores = self.model(batch, compute_loss=False)
        pred = scores.argmax(1)
        if batch.extras.get("boxes") is None or batch.extras.get("gt_boxes") is None:
            return {"accuracy": (pred == batch.extras["targets"]).float(), "pred": pred}
        cu = batch.cu_seqlens("img").long()
        pred_boxes = batch.extras["boxes"][cu[:-1] + pred]
        acc = metrics.re_accuracy(pred_boxes, batch.extras["gt_boxes"], batch.extras.get("image_sizes"))
        return {"accuracy": acc, "pred": pred}


@register_task("vcr")
class VCRTask(FinetuneTask):
    """VCR (Q->A or QA->R stage) with UniterForVisualCommonsenseReasoning: 4 rows per question."""

    name = "vcr"
    num_choices = 4

    def _check(self, batch: PackedVLBatch) -> None:
        super()._check(batch)
        given = batch.extras.get("num_choices")
        if given is not None:
            bad = [i for i, n in enumerate(given) if int(n) != self.num_choices]
            if bad:
                raise ValueError(f"fastvl.tasks.VCRTask: question(s) {bad} have {[int(given[i]) for i in bad]} "
                                 f"choices; VCR needs exactly {self.num_choices} per question")
            if sum(int(n) for n in given) != batch.batch_size:
                raise ValueError(f"fastvl.tasks.VCRTask: extras['num_choices'] sums to {sum(given)} but the batch has "
                                 f"{batch.batch_size} rows")
        if batch.batch_size % self.num_choices:
            raise ValueError(f"fastvl.tasks.VCRTask: the batch has {batch.batch_size} rows, not a multiple of "
                             f"{self.num_choices} (one row per (question, choice), 4 choices per question)")

    def count(self, batch: PackedVLBatch) -> int:
        return batch.batch_size

    def adv_loss(self, h, layout, batch):
        scores = self.model.vcr_output(self.model.pooled(h, layout))  # [B, 2]
        loss = F.cross_entropy(scores.float(), batch.extras["targets"])
        return loss, scores[:, 1].reshape(-1, self.num_choices)

    @torch.no_grad()
    def evaluate(self, batch: PackedVLBatch) -> dict[str, torch.Tensor]:
        """-> ``{'accuracy': [n_questions]}``: the highest-scored choice is the correct one."""
        self._check(batch)
        scores = self.model(batch, compute_loss=False).reshape(-1, self.num_choices)
        right = batch.extras["targets"].reshape(-1, self.num_choices).argmax(1)
        return {"accuracy": metrics.accuracy(scores, right), "scores": scores}



class _FinetuneAdvView:
    """:class:`fastvl.adversarial.consistency.AdvView` of a fine-tuning task: one packed layout per micro-batch, the
    encoder run with the perturbations, then the task's ``adv_loss`` (loss, scores); consistency = symmetric KL on
    the scores, batchmean."""

    def __init__(self, task: FinetuneTask):
        self.task = task
        self.model = task.model
        self.hidden_size = int(self.model.uniter.config.hidden_size)

    def context(self, batch: PackedVLBatch) -> _AdvCtx:
        batch = self.task.adv_prepare(batch)
        return _AdvCtx(batch, self.model.uniter.layout(batch))

    def forward(self, ctx: _AdvCtx, txt_delta: torch.Tensor | None, img_delta: torch.Tensor | None):
        from ..adversarial.consistency import AdvOutput

        h = self.model.uniter.forward_packed(ctx.batch, layout=ctx.layout, txt_delta=txt_delta, img_delta=img_delta)
        loss, pred = self.task.adv_loss(h, ctx.layout, ctx.batch)
        return AdvOutput(loss, pred, {f"{self.task.name}_loss": loss.detach()})

    def consistency(self, pred: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        from ..adversarial.consistency import consistency_loss

        return consistency_loss("kl", pred, clean)

    def count(self, batch: PackedVLBatch) -> int:
        fn = getattr(self.task, "adv_count", None)
        return fn(batch) if fn is not None else self.task.count(batch)


@dataclass
class _AdvCtx:
    batch: PackedVLBatch
    layout: object
