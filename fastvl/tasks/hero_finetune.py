"""HERO fine-tuning tasks over the official collate dicts: moment retrieval (TVR: ``HeroForVcmr``), video QA
(``HeroForVideoQA``) and VIOLIN (``HeroForViolin``), with their evaluation.

Losses as the official training scripts reduce them:

- ``tvr``: ``loss_st_ed + loss_neg_ctx + loss_neg_q`` (each already weighted by the model's lw_*), count = queries.
- ``videoqa``: ``qa_loss + lw_st_ed * temporal_loss`` (5-way CE over the answers + the span loss (start CE + end
  CE) / 2; ``lw_st_ed`` 0.4 as ``train-tvqa-8gpu.json``), count = questions.
- ``violin``: the model's BCE of the sigmoid over (video, statement) rows, count = rows.

Evaluation: video QA and VIOLIN accuracy per example (:meth:`evaluate`); moment retrieval over a whole validation
corpus (:func:`evaluate_vcmr`): every query scored against every validation video; VR R@k (video retrieval), SVMR
R@k at IoU 0.5 / 0.7 (the moment inside the right video) and VCMR R@k (moments ranked over the corpus: each
video's top moments scored ``softmax(q2video / T)[video] * p_st * p_ed``, temporal NMS inside a video).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .video_metrics import moment_candidates, recall_at_k, temporal_nms, video_recall_at_k

__all__ = ["HERO_FINETUNE_TASKS", "HeroVcmrTask", "HeroVideoQATask", "HeroViolinTask", "evaluate_vcmr",
           "vcmr_chance"]

HERO_FINETUNE_TASKS = ("tvr", "videoqa", "violin")


def _dict(batch: Any, name: str) -> dict[str, Any]:
    if not isinstance(batch, dict):
        raise TypeError(f"fastvl.tasks.{name}: 'batch' must be the official collate dict of the task, got "
                        f"{type(batch).__name__}")
    return batch


class HeroVcmrTask(nn.Module):
    """TVR / moment retrieval training on ``vcmr_collate`` dicts (``model``: a ``HeroForVcmr``)."""

    name = "tvr"

    def __init__(self, model: nn.Module, task: str = "tvr"):
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, batch: dict[str, Any]) -> dict:
        batch = _dict(batch, "HeroVcmrTask")
        st_ed, neg_ctx, neg_q = self.model(batch, task=self.task, compute_loss=True)
        loss = (st_ed + neg_ctx + neg_q).mean()
        logs = {"tvr_loss": loss.detach(), "tvr_st_ed": st_ed.detach().mean(), "tvr_neg_ctx": neg_ctx.detach().mean(),
                "tvr_neg_q": neg_q.detach().mean()}
        return dict(loss=loss, logs=logs, count=int(batch["query_input_ids"].shape[0]))


class HeroVideoQATask(nn.Module):
    """Video QA training on ``video_qa_collate`` dicts (``model``: a ``HeroForVideoQA``).

    Args: lw_st_ed: weight of the span loss (official 0.4).
    """

    name = "videoqa"

    def __init__(self, model: nn.Module, lw_st_ed: float = 0.4, task: str = "tvqa"):
        super().__init__()
        self.model = model
        self.lw_st_ed = lw_st_ed
        self.task = task

    def forward(self, batch: dict[str, Any]) -> dict:
        batch = _dict(batch, "HeroVideoQATask")
        qa_loss, ts_loss = self.model(batch, task=self.task, compute_loss=True)
        loss = qa_loss + self.lw_st_ed * ts_loss
        return dict(loss=loss, logs={"videoqa_loss": loss.detach(), "videoqa_qa_loss": qa_loss.detach(),
                                     "videoqa_span_loss": ts_loss.detach()},
                    count=int(batch["targets"].shape[0]))

    @torch.no_grad()
    def evaluate(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """{'accuracy': [Q] 1.0 where the top-scored answer is the right one}."""
        logits = self.model(_dict(batch, "HeroVideoQATask"), task=self.task, compute_loss=False)
        return {"accuracy": (logits.argmax(-1) == batch["targets"].reshape(-1)).float()}


class HeroViolinTask(nn.Module):
    """VIOLIN training on ``violin_collate`` dicts (``model``: a ``HeroForViolin``)."""

    name = "violin"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any]) -> dict:
        batch = _dict(batch, "HeroViolinTask")
        loss = self.model(batch, task="violin", compute_loss=True)
        return dict(loss=loss, logs={"violin_loss": loss.detach()}, count=int(batch["targets"].shape[0]))

    @torch.no_grad()
    def evaluate(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """{'accuracy': [N] 1.0 where sigmoid(logit) >= 0.5 agrees with the target}."""
        logits = self.model(_dict(batch, "HeroViolinTask"), task="violin", compute_loss=False).reshape(-1)
        return {"accuracy": ((logits >= 0).long() == batch["targets"].reshape(-1).long()).float()}


# ----------------------------------------------------------------------------------------------------------------
# moment retrieval evaluation
# ----------------------------------------------------------------------------------------------------------------
def _ranked_moments(q2v: torch.Tensor, st: torch.Tensor, ed: torch.Tensor, lens: list[int], top_videos: int,
                    max_moment_len: int | None, nms_iou: float, temperature: float, top_n: int = 100
                    ) -> list[tuple[int, int, int]]:
    """One query's corpus ranking: (video, st, ed_exclusive) best first."""
    vprob = torch.softmax(q2v.double() / temperature, 0)
    cands = []
    for v in vprob.topk(min(top_videos, vprob.shape[0])).indices.tolist():
        n = lens[v]
        sp, ep = torch.softmax(st[v, :n].double(), 0), torch.softmax(ed[v, :n].double(), 0)
        moments = moment_candidates(sp, ep, n, max_moment_len, top_n=20)
        kept = temporal_nms([(s, e, p, v) for s, e, p in moments], nms_iou, max_after_nms=10)
        cands += [(float(vprob[v]) * p, v, s, e) for s, e, p, _ in kept]
    cands.sort(key=lambda c: -c[0])
    return [(v, s, e) for _, v, s, e in cands[:top_n]]


