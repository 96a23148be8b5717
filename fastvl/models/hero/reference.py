"""Plain padded HERO forwards, written the way the official code computes them, for the tests and benchmarks to
compare the packed model against. They read the model's parameters and use only PyTorch math: the official
``gather_index`` compaction of cat([frames, text]), additive -10000 attention masks over padded segments, the
per-subtitle Python loop that adds segment outputs onto frames, the padded temporal transformer, the query
encoder, VSM (every query against every video, the 999-masked positives, sorted negatives), the QA / VIOLIN
[frames ; text] temporal pass and heads, and the TVC decoder with its triangular mask.
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch
from torch.nn import functional as F

from .model import HierarchicalVlModel

__all__ = ["bert_attention_padded_reference", "bert_layer_padded_reference", "cross_modal_padded_reference",
           "hero_fuse_reference", "hero_repr_reference", "query_encoder_reference", "temporal_padded_reference",
           "tvc_reference", "txt_padded_reference", "video_qa_reference", "violin_reference", "vsm_reference"]


def _mha_padded(attn: torch.nn.Module, q_in: torch.Tensor, kv_in: torch.Tensor,
                additive: torch.Tensor) -> torch.Tensor:
    """Official BertSelfAttention math (no dropout): q_in [N, Lq, H], kv_in [N, Lk, H], additive mask
    broadcastable to [N, heads, Lq, Lk] -> context [N, Lq, H]."""
    n, lq, hidden = q_in.shape
    heads, dh = attn.num_attention_heads, attn.attention_head_size

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(n, t.shape[1], heads, dh).permute(0, 2, 1, 3)

    q, k, v = split(attn.query(q_in)), split(attn.key(kv_in)), split(attn.value(kv_in))
    probs = (q @ k.transpose(-1, -2) / math.sqrt(dh) + additive).softmax(-1)
    return (probs @ v).permute(0, 2, 1, 3).reshape(n, lq, hidden)


def _add_norm(mod: torch.nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """LayerNorm(dense(x) + residual) with the module's parameters (BertSelfOutput / BertOutput, no dropout)."""
    ln = mod.LayerNorm
    return F.layer_norm(mod.dense(x) + residual, (residual.shape[-1],), ln.weight, ln.bias, ln.eps)


def bert_attention_padded_reference(attention: torch.nn.Module, x: torch.Tensor,
                                    attn_mask: torch.Tensor) -> torch.Tensor:
    """One official BertAttention (self + output add&norm) on padded input: x [N, L, H], attn_mask [N, L]."""
    ext = (1.0 - attn_mask.to(x.dtype))[:, None, None, :] * -10000.0
    return _add_norm(attention.output, _mha_padded(attention.self, x, x, ext), x)


