"""HERO (video + subtitles) on packed segments, drop-in for the official ``model/model.py`` / ``encoder.py`` /
``pretrain.py`` classes: the same constructors, the same ``state_dict`` keys and shapes.

``v_encoder(batch, 'repr')`` takes the official ``video_collate`` dict. Inside, all subtitle segments of the batch
run as ONE packed varlen sequence set through the cross-modal transformer (no padding tokens, no per-segment loop),
the segments' frame outputs are fused onto their video frames with one ``index_add``, and the temporal transformer
attends over the real frames only (every frame slot, padding slots included, is still a query, as in the official
padded encoder, so the output equals the official one everywhere).

The pre-training task forwards MLM, MFFR, MFM-NCE and FOM are in :mod:`.pretrain`, VSM in :mod:`.vsm`
(``forward(batch, task, compute_loss)``); the queries run through the text-only pass packed, and the query encoder
pools them packed. Not here: the RoBERTa-init path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...nn import BertAttention, BertPooler
from .config import HeroSubConfig, VideoModelConfig
from .layers import (
    FrameEmbeddings,
    FrameFeatureRegression,
    HeroEncoder,
    HeroLMPredictionHead,
    ImageEmbeddings,
    LinearLayer,
    MLPLayer,
    QueryFeatEmbeddings,
    SubEmbeddings,
)
from .layout import HeroSegmentLayout, TextLayout
from .pretrain import PRETRAIN_TASKS, forward_fom, forward_mfm, forward_mlm, require_key
from .vsm import VsmMethods

__all__ = ["CrossModalTrm", "HeroForPretraining", "HeroModel", "HierarchicalVlModel", "QueryFeatEncoder",
           "TemporalTrm", "init_hero_weights", "load_hero_state_dict"]


def init_hero_weights(module: nn.Module, initializer_range: float) -> None:
    """The official init: Linear / Embedding weights ~ N(0, initializer_range) (padding rows included), Linear
    biases 0, LayerNorm weight 1 and bias 0. Apply with ``model.apply(lambda m: init_hero_weights(m, r))``."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.data.normal_(mean=0.0, std=initializer_range)
    elif isinstance(module, nn.LayerNorm):
        module.bias.data.zero_()
        module.weight.data.fill_(1.0)
    if isinstance(module, nn.Linear) and module.bias is not None:
        module.bias.data.zero_()


def _check_feat(name: str, feat: torch.Tensor, dim: int, ndim: int = 3) -> None:
    if not isinstance(feat, torch.Tensor) or feat.dim() != ndim or feat.shape[-1] != dim:
        shape = tuple(feat.shape) if isinstance(feat, torch.Tensor) else type(feat).__name__
        raise ValueError(f"fastvl.models.hero: {name} must be [..., {dim}] with {ndim} dims (vfeat_dim={dim}), "
                         f"got {shape}")


