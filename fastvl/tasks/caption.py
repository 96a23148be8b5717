"""Image captioning: the task module, caption masking, caption data (official txt_db / img_db) and evaluation.

Recipe (unified VLP, Zhou et al. 2020, on the UNITER encoder; the model is
:class:`~fastvl.models.uniter.caption.UniterForCaptioning`):

- sequence ``[regions | [CLS] w_1 .. w_n [SEP]]`` under the ``seq2seq`` mask: regions bidirectional among
  themselves, caption token t sees every region and caption tokens 0..t;
- masking (:func:`mask_caption`): every caption token after [CLS] -- [SEP] included, so the model learns to stop --
  is chosen with probability ``mask_prob`` (0.15), at least one per caption; a chosen token becomes [MASK] (80%), a
  random id of the vocabulary range (10%) or stays (10%); labels = the original ids there, -1 elsewhere;
- loss: mean cross-entropy of the MLM head (decoder tied to the word embeddings) over the chosen tokens;
- decoding: [MASK] appended after the caption so far, its prediction is the next token (greedy or beam search,
  with the key/value cache), until [SEP] or ``max_len`` tokens;
- evaluation: one caption per image against all of the image's reference captions, corpus BLEU-4 and CIDEr-D
  (:mod:`fastvl.tasks.caption_metrics`) on :func:`~fastvl.tasks.caption_metrics.caption_words` tokens.

Data: any official txt_db / img_db pair whose examples are captions of the image they name (``img2txts.json``
groups the references); the default is the synthetic corpus (:func:`fastvl.data.synthetic_corpus`: 3000 training
and 300 validation scenes, 2 grammar captions each). The trivial baseline reported next to the metrics is the most
frequent training caption predicted for every validation image.

``fastvl finetune --task caption`` is registered at the bottom (:func:`caption_spec`); task options
(``--opt key=value``): ``mask_prob``, ``beam_size``, ``max_len`` (generated tokens), ``length_penalty``,
``eval_batch_size``, ``vocab`` (the WordPiece vocab of the txt_db, to turn ids into words; found next to the
synthetic corpus / make-data output otherwise).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..batch import PackedVLBatch
from ..data.caption_data import CaptionEvalData
from ..data.lmdb_db import TxtDB
from ..data.tokenizer import WordPieceTokenizer
from ..models.uniter import CaptionGeneration, CaptionTokens, UniterForCaptioning
from .base import AdvOutput, ViewCtx, consistency_loss, masked_text_targets
from .caption_metrics import caption_words, cider_d, corpus_bleu

__all__ = ["CaptionAdvView", "CaptionDecoder", "CaptionTask", "evaluate_captions", "most_frequent_caption",
           "score_captions"]


class CaptionTask(nn.Module):
    """Captioning with a :class:`UniterForCaptioning`: ``forward(batch) -> dict(loss, logs, count)`` (the trainer's
    contract; count = masked tokens), :meth:`generate` (decoding settings fixed here).

    Args:
        model: the UniterForCaptioning (a submodule, shared with the trainer).
        tokens: the [CLS] / [SEP] / [MASK] ids.
        max_len, beam_size, length_penalty: decoding (see :meth:`UniterForCaptioning.generate`).
    """

    name = "caption"

    def __init__(self, model: UniterForCaptioning, tokens: CaptionTokens, max_len: int = 20, beam_size: int = 1,
                 length_penalty: float = 1.0):
        super().__init__()
        if not isinstance(model, UniterForCaptioning):
            raise TypeError(f"fastvl.tasks.CaptionTask: 'model' must be a UniterForCaptioning, got "
                            f"{type(model).__name__}")
        if not isinstance(tokens, CaptionTokens):
            raise TypeError(f"fastvl.tasks.CaptionTask: 'tokens' must be a CaptionTokens, got {type(tokens).__name__}")
        self.model, self.tokens = model, tokens
        self.max_len, self.beam_size, self.length_penalty = int(max_len), int(beam_size), float(length_penalty)

    def forward(self, batch: PackedVLBatch) -> dict:
        """batch: texts ``[CLS] caption [SEP]`` after :func:`mask_caption`, ``txt_labels`` set -> loss (mean CE)."""
        if not isinstance(batch, PackedVLBatch):
            raise TypeError(f"fastvl.tasks.CaptionTask: 'batch' must be a PackedVLBatch, got {type(batch).__name__}")
        loss = self.model(batch, compute_loss=True, reduction="mean")
        return dict(loss=loss, logs={"caption_loss": loss.detach()}, count=self.count(batch))

    @staticmethod
    def count(batch: PackedVLBatch) -> int | torch.Tensor:
        """Elements the loss averages: the masked caption tokens."""
        return batch.n_txt_masked if batch.n_txt_masked is not None else (batch.txt_labels != -1).sum()

    def generate(self, batch: PackedVLBatch, **overrides: Any) -> CaptionGeneration:
        """Captions of the batch's images; ``overrides``: max_len, beam_size, length_penalty, use_cache."""
        kw = dict(max_len=self.max_len, beam_size=self.beam_size, length_penalty=self.length_penalty)
        kw.update(overrides)
        return self.model.generate(batch, self.tokens, **kw)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, max_len={self.max_len}, beam_size={self.beam_size}"

    def adversarial_view(self) -> CaptionAdvView:
        """VILLA (``--adv``): the text delta perturbs the word embeddings of the teacher-forced caption, the image
        delta the raw region features; consistency = symmetric KL on the masked tokens' vocabulary logits [n, V],
        batchmean (as pre-training MLM). """
        return CaptionAdvView(self)


