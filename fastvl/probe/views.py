"""One example's maps as the probes read them, whatever the architecture (:class:`ExampleMaps`).

- single stream (UNITER): the joint attention [layers, heads, n, n] (text then regions) gives the text -> region,
  region -> text and region -> region blocks; every layer's joint output (embeddings first) is a fusion layer;
- two streams (LXMERT): the cross layers' language -> vision and vision -> language attention are the text <-> region
  blocks; the object-relationship layers' and the cross layers' vision self-attention the region -> region block; the
  input of the cross encoder and every cross layer's output (both streams' tokens together) are the fusion layers;
  the language stream's states (embeddings, language layers, cross layers) the sentence layers. [CLS] modality mass
  and cross-modal head flags need one softmax over text and regions, which a two-stream model has not: ``joint`` is
  None there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .dataset import ProbeExample, official_batch
from .extract import probe_forward
from .extract_lxmert import lxmert_probe_forward

__all__ = ["ExampleMaps", "lxmert_batch", "lxmert_views", "uniter_views"]


@dataclass
class ExampleMaps:
    """The maps of one example (numpy, float32; tl text tokens, n regions).

    fusion: per fusion layer, tokens [tl + n, H] (text rows first). text: per sentence layer, text tokens [tl, H].
    t2i [La, heads, tl, n], i2t [La, heads, n, tl], i2i [Lr, heads, n, n]. joint: [L, heads, tl + n, tl + n] or None.
    """

    txt_len: int
    n_regions: int
    fusion: list[np.ndarray]
    text: list[np.ndarray]
    t2i: np.ndarray
    i2t: np.ndarray
    i2i: np.ndarray
    joint: np.ndarray | None = None


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def uniter_views(model: nn.Module, examples: list[ProbeExample], device: torch.device | str = "cpu"
                 ) -> list[ExampleMaps]:
    """Maps of a UNITER model on ``examples`` (one batch)."""
    out = probe_forward(model, official_batch(examples, device))
    att, hid = _np(out.attentions), _np(out.hidden_states)
    views = []
    for i, e in enumerate(examples):
        tl, n = e.txt_len, e.n_regions
        s = tl + n
        a = att[:, i, :, :s, :s]
        views.append(ExampleMaps(tl, n, [h[i, :s] for h in hid], [h[i, :tl] for h in hid], a[:, :, :tl, tl:],
                                 a[:, :, tl:, :tl], a[:, :, tl:, tl:], a))
    return views


def lxmert_batch(examples: list[ProbeExample], visual_pos_dim: int = 4, device: torch.device | str = "cpu") -> dict:
    """The LXMERT port's padded arguments for ``examples``: input_ids / attention_mask [B, Lt], visual_feats [B, N, D],
    visual_pos [B, N, visual_pos_dim] (normalised x1, y1, x2, y2, ...), visual_attention_mask [B, N]."""
    b = official_batch(examples, device)
    tl = torch.tensor([e.txt_len for e in examples], device=device)
    nl = torch.tensor([e.n_regions for e in examples], device=device)
    width, n = b["input_ids"].shape[1], b["img_feat"].shape[1]
    am = (torch.arange(width, device=device)[None] < tl[:, None]).long()
    return {"input_ids": b["input_ids"], "attention_mask": am,
            "visual_feats": b["img_feat"], "visual_pos": b["img_pos_feat"][..., :visual_pos_dim],
            "visual_attention_mask": (torch.arange(n, device=device)[None] < nl[:, None]).long(), "ids": b["ids"]}


def lxmert_views(model: nn.Module, examples: list[ProbeExample], device: torch.device | str = "cpu"
                 ) -> list[ExampleMaps]:
    """Maps of an LXMERT model on ``examples`` (one batch)."""
    cfg = getattr(model, "lxmert", model).config
    out = lxmert_probe_forward(model, lxmert_batch(examples, cfg.visual_pos_dim, device))
    lh, vh = _np(out.language_hidden), _np(out.vision_hidden)
    l2v, v2l = _np(out.cross_l2v), _np(out.cross_v2l)
    vv = np.concatenate([_np(out.vision), _np(out.x_vision)])
    nl, nr = cfg.l_layers, cfg.r_layers
    views = []
    for i, e in enumerate(examples):
        tl, n = e.txt_len, e.n_regions
        fusion = [np.concatenate([lh[nl + k, i, :tl], vh[nr + k, i, :n]]) for k in range(cfg.x_layers + 1)]
        views.append(ExampleMaps(tl, n, fusion, [h[i, :tl] for h in lh], l2v[:, i, :, :tl, :n], v2l[:, i, :, :n, :tl],
                                 vv[:, i, :, :n, :n], None))
    return views
