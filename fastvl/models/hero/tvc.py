"""HERO video captioning (TVC), drop-in for the official ``model/tvc.py``: ``HeroForTvc`` (a 2-layer transformer
decoder ``decoder.*`` over the caption's video segment, word embeddings and LM head shared with the cross-modal
transformer, label smoothing 0.1), ``LabelSmoothingLoss`` and ``TvcGenerator`` (greedy decoding as official;
beam search as an addition).

The decoder runs packed: its cross-attention reads only the real frames of each caption's segment
(``clip_ranges``) through one varlen call instead of a padded [N, max segment, H] copy.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ...nn import BertIntermediate, BertOutput, BertSelfAttention, BertSelfOutput
from ...ops import cross_modal_attention
from .config import HeroSubConfig, VideoModelConfig
from .layers import hero_layer_norm
from .layout import TextLayout
from .model import HeroModel
from .pretrain import require_key

__all__ = ["BertDecoder", "BertDecoderLayer", "HeroForTvc", "LabelSmoothingLoss", "TvcGenerator"]


class LabelSmoothingLoss(nn.Module):
    """KL(smoothed one-hot || softmax) per valid row, the official TVC loss (buffer ``one_hot`` [1, V]).

    Args:
        label_smoothing: in (0, 1]; the target gets 1 - label_smoothing, every other class label_smoothing / (V-1).
        tgt_vocab_size: V. ignore_index: rows with this target are dropped. reduction: 'none' | 'mean' | 'sum'.
    """

    def __init__(self, label_smoothing: float, tgt_vocab_size: int, ignore_index: int = -100,
                 reduction: str = "none"):
        if not 0.0 < label_smoothing <= 1.0:
            raise ValueError(f"fastvl.models.hero: label_smoothing must be in (0, 1], got {label_smoothing}")
        super().__init__()
        self.ignore_index = ignore_index
        self.register_buffer("one_hot", torch.full((tgt_vocab_size,), label_smoothing / (tgt_vocab_size - 1))
                             .unsqueeze(0))
        self.confidence = 1.0 - label_smoothing
        self.reduction = reduction

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """output [n, V] logits, target [n] -> loss per valid row [n_valid] (or its mean / sum)."""
        valid = target != self.ignore_index
        target = target[valid]
        logp = F.log_softmax(output[valid], dim=-1)
        smooth = self.one_hot[0].to(logp.dtype)
        conf = torch.as_tensor(self.confidence, dtype=logp.dtype, device=logp.device)
        # sum_v q_v (log q_v - logp_v) with q = smooth except q_target = confidence
        ent = torch.xlogy(smooth, smooth).sum() - torch.xlogy(smooth[target], smooth[target]) + torch.xlogy(conf, conf)
        cross = logp @ smooth + (conf - smooth[target]) * logp.gather(1, target.unsqueeze(1)).squeeze(1)
        loss = ent - cross
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        if self.reduction == "none":
            return loss
        raise ValueError(f"fastvl.models.hero: reduction must be 'none', 'mean' or 'sum', got {self.reduction!r}")


class BertDecoderLayer(nn.Module):
    """Causal self-attention + add&norm, decoder-encoder attention + add&norm, FFN + add&norm (official keys
    ``self_attention``, ``add_norm_1``, ``dec_enc_attention``, ``add_norm_2``, ``intermidiate``, ``add_norm_3``)."""

    def __init__(self, config: HeroSubConfig):
        super().__init__()
        h, heads = config.hidden_size, config.num_attention_heads
        self.self_attention = BertSelfAttention(h, heads, config.attention_probs_dropout_prob)
        self.add_norm_1 = BertSelfOutput(h, config.hidden_dropout_prob)
        self.dec_enc_attention = BertSelfAttention(h, heads, config.attention_probs_dropout_prob)
        self.add_norm_2 = BertSelfOutput(h, config.hidden_dropout_prob)
        self.intermidiate = BertIntermediate(h, config.intermediate_size, config.hidden_act)
        self.add_norm_3 = BertOutput(h, config.intermediate_size, config.hidden_dropout_prob)
        for mod in (self.add_norm_1, self.add_norm_2, self.add_norm_3):
            mod.LayerNorm.eps = config.layer_norm_eps

    def forward(self, dec: torch.Tensor, cu_dec: torch.Tensor, len_dec: int, enc: torch.Tensor,
                cu_enc: torch.Tensor, max_enc: int, empty_rows: torch.Tensor | None = None) -> torch.Tensor:
        """dec [Td, H] packed captions (cu_dec, longest len_dec), enc [Te, H] packed segment frames -> [Td, H].

        empty_rows: [Td] bool, caption rows whose segment has no frame (the official padded attention then
        averages zero rows: the context is the value bias).
        """
        p = self.self_attention.dropout.p if self.training else 0.0
        zeros = torch.zeros(cu_dec.shape[0] - 1, dtype=torch.int32, device=dec.device)
        q, k, v = self.self_attention.qkv(dec)
        ctx = cross_modal_attention(q, k, v, cu_dec, cu_dec, len_dec, len_dec, mask="seq2seq", prefix_lens=zeros,
                                    dropout_p=p)
        att = self.add_norm_1(ctx.reshape(dec.shape), dec)
        cross = self.dec_enc_attention
        q = cross.project_q(att)
        k, v = cross.project_kv(enc)
        ctx = cross_modal_attention(q, k, v, cu_dec, cu_enc, len_dec, max(max_enc, 1), mask="cross",
                                    dropout_p=cross.dropout.p if self.training else 0.0).reshape(att.shape)
        if empty_rows is not None:
            ctx = torch.where(empty_rows.unsqueeze(1), cross.value.bias.to(ctx.dtype).expand_as(ctx), ctx)
        out = self.add_norm_2(ctx, att)
        return self.add_norm_3(self.intermidiate(out), out)


class BertDecoder(nn.Module):
    """The stack (``layer.<i>``) plus the official ``tri_mask`` buffer [1024, 1024] (kept for the keys)."""

    def __init__(self, config: HeroSubConfig):
        super().__init__()
        self.layer = nn.ModuleList([BertDecoderLayer(config) for _ in range(config.num_hidden_layers)])
        tri = torch.tril(torch.ones(1024, 1024))
        self.register_buffer("tri_mask", (1.0 - tri) * -10000.0)

    def forward(self, dec: torch.Tensor, cu_dec: torch.Tensor, len_dec: int, enc: torch.Tensor,
                cu_enc: torch.Tensor, max_enc: int, empty_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Packed decoder: see :meth:`BertDecoderLayer.forward` -> [Td, H]."""
        for layer in self.layer:
            dec = layer(dec, cu_dec, len_dec, enc, cu_enc, max_enc, empty_rows)
        return dec


