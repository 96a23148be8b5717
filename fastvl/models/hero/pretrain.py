"""HERO pre-training task forwards on packed segments: MLM, MFFR, MFM-NCE and FOM.

Each function takes the official collate dict of its task (``mlm_collate``, ``mfm_collate``, ``fom_collate``;
extra keys are ignored) and returns what the official ``HierarchicalVlModel`` / ``CrossModalTrm`` task forward
returns, in train and in eval mode (``f_encoder`` / ``v_encoder`` arguments are the model's ``CrossModalTrm`` /
``HierarchicalVlModel``, typed as ``nn.Module`` since model.py imports this module):

- ``mlm``: per masked token the cross-entropy [n_masked] (``compute_loss``) or the scores [n_masked, V]. Every
  subtitle segment of the batch is its own example; all of them run as ONE packed varlen set through the
  cross-modal transformer, and only the masked rows go through the head (tied decoder, fused linear + CE).
- ``mffr``: the elementwise squared error [n_masked_frames, D] (``F.mse_loss(..., reduction='none')``) or the
  predicted features [n_masked_frames, D].
- ``mfm-nce``: per masked frame the NCE loss [n_masked_frames] whose negatives are the head outputs at EVERY
  unmasked slot of the padded [B, max_frames] grid (padding slots of shorter videos included), or the pair
  (predicted features [n_masked, D], negative features [n_unmasked_slots, D]).
- ``fom``: the mean cross-entropy (ignore_index -1) or the logits [B * max_frames, max_clip_len].

The official MFM code zeroes ``batch['c_v_feats']`` in place; here the masking is out of place (the caller's
tensor is left alone; outputs and gradients are the same).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ...ops.linear_cross_entropy import fused_linear_cross_entropy
from ...ops.masked_regression import fused_masked_regression
from .layout import HeroSegmentLayout, ragged_rows

__all__ = ["HeroBatchKeyError", "PRETRAIN_TASKS", "forward_fom", "forward_mfm", "forward_mlm", "mlm_layout",
           "require_key"]

PRETRAIN_TASKS = ("mlm", "mffr", "mfm-nce", "fom")


class HeroBatchKeyError(KeyError, ValueError):
    """A task's batch lacks a key the official collate provides (both a KeyError and a ValueError)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def require_key(batch: dict[str, Any], key: str, task: str) -> Any:
    """``batch[key]``, or a :class:`HeroBatchKeyError` naming the task and the key when it is missing / None."""
    value = batch.get(key)
    if value is None:
        raise HeroBatchKeyError(f"fastvl.models.hero: task {task!r} needs the batch key {key!r} (the official "
                                f"collate dict of that task is expected)")
    return value


