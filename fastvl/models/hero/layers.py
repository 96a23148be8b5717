"""HERO's own small modules, with the official parameter names: embeddings, LinearLayer, MLPLayer, the MFM
regression head, the LM head and the packed transformer stack.

The transformer layers themselves are ``fastvl.nn.BertLayer`` (LayerNorm eps 1e-12, as in the official layers);
everything HERO defines around them uses LayerNorm eps 1e-5, as the official code does.
"""

from __future__ import annotations

import torch
from torch import nn

from ...nn import BertLayer, activation
from ...ops import cross_modal_attention
from .config import HeroSubConfig

__all__ = ["HERO_LN_EPS", "FrameEmbeddings", "FrameFeatureRegression", "HeroEncoder", "HeroLMPredictionHead",
           "ImageEmbeddings", "LinearLayer", "MLPLayer", "QueryFeatEmbeddings", "SubEmbeddings", "hero_layer_norm"]

HERO_LN_EPS = 1e-5  # embeddings, heads, LinearLayer, MLPLayer


def hero_layer_norm(size: int) -> nn.LayerNorm:
    """LayerNorm with HERO's eps (1e-5), as the official FusedLayerNorm(size, eps=1e-5)."""
    return nn.LayerNorm(size, eps=HERO_LN_EPS)


