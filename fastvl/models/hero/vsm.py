"""HERO's Video-Subtitle Matching (VSM): the local span heads (start / end over frames) and the global
query-video ranking, as the official ``model/pretrain.py`` computes them, plus the cross-rank gather of the
in-batch negatives.

``VsmMethods`` is mixed into ``HeroForPretraining`` (and so ``HeroForVcmr``); its methods carry the official
names (``get_pred_from_mod_query``, ``get_video_level_scores``, ``get_video_level_loss``, ...). The fast path in
``forward_vsm`` computes the start / end logits of the (query, own video) pairs only when a loss is asked for
(the official code computes every query against every video and then picks the own video's row).
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch.nn import functional as F

from .pretrain import require_key

__all__ = ["VsmMethods", "gather_across_ranks", "mask_logits"]


def mask_logits(target: torch.Tensor, mask: torch.Tensor, eps: float = -1e4) -> torch.Tensor:
    """The official masking: ``target * mask + (1 - mask) * eps`` (mask 1 = keep, 0 = replace by eps)."""
    return target * mask + (1 - mask) * eps


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 (ranks may hold different row counts); backward returns this rank's slice of the
    gradient, as the official ``VsmAllgather`` does (every rank computes the same loss over the gathered rows)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        import torch.distributed as dist

        world = dist.get_world_size()
        n = torch.tensor([tensor.shape[0]], device=tensor.device)
        sizes = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(sizes, n)
        counts = [int(s) for s in torch.cat(sizes).tolist()]
        top = max(counts)
        padded = tensor.new_zeros((top, *tensor.shape[1:]))
        padded[:tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        rank = dist.get_rank()
        ctx.offset, ctx.n = sum(counts[:rank]), tensor.shape[0]
        return torch.cat([p[:c] for p, c in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad.narrow(0, ctx.offset, ctx.n)


def gather_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` [n_rank, ...] of every rank along dim 0 (rank order), differentiably; the identity
    when torch.distributed is not initialised or has one process. Trailing dims must agree across ranks."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    return _GatherRows.apply(tensor)


def _gather_padded_frames(ctx: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad frames to the longest video of all ranks (the official pad), then gather videos and masks."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ctx, mask
    length = torch.tensor([ctx.shape[1]], device=ctx.device)
    lens = [torch.zeros_like(length) for _ in range(dist.get_world_size())]
    dist.all_gather(lens, length)
    pad_len = int(torch.cat(lens).max()) - ctx.shape[1]
    if pad_len:
        ctx = torch.cat([ctx, ctx.new_zeros(ctx.shape[0], pad_len, ctx.shape[2])], dim=1)
        mask = torch.cat([mask, mask.new_zeros(mask.shape[0], pad_len)], dim=1)
    return gather_across_ranks(ctx), gather_across_ranks(mask)


def _check_targets(targets: torch.Tensor, q_vidx: torch.Tensor | None, c_attn_masks: torch.Tensor) -> None:
    n_q = targets.shape[0]
    if targets.dim() != 2 or targets.shape[1] != 2:
        raise ValueError(f"fastvl.models.hero: vsm targets must be [n_queries, 2] (start, end frame), "
                         f"got {tuple(targets.shape)}")
    clip_lens = c_attn_masks.ne(0).sum(1)
    if q_vidx is not None:
        if q_vidx.shape != (n_q,):
            raise ValueError(f"fastvl.models.hero: q_vidx must be [{n_q}] (the video of every query), "
                             f"got {tuple(q_vidx.shape)}")
        if bool(((q_vidx < 0) | (q_vidx >= c_attn_masks.shape[0])).any()):
            raise ValueError(f"fastvl.models.hero: q_vidx values must lie in 0..{c_attn_masks.shape[0] - 1}, "
                             f"got {q_vidx.tolist()}")
        n_frames = clip_lens[q_vidx]
    else:
        n_frames = clip_lens
    bad = (targets < -1) | (targets >= n_frames.unsqueeze(1))
    if bool(bad.any()):
        q = int(bad.any(1).nonzero()[0])
        raise ValueError(f"fastvl.models.hero: vsm targets[{q}] = {targets[q].tolist()} is a moment outside its "
                         f"video ({int(n_frames[q])} frames; -1 = ignore)")


class VsmMethods:
    """VSM computations of the official ``HeroForPretraining`` (mixed into the model class; reads its
    ``video_query_linear``, ``video_st_predictor`` / ``video_ed_predictor``, ``q_feat_attn`` and loss options)."""

    # -- query encoding -----------------------------------------------------------------------------------
    def encode_txt_inputs(self, input_ids: torch.Tensor, pos_ids: torch.Tensor | None, attn_masks: torch.Tensor,
                          attn_layer: torch.nn.Module | None = None, normalized: bool = False) -> torch.Tensor:
        """Text-only cross-modal pass of the queries (packed), then the query encoder.

        input_ids / attn_masks [Nq, Lq], pos_ids [1 or Nq, Lq] -> with ``attn_layer``: the pooled query
        [Nq, H]; without: the padded token outputs [Nq, Lq, H] (the official 'txt' sequence output).
        """
        f_enc = self.v_encoder.f_encoder
        if attn_layer is None:
            out = f_enc({"input_ids": input_ids, "pos_ids": pos_ids, "attn_masks": attn_masks}, "txt")[0]
            return F.normalize(out, dim=-1, eps=1e-5) if normalized else out
        hidden, layout = f_enc.forward_txt_packed(input_ids, pos_ids, attn_masks)
        if normalized:
            hidden = F.normalize(hidden, dim=-1, eps=1e-5)
        return attn_layer.forward_packed(hidden, layout)

    # -- local (span) heads -------------------------------------------------------------------------------
    def _st_ed_from_similarity(self, similarity: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """similarity [N, L], mask [N, L] (float) -> masked start / end logits [N, L]."""
        sim = similarity.unsqueeze(1)
        st = self.video_st_predictor(sim).squeeze(1)
        ed = self.video_ed_predictor(sim).squeeze(1)
        return mask_logits(st, mask), mask_logits(ed, mask)

    def get_pred_from_mod_query(self, frame_embeddings: torch.Tensor, c_attn_masks: torch.Tensor,
                                modularized_query: torch.Tensor, cross: bool = False) -> tuple[torch.Tensor, ...]:
        """Start / end logits. frame_embeddings [Nv, L, H], c_attn_masks [Nv, L], modularized_query [Nq, H] ->
        [Nq, Nv, L] each when ``cross`` or Nq != Nv (every query against every video), else [N, L]."""
        v_bs, q_bs = frame_embeddings.shape[0], modularized_query.shape[0]
        cross = cross or v_bs != q_bs
        query = self.video_query_linear(modularized_query)
        mask = c_attn_masks.to(query.dtype)
        if cross:
            sim = torch.einsum("md,nld->mnl", query, frame_embeddings)
            n_q, n_v, length = sim.shape
            st, ed = self._st_ed_from_similarity(sim.reshape(n_q * n_v, length),
                                                 mask.unsqueeze(0).expand(n_q, -1, -1).reshape(n_q * n_v, length))
            return st.view(n_q, n_v, length), ed.view(n_q, n_v, length)
        sim = torch.einsum("bd,bld->bl", query, frame_embeddings)
        return self._st_ed_from_similarity(sim, mask)

    def _st_ed_own_video(self, frame_embeddings: torch.Tensor, c_attn_masks: torch.Tensor,
                         modularized_query: torch.Tensor, q_vidx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The official cross logits picked at each query's own video, computed for those pairs only: [Nq, L]."""
        query = self.video_query_linear(modularized_query)
        sim = torch.einsum("qd,qld->ql", query, frame_embeddings.index_select(0, q_vidx))
        return self._st_ed_from_similarity(sim, c_attn_masks.index_select(0, q_vidx).to(query.dtype))

    # -- global (video-level) ranking -------------------------------------------------------------------------
    def get_video_level_scores(self, modularized_query: torch.Tensor, context_feat1: torch.Tensor,
                               context_mask: torch.Tensor, val_gather_gpus: bool = True) -> torch.Tensor:
        """Cosine similarity (eps 1e-5) of every query with every frame, masked, max over frames: [Nq, Nv].

        Under torch.distributed the queries and videos of all ranks are gathered first (in training, and in eval
        when ``val_gather_gpus``), differentiably.
        """
        query = F.normalize(modularized_query, dim=-1, eps=1e-5)
        ctx = F.normalize(context_feat1, dim=-1, eps=1e-5)
        if (self.training and self.gather_gpus) or (not self.training and val_gather_gpus):
            ctx, context_mask = _gather_padded_frames(ctx, context_mask)
            query = gather_across_ranks(query)
        scores = torch.einsum("md,nld->mln", query, ctx)  # [Nq, L, Nv]
        scores = mask_logits(scores, context_mask.transpose(0, 1).unsqueeze(0).to(scores.dtype))
        return scores.max(dim=1).values

    def get_ranking_loss(self, pos_score: torch.Tensor, neg_score: torch.Tensor) -> torch.Tensor:
        """'hinge': max(0, margin + neg - pos); 'lse': log(1 + exp(neg - pos)) (broadcast)."""
        if self.ranking_loss_type == "hinge":
            return torch.clamp(self.margin + neg_score - pos_score, min=0)
        if self.ranking_loss_type == "lse":
            return torch.log1p(torch.exp(neg_score - pos_score))
        raise ValueError(f"fastvl.models.hero: ranking_loss_type must be 'hinge' or 'lse', "
                         f"got {self.ranking_loss_type!r}")

    @staticmethod
    def get_all_neg_scores(scores_masked: torch.Tensor, pos_indices: Any = None,
                           sample_min_idx: int = 1) -> torch.Tensor:
        """Each row sorted descending, the first ``sample_min_idx`` (the masked positives) dropped."""
        if scores_masked.shape[1] <= sample_min_idx:
            raise ValueError(f"fastvl.models.hero: no negatives: {scores_masked.shape[1]} candidates per row, "
                             f"{sample_min_idx} positives")
        return torch.sort(scores_masked, descending=True, dim=1).values[:, sample_min_idx:]

    def get_sampled_neg_scores(self, scores_masked: torch.Tensor, sample_min_idx: int = 1) -> torch.Tensor:
        """One negative per row, drawn uniformly among the sorted non-positive ranks (the top ``hard_pool_size``
        with hard negatives): [rows]."""
        bsz, sample_size = scores_masked.shape
        if sample_size <= sample_min_idx:
            raise ValueError(f"fastvl.models.hero: no negatives: {sample_size} candidates per row, "
                             f"{sample_min_idx} positives")
        rows = torch.arange(bsz, device=scores_masked.device)
        order = torch.sort(scores_masked, descending=True, dim=1).indices
        top = min(sample_min_idx + self.hard_pool_size, sample_size) if self.use_hard_negative else sample_size
        pick = order[rows, torch.randint(sample_min_idx, top, size=(bsz,)).to(scores_masked.device)]
        return scores_masked[rows, pick]

    def _hard_weights(self, loss: torch.Tensor) -> torch.Tensor:
        weight = torch.full_like(loss, 0.1)
        weight[:, :self.hard_pool_size] = self.hard_neg_weight
        return weight * loss

    def get_video_level_loss(self, query_context_scores: torch.Tensor,
                             reduction: str | None = "mean") -> tuple[torch.Tensor, torch.Tensor]:
        """Hinge (or lse) ranking over the other videos per query and the other videos' queries per video.

        query_context_scores [Nq, Nv], queries grouped by video (Nq / Nv per video, in video order).
        Returns (neg_ctx, neg_q): 'mean' -> scalars; 'sum' -> per-row means ([Nq] and [Nq], or [Nq] and [Nv]
        without ``use_all_neg``); None -> the unreduced matrices. One video: two zero scalars.
        """
        bsz_q, bsz_v = query_context_scores.shape
        if bsz_v == 1:
            zero = query_context_scores.new_zeros(())
            return zero, zero
        per_v = bsz_q // bsz_v
        if per_v * bsz_v != bsz_q:
            raise ValueError(f"fastvl.models.hero: vsm needs the same number of queries per video: {bsz_q} queries "
                             f"for {bsz_v} videos")
        rows = torch.arange(bsz_q, device=query_context_scores.device)
        own = rows // per_v
        pos_mask = torch.zeros_like(query_context_scores, dtype=torch.bool)
        pos_mask[rows, own] = True
        masked = query_context_scores.masked_fill(pos_mask, 999.0)
        pos_vq = query_context_scores[rows, own].view(bsz_v, per_v)  # [Nv, per_v]
        pos_qv = pos_vq.reshape(bsz_q, 1)
        if self.use_all_neg:
            loss_ctx = self.get_ranking_loss(pos_qv, self.get_all_neg_scores(masked, sample_min_idx=1))
            neg_q = self.get_all_neg_scores(masked.t(), sample_min_idx=per_v).unsqueeze(1)  # [Nv, 1, Nq - per_v]
            loss_q = self.get_ranking_loss(pos_vq.unsqueeze(-1), neg_q)
            loss_q = loss_q.reshape(-1, loss_q.shape[2])
            if self.use_hard_negative:
                loss_ctx, loss_q = self._hard_weights(loss_ctx), self._hard_weights(loss_q)
        else:
            loss_ctx = self.get_ranking_loss(pos_qv, self.get_sampled_neg_scores(masked, 1).unsqueeze(-1))
            loss_q = self.get_ranking_loss(pos_vq, self.get_sampled_neg_scores(masked.t(), per_v).unsqueeze(-1))
        if reduction == "sum":
            return loss_ctx.mean(1), loss_q.mean(1)
        if reduction == "mean":
            return loss_ctx.mean(1).mean(0), loss_q.mean(1).mean(0)
        if reduction is None:
            return loss_ctx, loss_q
        raise ValueError(f"fastvl.models.hero: reduction must be 'mean', 'sum' or None, got {reduction!r}")

    # -- options ------------------------------------------------------------------------------------------
    def set_hard_negative(self, use_hard_negative: bool, hard_pool_size: int, hard_neg_weight: float) -> None:
        """Switch hard negatives on / off (the official trainer does it at a step threshold)."""
        self.use_hard_negative = use_hard_negative
        self.hard_pool_size = hard_pool_size
        self.hard_neg_weight = hard_neg_weight

    def set_train_st_ed(self, lw_st_ed: float) -> None:
        """The weight of the start / end loss (official pre-training sets 0.01)."""
        self.lw_st_ed = lw_st_ed

    # -- the task -----------------------------------------------------------------------------------------
    def forward_vsm(self, batch: dict[str, Any], compute_loss: bool = True, task: str = "vsm"
                    ) -> tuple[torch.Tensor | None, ...]:
        """The official ``forward(batch, 'vsm', compute_loss)`` on a ``vsm_collate`` (or ``vcmr_collate``) dict.

        Returns:
            ``compute_loss``: (lw_st_ed * loss_st_ed, lw_neg_ctx * loss_neg_ctx, lw_neg_q * loss_neg_q); in train
            mode scalars (means); in eval mode loss_st_ed is the summed start + end CE and the ranking losses are
            per-query vectors [Nq]; a part that did not run is ``zeros(1)``.
            else: (q2video_scores [Nq, Nv] or None, st_prob, ed_prob) with the start / end logits [Nq, Nv, L]
            (every query against every video; [N, L] when Nq == Nv) or None, -1e4 at padded frames.
        """
        frame_embeddings = self.v_encoder(batch, "repr")
        c_attn = require_key(batch, "c_attn_masks", task)
        query_ids = require_key(batch, "query_input_ids", task)
        query_mask = require_key(batch, "query_attn_masks", task)
        modularized_query = self.encode_txt_inputs(query_ids, batch.get("query_pos_ids"), query_mask,
                                                   attn_layer=self.q_feat_attn)
        n_q, n_v = modularized_query.shape[0], frame_embeddings.shape[0]
        cross = n_q != n_v
        targets = q_vidx = None
        if compute_loss:
            targets = require_key(batch, "targets", task)
            q_vidx = require_key(batch, "q_vidx", task) if cross else None
            if q_vidx is not None:
                q_vidx = q_vidx.to(frame_embeddings.device).long()
            _check_targets(targets, q_vidx, c_attn)
        run_st_ed = False
        if self.lw_st_ed != 0:
            prob = random.random()
            run_st_ed = prob > self.drop_svmr_prob or not self.training
        st_prob = ed_prob = q2video_scores = None
        if run_st_ed:
            if compute_loss and cross:
                st_prob, ed_prob = self._st_ed_own_video(frame_embeddings, c_attn, modularized_query, q_vidx)
            else:
                st_prob, ed_prob = self.get_pred_from_mod_query(frame_embeddings, c_attn, modularized_query)
        if self.lw_neg_ctx != 0 or self.lw_neg_q != 0:
            q2video_scores = self.get_video_level_scores(modularized_query, frame_embeddings, c_attn)
        if not compute_loss:
            return q2video_scores, st_prob, ed_prob
        dtype, device = frame_embeddings.dtype, frame_embeddings.device
        loss_st_ed = torch.zeros(1, dtype=dtype, device=device)
        loss_neg_ctx = torch.zeros(1, dtype=dtype, device=device)
        loss_neg_q = torch.zeros(1, dtype=dtype, device=device)
        reduction = "mean" if self.training else "sum"
        if st_prob is not None:
            tgt = targets.long()
            loss_st_ed = (F.cross_entropy(st_prob, tgt[:, 0], reduction=reduction, ignore_index=-1)
                          + F.cross_entropy(ed_prob, tgt[:, 1], reduction=reduction, ignore_index=-1))
        if q2video_scores is not None:
            loss_neg_ctx, loss_neg_q = self.get_video_level_loss(q2video_scores, reduction)
        return self.lw_st_ed * loss_st_ed, self.lw_neg_ctx * loss_neg_ctx, self.lw_neg_q * loss_neg_q