def mlm_layout(batch: dict[str, Any], task: str = "mlm") -> tuple[dict[str, Any], HeroSegmentLayout, torch.Tensor]:
    """The packed layout of an official ``mlm_collate`` dict.

    Per example row i (frames first, then ``[<s>] + ids``): the text length is the number of attended-span slots
    whose ``gather_index`` points into the text part (>= max_vl), the frame slots the rest of the span, the real
    frames ``attn_masks.sum - text`` (0 for a subtitle without frames, whose single zero frame has attention 0).

    Returns:
        (segment batch with the ``f_*`` keys that ``CrossModalTrm.embed_packed`` reads, layout, masked_rows [n]
        int64: packed rows of the masked tokens in the official ``hidden[txt_mask_tgt]`` order).
    """
    ids = require_key(batch, "input_ids", task)
    feats = require_key(batch, "v_feat", task)
    attn = require_key(batch, "attn_masks", task)
    gather = require_key(batch, "gather_index", task)
    tgt_mask = require_key(batch, "txt_mask_tgt", task)
    n, width = attn.shape
    max_vl = feats.shape[1]
    if gather.shape != attn.shape or tgt_mask.shape != attn.shape or feats.shape[0] != n or ids.shape[0] != n:
        raise ValueError(f"fastvl.models.hero: mlm batch tensors disagree: input_ids {tuple(ids.shape)}, v_feat "
                         f"{tuple(feats.shape)}, attn_masks {tuple(attn.shape)}, gather_index "
                         f"{tuple(gather.shape)}, txt_mask_tgt {tuple(tgt_mask.shape)}")
    pos = torch.arange(1, width + 1, device=attn.device)
    span = (attn.ne(0).long() * pos).amax(1)  # attended span: frame slots + text
    is_txt = gather.ge(max_vl) & (pos - 1).unsqueeze(0).lt(span.unsqueeze(1))
    txt_t = is_txt.sum(1)
    slots_t = span - txt_t
    frm_t = attn.ne(0).sum(1) - txt_t
    txt_lens, slots, frm_lens = torch.stack([txt_t, slots_t, frm_t]).tolist()
    for i, (tl, ns, nf) in enumerate(zip(txt_lens, slots, frm_lens)):
        if tl < 1 or tl > ids.shape[1] or not (nf == ns or (nf == 0 and ns == 1)) or ns > max_vl:
            raise ValueError(f"fastvl.models.hero: mlm example {i} is not an official mlm_collate row (text "
                             f"{tl}, frame slots {ns}, attended frames {nf}, max_vl {max_vl})")
    device = ids.device
    as_long = dict(dtype=torch.long, device=device)
    frm_l = torch.tensor(frm_lens, **as_long)
    txt_l = torch.tensor(txt_lens, **as_long)
    seg_lens = frm_l + txt_l
    cu = torch.cat([seg_lens.new_zeros(1), torch.cumsum(seg_lens, 0)])
    seg_ids = torch.arange(n, **as_long)
    empty = torch.zeros(0, **as_long)
    layout = HeroSegmentLayout(
        frm_lens=frm_lens, txt_lens=txt_lens, clip_lens=[], cu_seqlens=cu.to(torch.int32),
        max_seqlen=max(a + b for a, b in zip(frm_lens, txt_lens)),
        frm_src=ragged_rows(frm_l, seg_ids * max_vl), txt_src=ragged_rows(txt_l, seg_ids * ids.shape[1]),
        frm_dst=ragged_rows(frm_l, cu[:-1]), txt_dst=ragged_rows(txt_l, cu[:-1] + frm_l),
        fuse_src=empty, fuse_dst=empty, clip_rows=empty, cu_clip=torch.zeros(1, dtype=torch.int32, device=device))
    row, col = tgt_mask.ne(0).nonzero(as_tuple=True)
    slots_d = torch.tensor(slots, **as_long)
    masked_rows = cu[row] + frm_l[row] + (col - slots_d[row])
    seg_batch = {"f_sub_input_ids": ids, "f_sub_pos_ids": require_key(batch, "position_ids", task), "f_v_feats": feats,
                 "f_v_pos_ids": batch.get("f_pos_ids")}
    return seg_batch, layout, masked_rows


def forward_mlm(f_encoder: nn.Module, batch: dict[str, Any], compute_loss: bool = True,
                task: str = "mlm") -> torch.Tensor:
    """Official ``CrossModalTrm.forward_mlm`` on an ``mlm_collate`` dict, packed.

    Returns:
        ``compute_loss``: CE per masked token [n_masked] (reduction none, in the model dtype); else the
        prediction scores [n_masked, V].
    """
    seg_batch, layout, masked_rows = mlm_layout(batch, task)
    hidden = f_encoder.forward_packed(seg_batch, layout)  # [T, H]
    head = f_encoder.lm_head
    h = head.LayerNorm(head.transform_act_fn(head.dense(hidden.index_select(0, masked_rows))))
    weight, bias = head.decoder.weight, head.bias
    if f_encoder.vocab_pad:
        weight, bias = weight[:-f_encoder.vocab_pad], bias[:-f_encoder.vocab_pad]
    if not compute_loss:
        return F.linear(h, weight) + bias
    labels = require_key(batch, "txt_labels", task)
    if labels.shape != (h.shape[0],):
        raise ValueError(f"fastvl.models.hero: txt_labels must be [{h.shape[0]}] (one per masked token of "
                         f"txt_mask_tgt), got {tuple(labels.shape)}")
    loss = fused_linear_cross_entropy(h, weight, bias, labels, ignore_index=-100, reduction="none")
    return loss.to(h.dtype)


