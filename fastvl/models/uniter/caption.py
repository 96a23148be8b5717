"""Image captioning with the UNITER encoder: seq2seq attention, MLM-style training, greedy / beam decoding with a cache.

Sequence and mask. Example i is packed as ``[img_i | txt_i]`` (regions FIRST, unlike the ``[txt | img]`` order of the
other UNITER models) and the encoder runs with the ``seq2seq`` mask of :func:`fastvl.ops.cross_modal_attention`
with ``prefix_lens = img_lens``: the regions form the bidirectional prefix (they see each other, never the
caption), and caption token t sees every region and caption tokens ``0..t`` (causal). The caption is
``[CLS] w_1 ... w_n [SEP]`` with text positions 0..n+1, token type 0 for text and 1 for regions, as in pre-training.

Training (the unified-VLP recipe, Zhou et al. 2020, on the UNITER encoder): caption tokens are masked as in MLM
(see :func:`fastvl.tasks.caption.mask_caption`: every token after [CLS] -- [SEP] included, so the model learns
where to stop -- is chosen with p=0.15, at least one; chosen tokens become [MASK] 80% / a random id 10% / unchanged
10%) and predicted by the MLM head (``cls.predictions``, decoder tied to the word embeddings) from their hidden
state under the seq2seq mask. Loss: mean cross-entropy over the chosen tokens.

Decoding mirrors training: to predict token t+1, the caption so far ``[CLS] w_1 .. w_t`` is followed by a [MASK] at
position t+1 and the MLM head reads the [MASK]'s hidden state. With the cache (:class:`KVCache`), the regions are
encoded once and every layer's keys / values of the regions and of the tokens fed so far are kept in a padded
buffer ``[N, capacity, heads, head_dim]``; each step runs ONE encoder pass over two rows per sequence (the token
chosen at the previous step, whose keys / values are appended for good, and the new [MASK] query, whose slot is
overwritten at the next step), attending to the buffer through the ``seq2seq`` mask with the number of valid keys
as prefix (so padding slots are never seen). ``use_cache=False`` recomputes the whole sequence each step (the plain
reference the cached path is tested against).

state_dict keys: ``uniter.*`` and ``cls.predictions.{bias, transform.dense.*, transform.LayerNorm.*,
decoder.weight}`` -- the UNITER pre-training keys, so a ``fastvl pretrain`` / official pre-training checkpoint
initialises the whole model (its other heads are unused keys).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch.nn import functional as F

from ...batch import PackedVLBatch
from ...nn.bert import BertOnlyMLMHead
from ...ops import cross_modal_attention
from . import heads as H
from .config import UniterConfig
from .layout import PackedLayout, layout_from_lengths
from .model import UniterModel, UniterPreTrainedModel

__all__ = ["CaptionGeneration", "CaptionTokens", "KVCache", "UniterForCaptioning", "image_first_layout"]


@dataclass(frozen=True)
class CaptionTokens:
    """Special token ids of the caption vocabulary: ``cls`` starts a caption, ``sep`` ends it, ``mask`` queries."""

    cls: int
    sep: int
    mask: int


@dataclass
class CaptionGeneration:
    """Decoder output: ``tokens[i]`` the caption of image i (ids, without [CLS] / [SEP]); ``scores[i]`` the sum of
    its tokens' log-probabilities ([SEP] included when generated); ``finished[i]`` whether [SEP] was generated."""

    tokens: list[list[int]]
    scores: list[float]
    finished: list[bool]