@torch.no_grad()
def evaluate_vcmr(model: nn.Module, batches: Iterable[dict[str, Any]], device: torch.device | str = "cpu",
                  ks: tuple[int, ...] = (1, 5, 10), max_moment_len: int | None = None, top_videos: int = 10,
                  nms_iou: float = 0.7, temperature: float = 0.1) -> dict[str, float]:
    """Moment retrieval metrics of ``model`` (a HeroForVcmr in eval mode) over validation ``vcmr_collate`` batches
    (queries with their own video's index ``q_vidx`` and ``targets`` [Q, 2] = start / end frame, inclusive; a video
    named in ``vids`` more than once, in a batch or across batches, is one corpus entry).

    Returns vr_r{k}, svmr_r{k}_iou{t}, vcmr_r{k}_iou{t} (fractions of queries) and n_queries / n_videos.
    """
    frames, lens, qs, gts = [], [], [], []
    index: dict[Any, int] = {}  # video name -> corpus position (a video repeated across batches is encoded once)
    for batch in batches:
        batch = batch.to(device) if hasattr(batch, "to") else batch
        emb = model.v_encoder(batch, "repr")  # [B, L, H]
        c_attn = batch["c_attn_masks"]
        names = batch.get("vids") or [("batch", len(frames), b) for b in range(emb.shape[0])]
        pos = []
        for b in range(emb.shape[0]):
            if names[b] not in index:
                n = int(c_attn[b].sum())
                index[names[b]] = len(frames)
                frames.append(emb[b, :n])
                lens.append(n)
            pos.append(index[names[b]])
        query = model.encode_txt_inputs(batch["query_input_ids"], batch.get("query_pos_ids"),
                                        batch["query_attn_masks"], attn_layer=model.q_feat_attn)
        qs.append(query)
        tgt = batch["targets"].long().tolist()
        for i, v in enumerate(batch["q_vidx"].tolist()):
            gts.append((pos[v], tgt[i][0], tgt[i][1] + 1))
    if not frames or not gts:
        raise ValueError("fastvl.tasks.evaluate_vcmr: the validation data holds no video or no query")
    L = max(lens)
    ctx = torch.zeros(len(frames), L, frames[0].shape[-1], device=frames[0].device, dtype=frames[0].dtype)
    mask = torch.zeros(len(frames), L, device=ctx.device, dtype=ctx.dtype)
    for i, f in enumerate(frames):
        ctx[i, :f.shape[0]] = f
        mask[i, :f.shape[0]] = 1
    query = torch.cat(qs)
    st, ed = model.get_pred_from_mod_query(ctx, mask, query, cross=True)  # [Q, V, L]
    q2v = model.get_video_level_scores(query, ctx, mask, val_gather_gpus=False)  # [Q, V]
    own = torch.tensor([g[0] for g in gts], device=q2v.device)
    out = video_recall_at_k(q2v.float(), own, ks)
    svmr, vcmr = [], []
    for q, (v, _, _) in enumerate(gts):
        n = lens[v]
        sp, ep = torch.softmax(st[q, v, :n].double(), 0), torch.softmax(ed[q, v, :n].double(), 0)
        svmr.append([(s, e) for s, e, _ in moment_candidates(sp, ep, n, max_moment_len, top_n=max(ks))])
        vcmr.append(_ranked_moments(q2v[q], st[q], ed[q], lens, top_videos, max_moment_len, nms_iou, temperature))
    out.update({f"svmr_{k}": v for k, v in recall_at_k(svmr, [g[1:] for g in gts], ks).items()})
    out.update({f"vcmr_{k}": v for k, v in recall_at_k(vcmr, gts, ks).items()})
    out["n_queries"], out["n_videos"] = float(len(gts)), float(len(frames))
    return out


