"""Moment-retrieval metrics (HERO's TVR evaluation): temporal IoU, temporal NMS, moment candidates from start / end
scores, and recall at k under IoU thresholds for single-video (SVMR), corpus (VCMR) and video (VR) retrieval.

Moments are ``(start, end)`` with ``end`` EXCLUSIVE, in any unit (frames or seconds) as long as predictions and
ground truth share it; a frame span st..ed inclusive is ``(st, ed + 1)`` in frames.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["moment_candidates", "recall_at_k", "temporal_iou", "temporal_nms", "video_recall_at_k"]


def temporal_iou(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """pred [N, 2], gt [M, 2] (start, end exclusive) -> IoU [N, M] (0 where the union is empty)."""
    pred, gt = torch.as_tensor(pred, dtype=torch.float64), torch.as_tensor(gt, dtype=torch.float64)
    if pred.dim() != 2 or pred.shape[-1] != 2 or gt.dim() != 2 or gt.shape[-1] != 2:
        raise ValueError(f"fastvl.tasks.temporal_iou: pred and gt must be [N, 2] / [M, 2], got {tuple(pred.shape)} "
                         f"and {tuple(gt.shape)}")
    inter = (torch.minimum(pred[:, None, 1], gt[None, :, 1]) - torch.maximum(pred[:, None, 0], gt[None, :, 0]))
    inter = inter.clamp_min(0)
    union = (pred[:, 1] - pred[:, 0])[:, None] + (gt[:, 1] - gt[:, 0])[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(inter))


def temporal_nms(moments: Sequence[tuple], iou_threshold: float, max_after_nms: int = 100) -> list[tuple]:
    """Greedy NMS over ``(start, end, score, *extra)`` tuples: highest score first, a moment is dropped when its IoU
    with a kept moment (of the same extra key, e.g. the video id, when given) is >= ``iou_threshold``."""
    kept: list[tuple] = []
    for m in sorted(moments, key=lambda m: -float(m[2])):
        s0, e0 = float(m[0]), float(m[1])
        ok = True
        for k in kept:
            if k[3:] != m[3:]:
                continue
            inter = max(0.0, min(e0, float(k[1])) - max(s0, float(k[0])))
            union = (e0 - s0) + (float(k[1]) - float(k[0])) - inter
            if union > 0 and inter / union >= iou_threshold:
                ok = False
                break
        if ok:
            kept.append(tuple(m))
            if len(kept) >= max_after_nms:
                break
    return kept


def moment_candidates(st_prob: torch.Tensor, ed_prob: torch.Tensor, length: int, max_moment_len: int | None = None,
                      top_n: int = 100) -> list[tuple[int, int, float]]:
    """The ``top_n`` frame spans (st, ed_exclusive, st_prob[st] * ed_prob[ed_incl]) with st <= ed_incl < length and
    span <= ``max_moment_len`` frames (None: any), best first.

    st_prob, ed_prob: [L] probabilities (softmax of the start / end scores over the real frames).
    """
    if length < 1 or length > st_prob.shape[0] or st_prob.shape != ed_prob.shape:
        raise ValueError(f"fastvl.tasks.moment_candidates: length {length} must be in [1, {st_prob.shape[0]}] and "
                         f"st_prob / ed_prob of one shape, got {tuple(st_prob.shape)} / {tuple(ed_prob.shape)}")
    s, e = st_prob[:length].double(), ed_prob[:length].double()
    score = s[:, None] * e[None, :]
    i = torch.arange(length)
    valid = i[None, :] >= i[:, None]
    if max_moment_len is not None:
        valid &= (i[None, :] - i[:, None]) < max_moment_len
    score = score.masked_fill(~valid, -1.0).reshape(-1)
    k = min(top_n, int(valid.sum()))
    vals, idx = score.topk(k)
    return [(int(j // length), int(j % length) + 1, float(v)) for v, j in zip(vals, idx)]


def recall_at_k(predictions: Sequence[Sequence[tuple]], ground_truth: Sequence[tuple],
                ks: Sequence[int] = (1, 5, 10, 100), ious: Sequence[float] = (0.5, 0.7)) -> dict[str, float]:
    """Fraction of queries with a correct moment among their top k predictions.

    predictions[q]: ranked ``(video, start, end)`` (or ``(start, end)`` for single-video retrieval) tuples;
    ground_truth[q]: the same form. A prediction is correct when its video matches and IoU >= the threshold.
    Returns {'r{k}_iou{t}': fraction} for every k and threshold.
    """
    if len(predictions) != len(ground_truth):
        raise ValueError(f"fastvl.tasks.recall_at_k: {len(predictions)} prediction lists for {len(ground_truth)} "
                         "queries")
    out = {f"r{k}_iou{t}": 0.0 for t in ious for k in ks}
    n = len(ground_truth)
    for preds, gt in zip(predictions, ground_truth):
        gt = tuple(gt)
        if not preds:
            continue
        same = torch.tensor([tuple(p[:-2]) == gt[:-2] for p in preds])
        iou = temporal_iou(torch.tensor([[float(p[-2]), float(p[-1])] for p in preds]),
                           torch.tensor([[float(gt[-2]), float(gt[-1])]]))[:, 0]
        for t in ious:
            hit = (same & (iou >= t - 1e-9)).nonzero()
            first = int(hit[0, 0]) if hit.numel() else None
            for k in ks:
                if first is not None and first < k:
                    out[f"r{k}_iou{t}"] += 1.0
    return {k: v / max(n, 1) for k, v in out.items()}


def video_recall_at_k(scores: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
                      ) -> dict[str, float]:
    """Video retrieval: scores [Q, V] (query x video), targets [Q] the right video -> {'vr_r{k}': fraction}
    (ties count against the query: the right video must score strictly above the others it is ranked under)."""
    if scores.dim() != 2 or targets.shape != (scores.shape[0],):
        raise ValueError(f"fastvl.tasks.video_recall_at_k: scores [Q, V] and targets [Q], got {tuple(scores.shape)} "
                         f"and {tuple(targets.shape)}")
    right = scores.gather(1, targets.long()[:, None])
    rank = (scores >= right).sum(1) - 1  # others scoring at least as high
    return {f"vr_r{k}": float((rank < k).float().mean()) for k in ks}
