"""UNITER (Chen et al., ECCV 2020): a drop-in, weight-compatible model that runs PACKED inside.

``from fastvl.models.uniter import UniterConfig, UniterModel, UniterForPretraining`` replaces the official
classes: same constructors, ``forward`` signatures and return values, same ``state_dict`` keys (ties included),
so official checkpoints load with ``strict=True``.

Inside, the encoder never sees padding: the official padded interface (``input_ids`` [B, Lt], ``img_feat``
[B, Li, D], ``attn_masks`` / ``gather_index`` [B, L]) is converted ONCE at the boundary to the packed layout
of DESIGN.md (all real tokens in one [T, H] tensor + ``cu_seqlens``), every layer runs on [T, H] with
:func:`fastvl.ops.cross_modal_attention`, pre-training heads run on the masked rows only, and outputs are
scattered back to the official padded shape (0 at positions where ``attn_masks`` is 0; the official model
leaves unspecified values there). The official interface carries no Python lengths, so that conversion
reads the per-example lengths from the device once per call; the native API
(:meth:`UniterModel.forward_packed` with a :class:`~fastvl.batch.PackedVLBatch`) has them as Python ints and
never synchronises with the device (unless ``check_finite`` is on, or an MLM batch does not say how many
tokens are masked).

``torch.compile(model, dynamic=True)`` works on either API; ``dynamic=True`` keeps one set of graphs for batches
of any lengths (the host-side index bookkeeping runs outside the graph).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ...batch import PackedVLBatch
from ...nn.bert import LAYER_NORM_EPS, BertLayer, BertPooler
from ...ops import unpack
from .config import UniterConfig, resolve_config
from .layout import PackedLayout, layout_from_official

__all__ = ["UniterConfig", "UniterModel", "UniterPreTrainedModel", "assert_finite", "checkpoint_key_map"]

logger = logging.getLogger(__name__)
POS_DIM = 7  # box feature: normalised x1, y1, x2, y2, w, h, and area


def assert_finite(name: str, t: torch.Tensor | None, where: str = "UniterModel") -> None:
    """Raise ValueError if ``t`` holds NaN or inf (reads the device: a debugging / trainer guard)."""
    if t is None or not t.is_floating_point():
        return
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        first = bad.nonzero()[0].tolist()
        raise ValueError(f"{where}: '{name}' has {int(bad.sum())} non-finite values (NaN/inf); first at index "
                         f"{first} of shape {list(t.shape)}")


# ----------------------------------------------------------------------------------------------------------
# Embeddings (shape-agnostic: [..., ] leading dims; packed [T] or padded [B, L])
# ----------------------------------------------------------------------------------------------------------


class UniterTextEmbeddings(nn.Module):
    """LayerNorm(word(ids) + position(pos) + token_type(type)) -> dropout."""

    def __init__(self, config: UniterConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                word_delta: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, position_ids, token_type_ids (default 0): [...] long; word_delta: [..., H] added to the word
        embeddings (VILLA's text perturbation) -> [..., H]."""
        words = self.word_embeddings(input_ids)
        if word_delta is not None:
            words = words + word_delta
        if token_type_ids is None:
            types = self.token_type_embeddings.weight[0]
        else:
            types = self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(words + self.position_embeddings(position_ids) + types))


