"""Evaluation metrics of the UNITER downstream tasks (plain PyTorch; inputs validated with errors naming them).

- :func:`vqa_score`: soft VQA accuracy, the target score of the arg-max answer (VQA / GQA / SNLI-VE);
- :func:`accuracy`: arg-max accuracy (NLVR2, VCR rows);
- :func:`retrieval_recall`: IR / TR recall@k from a full text x image score matrix;
- :func:`box_iou`, :func:`check_boxes`, :func:`re_accuracy`: referring expressions (IoU >= 0.5 with the ground truth);
- :func:`vcr_accuracy`: VCR Q->A, QA->R and Q->AR from per-choice scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["accuracy", "box_iou", "check_boxes", "re_accuracy", "retrieval_recall", "vcr_accuracy", "vqa_score"]


def _check_2d(name: str, t: torch.Tensor, fn: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"fastvl.tasks.metrics.{fn}: argument '{name}' must be a 2-d tensor, got {got}")


def vqa_score(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    """Soft accuracy per example: ``soft_targets[i, argmax(logits[i])]``.

    Args:
        logits: [B, A] answer scores. soft_targets: [B, A] in [0, 1] (VQA: min(1, annotators / 3)).
    Returns:
        [B] float32 (mean = VQA accuracy).
    """
    _check_2d("logits", logits, "vqa_score")
    if soft_targets.shape != logits.shape:
        raise ValueError(f"fastvl.tasks.metrics.vqa_score: 'soft_targets' must have the shape of 'logits' "
                         f"{list(logits.shape)}, got {list(soft_targets.shape)}")
    return soft_targets.float().gather(1, logits.argmax(1, keepdim=True)).squeeze(1)


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[B, C] scores, [B] class ids -> [B] float32, 1 where the arg-max is the target."""
    _check_2d("logits", logits, "accuracy")
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"fastvl.tasks.metrics.accuracy: 'targets' must have shape [{logits.shape[0]}], got "
                         f"{list(targets.shape)}")
    return (logits.argmax(1) == targets).float()


def retrieval_recall(scores: torch.Tensor, txt2img: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
                     ) -> dict[str, float]:
    """Image retrieval (text -> image) and text retrieval (image -> text) recall@k.

    Rank of a ground truth = number of candidates scored strictly higher (ties count in its favour). IR: each
    text's image. TR: each image's best-ranked ground-truth text (images with no text are skipped).

    Args:
        scores: [n_txt, n_img] matching scores. txt2img: [n_txt] long, the image of each text.
        ks: recall cut-offs.
    Returns:
        ``{'ir_r1': ..., 'tr_r1': ..., ..., 'ir_mean': ..., 'tr_mean': ..., 'r_mean': ...}`` in percent.
    """
    _check_2d("scores", scores, "retrieval_recall")
    n_txt, n_img = scores.shape
    if txt2img.shape != (n_txt,):
        raise ValueError(f"fastvl.tasks.metrics.retrieval_recall: 'txt2img' must have shape [{n_txt}], got "
                         f"{list(txt2img.shape)}")
    txt2img = txt2img.long().to(scores.device)
    if n_txt and (int(txt2img.min()) < 0 or int(txt2img.max()) >= n_img):
        raise ValueError(f"fastvl.tasks.metrics.retrieval_recall: 'txt2img' has image ids outside [0, {n_img})")
    gt = scores.gather(1, txt2img[:, None])  # [n_txt, 1]
    ir_rank = (scores > gt).sum(1)  # [n_txt]
    col = scores.t()  # [n_img, n_txt]
    txt_rank = (col[txt2img] > gt).sum(1)  # rank of text t among all texts for its image
    best = torch.full((n_img,), n_txt, dtype=torch.long, device=scores.device)
    best = best.scatter_reduce(0, txt2img, txt_rank, reduce="amin")
    has_txt = torch.zeros(n_img, dtype=torch.bool, device=scores.device).index_fill(0, txt2img, True)
    tr_rank = best[has_txt]
    out = {}
    for k in ks:
        out[f"ir_r{k}"] = 100.0 * float((ir_rank < k).float().mean()) if n_txt else 0.0
        out[f"tr_r{k}"] = 100.0 * float((tr_rank < k).float().mean()) if tr_rank.numel() else 0.0
    out["ir_mean"] = sum(out[f"ir_r{k}"] for k in ks) / len(ks)
    out["tr_mean"] = sum(out[f"tr_r{k}"] for k in ks) / len(ks)
    out["r_mean"] = (out["ir_mean"] + out["tr_mean"]) / 2
    return out


