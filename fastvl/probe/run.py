"""One probe run end to end: a checkpoint -> its model and a random-weights control -> the probe examples -> the five
probes -> ``probes.json``, ``probes.csv`` and the plots (what ``fastvl probe`` calls)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from ..data import SyntheticCorpus, WordPieceTokenizer, synthetic_corpus
from ..data.probe_annotations import synthetic_grounding
from ..train.checkpoint import CheckpointError
from .dataset import ProbeExample, batches_of, make_example, official_batch
from .extract import encoder_of, write_maps
from .extract_lxmert import lxmert_encoder_of, lxmert_example_maps
from .load import load_model, random_control
from .report import plot_all, write_report
from .suite import ProbeSettings, run_suite
from .views import lxmert_batch

__all__ = ["probe_checkpoint", "synthetic_examples"]


def synthetic_examples(corpus: SyntheticCorpus, split: str = "val", limit: int | None = None
                       ) -> Iterator[ProbeExample]:
    """Probe examples of the synthetic corpus (grounding from :func:`fastvl.data.probe_annotations.
    synthetic_grounding`), streamed from its dbs."""
    if split not in ("train", "val"):
        raise ValueError(f"synthetic_examples: 'split' must be 'train' or 'val', got {split!r}")
    tok = WordPieceTokenizer(corpus.vocab_file)
    db = corpus.txt_val if split == "val" else corpus.txt_train
    for cap, rec in synthetic_grounding(db, corpus.img_db, corpus.config.n_classes, limit):
        yield make_example(cap, rec.feat, rec.norm_bb, tok)


def _check_fits(model, family: str, corpus: SyntheticCorpus, checkpoint: str) -> None:
    if family == "uniter":
        enc = encoder_of(model)
        feat_dim, vocab = enc.img_dim, enc.config.vocab_size
    else:
        cfg = lxmert_encoder_of(model).config
        feat_dim, vocab = cfg.visual_feat_dim, cfg.vocab_size
    if feat_dim != corpus.img_dim or vocab < corpus.vocab_size:
        raise CheckpointError(f"--checkpoint {checkpoint}: the model takes {feat_dim}-d region features and "
                              f"{vocab} word ids, but the synthetic probe corpus has {corpus.img_dim}-d features and "
                              f"{corpus.vocab_size} word ids (probe a model pre-trained on it, e.g. a default fastvl "
                              f"pretrain run)")


def probe_checkpoint(model_type: str, checkpoint: str | Path, out: str | Path, settings: ProbeSettings | None = None,
                     split: str = "val", limit: int | None = None, device: str = "auto",
                     compare: list[str | Path] = (), progress: bool = True, config: str | None = None,
                     save_maps: str | Path | None = None, log=print) -> dict:
    """Probe ``checkpoint`` (a ``fastvl pretrain`` run folder or a checkpoint file) of ``model_type`` ('uniter' or
    'lxmert') and its random-weights control on the synthetic corpus; write ``probes.json``, ``probes.csv`` and the
    plots into ``out``. ``compare``: other runs' probes.json files whose NMI curves join the plot. Returns the JSON
    document."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    s = settings or ProbeSettings()
    model, info = load_model(model_type, checkpoint, config)
    corpus = synthetic_corpus()
    _check_fits(model, model_type, corpus, str(checkpoint))
    controls = [random_control(model, s.seed + k) for k in range(s.controls)]
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    model.to(dev)
    for c in controls:
        c.to(dev)
    total = (corpus.info["counts"][split]["captions"] if limit is None else
             min(limit, corpus.info["counts"][split]["captions"]))
    bar = tqdm(total=(1 + len(controls)) * total, desc=f"probe {model_type}", unit="caption", disable=not progress,
               mininterval=1.0)
    result = run_suite(model, controls, lambda: synthetic_examples(corpus, split, limit), s, dev, bar.update,
                       model_type)
    bar.close()
    if save_maps is not None:
        if model_type == "uniter":
            batches = (official_batch(c, dev) for c in batches_of(synthetic_examples(corpus, split, limit),
                                                                  s.batch_size))
            write_maps(model, batches, save_maps)
        else:
            pos_dim = lxmert_encoder_of(model).config.visual_pos_dim
            batches = (lxmert_batch(c, pos_dim, dev) for c in batches_of(synthetic_examples(corpus, split, limit),
                                                                         s.batch_size))
            write_maps(model, batches, save_maps, example_maps=lxmert_example_maps)
        log(f"attention maps and hidden states streamed to {save_maps}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    others = {}
    for path in compare:
        doc = json.loads(Path(path).read_text())
        name = str(doc.get("model", Path(path).parent.name)).upper()
        others[f"{name} trained"] = doc["trained"]
        others[f"{name} random weights"] = doc["control"]
    plots = plot_all(result, model_type.upper(), out, others)
    meta = {"model": model_type, "checkpoint": info, "data": {"corpus": "synthetic", "split": split,
                                                              "captions": result["model"]["examples"]},
            "device": str(dev), "plots": plots, "maps": None if save_maps is None else str(save_maps),
            "seconds": round(time.perf_counter() - start, 1)}
    doc = write_report(result, out, meta)
    log(f"fastvl probe: {model_type} {checkpoint}: {result['model']['examples']} captions in {meta['seconds']} s; "
        f"wrote {out / 'probes.json'}, {out / 'probes.csv'}")
    return doc
