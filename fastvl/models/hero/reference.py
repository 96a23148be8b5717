"""A plain padded HERO ``repr`` forward, written the way the official code computes it, for the tests to compare
the packed model against. It reads the model's parameters and uses only PyTorch math: the official
``gather_index`` compaction of cat([frames, text]), additive -10000 attention masks over padded segments, the
per-subtitle Python loop that adds segment outputs onto frames, and the padded temporal transformer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.nn import functional as F

from .model import HierarchicalVlModel

__all__ = ["bert_layer_padded_reference", "cross_modal_padded_reference", "hero_fuse_reference", "hero_repr_reference",
           "temporal_padded_reference"]


def bert_layer_padded_reference(layer: torch.nn.Module, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
    """One official BertLayer on padded input: x [N, L, H], attn_mask [N, L] (1 real, 0 pad) -> [N, L, H]."""
    attn = layer.attention.self
    n, length, hidden = x.shape
    heads, dh = attn.num_attention_heads, attn.attention_head_size

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(n, length, heads, dh).permute(0, 2, 1, 3)

    q, k, v = split(attn.query(x)), split(attn.key(x)), split(attn.value(x))
    ext = (1.0 - attn_mask.to(x.dtype))[:, None, None, :] * -10000.0
    scores = q @ k.transpose(-1, -2) / math.sqrt(dh) + ext
    ctx = (scores.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(n, length, hidden)
    so = layer.attention.output
    a_out = F.layer_norm(so.dense(ctx) + x, (hidden,), so.LayerNorm.weight, so.LayerNorm.bias, so.LayerNorm.eps)
    inter = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(a_out))
    oo = layer.output
    return F.layer_norm(oo.dense(inter) + a_out, (hidden,), oo.LayerNorm.weight, oo.LayerNorm.bias, oo.LayerNorm.eps)


def cross_modal_padded_reference(f_encoder: torch.nn.Module, ids: torch.Tensor, txt_pos: torch.Tensor | None,
                                 feats: torch.Tensor, frm_pos: torch.Tensor | None, masks: torch.Tensor | None,
                                 gather_index: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
    """The official padded cross-modal pass: ids [N, Lt], feats [N, Lv, D], gather_index / attn_mask [N, Lg]
    (text then frames embedded, cat([img, txt]) compacted with gather_index, padded layers) -> [N, Lg, H]."""
    n_seg, max_sl = ids.shape
    max_vl = feats.shape[1]
    emb = f_encoder.embeddings
    if txt_pos is None:
        txt_pos = torch.arange(max_sl).clamp(max=511).unsqueeze(0)
    type_row = emb.token_type_embeddings.weight[1]
    txt = emb.LayerNorm(emb.word_embeddings(ids) + emb.position_embeddings(txt_pos) + type_row)
    ie = f_encoder.img_embeddings
    f_in = feats if masks is None else feats + ie.mask_embedding(masks.long())
    if frm_pos is None:
        frm_pos = torch.arange(max_vl).unsqueeze(0)
    img = ie.LayerNorm(ie.img_linear(ie.img_LayerNorm(f_in)) + ie.position_embeddings(frm_pos) + type_row)
    gather = gather_index.unsqueeze(-1).expand(-1, -1, txt.shape[-1])
    x = torch.gather(torch.cat([img, txt], dim=1), 1, gather)
    for layer in f_encoder.encoder.layer:
        x = bert_layer_padded_reference(layer, x, attn_mask)
    return x


def hero_fuse_reference(v_encoder: HierarchicalVlModel, batch: dict[str, Any]) -> torch.Tensor:
    """The official ``forward_repr(encode_clip=False)``: frame_transform(c_v_feats) + the per-subtitle loop that
    adds segment outputs onto frames -> [B, max_frames, H]."""
    x = cross_modal_padded_reference(v_encoder.f_encoder, batch["f_sub_input_ids"], batch.get("f_sub_pos_ids"),
                                     batch["f_v_feats"], batch.get("f_v_pos_ids"), batch.get("f_v_masks"),
                                     batch["f_gather_index"], batch["f_attn_masks"])
    c_feats = batch["c_v_feats"]
    n_vid, n_frm = c_feats.shape[:2]
    matched = torch.zeros(n_vid, n_frm, x.shape[-1], dtype=x.dtype)
    start = 0
    for vid, num_sub in enumerate(batch["num_subs"]):
        segs = x[start:start + num_sub]
        for sid, frames in batch["sub_idx2frame_idx"][vid]:
            if len(frames) == 0:
                continue
            idx = torch.tensor(frames, dtype=torch.long)
            matched[vid, idx] = matched[vid, idx] + segs[sid, :len(frames)]
        start += num_sub
    ft = v_encoder.frame_transform
    return torch.relu(ft.net[1](ft.LayerNorm(c_feats))) + matched


def temporal_padded_reference(c_encoder: torch.nn.Module, frames: torch.Tensor,
                              c_attn_masks: torch.Tensor) -> torch.Tensor:
    """The official padded temporal transformer (positions arange): frames [B, L, H], masks [B, L] -> [B, L, H]."""
    n_frm = frames.shape[1]
    y = c_encoder.embeddings.LayerNorm(frames + c_encoder.embeddings.position_embeddings(
        torch.arange(n_frm).unsqueeze(0)))
    for layer in c_encoder.encoder.layer:
        y = bert_layer_padded_reference(layer, y, c_attn_masks)
    return y


def hero_repr_reference(v_encoder: HierarchicalVlModel, batch: dict[str, Any]) -> torch.Tensor:
    """The official ``HierarchicalVlModel.forward_repr`` (eval mode, no dropout), padded: -> [B, max_frames, H]."""
    return temporal_padded_reference(v_encoder.c_encoder, hero_fuse_reference(v_encoder, batch),
                                     batch["c_attn_masks"])
