"""A straightforward PADDED UNITER, written from REFERENCE.md: the ground truth for tests and the benchmark baseline.

Same module names (so the same ``state_dict`` loads into it) and the same official interfaces as
:mod:`fastvl.models.uniter`, but computed the plain way: text and regions padded separately, embedded, joined
with ``torch.gather`` by ``gather_index``, every layer on [B, L, H] with the additive (1 - mask) * -10000 mask,
heads on the masked rows, WRA with :func:`fastvl.ops.ot.optimal_transport_dist_reference`. It shares no code with
the fast model (only the OT reference of ``fastvl.ops``). Not for training: it exists to be checked against.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from ...ops.ot import optimal_transport_dist_reference
from .config import UniterConfig

__all__ = ["UniterReferenceForPretraining", "UniterReferenceModel"]

EPS = 1e-12


def _ln(h: int) -> nn.LayerNorm:
    return nn.LayerNorm(h, eps=EPS)


def _act(name: str):
    return {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu,
            "swish": F.silu}[name]


class _Node(nn.Module):
    """An empty module to hang named children on (mirrors the official nesting)."""


class _TextEmb(nn.Module):
    def __init__(self, c: UniterConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = _ln(c.hidden_size)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, input_ids, position_ids, token_type_ids=None):
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        e = self.word_embeddings(input_ids) + self.position_embeddings(position_ids) + \
            self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(e))


class _ImgEmb(nn.Module):
    def __init__(self, c: UniterConfig, img_dim: int):
        super().__init__()
        self.img_linear = nn.Linear(img_dim, c.hidden_size)
        self.img_layer_norm = _ln(c.hidden_size)
        self.pos_layer_norm = _ln(c.hidden_size)
        self.pos_linear = nn.Linear(7, c.hidden_size)
        self.mask_embedding = nn.Embedding(2, img_dim, padding_idx=0)
        self.LayerNorm = _ln(c.hidden_size)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, img_feat, img_pos_feat, type_embeddings, img_masks=None):
        if img_masks is not None:
            table = torch.cat([torch.zeros_like(self.mask_embedding.weight[:1]), self.mask_embedding.weight[1:]])
            img_feat = img_feat + F.embedding(img_masks.long(), table)
        e = self.img_layer_norm(self.img_linear(img_feat)) + self.pos_layer_norm(self.pos_linear(img_pos_feat)) + \
            type_embeddings
        return self.dropout(self.LayerNorm(e))


class _Layer(nn.Module):
    def __init__(self, c: UniterConfig):
        super().__init__()
        h = c.hidden_size
        self.heads = c.num_attention_heads
        self.act = _act(c.hidden_act)
        self.attention = _Node()
        self.attention.self = _Node()
        for name in ("query", "key", "value"):
            setattr(self.attention.self, name, nn.Linear(h, h))
        self.attention.output = _Node()
        self.attention.output.dense = nn.Linear(h, h)
        self.attention.output.LayerNorm = _ln(h)
        self.intermediate = _Node()
        self.intermediate.dense = nn.Linear(h, c.intermediate_size)
        self.output = _Node()
        self.output.dense = nn.Linear(c.intermediate_size, h)
        self.output.LayerNorm = _ln(h)
        self.attn_drop = nn.Dropout(c.attention_probs_dropout_prob)
        self.hid_drop = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, ext_mask: torch.Tensor) -> torch.Tensor:
        b, length, h = x.shape
        d = h // self.heads
        sa = self.attention.self
        split = lambda t: t.view(b, length, self.heads, d).transpose(1, 2)  # [B, heads, L, d]
        q, k, v = split(sa.query(x)), split(sa.key(x)), split(sa.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d) + ext_mask
        probs = self.attn_drop(torch.softmax(scores, dim=-1))
        ctx = (probs @ v).transpose(1, 2).reshape(b, length, h)
        a = self.attention.output.LayerNorm(self.hid_drop(self.attention.output.dense(ctx)) + x)
        inter = self.act(self.intermediate.dense(a))
        return self.output.LayerNorm(self.hid_drop(self.output.dense(inter)) + a)


def _init(module: nn.Module, std: float) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.data.normal_(0.0, std)
    elif isinstance(module, nn.LayerNorm):
        module.weight.data.fill_(1.0)
        module.bias.data.zero_()
    if isinstance(module, nn.Linear) and module.bias is not None:
        module.bias.data.zero_()


class UniterReferenceModel(nn.Module):
    """Padded UNITER encoder with the official forward signature and keys."""

    def __init__(self, config: UniterConfig, img_dim: int):
        super().__init__()
        self.config = config
        self.embeddings = _TextEmb(config)
        self.img_embeddings = _ImgEmb(config, img_dim)
        self.encoder = _Node()
        self.encoder.layer = nn.ModuleList([_Layer(config) for _ in range(config.num_hidden_layers)])
        self.pooler = _Node()
        self.pooler.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.apply(lambda m: _init(m, config.initializer_range))

    def pool(self, sequence_output: torch.Tensor) -> torch.Tensor:
        """tanh(dense(h[:, 0])): [B, L, H] -> [B, H]."""
        return torch.tanh(self.pooler.dense(sequence_output[:, 0]))

    def _img(self, img_feat, img_pos_feat, img_masks, img_type_ids):
        if img_type_ids is None:
            img_type_ids = torch.ones_like(img_feat[:, :, 0].long())
        types = self.embeddings.token_type_embeddings(img_type_ids)
        return self.img_embeddings(img_feat, img_pos_feat, types, img_masks)

    def forward(self, input_ids, position_ids, img_feat, img_pos_feat, attention_mask, gather_index=None,
                img_masks=None, output_all_encoded_layers=True, txt_type_ids=None, img_type_ids=None):
        """Official interface; returns every layer's [B, L, H] (or the last)."""
        ext = (1.0 - attention_mask[:, None, None, :].to(self.pooler.dense.weight.dtype)) * -10000.0
        if input_ids is None:
            x = self._img(img_feat, img_pos_feat, img_masks, img_type_ids)
        elif img_feat is None:
            x = self.embeddings(input_ids, position_ids, txt_type_ids)
        else:
            txt = self.embeddings(input_ids, position_ids, txt_type_ids)
            img = self._img(img_feat, img_pos_feat, img_masks, img_type_ids)
            idx = gather_index.unsqueeze(-1).expand(-1, -1, self.config.hidden_size)
            x = torch.gather(torch.cat([txt, img], dim=1), dim=1, index=idx)
        layers = []
        for layer in self.encoder.layer:
            x = layer(x, ext)
            layers.append(x)
        return layers if output_all_encoded_layers else layers[-1]