def image_first_layout(txt_lens: list[int], img_lens: list[int], device: torch.device | str) -> PackedLayout:
    """Packed layout with ``[img_i | txt_i]`` sequences (regions first), for the ``seq2seq`` caption mask.

    Same fields as :func:`~fastvl.models.uniter.layout.layout_from_lengths` (``cu_seqlens``, ``cu_txt``, ``cu_img``,
    ``txt_pos``, ``seq_of_row`` are order-independent); ``img_rows`` [T_img] / ``txt_rows`` [T_txt] give each
    token's joint row and ``joint_src`` [T] the row of ``cat([txt_emb, img_emb])`` filling each joint row.
    Index arithmetic on the host (Python-int lengths), then moved to ``device``.
    """
    txt_lens, img_lens = [int(x) for x in txt_lens], [int(x) for x in img_lens]
    if len(txt_lens) != len(img_lens):
        raise ValueError(f"image_first_layout: 'txt_lens' has {len(txt_lens)} examples but 'img_lens' has "
                         f"{len(img_lens)}")
    base = layout_from_lengths(txt_lens, img_lens, "cpu")
    tl, il = torch.tensor(txt_lens, dtype=torch.long), torch.tensor(img_lens, dtype=torch.long)
    ar = torch.arange(len(txt_lens))
    cu = base.cu_seqlens.long()
    seg_t, seg_i = torch.repeat_interleave(ar, tl), torch.repeat_interleave(ar, il)
    pos_i = torch.arange(base.n_img) - base.cu_img.long()[seg_i]
    img_rows = cu[seg_i] + pos_i
    txt_rows = cu[seg_t] + il[seg_t] + base.txt_pos
    joint_src = torch.empty(base.total, dtype=torch.long)
    joint_src[torch.cat([txt_rows, img_rows])] = torch.arange(base.total)
    out = replace(base, txt_rows=txt_rows, img_rows=img_rows, joint_src=joint_src)
    device = torch.device(device)
    if device.type != "cpu":
        for name in ("cu_seqlens", "cu_txt", "cu_img", "txt_rows", "img_rows", "txt_pos", "joint_src", "seq_of_row"):
            setattr(out, name, getattr(out, name).to(device))
    return out


@dataclass
class KVCache:
    """Per-layer keys / values of N sequences in padded buffers (see the module doc).

    Attributes:
        keys, values: one [N, capacity, heads, head_dim] tensor per layer; slot j of sequence n holds key j.
        lens: [N] long, valid keys per sequence (regions + tokens fed so far).
        capacity: Python int, slots per sequence.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    lens: torch.Tensor
    capacity: int
    cu_q: torch.Tensor = field(init=False)
    cu_k: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self._index()

    def _index(self) -> None:
        n = self.lens.shape[0]
        ar = torch.arange(n + 1, dtype=torch.int32, device=self.lens.device)
        self.cu_q, self.cu_k = ar, ar * self.capacity

    @property
    def num_sequences(self) -> int:
        return int(self.lens.shape[0])

    def reorder(self, index: torch.Tensor) -> None:
        """Keep sequence ``index[m]`` as new sequence m (beam search). index: [M] long on the cache's device."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        self.lens = self.lens.index_select(0, index)
        self._index()


class _Recompute:
    """Decoding state without a cache: the image rows of every sequence and the tokens fed so far."""

    def __init__(self, feats: list[torch.Tensor], boxes: list[torch.Tensor]):
        self.feats, self.boxes = feats, boxes
        self.src = list(range(len(feats)))
        self.history: list[list[int]] = [[] for _ in feats]

    @property
    def num_sequences(self) -> int:
        return len(self.src)

    def reorder(self, index: torch.Tensor) -> None:
        idx = index.tolist()
        self.src = [self.src[i] for i in idx]
        self.history = [list(self.history[i]) for i in idx]


def _check_batch(batch: PackedVLBatch) -> None:
    if not isinstance(batch, PackedVLBatch):
        raise TypeError(f"UniterForCaptioning: argument 'batch' must be a PackedVLBatch, got {type(batch).__name__}")


