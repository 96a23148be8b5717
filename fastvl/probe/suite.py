"""The five VALUE probes over a dataset: one streaming pass per model collects small per-example features (never
the maps of the whole dataset), then each probe is scored, for the model and for its random-weights control.

:func:`collect` runs a model over probe examples batch by batch and keeps, per example, only what the probes need:
token outputs of the first ``fusion_examples`` examples, running sums of [CLS] modality mass and cross-modal head
flags, phrase<->region and region<->region attention vectors, per-layer mean text embeddings, and the full maps of a
few examples for the pictures. :func:`score` turns one collection into the probe figures; :func:`run_suite` does
both for a model and its control.

Visual relations (probe 4). VALUE probes relations that are annotated facts (Visual Genome), between the regions
grounded to the subject and to the object. The rows are therefore the STATED relations: 'caption' relations (the
synthetic caption says "a blue shoe left of the cup": subject the shoe's region, object the cup's, label the stated
predicate, one row per statement, in the stated direction) and 'annotation' relations (Visual Genome). Each row
is probed with the same linear probe and folds on six feature sets, the figures under ``relations``:

- ``stated_pair``: subject <-> object region attention, every layer and head, both directions (VALUE's probe), from
  a pass over the caption with each stated predicate replaced by one [MASK] (so the text never names the relation,
  in any token or length: what the probe reads must come from the image);
- ``stated_slot``: the text <-> region part, the attention between that [MASK] slot and the subject and object
  regions (:func:`~fastvl.probe.scoring.relation_slot_features`; the predicate word itself would leak the label);
- ``stated_slot_pair``: both together;
- ``stated_pair_caption``: ``stated_pair`` on the caption as written (the relation words visible: a single-stream
  model's region states may read them from the text);
- ``stated_boxes``: the floor, the model's input position features of the two regions with no attention at all
  (the same for the model and its control);
- ``stated_slot_state``: not an attention probe but a check that there is something to find: the [MASK] slot's
  last-layer output (its hidden state, what an MLM head reads to fill in the predicate). A model that learned the
  relations has them here even where its attention WEIGHTS do not show them (attention weights say where a token
  looks; what it reads from there is in the values);
- ``stated_fill``: no probe at all, the model's own MLM head on that slot state: the share of rows whose stated
  predicate's first word piece scores highest among the first word pieces of every stated predicate (left, right,
  above, below on the synthetic corpus); chance is the most common one's share. Only for models with an MLM head
  (a pre-training run; the random-weights controls, bare encoders, have none).

The random-weights control runs the same probe on the same rows: a random model's near-uniform attention is nearly
linear in its input boxes, so it decodes some geometry for free (a legitimate baseline; ``stated_boxes`` shows how
much there is to decode). The earlier figures ``predicate``, ``bigger than`` and ``same colour as`` are kept: every
ordered pair of grounded regions (stated or not, both directions) with 'derived' labels from the boxes / colours,
region-pair attention on the caption as written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from ..data import position_features
from .dataset import ProbeExample, batches_of, mask_stated_relations
from .scoring import (
    bin_values,
    box_pair_features,
    cross_modal_flags,
    fusion_nmi,
    linear_probe,
    modality_mass,
    phrase_region_features,
    region_pair_features,
    relation_slot_features,
)
from .views import ExampleMaps, lxmert_views, uniter_views

__all__ = ["STATED_FEATURES", "VIEWS", "Collected", "ProbeSettings", "collect", "mlm_head", "run_suite", "score"]

#: model family -> the function giving one batch's :class:`~fastvl.probe.views.ExampleMaps`
VIEWS: dict[str, Callable] = {"uniter": uniter_views, "lxmert": lxmert_views}

#: the stated-relation probes (figure name in ``relations`` -> feature set); see the module doc
STATED_FEATURES = {"stated_pair": "pair", "stated_slot": "slot", "stated_slot_pair": "slot_pair",
                   "stated_pair_caption": "pair_caption", "stated_boxes": "boxes", "stated_slot_state": "slot_state"}


@dataclass
class ProbeSettings:
    """Knobs of the probe suite."""

    batch_size: int = 32
    seed: int = 0  # k-means init, cross-validation split, negative sampling, control weights (seed, seed + 1, ...)
    controls: int = 3  # random-weights controls (their figures are averaged in the headline and the CSV)
    folds: int = 5
    fusion_examples: int = 200  # examples whose tokens enter the per-layer k-means
    cross_threshold: float = 0.5  # a region (text) query with more attention than this on text (regions)
    head_fraction: float = 0.5  # a head is cross-modal when the above happens in at least this share of examples
    keep_maps: int = 4  # examples whose full maps are kept for the attention picture
    negatives_per_phrase: int = 3  # non-coreferent regions per phrase (sampled; 0: all)
    binary_predicates: tuple[str, ...] = ("bigger than", "same colour as")


@dataclass
class Collected:
    """What one pass of a model over the probe examples keeps (see module doc)."""

    layers: int = 0
    heads: int = 0
    fusion_tokens: list[list[np.ndarray]] = field(default_factory=list)  # per layer (0 = embeddings)
    fusion_modality: list[np.ndarray] = field(default_factory=list)
    cls_text: np.ndarray | None = None  # [layers, heads] summed over examples
    cls_image: np.ndarray | None = None
    uniform_text: float = 0.0  # summed share of text keys in each example (the uniform-attention text mass)
    img2txt: np.ndarray | None = None  # [layers, heads] count of examples
    txt2img: np.ndarray | None = None
    examples: int = 0
    coref_x: list[np.ndarray] = field(default_factory=list)
    coref_y: list[int] = field(default_factory=list)
    coref_group: list[str] = field(default_factory=list)
    rel_x: list[np.ndarray] = field(default_factory=list)
    rel_predicates: list[list[str]] = field(default_factory=list)
    rel_group: list[str] = field(default_factory=list)
    stated: list[dict] = field(default_factory=list)  # one per stated relation: predicate, group, feature sets
    sent_x: list[list[np.ndarray]] = field(default_factory=list)  # per layer
    sent_props: list[dict] = field(default_factory=list)
    sent_group: list[str] = field(default_factory=list)
    maps: list[dict] = field(default_factory=list)


def _start(c: Collected, v: ExampleMaps) -> None:
    c.layers, c.heads = v.t2i.shape[0], v.t2i.shape[1]
    c.fusion_tokens = [[] for _ in v.fusion]
    c.sent_x = [[] for _ in v.text]
    if v.joint is not None:
        shape = v.joint.shape[:2]
        c.cls_text, c.cls_image = np.zeros(shape), np.zeros(shape)
        c.img2txt, c.txt2img = np.zeros(shape), np.zeros(shape)


def _example_features(c: Collected, e: ProbeExample, v: ExampleMaps, s: ProbeSettings,
                      rng: np.random.Generator, masked: ExampleMaps | None = None,
                      slots: list[int | None] | None = None) -> None:
    tl, n = e.txt_len, e.n_regions
    if len(c.fusion_modality) < s.fusion_examples and n:
        for layer, tokens in enumerate(v.fusion):
            c.fusion_tokens[layer].append(tokens)
        c.fusion_modality.append(np.r_[np.zeros(tl, np.int64), np.ones(n, np.int64)])
    if v.joint is not None:
        text, image = modality_mass(v.joint, tl)
        c.cls_text += text
        c.cls_image += image
        c.uniform_text += tl / (tl + n)
        i2t, t2i = cross_modal_flags(v.joint, tl, s.cross_threshold)
        c.img2txt += i2t
        c.txt2img += t2i
    c.examples += 1
    group = e.caption.img_fname
    if n >= 2:
        for p in e.caption.phrases:
            if not p.regions:
                continue
            span = e.phrase_tokens(p.start, p.end)
            negatives = [r for r in range(n) if r not in p.regions]
            if s.negatives_per_phrase and len(negatives) > s.negatives_per_phrase:
                negatives = sorted(rng.choice(negatives, s.negatives_per_phrase, replace=False).tolist())
            for r in list(p.regions) + negatives:
                c.coref_x.append(phrase_region_features(v.t2i, v.i2t, span, r))
                c.coref_y.append(int(r in p.regions))
                c.coref_group.append(group)
    pairs: dict[tuple[int, int], list[str]] = {}
    for rel in e.caption.relations:
        if rel.source != "caption":  # the all-pairs figure: derived (and annotated) relations, as before
            pairs.setdefault((rel.subject, rel.object), []).append(rel.predicate)
    for (subj, obj), preds in pairs.items():
        c.rel_x.append(region_pair_features(v.i2i, subj, obj))
        c.rel_predicates.append(preds)
        c.rel_group.append(group)
    pos = position_features(e.norm_bb) if e.caption.relations else None
    for k, rel in enumerate(e.caption.relations):
        if rel.source == "derived":
            continue
        src = masked if masked is not None else v
        row = {"predicate": rel.predicate, "group": group,
               "pair": region_pair_features(src.i2i, rel.subject, rel.object),
               "pair_caption": region_pair_features(v.i2i, rel.subject, rel.object),
               "boxes": box_pair_features(pos, rel.subject, rel.object)}
        if slots is not None and slots[k] is not None:
            row["slot"] = relation_slot_features(masked.t2i, masked.i2t, slots[k], rel.subject, rel.object)
            row["slot_pair"] = np.concatenate([row["slot"], row["pair"]])
            row["slot_state"] = masked.text[-1][slots[k]]
            row["word_id"] = int(e.input_ids[e.word_tokens[rel.start][0]])  # the predicate's first word piece
        c.stated.append(row)
    if e.caption.properties:
        for layer, tokens in enumerate(v.text):
            c.sent_x[layer].append(tokens.mean(0))
        c.sent_props.append(dict(e.caption.properties))
        c.sent_group.append(group)
    if len(c.maps) < s.keep_maps and n >= 2 and any(p.regions for p in e.caption.phrases):
        c.maps.append({"id": e.caption.id, "words": list(e.caption.words), "word_tokens": list(e.word_tokens),
                       "norm_bb": e.norm_bb.tolist(), "txt_len": tl, "t2i": v.t2i.astype(np.float32),
                       "phrases": [asdict(p) for p in e.caption.phrases]})


@torch.no_grad()
def collect(model: nn.Module, examples: Iterable[ProbeExample], settings: ProbeSettings | None = None,
            device: torch.device | str = "cpu", progress: Callable[[int], None] | None = None,
            family: str = "uniter") -> Collected:
    """One streaming pass of ``model`` (of ``family``: a key of :data:`VIEWS`) over ``examples``; ``progress(n)`` is
    called after every batch with its size."""
    if family not in VIEWS:
        raise ValueError(f"fastvl.probe.collect: 'family' must be one of {sorted(VIEWS)}, got {family!r}")
    s = settings or ProbeSettings()
    rng = np.random.default_rng(s.seed)
    c = Collected()
    for chunk in batches_of(examples, s.batch_size):
        views = VIEWS[family](model, chunk, device)
        masked = [mask_stated_relations(e) for e in chunk]
        stating = [k for k, (_, slots) in enumerate(masked) if any(x is not None for x in slots)]
        masked_views = dict(zip(stating, VIEWS[family](model, [masked[k][0] for k in stating], device)
                                if stating else []))
        if not c.fusion_tokens:
            _start(c, views[0])
        for k, (e, v) in enumerate(zip(chunk, views)):
            _example_features(c, e, v, s, rng, masked_views.get(k), masked[k][1] if k in masked_views else None)
        if progress is not None:
            progress(len(chunk))
    if c.examples == 0:
        raise ValueError("fastvl.probe.collect: no examples")
    _fill(c, model, family, device)
    return c


def mlm_head(model: nn.Module, family: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The MLM head of ``model`` (last text states [..., H] -> vocabulary logits [..., V]), or None for a bare
    encoder: UNITER's ``cls``, LXMERT's ``cls.predictions``."""
    head = getattr(model, "cls", None)
    if head is None:
        return None
    return head.predictions if family == "lxmert" else head


