"""``fastvl finetune --task caption``: UNITER captioning on caption txt_dbs (default: the synthetic corpus).

Headline metric CIDEr-D; 'chance' is the CIDEr-D of the most frequent training caption for every validation image.
Task options (``--opt key=value``): ``mask_prob``, ``beam_size``, ``max_len`` (generated tokens), ``length_penalty``,
``eval_batch_size``, ``vocab`` (the WordPiece vocab of the txt_db, to turn ids into words; found next to the
synthetic corpus / make-data output otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import BadExampleCounter, ImageDB, TxtDB, VLExamples, find_dbs, synthetic_corpus
from ..data.caption_data import CaptionEvalData, CaptionTrainData
from ..models.uniter import CaptionTokens, UniterForCaptioning
from ..tasks.caption import CaptionDecoder, CaptionTask, evaluate_captions, most_frequent_caption, score_captions
from .base import FinetuneData, Recipe, SettingsError, load_pretrained, model_config

__all__ = ["RECIPE"]

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
    if s.txt_db:
        if len(s.txt_db) != len(s.img_db):
            raise SettingsError(f"fastvl finetune --task caption: --txt-db has {len(s.txt_db)} paths but --img-db has "
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


RECIPE = Recipe(model_config=model_config,
                name="caption", build_data=_build_data, build_model=_build_model, build_tasks=_build_tasks,
                evaluate=_evaluate, metric="cider", chance=_chance, defaults=DEFAULTS,
                help="image captioning (seq2seq UNITER, MLM-style; BLEU-4, CIDEr-D)")