class UniterImageEmbeddings(nn.Module):
    """LayerNorm(img_layer_norm(img_linear(feat [+ mask emb])) + pos_layer_norm(pos_linear(box)) + type) -> dropout."""

    def __init__(self, config: UniterConfig, img_dim: int):
        super().__init__()
        self.img_linear = nn.Linear(img_dim, config.hidden_size)
        self.img_layer_norm = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.pos_layer_norm = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.pos_linear = nn.Linear(POS_DIM, config.hidden_size)
        self.mask_embedding = nn.Embedding(2, img_dim, padding_idx=0)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, img_feat: torch.Tensor, img_pos_feat: torch.Tensor, type_embeddings: torch.Tensor,
                img_masks: torch.Tensor | None = None, feat_delta: torch.Tensor | None = None,
                zero_masked: bool = False) -> torch.Tensor:
        """img_feat [..., D], img_pos_feat [..., 7], type_embeddings [..., H] or [H], img_masks [...] (bool/int,
        1 = masked: mask_embedding row 1 is added; row 0 acts as zero), feat_delta [..., D] (VILLA) -> [..., H].

        ``zero_masked`` also zeroes the raw features of masked regions first (the official collate does this
        before the model; the packed path does it here so a batch cannot leak them).
        """
        if img_masks is not None:
            m = img_masks.bool().unsqueeze(-1)
            if zero_masked:
                img_feat = img_feat.masked_fill(m, 0.0)
        if feat_delta is not None:
            img_feat = img_feat + feat_delta
        if img_masks is not None:
            img_feat = torch.where(m, img_feat + self.mask_embedding.weight[1], img_feat)
        transformed_im = self.img_layer_norm(self.img_linear(img_feat))
        transformed_pos = self.pos_layer_norm(self.pos_linear(img_pos_feat))
        return self.dropout(self.LayerNorm(transformed_im + transformed_pos + type_embeddings))


class UniterEncoder(nn.Module):
    """``layer.N`` BERT layers on packed tokens."""

    def __init__(self, config: UniterConfig):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                output_all_encoded_layers: bool = True, **mask_kw) -> list[torch.Tensor]:
        """hidden [T, H] -> list of [T, H] (every layer, or only the last). ``mask_kw`` (``mask=``,
        ``prefix_lens=``) goes to every layer's attention (default: bidirectional)."""
        outs = []
        for layer in self.layer:
            hidden = layer(hidden, cu_seqlens, max_seqlen, **mask_kw)
            if output_all_encoded_layers:
                outs.append(hidden)
        return outs if output_all_encoded_layers else [hidden]


# ----------------------------------------------------------------------------------------------------------
# Base class: init and checkpoint loading
# ----------------------------------------------------------------------------------------------------------


