"""LXMERT encoder: language, object-relationship and cross-modality layers on packed varlen attention.

Module names and parameter shapes are those of the ``transformers`` port (``LxmertModel``), so its state_dict (and
the released ``unc-nlp/lxmert-base-uncased`` weights) load strictly. Inside, the text stream is packed
([T_txt, H] + ``cu_txt``) and the region stream too ([T_img, H] + ``cu_img``): self-attention layers run the
``bidirectional`` mask of :func:`fastvl.ops.cross_modal_attention` on one stream, and the cross layers its ``cross``
mask from one stream's packed queries to the other's packed keys, so no FLOP is spent on padding.

The drop-in :meth:`LxmertModel.forward` takes the port's padded arguments; padding is defined by the two masks
(right-padded: ones then zeros), never by zero features. Its outputs at padded positions are 0 (the port's are
whatever the padded rows compute; they are never read by a loss with masked labels). With ``output_attentions``
the attention op's ``return_probs`` path serves the probabilities (the op's reference backend: it pads per sequence
internally), [B, heads, Lq, Lk] with 0 at padded rows and columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ...batch import PackedLayout, PackedVLBatch, make_layout
from ...nn import BertAttention, BertIntermediate, BertLayer, BertOutput, BertPooler, BertSelfAttention, BertSelfOutput
from ...ops import cross_modal_attention
from .config import LxmertConfig

__all__ = ["LXMERT_LAYER_NORM_EPS", "LxmertCrossAttentionLayer", "LxmertEmbeddings", "LxmertEncoder", "LxmertLayer",
           "LxmertModel", "LxmertModelOutput", "LxmertPackedOutput", "LxmertVisualFeatureEncoder", "LxmertXLayer",
           "StreamDims", "init_lxmert_weights"]

LXMERT_LAYER_NORM_EPS = 1e-12  # the port's modules use 1e-12 whatever config.layer_norm_eps says


@dataclass
class StreamDims:
    """Where the two packed streams live: cu_txt / cu_img [B+1] int32 and the Python-int lengths that bound them
    (``max_txt`` / ``max_img``; the padded widths on the drop-in path, so attentions come back [B, h, L, L])."""

    cu_txt: torch.Tensor
    cu_img: torch.Tensor
    max_txt: int
    max_img: int


def attend(att: BertSelfAttention, x_q: torch.Tensor, x_kv: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
           max_q: int, max_k: int, mask: str, want_probs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``att``'s projections of x_q [Tq, H] (queries) and x_kv [Tk, H] (keys / values), then the packed attention op.

    Returns (context [Tq, H], probabilities [B, heads, max_q, max_k] or None)."""
    q = att.project_q(x_q)
    k, v = att.project_kv(x_kv)
    res = cross_modal_attention(q, k, v, cu_q, cu_k, max_q, max_k, mask=mask,
                                dropout_p=att.dropout_p if att.training else 0.0, return_probs=want_probs)
    ctx, probs = res if want_probs else (res, None)
    return ctx.reshape(x_q.shape[0], -1), probs


class LxmertEmbeddings(nn.Module):
    """dropout(LayerNorm(word + position + token_type)); all three tables have ``padding_idx=0`` as in the port
    (row 0 of each gets no gradient)."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size, padding_idx=0)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size, padding_idx=0)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=LXMERT_LAYER_NORM_EPS)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                word_delta: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, position_ids, token_type_ids (default 0): [...] long; word_delta [..., H] (VILLA's text
        perturbation, added to the word embeddings) -> [..., H]."""
        words = self.word_embeddings(input_ids)
        if word_delta is not None:
            words = words + word_delta
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = words + self.position_embeddings(position_ids) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class LxmertVisualFeatureEncoder(nn.Module):
    """dropout((LayerNorm(visn_fc(feat)) + LayerNorm(box_fc(pos))) / 2)."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.visn_fc = nn.Linear(config.visual_feat_dim, config.hidden_size)
        self.visn_layer_norm = nn.LayerNorm(config.hidden_size, eps=LXMERT_LAYER_NORM_EPS)
        self.box_fc = nn.Linear(config.visual_pos_dim, config.hidden_size)
        self.box_layer_norm = nn.LayerNorm(config.hidden_size, eps=LXMERT_LAYER_NORM_EPS)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, visual_feats: torch.Tensor, visual_pos: torch.Tensor) -> torch.Tensor:
        """visual_feats [..., visual_feat_dim], visual_pos [..., visual_pos_dim] -> [..., H]."""
        x = self.visn_layer_norm(self.visn_fc(visual_feats))
        y = self.box_layer_norm(self.box_fc(visual_pos))
        return self.dropout((x + y) / 2)


class LxmertLayer(BertLayer):
    """A single-stream layer (language or object-relationship): the BERT layer of :mod:`fastvl.nn` (the port's
    names: attention.self / attention.output / intermediate / output) with an attention-probabilities path."""

    def forward_probs(self, hidden: torch.Tensor, cu: torch.Tensor, max_len: int, want_probs: bool
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden [T, H] -> ([T, H], probabilities [B, heads, max_len, max_len] or None)."""
        ctx, probs = attend(self.attention.self, hidden, hidden, cu, cu, max_len, max_len, "bidirectional", want_probs)
        return self.post_attention(ctx, hidden), probs


