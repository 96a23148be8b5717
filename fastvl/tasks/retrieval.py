"""Fast image-text retrieval evaluation for single-stream UNITER: IR / TR recall@1/5/10 over the text x image matrix.

UNITER is a cross-encoder: the score of (text t, image i) needs a joint forward of ``[txt_t | img_i]`` through the
encoder, so the full matrix of N texts x M images costs N x M joint forwards. Two modes:

- ``mode='exact'``: every pair is cross-encoded. What does not depend on the pair is computed ONCE: the text
  embeddings (word + position + type, LayerNorm) of each text and the image embeddings (feature and box
  projections, type, LayerNorm) of each image. Pairs are then packed without padding (fastvl's packed layout,
  one ``cu_seqlens`` per chunk) into chunks of at most ``max_tokens`` tokens, whose joint embeddings are a
  gather of those rows; only the encoder, the pooler and the head run per pair. Texts and images are visited in
  length-sorted tiles so that the sequences of a chunk have similar lengths. Two more exact shortcuts (on by
  default, ``shortcuts=False`` turns them off): layer 0's query / key / value projections of a token do not
  depend on the pair either, so they are cached per token like the embeddings; and the last layer runs only for
  the [CLS] row of each pair (the pooler reads nothing else): keys and values of every token, the rest on one row.
  On CPU the attention core is torch's fused ``scaled_dot_product_attention`` on a padded view of the chunk (tiles
  are length-sorted, so little padding); on GPU, fastvl's packed attention op. No gradient; optional bf16
  autocast. The scores equal naive per-pair scoring through the model's normal forward up to fp32 rounding (BLAS
  results depend on the batch shape, so no batched evaluation is bitwise equal to a per-pair one).
- ``mode='two_stage'``: a cheap shortlist, then cross-encoder re-ranking. The shortlist encodes each text alone
  and each image alone once with the same encoder (N + M sequences instead of N x M), mean-pools the last layer
  and scores pairs by cosine similarity (or takes ``shortlist`` scores from the caller, e.g. a dual encoder).
  The top ``k`` images of every text and the top ``k`` texts of every image are re-scored by the cross-encoder.
  Entries that were not re-scored hold their shortlist score moved below every cross-encoder score (so the
  shortlist order breaks the rest). Its recall is an APPROXIMATION of the exact protocol's (a ground truth outside
  both shortlists can only be found by its shortlist rank); report it separately. With ``k`` >= N and >= M every
  pair is re-scored and the matrix is the exact one. The recall is bounded by the shortlist's coverage of the
  ground-truth pairs (:func:`evaluate_retrieval` reports it): a cross-encoder's unimodal encodings carry little
  matching signal (UNITER is not trained for them; on the synthetic corpus the cosine shortlist of a fine-tuned
  tiny model is at chance), so for a useful two-stage run pass ``shortlist`` scores from a dual encoder.

The metric follows the official protocol: text t matches image ``txt2img[t]``; IR ranks all images for each
text; TR ranks all texts for each image and counts a hit when ANY of the image's texts is within the top k. Ties
are resolved as ``ties`` says (see :func:`recall_at_k`).

Entry points: :func:`score_matrix`, :func:`recall_at_k`, :func:`evaluate_retrieval` (both, plus bookkeeping), and
:func:`brute_force_scores` (the naive per-pair loop, for tests and benchmarks). The metrics (:func:`recall_at_k`,
:func:`format_recall`) live in :mod:`fastvl.tasks.retrieval_metrics` and are re-exported here.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..batch import PackedVLBatch
from ..nn.bert import BertLayer
from ..ops import cross_modal_attention
from .retrieval_metrics import format_recall, recall_at_k

__all__ = ["RetrievalImages", "RetrievalTexts", "brute_force_scores", "evaluate_retrieval", "format_recall",
           "recall_at_k", "score_matrix", "shortlist_scores", "split_batch"]

MODES = ("exact", "two_stage")
HEADS = ("rank", "itm")
ATTENTION = ("auto", "fastvl", "sdpa")
DEFAULT_MAX_TOKENS = {"cpu": 1 << 15, "cuda": 1 << 17}
_FN = "fastvl.tasks.retrieval"


# ----------------------------------------------------------------------------------------------------------
# Inputs: the N texts and M images, each packed once
# ----------------------------------------------------------------------------------------------------------


def _lens(name: str, lens: Sequence[int]) -> list[int]:
    out = [int(x) for x in lens]
    if any(x < 1 for x in out):
        i = next(j for j, x in enumerate(out) if x < 1)
        raise ValueError(f"{_FN}: '{name}' must be >= 1 for every entry (retrieval pairs a text with an image), entry "
                         f"{i} is {out[i]}")
    return out


@dataclass
class RetrievalTexts:
    """N texts, packed: ``input_ids`` [T_txt] long (each text ``[CLS] ... [SEP]``, concatenated), ``lens`` N Python
    ints, optional ``position_ids`` [T_txt] long (default 0..len-1 within each text)."""

    input_ids: torch.Tensor
    lens: list[int]
    position_ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.lens = _lens("RetrievalTexts.lens", self.lens)
        if self.input_ids.dim() != 1 or self.input_ids.shape[0] != sum(self.lens):
            raise ValueError(f"{_FN}.RetrievalTexts: 'input_ids' must have shape [sum(lens)] = [{sum(self.lens)}], "
                             f"got {list(self.input_ids.shape)}")
        if self.position_ids is not None and tuple(self.position_ids.shape) != tuple(self.input_ids.shape):
            raise ValueError(f"{_FN}.RetrievalTexts: 'position_ids' must have the shape of 'input_ids' "
                             f"{list(self.input_ids.shape)}, got {list(self.position_ids.shape)}")

    def __len__(self) -> int:
        return len(self.lens)

    @classmethod
    def from_list(cls, texts: Sequence[torch.Tensor]) -> RetrievalTexts:
        """From N 1-d long tensors of token ids (each with its [CLS] and [SEP])."""
        if not texts:
            raise ValueError(f"{_FN}.RetrievalTexts.from_list: 'texts' is empty")
        return cls(torch.cat([torch.as_tensor(t).reshape(-1).long() for t in texts]), [len(t) for t in texts])

    def to(self, device: torch.device | str) -> RetrievalTexts:
        pos = None if self.position_ids is None else self.position_ids.to(device)
        return RetrievalTexts(self.input_ids.to(device), self.lens, pos)


@dataclass
class RetrievalImages:
    """M images, packed: ``feat`` [T_img, img_dim] region features, ``pos`` [T_img, 7] box features, ``lens`` M Python
    ints (regions per image)."""

    feat: torch.Tensor
    pos: torch.Tensor
    lens: list[int]

    def __post_init__(self) -> None:
        self.lens = _lens("RetrievalImages.lens", self.lens)
        n = sum(self.lens)
        if self.feat.dim() != 2 or self.feat.shape[0] != n:
            raise ValueError(f"{_FN}.RetrievalImages: 'feat' must have shape [sum(lens) = {n}, img_dim], got "
                             f"{list(self.feat.shape)}")
        if tuple(self.pos.shape) != (n, 7):
            raise ValueError(f"{_FN}.RetrievalImages: 'pos' must have shape [{n}, 7], got {list(self.pos.shape)}")

    def __len__(self) -> int:
        return len(self.lens)

    @classmethod
    def from_list(cls, images: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> RetrievalImages:
        """From M ``(feat [n_i, img_dim], pos [n_i, 7])`` pairs."""
        if not images:
            raise ValueError(f"{_FN}.RetrievalImages.from_list: 'images' is empty")
        feats, boxes = [f for f, _ in images], [p for _, p in images]
        return cls(torch.cat(feats), torch.cat(boxes), [f.shape[0] for f in feats])

    def to(self, device: torch.device | str) -> RetrievalImages:
        return RetrievalImages(self.feat.to(device), self.pos.to(device), self.lens)


def split_batch(batch: PackedVLBatch, img_keys: Sequence[Hashable] | None = None
                ) -> tuple[RetrievalTexts, RetrievalImages, torch.Tensor]:
    """The texts and images of a packed batch of matched pairs -> ``(texts, images, txt2img)``.

    Every example's text is a text. Without ``img_keys`` every example's image is an image and text i matches image
    i; with ``img_keys`` (one hashable per example, e.g. the image file name) examples sharing a key share ONE image
    (its first occurrence), as in the official protocol where an image has several captions.
    """
    if not isinstance(batch, PackedVLBatch):
        raise TypeError(f"{_FN}.split_batch: 'batch' must be a PackedVLBatch, got {type(batch).__name__}")
    b = batch.batch_size
    texts = RetrievalTexts(batch.input_ids, batch.txt_lens, batch.position_ids)
    if img_keys is None:
        return texts, RetrievalImages(batch.img_feat, batch.img_pos, batch.img_lens), torch.arange(b)
    if len(img_keys) != b:
        raise ValueError(f"{_FN}.split_batch: 'img_keys' has {len(img_keys)} entries but the batch has {b} examples")
    first: dict[Hashable, int] = {}  # key -> image index
    keep: list[int] = []  # image index -> example holding its features (first occurrence)
    txt2img = []
    for i, key in enumerate(img_keys):
        if key not in first:
            first[key] = len(keep)
            keep.append(i)
        txt2img.append(first[key])
    cu = [0]
    for n in batch.img_lens:
        cu.append(cu[-1] + n)
    rows = torch.cat([torch.arange(cu[i], cu[i + 1]) for i in keep]).to(batch.img_feat.device)
    images = RetrievalImages(batch.img_feat[rows], batch.img_pos[rows], [batch.img_lens[i] for i in keep])
    return texts, images, torch.tensor(txt2img)


def _coerce(value, cls, name: str, items: str):
    """``value`` as a ``cls`` (RetrievalTexts / RetrievalImages): itself, or built with ``cls.from_list``."""
    if isinstance(value, cls):
        return value
    if isinstance(value, Sequence) and not isinstance(value, torch.Tensor):
        return cls.from_list(value)
    raise TypeError(f"{_FN}: '{name}' must be a {cls.__name__} or a list of {items}, got {type(value).__name__}")


def _as_texts(texts) -> RetrievalTexts:
    return _coerce(texts, RetrievalTexts, "texts", "1-d token-id tensors")


def _as_images(images) -> RetrievalImages:
    return _coerce(images, RetrievalImages, "images", "(feat, pos) tensor pairs")


# ----------------------------------------------------------------------------------------------------------
# Model plumbing
# ----------------------------------------------------------------------------------------------------------


def _uniter(model: nn.Module) -> nn.Module:
    uniter = getattr(model, "uniter", None)
    if uniter is None or not hasattr(uniter, "encoder"):
        raise TypeError(f"{_FN}: 'model' must be a UNITER model with a 'uniter' encoder and a scoring head "
                        f"(UniterForImageTextRetrieval, UniterForPretraining, ...), got {type(model).__name__}")
    return uniter


def _resolve_head(model: nn.Module, head) -> str | Callable:
    """'rank' (rank_output), 'itm' (itm_output log-odds of 'match') or a callable pooled [P, H] -> scores [P]."""
    if head is None:
        if hasattr(model, "rank_output"):
            return "rank"
        if hasattr(model, "itm_output"):
            return "itm"
        raise ValueError(f"{_FN}: {type(model).__name__} has neither 'rank_output' nor 'itm_output'; pass "
                         f"head=callable(pooled [P, H]) -> scores [P]")
    if callable(head):
        return head
    if head not in HEADS:
        raise ValueError(f"{_FN}: 'head' must be one of {HEADS}, a callable or None, got {head!r}")
    attr = "rank_output" if head == "rank" else "itm_output"
    if not hasattr(model, attr):
        raise ValueError(f"{_FN}: head={head!r} needs model.{attr}, which {type(model).__name__} lacks")
    return head


def _apply_head(model: nn.Module, head, pooled: torch.Tensor) -> torch.Tensor:
    """pooled [P, H] -> scores [P] (float32)."""
    if head == "rank":
        return model.rank_output(pooled)[:, 0].float()
    if head == "itm":
        logits = model.itm_output(pooled).float()
        return logits[:, 1] - logits[:, 0]
    out = head(pooled)
    return out.reshape(-1).float()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _autocast(device: torch.device, amp: bool | str | torch.dtype | None):
    """bf16 (or the given dtype) autocast on ``device``; ``None``/False: fp32, no autocast."""
    if amp in (None, False):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp is True or amp == "bf16" else (torch.float16 if amp == "fp16" else amp)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{_FN}: 'amp' must be None/False, True/'bf16', 'fp16' or a torch dtype, got {amp!r}")
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="pair", unit_scale=True, disable=not enabled, mininterval=1.0,
                dynamic_ncols=True, leave=False)


class _Encoded:
    """The per-modality embeddings of every text and image (computed once) and their packed bookkeeping."""

    def __init__(self, model: nn.Module, texts: RetrievalTexts, images: RetrievalImages, device: torch.device,
                 shortcuts: bool = False, attention: str = "auto"):
        uniter = _uniter(model)
        if attention not in ATTENTION:
            raise ValueError(f"{_FN}: 'attention' must be one of {ATTENTION}, got {attention!r}")
        self.attention = ("sdpa" if device.type == "cpu" else "fastvl") if attention == "auto" else attention
        if images.feat.shape[1] != uniter.img_dim:
            raise ValueError(f"{_FN}: image features have size {images.feat.shape[1]} but the model was built with "
                             f"img_dim={uniter.img_dim}")
        limit = uniter.config.max_position_embeddings
        if max(texts.lens) > limit:
            raise ValueError(f"{_FN}: a text has {max(texts.lens)} tokens but max_position_embeddings is {limit}")
        self.uniter = uniter
        self.device = device
        self.tl = torch.tensor(texts.lens, dtype=torch.long)  # host copies (Python-side chunk sizes)
        self.il = torch.tensor(images.lens, dtype=torch.long)
        self.t_start = torch.cumsum(self.tl, 0) - self.tl
        self.i_start = torch.cumsum(self.il, 0) - self.il
        self.n_txt_tok = int(self.tl.sum())
        tx, im = texts.to(device), images.to(device)
        pos = tx.position_ids
        if pos is None:
            seg = torch.repeat_interleave(torch.arange(len(texts)), self.tl)
            pos = (torch.arange(self.n_txt_tok) - self.t_start[seg]).to(device)
        # exactly what UniterModel.embed_packed computes for these rows (text type 0, image type 1, no masks)
        txt = uniter.embeddings(tx.input_ids, pos, None)
        types = uniter.embeddings.token_type_embeddings.weight[1]
        img = uniter.img_embeddings(im.feat, im.pos, types)
        self.table = torch.cat([txt, img.to(txt.dtype)])  # [T_txt + T_img, H]
        layers = list(uniter.encoder.layer)
        self.shortcuts = bool(shortcuts) and len(layers) > 0 and all(type(x) is BertLayer for x in layers)
        self.qkv0 = None
        if self.shortcuts:  # layer 0's query / key / value of a token do not depend on the pair either
            q, k, v = layers[0].attention.self.qkv(self.table)  # [T_txt + T_img, heads, head_dim] each
            self.qkv0 = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], 1)  # [T_txt + T_img, 3 H]
        self.dev_idx = {k: v.to(device) for k, v in (("tl", self.tl), ("il", self.il), ("ts", self.t_start),
                                                      ("is", self.i_start))}

    def pair_scores(self, model: nn.Module, head, t: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        """Cross-encoder scores [P] (float32, on the device) of the pairs (t[p], i[p]); t, i: [P] long on the host."""
        tl_h, il_h = self.tl[t], self.il[i]
        total = int(tl_h.sum()) + int(il_h.sum())
        max_len = int((tl_h + il_h).max())
        d = self.dev_idx
        td, idv = t.to(self.device, non_blocking=True), i.to(self.device, non_blocking=True)
        tl, il = d["tl"][td], d["il"][idv]
        lens = tl + il
        cu = torch.zeros(lens.numel() + 1, dtype=torch.int32, device=self.device)
        cu[1:] = torch.cumsum(lens, 0)
        seg = torch.repeat_interleave(torch.arange(lens.numel(), device=self.device), lens, output_size=total)
        within = torch.arange(total, device=self.device) - cu[:-1].long()[seg]
        tls = tl[seg]
        src = torch.where(within < tls, d["ts"][td][seg] + within,
                          self.n_txt_tok + d["is"][idv][seg] + (within - tls))
        if self.shortcuts:
            first_states = self._encode_first_rows(src, cu, max_len)
        else:  # the model's own encoder on the chunk
            first_states = self.uniter.encoder(self.table[src], cu, max_len, False)[-1][cu[:-1].long()]
        return _apply_head(model, head, self.uniter.pooler(first_states))

    def _encode_first_rows(self, src: torch.Tensor, cu: torch.Tensor, max_len: int) -> torch.Tensor:
        """The encoder's last-layer states of each sequence's first token ([CLS]) [P, H], with two exact shortcuts:
        layer 0's query / key / value rows are gathered from per-token caches (``qkv0``), and the last layer runs
        only the [CLS] query (keys / values of every token, then attention output, FFN and LayerNorms on P rows:
        the pooler reads nothing else). The BertLayer's own projections and post-attention block
        (:meth:`~fastvl.nn.bert.BertLayer.post_attention`), on fewer rows."""
        if self.attention == "sdpa":
            return self._first_rows_padded(src, cu, max_len)
        layers = self.uniter.encoder.layer
        x = self.table[src]  # [T, H]
        t, hsz = x.shape
        first = cu[:-1].long()
        p = first.numel()
        cu_q = torch.arange(p + 1, dtype=torch.int32, device=x.device)
        for li, layer in enumerate(layers):
            sa = layer.attention.self
            nh, dh = sa.num_attention_heads, sa.attention_head_size
            last = li == len(layers) - 1
            if li == 0:
                q, k, v = (y.unflatten(-1, (nh, dh)) for y in self.qkv0[src].split(hsz, dim=-1))
            else:
                k, v = sa.project_kv(x)
                q = None if last else sa.project_q(x)  # the last layer's queries: the [CLS] rows only (below)
            if last:
                xq = x[first]  # [P, H]
                q = q[first] if q is not None else sa.project_q(xq)  # [P, heads, head_dim]
                ctx = cross_modal_attention(q, k, v, cu_q, cu, 1, max_len, mask="cross")
                x = layer.post_attention(ctx.reshape(p, hsz), xq)
            else:
                ctx = cross_modal_attention(q, k, v, cu, cu, max_len, max_len)
                x = layer.post_attention(ctx.reshape(t, hsz), x)
        return x

    def _first_rows_padded(self, src: torch.Tensor, cu: torch.Tensor, max_len: int) -> torch.Tensor:
        """As :meth:`_encode_first_rows` on a padded view [P, L, H] of the chunk, attention through torch's fused
        ``scaled_dot_product_attention`` with a key-padding mask (pad rows are computed and never read). Chunks are
        length-sorted, so the padding is small; the CPU choice, where fastvl's attention op has only its plain
        reference."""
        layers = self.uniter.encoder.layer
        p = cu.numel() - 1
        lens = (cu[1:] - cu[:-1]).long()
        ar = torch.arange(max_len, device=cu.device)
        mask = (ar[None] < lens[:, None])[:, None, None, :]  # [P, 1, 1, L] keys to attend
        rows = src[(cu[:-1].long()[:, None] + ar[None]).clamp(max=src.numel() - 1)]  # [P, L] table rows (pads: any)
        x = self.table[rows]  # [P, L, H]
        hsz = x.shape[-1]
        sdpa = torch.nn.functional.scaled_dot_product_attention
        for li, layer in enumerate(layers):
            sa = layer.attention.self
            nh, dh = sa.num_attention_heads, sa.attention_head_size
            last = li == len(layers) - 1
            if li == 0:
                q, k, v = (y.unflatten(-1, (nh, dh)) for y in self.qkv0[rows].split(hsz, dim=-1))
            else:
                k, v = sa.project_kv(x)
                q = None if last else sa.project_q(x)  # the last layer's queries: the [CLS] rows only (below)
            kp, vp = k.transpose(1, 2), v.transpose(1, 2)  # [P, heads, L, head_dim]
            if last:
                xq = x[:, 0]  # [P, H]
                q = q[:, 0] if q is not None else sa.project_q(xq)  # [P, heads, head_dim]
                ctx = sdpa(q.reshape(p, nh, 1, dh), kp, vp, attn_mask=mask)  # [P, heads, 1, head_dim]
                x = layer.post_attention(ctx.reshape(p, hsz), xq)
            else:
                ctx = sdpa(q.transpose(1, 2), kp, vp, attn_mask=mask)
                x = layer.post_attention(ctx.transpose(1, 2).reshape(p, max_len, hsz), x)
        return x

    def single_pooled(self, which: str, max_tokens: int, layer: int = -1) -> torch.Tensor:
        """Each text (``which='txt'``) or image (``'img'``) encoded ALONE, mean-pooled -> [N or M, H] float32."""
        lens = self.tl if which == "txt" else self.il
        start = self.t_start if which == "txt" else self.i_start + self.n_txt_tok
        out = []
        s = 0
        n = lens.numel()
        while s < n:
            e = s + 1
            while e < n and int(lens[s:e + 1].sum()) <= max_tokens:
                e += 1
            rows = torch.cat([torch.arange(int(start[j]), int(start[j]) + int(lens[j])) for j in range(s, e)])
            emb = self.table[rows.to(self.device)]
            cu = torch.zeros(e - s + 1, dtype=torch.int32)
            cu[1:] = torch.cumsum(lens[s:e], 0)
            if layer == 0:
                h = emb
            else:
                outs = self.uniter.encoder(emb, cu.to(self.device), int(lens[s:e].max()), True)
                h = outs[layer - 1] if layer > 0 else outs[layer]
            seg = torch.repeat_interleave(torch.arange(e - s), lens[s:e]).to(self.device)
            summed = torch.zeros(e - s, h.shape[1], device=self.device, dtype=torch.float32)
            summed.index_add_(0, seg, h.float())
            out.append(summed / lens[s:e].to(self.device, torch.float32)[:, None])
            s = e
        return torch.cat(out)


def _tiles(enc: _Encoded, max_tokens: int):
    """Length-sorted tiles of the full matrix: yields (t [P] long, i [P] long) host index pairs, text-major."""
    t_order = torch.argsort(enc.tl, stable=True)
    i_order = torch.argsort(enc.il, stable=True)
    n, m = t_order.numel(), i_order.numel()
    pairs = max(1, max_tokens // int(enc.tl.max() + enc.il.max()))
    bi = max(1, min(m, round(math.sqrt(pairs * m / n))))
    bt = max(1, min(n, pairs // bi))
    for ts in range(0, n, bt):
        tb = t_order[ts:ts + bt]
        for is_ in range(0, m, bi):
            ib = i_order[is_:is_ + bi]
            yield tb.repeat_interleave(ib.numel()), ib.repeat(tb.numel())


def _pair_chunks(enc: _Encoded, t: torch.Tensor, i: torch.Tensor, max_tokens: int):
    """An arbitrary pair list sorted by joint length and cut into chunks of <= max_tokens tokens (a longer single
    pair is a chunk of its own). Yields (t [P], i [P], positions of those pairs in the input list [P])."""
    lens = enc.tl[t] + enc.il[i]
    order = torch.argsort(lens, stable=True)
    cum = torch.cumsum(lens[order], 0)
    s = 0
    while s < order.numel():
        base = int(cum[s - 1]) if s else 0
        e = max(int(torch.searchsorted(cum, base + max_tokens, right=True)), s + 1)
        sel = order[s:e]
        yield t[sel], i[sel], sel
        s = e


# ----------------------------------------------------------------------------------------------------------
# Score matrices
# ----------------------------------------------------------------------------------------------------------


def _check_common(mode: str, max_tokens: int | None, device: torch.device) -> int:
    if mode not in MODES:
        raise ValueError(f"{_FN}.score_matrix: 'mode' must be one of {MODES}, got {mode!r}")
    if max_tokens is None:
        return DEFAULT_MAX_TOKENS.get(device.type, DEFAULT_MAX_TOKENS["cuda"])
    if int(max_tokens) < 1:
        raise ValueError(f"{_FN}.score_matrix: 'max_tokens' must be >= 1, got {max_tokens}")
    return int(max_tokens)


def _shortlist(enc: _Encoded, max_tokens: int, layer: int) -> torch.Tensor:
    n_layers = len(enc.uniter.encoder.layer)
    if isinstance(layer, bool) or not isinstance(layer, int) or not -n_layers <= layer <= n_layers:
        raise ValueError(f"{_FN}: 'shortlist_layer' must be an int in [-{n_layers}, {n_layers}] (0 = embeddings, k = "
                         f"output of layer k, -1 = last), got {layer!r}")
    tv = torch.nn.functional.normalize(enc.single_pooled("txt", max_tokens, layer), dim=1, eps=1e-6)
    iv = torch.nn.functional.normalize(enc.single_pooled("img", max_tokens, layer), dim=1, eps=1e-6)
    return tv @ iv.t()


@torch.no_grad()
def shortlist_scores(model: nn.Module, texts, images, *, max_tokens: int | None = None, layer: int = -1,
                     amp: bool | str | torch.dtype | None = None) -> torch.Tensor:
    """The cheap shortlist: cosine similarity of each text encoded alone and each image encoded alone.

    Each text (``[CLS] ... [SEP]``, type 0) and each image (its regions, type 1) runs through the model's encoder
    on its own (N + M sequences), its ``layer`` output (default -1, the last; 0 = the embeddings; k = layer k) is
    mean-pooled over tokens and L2-normalised. Returns [N, M] float32 cosine similarities on the model's device.

    A cross-encoder is never trained to align text and image encoded apart, so this shortlist is only as good as
    that accident: on the synthetic corpus's fine-tuned tiny model it is at chance (see the two-stage note in the
    module docstring). A dual encoder's scores, passed as ``score_matrix(..., shortlist=...)``, make a better one.
    """
    device = _device(model)
    max_tokens = _check_common("exact", max_tokens, device)
    with _eval_mode(model), _autocast(device, amp):
        enc = _Encoded(model, _as_texts(texts), _as_images(images), device)
        return _shortlist(enc, max_tokens, layer)


@torch.no_grad()
def score_matrix(model: nn.Module, texts, images, mode: str = "exact", *, k: int = 32,
                 shortlist: torch.Tensor | None = None, shortlist_layer: int = -1, head=None,
                 max_tokens: int | None = None, amp: bool | str | torch.dtype | None = None, shortcuts: bool = True,
                 attention: str = "auto", progress: bool = True, return_info: bool = False,
                 out_device: torch.device | str = "cpu"):
    """Scores [N, M] of every (text, image) pair for retrieval (see the module docstring for the two modes).

    Args:
        model: a UNITER model with a head: ``UniterForImageTextRetrieval`` (``rank_output``) or one with
            ``itm_output`` (``UniterForPretraining``: score = ITM log-odds of 'match'). Run in eval mode (restored).
        texts: :class:`RetrievalTexts` or a list of N 1-d token-id tensors. images: :class:`RetrievalImages` or a list
            of M ``(feat [n, img_dim], pos [n, 7])``.
        mode: 'exact' (every pair cross-encoded) or 'two_stage' (shortlist + re-rank of the top ``k``).
        k: two_stage: images re-scored per text and texts re-scored per image.
        shortlist: two_stage: your own shortlist scores [N, M] (higher = better) instead of the unimodal cosine.
        shortlist_layer: two_stage: encoder layer whose mean-pooled output the cosine shortlist uses (0 = embeddings).
        head: None (auto: 'rank' if the model has rank_output, else 'itm'), 'rank', 'itm', or a callable
            pooled [P, H] -> [P].
        max_tokens: joint tokens per packed chunk (memory bound; default 32768 on CPU, 131072 on GPU).
        amp: None/False = fp32; True/'bf16' = bf16 autocast (GPU), 'fp16', or a dtype.
        shortcuts: (default) gather layer 0's query / key / value from per-token caches and run the last layer for
            the [CLS] rows only (exact: the same math on fewer rows; equal to the model's forward up to fp32
            rounding). False: each chunk runs through the model's own encoder module (any layer type).
        attention: with shortcuts, the attention core: 'fastvl' (fastvl.ops.cross_modal_attention: packed, its best
            backend), 'sdpa' (torch's fused scaled_dot_product_attention on a padded view), 'auto' (default: sdpa on
            CPU, where fastvl's op has only its plain reference; fastvl elsewhere).
        progress: tqdm bar over the pairs scored.
        return_info: also return a dict (mode, k, pairs_scored, pairs_total, seconds, cross_scored [N, M] bool).
        out_device: where the [N, M] float32 matrix is gathered (default the host).
    Returns:
        scores [N, M] float32 (and the info dict with ``return_info``).
    """
    t0 = time.perf_counter()
    device = _device(model)
    max_tokens = _check_common(mode, max_tokens, device)
    texts, images = _as_texts(texts), _as_images(images)
    head = _resolve_head(model, head)
    n, m = len(texts), len(images)
    out = torch.empty(n, m, dtype=torch.float32, device=device)  # filled on the device, moved once at the end
    info: dict = {"mode": mode, "pairs_total": n * m}
    with _eval_mode(model), _autocast(device, amp):
        enc = _Encoded(model, texts, images, device, shortcuts, attention)
        if mode == "exact":
            with _progress(n * m, "itr exact", progress) as bar:
                for t, i in _tiles(enc, max_tokens):
                    out[t, i] = enc.pair_scores(model, head, t, i).to(out.device)
                    bar.update(t.numel())
            info.update(pairs_scored=n * m, k=None)
            scored = None
        else:
            if int(k) < 1:
                raise ValueError(f"{_FN}.score_matrix: 'k' must be >= 1, got {k}")
            if shortlist is None:
                s0 = _shortlist(enc, max_tokens, shortlist_layer).float().to(out.device)
            else:
                if tuple(shortlist.shape) != (n, m):
                    raise ValueError(f"{_FN}.score_matrix: 'shortlist' must have shape [{n}, {m}] (texts, images), "
                                     f"got {list(shortlist.shape)}")
                s0 = shortlist.detach().float().to(out.device)
            kt, ki = min(int(k), m), min(int(k), n)
            scored = torch.zeros(n, m, dtype=torch.bool, device=out.device)
            scored.scatter_(1, s0.topk(kt, dim=1).indices, True)
            scored.scatter_(0, s0.topk(ki, dim=0).indices, True)
            t, i = scored.nonzero(as_tuple=True)
            t, i = t.cpu(), i.cpu()
            cross = torch.empty(t.numel(), dtype=torch.float32, device=out.device)
            with _progress(t.numel(), f"itr two-stage (k={k})", progress) as bar:
                for tc, ic, sel in _pair_chunks(enc, t, i, max_tokens):
                    cross[sel.to(out.device)] = enc.pair_scores(model, head, tc, ic).to(out.device)
                    bar.update(tc.numel())
            # not re-scored: shortlist order kept, every value moved below the lowest cross-encoder score
            lo, hi = s0.min(), s0.max()
            span = (hi - lo).clamp(min=1e-12)
            floor = cross.min() - 1.0 if cross.numel() else torch.zeros((), device=out.device)
            out.copy_(floor - (hi - s0) / span)
            out[t.to(out.device), i.to(out.device)] = cross
            info.update(pairs_scored=int(t.numel()), k=int(k))
    out = out.to(out_device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    info["seconds"] = time.perf_counter() - t0
    info["cross_scored"] = None if scored is None else scored.to(out_device)
    return (out, info) if return_info else out


# ----------------------------------------------------------------------------------------------------------
# Naive reference: one normal forward per pair
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def brute_force_scores(model: nn.Module, texts, images, pairs: Sequence[tuple[int, int]] | None = None, head=None,
                       amp: bool | str | torch.dtype | None = None, progress: bool = False) -> torch.Tensor:
    """Naive scoring: one model forward (a 1-pair PackedVLBatch, embeddings recomputed) per (text, image) pair.

    ``rank`` heads go through the model's own ``forward(batch, compute_loss=False)``; ``itm`` through
    ``forward(batch, task='itm', compute_loss=False)`` when the model is a pre-training model. Returns [N, M]
    float32 (every pair) or, with ``pairs``, [len(pairs)] float32 for those pairs only.
    """
    device = _device(model)
    texts, images = _as_texts(texts).to(device), _as_images(images).to(device)
    head = _resolve_head(model, head)
    ct = [0]
    for x in texts.lens:
        ct.append(ct[-1] + x)
    ci = [0]
    for x in images.lens:
        ci.append(ci[-1] + x)
    todo = pairs if pairs is not None else [(t, i) for t in range(len(texts)) for i in range(len(images))]
    uniter = _uniter(model)
    out = torch.empty(len(todo), dtype=torch.float32)
    with _eval_mode(model), _autocast(device, amp), _progress(len(todo), "itr naive", progress) as bar:
        for p, (t, i) in enumerate(todo):
            pos = None if texts.position_ids is None else texts.position_ids[ct[t]:ct[t + 1]]
            b = PackedVLBatch(input_ids=texts.input_ids[ct[t]:ct[t + 1]], txt_lens=[texts.lens[t]],
                              img_feat=images.feat[ci[i]:ci[i + 1]], img_pos=images.pos[ci[i]:ci[i + 1]],
                              img_lens=[images.lens[i]], position_ids=pos)
            if head == "rank" and getattr(model, "task", None) == "itr":
                s = model(b, compute_loss=False)[:, 0]
            elif head == "itm" and hasattr(model, "region_classifier"):
                logits = model(b, task="itm", compute_loss=False, with_ot=False)[0].float()
                s = logits[:, 1] - logits[:, 0]
            else:
                h = uniter.forward_packed(b)
                s = _apply_head(model, head, uniter.pool_packed(h, uniter.layout(b)))
            out[p] = s.float().reshape(())
            bar.update(1)
    return out if pairs is not None else out.reshape(len(texts), len(images))


# ----------------------------------------------------------------------------------------------------------
# One call: scores + recall + bookkeeping
# ----------------------------------------------------------------------------------------------------------


def evaluate_retrieval(model: nn.Module, texts, images, txt2img, img2txts=None, mode: str = "exact",
                       ties: str = "expected", **kwargs) -> dict:
    """:func:`score_matrix` then :func:`recall_at_k` -> one dict for logs.

    Keys: the recalls (percent), ``mode``, ``exact`` (True only for ``mode='exact'`` or a two-stage run that
    re-scored every pair), ``k``, ``pairs_scored``, ``pairs_total``, ``seconds``, and for two-stage
    ``shortlist_coverage`` (percent of ground-truth pairs that were re-scored: an upper bound on what the cross
    encoder could rank) and a ``note`` saying the recall is approximate. ``kwargs`` go to :func:`score_matrix`.
    """
    scores, info = score_matrix(model, texts, images, mode, return_info=True, **kwargs)
    res = recall_at_k(scores, txt2img, img2txts, ties=ties)
    scored = info.pop("cross_scored")
    res.update(info)
    res["exact"] = info["pairs_scored"] == info["pairs_total"]
    if mode == "two_stage":
        t2i = torch.as_tensor(txt2img).long().reshape(-1).cpu()
        cov = scored.cpu()[torch.arange(t2i.numel()), t2i].float().mean()
        res["shortlist_coverage"] = 100.0 * float(cov)
        if not res["exact"]:
            res["note"] = (f"two-stage: cross-encoder re-ranked the top-{info['k']} of a cheap shortlist "
                           f"({info['pairs_scored']} of {info['pairs_total']} pairs); recall approximates the exact "
                           f"protocol and may be lower")
    return res
