"""HERO pre-training tasks (MLM, MFM-NCE, MFFR, FOM, VSM) as task modules over the official collate dicts, their
validation metrics, and their VILLA view.

Each task calls ``model(batch, task, compute_loss=True)`` (``HeroForPretraining``'s official dispatch) and reduces
the result as the official ``pretrain.py`` does: MLM / MFM-NCE / FOM the mean of the per-element losses, MFFR the
mean L2 distance ``sqrt(sum_d err).mean()``, VSM the sum of its three already weighted losses. ``count`` is the
number of loss elements (masked tokens, masked frames, ordered frames, queries), so the trainer weights micro-batches
and ranks by it. The mix the paper uses is :data:`OFFICIAL_MIX` (mlm : mfm-nce : fom : vsm = 2 : 2 : 1 : 2), one
task per accumulation cycle (the Trainer's task mixing).

``evaluate(batch)`` gives per-batch sums in eval mode, as the official ``validate_*`` functions compute them, and
:func:`summarize_validation` turns their totals into the validation line: ``mlm_acc``, ``mfm-nce_acc`` (the masked
frame's own feature ranked first among the true features and every unmasked slot), ``mffr_l2``, ``fom_acc`` (frame
order), ``vsm_r1`` (query -> video retrieval in the batch) and ``vsm_st_acc`` / ``vsm_ed_acc`` (span ends).

VILLA view (mlm, mfm-nce, mffr, fom): the text perturbation is added to the subtitle word embeddings of every
segment (packed order) and the image perturbation to the raw frame features the cross-modal transformer embeds; the
same per-frame perturbation reaches the frame's ``frame_transform`` input through the fusion index (frames matched
to no subtitle are left unperturbed). Both enter through forward hooks on the model's embedding modules that exist
only during the view's forward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..models.hero import HeroSegmentLayout
from ..models.hero.pretrain import mlm_layout
from .base import AdvOutput, consistency_loss

__all__ = ["HERO_PRETRAIN_TASKS", "OFFICIAL_MIX", "HeroAdvInputs", "HeroPretrainTask", "HeroPretrainView",
           "hero_pretrain_tasks", "summarize_validation"]

HERO_PRETRAIN_TASKS = ("mlm", "mfm-nce", "mffr", "fom", "vsm")
#: The paper's pre-training mix (``config/pretrain-tv-16gpu.json``): MFFR is off there.
OFFICIAL_MIX = {"mlm": 2.0, "mfm-nce": 2.0, "fom": 1.0, "vsm": 2.0}


class HeroPretrainTask(nn.Module):
    """One HERO pre-training task on its official collate dict (see the module docstring).

    Args:
        model: a ``HeroForPretraining`` (``model(batch, task, compute_loss)`` with the official outputs).
        task: one of :data:`HERO_PRETRAIN_TASKS`.
    """

    def __init__(self, model: nn.Module, task: str):
        super().__init__()
        if task not in HERO_PRETRAIN_TASKS:
            raise ValueError(f"fastvl.tasks.HeroPretrainTask: argument 'task' must be one of {HERO_PRETRAIN_TASKS}, "
                             f"got {task!r}")
        self.model = model
        self.task = task

    def extra_repr(self) -> str:
        return f"task={self.task!r}"

    def _batch(self, batch: Any) -> dict[str, Any]:
        if not isinstance(batch, dict):
            raise TypeError(f"fastvl.tasks.HeroPretrainTask({self.task!r}): 'batch' must be the official collate dict "
                            f"of the task, got {type(batch).__name__}")
        return batch

    def count(self, batch: dict[str, Any]) -> int | torch.Tensor:
        """Loss elements: masked tokens (mlm), masked frames (mfm-nce, mffr), frames to order (fom), queries (vsm)."""
        if self.task == "mlm":
            return int(batch["txt_labels"].shape[0])
        if self.task in ("mfm-nce", "mffr"):
            return int(batch["feat_targets"].shape[0])
        if self.task == "fom":
            return (batch["targets"] != -1).sum()
        return int(batch["query_input_ids"].shape[0])

    def forward(self, batch: dict[str, Any]) -> dict:
        batch = self._batch(batch)
        out = self.model(batch, task=self.task, compute_loss=True)
        logs: dict[str, torch.Tensor] = {}
        if self.task == "vsm":
            st_ed, neg_ctx, neg_q = out
            loss = (st_ed + neg_ctx + neg_q).mean()
            for name, part, weight in (("st_ed", st_ed, self.model.lw_st_ed), ("neg_ctx", neg_ctx,
                                       self.model.lw_neg_ctx), ("neg_q", neg_q, self.model.lw_neg_q)):
                value = part.detach().float().mean()
                logs[f"vsm_{name}"] = value / weight if weight else value  # unweighted, as the official log
        elif self.task == "mffr":
            loss = torch.sqrt(out.float().sum(dim=1)).mean()
        else:
            loss = out.float().mean()
        logs[f"{self.task}_loss"] = loss.detach()
        return dict(loss=loss, logs=logs, count=self.count(batch))

    @torch.no_grad()
    def evaluate(self, batch: dict[str, Any]) -> dict[str, float]:
        """Per-batch sums in the model's current mode (call under eval): {'n', 'loss', 'correct', ...} as the
        official ``validate_<task>`` accumulates them (see :func:`summarize_validation`)."""
        batch = self._batch(batch)
        t = self.task
        if t == "mlm":
            scores = self.model(batch, task="mlm", compute_loss=False).float()
            labels = batch["txt_labels"]
            return {"n": labels.numel(), "loss": float(F.cross_entropy(scores, labels, reduction="sum")),
                    "correct": float((scores.argmax(-1) == labels).sum())}
        if t == "mffr":
            pred = self.model(batch, task="mffr", compute_loss=False).float()
            tgt = batch["feat_targets"].float()
            return {"n": pred.shape[0], "loss": float(((pred - tgt) ** 2).sum(1).sqrt().sum()),
                    "cosine": float(F.cosine_similarity(pred, tgt, dim=-1).sum())}
        if t == "mfm-nce":
            pred, neg = self.model(batch, task="mfm-nce", compute_loss=False)
            tgt = batch["feat_targets"].to(pred.dtype)
            logits = torch.cat([pred @ tgt.t(), pred @ neg.t()], dim=1).float() / self.model.v_encoder.nce_temp
            labels = torch.arange(pred.shape[0], device=logits.device)
            return {"n": pred.shape[0], "loss": float(F.cross_entropy(logits, labels, reduction="sum")),
                    "correct": float((logits.argmax(-1) == labels).sum())}
        if t == "fom":
            scores = self.model(batch, task="fom", compute_loss=False).float()
            tgt = batch["targets"].reshape(scores.shape[0])
            keep = tgt != -1
            s, y = scores[keep], tgt[keep].long()
            return {"n": int(keep.sum()), "loss": float(F.cross_entropy(s, y, reduction="sum")),
                    "correct": float((s.argmax(-1) == y).sum())}
        return self._evaluate_vsm(batch)

    def _evaluate_vsm(self, batch: dict[str, Any]) -> dict[str, float]:
        scores, st, ed = self.model(batch, task="vsm", compute_loss=False)
        n_q = int(batch["query_input_ids"].shape[0])
        out: dict[str, float] = {"n": n_q}
        q_vidx = batch.get("q_vidx")
        own = (torch.as_tensor(q_vidx, device=batch["c_v_feats"].device).long() if q_vidx is not None
               else torch.arange(n_q, device=batch["c_v_feats"].device))
        if scores is not None:
            out["r1"] = float((scores.argmax(1) == own).sum())
        if st is not None:
            if st.dim() == 3:
                rows = torch.arange(n_q, device=st.device)
                st, ed = st[rows, own], ed[rows, own]
            tgt = batch["targets"].long()
            valid = tgt[:, 0] != -1
            out["n_span"] = float(valid.sum())
            out["st_correct"] = float(((st.argmax(-1) == tgt[:, 0]) & valid).sum())
            out["ed_correct"] = float(((ed.argmax(-1) == tgt[:, 1]) & valid).sum())
        return out

    def adversarial_view(self) -> HeroPretrainView:
        """The VILLA view (mlm, mfm-nce, mffr, fom; see the module docstring)."""
        if self.task == "vsm":
            raise TypeError("fastvl.tasks.HeroPretrainTask: task 'vsm' has no adversarial view (its query text goes "
                            "through the same embeddings as the subtitles); train VILLA on mlm, mfm-nce, mffr or fom")
        return HeroPretrainView(self)


def hero_pretrain_tasks(model: nn.Module, names: list[str] | tuple[str, ...] = tuple(OFFICIAL_MIX)
                        ) -> dict[str, HeroPretrainTask]:
    """{name: HeroPretrainTask(model, name)} for each task name."""
    return {name: HeroPretrainTask(model, name) for name in names}


def summarize_validation(totals: dict[str, dict[str, float]]) -> dict[str, float]:
    """Validation metrics from each task's summed :meth:`HeroPretrainTask.evaluate` results (keyed by task)."""
    out: dict[str, float] = {}
    for task, t in totals.items():
        n = max(t.get("n", 0), 1)
        if task == "vsm":
            if "r1" in t:
                out["vsm_r1"] = t["r1"] / n
            if t.get("n_span"):
                out["vsm_st_acc"] = t["st_correct"] / t["n_span"]
                out["vsm_ed_acc"] = t["ed_correct"] / t["n_span"]
            continue
        if task == "mffr":
            out["mffr_l2"] = t["loss"] / n
            out["mffr_cosine"] = t["cosine"] / n
            continue
        out[f"{task}_loss"] = t["loss"] / n
        out[f"{task}_acc"] = t["correct"] / n
    return out