def vcmr_chance(video_lens: list[int], ground_truth: list[tuple[int, int, int]], ks: tuple[int, ...] = (1, 5, 10),
                trials: int = 2, seed: int = 0) -> dict[str, float]:
    """The metrics of :func:`evaluate_vcmr` for random scores (uniform start / end and video scores), averaged over
    ``trials``: the chance level of a model that ignores its input. ground_truth: (video, st, ed_inclusive)."""
    g = torch.Generator().manual_seed(seed)
    total: dict[str, float] = {}
    n_v, L = len(video_lens), max(video_lens)
    gts = [(v, s, e + 1) for v, s, e in ground_truth]
    for _ in range(trials):
        q2v = torch.rand(len(gts), n_v, generator=g)
        st, ed = torch.randn(len(gts), n_v, L, generator=g), torch.randn(len(gts), n_v, L, generator=g)
        res = video_recall_at_k(q2v, torch.tensor([x[0] for x in gts]), ks)
        svmr, vcmr = [], []
        for q, (v, _, _) in enumerate(gts):
            n = video_lens[v]
            sp, ep = F.softmax(st[q, v, :n].double(), 0), F.softmax(ed[q, v, :n].double(), 0)
            svmr.append([(s, e) for s, e, _ in moment_candidates(sp, ep, n, None, top_n=max(ks))])
            vcmr.append(_ranked_moments(q2v[q], st[q], ed[q], video_lens, 10, None, 0.7, 0.1))
        res.update({f"svmr_{k}": v for k, v in recall_at_k(svmr, [x[1:] for x in gts], ks).items()})
        res.update({f"vcmr_{k}": v for k, v in recall_at_k(vcmr, gts, ks).items()})
        for k, v in res.items():
            total[k] = total.get(k, 0.0) + v / trials
    return total