class LxmertCrossAttentionLayer(nn.Module):
    """Cross attention (``att``: query from one stream, key / value from the other) + output projection."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.att = BertSelfAttention(config.hidden_size, config.num_attention_heads,
                                     config.attention_probs_dropout_prob)
        self.output = BertSelfOutput(config.hidden_size, config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, cu_x: torch.Tensor, cu_ctx: torch.Tensor, max_x: int,
                max_ctx: int, want_probs: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [Tx, H] attends to ctx [Tc, H] of the same example -> ([Tx, H], probs [B, heads, max_x, max_ctx])."""
        c, probs = attend(self.att, x, ctx, cu_x, cu_ctx, max_x, max_ctx, "cross", want_probs)
        return self.output(c, x), probs


class LxmertXLayer(nn.Module):
    """A cross-modality layer: both streams attend to each other with ONE shared cross-attention module
    (``visual_attention``), then self-attend in their own stream, then their own feed-forward."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        h, heads = config.hidden_size, config.num_attention_heads
        p_att, p_hid = config.attention_probs_dropout_prob, config.hidden_dropout_prob
        self.visual_attention = LxmertCrossAttentionLayer(config)
        self.lang_self_att = BertAttention(h, heads, p_att, p_hid)
        self.visn_self_att = BertAttention(h, heads, p_att, p_hid)
        self.lang_inter = BertIntermediate(h, config.intermediate_size, config.hidden_act)
        self.lang_output = BertOutput(h, config.intermediate_size, p_hid)
        self.visn_inter = BertIntermediate(h, config.intermediate_size, config.hidden_act)
        self.visn_output = BertOutput(h, config.intermediate_size, p_hid)

    def forward(self, lang: torch.Tensor, visn: torch.Tensor, dims: StreamDims, want_probs: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """lang [T_txt, H], visn [T_img, H] -> (lang [T_txt, H], visn [T_img, H], language->vision probabilities
        [B, heads, max_txt, max_img] or None)."""
        lang_att, probs = self.visual_attention(lang, visn, dims.cu_txt, dims.cu_img, dims.max_txt, dims.max_img,
                                                want_probs)
        visn_att, _ = self.visual_attention(visn, lang, dims.cu_img, dims.cu_txt, dims.max_img, dims.max_txt)
        lang_att = self.lang_self_att(lang_att, dims.cu_txt, dims.max_txt)
        visn_att = self.visn_self_att(visn_att, dims.cu_img, dims.max_img)
        lang_out = self.lang_output(self.lang_inter(lang_att), lang_att)
        visn_out = self.visn_output(self.visn_inter(visn_att), visn_att)
        return lang_out, visn_out, probs


@dataclass
class LxmertPackedOutput:
    """The encoder's packed outputs.

    Attributes:
        language_output: [T_txt, H]; vision_output: [T_img, H]; pooled_output: [B, H] (pooler of each [CLS]).
        language_hidden_states: per layer [T_txt, H] (l_layers, then x_layers; as the port, no embedding output);
            vision_hidden_states: per layer [T_img, H] (r_layers, then x_layers). Empty unless asked for.
        language_attentions: per language layer [B, heads, Lt, Lt]; vision_attentions: per object-relationship
            layer [B, heads, Li, Li]; cross_encoder_attentions: per cross layer, language->vision [B, heads, Lt, Li].
            Empty unless asked for. 0 at padded rows / columns.
        dims: the stream layout the outputs live on.
    """

    language_output: torch.Tensor
    vision_output: torch.Tensor
    pooled_output: torch.Tensor
    dims: StreamDims
    language_hidden_states: list[torch.Tensor] = field(default_factory=list)
    vision_hidden_states: list[torch.Tensor] = field(default_factory=list)
    language_attentions: list[torch.Tensor] = field(default_factory=list)
    vision_attentions: list[torch.Tensor] = field(default_factory=list)
    cross_encoder_attentions: list[torch.Tensor] = field(default_factory=list)


class LxmertEncoder(nn.Module):
    """``visn_fc`` (region features), ``layer`` (language), ``r_layers`` (object relationship), ``x_layers``."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.config = config
        self.visn_fc = LxmertVisualFeatureEncoder(config)
        self.layer = nn.ModuleList([LxmertLayer(config) for _ in range(config.l_layers)])
        self.x_layers = nn.ModuleList([LxmertXLayer(config) for _ in range(config.x_layers)])
        self.r_layers = nn.ModuleList([LxmertLayer(config) for _ in range(config.r_layers)])

    def forward(self, lang: torch.Tensor, visual_feats: torch.Tensor, visual_pos: torch.Tensor, dims: StreamDims,
                output_attentions: bool = False, output_hidden_states: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, dict[str, list[torch.Tensor]]]:
        """lang [T_txt, H] (embedded text), visual_feats [T_img, D], visual_pos [T_img, P] ->
        (lang [T_txt, H], visn [T_img, H], {hidden-state and attention lists})."""
        extra: dict[str, list[torch.Tensor]] = {k: [] for k in ("language_hidden_states", "vision_hidden_states",
                                                                "language_attentions", "vision_attentions",
                                                                "cross_encoder_attentions")}
        visn = self.visn_fc(visual_feats, visual_pos)
        for layer in self.layer:
            lang, probs = layer.forward_probs(lang, dims.cu_txt, dims.max_txt, output_attentions)
            self._keep(extra, "language", lang, probs, output_hidden_states)
        for layer in self.r_layers:
            visn, probs = layer.forward_probs(visn, dims.cu_img, dims.max_img, output_attentions)
            self._keep(extra, "vision", visn, probs, output_hidden_states)
        for layer in self.x_layers:
            lang, visn, probs = layer(lang, visn, dims, output_attentions)
            if output_hidden_states:
                extra["vision_hidden_states"].append(visn)
                extra["language_hidden_states"].append(lang)
            if probs is not None:
                extra["cross_encoder_attentions"].append(probs)
        return lang, visn, extra

    @staticmethod
    def _keep(extra: dict, stream: str, hidden: torch.Tensor, probs: torch.Tensor | None, hidden_states: bool
              ) -> None:
        if hidden_states:
            extra[f"{stream}_hidden_states"].append(hidden)
        if probs is not None:
            extra[f"{stream}_attentions"].append(probs)


