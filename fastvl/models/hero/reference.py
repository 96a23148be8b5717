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

__all__ = ["bert_layer_padded_reference", "hero_repr_reference"]


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


def hero_repr_reference(v_encoder: HierarchicalVlModel, batch: dict[str, Any]) -> torch.Tensor:
    """The official ``HierarchicalVlModel.forward_repr`` (eval mode, no dropout), padded: -> [B, max_frames, H]."""
    fe = v_encoder.f_encoder
    ids, feats = batch["f_sub_input_ids"], batch["f_v_feats"]
    n_seg, max_sl = ids.shape
    max_vl = feats.shape[1]
    emb = fe.embeddings
    txt_pos = batch.get("f_sub_pos_ids")
    if txt_pos is None:
        txt_pos = torch.arange(max_sl).clamp(max=511).unsqueeze(0)
    type_row = emb.token_type_embeddings.weight[1]
    txt = emb.word_embeddings(ids) + emb.position_embeddings(txt_pos) + type_row
    txt = emb.LayerNorm(txt)
    ie = fe.img_embeddings
    f_in = feats
    if batch.get("f_v_masks") is not None:
        f_in = f_in + ie.mask_embedding(batch["f_v_masks"].long())
    frm_pos = batch.get("f_v_pos_ids")
    if frm_pos is None:
        frm_pos = torch.arange(max_vl).unsqueeze(0)
    img = ie.LayerNorm(ie.img_linear(ie.img_LayerNorm(f_in)) + ie.position_embeddings(frm_pos) + type_row)
    gather = batch["f_gather_index"].unsqueeze(-1).expand(-1, -1, txt.shape[-1])
    x = torch.gather(torch.cat([img, txt], dim=1), 1, gather)
    f_mask = batch["f_attn_masks"]
    for layer in fe.encoder.layer:
        x = bert_layer_padded_reference(layer, x, f_mask)
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
    y = torch.relu(ft.net[1](ft.LayerNorm(c_feats))) + matched
    ce = v_encoder.c_encoder
    y = ce.embeddings.LayerNorm(y + ce.embeddings.position_embeddings(torch.arange(n_frm).unsqueeze(0)))
    for layer in ce.encoder.layer:
        y = bert_layer_padded_reference(layer, y, batch["c_attn_masks"])
    return y