def _fill(c: Collected, model: nn.Module, family: str, device: torch.device | str) -> None:
    head = mlm_head(model, family)
    rows = [r for r in c.stated if "word_id" in r]
    if head is None or not rows:
        return
    words = sorted({r["word_id"] for r in rows})
    states = torch.as_tensor(np.stack([r["slot_state"] for r in rows]), device=device)
    param = next(model.parameters())
    with torch.no_grad():
        logits = head(states.to(param.dtype))[:, words].float().cpu().numpy()  # [rows, candidate words]
    for r, best in zip(rows, logits.argmax(1)):
        r["fill_id"] = words[int(best)]


def _relation_tasks(c: Collected, s: ProbeSettings) -> dict[str, list[str]]:
    if not c.rel_predicates:
        return {}
    tasks = {"predicate": [p[0] for p in c.rel_predicates]}
    for name in s.binary_predicates:
        tasks[name] = ["yes" if name in p else "no" for p in c.rel_predicates]
    return tasks


def score(c: Collected, settings: ProbeSettings | None = None) -> dict:
    """The probe figures of one collection: fusion NMI per layer, [CLS] modality mass per head, cross-modal head
    shares, and the linear probes (coreference, relations, sentence properties per layer)."""
    s = settings or ProbeSettings()
    out: dict = {"examples": c.examples, "layers": c.layers, "heads": c.heads}
    if c.fusion_modality:
        modality = np.concatenate(c.fusion_modality)
        out["fusion_nmi"] = [fusion_nmi(np.concatenate(toks), modality, s.seed) for toks in c.fusion_tokens]
        out["fusion_tokens"] = int(len(modality))
    if c.cls_text is not None:
        out["cls_text_mass"] = (c.cls_text / c.examples).tolist()
        out["cls_image_mass"] = (c.cls_image / c.examples).tolist()
        out["uniform_text_share"] = c.uniform_text / c.examples
        img2txt, txt2img = c.img2txt / c.examples, c.txt2img / c.examples
        out["img2txt_share"], out["txt2img_share"] = img2txt.tolist(), txt2img.tolist()
        out["img2txt_heads"] = [[int(a), int(b)] for a, b in zip(*np.nonzero(img2txt >= s.head_fraction))]
        out["txt2img_heads"] = [[int(a), int(b)] for a, b in zip(*np.nonzero(txt2img >= s.head_fraction))]
    else:
        out["modality_note"] = ("two-stream model: [CLS] attends to text and to regions in separate softmaxes and "
                                "every cross-attention head is cross-modal by construction; [CLS] modality mass and "
                                "cross-modal head shares are defined for single-stream models only")
    if c.coref_x:
        out["coreference"] = linear_probe(np.stack(c.coref_x), c.coref_y, c.coref_group, s.seed, s.folds)
        x, y = np.stack(c.coref_x), np.asarray(c.coref_y)
        if y.min() == 0 and y.max() == 1:  # per head: mean phrase->region attention, coreferent minus not
            half = x.shape[1] // 2
            gap = x[y == 1, :half].mean(0) - x[y == 0, :half].mean(0)
            out["coreference_head_gap"] = gap.reshape(c.layers, c.heads).tolist()
    if c.rel_x or c.stated:
        out["relations"] = {}
    if c.rel_x:
        x = np.stack(c.rel_x)
        out["relations"] = {name: linear_probe(x, labels, c.rel_group, s.seed, s.folds)
                            for name, labels in _relation_tasks(c, s).items()}
    for name, key in STATED_FEATURES.items():
        rows = [r for r in c.stated if key in r]
        if rows:
            out["relations"][name] = linear_probe(np.stack([r[key] for r in rows]), [r["predicate"] for r in rows],
                                                  [r["group"] for r in rows], s.seed, s.folds)
    fill = [r for r in c.stated if "fill_id" in r]
    if fill:
        _, per_word = np.unique([r["word_id"] for r in fill], return_counts=True)
        preds, per_pred = np.unique([r["predicate"] for r in fill], return_counts=True)
        out["relations"]["stated_fill"] = {
            "accuracy": float(np.mean([r["fill_id"] == r["word_id"] for r in fill])),
            "majority": float(per_word.max() / per_word.sum()), "n": len(fill),
            "classes": {str(p): int(k) for p, k in zip(preds, per_pred)}}
    if c.sent_props:
        keys = sorted({k for p in c.sent_props for k in p})
        ling = {}
        for k in keys:
            labels = bin_values([p.get(k, "") for p in c.sent_props])
            ling[k] = [linear_probe(np.stack(layer), labels, c.sent_group, s.seed, s.folds) for layer in c.sent_x]
        out["linguistic"] = ling
    return out


def run_suite(model: nn.Module, controls: nn.Module | Sequence[nn.Module],
              examples: Callable[[], Iterable[ProbeExample]], settings: ProbeSettings | None = None,
              device: torch.device | str = "cpu", progress: Callable[[int], None] | None = None,
              family: str = "uniter") -> dict:
    """Collect and score ``model`` and its random-weights ``controls`` (one model or several draws) on the same
    examples (``examples()`` is called once per model). Returns {'model': figures, 'control': the first control's
    figures, 'controls': every control's figures, 'maps': the kept maps of the model, 'control_maps': those of the
    first control, 'settings': ...}."""
    s = settings or ProbeSettings()
    controls = [controls] if isinstance(controls, nn.Module) else list(controls)
    if not controls:
        raise ValueError("fastvl.probe.run_suite: no control model")
    got = collect(model, examples(), s, device, progress, family)
    figures, first_maps = [], None
    for ctrl_model in controls:
        ctrl = collect(ctrl_model, examples(), s, device, progress, family)
        figures.append(score(ctrl, s))
        first_maps = ctrl.maps if first_maps is None else first_maps
    return {"model": score(got, s), "control": figures[0], "controls": figures, "maps": got.maps,
            "control_maps": first_maps, "settings": asdict(s)}
