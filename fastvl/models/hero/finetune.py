"""HERO fine-tuning heads with the official class names and ``state_dict`` keys: ``HeroForVcmr`` (TVR / How2R /
DiDeMo moment retrieval; HeroForPretraining's keys), ``HeroForVideoQA`` (TVQA / How2QA: ``qa_pool``,
``qa_pred_head.*``, ``st_ed_pool``, ``st_ed_pred_head.*``) and ``HeroForViolin`` (``violin_pool``,
``violin_pred_head.*``). Each takes the official collate dict of its task (``vcmr_collate``,
``video_qa_collate``, ``violin_collate``) and returns what the official forward returns.

QA and VIOLIN append the question+answer (statement) text after the frames in the temporal transformer. The
official code runs it on the padded [frames ; text] grid; here the real frames and the real text tokens of every
example form one packed sequence (padded frame slots only ever meet -1e4-masked scores downstream, so they are
left at zero: outputs and gradients are unchanged).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .config import VideoModelConfig
from .layers import MLPLayer
from .layout import TextLayout, ragged_rows
from .model import HeroForPretraining, HeroModel
from .pretrain import require_key
from .vsm import mask_logits

__all__ = ["VCMR_TASKS", "HeroForVcmr", "HeroForVideoQA", "HeroForViolin", "encode_frames_with_text"]

VCMR_TASKS = ("tvr", "how2r", "didemo_video_sub", "didemo_video_only")


class HeroForVcmr(HeroForPretraining):
    """Video corpus moment retrieval (official ``model/vcmr.py``): HeroForPretraining's modules and keys;
    ``forward(batch, 'tvr' | 'how2r' | 'didemo_video_sub' | 'didemo_video_only')`` is the VSM forward on a
    ``vcmr_collate`` dict (keys ``query_input_ids``, ``query_pos_ids``, ``query_attn_masks``, ``targets``,
    ``q_vidx`` + the video keys)."""

    def forward(self, batch: dict[str, Any], task: str = "tvr", compute_loss: bool = True) -> Any:
        """See :meth:`fastvl.models.hero.vsm.VsmMethods.forward_vsm` (same returns)."""
        if task in VCMR_TASKS:
            return self.forward_vsm(batch, compute_loss, task)
        raise ValueError(f"fastvl.models.hero: HeroForVcmr task must be one of {list(VCMR_TASKS)}, got {task!r}")

    def get_pred_from_raw_query(self, frame_embeddings: torch.Tensor, c_attn_masks: torch.Tensor,
                                query_input_ids: torch.Tensor, query_pos_ids: torch.Tensor | None,
                                query_attn_masks: torch.Tensor, cross: bool = False,
                                val_gather_gpus: bool = False) -> tuple[torch.Tensor | None, ...]:
        """Retrieval inference: encode raw queries, then (q2video_scores [Nq, Nv] or None, st_prob, ed_prob)
        against the given (already encoded) videos, as the official method."""
        query = self.encode_txt_inputs(query_input_ids, query_pos_ids, query_attn_masks, attn_layer=self.q_feat_attn)
        st_prob, ed_prob = self.get_pred_from_mod_query(frame_embeddings, c_attn_masks, query, cross=cross)
        scores = None
        if self.lw_neg_ctx != 0 or self.lw_neg_q != 0:
            scores = self.get_video_level_scores(query, frame_embeddings, c_attn_masks, val_gather_gpus)
        return scores, st_prob, ed_prob


def _check_text_rows(batch: dict[str, Any], n_rows: int, ids_key: str, mask_key: str, task: str) -> None:
    ids, masks = batch[ids_key], batch[mask_key]
    if ids.dim() != 2 or masks.shape != ids.shape or ids.shape[0] != n_rows:
        raise ValueError(f"fastvl.models.hero: {task}: {ids_key} {tuple(ids.shape)} and {mask_key} "
                         f"{tuple(masks.shape)} must be [{n_rows}, L] (one text per video row of c_v_feats)")


def encode_frames_with_text(model: HeroModel, batch: dict[str, Any], ids_key: str, pos_key: str, mask_key: str,
                            task: str) -> torch.Tensor:
    """The official QA / VIOLIN encoding: fused frames (``forward_repr(encode_clip=False)``) -> temporal
    embeddings, the text embedded by the cross-modal embeddings (type row 1), [frames ; text] through the temporal
    transformer. Packed over the real frames and real text tokens of every row.

    Returns:
        [N, L, H] the frame outputs (zeros at padded frame slots).
    """
    ve = model.v_encoder
    ids = require_key(batch, ids_key, task)
    masks = require_key(batch, mask_key, task)
    fused, layout = ve.fuse(batch)  # [N, L, H]
    n, n_frm, hidden = fused.shape
    _check_text_rows(batch, n, ids_key, mask_key, task)
    txt = TextLayout.from_mask(masks, mask_key, allow_empty=True)
    emb = ve.c_encoder.embeddings
    frm_pos = layout.clip_rows % n_frm
    frames = emb.dropout(emb.LayerNorm(fused.reshape(n * n_frm, hidden).index_select(0, layout.clip_rows)
                                       + emb.position_embeddings(frm_pos)))
    text = ve.f_encoder.embed_txt_packed(ids, batch.get(pos_key), txt)
    device = fused.device
    clip_l = torch.tensor(layout.clip_lens, dtype=torch.long, device=device)
    txt_l = torch.tensor(txt.lens, dtype=torch.long, device=device)
    seq_l = clip_l + txt_l
    cu = torch.zeros(n + 1, dtype=torch.long, device=device)
    cu[1:] = torch.cumsum(seq_l, 0)
    frm_dst = ragged_rows(clip_l, cu[:-1])
    txt_dst = ragged_rows(txt_l, cu[:-1] + clip_l)
    x = frames.new_zeros(int(sum(layout.clip_lens)) + int(sum(txt.lens)), hidden)
    x = x.index_copy(0, frm_dst, frames).index_copy(0, txt_dst, text.to(x.dtype))
    max_len = max(a + b for a, b in zip(layout.clip_lens, txt.lens))
    out = ve.c_encoder.encoder(x, cu.to(torch.int32), max_len)
    video = out.new_zeros(n * n_frm, hidden).index_copy(0, layout.clip_rows, out.index_select(0, frm_dst))
    return video.view(n, n_frm, hidden)


class HeroForVideoQA(HeroModel):
    """Video QA (official ``model/videoQA.py``, TVQA / How2QA).

    Args: as HeroModel. Heads: ``qa_pool`` Linear(H, 1, no bias), ``qa_pred_head`` MLPLayer(H, 1), ``st_ed_pool``
    (a copy of qa_pool at init), ``st_ed_pred_head`` MLPLayer(H, 2).
    """

    def __init__(self, config: VideoModelConfig | str | Path | dict, vfeat_dim: int, max_frm_seq_len: int):
        super().__init__(config, vfeat_dim, max_frm_seq_len)
        hsz = self.config.c_config.hidden_size
        self.qa_pool = nn.Linear(hsz, 1, bias=False)
        self.qa_pred_head = MLPLayer(hsz, 1)
        self.st_ed_pool = copy.deepcopy(self.qa_pool)
        self.st_ed_pred_head = MLPLayer(hsz, 2)

    def get_modularized_video(self, frame_embeddings: torch.Tensor,
                              frame_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """frame_embeddings [Nv, Nq, L, D], frame_mask [Nv, Nq, L] -> (st_ed pooled [Nv, L, D] (softmax over the
        answers, as officially), qa pooled [Nv, Nq, D] (softmax over frames))."""
        st_ed = F.softmax(mask_logits(self.st_ed_pool(frame_embeddings), frame_mask.unsqueeze(-1)), dim=1)
        qa = F.softmax(mask_logits(self.qa_pool(frame_embeddings), frame_mask.unsqueeze(-1)), dim=2)
        st_ed_pooled = torch.einsum("vqlm,vqld->vlmd", st_ed, frame_embeddings)
        qa_pooled = torch.einsum("vqlm,vqld->vqmd", qa, frame_embeddings)
        return st_ed_pooled.squeeze(2), qa_pooled.squeeze(2)

    def forward(self, batch: dict[str, Any], task: str = "tvqa", compute_loss: bool = True) -> Any:
        """A ``video_qa_collate`` dict (every (video, answer) row with ``[</s>] q [</s>] a`` appended to its
        segments; keys ``qa_input_ids``, ``qa_pos_ids``, ``qa_attn_masks``, ``targets`` [Nq, 1],
        ``ts_targets`` [Nq, 2]) -> ``compute_loss``: (qa_loss, temporal_loss) scalars (CE mean, ignore -1;
        temporal = (start CE + end CE) / 2); else logits [Nq, n_answers]."""
        if task not in ("tvqa", "how2qa"):
            raise ValueError(f"fastvl.models.hero: HeroForVideoQA task must be 'tvqa' or 'how2qa', got {task!r}")
        targets = require_key(batch, "targets", task).squeeze(-1)
        c_attn = require_key(batch, "c_attn_masks", task)
        video = encode_frames_with_text(self, batch, "qa_input_ids", "qa_pos_ids", "qa_attn_masks", task)
        n_q = targets.shape[0]
        n_rows, n_frm, hid = video.shape
        if n_q == 0 or n_rows % n_q:
            raise ValueError(f"fastvl.models.hero: {task}: {n_rows} (video, answer) rows do not split over "
                             f"{n_q} targets")
        video = video.view(n_q, -1, n_frm, hid)
        masks = c_attn.view(n_q, -1, n_frm).to(video.dtype)
        st_ed_pooled, qa_pooled = self.get_modularized_video(video, masks)
        pred_st_ed = self.st_ed_pred_head(st_ed_pooled)
        st_prob = mask_logits(pred_st_ed[:, :, 0], masks[:, 0])
        ed_prob = mask_logits(pred_st_ed[:, :, 1], masks[:, 0])
        logits = self.qa_pred_head(qa_pooled).squeeze(-1)
        if not compute_loss:
            return logits
        ts = require_key(batch, "ts_targets", task).long()
        n_frames = c_attn.view(n_q, -1, n_frm)[:, 0].ne(0).sum(1)
        if ts.shape != (n_q, 2):
            raise ValueError(f"fastvl.models.hero: {task}: ts_targets must be [{n_q}, 2], got {tuple(ts.shape)}")
        bad = (ts < -1) | (ts >= n_frames.unsqueeze(1))
        if bool(bad.any()):
            q = int(bad.any(1).nonzero()[0])
            raise ValueError(f"fastvl.models.hero: {task}: ts_targets[{q}] = {ts[q].tolist()} is a moment outside "
                             f"its video ({int(n_frames[q])} frames; -1 = ignore)")
        st_loss = F.cross_entropy(st_prob, ts[:, 0], reduction="mean", ignore_index=-1)
        ed_loss = F.cross_entropy(ed_prob, ts[:, 1], reduction="mean", ignore_index=-1)
        qa_loss = F.cross_entropy(logits, targets.long(), reduction="mean", ignore_index=-1)
        return qa_loss, (st_loss + ed_loss) / 2.0


class HeroForViolin(HeroModel):
    """VIOLIN video-and-language inference (official ``model/violin.py``).

    Heads: ``violin_pool`` Linear(H, 1, no bias) attention pooling over frames, ``violin_pred_head`` MLPLayer(H, 1).
    """

    def __init__(self, config: VideoModelConfig | str | Path | dict, vfeat_dim: int, max_frm_seq_len: int):
        super().__init__(config, vfeat_dim, max_frm_seq_len)
        hsz = self.config.c_config.hidden_size
        self.violin_pool = nn.Linear(hsz, 1, bias=False)
        self.violin_pred_head = MLPLayer(hsz, 1)

    def get_modularized_video(self, frame_embeddings: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """frame_embeddings [Nv, L, D], frame_mask [Nv, L] -> pooled [Nv, D]."""
        scores = F.softmax(mask_logits(self.violin_pool(frame_embeddings), frame_mask.unsqueeze(-1)), dim=1)
        return torch.einsum("vlm,vld->vmd", scores, frame_embeddings).squeeze(1)

    def forward(self, batch: dict[str, Any], task: str = "violin", compute_loss: bool = True) -> torch.Tensor:
        """A ``violin_collate`` dict (statement ``[</s>] + ids`` appended to every segment; keys ``q_input_ids``,
        ``q_pos_ids``, ``q_attn_masks``, ``targets`` [N, 1] in {0, 1}) -> ``compute_loss``: BCE of the sigmoid,
        mean (scalar); else logits [N, 1]."""
        if task != "violin":
            raise ValueError(f"fastvl.models.hero: HeroForViolin task must be 'violin', got {task!r}")
        c_attn = require_key(batch, "c_attn_masks", task)
        video = encode_frames_with_text(self, batch, "q_input_ids", "q_pos_ids", "q_attn_masks", task)
        pooled = self.get_modularized_video(video, c_attn.to(video.dtype))
        logits = self.violin_pred_head(pooled)
        if not compute_loss:
            return logits
        targets = require_key(batch, "targets", task)
        scores = torch.sigmoid(logits).squeeze(-1)
        return F.binary_cross_entropy(scores, targets.squeeze(-1).to(scores.dtype), reduction="mean")
