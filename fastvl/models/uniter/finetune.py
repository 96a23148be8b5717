"""UNITER fine-tuning models, drop-in for the official classes (names, constructors, ``state_dict`` keys, forward).

``from fastvl.models.uniter import UniterForVisualQuestionAnswering`` (and the other classes here and in
:mod:`fastvl.models.uniter.nlvr2`) replaces the official import: official fine-tuned checkpoints load with
``strict=True``, and ``model(batch, compute_loss)`` takes the official batch dict and returns what the official
model returns. Inside, the encoder runs packed (see :mod:`fastvl.models.uniter`); heads run on the rows they need.

Every class also takes a :class:`~fastvl.batch.PackedVLBatch` (the native API, :meth:`forward_packed`): task
targets travel in ``batch.targets`` (``batch.sample_size`` for retrieval), and ``reduction`` selects the
official per-element losses (``'none'``) or the official training reduction (``'mean'``; for VQA / VE the
per-instance BCE sum averaged over the batch, computed by :func:`fastvl.ops.bce_soft.fused_bce_soft`).

Both forwards end in the public :meth:`~UniterFinetuneBase.head` (keyword-only): the task head, and with
``compute_loss`` its loss, on the packed encoder output ``h`` [T, H]. Code that runs the encoder itself (the VILLA
views of :mod:`fastvl.tasks`, with perturbations) calls it to get exactly what the forward would return.

Official batch dicts: ``input_ids`` [B, Lt], ``position_ids`` [1 or B, Lt], ``img_feat`` [B, Li, D],
``img_pos_feat`` [B, Li, 7], ``attn_masks`` [B, L], ``gather_index`` [B, L], plus per task: ``targets``
(VQA / VE [B, A] soft scores; NLVR2 [n_pairs] long; RE [B] or [B, 1] long region index; VCR [B] or [B, 1] long,
1 = correct choice), ``img_type_ids`` [B, Li] (NLVR2), ``txt_type_ids`` [B, Lt] (VCR), ``sample_size`` (retrieval),
``obj_masks`` [B, max_nbb] bool and ``txt_lens`` / ``num_bbs`` lists (RE).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import nn
from torch.nn import functional as F

from ...batch import PackedVLBatch
from ...nn.bert import LAYER_NORM_EPS
from ...ops.bce_soft import fused_bce_soft
from ...ops.pack import unpack
from .config import UniterConfig
from .layout import PackedLayout
from .model import UniterModel, UniterPreTrainedModel

__all__ = [
    "UniterFinetuneBase",
    "UniterForImageTextRetrieval",
    "UniterForImageTextRetrievalHardNeg",
    "UniterForReferringExpressionComprehension",
    "UniterForVisualCommonsenseReasoning",
    "UniterForVisualEntailment",
    "UniterForVisualQuestionAnswering",
    "select_examples",
]

_COMMON = ("input_ids", "position_ids", "img_feat", "img_pos_feat", "attn_masks", "gather_index")
REDUCTIONS = ("none", "mean")
NEG_FILL = -1e4  # score of padded / non-object regions (official)


def _two_layer_head(hidden: int, out: int, act: nn.Module) -> nn.Sequential:
    """Linear(H, 2H) -> act -> LayerNorm(2H) -> Linear(2H, out) (keys ``0``, ``2``, ``3``)."""
    return nn.Sequential(nn.Linear(hidden, hidden * 2), act, nn.LayerNorm(hidden * 2, eps=LAYER_NORM_EPS),
                         nn.Linear(hidden * 2, out))


def _side_input(batch: PackedVLBatch | Mapping | None, key: str):
    """The side input ``key`` of a batch: the field ``key`` of a PackedVLBatch, ``batch[key]`` of an official dict;
    None when absent (or no batch)."""
    if batch is None:
        return None
    return getattr(batch, key) if isinstance(batch, PackedVLBatch) else batch.get(key)


def select_examples(batch: PackedVLBatch, indices: list[int]) -> PackedVLBatch:
    """A packed batch of the examples ``indices`` (in that order) of ``batch``: model inputs only, no targets.

    Args:
        batch: the packed batch. indices: Python ints in ``[0, batch.batch_size)``.
    """
    b = batch.batch_size
    for i in indices:
        if not 0 <= i < b:
            raise ValueError(f"select_examples: index {i} out of range for a batch of {b} examples")
    ct, ci = [0], [0]
    for t, n in zip(batch.txt_lens, batch.img_lens):
        ct.append(ct[-1] + t)
        ci.append(ci[-1] + n)
    dev = batch.input_ids.device

    def rows(cu: list[int]) -> torch.Tensor:
        parts = [torch.arange(cu[i], cu[i + 1]) for i in indices]
        return (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)).to(dev)

    rt, ri = rows(ct), rows(ci)
    pick = lambda t, r: None if t is None else t[r]  # noqa: E731
    return PackedVLBatch(input_ids=batch.input_ids[rt], txt_lens=[batch.txt_lens[i] for i in indices],
                         img_feat=batch.img_feat[ri], img_pos=batch.img_pos[ri],
                         img_lens=[batch.img_lens[i] for i in indices], position_ids=pick(batch.position_ids, rt),
                         txt_type_ids=pick(batch.txt_type_ids, rt), img_type_ids=pick(batch.img_type_ids, ri))


class UniterFinetuneBase(UniterPreTrainedModel):
    """Shared plumbing: ``forward`` dispatch, packed encoding of official dicts and packed batches, target lookup.

    Subclasses set ``task`` and implement :meth:`head` (same keyword-only signature) on the packed encoder output
    ``h`` [T, H].
    """

    task = ""
    type_inputs: tuple[str, ...] = ()  # official keys passed to the encoder: 'txt_type_ids' / 'img_type_ids'

    def __init__(self, config: UniterConfig, img_dim: int | None = None):
        super().__init__(config)
        self.uniter = UniterModel(config, img_dim)

    # ------------------------------------------------------------------------------------------ dispatch
    def forward(self, batch: Mapping | PackedVLBatch, compute_loss: bool = True, **kwargs):
        """Official batch dict (module doc) -> official outputs; a PackedVLBatch -> :meth:`forward_packed`."""
        if isinstance(batch, PackedVLBatch):
            return self.forward_packed(batch, compute_loss, **kwargs)
        if not isinstance(batch, Mapping):
            raise TypeError(f"{type(self).__name__}: argument 'batch' must be a dict or PackedVLBatch, got "
                            f"{type(batch).__name__}")
        return self.forward_official(batch, compute_loss, **kwargs)

    def forward_official(self, batch: Mapping, compute_loss: bool = True, reduction: str = "none"):
        """The official forward on an official batch dict."""
        h, layout = self.encode_official(batch)
        targets = self._official_targets(batch) if compute_loss else None
        return self.head(h, layout, targets=targets, compute_loss=compute_loss, reduction=reduction, batch=batch)

    def forward_packed(self, batch: PackedVLBatch, compute_loss: bool = True, reduction: str = "none",
                       layout: PackedLayout | None = None, txt_delta: torch.Tensor | None = None,
                       img_delta: torch.Tensor | None = None, check_finite: bool | None = None):
        """The native API: a PackedVLBatch (targets in ``batch.targets``) -> as :meth:`forward_official`.

        Args:
            batch: packed batch; ``img_masks`` is ignored (fine-tuning never masks regions).
            compute_loss, reduction: as the official forward; ``reduction='mean'`` gives the training reduction.
            layout: precomputed ``batch.packed_layout()``.
            txt_delta [T_txt, H], img_delta [T_img, img_dim]: VILLA perturbations (see UniterModel.forward_packed).
            check_finite: check features / deltas for NaN or inf (reads the device).
        """
        self._check_reduction(reduction)
        if batch.img_masks is not None:
            batch = replace(batch, img_masks=None)
        layout = layout if layout is not None else self.uniter.layout(batch)
        h = self.uniter.forward_packed(batch, layout=layout, txt_delta=txt_delta, img_delta=img_delta,
                                       check_finite=check_finite)
        targets = self.packed_targets(batch) if compute_loss else None
        return self.head(h, layout, targets=targets, compute_loss=compute_loss, reduction=reduction, batch=batch)

    def packed_targets(self, batch: PackedVLBatch) -> torch.Tensor | int:
        """The loss targets a PackedVLBatch carries for this head (``batch.targets``; retrieval: ``sample_size``)."""
        if batch.targets is None:
            raise ValueError(f"{type(self).__name__}: PackedVLBatch.targets is required with compute_loss=True "
                             f"({self._targets_doc()})")
        return batch.targets

    # ------------------------------------------------------------------------------------------ head
    def head(self, h: torch.Tensor, layout: PackedLayout, *, targets: torch.Tensor | int | None = None,
             compute_loss: bool = False, reduction: str = "mean", batch: PackedVLBatch | Mapping | None = None):
        """The task head on the packed encoder output: what :meth:`forward` returns, from ``h``.

        Args:
            h: [T, H] packed last-layer encoder output (``self.uniter.forward_packed(batch, layout=layout, ...)``
                or :meth:`encode_official`), row ``layout.cu_seqlens[i] + j`` = token j of example i.
            layout: the :class:`~fastvl.models.uniter.layout.PackedLayout` of ``h`` (``self.uniter.layout(batch)``).
            targets: required with ``compute_loss``; per class (VQA / VE [B, A] float soft scores; VCR, RE [B] or
                [B, 1] long; NLVR2 [n_pairs] long; retrieval: ``sample_size``, a Python int).
            compute_loss: False: the predictions (VQA / VE logits [B, A]; VCR scores [B, 1]; RE region scores
                [B, max_nbb]; NLVR2 logits [n_pairs, 2]; retrieval scores [B, 1]). True: the loss.
            reduction: with ``compute_loss``: ``'mean'`` (the training reduction, a scalar) or ``'none'`` (the
                official per-element losses, shapes in the class docstrings).
            batch: the batch ``h`` was encoded from (a PackedVLBatch, whose side fields are read, or the official
                dict), for heads with side inputs (RE: ``obj_masks`` [B, max_nbb] bool); None: no side inputs.
        """
        raise NotImplementedError

    def check_head_args(self, targets, compute_loss: bool, reduction: str) -> None:
        """Raise a ValueError unless ``reduction`` is one of ``('none', 'mean')`` and, with ``compute_loss``,
        ``targets`` is given (called first by every :meth:`head`)."""
        self._check_reduction(reduction)
        if compute_loss and targets is None:
            raise ValueError(f"{type(self).__name__}.head: 'targets' is required with compute_loss=True "
                             f"({self._targets_doc()})")

    # ------------------------------------------------------------------------------------------ helpers
    def _check_reduction(self, reduction: str) -> None:
        if reduction not in REDUCTIONS:
            raise ValueError(f"{type(self).__name__}: argument 'reduction' must be one of {REDUCTIONS}, got "
                             f"{reduction!r}")

    def _targets_doc(self) -> str:
        return "see the module docstring"

    def _official_targets(self, batch: Mapping) -> torch.Tensor:
        if batch.get("targets") is None:
            raise KeyError(f"{type(self).__name__}: batch is missing key 'targets' ({self._targets_doc()}), "
                           f"required with compute_loss=True")
        return batch["targets"]

    def encode_official(self, batch: Mapping) -> tuple[torch.Tensor, PackedLayout]:
        """Official dict -> (last-layer packed output [T, H], layout); reads the lengths from the device once."""
        for key in _COMMON:
            if key not in batch:
                raise KeyError(f"{type(self).__name__}: batch is missing key '{key}'")
        types = {k: batch.get(k) for k in self.type_inputs}
        outs, layout, _ = self.uniter.forward_official_packed(*(batch[k] for k in _COMMON),
                                                              output_all_encoded_layers=False, **types)
        return outs[-1], layout

    def pooled(self, h: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        """[T, H] packed output -> pooled [B, H]."""
        return self.uniter.pool_packed(h, layout)


# ----------------------------------------------------------------------------------------------------------
# VQA / GQA / SNLI-VE
# ----------------------------------------------------------------------------------------------------------


class UniterForVisualQuestionAnswering(UniterFinetuneBase):
    """VQA head on the pooled output: Linear(H, 2H) -> GELU -> LayerNorm -> Linear(2H, num_answer) (``vqa_output``).

    ``compute_loss``: BCE-with-logits against soft scores ``targets`` [B, num_answer] in [0, 1] -> [B, num_answer]
    (``reduction='none'``, official) or the per-instance sum averaged over the batch (``'mean'``; the official
    training loss ``loss.mean() * num_answer``); else the answer logits [B, num_answer].
    """

    task = "vqa"

    def __init__(self, config: UniterConfig, img_dim: int | None = None, num_answer: int = 3129):
        super().__init__(config, img_dim)
        if isinstance(num_answer, bool) or not isinstance(num_answer, int) or num_answer < 1:
            raise ValueError(f"{type(self).__name__}: 'num_answer' must be a positive int, got {num_answer!r}")
        self.num_answer = num_answer
        self.vqa_output = _two_layer_head(config.hidden_size, num_answer, nn.GELU())
        self.apply(self.init_weights)

    def _targets_doc(self) -> str:
        return f"[B, {self.num_answer}] float soft scores in [0, 1]"

    def head(self, h: torch.Tensor, layout: PackedLayout, *, targets: torch.Tensor | int | None = None,
             compute_loss: bool = False, reduction: str = "mean", batch: PackedVLBatch | Mapping | None = None):
        """Logits [B, A]; with ``compute_loss`` the fused BCE against ``targets`` [B, A]: [B, A] (``'none'``) or
        the per-instance sum averaged over the batch (``'mean'``, a scalar). See :meth:`UniterFinetuneBase.head`."""
        self.check_head_args(targets, compute_loss, reduction)
        pooled = self.pooled(h, layout)
        if not compute_loss:
            return self.vqa_output(pooled)
        b = layout.batch_size
        if targets.dim() != 2 or tuple(targets.shape) != (b, self.num_answer) or not targets.is_floating_point():
            raise ValueError(f"{type(self).__name__}: 'targets' must be float soft scores of shape "
                             f"[{b}, {self.num_answer}] (batch, num_answer), got {targets.dtype} "
                             f"{list(targets.shape)}")
        hidden = self.vqa_output[2](self.vqa_output[1](self.vqa_output[0](pooled)))
        last = self.vqa_output[3]
        red = "batchmean" if reduction == "mean" else "none"
        return fused_bce_soft(hidden, last.weight, last.bias, targets, red).to(pooled.dtype)


class UniterForVisualEntailment(UniterForVisualQuestionAnswering):
    """SNLI-VE: the VQA head with 3 outputs (entailment / neutral / contradiction soft targets [B, 3])."""

    task = "ve"

    def __init__(self, config: UniterConfig, img_dim: int | None = None):
        super().__init__(config, img_dim, 3)


# ----------------------------------------------------------------------------------------------------------
# VCR
# ----------------------------------------------------------------------------------------------------------


class UniterForVisualCommonsenseReasoning(UniterFinetuneBase):
    """VCR: one row per (question, choice); head Linear(H, 2H) -> ReLU -> LayerNorm -> Linear(2H, 2) (``vcr_output``).

    Call :meth:`init_type_embedding` (4 type rows) and :meth:`init_word_embedding` (extra tokens) after loading a
    pre-trained checkpoint, as the official training script does. ``compute_loss``: cross-entropy of the 2-way
    scores against ``targets`` [B] or [B, 1] (1 = correct choice), MEAN over rows (official); ``reduction='none'``
    on the packed API gives the per-row values. Else the "correct" scores [B, 1] (``scores[:, 1:]``).
    """

    task = "vcr"
    type_inputs = ("txt_type_ids",)

    def __init__(self, config: UniterConfig, img_dim: int | None = None):
        super().__init__(config, img_dim)
        self.vcr_output = _two_layer_head(config.hidden_size, 2, nn.ReLU())
        self.apply(self.init_weights)

    def init_type_embedding(self) -> None:
        """Type table of 4 rows: 0, 1 kept; 2 and 3 (answer, rationale) copied from the text row 0."""
        self.uniter.init_type_embedding("vcr")
        self.config = self.uniter.config

    def init_word_embedding(self, num_special_tokens: int) -> None:
        """Append ``num_special_tokens`` word rows (normal init), as the official VCR model (81 tokens)."""
        self.uniter.grow_word_embeddings(num_special_tokens)
        self.config = self.uniter.config

    def _targets_doc(self) -> str:
        return "[B] or [B, 1] long, 1 = correct choice"

    def forward_official(self, batch: Mapping, compute_loss: bool = True, reduction: str = "mean"):
        return super().forward_official(batch, compute_loss, reduction)

    def head(self, h: torch.Tensor, layout: PackedLayout, *, targets: torch.Tensor | int | None = None,
             compute_loss: bool = False, reduction: str = "mean", batch: PackedVLBatch | Mapping | None = None):
        """The "correct" scores [B, 1]; with ``compute_loss`` the 2-way cross-entropy against ``targets`` [B] or
        [B, 1]: [B] (``'none'``) or its mean. See :meth:`UniterFinetuneBase.head`."""
        self.check_head_args(targets, compute_loss, reduction)
        scores = self.vcr_output(self.pooled(h, layout))
        if not compute_loss:
            return scores[:, 1:]
        t = targets.reshape(-1) if targets.dim() == 2 and targets.shape[1] == 1 else targets
        if t.dim() != 1 or t.shape[0] != layout.batch_size:
            raise ValueError(f"{type(self).__name__}: 'targets' must have shape [{layout.batch_size}] or "
                             f"[{layout.batch_size}, 1], got {list(targets.shape)}")
        return F.cross_entropy(scores, t, reduction="mean" if reduction == "mean" else "none")


# ----------------------------------------------------------------------------------------------------------
# Referring expressions
# ----------------------------------------------------------------------------------------------------------


class UniterForReferringExpressionComprehension(UniterFinetuneBase):
    """Referring expressions: one score per region from its encoder state (``re_output``), pads -1e4.

    ``mlp=1``: Linear(H, 1); ``mlp=2``: Linear(H, H) -> GELU -> LayerNorm -> Linear(H, 1). ``loss='cls'``:
    cross-entropy over regions [B]; ``loss='rank'``: hinge ``max(0, margin + sigmoid(s_neg) - sigmoid(s_pos))`` [B]
    against one negative region per example, the highest-scoring other region with probability ``hard_ratio``,
    else a uniformly drawn other region (torch's global RNG). Without ``compute_loss``: scores [B, max_nbb].
    """

    task = "re"

    def __init__(self, config: UniterConfig, img_dim: int | None = None, loss: str = "cls", margin: float = 0.2,
                 hard_ratio: float = 0.3, mlp: int = 1):
        super().__init__(config, img_dim)
        hsz = config.hidden_size
        if mlp == 1:
            self.re_output = nn.Linear(hsz, 1)
        elif mlp == 2:
            self.re_output = nn.Sequential(nn.Linear(hsz, hsz), nn.GELU(), nn.LayerNorm(hsz, eps=LAYER_NORM_EPS),
                                           nn.Linear(hsz, 1))
        else:
            raise ValueError(f"{type(self).__name__}: 'mlp' must be 1 or 2 (layers of the region head), got {mlp!r}")
        if loss not in ("cls", "rank"):
            raise ValueError(f"{type(self).__name__}: 'loss' must be 'cls' or 'rank', got {loss!r}")
        if not 0.0 <= hard_ratio <= 1.0:
            raise ValueError(f"{type(self).__name__}: 'hard_ratio' must be in [0, 1], got {hard_ratio!r}")
        self.loss = loss
        self.margin = float(margin)
        self.hard_ratio = float(hard_ratio)
        self.apply(self.init_weights)

    def _targets_doc(self) -> str:
        return "[B] or [B, 1] long, index of the referred region"

    def region_scores(self, h: torch.Tensor, layout: PackedLayout, obj_masks: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """Packed output [T, H] -> scores [B, max_nbb] (-1e4 at padding and where ``obj_masks`` [B, max_nbb] is
        True)."""
        s = self.re_output(h[layout.img_rows]).squeeze(-1)  # [T_img]
        scores, _ = unpack(s, layout.cu_img, layout.max_img, fill=NEG_FILL)
        if obj_masks is not None:
            if tuple(obj_masks.shape) != tuple(scores.shape):
                raise ValueError(f"{type(self).__name__}: 'obj_masks' must have shape {list(scores.shape)} "
                                 f"(batch, max regions), got {list(obj_masks.shape)}")
            scores = scores.masked_fill(obj_masks.bool(), NEG_FILL)
        return scores

    def forward_official(self, batch: Mapping, compute_loss: bool = True, reduction: str = "none"):
        h, layout = self.encode_official(batch)
        for key, lens in (("txt_lens", layout.txt_lens), ("num_bbs", layout.img_lens)):
            given = batch.get(key)
            if given is not None and [int(x) for x in given] != lens:
                raise ValueError(f"{type(self).__name__}: batch['{key}'] = {list(given)} disagrees with the lengths "
                                 f"given by 'attn_masks' / 'gather_index' ({lens})")
        targets = self._official_targets(batch) if compute_loss else None
        return self.head(h, layout, targets=targets, compute_loss=compute_loss, reduction=reduction, batch=batch)

    def head(self, h: torch.Tensor, layout: PackedLayout, *, targets: torch.Tensor | int | None = None,
             compute_loss: bool = False, reduction: str = "mean", batch: PackedVLBatch | Mapping | None = None):
        """Region scores [B, max_nbb] (``obj_masks`` of ``batch`` applied); with ``compute_loss`` the 'cls' / 'rank'
        loss against ``targets`` [B] or [B, 1]: [B] (``'none'``) or its mean. See :meth:`UniterFinetuneBase.head`."""
        self.check_head_args(targets, compute_loss, reduction)
        scores = self.region_scores(h, layout, _side_input(batch, "obj_masks"))
        if not compute_loss:
            return scores
        b = layout.batch_size
        t = targets.reshape(-1) if targets.dim() == 2 and targets.shape[1] == 1 else targets
        if t.dim() != 1 or t.shape[0] != b:
            raise ValueError(f"{type(self).__name__}: 'targets' must have shape [{b}] or [{b}, 1], got "
                             f"{list(targets.shape)}")
        if self.loss == "cls":
            loss = F.cross_entropy(scores, t, reduction="none")
        else:
            loss = self._rank_loss(scores, t, layout.img_lens)
        return loss.mean() if reduction == "mean" else loss

    def _rank_loss(self, scores: torch.Tensor, targets: torch.Tensor, num_bbs: list[int]) -> torch.Tensor:
        if min(num_bbs, default=2) < 2:
            raise ValueError(f"{type(self).__name__}(loss='rank'): every example needs >= 2 regions to draw a "
                             f"negative, got num_bbs={num_bbs}")
        neg = self.sample_neg_ix(scores, targets, num_bbs)
        pos_sc = torch.sigmoid(scores.gather(1, targets[:, None])).squeeze(1)
        neg_sc = torch.sigmoid(scores.gather(1, neg[:, None])).squeeze(1)
        return torch.clamp(self.margin + neg_sc - pos_sc, min=0)

    def sample_neg_ix(self, scores: torch.Tensor, targets: torch.Tensor, num_bbs: list[int]) -> torch.Tensor:
        """One negative region per example [B] long (!= target, < num_bbs): hard with prob ``hard_ratio``."""
        nbb = torch.tensor(num_bbs, device=scores.device)
        others = scores.detach().scatter(1, targets[:, None], float("-inf"))
        others = others.masked_fill(torch.arange(scores.shape[1], device=scores.device)[None] >= nbb[:, None],
                                    float("-inf"))
        hard = others.argmax(1)
        r = (torch.rand(len(num_bbs), device=scores.device) * (nbb - 1)).long().clamp(max=nbb - 2)
        easy = r + (r >= targets).long()
        pick_hard = torch.rand(len(num_bbs), device=scores.device) < self.hard_ratio
        return torch.where(pick_hard, hard, easy)


# ----------------------------------------------------------------------------------------------------------
# Image-text retrieval
# ----------------------------------------------------------------------------------------------------------


class UniterForImageTextRetrieval(UniterFinetuneBase):
    """Retrieval: ``rank_output`` Linear(H, 1) on the pooled output (``itm_output`` kept for checkpoint loading).

    Call :meth:`init_output` after loading a pre-trained checkpoint (rank head <- ITM "match" row 1).
    ``compute_loss``: the batch is groups of ``sample_size`` consecutive pairs, positive first; returns the hinge
    ``max(0, margin + sigmoid(s_neg) - sigmoid(s_pos))`` [n_groups, sample_size - 1]. Else scores [B, 1].
    """

    task = "itr"

    def __init__(self, config: UniterConfig, img_dim: int | None = None, margin: float = 0.2):
        super().__init__(config, img_dim)
        self.itm_output = nn.Linear(config.hidden_size, 2)
        self.rank_output = nn.Linear(config.hidden_size, 1)
        self.margin = float(margin)
        self.apply(self.init_weights)

    def init_output(self) -> None:
        """rank_output <- itm_output row 1 (call after loading pre-trained weights)."""
        with torch.no_grad():
            self.rank_output.weight.copy_(self.itm_output.weight[1:])
            self.rank_output.bias.copy_(self.itm_output.bias[1:])

    def _official_targets(self, batch: Mapping):
        if batch.get("sample_size") is None:
            raise KeyError(f"{type(self).__name__}: batch is missing key 'sample_size' (pairs per group, positive "
                           f"first), required with compute_loss=True")
        return int(batch["sample_size"])

    def packed_targets(self, batch: PackedVLBatch) -> int:
        """The group size ``batch.sample_size`` (pairs per group, positive first): this head's loss target."""
        if batch.sample_size is None:
            raise ValueError(f"{type(self).__name__}: PackedVLBatch.sample_size (pairs per group, positive first) is "
                             "required with compute_loss=True")
        return int(batch.sample_size)

    def head(self, h: torch.Tensor, layout: PackedLayout, *, targets: torch.Tensor | int | None = None,
             compute_loss: bool = False, reduction: str = "mean", batch: PackedVLBatch | Mapping | None = None):
        """Scores [B, 1]; with ``compute_loss`` the hinge of groups of ``targets`` = sample_size (int) consecutive
        pairs, positive first: [n_groups, sample_size - 1] (``'none'``) or its mean. See
        :meth:`UniterFinetuneBase.head`."""
        self.check_head_args(targets, compute_loss, reduction)
        sample_size = targets
        scores = self.rank_output(self.pooled(h, layout))
        if not compute_loss:
            return scores
        b = layout.batch_size
        if sample_size < 2 or b % sample_size:
            raise ValueError(f"{type(self).__name__}: 'sample_size' ({sample_size}) must be >= 2 and divide the "
                             f"batch size ({b})")
        loss = rank_hinge(scores, sample_size, self.margin)
        return loss.mean() if reduction == "mean" else loss


def rank_hinge(scores: torch.Tensor, sample_size: int, margin: float) -> torch.Tensor:
    """scores [n_groups * sample_size, 1] (positive first in each group) -> hinge [n_groups, sample_size - 1]."""
    s = torch.sigmoid(scores).reshape(-1, sample_size)
    return torch.clamp(margin + s[:, 1:] - s[:, :1], min=0)


class UniterForImageTextRetrievalHardNeg(UniterForImageTextRetrieval):
    """Retrieval with hard negatives: in training with ``compute_loss``, one group (positive first, then many
    negatives sharing the positive's text (``sample_from='t'``) or image (``'i'``)) is scored without gradient in
    eval mode, the ``hard_size`` highest-scoring negatives are kept and the positive + those are re-run in train
    mode for the hinge loss [1, hard_size]. Otherwise as :class:`UniterForImageTextRetrieval`. As the official, the
    hard batch is built under ``torch.no_grad``: the loss sends no gradient to the input tensors (image features,
    boxes), only to the parameters.
    """

    def __init__(self, config: UniterConfig, img_dim: int | None = None, margin: float = 0.2, hard_size: int = 16):
        super().__init__(config, img_dim, margin)
        if hard_size < 1:
            raise ValueError(f"{type(self).__name__}: 'hard_size' must be >= 1, got {hard_size!r}")
        self.hard_size = int(hard_size)

    def forward(self, batch: Mapping | PackedVLBatch, sample_from: str = "t", compute_loss: bool = True, **kwargs):
        """Official signature ``forward(batch, sample_from='t', compute_loss=True)``."""
        if sample_from not in ("t", "i"):
            raise ValueError(f"{type(self).__name__}: 'sample_from' must be 't' (shared text) or 'i' (shared image), "
                             f"got {sample_from!r}")
        if isinstance(batch, Mapping):
            batch = self._expand_shared(dict(batch), sample_from)
        if not (self.training and compute_loss):
            return super().forward(batch, compute_loss, **kwargs)
        n = batch.batch_size if isinstance(batch, PackedVLBatch) else batch["attn_masks"].shape[0]
        if n < self.hard_size + 1:
            raise ValueError(f"{type(self).__name__}: the group has {n} pairs but hard_size={self.hard_size} needs "
                             f">= {self.hard_size + 1} (1 positive first, then negatives)")
        with torch.no_grad():  # scoring AND building the hard batch, as the official: no gradient reaches the inputs
            self.eval()
            try:
                scores = super().forward(batch, compute_loss=False)
            finally:
                self.train()
            keep = scores.squeeze(-1)[1:].topk(self.hard_size, sorted=False).indices + 1
            if isinstance(batch, PackedVLBatch):
                hard = select_examples(batch, [0, *keep.tolist()])
                hard.sample_size = self.hard_size + 1
            else:
                hard = self._hard_dict(batch, keep, sample_from)
        return super().forward(hard, True, **kwargs)

    @staticmethod
    def _expand_shared(batch: dict, sample_from: str) -> dict:
        b = batch["attn_masks"].shape[0]
        if sample_from == "t" and batch["input_ids"].shape[0] == 1:
            batch["input_ids"] = batch["input_ids"].expand(b, -1)
        if sample_from == "i":
            for key in ("img_feat", "img_pos_feat"):
                if batch[key].shape[0] == 1:
                    batch[key] = batch[key].expand(b, *batch[key].shape[1:])
        return batch

    def _hard_dict(self, batch: dict, keep: torch.Tensor, sample_from: str) -> dict:
        idx = torch.cat([keep.new_zeros(1), keep])
        out = {k: batch[k].index_select(0, idx) for k in ("attn_masks", "gather_index")}
        shared = ("input_ids",) if sample_from == "t" else ("img_feat", "img_pos_feat")
        for key in ("input_ids", "img_feat", "img_pos_feat"):
            out[key] = batch[key][:idx.numel()] if key in shared else batch[key].index_select(0, idx)
        pos = batch["position_ids"]
        out["position_ids"] = pos if pos.shape[0] == 1 else pos.index_select(0, idx)
        out["sample_size"] = self.hard_size + 1
        return out