class HeroForTvc(HeroModel):
    """Video captioning (official ``HeroForTvc(config, vfeat_dim, max_frm_seq_len, lsr=0.1)``); the config needs a
    ``d_config`` block. State dict: HeroModel's + ``position_embeddings``, ``emb_LayerNorm``, ``decoder.*``
    (``decoder.tri_mask``) and ``loss_func.one_hot`` when lsr > 0."""

    def __init__(self, config: VideoModelConfig | str | Path | dict, vfeat_dim: int, max_frm_seq_len: int,
                 lsr: float = 0.1):
        super().__init__(config, vfeat_dim, max_frm_seq_len)
        d_cfg = self.config.d_config
        if d_cfg is None:
            raise ValueError("fastvl.models.hero: HeroForTvc needs a d_config block (the caption decoder) in config")
        self.position_embeddings = nn.Embedding(d_cfg.max_position_embeddings, d_cfg.hidden_size)
        self.emb_LayerNorm = hero_layer_norm(d_cfg.hidden_size)
        self.decoder = BertDecoder(d_cfg)
        vocab = self.config.f_config.vocab_size
        if lsr > 0:
            self.loss_func: nn.Module = LabelSmoothingLoss(lsr, vocab, ignore_index=-1, reduction="none")
        else:
            self.loss_func = nn.CrossEntropyLoss(ignore_index=-1, reduction="none")

    # -- encoder side ---------------------------------------------------------------------------------------
    def _segment_rows(self, batch: dict[str, Any], n_frm: int) -> tuple[torch.Tensor, list[int]]:
        ranges = require_key(batch, "clip_ranges", "tvc")
        c_attn = require_key(batch, "c_attn_masks", "tvc")
        clip_lens = c_attn.ne(0).sum(1).tolist()
        if len(ranges) != len(clip_lens):
            raise ValueError(f"fastvl.models.hero: clip_ranges has {len(ranges)} videos, c_v_feats {len(clip_lens)}")
        rows: list[int] = []
        lens: list[int] = []
        for i, segs in enumerate(ranges):
            for st, ed in segs:
                st, ed = int(st), int(ed)
                if not 0 <= st <= ed <= clip_lens[i]:
                    raise ValueError(f"fastvl.models.hero: clip_ranges[{i}] has ({st}, {ed}), outside the video "
                                     f"(frames 0..{clip_lens[i] - 1}; ranges are [st, ed))")
                rows.extend(range(i * n_frm + st, i * n_frm + ed))
                lens.append(ed - st)
        return torch.tensor(rows, dtype=torch.long, device=c_attn.device), lens

    def encode_packed(self, batch: dict[str, Any]) -> tuple[torch.Tensor, list[int]]:
        """Video outputs of every caption's segment, packed: -> ([sum of segment lengths, H], lengths)."""
        frames = self.v_encoder(batch, "repr")  # [B, L, H]
        rows, lens = self._segment_rows(batch, frames.shape[1])
        return frames.reshape(-1, frames.shape[-1]).index_select(0, rows), lens

    def encode(self, batch: dict[str, Any]) -> torch.Tensor:
        """The official ``encode``: the segments' video outputs padded with zeros -> [N, max segment, H]."""
        packed, lens = self.encode_packed(batch)
        out = packed.new_zeros(len(lens), max(lens) if lens else 0, packed.shape[-1])
        start = 0
        for i, n in enumerate(lens):
            out[i, :n] = packed[start:start + n]
            start += n
        return out

    # -- decoder side ---------------------------------------------------------------------------------------
    def decode_packed(self, enc: torch.Tensor, enc_lens: list[int], caption_ids: torch.Tensor,
                      pos_ids: torch.Tensor, label_ids: torch.Tensor | None = None,
                      compute_loss: bool = True) -> torch.Tensor:
        """enc [sum(enc_lens), H] packed segments, caption_ids [N, Lt], pos_ids [1 or N, Lt], label_ids [N, Lt]
        (-1 ignored) -> loss per valid token [n_valid] (label smoothing; with lsr 0: [N * Lt], 0 at ignored) or
        prediction scores [N, Lt, V]."""
        n, length = caption_ids.shape
        if len(enc_lens) != n:
            raise ValueError(f"fastvl.models.hero: {n} captions but {len(enc_lens)} video segments")
        emb = self.v_encoder.f_encoder.embeddings.word_embeddings(caption_ids) + self.position_embeddings(pos_ids)
        dec = self.emb_LayerNorm(emb).reshape(n * length, -1)
        dev = dec.device
        cu_dec = torch.arange(0, (n + 1) * length, length, dtype=torch.int32, device=dev)
        lens_t = torch.tensor(enc_lens, dtype=torch.long, device=dev)
        cu_enc = torch.zeros(n + 1, dtype=torch.int32, device=dev)
        cu_enc[1:] = torch.cumsum(lens_t, 0)
        empty = None
        if min(enc_lens) == 0:
            empty = lens_t.eq(0).repeat_interleave(length)
        out = self.decoder(dec, cu_dec, length, enc, cu_enc, max(enc_lens), empty)
        head = self.v_encoder.f_encoder.lm_head
        vocab = self.config.f_config.vocab_size
        if not compute_loss:
            return head(out).view(n, length, -1)
        labels = label_ids.reshape(-1)
        if isinstance(self.loss_func, LabelSmoothingLoss):
            keep = (labels != -1).nonzero().squeeze(1)
            return self.loss_func(head(out.index_select(0, keep)).view(-1, vocab), labels.index_select(0, keep))
        return self.loss_func(head(out).view(-1, vocab), labels)

    def decode(self, encoder_outputs: torch.Tensor, encoder_masks: torch.Tensor, caption_ids: torch.Tensor,
               pos_ids: torch.Tensor, label_ids: torch.Tensor | None, compute_loss: bool = True) -> torch.Tensor:
        """The official signature: encoder_outputs [N, Lv, H] with encoder_masks [N, Lv] (1 = real frame)."""
        layout = TextLayout.from_mask(encoder_masks, "cap_attn_mask", allow_empty=True)
        enc = encoder_outputs.reshape(-1, encoder_outputs.shape[-1]).index_select(0, layout.rows)
        return self.decode_packed(enc, layout.lens, caption_ids, pos_ids, label_ids, compute_loss)

    def forward(self, batch: dict[str, Any], mode: str = "train", compute_loss: bool = True) -> torch.Tensor:
        """A TVC collate dict (``cap_input_ids``, ``cap_pos_ids``, ``cap_tgt_ids``, ``cap_attn_mask``,
        ``clip_ranges`` + the video keys) -> see :meth:`decode_packed`."""
        enc, lens = self.encode_packed(batch)
        mask = require_key(batch, "cap_attn_mask", "tvc")
        if mask.ne(0).sum(1).tolist() != lens:
            raise ValueError(f"fastvl.models.hero: cap_attn_mask lengths {mask.ne(0).sum(1).tolist()} disagree with "
                             f"clip_ranges {lens}")
        labels = require_key(batch, "cap_tgt_ids", "tvc") if compute_loss else None
        return self.decode_packed(enc, lens, require_key(batch, "cap_input_ids", "tvc"),
                                  require_key(batch, "cap_pos_ids", "tvc"), labels, compute_loss)


