"""UNITER for NLVR2 (one statement, two images), drop-in for the official Paired, Triplet and PairedAttn classes.

Batches (official dicts or PackedVLBatch, see :mod:`fastvl.models.uniter.finetune`):

- Paired / PairedAttn: 2 sequences per example, consecutive: ``[txt | left image]`` (image type 1) then
  ``[txt | right image]`` (image type 2), so B = 2 x n_pairs; ``targets`` [n_pairs] long.
- Triplet: one sequence ``[txt | left regions | right regions]`` per example (image types 1 and 2); ``targets`` [B].

The type table must have 3 rows: call :meth:`init_type_embedding` after loading a pre-trained checkpoint (row 2
copied from the image row 1). PairedAttn's pair cross-attention runs packed through
:func:`fastvl.ops.cross_modal_attention` with ``mask='cross'`` (each left sequence's rows attend to its right
sequence's rows and vice versa; no padding involved), with the parameters of ``nn.MultiheadAttention``
(``in_proj_weight``, ``in_proj_bias``, ``out_proj``) so official checkpoints load.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from ...batch import PackedVLBatch
from ...ops import cross_modal_attention
from ...ops.pack import unpack
from .config import UniterConfig
from .finetune import UniterFinetuneBase
from .layout import PackedLayout

__all__ = ["AttentionPool", "UniterForNlvr2Paired", "UniterForNlvr2PairedAttn", "UniterForNlvr2Triplet"]


class _Nlvr2Base(UniterFinetuneBase):
    task = "nlvr2"
    type_inputs = ("img_type_ids",)
    paired = True

    def init_type_embedding(self) -> None:
        """Type table of 3 rows (row 2, the second image, copied from the image row 1), as the official model."""
        self.uniter.init_type_embedding("nlvr2")
        self.config = self.uniter.config

    def _targets_doc(self) -> str:
        return "[n_pairs] long, 1 = the statement is true"

    def _n_examples(self, layout: PackedLayout) -> int:
        b = layout.batch_size
        if self.paired:
            if b % 2:
                raise ValueError(f"{type(self).__name__}: a paired batch needs 2 sequences per example (left image, "
                                 f"right image), got an odd number of sequences ({b})")
            missing = [i // 2 for i, n in enumerate(layout.img_lens) if n == 0]
            if missing:
                raise ValueError(f"{type(self).__name__}: example(s) {sorted(set(missing))} have an image with 0 "
                                 f"regions; every NLVR2 example needs both images")
            return b // 2
        return b

    def _loss(self, scores: torch.Tensor, targets: torch.Tensor | None, compute_loss: bool, reduction: str):
        if not compute_loss:
            return scores
        n = scores.shape[0]
        if targets.dim() != 1 or targets.shape[0] != n:
            raise ValueError(f"{type(self).__name__}: 'targets' must have shape [{n}] (one label per statement), got "
                             f"{list(targets.shape)}")
        return F.cross_entropy(scores, targets, reduction="mean" if reduction == "mean" else "none")


class UniterForNlvr2Paired(_Nlvr2Base):
    """Paired: pooled outputs of the two sequences concatenated -> Linear(2H, 2) (``nlvr2_output``)."""

    def __init__(self, config: UniterConfig, img_dim: int | None = None):
        super().__init__(config, img_dim)
        self.nlvr2_output = nn.Linear(config.hidden_size * 2, 2)
        self.apply(self.init_weights)

    def head(self, h: torch.Tensor, layout: PackedLayout, *, targets: torch.Tensor | None = None,
             compute_loss: bool = False, reduction: str = "mean", batch: PackedVLBatch | Mapping | None = None):
        """Logits [n_pairs, 2]; with ``compute_loss`` the cross-entropy against ``targets`` [n_pairs]: [n_pairs]
        (``'none'``) or its mean. See :meth:`UniterFinetuneBase.head`."""
        self.check_head_args(targets, compute_loss, reduction)
        n = self._n_examples(layout)
        scores = self.nlvr2_output(self.pooled(h, layout).reshape(n, -1))
        return self._loss(scores, targets, compute_loss, reduction)


class UniterForNlvr2Triplet(_Nlvr2Base):
    """Triplet: one ``[txt | img1 | img2]`` sequence per example; pooled -> Linear(H, 2) (``nlvr2_output``)."""

    paired = False

    def __init__(self, config: UniterConfig, img_dim: int | None = None):
        super().__init__(config, img_dim)
        self.nlvr2_output = nn.Linear(config.hidden_size, 2)
        self.apply(self.init_weights)

    def head(self, h: torch.Tensor, layout: PackedLayout, *, targets: torch.Tensor | None = None,
             compute_loss: bool = False, reduction: str = "mean", batch: PackedVLBatch | Mapping | None = None):
        """Logits [n_pairs, 2]; with ``compute_loss`` the cross-entropy against ``targets`` [n_pairs]: [n_pairs]
        (``'none'``) or its mean. See :meth:`UniterFinetuneBase.head`."""
        self.check_head_args(targets, compute_loss, reduction)
        scores = self.nlvr2_output(self.pooled(h, layout))
        return self._loss(scores, targets, compute_loss, reduction)


class AttentionPool(nn.Module):
    """Attention pooling: weights softmax(ReLU(Linear(H, 1)(x))) over each sequence's rows (``fc.0``), dropout on the
    weights, weighted sum of the rows."""

    def __init__(self, hidden_size: int, drop: float = 0.0):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(hidden_size, 1), nn.ReLU())
        self.dropout = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """x: packed [T, H] rows of B sequences delimited by cu_seqlens [B+1] -> [B, H]."""
        score, pad = unpack(self.fc(x), cu_seqlens, max_seqlen, fill=float("-inf"))  # [B, L, 1]
        weights = self.dropout(torch.softmax(score.squeeze(-1), dim=1))  # [B, L]
        rows, _ = unpack(x, cu_seqlens, max_seqlen)
        return torch.bmm(weights.unsqueeze(1).to(rows.dtype), rows).squeeze(1)


class UniterForNlvr2PairedAttn(_Nlvr2Base):
    """PairedAttn: left <-> right multi-head cross-attention (``attn1`` left queries, ``attn2`` right queries),
    shared ``fc`` Linear(2H, H) -> ReLU -> Dropout on [attended | own], attention pooling (``attn_pool``) of each
    side, Linear(2H, 2) (``nlvr2_output``) on [left | right]."""

    def __init__(self, config: UniterConfig, img_dim: int | None = None):
        super().__init__(config, img_dim)
        hsz, heads = config.hidden_size, config.num_attention_heads
        self.attn1 = nn.MultiheadAttention(hsz, heads, dropout=config.attention_probs_dropout_prob)
        self.attn2 = nn.MultiheadAttention(hsz, heads, dropout=config.attention_probs_dropout_prob)
        self.fc = nn.Sequential(nn.Linear(2 * hsz, hsz), nn.ReLU(), nn.Dropout(config.hidden_dropout_prob))
        self.attn_pool = AttentionPool(hsz, config.attention_probs_dropout_prob)
        self.nlvr2_output = nn.Linear(2 * hsz, 2)
        self.apply(self.init_weights)

    @staticmethod
    def _side_rows(layout: PackedLayout, side: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Packed rows of the left (side 0) or right (1) sequences, their cu_seqlens and max length."""
        lens = layout.seq_lens[side::2]
        starts = layout.cu_seqlens[side:-1:2].long()
        ln = torch.tensor(lens, device=starts.device)
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32, device=starts.device)
        cu[1:] = ln.cumsum(0)
        seg = torch.repeat_interleave(torch.arange(len(lens), device=starts.device), ln, output_size=sum(lens))
        rows = starts[seg] + torch.arange(sum(lens), device=starts.device) - cu.long()[seg]
        return rows, cu, max(lens, default=0)

    def _cross(self, mha: nn.MultiheadAttention, q_in: torch.Tensor, kv_in: torch.Tensor, cu_q: torch.Tensor,
               cu_k: torch.Tensor, max_q: int, max_k: int) -> torch.Tensor:
        """nn.MultiheadAttention(q_in, kv_in, kv_in) on packed rows: [Tq, H], [Tk, H] -> [Tq, H]."""
        hsz, heads = q_in.shape[-1], mha.num_heads
        wq, wk, wv = mha.in_proj_weight.chunk(3)
        bq, bk, bv = mha.in_proj_bias.chunk(3)
        q = F.linear(q_in, wq, bq).view(-1, heads, hsz // heads)
        k = F.linear(kv_in, wk, bk).view(-1, heads, hsz // heads)
        v = F.linear(kv_in, wv, bv).view(-1, heads, hsz // heads)
        p = mha.dropout if self.training else 0.0
        out = cross_modal_attention(q, k, v, cu_q, cu_k, max_q, max_k, mask="cross", dropout_p=p)
        return mha.out_proj(out.reshape(-1, hsz))

    def head(self, h: torch.Tensor, layout: PackedLayout, *, targets: torch.Tensor | None = None,
             compute_loss: bool = False, reduction: str = "mean", batch: PackedVLBatch | Mapping | None = None):
        """Logits [n_pairs, 2]; with ``compute_loss`` the cross-entropy against ``targets`` [n_pairs]: [n_pairs]
        (``'none'``) or its mean. See :meth:`UniterFinetuneBase.head`."""
        self.check_head_args(targets, compute_loss, reduction)
        self._n_examples(layout)
        rows_l, cu_l, max_l = self._side_rows(layout, 0)
        rows_r, cu_r, max_r = self._side_rows(layout, 1)
        left, right = h[rows_l], h[rows_r]
        l2r = self._cross(self.attn1, left, right, cu_l, cu_r, max_l, max_r)
        r2l = self._cross(self.attn2, right, left, cu_r, cu_l, max_r, max_l)
        left = self.fc(torch.cat([l2r, left], dim=-1))
        right = self.fc(torch.cat([r2l, right], dim=-1))
        pooled = torch.cat([self.attn_pool(left, cu_l, max_l), self.attn_pool(right, cu_r, max_r)], dim=-1)
        return self._loss(self.nlvr2_output(pooled), targets, compute_loss, reduction)