class CrossModalTrm(nn.Module):
    """The cross-modal (frame + subtitle) transformer, ``v_encoder.f_encoder``.

    Args:
        config: the ``f_config`` block. vfeat_dim: frame feature size. max_img_seq_len: frame slots per segment.
    """

    def __init__(self, config: HeroSubConfig, vfeat_dim: int, max_img_seq_len: int):
        super().__init__()
        self.config = config
        self.vfeat_dim = vfeat_dim
        self.encoder = HeroEncoder(config)
        self.embeddings = SubEmbeddings(config)
        self.img_embeddings = ImageEmbeddings(config, vfeat_dim, max_img_seq_len)
        self.pooler = BertPooler(config.hidden_size)
        self.apply(lambda m: init_hero_weights(m, config.initializer_range))
        self.lm_head = HeroLMPredictionHead(config, self.embeddings.word_embeddings.weight)
        self.vocab_pad = 0
        self.register_buffer("pad", torch.zeros(8, config.hidden_size))

    def embed_packed(self, batch: dict[str, Any], layout: HeroSegmentLayout) -> torch.Tensor:
        """The packed segment embeddings [T, H]: per segment its valid frames, then its subtitle tokens."""
        f_ids = batch["f_sub_input_ids"]
        f_feats = batch["f_v_feats"]
        _check_feat("f_v_feats", f_feats, self.vfeat_dim)
        n_seg, max_sl = f_ids.shape
        max_vl = f_feats.shape[1]
        txt_pos = batch.get("f_sub_pos_ids")
        if txt_pos is None:
            txt_pos = torch.arange(max_sl, device=f_ids.device).clamp_(max=511).unsqueeze(0)
        frm_pos = batch.get("f_v_pos_ids")
        if frm_pos is None:
            frm_pos = torch.arange(max_vl, device=f_ids.device).unsqueeze(0)
        ids = f_ids.reshape(-1).index_select(0, layout.txt_src)
        tpos = txt_pos.expand(n_seg, max_sl).reshape(-1).index_select(0, layout.txt_src)
        txt_emb = self.embeddings(ids, tpos)
        feats = f_feats.reshape(n_seg * max_vl, -1).index_select(0, layout.frm_src)
        fpos = frm_pos.expand(n_seg, max_vl).reshape(-1).index_select(0, layout.frm_src)
        masks = batch.get("f_v_masks")
        if masks is not None:
            masks = masks.reshape(-1).index_select(0, layout.frm_src)
        frm_emb = self.img_embeddings(feats, self.embeddings.default_type_embedding(), fpos, masks)
        out = txt_emb.new_zeros(layout.total, txt_emb.shape[-1])
        return out.index_copy(0, layout.frm_dst, frm_emb.to(out.dtype)).index_copy(0, layout.txt_dst, txt_emb)

    def forward_packed(self, batch: dict[str, Any], layout: HeroSegmentLayout) -> torch.Tensor:
        """All segments of the batch through the transformer as one packed set: -> [T, H] (layout order)."""
        return self.encoder(self.embed_packed(batch, layout), layout.cu_seqlens, layout.max_seqlen)

    def embed_txt_packed(self, input_ids: torch.Tensor, pos_ids: torch.Tensor | None,
                         layout: TextLayout) -> torch.Tensor:
        """Text embeddings (type row 1) of the real tokens of a padded text batch: -> [T, H] (layout order)."""
        n, width = input_ids.shape
        if pos_ids is None:  # the official SubEmbeddings default: RoBERTa positions from the ids
            real = input_ids.ne(self.embeddings.padding_idx).long()
            pos_ids = torch.cumsum(real, 1) * real + self.embeddings.padding_idx
        ids = input_ids.reshape(-1).index_select(0, layout.rows)
        pos = pos_ids.expand(n, width).reshape(-1).index_select(0, layout.rows)
        return self.embeddings(ids, pos)

    def forward_txt_packed(self, input_ids: torch.Tensor, pos_ids: torch.Tensor | None,
                           attn_masks: torch.Tensor) -> tuple[torch.Tensor, TextLayout]:
        """The official 'txt' pass (text only) on the real tokens, packed: input_ids / attn_masks [N, L],
        pos_ids [1 or N, L] -> ([T, H], layout)."""
        if input_ids.dim() != 2 or attn_masks.shape != input_ids.shape:
            raise ValueError(f"fastvl.models.hero: text input_ids {tuple(input_ids.shape)} and attn_masks "
                             f"{tuple(attn_masks.shape)} must both be [N, L]")
        layout = TextLayout.from_mask(attn_masks)
        hidden = self.encoder(self.embed_txt_packed(input_ids, pos_ids, layout), layout.cu_seqlens,
                              layout.max_seqlen)
        return hidden, layout

    def forward(self, batch: dict[str, Any], task: str = "repr", compute_loss: bool = True) -> Any:
        """The official dispatch: ``'txt'`` (keys ``input_ids``, ``pos_ids``, ``attn_masks``) -> (sequence output
        [N, L, H] with every padded row as the official padded encoder computes it, pooled [N, H]); ``'mlm*'``
        -> see :func:`fastvl.models.hero.pretrain.forward_mlm`."""
        if task == "txt":
            ids = require_key(batch, "input_ids", "txt")
            masks = require_key(batch, "attn_masks", "txt")
            layout = TextLayout.from_mask(masks)
            n, width = ids.shape
            pos_ids = batch.get("pos_ids")
            all_rows = TextLayout.from_mask(torch.ones_like(masks))
            emb = self.embed_txt_packed(ids, pos_ids, all_rows).view(n, width, -1)
            out = self.encoder.forward_all_queries(emb, layout.rows, layout.cu_seqlens, max(layout.max_seqlen, 1))
            return out, self.pooler(out)
        if isinstance(task, str) and task.startswith("mlm"):
            return forward_mlm(self, batch, compute_loss, task)
        raise ValueError(f"fastvl.models.hero: CrossModalTrm task must be 'txt' or 'mlm*', got {task!r}")


