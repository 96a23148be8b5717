"""Every attention map and hidden state of a two-stream LXMERT, per stream and cross layer, for probing.

:func:`lxmert_probe_forward` runs an :class:`~fastvl.models.lxmert.LxmertModel` module by module on its packed streams
(the same embeddings and layers as its ``forward``) with the attention op's ``return_probs`` path, and returns every
map the probes read: the language and object-relationship layers' self-attention, and per cross layer both
directions of the shared cross-attention (language -> vision, which the ``transformers`` port returns as
``cross_encoder_attentions``, and vision -> language) and both streams' self-attention. The model is left as it was
(modes restored module by module, no hooks, weights untouched).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..models.lxmert import LxmertModel, StreamDims
from ..ops import cross_modal_attention
from .extract import eval_mode

__all__ = ["LXMERT_BATCH_KEYS", "LxmertProbeOutputs", "lxmert_encoder_of", "lxmert_example_maps",
           "lxmert_probe_forward"]

LXMERT_BATCH_KEYS = ("input_ids", "visual_feats", "visual_pos", "attention_mask", "visual_attention_mask")


@dataclass
class LxmertProbeOutputs:
    """Per-layer maps of one padded LXMERT batch (Lt = ``input_ids`` width, N = regions width; 0 at padding).

    language [l_layers, B, heads, Lt, Lt]; vision [r_layers, B, heads, N, N]; cross_l2v [x_layers, B, heads, Lt, N];
    cross_v2l [x_layers, B, heads, N, Lt]; x_language [x_layers, B, heads, Lt, Lt] and x_vision [x_layers, B, heads,
    N, N] (the cross layers' self-attention); language_hidden [1 + l_layers + x_layers, B, Lt, H] (0: embeddings);
    vision_hidden [1 + r_layers + x_layers, B, N, H] (0: the visual feature encoder); txt_lens / img_lens.
    """

    language: torch.Tensor
    vision: torch.Tensor
    cross_l2v: torch.Tensor
    cross_v2l: torch.Tensor
    x_language: torch.Tensor
    x_vision: torch.Tensor
    language_hidden: torch.Tensor
    vision_hidden: torch.Tensor
    txt_lens: list[int]
    img_lens: list[int]


def lxmert_encoder_of(model: nn.Module) -> LxmertModel:
    """The LxmertModel inside ``model`` (itself, or its ``lxmert`` attribute as LxmertForPreTraining has)."""
    enc = getattr(model, "lxmert", model)
    if not isinstance(enc, LxmertModel):
        raise TypeError(f"fastvl.probe: argument 'model' must be an LxmertModel or a model with an 'lxmert' "
                        f"LxmertModel (LxmertForPreTraining), got {type(model).__name__}")
    return enc


def _attend(att, x_q, x_kv, cu_q, cu_k, max_q, max_k, mask):
    q = att.project_q(x_q)
    k, v = att.project_kv(x_kv)
    ctx, probs = cross_modal_attention(q, k, v, cu_q, cu_k, max_q, max_k, mask=mask, return_probs=True)
    return ctx.reshape(x_q.shape[0], -1), probs


def _self_block(block, x, cu, max_len):
    """A BertAttention (``self`` + ``output``) with its probabilities."""
    ctx, probs = _attend(block.self, x, x, cu, cu, max_len, max_len, "bidirectional")
    return block.output(ctx, x), probs


@torch.no_grad()
def lxmert_probe_forward(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> LxmertProbeOutputs:
    """Every attention map and hidden state of an LXMERT model on a batch of the port's padded arguments.

    Args:
        model: an LxmertModel or a model holding one as ``.lxmert``.
        batch: ``input_ids`` [B, Lt], ``visual_feats`` [B, N, visual_feat_dim], ``visual_pos`` [B, N,
            visual_pos_dim], ``attention_mask`` [B, Lt], ``visual_attention_mask`` [B, N] (right-padded), optional
            ``token_type_ids``; other keys are ignored.
    """
    lx = lxmert_encoder_of(model)
    if not isinstance(batch, Mapping) or any(batch.get(k) is None for k in LXMERT_BATCH_KEYS[:3]):
        raise ValueError(f"fastvl.probe: argument 'batch' must hold {list(LXMERT_BATCH_KEYS)} (the LXMERT port's "
                         f"forward arguments)")
    ids, feats, pos = batch["input_ids"], batch["visual_feats"], batch["visual_pos"]
    layout = lx.pack_inputs(ids, feats, pos, batch.get("attention_mask"), batch.get("visual_attention_mask"))
    b, width = ids.shape
    n = feats.shape[1]
    dims = StreamDims(layout.cu_txt, layout.cu_img, width, n)
    types = batch.get("token_type_ids")
    enc = lx.encoder
    with eval_mode(model):
        lang = lx.embeddings(ids.reshape(-1)[layout.txt_src], layout.txt_pos,
                             None if types is None else types.reshape(-1)[layout.txt_src])
        visn = enc.visn_fc(feats.reshape(-1, feats.shape[-1])[layout.img_src],
                           pos.reshape(-1, pos.shape[-1])[layout.img_src].to(feats.dtype))
        hid_l, hid_v = [lang], [visn]
        maps: dict[str, list[torch.Tensor]] = {k: [] for k in ("language", "vision", "cross_l2v", "cross_v2l",
                                                               "x_language", "x_vision")}
        for layer in enc.layer:
            ctx, p = _attend(layer.attention.self, lang, lang, dims.cu_txt, dims.cu_txt, width, width,
                             "bidirectional")
            lang = layer.post_attention(ctx, lang)
            maps["language"].append(p)
            hid_l.append(lang)
        for layer in enc.r_layers:
            ctx, p = _attend(layer.attention.self, visn, visn, dims.cu_img, dims.cu_img, n, n, "bidirectional")
            visn = layer.post_attention(ctx, visn)
            maps["vision"].append(p)
            hid_v.append(visn)
        for x in enc.x_layers:
            cross = x.visual_attention
            c_l, p_lv = _attend(cross.att, lang, visn, dims.cu_txt, dims.cu_img, width, n, "cross")
            c_v, p_vl = _attend(cross.att, visn, lang, dims.cu_img, dims.cu_txt, n, width, "cross")
            lang_att, visn_att = cross.output(c_l, lang), cross.output(c_v, visn)
            lang_att, p_ll = _self_block(x.lang_self_att, lang_att, dims.cu_txt, width)
            visn_att, p_vv = _self_block(x.visn_self_att, visn_att, dims.cu_img, n)
            lang = x.lang_output(x.lang_inter(lang_att), lang_att)
            visn = x.visn_output(x.visn_inter(visn_att), visn_att)
            for k, p in (("cross_l2v", p_lv), ("cross_v2l", p_vl), ("x_language", p_ll), ("x_vision", p_vv)):
                maps[k].append(p)
            hid_l.append(lang)
            hid_v.append(visn)

    def stack(xs, shape):
        return torch.stack(xs) if xs else torch.zeros(0, *shape, dtype=feats.dtype, device=feats.device)

    heads = lx.config.num_attention_heads
    pad_l = [LxmertModel.scatter_padded(h, layout.txt_src, b, width) for h in hid_l]
    pad_v = [LxmertModel.scatter_padded(h, layout.img_src, b, n) for h in hid_v]
    shapes = {"language": (width, width), "vision": (n, n), "cross_l2v": (width, n), "cross_v2l": (n, width),
              "x_language": (width, width), "x_vision": (n, n)}
    return LxmertProbeOutputs(
        **{k: stack(maps[k], (b, heads, *shape)) for k, shape in shapes.items()},
        language_hidden=torch.stack(pad_l), vision_hidden=torch.stack(pad_v),
        txt_lens=list(layout.txt_lens), img_lens=list(layout.img_lens))


def lxmert_example_maps(model: nn.Module, batch: Mapping[str, torch.Tensor], hidden: bool = True,
                        dtype: torch.dtype = torch.float16) -> list[dict]:
    """Per example of an LXMERT batch: every map of :class:`LxmertProbeOutputs` cut to its t text tokens and n
    regions (``language`` [l, heads, t, t], ``vision`` [r, heads, n, n], ``cross_l2v`` [x, heads, t, n], ``cross_v2l``
    [x, heads, n, t], ``x_language``, ``x_vision``; with ``hidden`` ``language_hidden`` [1 + l + x, t, H] and
    ``vision_hidden`` [1 + r + x, n, H]) as ``dtype``, with ``txt_len``, ``img_len`` and ``id``."""
    out = lxmert_probe_forward(model, batch)
    ids = batch.get("ids") or [None] * len(out.txt_lens)
    items = []
    for i, (t, n) in enumerate(zip(out.txt_lens, out.img_lens)):
        cut = {"language": (t, t), "vision": (n, n), "cross_l2v": (t, n), "cross_v2l": (n, t), "x_language": (t, t),
               "x_vision": (n, n)}
        item = {"id": ids[i], "txt_len": t, "img_len": n}
        for k, (a, b) in cut.items():
            item[k] = getattr(out, k)[:, i, :, :a, :b].to(dtype).clone()
        if hidden:
            item["language_hidden"] = out.language_hidden[:, i, :t].to(dtype).clone()
            item["vision_hidden"] = out.vision_hidden[:, i, :n].to(dtype).clone()
        items.append(item)
    return items