class UniterReferenceForPretraining(nn.Module):
    """Padded UNITER with the pre-training heads; ``forward(batch_dict, task, compute_loss)`` as official."""

    def __init__(self, config: UniterConfig, img_dim: int, img_label_dim: int):
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.uniter = UniterReferenceModel(config, img_dim)
        self.act = _act(config.hidden_act)
        self.cls = _Node()
        self.cls.predictions = _Node()
        pred = self.cls.predictions
        pred.transform = _Node()
        pred.transform.dense = nn.Linear(h, h)
        pred.transform.LayerNorm = _ln(h)
        pred.decoder = nn.Linear(h, config.vocab_size, bias=False)
        pred.decoder.weight = self.uniter.embeddings.word_embeddings.weight
        pred.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.feat_regress = _Node()
        self.feat_regress.net = nn.Sequential(nn.Linear(h, h), nn.GELU(), _ln(h))
        self.feat_regress.weight = self.uniter.img_embeddings.img_linear.weight
        self.feat_regress.bias = nn.Parameter(torch.zeros(img_dim))
        self.region_classifier = _Node()
        self.region_classifier.net = nn.Sequential(nn.Linear(h, h), nn.GELU(), _ln(h), nn.Linear(h, img_label_dim))
        self.itm_output = nn.Linear(h, 2)
        self.apply(lambda m: _init(m, config.initializer_range))

    def _encode(self, b: Mapping, img_masks=None) -> torch.Tensor:
        return self.uniter(b["input_ids"], b["position_ids"], b["img_feat"], b["img_pos_feat"], b["attn_masks"],
                           b["gather_index"], img_masks=img_masks, output_all_encoded_layers=False)

    def forward(self, batch: Mapping, task: str, compute_loss: bool = True):
        """Official batch dict -> official outputs (per-element losses, or predictions)."""
        if task == "mlm":
            seq = self._encode(batch)[:, :batch["input_ids"].shape[1]]
            labels = batch["txt_labels"]
            masked = seq[labels != -1]
            pred = self.cls.predictions
            t = pred.transform.LayerNorm(self.act(pred.transform.dense(masked)))
            scores = pred.decoder(t) + pred.bias
            return F.cross_entropy(scores, labels[labels != -1], reduction="none") if compute_loss else scores
        if task in ("mrfr", "mrc", "mrc-kl"):
            seq = self._encode(batch, batch["img_masks"])
            masked = seq[batch["img_mask_tgt"].bool()]
            if task == "mrfr":
                feat = F.linear(self.feat_regress.net(masked), self.feat_regress.weight.t(), self.feat_regress.bias)
                return F.mse_loss(feat, batch["feat_targets"], reduction="none") if compute_loss else feat
            logits = self.region_classifier.net(masked)
            if not compute_loss:
                return logits
            soft = batch["label_targets"]
            if task == "mrc-kl":
                return F.kl_div(F.log_softmax(logits, dim=-1), soft, reduction="none")
            return F.cross_entropy(logits, soft[:, 1:].argmax(-1) + 1, ignore_index=0, reduction="none")
        if task == "itm":
            seq = self._encode(batch)
            scores = self.itm_output(self.uniter.pool(seq))
            ot = None
            if batch.get("ot_inputs") is not None:
                ot = self._ot(seq, batch)
            if compute_loss:
                return F.cross_entropy(scores, batch["targets"], reduction="none"), ot
            return scores, ot
        raise ValueError(f"unknown task {task!r}")

    def _ot(self, seq: torch.Tensor, batch: Mapping):
        o = batch["ot_inputs"]
        b, _, h = seq.shape
        tl, il = batch["input_ids"].shape[1], batch["img_feat"].shape[1]
        max_l = max(int(o["scatter_max"]) + 1, tl + il)
        idx = o["ot_scatter"].unsqueeze(-1).expand_as(seq)
        ctx = torch.zeros(b, max_l, h, dtype=seq.dtype, device=seq.device).scatter(1, idx, seq)
        txt, img = ctx[:, :tl], ctx[:, tl:tl + il]
        dist = optimal_transport_dist_reference(txt.float(), img.float(), o["txt_pad"].bool(),
                                                o["img_pad"].bool()).to(txt.dtype)
        t = batch["targets"]
        return dist.masked_select(t == 1), dist.masked_select(t == 0)