class CaptionAdvView:
    """:class:`~fastvl.tasks.base.AdvView` of :class:`CaptionTask`: one ``[img | txt]`` layout and one
    set of masked targets per micro-batch, shared by every pass."""

    def __init__(self, task: CaptionTask):
        self.task = task
        self.model = task.model
        self.hidden_size = int(self.model.uniter.config.hidden_size)

    def context(self, batch: PackedVLBatch) -> ViewCtx:
        if not isinstance(batch, PackedVLBatch):
            raise TypeError(f"fastvl.tasks.CaptionTask: 'batch' must be a PackedVLBatch, got {type(batch).__name__}")
        if batch.txt_labels is None:
            raise ValueError("fastvl.tasks.CaptionTask: batch.txt_labels ([T_txt] long, -1 where not masked) is "
                             "required")
        batch, targets = masked_text_targets(batch)
        return ViewCtx(batch, self.model.layout(batch), targets)

    def forward(self, ctx: ViewCtx, txt_delta: torch.Tensor | None, img_delta: torch.Tensor | None):
        logits = self.model(ctx.batch, compute_loss=False, layout=ctx.layout, txt_delta=txt_delta,
                            img_delta=img_delta)  # [n, V]
        loss = F.cross_entropy(logits.float(), ctx.targets)
        return AdvOutput(loss, logits, {"caption_loss": loss.detach()})

    def consistency(self, pred: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        return consistency_loss("kl", pred, clean)

    def count(self, batch: PackedVLBatch) -> int | torch.Tensor:
        return self.task.count(batch)


class CaptionDecoder:
    """Token ids -> metric words, through the txt_db's WordPiece vocab (``##`` pieces joined)."""

    def __init__(self, vocab_file: str | os.PathLike):
        self.tokenizer = WordPieceTokenizer(vocab_file)

    def text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def words(self, ids: Sequence[int]) -> list[str]:
        return caption_words(self.text(ids))


def most_frequent_caption(txt_dbs: Sequence[TxtDB], decoder: CaptionDecoder) -> tuple[list[str], int]:
    """The most frequent caption (as metric words) of the txt_dbs and how often it occurs (ties: first seen)."""
    counts: Counter = Counter()
    for txt in txt_dbs:
        for id_ in txt.ids:
            counts[tuple(decoder.words(txt.input_ids(id_)))] += 1
    if not counts:
        raise ValueError("most_frequent_caption: the txt_dbs hold no caption")
    words, n = counts.most_common(1)[0]
    return list(words), n


@torch.no_grad()
def evaluate_captions(task: CaptionTask, data: CaptionEvalData, decoder: CaptionDecoder,
                      device: torch.device | str = "cpu", max_batches: int | None = None, examples: int = 0,
                      **generate_kw: Any) -> dict[str, Any]:
    """Generate a caption per image and score the set: ``{'bleu4', 'bleu1', 'cider', 'hyp_len', 'finished',
    'images'}`` (+ ``'examples'``: the first ``examples`` (image, caption) pairs)."""
    hyps, refs, names, finished = [], [], [], []
    for batch, items in data.batches(max_batches):
        gen = task.generate(batch.to(device), **generate_kw)
        hyps += [decoder.words(t) for t in gen.tokens]
        refs += [[decoder.words(r) for r in it.refs] for it in items]
        names += [it.img_fname for it in items]
        finished += gen.finished
    out: dict[str, Any] = score_captions(hyps, refs)
    out["finished"] = sum(finished) / max(len(finished), 1)
    if examples:
        out["examples"] = [(n, " ".join(h)) for n, h in zip(names[:examples], hyps[:examples])]
    return out


def score_captions(hyps: Sequence[Sequence[str]], refs: Sequence[Sequence[Sequence[str]]]) -> dict[str, float]:
    """``{'bleu4', 'bleu1', 'cider', 'hyp_len', 'images'}`` of word-list hypotheses against their references."""
    bleu = corpus_bleu(hyps, refs)
    return {"bleu4": float(bleu["bleu4"]), "bleu1": float(bleu["bleu1"]), "cider": float(cider_d(hyps, refs)["cider"]),
            "hyp_len": sum(len(h) for h in hyps) / max(len(hyps), 1), "images": float(len(hyps))}