def check_boxes(boxes: torch.Tensor, name: str, image_sizes: torch.Tensor | None = None) -> None:
    """Raise ValueError unless ``boxes`` [N, 4] are (x1, y1, x2, y2) with x1 <= x2, y1 <= y2, finite, and (with
    ``image_sizes`` [N, 2] = (width, height)) inside their image; the message names the first bad box."""
    _check_2d(name, boxes, "check_boxes")
    if boxes.shape[1] != 4:
        raise ValueError(f"fastvl.tasks.metrics: '{name}' must have shape [N, 4] (x1, y1, x2, y2), got "
                         f"{list(boxes.shape)}")
    b = boxes.float()
    bad = ~torch.isfinite(b).all(1) | (b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])
    what = "is not finite or has x2 < x1 / y2 < y1"
    if image_sizes is not None:
        if tuple(image_sizes.shape) != (boxes.shape[0], 2):
            raise ValueError(f"fastvl.tasks.metrics: 'image_sizes' must have shape [{boxes.shape[0]}, 2] (width, "
                             f"height), got {list(image_sizes.shape)}")
        s = image_sizes.float()
        outside = (b[:, 0] < 0) | (b[:, 1] < 0) | (b[:, 2] > s[:, 0]) | (b[:, 3] > s[:, 1])
        bad = bad | outside
        what += " or lies outside its image"
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        extra = "" if image_sizes is None else f" (image {image_sizes[i].tolist()})"
        raise ValueError(f"fastvl.tasks.metrics: '{name}' box {i} = {boxes[i].tolist()}{extra} {what}")


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise IoU of boxes a [N, 4] and b [N, 4] (x1, y1, x2, y2) -> [N] float32 (0 when both are empty)."""
    a, b = a.float(), b.float()
    w = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    h = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    inter = w * h
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    union = area(a) + area(b) - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def re_accuracy(pred_boxes: torch.Tensor, gt_boxes: torch.Tensor, image_sizes: torch.Tensor | None = None,
                threshold: float = 0.5) -> torch.Tensor:
    """Referring-expression accuracy per example: IoU(predicted region box, ground-truth box) >= threshold.

    Args:
        pred_boxes, gt_boxes: [N, 4] (x1, y1, x2, y2) in pixels (or any common unit).
        image_sizes: [N, 2] (width, height); when given, every box must lie inside its image.
    Returns:
        [N] float32 in {0, 1}.
    """
    check_boxes(pred_boxes, "pred_boxes", image_sizes)
    check_boxes(gt_boxes, "gt_boxes", image_sizes)
    if pred_boxes.shape != gt_boxes.shape:
        raise ValueError(f"fastvl.tasks.metrics.re_accuracy: 'gt_boxes' must have the shape of 'pred_boxes' "
                         f"{list(pred_boxes.shape)}, got {list(gt_boxes.shape)}")
    return (box_iou(pred_boxes, gt_boxes) >= threshold).float()


def vcr_accuracy(qa_scores: torch.Tensor, qar_scores: torch.Tensor, answer: torch.Tensor, rationale: torch.Tensor
                 ) -> dict[str, torch.Tensor]:
    """VCR accuracies per question: Q->A, QA->R, and Q->AR (both right).

    Args:
        qa_scores: [N, 4] answer-choice scores. qar_scores: [N, 4] rationale-choice scores (given the right answer).
        answer, rationale: [N] long in [0, 4).
    Returns:
        dict of [N] float32 tensors: ``q2a``, ``qa2r``, ``q2ar``.
    """
    for name, t in (("qa_scores", qa_scores), ("qar_scores", qar_scores)):
        _check_2d(name, t, "vcr_accuracy")
        if t.shape[1] != 4:
            raise ValueError(f"fastvl.tasks.metrics.vcr_accuracy: '{name}' must have 4 choices per question, got "
                             f"shape {list(t.shape)}")
    q2a = accuracy(qa_scores, answer)
    qa2r = accuracy(qar_scores, rationale)
    return {"q2a": q2a, "qa2r": qa2r, "q2ar": q2a * qa2r}