def bert_layer_padded_reference(layer: torch.nn.Module, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
    """One official BertLayer on padded input: x [N, L, H], attn_mask [N, L] (1 real, 0 pad) -> [N, L, H]."""
    a_out = bert_attention_padded_reference(layer.attention, x, attn_mask)
    return _add_norm(layer.output, layer.intermediate.intermediate_act_fn(layer.intermediate.dense(a_out)), a_out)


def cross_modal_padded_reference(f_encoder: torch.nn.Module, ids: torch.Tensor, txt_pos: torch.Tensor | None,
                                 feats: torch.Tensor, frm_pos: torch.Tensor | None, masks: torch.Tensor | None,
                                 gather_index: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
    """The official padded cross-modal pass: ids [N, Lt], feats [N, Lv, D], gather_index / attn_mask [N, Lg]
    (text then frames embedded, cat([img, txt]) compacted with gather_index, padded layers) -> [N, Lg, H]."""
    n_seg, max_sl = ids.shape
    max_vl = feats.shape[1]
    emb = f_encoder.embeddings
    if txt_pos is None:
        txt_pos = torch.arange(max_sl, device=ids.device).clamp(max=511).unsqueeze(0)
    type_row = emb.token_type_embeddings.weight[1]
    txt = emb.LayerNorm(emb.word_embeddings(ids) + emb.position_embeddings(txt_pos) + type_row)
    ie = f_encoder.img_embeddings
    f_in = feats if masks is None else feats + ie.mask_embedding(masks.long())
    if frm_pos is None:
        frm_pos = torch.arange(max_vl, device=feats.device).unsqueeze(0)
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
    matched = torch.zeros(n_vid, n_frm, x.shape[-1], dtype=x.dtype, device=x.device)
    start = 0
    for vid, num_sub in enumerate(batch["num_subs"]):
        segs = x[start:start + num_sub]
        for sid, frames in batch["sub_idx2frame_idx"][vid]:
            if len(frames) == 0:
                continue
            idx = torch.tensor(frames, dtype=torch.long, device=x.device)
            matched[vid, idx] = matched[vid, idx] + segs[sid, :len(frames)]
        start += num_sub
    ft = v_encoder.frame_transform
    return torch.relu(ft.net[1](ft.LayerNorm(c_feats))) + matched


def temporal_padded_reference(c_encoder: torch.nn.Module, frames: torch.Tensor,
                              c_attn_masks: torch.Tensor) -> torch.Tensor:
    """The official padded temporal transformer (positions arange): frames [B, L, H], masks [B, L] -> [B, L, H]."""
    n_frm = frames.shape[1]
    y = c_encoder.embeddings.LayerNorm(frames + c_encoder.embeddings.position_embeddings(
        torch.arange(n_frm, device=frames.device).unsqueeze(0)))
    for layer in c_encoder.encoder.layer:
        y = bert_layer_padded_reference(layer, y, c_attn_masks)
    return y


def hero_repr_reference(v_encoder: HierarchicalVlModel, batch: dict[str, Any]) -> torch.Tensor:
    """The official ``HierarchicalVlModel.forward_repr`` (eval mode, no dropout), padded: -> [B, max_frames, H]."""
    return temporal_padded_reference(v_encoder.c_encoder, hero_fuse_reference(v_encoder, batch),
                                     batch["c_attn_masks"])


def _ln(mod: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), mod.weight, mod.bias, mod.eps)


def _txt_embed(f_encoder: torch.nn.Module, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    emb = f_encoder.embeddings
    x = emb.word_embeddings(ids) + emb.position_embeddings(pos) + emb.token_type_embeddings.weight[1]
    return _ln(emb.LayerNorm, x)


def _mask_logits(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x * mask + (1 - mask) * -1e4


def txt_padded_reference(f_encoder: torch.nn.Module, ids: torch.Tensor, pos: torch.Tensor,
                         attn_mask: torch.Tensor) -> torch.Tensor:
    """The official CrossModalTrm 'txt' pass: ids / attn_mask [N, L], pos [1 or N, L] -> [N, L, H]."""
    x = _txt_embed(f_encoder, ids, pos)
    for layer in f_encoder.encoder.layer:
        x = bert_layer_padded_reference(layer, x, attn_mask)
    return x


def query_encoder_reference(q_feat_attn: torch.nn.Module, feat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The official QueryFeatEncoder: feat [N, L, D], mask [N, L] -> [N, H] (modularized)."""
    proj = q_feat_attn.query_input_proj
    x = torch.relu(proj.net[1](_ln(proj.LayerNorm, feat)))
    pe = q_feat_attn.query_pos_embed
    x = _ln(pe.LayerNorm, x + pe.position_embeddings(torch.arange(x.shape[1], device=x.device).unsqueeze(0)))
    m = mask.to(x.dtype)
    att = bert_attention_padded_reference(q_feat_attn.query_self_attention, x, m)
    w = F.softmax(_mask_logits(q_feat_attn.modular_vector_mapping(att), m.unsqueeze(2)), dim=1)  # [N, L, 1]
    return torch.einsum("blm,bld->bmd", w, att)[:, 0]


def _ranking(model: torch.nn.Module, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    if model.ranking_loss_type == "hinge":
        return torch.clamp(model.margin + neg - pos, min=0)
    return torch.log1p(torch.exp(neg - pos))


def _hard(model: torch.nn.Module, loss: torch.Tensor) -> torch.Tensor:
    w = torch.ones_like(loss)
    w[:, model.hard_pool_size:] = .1
    w[:, :model.hard_pool_size] = model.hard_neg_weight
    return w * loss


def _sampled_neg(model: torch.nn.Module, masked: torch.Tensor, min_idx: int) -> torch.Tensor:
    bsz, size = masked.shape
    rows = torch.arange(bsz, device=masked.device)
    order = torch.sort(masked, descending=True, dim=1)[1]
    top = min(min_idx + model.hard_pool_size, size) if model.use_hard_negative else size
    return masked[rows, order[rows, torch.randint(min_idx, top, size=(bsz,)).to(masked.device)]]


def _video_level_loss(model: torch.nn.Module, scores: torch.Tensor, reduction: str):
    """The official get_video_level_loss, loop for loop."""
    bsz_q, bsz_v = scores.shape
    per = int(bsz_q / bsz_v)
    if bsz_v == 1:
        return scores.new_zeros(()), scores.new_zeros(())
    masked = scores.clone()
    pos = []
    for i, j in zip(range(bsz_v), range(0, bsz_q, per)):
        pos.append(scores[j:j + per, i])
        masked[j:j + per, i] = 999
    pos_vq = torch.stack(pos, dim=0)
    vq_masked = masked.transpose(0, 1)
    pos_qv = pos_vq.view(bsz_q, 1)
    if model.use_all_neg:
        l_ctx = _ranking(model, pos_qv, torch.sort(masked, descending=True, dim=1)[0][:, 1:])
        if model.use_hard_negative:
            l_ctx = _hard(model, l_ctx)
        neg_q = torch.sort(vq_masked, descending=True, dim=1)[0][:, per:].unsqueeze(1)
        l_q = _ranking(model, pos_vq.unsqueeze(-1), neg_q)
        l_q = l_q.view(-1, l_q.size(2))
        if model.use_hard_negative:
            l_q = _hard(model, l_q)
    else:
        l_ctx = _ranking(model, pos_qv, _sampled_neg(model, masked, 1).unsqueeze(-1))
        l_q = _ranking(model, pos_vq, _sampled_neg(model, vq_masked, per).unsqueeze(-1))
    if reduction == "sum":
        return l_ctx.mean(1), l_q.mean(1)
    return l_ctx.mean(1).mean(0), l_q.mean(1).mean(0)


def vsm_reference(model: torch.nn.Module, batch: dict[str, Any], compute_loss: bool = True):
    """The official ``HeroForPretraining.forward(batch, 'vsm', compute_loss)`` (no dropout; one process)."""
    ve = model.v_encoder
    frames = hero_repr_reference(ve, batch)
    q_mask = batch["query_attn_masks"]
    tok = txt_padded_reference(ve.f_encoder, batch["query_input_ids"], batch["query_pos_ids"], q_mask)
    mq = query_encoder_reference(model.q_feat_attn, tok, q_mask)
    c_mask = batch["c_attn_masks"].to(frames.dtype)
    st = ed = scores = None
    if model.lw_st_ed != 0:
        prob = random.random()
        if prob > model.drop_svmr_prob or not model.training:
            query = model.video_query_linear(mq)
            n_q, n_v = mq.shape[0], frames.shape[0]
            if n_q != n_v:
                sim = torch.einsum("md,nld->mnl", query, frames)
                length = sim.shape[2]
                st = model.video_st_predictor(sim.view(n_q * n_v, 1, length)).view(n_q, n_v, length)
                ed = model.video_ed_predictor(sim.view(n_q * n_v, 1, length)).view(n_q, n_v, length)
                cm = c_mask.unsqueeze(0)
            else:
                sim = torch.einsum("bd,bld->bl", query, frames)
                st = model.video_st_predictor(sim.unsqueeze(1))[:, 0]
                ed = model.video_ed_predictor(sim.unsqueeze(1))[:, 0]
                cm = c_mask
            st, ed = _mask_logits(st, cm), _mask_logits(ed, cm)
    if model.lw_neg_ctx != 0 or model.lw_neg_q != 0:
        qn = F.normalize(mq, dim=-1, eps=1e-5)
        cn = F.normalize(frames, dim=-1, eps=1e-5)
        sc = torch.einsum("md,nld->mln", qn, cn)
        scores = _mask_logits(sc, c_mask.transpose(0, 1).unsqueeze(0)).max(dim=1)[0]
    if not compute_loss:
        return scores, st, ed
    zeros = torch.zeros(1, dtype=frames.dtype, device=frames.device)
    loss_st_ed, loss_ctx, loss_q = zeros, zeros, zeros
    reduction = "mean" if model.training else "sum"
    targets = batch["targets"]
    if st is not None:
        if st.dim() == 3:
            rows = torch.arange(len(st), device=st.device)
            st, ed = st[rows, batch["q_vidx"]], ed[rows, batch["q_vidx"]]
        loss_st_ed = (F.cross_entropy(st, targets[:, 0].long(), reduction=reduction, ignore_index=-1)
                      + F.cross_entropy(ed, targets[:, 1].long(), reduction=reduction, ignore_index=-1))
    if scores is not None:
        loss_ctx, loss_q = _video_level_loss(model, scores, reduction)
    return model.lw_st_ed * loss_st_ed, model.lw_neg_ctx * loss_ctx, model.lw_neg_q * loss_q


def _frames_with_text_reference(model: torch.nn.Module, batch: dict[str, Any], prefix: str) -> torch.Tensor:
    """Official QA / VIOLIN temporal pass over padded [frames ; text] -> the frame part [N, L, H]."""
    ve = model.v_encoder
    fused = hero_fuse_reference(ve, batch)
    n_frm = fused.shape[1]
    emb = ve.c_encoder.embeddings
    frames = _ln(emb.LayerNorm, fused + emb.position_embeddings(torch.arange(n_frm, device=fused.device).unsqueeze(0)))
    text = _txt_embed(ve.f_encoder, batch[f"{prefix}_input_ids"], batch[f"{prefix}_pos_ids"])
    x = torch.cat([frames, text], dim=1)
    mask = torch.cat([batch["c_attn_masks"], batch[f"{prefix}_attn_masks"]], dim=1)
    for layer in ve.c_encoder.encoder.layer:
        x = bert_layer_padded_reference(layer, x, mask)
    return x[:, :n_frm]


def _mlp(head: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return head.linear_2(_ln(head.LayerNorm, F.gelu(head.linear_1(x))))


def video_qa_reference(model: torch.nn.Module, batch: dict[str, Any], compute_loss: bool = True):
    """The official ``HeroForVideoQA.forward(batch, 'tvqa', compute_loss)`` (no dropout)."""
    targets = batch["targets"].squeeze(-1)
    video = _frames_with_text_reference(model, batch, "qa")
    n_q = len(targets)
    n_frm, hid = video.shape[1:3]
    video = video.reshape(n_q, -1, n_frm, hid)
    masks = batch["c_attn_masks"].view(n_q, -1, n_frm).to(video.dtype)
    st_ed = F.softmax(_mask_logits(model.st_ed_pool(video), masks.unsqueeze(-1)), dim=1)
    qa = F.softmax(_mask_logits(model.qa_pool(video), masks.unsqueeze(-1)), dim=2)
    st_ed_pooled = torch.einsum("vqlm,vqld->vlmd", st_ed, video).squeeze(2)
    qa_pooled = torch.einsum("vqlm,vqld->vqmd", qa, video).squeeze(2)
    pred = _mlp(model.st_ed_pred_head, st_ed_pooled)
    st_prob = _mask_logits(pred[:, :, 0], masks[:, 0])
    ed_prob = _mask_logits(pred[:, :, 1], masks[:, 0])
    logits = _mlp(model.qa_pred_head, qa_pooled).squeeze(-1)
    if not compute_loss:
        return logits
    ts = batch["ts_targets"]
    temporal = (F.cross_entropy(st_prob, ts[:, 0], ignore_index=-1)
                + F.cross_entropy(ed_prob, ts[:, 1], ignore_index=-1)) / 2.
    return F.cross_entropy(logits, targets, ignore_index=-1), temporal


def violin_reference(model: torch.nn.Module, batch: dict[str, Any], compute_loss: bool = True):
    """The official ``HeroForViolin.forward(batch, 'violin', compute_loss)`` (no dropout)."""
    video = _frames_with_text_reference(model, batch, "q")
    masks = batch["c_attn_masks"].to(video.dtype)
    w = F.softmax(_mask_logits(model.violin_pool(video), masks.unsqueeze(-1)), dim=1)
    logits = _mlp(model.violin_pred_head, torch.einsum("vlm,vld->vmd", w, video).squeeze(1))
    if not compute_loss:
        return logits
    scores = torch.sigmoid(logits).squeeze(-1)
    return F.binary_cross_entropy(scores, batch["targets"].squeeze(-1).to(scores.dtype))


def tvc_reference(model: torch.nn.Module, batch: dict[str, Any], compute_loss: bool = True) -> torch.Tensor:
    """The official ``HeroForTvc.forward(batch)`` (padded segments, triangular self-attention mask, no dropout)."""
    frames = hero_repr_reference(model.v_encoder, batch)
    segs = [frames[i, st:ed] for i, ranges in enumerate(batch["clip_ranges"]) for st, ed in ranges]
    enc = frames.new_zeros(len(segs), max(t.shape[0] for t in segs), frames.shape[-1])
    for i, t in enumerate(segs):
        enc[i, :t.shape[0]] = t
    ids = batch["cap_input_ids"]
    f_enc = model.v_encoder.f_encoder
    x = f_enc.embeddings.word_embeddings(ids) + model.position_embeddings(batch["cap_pos_ids"])
    x = _ln(model.emb_LayerNorm, x)
    length = ids.shape[1]
    tri = ((1.0 - torch.tril(torch.ones(length, length, device=x.device))) * -10000.0).to(x.dtype)[None, None]
    enc_ext = (1.0 - batch["cap_attn_mask"].to(x.dtype))[:, None, None, :] * -10000.0
    for layer in model.decoder.layer:
        a = _add_norm(layer.add_norm_1, _mha_padded(layer.self_attention, x, x, tri), x)
        c = _add_norm(layer.add_norm_2, _mha_padded(layer.dec_enc_attention, a, enc, enc_ext), a)
        x = _add_norm(layer.add_norm_3, layer.intermidiate.intermediate_act_fn(layer.intermidiate.dense(c)), c)
    head = f_enc.lm_head
    scores = head.decoder(_ln(head.LayerNorm, head.transform_act_fn(head.dense(x)))) + head.bias
    if not compute_loss:
        return scores
    vocab = model.config.f_config.vocab_size
    out, tgt = scores.view(-1, vocab), batch["cap_tgt_ids"].view(-1)
    if not hasattr(model.loss_func, "one_hot"):
        return F.cross_entropy(out, tgt, ignore_index=-1, reduction="none")
    valid = tgt != -1
    tgt, logp = tgt[valid], F.log_softmax(out[valid], dim=-1)
    prob = model.loss_func.one_hot.repeat(tgt.size(0), 1).to(logp.dtype)
    prob.scatter_(1, tgt.unsqueeze(1), model.loss_func.confidence)
    return F.kl_div(logp, prob, reduction="none").sum(dim=1)