class UniterForCaptioning(UniterPreTrainedModel):
    """UNITER + the MLM head for captioning (see the module doc). ``UniterForCaptioning(config, img_dim)``.

    ``forward(batch, compute_loss=True, reduction='mean')`` takes a :class:`~fastvl.batch.PackedVLBatch` whose
    texts are ``[CLS] caption [SEP]`` after caption masking and whose ``txt_labels`` [T_txt] hold the original ids
    at masked tokens (-1 elsewhere). :meth:`generate` decodes captions for the images of a batch.
    """

    def __init__(self, config: UniterConfig, img_dim: int | None = None):
        super().__init__(config)
        self.uniter = UniterModel(config, img_dim)
        self.cls = BertOnlyMLMHead(config.hidden_size, config.hidden_act,
                                   self.uniter.embeddings.word_embeddings.weight)
        self.apply(self.init_weights)

    # ------------------------------------------------------------------------------------------ training
    @staticmethod
    @torch.compiler.disable
    def layout(batch: PackedVLBatch) -> PackedLayout:
        """The ``[img | txt]`` packed layout of a batch (see :func:`image_first_layout`)."""
        return image_first_layout(batch.txt_lens, batch.img_lens, batch.input_ids.device)

    def encode(self, batch: PackedVLBatch, layout: PackedLayout | None = None,
               output_all_encoded_layers: bool = False, txt_delta: torch.Tensor | None = None,
               img_delta: torch.Tensor | None = None) -> torch.Tensor | list[torch.Tensor]:
        """Encoder output [T, H] on the ``[img | txt]`` joint rows of ``layout`` under the seq2seq mask (regions =
        bidirectional prefix, caption causal). ``batch.img_masks`` is ignored (captioning never masks regions).
        txt_delta [T_txt, H] / img_delta [T_img, img_dim]: VILLA perturbations of the word embeddings / raw
        features (as :meth:`UniterModel.forward_packed`)."""
        _check_batch(batch)
        self.uniter.validate_packed(batch, txt_delta, img_delta)
        layout = layout if layout is not None else self.layout(batch)
        self.uniter.check_inputs_finite(None, img_feat=batch.img_feat, img_pos=batch.img_pos, txt_delta=txt_delta,
                                        img_delta=img_delta)
        pos = batch.position_ids if batch.position_ids is not None else layout.txt_pos
        emb = self.uniter.embed_packed(layout, batch.input_ids, pos, batch.img_feat, batch.img_pos, None,
                                       batch.txt_type_ids, batch.img_type_ids, txt_delta, img_delta)
        prefix = layout.cu_img[1:] - layout.cu_img[:-1]
        return self.uniter.encode_packed(emb, layout, output_all_encoded_layers, mask="seq2seq", prefix_lens=prefix)

    def forward(self, batch: PackedVLBatch, compute_loss: bool = True, reduction: str = "mean",
                layout: PackedLayout | None = None, txt_delta: torch.Tensor | None = None,
                img_delta: torch.Tensor | None = None) -> torch.Tensor:
        """MLM-style caption loss (``reduction`` 'mean' | 'sum' | 'none' -> scalar or [n]) or, with
        ``compute_loss=False``, the logits [n, vocab] of the n masked caption tokens (packed order). ``layout``: a
        precomputed :meth:`layout` of this batch; txt_delta / img_delta: VILLA perturbations (see :meth:`encode`)."""
        _check_batch(batch)
        if batch.txt_labels is None:
            raise ValueError("UniterForCaptioning: batch.txt_labels ([T_txt] long, -1 where not masked) is required")
        if tuple(batch.txt_labels.shape) != (batch.input_ids.shape[0],):
            raise ValueError(f"UniterForCaptioning: batch.txt_labels must have shape [{batch.input_ids.shape[0]}], "
                             f"got {list(batch.txt_labels.shape)}")
        layout = layout if layout is not None else self.layout(batch)
        h = self.encode(batch, layout, txt_delta=txt_delta, img_delta=img_delta)
        sel = batch.txt_labels != -1
        n = batch.n_txt_masked if batch.n_txt_masked is not None else int(sel.sum())
        idx = torch.nonzero_static(sel, size=n).squeeze(1)
        hidden = h[layout.txt_rows[idx]]
        if not compute_loss:
            return self.cls(hidden)
        return H.mlm_loss(self.cls, hidden, batch.txt_labels[idx], reduction)

    # ------------------------------------------------------------------------------------------ decoding
    def _images(self, batch: PackedVLBatch) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        _check_batch(batch)
        self.uniter.validate_images(batch.img_feat, batch.img_pos, "img_feat", "img_pos")
        return batch.img_feat, batch.img_pos, list(batch.img_lens)

    def start_decoding(self, batch: PackedVLBatch, max_len: int, use_cache: bool = True) -> KVCache | _Recompute:
        """Decoding state for the images of ``batch`` (its texts are ignored), room for ``max_len`` tokens.

        With the cache, the regions are encoded here (bidirectionally among themselves) and every layer's keys /
        values stored; capacity = max regions + max_len + 1 ([CLS], generated tokens, the [MASK] slot)."""
        feat, box, img_lens = self._images(batch)
        if use_cache:
            return self._prefix_cache(feat, box, img_lens, max(img_lens, default=0) + max_len + 1)
        return _Recompute(list(feat.split(img_lens)), list(box.split(img_lens)))

    def _prefix_cache(self, feat: torch.Tensor, box: torch.Tensor, img_lens: list[int], capacity: int) -> KVCache:
        device = feat.device
        layout = layout_from_lengths([0] * len(img_lens), img_lens, device)
        x = self.uniter.embed_packed(layout, None, None, feat, box)
        seq = layout.seq_of_row
        slot = torch.arange(layout.total, device=device) - layout.cu_seqlens.long()[seq]
        keys, values = [], []
        for layer in self.uniter.encoder.layer:
            q, k, v = layer.attention.self.qkv(x)  # [T, heads, head_dim]
            kbuf = x.new_zeros(len(img_lens), capacity, *k.shape[1:])
            vbuf = torch.zeros_like(kbuf)
            kbuf[seq, slot] = k
            vbuf[seq, slot] = v
            keys.append(kbuf)
            values.append(vbuf)
            ctx = cross_modal_attention(q, k, v, layout.cu_seqlens, layout.cu_seqlens, layout.max_seqlen,
                                        layout.max_seqlen)
            x = layer.post_attention(ctx.reshape(x.shape[0], -1), x)
        lens = torch.tensor(img_lens, dtype=torch.long).to(device)
        return KVCache(keys, values, lens, capacity)

    def decode_step(self, state: KVCache | _Recompute, prev_ids: torch.Tensor, step: int,
                    tokens: CaptionTokens) -> torch.Tensor:
        """Feed ``prev_ids`` [N] (the token at text position ``step``: [CLS] at step 0) and query a [MASK] at position
        ``step + 1``: -> logits [N, vocab] for the next token. N = ``state.num_sequences``."""
        if prev_ids.dim() != 1 or prev_ids.shape[0] != state.num_sequences:
            raise ValueError(f"UniterForCaptioning.decode_step: 'prev_ids' must have shape [{state.num_sequences}], "
                             f"got {list(prev_ids.shape)}")
        if step + 2 > self.config.max_position_embeddings:
            raise ValueError(f"UniterForCaptioning.decode_step: step {step} needs text position {step + 1} but "
                             f"max_position_embeddings is {self.config.max_position_embeddings}")
        if isinstance(state, KVCache):
            return self._cached_step(state, prev_ids, step, tokens)
        return self._recompute_step(state, prev_ids, tokens)

    def _cached_step(self, cache: KVCache, prev_ids: torch.Tensor, step: int, tokens: CaptionTokens) -> torch.Tensor:
        n = cache.num_sequences
        device = prev_ids.device
        if n and int(cache.lens.max()) + 2 > cache.capacity:
            raise ValueError(f"UniterForCaptioning: the decoding cache is full (capacity {cache.capacity}); start "
                             "decoding with a larger max_len")
        ids = torch.cat([prev_ids, torch.full_like(prev_ids, tokens.mask)])
        pos = torch.cat([torch.full((n,), step, device=device), torch.full((n,), step + 1, device=device)])
        x = self.uniter.embeddings(ids, pos)
        rows = torch.arange(n, device=device)
        lens = cache.lens
        for layer, kbuf, vbuf in zip(self.uniter.encoder.layer, cache.keys, cache.values):
            q, k, v = layer.attention.self.qkv(x)  # [2N, heads, head_dim]
            kbuf[rows, lens], vbuf[rows, lens] = k[:n], v[:n]  # the fed token: kept
            kbuf[rows, lens + 1], vbuf[rows, lens + 1] = k[n:], v[n:]  # the [MASK] query: overwritten next step
            kf, vf = kbuf.view(-1, *k.shape[1:]), vbuf.view(-1, *v.shape[1:])
            ctx_fed = cross_modal_attention(q[:n], kf, vf, cache.cu_q, cache.cu_k, 1, cache.capacity, mask="seq2seq",
                                            prefix_lens=lens + 1)
            ctx_mask = cross_modal_attention(q[n:], kf, vf, cache.cu_q, cache.cu_k, 1, cache.capacity,
                                             mask="seq2seq", prefix_lens=lens + 2)
            x = layer.post_attention(torch.cat([ctx_fed, ctx_mask]).reshape(2 * n, -1), x)
        cache.lens = lens + 1
        return self.cls(x[n:])

    def _recompute_step(self, state: _Recompute, prev_ids: torch.Tensor, tokens: CaptionTokens) -> torch.Tensor:
        for hist, t in zip(state.history, prev_ids.tolist()):
            hist.append(int(t))
        texts = [hist + [tokens.mask] for hist in state.history]
        device = prev_ids.device
        batch = PackedVLBatch(input_ids=torch.tensor([t for s in texts for t in s], dtype=torch.long, device=device),
                              txt_lens=[len(s) for s in texts],
                              img_feat=torch.cat([state.feats[i] for i in state.src]),
                              img_pos=torch.cat([state.boxes[i] for i in state.src]),
                              img_lens=[state.feats[i].shape[0] for i in state.src])
        layout = self.layout(batch)
        h = self.encode(batch, layout)
        last = layout.txt_rows[layout.cu_txt[1:].long() - 1]
        return self.cls(h[last])

    @torch.no_grad()
    def generate(self, batch: PackedVLBatch, tokens: CaptionTokens, max_len: int = 20, beam_size: int = 1,
                 length_penalty: float = 1.0, use_cache: bool = True) -> CaptionGeneration:
        """Captions for the B images of ``batch`` (texts ignored), greedy (``beam_size=1``) or beam search.

        Args:
            tokens: the [CLS] / [SEP] / [MASK] ids.
            max_len: at most this many generated tokens per caption, [SEP] included.
            beam_size: K; beam search keeps K hypotheses per image, takes the top 2K continuations each step, moves
                those ending in [SEP] (ranked within the top K) to the finished list, and stops an image once K are
                finished; unfinished beams at max_len join the list. The answer maximises
                ``sum log p / length ** length_penalty`` (length = generated tokens incl. [SEP]). K = 1 is greedy.
            use_cache: decode with the key/value cache (default) or recompute the whole sequence every step.
        Runs in eval mode (dropout off) and restores the previous mode.
        """
        _check_batch(batch)
        if max_len < 1:
            raise ValueError(f"UniterForCaptioning.generate: 'max_len' must be >= 1, got {max_len}")
        if beam_size < 1:
            raise ValueError(f"UniterForCaptioning.generate: 'beam_size' must be >= 1, got {beam_size}")
        if max_len + 1 > self.config.max_position_embeddings:
            raise ValueError(f"UniterForCaptioning.generate: 'max_len' {max_len} needs {max_len + 1} text positions "
                             f"but max_position_embeddings is {self.config.max_position_embeddings}")
        was_training = self.training
        self.eval()
        try:
            if beam_size == 1:
                return self._greedy(batch, tokens, max_len, use_cache)
            return self._beam(batch, tokens, max_len, beam_size, length_penalty, use_cache)
        finally:
            self.train(was_training)

    def _greedy(self, batch: PackedVLBatch, tokens: CaptionTokens, max_len: int, use_cache: bool
                ) -> CaptionGeneration:
        b = batch.batch_size
        device = batch.img_feat.device
        state = self.start_decoding(batch, max_len, use_cache)
        prev = torch.full((b,), tokens.cls, dtype=torch.long, device=device)
        out: list[list[int]] = [[] for _ in range(b)]
        scores = [0.0] * b
        done = [False] * b
        for step in range(max_len):
            logp = F.log_softmax(self.decode_step(state, prev, step, tokens).float(), dim=-1)
            best, tok = logp.max(dim=-1)
            for i, (t, s) in enumerate(zip(tok.tolist(), best.tolist())):
                if done[i]:
                    continue
                scores[i] += s
                if t == tokens.sep:
                    done[i] = True
                else:
                    out[i].append(t)
            if all(done):
                break
            prev = tok
        return CaptionGeneration(out, scores, done)

    def _beam(self, batch: PackedVLBatch, tokens: CaptionTokens, max_len: int, k: int, alpha: float,
              use_cache: bool) -> CaptionGeneration:
        b = batch.batch_size
        device = batch.img_feat.device
        state = self.start_decoding(batch, max_len, use_cache)
        state.reorder(torch.arange(b, device=device).repeat_interleave(k))
        n = b * k
        prev = torch.full((n,), tokens.cls, dtype=torch.long, device=device)
        beam_scores = torch.full((b, k), -math.inf, dtype=torch.float64, device=device)
        beam_scores[:, 0] = 0.0  # every beam starts identical: expand the first only
        hist: list[list[int]] = [[] for _ in range(n)]
        finished: list[list[tuple[float, float, list[int], bool]]] = [[] for _ in range(b)]
        done = [False] * b
        for step in range(max_len):
            logp = F.log_softmax(self.decode_step(state, prev, step, tokens).float(), dim=-1)
            vocab = logp.shape[-1]
            cand = (beam_scores.reshape(n, 1) + logp).reshape(b, k * vocab)
            top_s, top_i = cand.topk(min(2 * k, k * vocab), dim=1)
            top_s, top_i = top_s.tolist(), top_i.tolist()
            src, new_tok, new_score = [], [], []
            for i in range(b):
                chosen: list[tuple[int, int, float]] = []
                if not done[i]:
                    for rank, (s, flat) in enumerate(zip(top_s[i], top_i[i])):
                        beam, t = divmod(flat, vocab)
                        if t == tokens.sep:
                            if rank < k and s > -math.inf:
                                length = step + 1
                                finished[i].append((s / length ** alpha, s, list(hist[i * k + beam]), True))
                        else:
                            chosen.append((beam, t, s))
                        if len(chosen) == k:
                            break
                    if len(finished[i]) >= k:
                        done[i] = True
                if done[i] or len(chosen) < k:  # finished image: keep its rows (their values are ignored)
                    chosen = [(j, tokens.sep, -math.inf) for j in range(k)]
                for beam, t, s in chosen:
                    src.append(i * k + beam)
                    new_tok.append(t)
                    new_score.append(s)
            if all(done):
                break
            hist = [hist[r] + [t] for r, t in zip(src, new_tok)]
            index = torch.tensor(src, dtype=torch.long, device=device)
            state.reorder(index)
            prev = torch.tensor(new_tok, dtype=torch.long, device=device)
            beam_scores = torch.tensor(new_score, dtype=torch.float64, device=device).reshape(b, k)
        else:
            scores = beam_scores.tolist()
            for i in range(b):
                if not done[i]:
                    for j in range(k):
                        s = scores[i][j]
                        if s > -math.inf:
                            finished[i].append((s / max_len ** alpha, s, list(hist[i * k + j]), False))
        out, raw, fin = [], [], []
        for i in range(b):
            best = max(finished[i], key=lambda f: f[0])
            out.append(best[2])
            raw.append(best[1])
            fin.append(best[3])
        return CaptionGeneration(out, raw, fin)
