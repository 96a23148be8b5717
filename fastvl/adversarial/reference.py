"""The plain VILLA loop, written from REFERENCE.md (VILLA) for clarity, not speed: the ground truth that tests compare
:class:`~fastvl.adversarial.AdversarialTask` with and the baseline ``benchmarks/bench_villa.py`` times.

It follows upstream's structure: the clean pass is run first and kept with its graph (not detached); every
adversarial step runs the perturbed pass(es), backpropagates ``(task + kl_weight * consistency) / K`` (alter: a
text-only and an image-only pass, / 2K) with ``retain_graph`` through both the perturbed and the clean graph,
and, except after the last step, updates each delta by ``lr * g / max(||g||, 1e-8)`` per example followed by the
projection to ``adv_max_norm``. With ``cfg.kl_clean_grad = False`` the clean predictions enter the consistency
term detached (the opt-in stop-gradient target). Task losses and consistency terms are written out with plain
PyTorch for the UNITER pre-training tasks mlm, mrfr, itm (+ WRA) on packed batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..batch import PackedVLBatch
from .config import AdvConfig

__all__ = ["plain_villa_step"]

_PASSES = {"text": [("text",)], "image": [("image",)], "both": [("text", "image")], "alter": [("text",), ("image",)]}


def _pass(model: nn.Module, task: str, batch: PackedVLBatch, txt, img, ot_lambda: float):
    out = model.forward_packed(batch, task, compute_loss=False, with_ot=task == "itm" and ot_lambda > 0,
                               txt_delta=txt, img_delta=img)
    if task == "mlm":
        return F.cross_entropy(out.float(), batch.txt_labels[batch.txt_labels != -1]), out
    if task == "mrfr":
        return ((out.float() - batch.feat_targets.float()) ** 2).mean(), out
    if task != "itm":
        raise ValueError(f"plain_villa_step: argument 'task' must be 'mlm', 'mrfr' or 'itm', got {task!r}")
    scores, dist = out
    y = batch.itm_targets
    loss = F.cross_entropy(scores.float(), y)
    if dist is not None:
        loss = loss + ot_lambda * (dist[y == 1].sum() - dist[y == 0].sum()) / y.numel()
    return loss, scores


def _consistency(task: str, adv: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    adv, clean = adv.float(), clean.float()
    if task == "mrfr":
        return ((adv - clean) ** 2).mean()
    kl = F.kl_div(F.log_softmax(adv, -1), F.softmax(clean, -1), reduction="none") + \
        F.kl_div(F.log_softmax(clean, -1), F.softmax(adv, -1), reduction="none")
    return kl.sum() / max(adv.shape[0], 1)


def _update(delta: torch.Tensor, grad: torch.Tensor, lens: list[int], lr: float, norm: str,
            max_norm: float) -> torch.Tensor:
    """Per-example normalised ascent + projection on a packed delta [T, D] (rows of example i: lens[i])."""
    b = len(lens)
    ex = torch.repeat_interleave(torch.arange(b, device=delta.device), torch.tensor(lens, device=delta.device))
    g = grad.float()
    if norm == "l2":
        gn = torch.zeros(b, device=g.device).index_add_(0, ex, g.pow(2).sum(1)).sqrt()
    else:
        gn = torch.zeros(b, device=g.device).scatter_reduce_(0, ex, g.abs().amax(1), "amax")
    d = delta.detach().float() + lr * g / gn.clamp(min=1e-8)[ex, None]
    if max_norm > 0 and norm == "l2":
        dn = torch.zeros(b, device=g.device).index_add_(0, ex, d.pow(2).sum(1)).sqrt()
        d = d * torch.where(dn > max_norm, max_norm / dn, torch.ones_like(dn))[ex, None]
    elif max_norm > 0:
        d = d.clamp(-max_norm, max_norm)
    return d.to(delta.dtype)


def plain_villa_step(model: nn.Module, task: str, batch: PackedVLBatch, cfg: AdvConfig, ot_lambda: float = 0.1,
                     txt_init: torch.Tensor | None = None, img_init: torch.Tensor | None = None
                     ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], float]:
    """One micro-batch of VILLA; parameter gradients accumulate in ``model`` (a UniterForPretraining).

    Args:
        task: 'mlm', 'mrfr' or 'itm'. batch: packed, with the task's fields. cfg: the adversarial settings.
        ot_lambda: ITM's WRA weight. txt_init [T_txt, H], img_init [T_img, img_dim]: initial deltas (default 0).
    Returns:
        (the (text, image) deltas every step used, detached copies; the summed loss as a float).
    """
    K = cfg.adv_steps
    passes = _PASSES[cfg.mode]
    _, clean = _pass(model, task, batch, None, None, ot_lambda)
    if not cfg.kl_clean_grad:
        clean = clean.detach()
    hidden = model.uniter.config.hidden_size
    txt = txt_init.clone() if txt_init is not None else batch.img_feat.new_zeros(batch.input_ids.shape[0], hidden)
    img = img_init.clone() if img_init is not None else torch.zeros_like(batch.img_feat)
    txt, img = txt.float(), img.float()
    trajectory, total = [], 0.0
    for k in range(K):
        txt.requires_grad_()
        img.requires_grad_()
        trajectory.append((txt.detach().clone(), img.detach().clone()))
        loss = 0.0
        for mods in passes:
            task_loss, pred = _pass(model, task, batch, txt if "text" in mods else None,
                                    img if "image" in mods else None, ot_lambda)
            loss = loss + (task_loss + cfg.adv_kl_weight * _consistency(task, pred, clean)) / (K * len(passes))
        loss.backward(retain_graph=True)
        total += float(loss.detach())
        if k == K - 1:
            break
        if "text" in cfg.modalities:
            txt = _update(txt, txt.grad, batch.txt_lens, cfg.adv_lr_txt, cfg.norm, cfg.adv_max_norm)
        else:
            txt = txt.detach()
        if "image" in cfg.modalities:
            img = _update(img, img.grad, batch.img_lens, cfg.adv_lr_img, cfg.norm, cfg.adv_max_norm)
        else:
            img = img.detach()
    return trajectory, total
