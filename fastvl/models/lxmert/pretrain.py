"""LXMERT pre-training heads and ``LxmertForPreTraining`` (the port's module names, forward arguments and losses).

Heads: ``cls.predictions`` (MLM, decoder tied to the word embeddings), ``cls.seq_relationship`` (image-text
matching, 2-way on the pooled [CLS]), ``obj_predict_head`` (masked-object classification ``obj`` / ``attr`` and
feature regression ``feat`` on the vision stream), ``answer_head`` (QA on the pooled [CLS]).

The drop-in :meth:`LxmertForPreTraining.forward` sums the port's losses: mean MLM cross-entropy over labels != -100,
mean ITM cross-entropy, per object loss ``mean over B x N of (loss x mask_conf) x visual_loss_normalizer`` (feature
regression: smooth-L1, mean over the feature dimension), mean QA cross-entropy. Labels at padded positions must be
ignorable (-100 for MLM, mask_conf 0 for the object losses): they are checked, never silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...nn import BertLMPredictionHead, BertPredictionHeadTransform
from .config import LxmertConfig
from .model import LXMERT_LAYER_NORM_EPS, LxmertModel, LxmertPackedOutput, init_lxmert_weights

__all__ = ["LxmertForPreTraining", "LxmertForPreTrainingOutput", "LxmertPreTrainingHeads", "LxmertVisualAnswerHead",
           "LxmertVisualObjHead", "visual_loss"]


class LxmertPreTrainingHeads(nn.Module):
    """``predictions`` (MLM: transform, tied decoder, bias) and ``seq_relationship`` (ITM: Linear(H, 2))."""

    def __init__(self, config: LxmertConfig, word_embeddings: nn.Parameter):
        super().__init__()
        self.predictions = BertLMPredictionHead(config.hidden_size, config.hidden_act, word_embeddings)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)

    def forward(self, sequence_output: torch.Tensor, pooled_output: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """sequence_output [..., H], pooled_output [B, H] -> (vocabulary logits [..., V], ITM scores [B, 2])."""
        return self.predictions(sequence_output), self.seq_relationship(pooled_output)


class LxmertVisualObjHead(nn.Module):
    """``transform`` then one Linear per visual loss in ``decoder_dict`` (obj / attr / feat, as the config asks)."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config.hidden_size, config.hidden_act)
        self.visual_losses = config.visual_losses
        self.decoder_dict = nn.ModuleDict({k: nn.Linear(config.hidden_size, n) for k, n in self.visual_losses.items()})

    def forward(self, hidden_states: torch.Tensor, keys: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """hidden_states [..., H] -> {key: [..., width]} for ``keys`` (default: all)."""
        h = self.transform(hidden_states)
        return {k: self.decoder_dict[k](h) for k in (keys if keys is not None else self.visual_losses)}


class LxmertVisualAnswerHead(nn.Module):
    """``logit_fc``: Linear(H, 2H), GELU, LayerNorm(2H), Linear(2H, num_labels)."""

    def __init__(self, config: LxmertConfig, num_labels: int):
        super().__init__()
        h = config.hidden_size
        self.logit_fc = nn.Sequential(nn.Linear(h, 2 * h), nn.GELU(), nn.LayerNorm(2 * h, eps=LXMERT_LAYER_NORM_EPS),
                                      nn.Linear(2 * h, num_labels))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[B, H] -> [B, num_labels]."""
        return self.logit_fc(hidden_states)


@dataclass
class LxmertForPreTrainingOutput:
    """The port's ``LxmertForPreTrainingOutput`` fields (padded)."""

    loss: torch.Tensor | None = None
    prediction_logits: torch.Tensor | None = None
    cross_relationship_score: torch.Tensor | None = None
    question_answering_score: torch.Tensor | None = None
    language_hidden_states: tuple[torch.Tensor, ...] | None = None
    vision_hidden_states: tuple[torch.Tensor, ...] | None = None
    language_attentions: tuple[torch.Tensor, ...] | None = None
    vision_attentions: tuple[torch.Tensor, ...] | None = None
    cross_encoder_attentions: tuple[torch.Tensor, ...] | None = None


def visual_loss(key: str, scores: torch.Tensor, label: torch.Tensor, conf: torch.Tensor, denominator: int,
                normalizer: float) -> torch.Tensor:
    """One object loss as the port reduces it: sum over rows of (loss_row x conf_row) / denominator x normalizer.

    Args:
        key: 'obj' / 'attr' (cross-entropy on the class id; label -100 = ignored) or 'feat' (smooth-L1 against the
            target features, mean over the feature dimension).
        scores: [n, width]; label: [n] long ('obj' / 'attr') or [n, D] ('feat'); conf: [n] weights.
        denominator: the number of positions the port averages over (B x N padded; T_img packed).
    """
    if key == "feat":
        per_row = F.smooth_l1_loss(scores.float(), label.float(), reduction="none").mean(1)
    else:
        per_row = F.cross_entropy(scores.float(), label.long(), reduction="none", ignore_index=-100)
    return (per_row * conf.float()).sum() / max(denominator, 1) * normalizer


class LxmertForPreTraining(nn.Module):
    """LXMERT with its pre-training heads (the port's ``LxmertForPreTraining``: ``lxmert``, ``cls``,
    ``obj_predict_head`` when ``task_obj_predict``, ``answer_head`` when ``task_qa``)."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        if not isinstance(config, LxmertConfig):
            raise TypeError(f"fastvl.models.lxmert: 'config' must be an LxmertConfig, got {type(config).__name__}")
        self.config = config
        self.lxmert = LxmertModel(config)
        self.cls = LxmertPreTrainingHeads(config, self.lxmert.embeddings.word_embeddings.weight)
        if config.task_obj_predict:
            self.obj_predict_head = LxmertVisualObjHead(config)
        if config.task_qa:
            self.answer_head = LxmertVisualAnswerHead(config, config.num_qa_labels)
        for name, child in self.named_children():
            if name != "lxmert":
                init_lxmert_weights(child, config.initializer_range)
        with torch.no_grad():  # the tied table: N(0, range) with row 0 zero (the head's init drew it as a Linear)
            self.lxmert.embeddings.word_embeddings.weight.normal_(0.0, config.initializer_range)
            self.lxmert.embeddings.word_embeddings.weight[0].zero_()

    # ------------------------------------------------------------------------------------------ native API
    def forward_packed(self, batch, txt_delta: torch.Tensor | None = None, img_delta: torch.Tensor | None = None,
                       output_attentions: bool = False, output_hidden_states: bool = False) -> LxmertPackedOutput:
        """The encoder on a PackedVLBatch (see :meth:`LxmertModel.forward_packed`); heads are applied by the task."""
        return self.lxmert.forward_packed(batch, txt_delta, img_delta, output_attentions, output_hidden_states)

    def answer_scores(self, pooled_output: torch.Tensor) -> torch.Tensor:
        """QA scores [B, num_qa_labels] (the port returns ``pooled_output[0][0]`` when ``task_qa`` is off)."""
        return self.answer_head(pooled_output) if self.config.task_qa else pooled_output[0][0]

    @classmethod
    def from_pretrained(cls, path, config: LxmertConfig | str | None = None, strict: bool = True
                        ) -> LxmertForPreTraining:
        """The model with the port's weights: a ``save_pretrained`` / hub folder (config.json + model.safetensors or
        pytorch_model.bin) or a weights file with ``config``; strict (see :func:`load_lxmert_state`)."""
        from .checkpoint import lxmert_from_pretrained

        return lxmert_from_pretrained(cls, path, config, strict)

    # ------------------------------------------------------------------------------------------ drop-in
    def forward(self, input_ids: torch.Tensor | None = None, visual_feats: torch.Tensor | None = None,
                visual_pos: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                visual_attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                obj_labels: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                matched_label: torch.Tensor | None = None, ans: torch.Tensor | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None) -> LxmertForPreTrainingOutput:
        """The port's forward on padded inputs (arguments as :meth:`LxmertModel.forward`).

        Args:
            labels: [B, L] MLM targets, -100 = ignored. obj_labels: {key: (label, mask_conf)} for each of the config's
                visual losses; label [B, N] (obj / attr) or [B, N, D] (feat), mask_conf [B, N]. matched_label: [B]
                (1 = the text matches the image). ans: [B] answer ids.
        Returns:
            :class:`LxmertForPreTrainingOutput`: prediction_logits [B, L, V], cross_relationship_score [B, 2],
            question_answering_score [B, num_qa_labels], loss (the sum of the given tasks' losses) when any label
            is given.
        """
        cfg = self.config
        if inputs_embeds is not None:
            raise ValueError("fastvl.models.lxmert: argument 'inputs_embeds' is not supported (give input_ids)")
        enc = self.lxmert
        out, layout = enc.forward_padded(input_ids, visual_feats, visual_pos, attention_mask, visual_attention_mask,
                                         token_type_ids, bool(output_attentions), bool(output_hidden_states))
        b, width, n = input_ids.shape[0], input_ids.shape[1], visual_feats.shape[1]
        base = enc.padded_output(out, layout, width, n)
        lang_scores, cross_score = self.cls(out.language_output, out.pooled_output)
        prediction_logits = enc.scatter_padded(lang_scores, layout.txt_src, b, width)
        answer_score = self.answer_scores(out.pooled_output)
        given = any(x is not None for x in (labels, matched_label, obj_labels, ans))
        total = torch.zeros((), device=input_ids.device) if given else None
        if labels is not None and cfg.task_mask_lm:
            self._check_padding("labels", labels, (b, width), layout.txt_src, -100)
            flat = labels.reshape(-1)[layout.txt_src]
            total = total + F.cross_entropy(lang_scores.float(), flat, ignore_index=-100)
        if matched_label is not None and cfg.task_matched:
            total = total + F.cross_entropy(cross_score.view(-1, 2).float(), matched_label.view(-1))
        if obj_labels is not None and cfg.task_obj_predict:
            keys = tuple(cfg.visual_losses)
            missing = [k for k in keys if k not in obj_labels]
            if missing:
                raise ValueError(f"fastvl.models.lxmert: 'obj_labels' lacks {missing} (the config's visual losses are "
                                 f"{list(keys)})")
            scores = self.obj_predict_head(out.vision_output, keys)
            for key in keys:
                label, conf = obj_labels[key]
                self._check_padding(f"obj_labels['{key}'] mask_conf", conf, (b, n), layout.img_src, 0)
                lab = label.reshape(b * n, *label.shape[2:])[layout.img_src]
                total = total + visual_loss(key, scores[key], lab, conf.reshape(-1)[layout.img_src], b * n,
                                            cfg.visual_loss_normalizer)
        if ans is not None and cfg.task_qa:
            total = total + F.cross_entropy(answer_score.view(-1, cfg.num_qa_labels).float(), ans.view(-1))
        return LxmertForPreTrainingOutput(
            loss=total, prediction_logits=prediction_logits, cross_relationship_score=cross_score,
            question_answering_score=answer_score, language_hidden_states=base.language_hidden_states,
            vision_hidden_states=base.vision_hidden_states, language_attentions=base.language_attentions,
            vision_attentions=base.vision_attentions, cross_encoder_attentions=base.cross_encoder_attentions)

    @staticmethod
    def _check_padding(name: str, t: torch.Tensor, shape: tuple[int, int], src: torch.Tensor, ignore: float) -> None:
        """A label tensor [B, L] must hold ``ignore`` at every padded position (else the port would read garbage
        rows there and this model would silently drop them)."""
        if tuple(t.shape[:2]) != shape:
            raise ValueError(f"fastvl.models.lxmert: '{name}' must be {list(shape)}, got {tuple(t.shape)}")
        flat = t.reshape(shape[0] * shape[1])
        pad = torch.ones_like(flat, dtype=torch.bool)
        pad[src] = False
        if bool((flat[pad] != ignore).any()):
            raise ValueError(f"fastvl.models.lxmert: '{name}' must be {ignore} at padded positions (the masks mark "
                             f"them padding), got other values there")