class UniterPreTrainedModel(nn.Module):
    """Weight init (normal(0, initializer_range), LayerNorm 1/0, biases 0) and official checkpoint loading."""

    def __init__(self, config: UniterConfig, *inputs, **kwargs):
        super().__init__()
        if not isinstance(config, UniterConfig):
            raise TypeError(f"{type(self).__name__}: argument 'config' must be a UniterConfig, got "
                            f"{type(config).__name__} (use UniterConfig.from_json_file)")
        self.config = config

    def init_weights(self, module: nn.Module) -> None:
        """Official initialisation, applied with ``self.apply(self.init_weights)``."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    @classmethod
    def from_pretrained(cls, config_file: str | Path | UniterConfig | dict, state_dict: Mapping[str, torch.Tensor],
                        *inputs, **kwargs):
        """Build the model from a config and load an official state_dict non-strictly, as the official method.

        The official rule first: every key has ``gamma`` / ``beta`` renamed to ``weight`` / ``bias``; then, when the
        model has no ``bert`` attribute and some key starts with ``bert.``, that prefix is stripped and only the
        keys that had it are read (``bert.uniter.embeddings.*`` loads into ``uniter.embeddings.*``). Keys this rule
        leaves unloaded get fastvl's conveniences, and only for parameters the rule left missing: a BERT-style
        ``bert.X`` loads into ``uniter.X``, and the ``uniter.`` prefix is stripped (or added) when the model does
        (not) have a ``uniter`` attribute. Half-precision tensors are upcast; the missing and unexpected keys are
        logged (also kept in ``model.loading_info``). See :func:`checkpoint_key_map` for the mapping alone.

        Args:
            config_file: official JSON path, fastvl YAML path / size name, dict or UniterConfig.
            state_dict: name -> tensor (e.g. ``torch.load`` of an official checkpoint); not modified.
            *inputs, **kwargs: constructor arguments after the config (``img_dim``, ``img_label_dim``).
        """
        config = config_file if isinstance(config_file, UniterConfig) else resolve_config(config_file)
        model = cls(config, *inputs, **kwargs)
        own = model.state_dict()
        mapping = checkpoint_key_map(state_dict.keys(), own.keys(), has_bert=hasattr(model, "bert"),
                                     has_uniter=hasattr(model, "uniter"))
        sd = {}
        for key, target in mapping.items():
            v = state_dict[key]
            sd[target] = v.to(own[target].dtype) if v.is_floating_point() and v.dtype != own[target].dtype else v
        used = set(mapping)
        result = model.load_state_dict(sd, strict=False)
        missing = list(result.missing_keys)
        unexpected = [k for k in state_dict if k not in used]
        if missing:
            logger.info("Weights of %s not initialized from pretrained model: %s", cls.__name__, missing)
        if unexpected:
            logger.info("Weights from pretrained model not used in %s: %s", cls.__name__, unexpected)
        model.loading_info = {"missing_keys": missing, "unexpected_keys": unexpected}
        return model


def _official_rename(key: str) -> str:
    """The official gamma/beta rename of one key (``beta`` is replaced in the original key, as upstream does)."""
    if "beta" in key:
        return key.replace("beta", "bias")
    return key.replace("gamma", "weight")


def checkpoint_key_map(keys, own_keys, has_bert: bool = False, has_uniter: bool = True) -> dict[str, str]:
    """Checkpoint key -> model key, for the checkpoint keys :meth:`UniterPreTrainedModel.from_pretrained` loads.

    Args:
        keys: the checkpoint's keys. own_keys: the model's ``state_dict`` keys.
        has_bert, has_uniter: whether the model has a ``bert`` / ``uniter`` attribute.
    Returns:
        the official rule's matches first (gamma/beta renamed; a leading ``bert.`` stripped when the model has no
        ``bert`` attribute and some key has it, keys without it then unread), then, for model keys still unmatched,
        fastvl's conveniences on the remaining checkpoint keys (``bert.X`` -> ``uniter.X``; ``uniter.`` stripped
        or added to fit the model).
    """
    keys, own = list(keys), set(own_keys)
    renamed = {k: _official_rename(k) for k in keys}
    strip_bert = not has_bert and any(k.startswith("bert.") for k in renamed.values())
    mapping: dict[str, str] = {}
    for k, new in renamed.items():
        if strip_bert:
            if not new.startswith("bert."):
                continue
            new = new[len("bert."):]
        if new in own:
            mapping[k] = new
    taken = set(mapping.values())
    rest = {k: renamed[k] for k in keys if k not in mapping}
    if has_uniter:
        rest = {k: "uniter." + v[len("bert."):] if v.startswith("bert.") else v for k, v in rest.items()}
        if not any(v.startswith("uniter.") for v in rest.values()):
            rest = {k: "uniter." + v if "uniter." + v in own else v for k, v in rest.items()}
    else:
        rest = {k: v.removeprefix("uniter.") for k, v in rest.items()}
    for k, new in rest.items():
        if new in own and new not in taken:
            mapping[k] = new
            taken.add(new)
    return mapping


# ----------------------------------------------------------------------------------------------------------
# UniterModel
# ----------------------------------------------------------------------------------------------------------


class UniterModel(UniterPreTrainedModel):
    """The single-stream UNITER encoder. ``UniterModel(config, img_dim)`` as the official class.

    Attributes:
        check_finite: when True, every forward checks image features (and VILLA deltas) for NaN/inf and raises
            a ValueError naming the field (reads the device; the trainer turns it on). Default False.
    """

    def __init__(self, config: UniterConfig, img_dim: int | None = None):
        super().__init__(config)
        self.img_dim = config.img_dim if img_dim is None else int(img_dim)
        self.embeddings = UniterTextEmbeddings(config)
        self.img_embeddings = UniterImageEmbeddings(config, self.img_dim)
        self.encoder = UniterEncoder(config)
        self.pooler = BertPooler(config.hidden_size)
        self.check_finite = False
        self.apply(self.init_weights)

    # ------------------------------------------------------------------------------------------ validation
    def validate_images(self, img_feat: torch.Tensor, img_pos_feat: torch.Tensor, feat_name: str = "img_feat",
                        pos_name: str = "img_pos") -> None:
        """Raise a ValueError naming the field unless img_feat [..., img_dim] and img_pos_feat [..., 7] agree with
        the model and with each other (``feat_name`` / ``pos_name``: the names the message gives them)."""
        if img_feat.shape[-1] != self.img_dim:
            raise ValueError(f"UniterModel: '{feat_name}' has feature size {img_feat.shape[-1]} but the model was "
                             f"built with img_dim={self.img_dim} (shape {list(img_feat.shape)})")
        if img_pos_feat.shape[-1] != POS_DIM:
            raise ValueError(f"UniterModel: '{pos_name}' must have {POS_DIM} box features in its last dim, got shape "
                             f"{list(img_pos_feat.shape)}")
        if img_pos_feat.shape[:-1] != img_feat.shape[:-1]:
            raise ValueError(f"UniterModel: '{pos_name}' has shape {list(img_pos_feat.shape)} but '{feat_name}' has "
                             f"{list(img_feat.shape)}; they must agree in every dim but the last")

    def _check_positions(self, max_txt: int, name: str) -> None:
        limit = self.config.max_position_embeddings
        if max_txt > limit:
            raise ValueError(f"UniterModel: '{name}' has a text of {max_txt} tokens but max_position_embeddings is "
                             f"{limit}; truncate texts to at most {limit} tokens")

    def check_inputs_finite(self, check: bool | None, **tensors: torch.Tensor | None) -> None:
        """When ``check`` (None: the ``check_finite`` attribute) is on, raise a ValueError naming the first of
        ``tensors`` (name=tensor of any shape, None skipped) holding NaN or inf (reads the device)."""
        if self.check_finite if check is None else check:
            for name, t in tensors.items():
                assert_finite(name, t)

    # ------------------------------------------------------------------------------------------ packed core
    def _type_rows(self, type_ids: torch.Tensor | None, default: int) -> torch.Tensor:
        table = self.embeddings.token_type_embeddings
        return table.weight[default] if type_ids is None else table(type_ids)

    def embed_packed(self, layout: PackedLayout, input_ids: torch.Tensor, position_ids: torch.Tensor,
                     img_feat: torch.Tensor, img_pos_feat: torch.Tensor, img_masks: torch.Tensor | None = None,
                     txt_type_ids: torch.Tensor | None = None, img_type_ids: torch.Tensor | None = None,
                     txt_delta: torch.Tensor | None = None, img_delta: torch.Tensor | None = None,
                     zero_masked: bool = True) -> torch.Tensor:
        """Joint packed embeddings [T, H] from packed text [T_txt] and region [T_img, ...] inputs (None = absent)."""
        parts = []
        if input_ids is not None:
            parts.append(self.embeddings(input_ids, position_ids, txt_type_ids, txt_delta))
        if img_feat is not None:
            types = self._type_rows(img_type_ids, 1)
            parts.append(self.img_embeddings(img_feat, img_pos_feat, types, img_masks, img_delta, zero_masked))
        cat = torch.cat(parts) if len(parts) > 1 else parts[0]
        if layout.n_txt == 0 or layout.n_img == 0:  # one modality: packed order is already the joint order
            return cat
        return cat[layout.joint_src]

    def encode_packed(self, embeddings: torch.Tensor, layout: PackedLayout, output_all_encoded_layers: bool = False,
                      **mask_kw) -> torch.Tensor | list[torch.Tensor]:
        """Run the encoder on joint packed embeddings [T, H] -> [T, H] (or a list of every layer's [T, H]).
        ``mask_kw`` (``mask=``, ``prefix_lens=``) selects the attention mask (default: bidirectional)."""
        outs = self.encoder(embeddings, layout.cu_seqlens, layout.max_seqlen, output_all_encoded_layers, **mask_kw)
        return outs if output_all_encoded_layers else outs[-1]

    def forward_packed(self, batch: PackedVLBatch, output_all_encoded_layers: bool = False,
                       layout: PackedLayout | None = None, txt_delta: torch.Tensor | None = None,
                       img_delta: torch.Tensor | None = None, check_finite: bool | None = None
                       ) -> torch.Tensor | list[torch.Tensor]:
        """The native API: a :class:`~fastvl.batch.PackedVLBatch` -> encoder output [T, H] (joint packed rows).

        Row ``cu_seqlens[i] + j`` is token j of example i's ``[txt_i | img_i]`` sequence. Regions flagged in
        ``batch.img_masks`` get their raw features zeroed and the mask embedding added. No host synchronisation.

        Args:
            batch: the packed batch (lengths as Python ints).
            output_all_encoded_layers: return a list with every layer's [T, H] instead of the last.
            layout: a precomputed :func:`layout_from_lengths` of this batch (else built here).
            txt_delta: [T_txt, H] added to the word embeddings; img_delta: [T_img, img_dim] added to the raw
                features (VILLA perturbations).
            check_finite: check features / deltas for NaN or inf (default: ``self.check_finite``).
        """
        self.validate_packed(batch, txt_delta, img_delta)
        layout = layout if layout is not None else self.layout(batch)
        self.check_inputs_finite(check_finite, img_feat=batch.img_feat, img_pos=batch.img_pos,
                                 txt_delta=txt_delta, img_delta=img_delta)
        pos = batch.position_ids if batch.position_ids is not None else layout.txt_pos
        emb = self.embed_packed(layout, batch.input_ids, pos, batch.img_feat, batch.img_pos, batch.img_masks,
                                batch.txt_type_ids, batch.img_type_ids, txt_delta, img_delta, zero_masked=True)
        return self.encode_packed(emb, layout, output_all_encoded_layers)

    @staticmethod
    @torch.compiler.disable
    def layout(batch: PackedVLBatch) -> PackedLayout:
        """The batch's packed layout (built once per batch: see :meth:`PackedVLBatch.packed_layout`)."""
        return batch.packed_layout()

    def validate_packed(self, batch: PackedVLBatch, txt_delta: torch.Tensor | None = None,
                        img_delta: torch.Tensor | None = None) -> None:
        """Raise (TypeError / ValueError naming the field) unless ``batch`` is a PackedVLBatch this model can encode:
        image features [T_img, img_dim] and boxes [T_img, 7], texts within ``max_position_embeddings``, optional
        per-row fields of T_txt / T_img rows, txt_delta [T_txt, H] and img_delta [T_img, img_dim]. Host-side
        shape checks only (no device read)."""
        if not isinstance(batch, PackedVLBatch):
            raise TypeError(f"UniterModel.forward_packed: argument 'batch' must be a PackedVLBatch, got "
                            f"{type(batch).__name__}")
        self.validate_images(batch.img_feat, batch.img_pos, "img_feat", "img_pos")
        self._check_positions(max(batch.txt_lens, default=0), "input_ids")
        for name, rows in (("position_ids", sum(batch.txt_lens)), ("txt_type_ids", sum(batch.txt_lens)),
                           ("img_type_ids", sum(batch.img_lens)), ("img_masks", sum(batch.img_lens))):
            t = getattr(batch, name)
            if t is not None and tuple(t.shape) != (rows,):
                raise ValueError(f"UniterModel: batch field '{name}' must have shape [{rows}], got {list(t.shape)}")
        for name, t, shape in (("txt_delta", txt_delta, (sum(batch.txt_lens), self.config.hidden_size)),
                               ("img_delta", img_delta, (sum(batch.img_lens), self.img_dim))):
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"UniterModel: argument '{name}' must have shape {list(shape)}, got {list(t.shape)}")

    def pool_packed(self, sequence_output: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        """Pooled output [B, H] from packed encoder output [T, H] (first token of every example)."""
        return self.pooler(sequence_output[layout.first_rows])

    # ------------------------------------------------------------------------------------------ official API
    def forward(self, input_ids: torch.Tensor | None, position_ids: torch.Tensor | None,
                img_feat: torch.Tensor | None, img_pos_feat: torch.Tensor | None, attention_mask: torch.Tensor,
                gather_index: torch.Tensor | None = None, img_masks: torch.Tensor | None = None,
                output_all_encoded_layers: bool = True, txt_type_ids: torch.Tensor | None = None,
                img_type_ids: torch.Tensor | None = None) -> torch.Tensor | list[torch.Tensor]:
        """The official interface (padded in, padded out).

        Args:
            input_ids: [B, Lt] long (None: image-only). position_ids: [1 or B, Lt] long.
            img_feat: [B, Li, img_dim] (None: text-only). img_pos_feat: [B, Li, 7].
            attention_mask: [B, L], 1 on each example's tl_i + nbb_i real joint positions.
            gather_index: [B, L] long (joint mode), as the official collate builds it.
            img_masks: [B, Li] bool/uint8, regions masked for MRM. txt_type_ids [B, Lt], img_type_ids [B, Li].
        Returns:
            list of [B, L, H] (one per layer) or, with output_all_encoded_layers=False, the last [B, L, H];
            0 where attention_mask is 0.
        """
        outs, layout = self.forward_official_packed(input_ids, position_ids, img_feat, img_pos_feat, attention_mask,
                                                    gather_index, img_masks, output_all_encoded_layers, txt_type_ids,
                                                    img_type_ids)[:2]
        width = attention_mask.shape[1]
        padded = [unpack(o, layout.cu_seqlens, width)[0] for o in outs]
        return padded if output_all_encoded_layers else padded[-1]

    def forward_official_packed(self, input_ids, position_ids, img_feat, img_pos_feat, attention_mask,
                                gather_index=None, img_masks=None, output_all_encoded_layers=False,
                                txt_type_ids=None, img_type_ids=None, counts=(), check_finite: bool | None = None):
        """Official inputs -> (list of packed [T, H] outputs, layout, counts as Python ints).

        ``counts``: extra 0-d integer tensors read in the same (single) device-to-host transfer as the lengths.
        """
        self._check_official(input_ids, position_ids, img_feat, img_pos_feat, attention_mask, gather_index, img_masks)
        self.check_inputs_finite(check_finite, img_feat=img_feat, img_pos_feat=img_pos_feat)
        layout, extra = layout_from_official(input_ids, img_feat, attention_mask, gather_index, counts)
        self._check_positions(layout.max_txt, "input_ids")
        ids = pos = ttype = feat = box = masks = itype = None
        if input_ids is not None:
            ids = input_ids.reshape(-1)[layout.txt_src]
            pos = position_ids.expand(input_ids.shape[0], -1).reshape(-1)[layout.txt_src]
            ttype = None if txt_type_ids is None else txt_type_ids.reshape(-1)[layout.txt_src]
        if img_feat is not None:
            feat = img_feat.reshape(-1, img_feat.shape[-1])[layout.img_src]
            box = img_pos_feat.reshape(-1, POS_DIM)[layout.img_src]
            masks = None if img_masks is None else img_masks.reshape(-1)[layout.img_src]
            itype = None if img_type_ids is None else img_type_ids.reshape(-1)[layout.img_src]
        emb = self.embed_packed(layout, ids, pos, feat, box, masks, ttype, itype, zero_masked=False)
        outs = self.encoder(emb, layout.cu_seqlens, layout.max_seqlen, output_all_encoded_layers)
        return outs, layout, extra

    def _check_official(self, input_ids, position_ids, img_feat, img_pos_feat, attention_mask, gather_index,
                        img_masks) -> None:
        if attention_mask is None or attention_mask.dim() != 2:
            got = None if attention_mask is None else list(attention_mask.shape)
            raise ValueError(f"UniterModel: 'attention_mask' must be a [B, L] tensor, got {got}")
        if input_ids is None and img_feat is None:
            raise ValueError("UniterModel: 'input_ids' and 'img_feat' are both None; give text, image or both")
        b, width = attention_mask.shape
        named = [("input_ids", input_ids, 2), ("img_feat", img_feat, 3), ("img_pos_feat", img_pos_feat, 3),
                 ("gather_index", gather_index, 2), ("img_masks", img_masks, 2)]
        for name, t, nd in named:
            if t is None:
                continue
            if t.dim() != nd:
                raise ValueError(f"UniterModel: '{name}' must be {nd}-d, got shape {list(t.shape)}")
            if t.shape[0] != b:
                raise ValueError(f"UniterModel: '{name}' has batch size {t.shape[0]} but 'attention_mask' has {b}")
        if input_ids is not None:
            if position_ids is None:
                raise ValueError("UniterModel: 'position_ids' is required with 'input_ids' ([1 or B, Lt] long)")
            if position_ids.dim() != 2 or position_ids.shape[0] not in (1, b) or position_ids.shape[1] != \
                    input_ids.shape[1]:
                raise ValueError(f"UniterModel: 'position_ids' must have shape [1 or {b}, {input_ids.shape[1]}], got "
                                 f"{list(position_ids.shape)}")
        if img_feat is not None:
            if img_pos_feat is None:
                raise ValueError("UniterModel: 'img_pos_feat' is required with 'img_feat' ([B, Li, 7])")
            self.validate_images(img_feat, img_pos_feat, "img_feat", "img_pos_feat")
            if img_masks is not None and img_masks.shape != img_feat.shape[:2]:
                raise ValueError(f"UniterModel: 'img_masks' must have shape {list(img_feat.shape[:2])}, got "
                                 f"{list(img_masks.shape)}")
        if input_ids is not None and img_feat is not None:
            if gather_index is None:
                raise ValueError("UniterModel: 'gather_index' ([B, L] long) is required when both text and image "
                                 "are given")
            if gather_index.shape[1] != width:
                raise ValueError(f"UniterModel: 'gather_index' has width {gather_index.shape[1]} but "
                                 f"'attention_mask' has {width}")
            if width > input_ids.shape[1] + img_feat.shape[1]:
                raise ValueError(f"UniterModel: 'attention_mask' has width {width} > text width {input_ids.shape[1]} "
                                 f"+ image width {img_feat.shape[1]}")
        else:
            single = input_ids if input_ids is not None else img_feat
            if single.shape[1] != width:
                name = "input_ids" if input_ids is not None else "img_feat"
                raise ValueError(f"UniterModel: single-modality '{name}' has length {single.shape[1]} but "
                                 f"'attention_mask' has width {width}")

    # ------------------------------------------------------------------------------------------ fine-tuning helpers
    def grow_type_embeddings(self, num_types: int, copy_rows: Mapping[int, int]) -> None:
        """Replace the token-type table by one with ``num_types`` rows: old rows kept, new rows initialised
        normal(0, initializer_range) then ``new[dst] = old[src]`` for every ``dst: src`` of ``copy_rows``."""
        old = self.embeddings.token_type_embeddings
        if num_types < old.num_embeddings:
            raise ValueError(f"grow_type_embeddings: 'num_types' ({num_types}) is smaller than the current table "
                             f"({old.num_embeddings} rows)")
        new = nn.Embedding(num_types, old.embedding_dim).to(old.weight.device, old.weight.dtype)
        self.init_weights(new)
        with torch.no_grad():
            new.weight[:old.num_embeddings].copy_(old.weight)
            for dst, src in copy_rows.items():
                if not (0 <= src < old.num_embeddings and old.num_embeddings <= dst < num_types):
                    raise ValueError(f"grow_type_embeddings: copy_rows entry {dst}: {src} out of range")
                new.weight[dst].copy_(old.weight[src])
        self.embeddings.token_type_embeddings = new
        self.config = self.config.replace(type_vocab_size=num_types)  # a copy: the caller's config is not changed

    def init_type_embedding(self, task: str) -> None:
        """Official type-table growth: ``nlvr2`` -> 3 rows (row 2 = image row 1); ``vcr`` -> 4 rows (rows 2, 3 =
        text row 0)."""
        presets = {"nlvr2": (3, {2: 1}), "vcr": (4, {2: 0, 3: 0})}
        if task not in presets:
            raise ValueError(f"init_type_embedding: 'task' must be one of {sorted(presets)}, got {task!r}")
        self.grow_type_embeddings(*presets[task])

    def grow_word_embeddings(self, num_special_tokens: int) -> nn.Embedding:
        """Append ``num_special_tokens`` rows (normal(0, initializer_range)) to the word table, as the official
        VCR model does (the new table has no padding index). Returns the new embedding."""
        if num_special_tokens < 0:
            raise ValueError(f"grow_word_embeddings: 'num_special_tokens' must be >= 0, got {num_special_tokens}")
        old = self.embeddings.word_embeddings
        new = nn.Embedding(old.num_embeddings + num_special_tokens, old.embedding_dim).to(old.weight.device,
                                                                                         old.weight.dtype)
        self.init_weights(new)
        with torch.no_grad():
            new.weight[:old.num_embeddings].copy_(old.weight)
        self.embeddings.word_embeddings = new
        self.config = self.config.replace(vocab_size=new.num_embeddings)
        return new