# ----------------------------------------------------------------------------------------------------------------
# VILLA view
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class HeroAdvInputs:
    """What the perturbation builder reads of a HERO micro-batch: the packed subtitle tokens and segment frames.

    input_ids [T_txt], img_feat [T_frm, D] (packed segment order); txt_lens / img_lens per segment (Python ints);
    raw: the official collate dict.
    """

    input_ids: torch.Tensor
    img_feat: torch.Tensor
    txt_lens: list[int]
    img_lens: list[int]
    raw: dict[str, Any]

    def cu_seqlens(self, kind: str) -> torch.Tensor:
        lens = self.txt_lens if kind == "txt" else self.img_lens
        out = torch.zeros(len(lens) + 1, dtype=torch.int32, device=self.input_ids.device)
        out[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int32, device=self.input_ids.device), 0)
        return out


@dataclass
class _HeroCtx:
    batch: HeroAdvInputs
    raw: dict[str, Any]
    seg_grid: torch.Tensor | None  # [T_frm] frame-grid row of each packed segment frame (-1: none)
    grid_shape: tuple[int, int] | None
    fom_keep: torch.Tensor | None


class HeroPretrainView:
    """:class:`~fastvl.tasks.base.AdvView` of a HERO pre-training task (see the module docstring)."""

    def __init__(self, task: HeroPretrainTask):
        self.task = task
        self.model = task.model
        self.hidden_size = int(self.model.config.f_config.hidden_size)

    def context(self, batch: dict[str, Any]) -> _HeroCtx:
        batch = self.task._batch(batch)
        t = self.task.task
        if t == "mlm":
            seg, layout, _ = mlm_layout(batch, "mlm")
            seg_grid = grid = None
        else:
            seg, layout = batch, HeroSegmentLayout.from_batch(batch)
            row2grid = torch.full((layout.total,), -1, dtype=torch.long, device=layout.frm_dst.device)
            row2grid[layout.fuse_src] = layout.fuse_dst
            seg_grid = row2grid[layout.frm_dst]
            grid = tuple(batch["c_v_feats"].shape[:2])
        ids = seg["f_sub_input_ids"].reshape(-1).index_select(0, layout.txt_src)
        feats = seg["f_v_feats"]
        frames = feats.reshape(-1, feats.shape[-1]).index_select(0, layout.frm_src)
        keep = None
        if t == "fom":
            keep = (batch["targets"].reshape(-1) != -1).nonzero().squeeze(1)
        inputs = HeroAdvInputs(ids, frames, list(layout.txt_lens), list(layout.frm_lens), batch)
        return _HeroCtx(inputs, batch, seg_grid, grid, keep)

    @contextlib.contextmanager
    def _perturbed(self, ctx: _HeroCtx, txt_delta: torch.Tensor | None, img_delta: torch.Tensor | None):
        enc = self.model.v_encoder
        handles = []
        if txt_delta is not None:
            def add_txt(module, args, out):
                if out.shape != txt_delta.shape:
                    raise RuntimeError(f"fastvl.tasks.HeroPretrainView: word embeddings {tuple(out.shape)} do not "
                                       f"match the text perturbation {tuple(txt_delta.shape)}")
                return out + txt_delta.to(out.dtype)
            handles.append(enc.f_encoder.embeddings.word_embeddings.register_forward_hook(add_txt))
        if img_delta is not None:
            def add_frames(module, args):
                return (args[0] + img_delta.to(args[0].dtype), *args[1:])
            handles.append(enc.f_encoder.img_embeddings.register_forward_pre_hook(add_frames))
            if ctx.seg_grid is not None:
                ok = ctx.seg_grid >= 0
                b, L = ctx.grid_shape
                grid = img_delta.new_zeros(b * L, img_delta.shape[-1]).index_add(
                    0, ctx.seg_grid[ok], img_delta[ok]).view(b, L, -1)

                def add_grid(module, args):
                    return (args[0] + grid.to(args[0].dtype), *args[1:])
                handles.append(enc.frame_transform.register_forward_pre_hook(add_grid))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def forward(self, ctx: _HeroCtx, txt_delta: torch.Tensor | None, img_delta: torch.Tensor | None) -> AdvOutput:
        t, batch = self.task.task, ctx.raw
        with self._perturbed(ctx, txt_delta, img_delta):
            out = self.model(batch, task=t, compute_loss=False)
        if t == "mlm":
            pred = out.float()
            loss = F.cross_entropy(pred, batch["txt_labels"])
        elif t == "fom":
            pred = out.float().index_select(0, ctx.fom_keep)
            loss = F.cross_entropy(pred, batch["targets"].reshape(-1).index_select(0, ctx.fom_keep).long())
        elif t == "mfm-nce":
            feats, neg = out
            tgt = batch["feat_targets"].to(feats.dtype)
            pred = torch.cat([feats @ tgt.t(), feats @ neg.t()], dim=1).float() / self.model.v_encoder.nce_temp
            loss = F.cross_entropy(pred, torch.arange(feats.shape[0], device=pred.device))
        else:  # mffr
            pred = out.float()
            loss = ((pred - batch["feat_targets"].float()) ** 2).sum(1).sqrt().mean()
        return AdvOutput(loss, pred, {f"{t}_loss": loss.detach()})

    def consistency(self, pred: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        return consistency_loss("mse" if self.task.task == "mffr" else "kl", pred, clean)

    def count(self, batch: HeroAdvInputs | dict[str, Any]) -> int | torch.Tensor:
        return self.task.count(batch.raw if isinstance(batch, HeroAdvInputs) else batch)