def forward_mfm(v_encoder: nn.Module, batch: dict[str, Any], compute_loss: bool = True,
                loss: str = "regression") -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Official ``HierarchicalVlModel.forward_mfm`` (``loss='regression'``: MFFR, ``'nce'``: MFM-NCE).

    The masked frames are zeroed and ``mask_embedding(c_v_masks)`` is added to EVERY slot (row 0 is not zero), the
    batch runs through the packed 'repr' forward, and the regression head reads the [B, L] grid.

    Returns:
        regression: loss [n, D] (elementwise squared error) or predictions [n, D]; nce: loss [n] or
        (predictions [n, D], negatives [B * L - n, D]). n = masked frames.
    """
    task = "mffr" if loss == "regression" else "mfm-nce"
    c_feats = require_key(batch, "c_v_feats", task)
    c_mask = require_key(batch, "c_v_masks", task).bool()
    if c_mask.shape != c_feats.shape[:2]:
        raise ValueError(f"fastvl.models.hero: c_v_masks must be {tuple(c_feats.shape[:2])} (c_v_feats[:2]), "
                         f"got {tuple(c_mask.shape)}")
    masked_feats = c_feats.masked_fill(c_mask.unsqueeze(-1), 0) + v_encoder.mask_embedding(c_mask.long())
    clip = v_encoder.forward_repr({**batch, "c_v_feats": masked_feats})  # [B, L, H]
    flat = clip.reshape(-1, clip.shape[-1])
    flat_mask = c_mask.reshape(-1)
    pos_rows = flat_mask.nonzero().squeeze(1)
    net = v_encoder.feat_regress.net
    if loss == "regression":
        if compute_loss:
            targets = require_key(batch, "feat_targets", task)
            trunk = net[:3](flat.index_select(0, pos_rows))
            out = fused_masked_regression(trunk, net[3].weight.t(), net[3].bias, targets, reduction="none",
                                          loss="mse")
            return out.to(clip.dtype)
        return v_encoder.feat_regress(flat.index_select(0, pos_rows))
    pred_all = v_encoder.feat_regress(flat)  # every slot once: the masked rows and the negatives
    pred = pred_all.index_select(0, pos_rows)
    neg = pred_all.index_select(0, (~flat_mask).nonzero().squeeze(1))
    if not compute_loss:
        return pred, neg
    targets = require_key(batch, "feat_targets", task)
    logits = torch.cat([pred @ targets.t().to(pred.dtype), pred @ neg.t()], dim=1).float()
    labels = torch.arange(pred.shape[0], device=logits.device)
    return F.cross_entropy(logits / v_encoder.nce_temp, labels, reduction="none")


def forward_fom(v_encoder: nn.Module, batch: dict[str, Any], compute_loss: bool = True) -> torch.Tensor:
    """Official ``HierarchicalVlModel.forward_fom``: fused frames scattered to ``shuffled_orders`` (positions stay
    arange), the temporal transformer, the FOM head on every slot.

    Returns:
        ``compute_loss``: scalar mean CE over targets != -1; else logits [B * L, max_clip_len].
    """
    orders = require_key(batch, "shuffled_orders", "fom")
    targets = require_key(batch, "targets", "fom") if compute_loss else None
    fused, layout = v_encoder.fuse(batch)  # [B, L, H]
    if orders.shape != fused.shape[:2]:
        raise ValueError(f"fastvl.models.hero: shuffled_orders must be {tuple(fused.shape[:2])} (c_v_feats[:2]), "
                         f"got {tuple(orders.shape)}")
    shuffled = torch.zeros_like(fused).scatter(1, orders.long().unsqueeze(-1).expand_as(fused), fused)
    encoded = v_encoder.c_encoder(shuffled, layout)
    logits = v_encoder.fom_output(encoded.reshape(-1, encoded.shape[-1]))
    if not compute_loss:
        return logits
    return F.cross_entropy(logits, targets.reshape(logits.shape[0]).long(), ignore_index=-1, reduction="mean")