class TemporalTrm(nn.Module):
    """The temporal transformer over all frames of a video, ``v_encoder.c_encoder``."""

    def __init__(self, config: HeroSubConfig):
        super().__init__()
        self.config = config
        self.embeddings = FrameEmbeddings(config)
        self.encoder = HeroEncoder(config)
        self.pooler = BertPooler(config.hidden_size)
        self.apply(lambda m: init_hero_weights(m, config.initializer_range))

    def forward(self, clip_level_frame_feat: torch.Tensor, layout: HeroSegmentLayout,
                clip_level_pos_ids: torch.Tensor | None = None) -> torch.Tensor:
        """clip_level_frame_feat [B, L, H] (fused frames), layout of the batch -> [B, L, H]."""
        emb = self.embeddings(clip_level_frame_feat, clip_level_pos_ids)
        return self.encoder.forward_all_queries(emb, layout.clip_rows, layout.cu_clip, max(layout.clip_lens))


class QueryFeatEncoder(nn.Module):
    """The VSM query encoder (``q_feat_attn``): LN -> Dropout -> Linear -> ReLU, + position embedding -> LN ->
    Dropout, one BertAttention layer (no FFN), then attention pooling with ``modular_vector_mapping`` (when
    ``modularized``)."""

    def __init__(self, config: HeroSubConfig, qfeat_dim: int, modularized: bool = True):
        super().__init__()
        self.query_input_proj = LinearLayer(qfeat_dim, config.hidden_size, layer_norm=True,
                                            dropout=config.hidden_dropout_prob, relu=True)
        self.query_pos_embed = QueryFeatEmbeddings(config)
        self.query_self_attention = BertAttention(config.hidden_size, config.num_attention_heads,
                                                  config.attention_probs_dropout_prob, config.hidden_dropout_prob)
        self.modularized = modularized
        if modularized:
            self.modular_vector_mapping = nn.Linear(config.hidden_size, 1, bias=False)

    def forward_packed(self, query_feat: torch.Tensor, layout: TextLayout) -> torch.Tensor:
        """query_feat [T, qfeat_dim] (real tokens, packed as ``layout``) -> [N, H] pooled queries (modularized),
        else [T, H] the attended tokens."""
        x = self.query_input_proj(query_feat)
        pe = self.query_pos_embed
        x = pe.dropout(pe.LayerNorm(x + pe.position_embeddings(layout.cols)))
        attended = self.query_self_attention(x, layout.cu_seqlens, max(layout.max_seqlen, 1))
        if not self.modularized:
            return attended
        scores = self.modular_vector_mapping(attended).squeeze(-1)  # [T]
        seg = layout.seg_ids
        with torch.no_grad():
            top = scores.new_full((layout.n,), float("-inf")).scatter_reduce(0, seg, scores, "amax")
        weights = torch.exp(scores - top.index_select(0, seg))
        denom = weights.new_zeros(layout.n).index_add(0, seg, weights)
        weights = weights / denom.index_select(0, seg)
        return attended.new_zeros(layout.n, attended.shape[-1]).index_add(0, seg, weights.unsqueeze(-1) * attended)

    def forward(self, query_feat: torch.Tensor, query_attn_mask: torch.Tensor,
                query_pos_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The official signature: query_feat [N, L, D], query_attn_mask [N, L] -> [N, H] (modularized) or the
        attended tokens [N, L, H] (zeros at padding). Runs packed over the real tokens (``query_pos_ids`` is
        ignored, as officially)."""
        layout = TextLayout.from_mask(query_attn_mask, "query_attn_mask")
        n, width = query_attn_mask.shape
        out = self.forward_packed(query_feat.reshape(n * width, -1).index_select(0, layout.rows), layout)
        if self.modularized:
            return out
        full = out.new_zeros(n * width, out.shape[-1]).index_copy(0, layout.rows, out)
        return full.view(n, width, -1)


class HierarchicalVlModel(nn.Module):
    """``v_encoder``: cross-modal transformer, fusion, frame_transform, temporal transformer, and the MFM / FOM
    heads (parameters only for now).

    Args:
        config: VideoModelConfig. vfeat_dim: frame feature size (4352 official). max_frm_seq_len: frame slots per
        segment (100 official). max_clip_len: FOM classes (100).
    """

    def __init__(self, config: VideoModelConfig, vfeat_dim: int, max_frm_seq_len: int, max_clip_len: int = 100,
                 nce_temp: float = 1.0):
        super().__init__()
        self.config = config
        self.vfeat_dim = vfeat_dim
        f_cfg, c_cfg = config.f_config, config.c_config
        self.f_encoder = CrossModalTrm(f_cfg, vfeat_dim, max_frm_seq_len)
        self.frame_transform = LinearLayer(vfeat_dim, f_cfg.hidden_size, layer_norm=True,
                                           dropout=f_cfg.hidden_dropout_prob, relu=True)
        self.c_encoder = TemporalTrm(c_cfg)
        self.feat_regress = FrameFeatureRegression(f_cfg.hidden_size, vfeat_dim)
        self.nce_temp = nce_temp
        self.mask_embedding = nn.Embedding(2, vfeat_dim, padding_idx=0)
        self.fom_output = MLPLayer(c_cfg.hidden_size, max_clip_len)
        self.register_buffer("pad", torch.zeros(8, c_cfg.hidden_size))
        if f_cfg.hidden_size != c_cfg.hidden_size:
            raise ValueError(f"fastvl.models.hero: f_config.hidden_size ({f_cfg.hidden_size}) must equal "
                             f"c_config.hidden_size ({c_cfg.hidden_size}) (segment outputs are added onto frames)")

    def forward(self, batch: dict[str, Any], task: str = "repr",
                compute_loss: bool = True) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The official task dispatch on that task's collate dict (see :mod:`fastvl.models.hero.pretrain`).

        ``'repr'`` -> [B, max_frames, H]; ``'mlm*'`` -> [n_masked] loss or [n_masked, V] scores; ``'mffr'`` ->
        [n, D] squared error or predictions; ``'mfm-nce'`` -> [n] loss or (predictions, negatives); ``'fom'`` ->
        scalar loss or logits [B * max_frames, max_clip_len].
        """
        if task == "repr":
            return self.forward_repr(batch)
        if isinstance(task, str) and task.startswith("mlm"):
            return forward_mlm(self.f_encoder, batch, compute_loss, task)
        if task == "mffr":
            return forward_mfm(self, batch, compute_loss, loss="regression")
        if task == "mfm-nce":
            return forward_mfm(self, batch, compute_loss, loss="nce")
        if task == "fom":
            return forward_fom(self, batch, compute_loss)
        raise ValueError(f"fastvl.models.hero: v_encoder task must be 'repr' or one of {list(PRETRAIN_TASKS)} "
                         f"('mlm*' prefixes included), got {task!r}")

    def fuse(self, batch: dict[str, Any], encode_clip: bool = True) -> tuple[torch.Tensor, HeroSegmentLayout]:
        """frame_transform(c_v_feats) + the segments' frame outputs: -> ([B, L, H], layout)."""
        c_feats = batch.get("c_v_feats")
        _check_feat("c_v_feats", c_feats, self.vfeat_dim)
        _check_feat("f_v_feats", batch.get("f_v_feats"), self.vfeat_dim)
        layout = HeroSegmentLayout.from_batch(batch)
        seg_out = self.f_encoder.forward_packed(batch, layout)  # [T, H]
        n_vid, n_frm = c_feats.shape[:2]
        matched = seg_out.new_zeros(n_vid * n_frm, seg_out.shape[-1])
        matched = matched.index_add(0, layout.fuse_dst, seg_out.index_select(0, layout.fuse_src))
        return self.frame_transform(c_feats) + matched.view(n_vid, n_frm, -1), layout

    def forward_repr(self, batch: dict[str, Any]) -> torch.Tensor:
        """Official collate dict -> [B, max_frames, H] (the temporal transformer output)."""
        fused, layout = self.fuse(batch)
        return self.c_encoder(fused, layout)


def load_hero_state_dict(model: nn.Module, state_dict: dict[str, Any], strict: bool = True) -> nn.Module:
    """Load an official HERO checkpoint dict: non-tensor entries (``'vocab_padded': True``) are skipped, tensors
    are cast to the model's parameter dtype (fp16 checkpoints load as fp32), official ``gamma`` / ``beta`` names
    map to ``weight`` / ``bias``. Missing or unexpected keys raise under ``strict``."""
    target = {k: v.dtype for k, v in model.state_dict().items()}
    clean: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            continue
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        clean[key] = value.to(target[key]) if key in target and value.is_floating_point() else value
    model.load_state_dict(clean, strict=strict)
    return model


class HeroModel(nn.Module):
    """The HERO encoder (``v_encoder``) as in the official ``HeroModel(config, vfeat_dim, max_frm_seq_len)``."""

    def __init__(self, config: VideoModelConfig | str | Path | dict, vfeat_dim: int, max_frm_seq_len: int):
        super().__init__()
        if not isinstance(config, VideoModelConfig):
            config = VideoModelConfig(config)
        if not isinstance(vfeat_dim, int) or vfeat_dim <= 0:
            raise ValueError(f"fastvl.models.hero: vfeat_dim must be a positive int, got {vfeat_dim!r}")
        self.config = config
        self.v_encoder = HierarchicalVlModel(config, vfeat_dim, max_frm_seq_len)
        self.v_encoder.apply(lambda m: init_hero_weights(m, config.f_config.initializer_range))

    @classmethod
    def from_pretrained(cls, config_file: str | Path | dict | VideoModelConfig, state_dict: dict[str, Any],
                        *inputs: Any, strict: bool = True, **kwargs: Any) -> nn.Module:
        """Build from the config, then load ``state_dict`` (see :func:`load_hero_state_dict`); an empty dict
        keeps the fresh initialisation, as the official method does."""
        config = config_file if isinstance(config_file, VideoModelConfig) else VideoModelConfig(config_file)
        model = cls(config, *inputs, **kwargs)
        if state_dict:
            load_hero_state_dict(model, state_dict, strict=strict)
        return model


class HeroForPretraining(VsmMethods, HeroModel):
    """HERO with the VSM heads, as the official ``HeroForPretraining`` (same arguments, same ``state_dict``).

    ``forward(batch, task, compute_loss)`` for ``'mlm*'``, ``'mffr'``, ``'mfm-nce'``, ``'fom'`` (delegated to
    ``v_encoder``) and ``'vsm'`` (:meth:`VsmMethods.forward_vsm`). ``gather_gpus`` (default True) gathers the VSM
    in-batch negatives across ranks under torch.distributed.
    """

    def __init__(self, config: VideoModelConfig | str | Path | dict, vfeat_dim: int, max_frm_seq_len: int,
                 conv_stride: int = 1, conv_kernel_size: int = 5, ranking_loss_type: str = "hinge",
                 margin: float = 0.1, lw_neg_ctx: float = 0, lw_neg_q: float = 0, lw_st_ed: float = 0.01,
                 drop_svmr_prob: float = 0, use_hard_negative: bool = False, hard_pool_size: int = 20,
                 hard_neg_weight: float = 10, use_all_neg: bool = True):
        super().__init__(config, vfeat_dim, max_frm_seq_len)
        cfg = self.config
        if cfg.q_config is None:
            raise ValueError("fastvl.models.hero: HeroForPretraining needs a q_config block in the config")
        if ranking_loss_type not in ("hinge", "lse"):
            raise ValueError(f"fastvl.models.hero: ranking_loss_type must be 'hinge' or 'lse', "
                             f"got {ranking_loss_type!r}")
        self.lw_st_ed, self.lw_neg_q, self.lw_neg_ctx = lw_st_ed, lw_neg_q, lw_neg_ctx
        self.ranking_loss_type = ranking_loss_type
        self.use_hard_negative, self.hard_pool_size = use_hard_negative, hard_pool_size
        self.hard_neg_weight, self.margin = hard_neg_weight, margin
        self.use_all_neg, self.drop_svmr_prob = use_all_neg, drop_svmr_prob
        self.gather_gpus = True
        conv = dict(in_channels=1, out_channels=1, kernel_size=conv_kernel_size, stride=conv_stride,
                    padding=conv_kernel_size // 2, bias=False)
        self.video_query_linear = nn.Linear(cfg.q_config.hidden_size, cfg.c_config.hidden_size)
        self.video_st_predictor = nn.Conv1d(**conv)
        self.video_ed_predictor = nn.Conv1d(**conv)
        self.qfeat_dim = cfg.f_config.hidden_size
        self.q_feat_attn = QueryFeatEncoder(cfg.q_config, self.qfeat_dim)

    def forward(self, batch: dict[str, Any], task: str = "vsm", compute_loss: bool = True) -> Any:
        """The official ``HeroForPretraining.forward``: ``'vsm'`` -> see :meth:`VsmMethods.forward_vsm`;
        ``'mlm*'``, ``'mffr'``, ``'mfm-nce'``, ``'fom'`` -> delegated to ``v_encoder`` (outputs as there)."""
        if task == "vsm":
            return self.forward_vsm(batch, compute_loss)
        if isinstance(task, str) and (task.startswith("mlm") or task in PRETRAIN_TASKS):
            return self.v_encoder(batch, task, compute_loss)
        raise ValueError(f"fastvl.models.hero: HeroForPretraining task must be 'vsm' or one of "
                         f"{list(PRETRAIN_TASKS)} ('mlm*' prefixes included), got {task!r}")