class SubEmbeddings(nn.Module):
    """Subtitle-token embeddings: LN(word + position + type) then dropout (``f_encoder.embeddings``).

    Word ``padding_idx`` is 1 (RoBERTa ``<pad>``). Position ids come from the collate (0-based, clipped at 511);
    without type ids every token uses type row 1, as the official code does.
    """

    def __init__(self, config: HeroSubConfig):
        super().__init__()
        self.padding_idx = 1
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=self.padding_idx)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = hero_layer_norm(config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def default_type_embedding(self) -> torch.Tensor:
        """Type row 1 (what the official code adds when no type ids are given): [H]."""
        return self.token_type_embeddings.weight[1]

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [...] (any leading shape), position_ids same shape -> [..., H]."""
        types = (self.default_type_embedding() if token_type_ids is None
                 else self.token_type_embeddings(token_type_ids))
        emb = self.word_embeddings(input_ids) + self.position_embeddings(position_ids) + types
        return self.dropout(self.LayerNorm(emb))


class ImageEmbeddings(nn.Module):
    """Frame embeddings inside a subtitle segment (``f_encoder.img_embeddings``):
    LN(img_linear(img_LayerNorm(feat [+ mask_embedding(mask)])) + local position + type) then dropout.

    ``mask_embedding`` row 0 is NOT zero after initialisation (the official init overwrites the padding row) and is
    added to every unmasked frame whenever masks are given (MFM); without masks nothing is added.
    """

    def __init__(self, config: HeroSubConfig, img_dim: int, max_img_seq_len: int):
        super().__init__()
        self.img_linear = nn.Linear(img_dim, config.hidden_size)
        self.img_LayerNorm = hero_layer_norm(img_dim)
        self.position_embeddings = nn.Embedding(max_img_seq_len, config.hidden_size)
        self.mask_embedding = nn.Embedding(2, img_dim, padding_idx=0)
        self.LayerNorm = hero_layer_norm(config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, img_feat: torch.Tensor, type_embeddings: torch.Tensor, img_pos_ids: torch.Tensor,
                img_masks: torch.Tensor | None = None) -> torch.Tensor:
        """img_feat [..., D], type_embeddings broadcastable to [..., H], img_pos_ids [...], img_masks [...] or None
        -> [..., H]."""
        if img_masks is not None:
            img_feat = img_feat + self.mask_embedding(img_masks.long())
        emb = self.img_linear(self.img_LayerNorm(img_feat)) + self.position_embeddings(img_pos_ids) + type_embeddings
        return self.dropout(self.LayerNorm(emb))


class FrameEmbeddings(nn.Module):
    """Temporal-transformer input: LN(frame + global position) then dropout (``c_encoder.embeddings``)."""

    def __init__(self, config: HeroSubConfig):
        super().__init__()
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = hero_layer_norm(config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, frame_feat: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """frame_feat [B, L, H], position_ids [B or 1, L] (default arange(L)) -> [B, L, H]."""
        if position_ids is None:
            position_ids = torch.arange(frame_feat.shape[1], device=frame_feat.device).unsqueeze(0)
        return self.dropout(self.LayerNorm(frame_feat + self.position_embeddings(position_ids)))


class QueryFeatEmbeddings(FrameEmbeddings):
    """Query-encoder positions (``q_feat_attn.query_pos_embed``): the same computation as FrameEmbeddings."""


class LinearLayer(nn.Module):
    """[LayerNorm] -> Dropout -> Linear -> [ReLU] (official keys ``LayerNorm.*``, ``net.1.*``)."""

    def __init__(self, in_hsz: int, out_hsz: int, layer_norm: bool = True, dropout: float = 0.1, relu: bool = True):
        super().__init__()
        self.relu = relu
        self.layer_norm = layer_norm
        if layer_norm:
            self.LayerNorm = hero_layer_norm(in_hsz)
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_hsz, out_hsz))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in_hsz] -> [..., out_hsz]."""
        if self.layer_norm:
            x = self.LayerNorm(x)
        x = self.net(x)
        return torch.relu(x) if self.relu else x


class MLPLayer(nn.Module):
    """linear_1 (in -> 2 in) -> GELU -> LayerNorm -> linear_2 (2 in -> out): the FOM head (``fom_output``)."""

    def __init__(self, in_hsz: int, out_hsz: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_hsz, in_hsz * 2)
        self.LayerNorm = hero_layer_norm(in_hsz * 2)
        self.linear_2 = nn.Linear(in_hsz * 2, out_hsz)
        self.act = activation("gelu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in_hsz] -> [..., out_hsz]."""
        return self.linear_2(self.LayerNorm(self.act(self.linear_1(x))))


class _GELU(nn.Module):
    """Exact (erf) GELU as a module (the official ``GELU`` in ``feat_regress.net``; no parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return activation("gelu")(x)


class FrameFeatureRegression(nn.Module):
    """MFM head (``feat_regress``): net = Linear(H, H), GELU, LayerNorm(H), Linear(H, feat_dim); untied."""

    def __init__(self, hidden_size: int, feat_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, hidden_size), _GELU(), hero_layer_norm(hidden_size),
                                 nn.Linear(hidden_size, feat_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., feat_dim]."""
        return self.net(x)


class HeroLMPredictionHead(nn.Module):
    """MLM head (``f_encoder.lm_head``): dense -> act -> LayerNorm(eps 1e-5) -> decoder (TIED to the word
    embeddings) + bias. HERO's head has no ``transform`` level, unlike BERT's ``cls.predictions``.
    """

    def __init__(self, config: HeroSubConfig, embedding_weight: nn.Parameter):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = activation(config.hidden_act)
        self.LayerNorm = hero_layer_norm(config.hidden_size)
        vocab, hidden = embedding_weight.shape
        self.decoder = nn.Linear(hidden, vocab, bias=False)
        self.decoder.weight = embedding_weight
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[n, H] -> logits [n, V]."""
        return self.decoder(self.LayerNorm(self.transform_act_fn(self.dense(hidden_states)))) + self.bias


class HeroEncoder(nn.Module):
    """The transformer stack (``encoder.layer.<i>``) of ``fastvl.nn.BertLayer`` on packed tokens."""

    def __init__(self, config: HeroSubConfig):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """hidden_states [T, H] (all sequences concatenated), cu_seqlens [N+1] int32, max_seqlen int -> [T, H]."""
        for layer in self.layer:
            hidden_states = layer(hidden_states, cu_seqlens, max_seqlen)
        return hidden_states

    def forward_all_queries(self, hidden_states: torch.Tensor, key_rows: torch.Tensor, cu_seqlens_k: torch.Tensor,
                            max_seqlen_k: int) -> torch.Tensor:
        """Every row of a padded batch is a query; only the real rows are keys (the official padded encoder, whose
        padding rows attend to the real rows of their sequence, without computing attention on padding keys).

        Args:
            hidden_states: [B, L, H] padded input.
            key_rows: [K] int64 flat indices (b * L + position) of the real rows, sequence by sequence.
            cu_seqlens_k: [B+1] int32 cumulative real lengths (every length >= 1).
            max_seqlen_k: Python int >= every real length.
        Returns:
            [B, L, H]: every row, padding rows included, as the official padded encoder computes them.
        """
        b, length, hidden = hidden_states.shape
        x = hidden_states.reshape(b * length, hidden)
        cu_q = torch.arange(0, (b + 1) * length, length, dtype=torch.int32, device=x.device)
        for layer in self.layer:
            attn = layer.attention.self
            q = attn.project_q(x)
            k, v = attn.project_kv(x.index_select(0, key_rows))
            ctx = cross_modal_attention(q, k, v, cu_q, cu_seqlens_k, length, max_seqlen_k, mask="cross",
                                        dropout_p=attn.dropout.p if self.training else 0.0)
            x = layer.post_attention(ctx.reshape(b * length, hidden), x)
        return x.reshape(b, length, hidden)