@dataclass
class LxmertModelOutput:
    """The port's ``LxmertModelOutput`` fields (padded [B, L, H] / [B, N, H]; hidden states and attentions are
    tuples, None unless asked for)."""

    language_output: torch.Tensor | None = None
    vision_output: torch.Tensor | None = None
    pooled_output: torch.Tensor | None = None
    language_hidden_states: tuple[torch.Tensor, ...] | None = None
    vision_hidden_states: tuple[torch.Tensor, ...] | None = None
    language_attentions: tuple[torch.Tensor, ...] | None = None
    vision_attentions: tuple[torch.Tensor, ...] | None = None
    cross_encoder_attentions: tuple[torch.Tensor, ...] | None = None

    def to_tuple(self) -> tuple:
        """The fields that are not None, in order (the port's ``return_dict=False`` tuple)."""
        return tuple(v for v in (self.language_output, self.vision_output, self.pooled_output,
                                 self.language_hidden_states, self.vision_hidden_states, self.language_attentions,
                                 self.vision_attentions, self.cross_encoder_attentions) if v is not None)

    def __getitem__(self, i: int):
        return self.to_tuple()[i]


def init_lxmert_weights(module: nn.Module, initializer_range: float) -> None:
    """The port's initialisation: N(0, initializer_range) for Linear and Embedding weights (padding row 0),
    zero biases, LayerNorm (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=initializer_range)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=initializer_range)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _lengths(mask: torch.Tensor | None, shape: tuple[int, int], name: str, device: torch.device) -> list[int]:
    """Per-row lengths of a right-padded 0/1 mask [B, L] (a host read: the drop-in boundary only)."""
    b, width = shape
    if mask is None:
        return [width] * b
    if tuple(mask.shape) != (b, width):
        raise ValueError(f"fastvl.models.lxmert: argument '{name}' must have shape {(b, width)}, got "
                         f"{tuple(mask.shape)}")
    m = mask != 0
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"fastvl.models.lxmert: argument '{name}' must hold only 0 and 1")
    lens = m.sum(1)
    right = torch.arange(width, device=mask.device)[None, :] < lens[:, None]
    if not bool((right == m).all()):
        row = int((right != m).any(1).nonzero()[0, 0])
        raise ValueError(f"fastvl.models.lxmert: argument '{name}' must be right-padded (ones then zeros), but row "
                         f"{row} is {m[row].int().tolist()}")
    return [int(x) for x in lens.tolist()]


class LxmertModel(nn.Module):
    """LXMERT encoder + pooler (the port's ``LxmertModel``: ``embeddings``, ``encoder``, ``pooler``).

    Args:
        config: an :class:`LxmertConfig`.
    """

    def __init__(self, config: LxmertConfig):
        super().__init__()
        if not isinstance(config, LxmertConfig):
            raise TypeError(f"fastvl.models.lxmert: 'config' must be an LxmertConfig, got {type(config).__name__}")
        self.config = config
        self.embeddings = LxmertEmbeddings(config)
        self.encoder = LxmertEncoder(config)
        self.pooler = BertPooler(config.hidden_size)
        init_lxmert_weights(self, config.initializer_range)

    @classmethod
    def from_pretrained(cls, path, config: LxmertConfig | str | None = None, strict: bool = True) -> LxmertModel:
        """The model with the port's weights: a ``save_pretrained`` / hub folder (config.json + model.safetensors or
        pytorch_model.bin) or a weights file with ``config``; strict (see :func:`load_lxmert_state`)."""
        from .checkpoint import lxmert_from_pretrained

        return lxmert_from_pretrained(cls, path, config, strict)

    # ------------------------------------------------------------------------------------------ packed core
    def encode_packed(self, input_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
                      visual_feats: torch.Tensor, visual_pos: torch.Tensor, dims: StreamDims,
                      output_attentions: bool = False, output_hidden_states: bool = False,
                      txt_delta: torch.Tensor | None = None, img_delta: torch.Tensor | None = None
                      ) -> LxmertPackedOutput:
        """The encoder on packed streams.

        Args:
            input_ids, position_ids, token_type_ids (None = 0): [T_txt] long. visual_feats [T_img, visual_feat_dim],
            visual_pos [T_img, visual_pos_dim]. dims: the two streams' cu_seqlens and length bounds (every text
            holds at least its [CLS]). txt_delta [T_txt, H] (added to the word embeddings) and img_delta
            [T_img, visual_feat_dim] (added to the raw features): VILLA's perturbations.
        """
        if img_delta is not None:
            visual_feats = visual_feats + img_delta
        lang = self.embeddings(input_ids, position_ids, token_type_ids, txt_delta)
        lang, visn, extra = self.encoder(lang, visual_feats, visual_pos, dims, output_attentions,
                                         output_hidden_states)
        pooled = self.pooler(lang[dims.cu_txt[:-1].long()])
        return LxmertPackedOutput(lang, visn, pooled, dims, **extra)

    def batch_dims(self, batch: PackedVLBatch) -> tuple[PackedLayout, StreamDims]:
        """(the batch's packed layout, its stream dims); checks the batch against the config (host-side)."""
        cfg = self.config
        if not isinstance(batch, PackedVLBatch):
            raise TypeError(f"fastvl.models.lxmert: 'batch' must be a PackedVLBatch, got {type(batch).__name__}")
        if min(batch.txt_lens, default=1) < 1:
            raise ValueError(f"fastvl.models.lxmert: every example needs at least its [CLS] token, got txt_lens "
                             f"{batch.txt_lens}")
        if batch.max_txt > cfg.max_position_embeddings:
            raise ValueError(f"fastvl.models.lxmert: a text of {batch.max_txt} tokens is longer than "
                             f"max_position_embeddings = {cfg.max_position_embeddings}")
        if batch.img_feat.shape[-1] != cfg.visual_feat_dim:
            raise ValueError(f"fastvl.models.lxmert: batch.img_feat has {batch.img_feat.shape[-1]} features per "
                             f"region but the config's visual_feat_dim is {cfg.visual_feat_dim}")
        if batch.img_pos.shape[-1] < cfg.visual_pos_dim:
            raise ValueError(f"fastvl.models.lxmert: batch.img_pos has {batch.img_pos.shape[-1]} columns, fewer than "
                             f"visual_pos_dim = {cfg.visual_pos_dim}")
        layout = batch.packed_layout()
        return layout, StreamDims(layout.cu_txt, layout.cu_img, layout.max_txt, layout.max_img)

    def forward_packed(self, batch: PackedVLBatch, txt_delta: torch.Tensor | None = None,
                       img_delta: torch.Tensor | None = None, output_attentions: bool = False,
                       output_hidden_states: bool = False, zero_masked: bool = True) -> LxmertPackedOutput:
        """The encoder on a :class:`~fastvl.batch.PackedVLBatch` (the native API).

        visual_pos = the first ``visual_pos_dim`` columns of ``img_pos`` (UNITER's 7-d box feature starts with the
        normalised x1, y1, x2, y2: LXMERT's 4-d box). ``zero_masked``: regions in ``img_masks`` have their raw
        features zeroed (LXMERT has no mask embedding; masked features are zeros)."""
        _, dims = self.batch_dims(batch)
        feats = batch.img_feat
        if zero_masked and batch.img_masks is not None:
            feats = feats.masked_fill(batch.img_masks.bool().unsqueeze(-1), 0.0)
        pos_ids = batch.position_ids if batch.position_ids is not None else batch.packed_layout().txt_pos
        return self.encode_packed(batch.input_ids, pos_ids, batch.txt_type_ids, feats,
                                  batch.img_pos[:, :self.config.visual_pos_dim].to(feats.dtype), dims,
                                  output_attentions, output_hidden_states, txt_delta, img_delta)

    # ------------------------------------------------------------------------------------------ drop-in (padded)
    def pack_inputs(self, input_ids: torch.Tensor, visual_feats: torch.Tensor, visual_pos: torch.Tensor,
                    attention_mask: torch.Tensor | None, visual_attention_mask: torch.Tensor | None
                    ) -> PackedLayout:
        """Check the port's padded inputs and return their packed layout (``txt_src`` / ``img_src`` index the
        padded rows; the widths are the padded L and N)."""
        cfg = self.config
        if input_ids is None:
            raise ValueError("fastvl.models.lxmert: argument 'input_ids' is required (inputs_embeds is not "
                             "supported)")
        if input_ids.dim() != 2:
            raise ValueError(f"fastvl.models.lxmert: argument 'input_ids' must be [B, L], got {tuple(input_ids.shape)}")
        b, width = input_ids.shape
        for name, t, last in (("visual_feats", visual_feats, cfg.visual_feat_dim),
                              ("visual_pos", visual_pos, cfg.visual_pos_dim)):
            if t is None:
                raise ValueError(f"fastvl.models.lxmert: argument '{name}' is required")
            if t.dim() != 3 or t.shape[0] != b or t.shape[-1] != last:
                raise ValueError(f"fastvl.models.lxmert: argument '{name}' must be [B={b}, N, {last}], got "
                                 f"{tuple(t.shape)}")
        if visual_pos.shape[1] != visual_feats.shape[1]:
            raise ValueError(f"fastvl.models.lxmert: 'visual_pos' has {visual_pos.shape[1]} regions but 'visual_feats' "
                             f"has {visual_feats.shape[1]}")
        if width > cfg.max_position_embeddings:
            raise ValueError(f"fastvl.models.lxmert: 'input_ids' has {width} positions, more than "
                             f"max_position_embeddings = {cfg.max_position_embeddings}")
        n = visual_feats.shape[1]
        txt_lens = _lengths(attention_mask, (b, width), "attention_mask", input_ids.device)
        img_lens = _lengths(visual_attention_mask, (b, n), "visual_attention_mask", input_ids.device)
        if min(txt_lens, default=1) < 1:
            raise ValueError("fastvl.models.lxmert: argument 'attention_mask' has a row with no token (every example "
                             "needs at least its [CLS])")
        return make_layout(txt_lens, img_lens, input_ids.device, txt_width=width, img_width=n)

    def forward(self, input_ids: torch.Tensor | None = None, visual_feats: torch.Tensor | None = None,
                visual_pos: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                visual_attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                txt_delta: torch.Tensor | None = None, img_delta: torch.Tensor | None = None
                ) -> LxmertModelOutput:
        """The port's forward on padded inputs.

        Args:
            input_ids: [B, L] long. visual_feats: [B, N, visual_feat_dim]. visual_pos: [B, N, visual_pos_dim]
            (normalised boxes). attention_mask: [B, L], visual_attention_mask: [B, N] (1 = real, right-padded;
            None = all real). token_type_ids: [B, L] (default 0). txt_delta [B, L, H] / img_delta [B, N, D]:
            optional perturbations (VILLA) of the word embeddings / raw features.
        Returns:
            :class:`LxmertModelOutput`: language_output [B, L, H], vision_output [B, N, H], pooled_output [B, H],
            with ``output_hidden_states`` / ``output_attentions`` the per-layer tuples (0 at padding).
        """
        if inputs_embeds is not None:
            raise ValueError("fastvl.models.lxmert: argument 'inputs_embeds' is not supported (give input_ids)")
        out, layout = self.forward_padded(input_ids, visual_feats, visual_pos, attention_mask, visual_attention_mask,
                                          token_type_ids, bool(output_attentions), bool(output_hidden_states),
                                          txt_delta, img_delta)
        return self.padded_output(out, layout, input_ids.shape[1], visual_feats.shape[1])

    def forward_padded(self, input_ids, visual_feats, visual_pos, attention_mask, visual_attention_mask,
                       token_type_ids=None, output_attentions: bool = False, output_hidden_states: bool = False,
                       txt_delta=None, img_delta=None) -> tuple[LxmertPackedOutput, PackedLayout]:
        """The port's padded inputs -> (packed outputs, their layout); attentions are [B, h, L, N]-wide."""
        layout = self.pack_inputs(input_ids, visual_feats, visual_pos, attention_mask, visual_attention_mask)
        ts, is_ = layout.txt_src, layout.img_src
        h = self.config.hidden_size
        flat_ids = input_ids.reshape(-1)[ts]
        types = None if token_type_ids is None else token_type_ids.reshape(-1)[ts]
        feats = visual_feats.reshape(-1, visual_feats.shape[-1])[is_]
        pos = visual_pos.reshape(-1, visual_pos.shape[-1])[is_].to(feats.dtype)
        tdel = None if txt_delta is None else txt_delta.reshape(-1, h)[ts]
        idel = None if img_delta is None else img_delta.reshape(-1, visual_feats.shape[-1])[is_]
        dims = StreamDims(layout.cu_txt, layout.cu_img, input_ids.shape[1], visual_feats.shape[1])
        out = self.encode_packed(flat_ids, layout.txt_pos, types, feats, pos, dims, output_attentions,
                                 output_hidden_states, tdel, idel)
        return out, layout

    @staticmethod
    def scatter_padded(x: torch.Tensor, src: torch.Tensor, b: int, width: int) -> torch.Tensor:
        """Packed rows x [T, *F] -> padded [b, width, *F] (rows at ``src``, 0 elsewhere; differentiable)."""
        out = x.new_zeros(b * width, *x.shape[1:])
        return out.index_copy(0, src, x).view(b, width, *x.shape[1:])

    def padded_output(self, out: LxmertPackedOutput, layout: PackedLayout, width: int, n: int) -> LxmertModelOutput:
        """The port's output fields, padded, from packed outputs."""
        b = layout.batch_size

        def pad_t(x):
            return self.scatter_padded(x, layout.txt_src, b, width)

        def pad_i(x):
            return self.scatter_padded(x, layout.img_src, b, n)

        def tup(xs, fn=None):
            return tuple(fn(x) if fn else x for x in xs) if xs else None

        return LxmertModelOutput(
            language_output=pad_t(out.language_output), vision_output=pad_i(out.vision_output),
            pooled_output=out.pooled_output, language_hidden_states=tup(out.language_hidden_states, pad_t),
            vision_hidden_states=tup(out.vision_hidden_states, pad_i), language_attentions=tup(out.language_attentions),
            vision_attentions=tup(out.vision_attentions), cross_encoder_attentions=tup(out.cross_encoder_attentions))