class TvcGenerator:
    """Caption generation for ``HeroForTvc`` (official ``TvcGenerator``): greedy decoding for ``max_step``
    steps, outputs cut at ``eos``; :meth:`beam_search` is an addition."""

    def __init__(self, model: HeroForTvc, max_step: int, bos: int, eos: int, fp16: bool = False):
        self.model, self.max_step, self.bos, self.eos, self.fp16 = model, max_step, bos, eos, fp16

    @torch.no_grad()
    def greedy_decode(self, batch: dict[str, Any]) -> list[list[int]]:
        """-> one id list per caption slot of ``clip_ranges`` (eos and after removed)."""
        enc, lens = self.model.encode_packed(batch)
        n = len(lens)
        device = enc.device
        ids = torch.full((n, self.max_step), self.bos, dtype=torch.long, device=device)
        pos = torch.arange(self.max_step + 1, device=device).unsqueeze(0)
        out = ids
        for step in range(self.max_step):
            scores = self.model.decode_packed(enc, lens, ids[:, :step + 1], pos[:, :step + 1], None, False)
            out = scores.argmax(-1)
            if step + 1 < self.max_step:
                ids[:, step + 1] = out[:, -1]
        return [self.cut_eos(row) for row in out.tolist()]

    @torch.no_grad()
    def beam_search(self, batch: dict[str, Any], beam_size: int = 4, length_penalty: float = 1.0
                    ) -> list[list[int]]:
        """Beam search (not in the official code): the best finished hypothesis per caption by log-probability /
        length ** length_penalty; -> one id list per caption (eos removed)."""
        enc, lens = self.model.encode_packed(batch)
        n, hidden = len(lens), enc.shape[-1]
        device = enc.device
        starts = [0]
        for n_f in lens:
            starts.append(starts[-1] + n_f)
        rep = torch.cat([enc[starts[i]:starts[i + 1]].repeat(beam_size, 1) for i in range(n)]) if enc.numel() \
            else enc.new_zeros(0, hidden)
        rep_lens = [n_f for n_f in lens for _ in range(beam_size)]
        seqs = torch.full((n * beam_size, 1), self.bos, dtype=torch.long, device=device)
        score = torch.zeros(n, beam_size, device=device)
        score[:, 1:] = float("-inf")  # one live hypothesis at the start
        done: list[list[tuple[float, list[int]]]] = [[] for _ in range(n)]
        pos = torch.arange(self.max_step + 1, device=device).unsqueeze(0)
        for step in range(self.max_step):
            logits = self.model.decode_packed(rep, rep_lens, seqs, pos[:, :step + 1], None, False)[:, -1]
            logp = F.log_softmax(logits.float(), -1).view(n, beam_size, -1)
            vocab = logp.shape[-1]
            total = (score.unsqueeze(-1) + logp).view(n, -1)
            top, idx = total.topk(2 * beam_size, dim=1)
            new_seqs, new_score = [], torch.full((n, beam_size), float("-inf"), device=device)
            for i in range(n):
                kept = 0
                for s, j in zip(top[i].tolist(), idx[i].tolist()):
                    b, tok = divmod(j, vocab)
                    prev = seqs[i * beam_size + b, 1:].tolist()
                    if math.isinf(s):
                        continue
                    if tok == self.eos or step == self.max_step - 1:
                        hyp = prev if tok == self.eos else prev + [tok]
                        done[i].append((s / max(len(hyp) + 1, 1) ** length_penalty, hyp))
                        continue
                    if kept < beam_size:
                        new_seqs.append(seqs[i * beam_size + b].tolist() + [tok])
                        new_score[i, kept] = s
                        kept += 1
                while kept < beam_size:
                    new_seqs.append(seqs[i * beam_size].tolist() + [self.eos])
                    kept += 1
            if all(len(d) >= beam_size for d in done) or step == self.max_step - 1:
                break
            seqs = torch.tensor(new_seqs, dtype=torch.long, device=device)
            score = new_score
        return [max(d, key=lambda t: t[0])[1] if d else [] for d in done]

    def cut_eos(self, ids: list[int]) -> list[int]:
        """The ids before the first eos."""
        out = []
        for i in ids:
            if i == self.eos:
                break
            out.append(i)
        return out
