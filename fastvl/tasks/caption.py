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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..batch import PackedVLBatch
from ..data.collate import Example
from ..data.errors import BadExampleCounter, DataError
from ..data.lmdb_db import ImageDB, TxtDB
from ..data.pretrain_data import PretrainData, VLExamples
from ..data.tokenizer import WordPieceTokenizer
from ..models.uniter.caption import CaptionGeneration, CaptionTokens, UniterForCaptioning
from . import register_task
from .caption_metrics import caption_words, cider_d, corpus_bleu

__all__ = ["CaptionEvalData", "CaptionTask", "CaptionTrainData", "caption_spec", "evaluate_captions",
           "mask_caption", "most_frequent_caption"]


# ----------------------------------------------------------------------------------------------------------------
# masking and the task module
# ----------------------------------------------------------------------------------------------------------------
def mask_caption(ids: np.ndarray, rng: np.random.Generator, prob: float, mask_id: int, v_range: tuple[int, int]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Caption masking of ``ids`` [L] = ``[CLS] w_1 .. w_n [SEP]`` (see the module doc) -> (input ids, labels [L]).

    Positions 1..L-1 ([SEP] included) can be chosen, each with p=``prob``, at least one; chosen: [MASK] 80%, a random
    id in ``v_range`` 10%, unchanged 10%. labels: the original id at chosen positions, -1 elsewhere.
    """
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 1 or len(ids) < 2:
        raise ValueError(f"mask_caption: 'ids' must be [CLS] ... [SEP] with at least 2 tokens, got shape "
                         f"{list(ids.shape)}")
    if not 0.0 < prob <= 1.0:
        raise ValueError(f"mask_caption: 'prob' must be in (0, 1], got {prob}")
    n = len(ids) - 1
    chosen = rng.random(n) < prob
    if not chosen.any():
        chosen[int(rng.integers(n))] = True
    how = rng.random(n)
    rand_ids = rng.integers(v_range[0], v_range[1], n)
    out, labels = ids.copy(), np.full_like(ids, -1)
    tail = ids[1:]
    labels[1:] = np.where(chosen, tail, -1)
    out[1:] = np.where(chosen & (how < 0.8), mask_id, np.where(chosen & (how >= 0.8) & (how < 0.9), rand_ids, tail))
    return out, labels


@register_task("caption")
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

    def adversarial_view(self) -> _CaptionAdvView:
        """VILLA (``--adv``): the text delta perturbs the word embeddings of the teacher-forced caption, the image
        delta the raw region features; consistency = symmetric KL on the masked tokens' vocabulary logits [n, V],
        batchmean (as pre-training MLM). See :mod:`fastvl.adversarial.consistency`."""
        return _CaptionAdvView(self)


@dataclass
class _CaptionCtx:
    batch: PackedVLBatch
    layout: Any
    targets: torch.Tensor


class _CaptionAdvView:
    """:class:`fastvl.adversarial.consistency.AdvView` of :class:`CaptionTask`: one ``[img | txt]`` layout and one
    set of masked targets per micro-batch, shared by every pass."""

    def __init__(self, task: CaptionTask):
        self.task = task
        self.model = task.model
        self.hidden_size = int(self.model.uniter.config.hidden_size)

    def context(self, batch: PackedVLBatch) -> _CaptionCtx:
        from ..adversarial.consistency import masked_text_targets

        if not isinstance(batch, PackedVLBatch):
            raise TypeError(f"fastvl.tasks.CaptionTask: 'batch' must be a PackedVLBatch, got {type(batch).__name__}")
        if batch.txt_labels is None:
            raise ValueError("fastvl.tasks.CaptionTask: batch.txt_labels ([T_txt] long, -1 where not masked) is "
                             "required")
        batch, targets = masked_text_targets(batch)
        return _CaptionCtx(batch, self.model.layout(batch), targets)

    def forward(self, ctx: _CaptionCtx, txt_delta: torch.Tensor | None, img_delta: torch.Tensor | None):
        from ..adversarial.consistency import AdvOutput

        logits = self.model(ctx.batch, compute_loss=False, layout=ctx.layout, txt_delta=txt_delta,
                            img_delta=img_delta)  # [n, V]
        loss = F.cross_entropy(logits.float(), ctx.targets)
        return AdvOutput(loss, logits, {"caption_loss": loss.detach()})

    def consistency(self, pred: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        from ..adversarial.consistency import consistency_loss

        return consistency_loss("kl", pred, clean)

    def count(self, batch: PackedVLBatch) -> int | torch.Tensor:
        return self.task.count(batch)


# ----------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------
class CaptionTrainData(PretrainData):
    """Training batches of captions (one source, ``'caption'``): the pre-training batching machinery (token
    buckets, deterministic per-example randomness, resumable sources) with :func:`mask_caption` as the masking."""

    def __init__(self, examples: VLExamples, max_tokens: int, seed: int, rank: int, world_size: int,
                 mask_prob: float = 0.15, num_workers: int = 0):
        super().__init__(examples, {"caption": 1.0}, max_tokens, seed, rank, world_size, train=True,
                         mask_prob=mask_prob, num_workers=num_workers)

    def make_example(self, task: str, i: int, rng: np.random.Generator) -> Example:
        ex = self.examples
        p, id_, name = ex.items[i]
        ids, labels = mask_caption(np.asarray(ex.text(i), dtype=np.int64), rng, self.mask_prob, ex.mask, ex.v_range)
        img = ex.image(p, name)
        return Example(id=id_, img_fname=name, input_ids=ids, img_feat=img.feat, img_pos=img.pos, txt_labels=labels)


@dataclass
class CaptionImage:
    """One evaluation image: its db pair, name and reference captions (token ids without [CLS] / [SEP])."""

    pair: int
    img_fname: str
    refs: list[list[int]]


class CaptionEvalData:
    """Evaluation images of (txt_db, img_db) pairs, each with all its reference captions (from ``img2txts.json``).

    Images missing from the img_db, or with no readable caption, raise :class:`DataError` (or are counted and left
    out with ``skip_bad_examples``). :meth:`batches` yields ``(PackedVLBatch of images, list of CaptionImage)``.
    """

    def __init__(self, pairs: Sequence[tuple[TxtDB, ImageDB]], batch_size: int = 64, skip_bad_examples: bool = False,
                 counter: BadExampleCounter | None = None):
        if batch_size < 1:
            raise ValueError(f"CaptionEvalData: 'batch_size' must be >= 1, got {batch_size}")
        self.pairs, self.batch_size = list(pairs), int(batch_size)
        self.bad = counter if counter is not None else BadExampleCounter()
        self.images: list[CaptionImage] = []
        for p, (txt, img) in enumerate(self.pairs):
            for name, ids in sorted(txt.img2txts.items()):
                try:
                    if name not in img:
                        raise DataError(img.name, name, f"image with captions in {txt.name} is not in the img_db",
                                        "missing_image")
                    refs = [txt.input_ids(i) for i in ids]
                except DataError as e:
                    self.bad.skip_or_raise(e, skip_bad_examples)
                    continue
                if refs:
                    self.images.append(CaptionImage(p, name, refs))
        if not self.images:
            raise DataError(", ".join(t.name for t, _ in self.pairs), None, "no evaluation images with captions",
                            "no_examples")

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, max_batches: int | None = None) -> Iterator[tuple[PackedVLBatch, list[CaptionImage]]]:
        """Batches of ``batch_size`` images in a fixed order (the first ``max_batches`` only, if given)."""
        for k, start in enumerate(range(0, len(self.images), self.batch_size)):
            if max_batches is not None and k >= max_batches:
                return
            items = self.images[start:start + self.batch_size]
            recs = [self.pairs[it.pair][1].get(it.img_fname) for it in items]
            batch = PackedVLBatch(input_ids=torch.zeros(0, dtype=torch.long), txt_lens=[0] * len(items),
                                  img_feat=torch.from_numpy(np.concatenate([r.feat for r in recs]).astype(np.float32)),
                                  img_pos=torch.from_numpy(np.concatenate([r.pos for r in recs]).astype(np.float32)),
                                  img_lens=[r.nbb for r in recs], extras={"img_fnames": [it.img_fname for it in items]})
            yield batch, items


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


# ----------------------------------------------------------------------------------------------------------------
# fine-tuning registration (fastvl finetune --task caption)
# ----------------------------------------------------------------------------------------------------------------
#: Task defaults for ``fastvl finetune --task caption`` (tiny model on the synthetic corpus, CPU minutes).
DEFAULTS: dict[str, Any] = dict(steps=4000, lr=1e-3, warmup_steps=100, batch_tokens=1024, val_every=2000,
                                ckpt_every=2000, log_every=50,
                                options=dict(mask_prob=0.15, beam_size=1, max_len=20, length_penalty=1.0,
                                             eval_batch_size=100))


def _find_vocab(options: dict, txt_dbs: Sequence[Path], root: Path | None) -> Path:
    if options.get("vocab"):
        return Path(options["vocab"])
    candidates = ([root / "vocab.txt"] if root is not None else []) + \
        [p for t in txt_dbs for p in (t.parent / "vocab.txt", t.parent.parent / "vocab.txt")]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"fastvl finetune --task caption: no vocab.txt found next to the txt_dbs "
                            f"{[str(t) for t in txt_dbs]}; pass the WordPiece vocab of the txt_db with "
                            "--opt vocab=PATH (needed to turn generated ids into words)")


def _db_paths(s) -> tuple[list[Path], list[Path], list[Path], list[Path], Path | None, bool]:
    from ..data import find_dbs, synthetic_corpus

    if s.txt_db:
        if len(s.txt_db) != len(s.img_db):
            raise ValueError(f"fastvl finetune --task caption: --txt-db has {len(s.txt_db)} paths but --img-db has "
                             f"{len(s.img_db)}")
        val_img = s.val_img_db or (s.img_db[:1] * len(s.val_txt_db))
        return ([Path(p) for p in s.txt_db], [Path(p) for p in s.img_db], [Path(p) for p in s.val_txt_db],
                [Path(p) for p in val_img], None, False)
    if s.data:
        lay = find_dbs(s.data)
        return lay.train_txt, lay.train_img, lay.val_txt, lay.val_img, lay.root, bool(lay.info)
    corpus = synthetic_corpus()
    return [corpus.txt_train], [corpus.img_db], [corpus.txt_val], [corpus.img_db], corpus.root, True


def _build_data(s, rank: int, world_size: int):
    from ..train.finetune import FinetuneData

    opts = s.options
    train_txt, train_img, val_txt, val_img, root, synthetic = _db_paths(s)
    bad = BadExampleCounter()
    pairs = [(TxtDB(t, s.max_txt_len), ImageDB(i)) for t, i in zip(train_txt, train_img)]
    examples = VLExamples(pairs, skip_bad_examples=s.skip_bad_examples, counter=bad)
    train = CaptionTrainData(examples, s.batch_tokens, s.seed, rank, world_size,
                             mask_prob=float(opts.get("mask_prob", 0.15)))
    decoder = CaptionDecoder(_find_vocab(opts, train_txt, root))
    val = None
    if val_txt:
        val_pairs = [(TxtDB(t, -1), ImageDB(i)) for t, i in zip(val_txt, val_img)]
        val = CaptionEvalData(val_pairs, int(opts.get("eval_batch_size", 100)), s.skip_bad_examples, bad)
    info: dict[str, Any] = {"source": "synthetic corpus" if synthetic else ", ".join(map(str, train_txt)),
                            "train_captions": len(examples), "val_images": len(val) if val else 0,
                            "vocab": str(decoder.tokenizer.vocab_file)}
    if val is not None:
        words, n = most_frequent_caption([p[0] for p in pairs], decoder)
        base = score_captions([words] * len(val), [[decoder.words(r) for r in im.refs] for im in val.images])
        info["baseline"] = {"caption": " ".join(words), "count": n, "bleu4": base["bleu4"], "cider": base["cider"]}
    dims = {"img_dim": examples.img_dim, "vocab_size": examples.v_range[1], "synthetic": synthetic,
            "cls_id": examples.cls, "sep_id": examples.sep, "mask_id": examples.mask}
    return FinetuneData(sources=train.sources, mix=dict(train.mix), val=(val, decoder), dims=dims, bad=bad, info=info)


def _build_model(s, data, init_state: dict | None) -> UniterForCaptioning:
    from ..train.finetune import load_pretrained, model_config

    cfg = model_config(s, data.dims)
    model = UniterForCaptioning(cfg, cfg.img_dim)
    load_pretrained(model, init_state)
    return model


def _build_tasks(model: UniterForCaptioning, s, data) -> dict[str, nn.Module]:
    d = data.dims
    o = s.options
    tokens = CaptionTokens(cls=int(d["cls_id"]), sep=int(d["sep_id"]), mask=int(d["mask_id"]))
    return {"caption": CaptionTask(model, tokens, max_len=int(o.get("max_len", 20)),
                                   beam_size=int(o.get("beam_size", 1)),
                                   length_penalty=float(o.get("length_penalty", 1.0)))}


def _evaluate(tasks: dict[str, nn.Module], data, device: torch.device, s) -> dict[str, float]:
    val, decoder = data.val
    task = tasks["caption"]
    was_training = task.model.training
    try:
        out = evaluate_captions(task, val, decoder, device, max_batches=s.val_batches)
    finally:
        task.model.train(was_training)
    base = data.info.get("baseline", {})
    out.update({f"baseline_{k}": float(base[k]) for k in ("bleu4", "cider") if k in base})
    return {k: float(v) for k, v in out.items() if isinstance(v, int | float)}


def _chance(data) -> float:
    return float(data.info.get("baseline", {}).get("cider", 0.0))


def caption_spec() -> Any:
    """The :class:`fastvl.train.finetune.FinetuneTaskSpec` of ``fastvl finetune --task caption`` (headline metric
    CIDEr-D; 'chance' = the CIDEr-D of the most frequent training caption for every validation image)."""
    from ..train.finetune import FinetuneTaskSpec

    return FinetuneTaskSpec(name="caption", build_data=_build_data, build_model=_build_model,
                            build_tasks=_build_tasks, evaluate=_evaluate, metric="cider", chance=_chance,
                            defaults=DEFAULTS, help="image captioning (seq2seq UNITER, MLM-style; BLEU-4, CIDEr-D)")


def _register(register: Callable | None = None) -> None:
    if register is None:
        from ..train.finetune import register_finetune_task as register
    register(caption_spec(), replace_existing=True)


_register()
