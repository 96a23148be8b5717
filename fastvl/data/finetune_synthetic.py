"""Synthetic data for the UNITER fine-tuning tasks, generated from the synthetic scenes, in the official formats.

The scenes come from :mod:`fastvl.data.synthetic` (same world: class prototypes, attribute directions and box shapes
as the pre-training corpus of the same seed, so a model pre-trained there transfers), with 2-4 objects per scene by
default. Every text is built from the objects of its image(s), so each task is learnable only by reading the
regions:

- ``vqa``: "what colour is the cup ?", "what size ...", "where is ...", "how many objects are there ?",
  "is there a red cup ?", "what is the red object ?"; VQA-style soft scores (10 simulated annotators: 8-10 give the
  answer, the others a confusable one; score = min(1, count / 3)).
- ``gqa``: relational questions: "what is left of the cup ?", "is the cup above the ball ?", "what colour is the
  object below the lamp ?", "which is larger , the cup or the ball ?"; one answer (score 1).
- ``ve``: statements about one object: entailment (true), contradiction (the object is there but one attribute is
  wrong), neutral (the statement names a class that is not in the image: the image cannot settle it).
- ``nlvr2``: two images and a statement ("the left image has a red cup", "both images have a ball"), true/false,
  balanced.
- ``itr``: the scene captions (2 per training image, 1 per validation image).
- ``re``: expressions to one object ("the red object", "the cup", "the object at the top left", "the lamp left of
  the cup"); the official RefCOCO layout (refs / annotations / images / categories json, boxes in pixels).
- ``vcr``: questions with 4 answers and 4 rationales (one right each), the official VCR layout.

Layout of the cache folder ``<cache>/finetune-<hash>/`` (atomic, like the pre-training corpus): ``vocab.txt``,
``img_db/`` (every scene, named ``visual_grounding_coco_gt_<image id:012>.npz`` as official RE data),
``<task>/txt_db/{train,val}.db`` per task, ``<task>/ans2label.json`` for vqa / gqa / ve, ``finetune.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .lmdb_db import ImageDBWriter, TxtDBWriter
from .synthetic import (
    CLASSES,
    COLOURS,
    COLS,
    ROWS,
    SIZES,
    SyntheticConfig,
    _caption,
    _location_phrase,
    _relation,
    _scene,
    _World,
    cached_folder,
    config_key,
    default_cache_dir,
    synthetic_vocab,
)
from .tokenizer import WordPieceTokenizer, write_vocab

__all__ = ["FINETUNE_TASKS", "FinetuneSynthConfig", "FinetuneSynthData", "finetune_synthetic", "image_name",
           "scene_objects"]

VERSION = 4
FINETUNE_TASKS = ("vqa", "gqa", "ve", "nlvr2", "itr", "re", "vcr")
VE_LABELS = ["contradiction", "entailment", "neutral"]
CELLS = [f"{r} {c}" if (r, c) != ("middle", "center") else "center" for r in ROWS for c in COLS]
RE_CATEGORY_OFFSET = 1


@dataclass(frozen=True)
class FinetuneSynthConfig:
    """Knobs of the synthetic fine-tuning data (deterministic from ``world.seed`` and ``seed``).

    ``world`` is the pre-training corpus config whose world (prototypes, colours, box shapes, feature size) the
    scenes share; ``min_objects`` / ``max_objects`` replace its object counts.
    """

    world: SyntheticConfig = field(default_factory=SyntheticConfig)
    seed: int = 1
    n_train_images: int = 2000
    n_val_images: int = 200
    min_objects: int = 2
    max_objects: int = 4
    questions_per_image: int = 3
    image_size: tuple[int, int] = (640, 480)  # (width, height) in pixels (RE boxes)

    def __post_init__(self) -> None:
        limit = min(self.world.n_classes, self.world.n_colours, 9)
        if not 2 <= self.min_objects <= self.max_objects <= limit:
            raise ValueError(f"FinetuneSynthConfig: need 2 <= min_objects <= max_objects <= {limit}, got "
                             f"{self.min_objects}, {self.max_objects}")
        for name in ("n_train_images", "n_val_images", "questions_per_image"):
            if getattr(self, name) < 1:
                raise ValueError(f"FinetuneSynthConfig: '{name}' must be >= 1, got {getattr(self, name)}")
        if self.n_train_images < 4 or self.n_val_images < 4:
            raise ValueError("FinetuneSynthConfig: need >= 4 images per split (pairs and distractors)")

    @property
    def scene_config(self) -> SyntheticConfig:
        return replace(self.world, min_objects=self.min_objects, max_objects=self.max_objects)

    def key(self) -> str:
        return config_key(self, VERSION)


@dataclass
class FinetuneSynthData:
    """Paths of the written synthetic fine-tuning data (see :func:`finetune_synthetic`)."""

    root: Path
    config: FinetuneSynthConfig
    info: dict

    @property
    def img_db(self) -> Path:
        return self.root / "img_db"

    @property
    def vocab_file(self) -> Path:
        return self.root / "vocab.txt"

    def txt_db(self, task: str, split: str) -> Path:
        if task not in FINETUNE_TASKS:
            raise ValueError(f"FinetuneSynthData.txt_db: unknown task {task!r}; expected one of {FINETUNE_TASKS}")
        return self.root / task / "txt_db" / f"{split}.db"

    def ans2label(self, task: str) -> Path:
        return self.root / task / "ans2label.json"


# ----------------------------------------------------------------------------------------------- scenes
def image_name(image_id: int) -> str:
    """The official RE feature file name of an image id (used for every synthetic fine-tuning image)."""
    return f"visual_grounding_coco_gt_{image_id:012d}.npz"


def _image_id(split: str, i: int) -> int:
    return (1 if split == "train" else 1_000_001) + i


def scene_objects(cfg: FinetuneSynthConfig, split: str) -> list[tuple[int, dict, list[dict]]]:
    """``(image id, region dump, objects in region order)`` for every image of ``split``: region r of the img_db
    (regions sorted by detector confidence, clutter dropped) is object ``objects[r]``."""
    if split not in ("train", "val"):
        raise ValueError(f"scene_objects: 'split' must be 'train' or 'val', got {split!r}")
    scfg = cfg.scene_config
    world = _World(scfg)
    rng = np.random.default_rng([cfg.world.seed, cfg.seed, 100 if split == "train" else 101])
    out = []
    for i in range(cfg.n_train_images if split == "train" else cfg.n_val_images):
        dump, objs = _scene(scfg, world, rng)
        order = np.argsort(-np.asarray([o["conf"] for o in objs]), kind="stable")
        out.append((_image_id(split, i), dump, [objs[k] for k in order]))
    return out


def _cell(o: dict) -> str:
    return CELLS[o["row"] * 3 + o["col"]]


def _name(o: dict) -> str:
    return CLASSES[o["cls"]]


def _colour(o: dict) -> str:
    return COLOURS[o["colour"]]


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


# ----------------------------------------------------------------------------------------------- VQA / GQA
def _confusable(kind: str, answer: str, cfg: FinetuneSynthConfig, rng: np.random.Generator) -> str:
    pools = {"colour": COLOURS[:cfg.world.n_colours], "size": SIZES, "count": [str(n) for n in range(1, 10)],
             "where": CELLS, "exist": ["yes", "no"], "what": CLASSES[:cfg.world.n_classes]}
    return _pick(rng, [a for a in pools[kind] if a != answer])


def _vqa_question(objs: list[dict], cfg: FinetuneSynthConfig, rng: np.random.Generator) -> tuple[str, str, str]:
    kind = _pick(rng, ["colour", "size", "count", "where", "exist", "what"])
    o = _pick(rng, objs)
    if kind == "colour":
        return kind, f"what colour is the {_name(o)} ?", _colour(o)
    if kind == "size":
        return kind, f"what size is the {_name(o)} ?", SIZES[o["size"]]
    if kind == "count":
        return kind, "how many objects are there ?", str(len(objs))
    if kind == "where":
        return kind, f"where is the {_name(o)} ?", _cell(o)
    if kind == "what":
        return kind, f"what is the {_colour(o)} object ?", _name(o)
    if rng.random() < 0.5:
        return kind, f"is there a {_colour(o)} {_name(o)} ?", "yes"
    if rng.random() < 0.5:  # the class is there, in another colour
        wrong = _pick(rng, [c for c in range(cfg.world.n_colours) if c != o["colour"]])
        return kind, f"is there a {COLOURS[wrong]} {_name(o)} ?", "no"
    absent = _pick(rng, [c for c in range(cfg.world.n_classes) if c not in {x["cls"] for x in objs}])
    return kind, f"is there a {_colour(o)} {CLASSES[absent]} ?", "no"


def _vqa_scores(kind: str, answer: str, cfg: FinetuneSynthConfig, rng: np.random.Generator) -> dict[str, float]:
    agree = int(rng.integers(8, 11))
    scores = {answer: min(1.0, agree / 3)}
    if agree < 10:
        scores[_confusable(kind, answer, cfg, rng)] = round(min(1.0, (10 - agree) / 3), 4)
    return scores


def _gqa_question(objs: list[dict], rng: np.random.Generator) -> tuple[str, str] | None:
    a, b = (objs[int(k)] for k in rng.choice(len(objs), 2, replace=False))
    rel = _relation(a, b)
    unique = [x for x in objs if x is not b and _relation(x, b) == rel] == [a]
    kind = _pick(rng, ["what_rel", "verify_rel", "colour_rel", "larger"])
    if kind == "what_rel" and unique:
        return f"what is {rel} the {_name(b)} ?", _name(a)
    if kind == "colour_rel" and unique:
        return f"what colour is the object {rel} the {_name(b)} ?", _colour(a)
    if kind == "larger" and a["size"] != b["size"]:
        big = a if a["size"] > b["size"] else b
        first, second = (a, b) if rng.random() < 0.5 else (b, a)
        return f"which is larger , the {_name(first)} or the {_name(second)} ?", _name(big)
    if kind == "verify_rel":
        if rng.random() < 0.5:
            return f"is the {_name(a)} {rel} the {_name(b)} ?", "yes"
        wrong = _pick(rng, [r for r in ("left of", "right of", "above", "below") if r != rel])
        return f"is the {_name(a)} {wrong} the {_name(b)} ?", "no"
    return None


# ----------------------------------------------------------------------------------------------- VE / NLVR2
def _ve_statement(objs: list[dict], cfg: FinetuneSynthConfig, rng: np.random.Generator) -> tuple[str, str]:
    label = _pick(rng, VE_LABELS)
    o = dict(_pick(rng, objs))
    form = _pick(rng, ["full", "colour", "where"])
    if label == "neutral":
        o["cls"] = _pick(rng, [c for c in range(cfg.world.n_classes) if c not in {x["cls"] for x in objs}])
    elif label == "contradiction":
        if form == "colour" or (form == "full" and rng.random() < 0.5):
            o["colour"] = _pick(rng, [c for c in range(cfg.world.n_colours) if c != o["colour"]])
        elif form == "full":
            o["size"] = 1 - o["size"]
        else:
            cell = _pick(rng, [c for c in range(9) if c != o["row"] * 3 + o["col"]])
            o["row"], o["col"] = divmod(cell, 3)
    if form == "full":
        return f"there is a {SIZES[o['size']]} {_colour(o)} {_name(o)} .", label
    if form == "colour":
        return f"the {_name(o)} is {_colour(o)} .", label
    return f"the {_name(o)} is {_location_phrase(o['row'], o['col'])} .", label


def _nlvr2_statement(left: list[dict], right: list[dict], cfg: FinetuneSynthConfig, rng: np.random.Generator
                     ) -> tuple[str, int]:
    want = int(rng.random() < 0.5)
    has = lambda objs, cls, col=None: any(o["cls"] == cls and (col is None or o["colour"] == col)  # noqa: E731
                                          for o in objs)
    for _ in range(20):
        form = _pick(rng, ["left", "right", "both"])
        if form == "both":
            cls = int(rng.integers(cfg.world.n_classes))
            truth = has(left, cls) and has(right, cls)
            if truth == bool(want):
                return f"both images have a {CLASSES[cls]} .", want
            continue
        this, other = (left, right) if form == "left" else (right, left)
        if want:
            o = _pick(rng, this)
            cls, col = o["cls"], o["colour"]
        else:
            o = _pick(rng, other + [None])
            if o is not None:
                cls, col = o["cls"], o["colour"]
            else:
                cls, col = int(rng.integers(cfg.world.n_classes)), int(rng.integers(cfg.world.n_colours))
            if has(this, cls, col):
                continue
        return f"the {form} image has a {COLOURS[col]} {CLASSES[cls]} .", want
    o = _pick(rng, left)
    return f"the left image has a {_colour(o)} {_name(o)} .", 1


# ----------------------------------------------------------------------------------------------- RE / VCR
def _re_expressions(objs: list[dict], k: int, rng: np.random.Generator) -> list[str]:
    """Expressions that single out object ``k`` of the scene."""
    o = objs[k]
    out = [f"the {_name(o)}", f"the {_colour(o)} object", f"the object {_location_phrase(o['row'], o['col'])}",
           f"the {SIZES[o['size']]} {_colour(o)} {_name(o)}"]
    others = [x for j, x in enumerate(objs) if j != k]
    ref = _pick(rng, others)
    rel = _relation(o, ref)
    if [x for x in objs if x is not ref and _relation(x, ref) == rel] == [o]:
        out.append(f"the object {rel} the {_name(ref)}")
    return out


def _vcr_item(objs: list[dict], cfg: FinetuneSynthConfig, rng: np.random.Generator
              ) -> tuple[str, list[str], int, list[str], int]:
    """A question about one object, 4 answers (statements with the asked attribute; 3 random wrong values) and 4
    rationales (descriptions of the object; the wrong ones change its colour, cell and size)."""
    o = _pick(rng, objs)
    kind = _pick(rng, ["colour", "where", "what"])
    where = _location_phrase(o["row"], o["col"])
    if kind == "colour":
        q, right, pool = f"what colour is the {_name(o)} ?", _colour(o), COLOURS[:cfg.world.n_colours]
        fmt = f"the {_name(o)} is {{}}"
    elif kind == "where":
        q, right = f"where is the {_name(o)} ?", where
        pool, fmt = [_location_phrase(*divmod(c, 3)) for c in range(9)], f"the {_name(o)} is {{}}"
    else:
        q, right = f"what is {where} ?", _name(o)
        pool, fmt = CLASSES[:cfg.world.n_classes], f"a {{}} is {where}"
    wrong = [pool[int(k)] for k in rng.permutation(len(pool)) if pool[int(k)] != right][:3]
    answers = [fmt.format(a) for a in wrong]
    qa = int(rng.integers(4))
    answers.insert(qa, fmt.format(right))

    def describe(x: dict) -> str:
        return f"the {SIZES[x['size']]} {_colour(x)} {_name(x)} is {_location_phrase(x['row'], x['col'])}"

    rationales = []
    while len(rationales) < 3:
        x = dict(o, colour=_pick(rng, [c for c in range(cfg.world.n_colours) if c != o["colour"]]),
                 size=int(rng.integers(len(SIZES))))
        x["row"], x["col"] = divmod(_pick(rng, [c for c in range(9) if c != o["row"] * 3 + o["col"]]), 3)
        if describe(x) not in rationales:
            rationales.append(describe(x))
    qar = int(rng.integers(4))
    rationales.insert(qar, describe(o))
    return q, answers, qa, rationales, qar


# ----------------------------------------------------------------------------------------------- writing
def _boxes_px(dump: dict, n: int, size: tuple[int, int]) -> list[list[float]]:
    """xywh pixel boxes of the first n regions."""
    w, h = size
    bb = dump["norm_bb"][:n]  # the dump's regions are already sorted by confidence, objects first
    return [[round(float(b[0]) * w, 2), round(float(b[1]) * h, 2), round(float(b[4]) * w, 2),
             round(float(b[5]) * h, 2)] for b in bb]


def _write(root: Path, cfg: FinetuneSynthConfig) -> dict:
    vocab_file = write_vocab(synthetic_vocab(), root / "vocab.txt")
    tok = WordPieceTokenizer(vocab_file, lowercase=False, name="fastvl-synthetic")
    meta = {**tok.meta(), "source": "fastvl synthetic fine-tuning data", "config": asdict(cfg)}
    scenes = {s: scene_objects(cfg, s) for s in ("train", "val")}
    scfg = cfg.scene_config
    with ImageDBWriter(root / "img_db", compress=False, conf_th=scfg.conf_th, max_bb=scfg.max_objects,
                       min_bb=scfg.min_objects) as w:
        for split in ("train", "val"):
            for image_id, dump, _ in scenes[split]:
                w.put(image_name(image_id), dump)
    counts: dict[str, dict[str, int]] = {t: {} for t in FINETUNE_TASKS}
    answers: dict[str, list[str]] = {"vqa": [], "gqa": []}
    recs: dict[tuple[str, str], list[tuple[str, dict]]] = {}
    re_side: dict[str, dict] = {}
    for split in ("train", "val"):
        rng = np.random.default_rng([cfg.world.seed, cfg.seed, 200 if split == "train" else 201])
        scene = scenes[split]
        out: dict[str, list[tuple[str, dict]]] = {t: [] for t in FINETUNE_TASKS}
        refs, anns, images = [], [], []
        for n, (image_id, dump, objs) in enumerate(scene):
            name = image_name(image_id)
            for q in range(cfg.questions_per_image):
                kind, text, ans = _vqa_question(objs, cfg, rng)
                out["vqa"].append((f"{image_id}_{q}", {"question_id": f"{image_id}_{q}", "img_fname": name,
                                                       "sent": text, "answers": _vqa_scores(kind, ans, cfg, rng)}))
                g = None
                for _ in range(10):
                    g = _gqa_question(objs, rng)
                    if g is not None:
                        break
                if g is not None:
                    out["gqa"].append((f"{image_id}_{q}", {"question_id": f"{image_id}_{q}", "img_fname": name,
                                                           "sent": g[0], "answers": {g[1]: 1.0}}))
                text, label = _ve_statement(objs, cfg, rng)
                out["ve"].append((f"{image_id}_{q}", {"img_fname": name, "sent": text,
                                                      "target": {"labels": [VE_LABELS.index(label)],
                                                                 "scores": [1.0]}}))
            n_caps = 2 if split == "train" else 1
            for j in range(n_caps):
                out["itr"].append((f"{image_id}_{j}", {"img_fname": name, "sent": _caption(objs, rng)}))
            other = scene[(n + 1 + int(rng.integers(len(scene) - 1))) % len(scene)]
            for j in range(max(1, cfg.questions_per_image // 2)):
                pair = [(image_id, objs), (other[0], other[2])]
                if rng.random() < 0.5:
                    pair.reverse()
                text, label = _nlvr2_statement(pair[0][1], pair[1][1], cfg, rng)
                out["nlvr2"].append((f"{split}-{image_id}-{j}", {
                    "img_fname": [image_name(pair[0][0]), image_name(pair[1][0])], "sent": text, "target": label}))
            boxes = _boxes_px(dump, len(objs), cfg.image_size)
            ann_ids = [image_id * 10 + k for k in range(len(objs))]
            images.append({"id": image_id, "file_name": f"synthetic_{image_id:012d}.jpg", "ann_ids": ann_ids,
                           "width": cfg.image_size[0], "height": cfg.image_size[1]})
            for k, o in enumerate(objs):
                box = boxes[k]
                anns.append({"id": ann_ids[k], "image_id": image_id, "bbox": box, "area": box[2] * box[3],
                             "category_id": o["cls"] + RE_CATEGORY_OFFSET})
                exprs = _re_expressions(objs, k, rng)
                chosen = rng.choice(len(exprs), 2 if split == "train" else 1, replace=False)
                ref_id = ann_ids[k]
                sents = []
                for c in chosen:
                    sent_id = ref_id * 10 + int(c)
                    sents.append({"sent_id": sent_id, "sent": exprs[int(c)]})
                    out["re"].append((str(sent_id), {"sent_id": sent_id, "sent": exprs[int(c)], "ref_id": ref_id,
                                                     "ann_id": ann_ids[k], "image_id": image_id, "bbox": box,
                                                     "img_fname": name}))
                refs.append({"ref_id": ref_id, "ann_id": ann_ids[k], "image_id": image_id, "split": split,
                             "category_id": o["cls"] + RE_CATEGORY_OFFSET,
                             "sent_ids": [s["sent_id"] for s in sents], "sentences": sents})
            for j in range(cfg.questions_per_image):
                q, ans_, qa, rats, qar = _vcr_item(objs, cfg, rng)
                out["vcr"].append((f"{split}-{image_id}-{j}", {
                    "img_fname": [name, name], "sent": q, "answer_choices": ans_, "rationale_choices": rats,
                    "qa_target": qa, "qar_target": qar}))
        for t in FINETUNE_TASKS:
            recs[(t, split)] = out[t]
        re_side[split] = {"refs": refs, "annotations": anns, "images": images,
                          "categories": [{"id": c + RE_CATEGORY_OFFSET, "name": CLASSES[c], "supercategory": "object"}
                                         for c in range(cfg.world.n_classes)]}
    for t in ("vqa", "gqa"):
        seen = sorted({a for split in ("train", "val") for _, r in recs[(t, split)] for a in r["answers"]})
        answers[t] = seen
    ans2label = {t: {a: i for i, a in enumerate(answers[t])} for t in ("vqa", "gqa")}
    ans2label["ve"] = {a: i for i, a in enumerate(VE_LABELS)}
    for t, table in ans2label.items():
        (root / t).mkdir(parents=True, exist_ok=True)
        (root / t / "ans2label.json").write_text(json.dumps(table, indent=1))
    for (t, split), items in recs.items():
        db = root / t / "txt_db" / f"{split}.db"
        with TxtDBWriter(db, {**meta, "task": t, "img_db_name": "img_db"}) as w:
            for id_, rec in items:
                rec = dict(rec)
                if t == "vcr":
                    q = tok.encode(rec["sent"])
                    rec["input_ids"] = q
                    rec["input_ids_as"] = tok.encode_batch(rec.pop("answer_choices"))
                    rec["input_ids_rs"] = tok.encode_batch(rec.pop("rationale_choices"))
                else:
                    rec["input_ids"] = tok.encode(rec["sent"])
                if t in ("vqa", "gqa"):
                    scores = rec.pop("answers")
                    rec["target"] = {"labels": [ans2label[t][a] for a in scores],
                                     "scores": [float(v) for v in scores.values()]}
                w.put(id_, rec)
        if t == "vcr":
            _write_vcr_lens(db, items, tok)
        if t == "re":
            for name, obj in re_side[split].items():
                (db / f"{name}.json").write_text(json.dumps(obj))
        counts[t][split] = len(items)
    return {"version": VERSION, "config": asdict(cfg), "img_dim": cfg.world.img_dim, "vocab_size": tok.vocab_size,
            "counts": counts, "num_answers": {t: len(v) for t, v in ans2label.items()}}


def _write_vcr_lens(db: Path, items: list[tuple[str, dict]], tok: WordPieceTokenizer) -> None:
    """The official VCR side files id2len_qa.json / id2len_qar.json (question + longest answer [+ rationale])."""
    qa, qar = {}, {}
    for id_, rec in items:
        q = len(tok.encode(rec["sent"]))
        a = max(len(x) for x in tok.encode_batch(rec["answer_choices"]))
        r = max(len(x) for x in tok.encode_batch(rec["rationale_choices"]))
        qa[id_], qar[id_] = q + a, q + a + r
    (db / "id2len_qa.json").write_text(json.dumps(qa))
    (db / "id2len_qar.json").write_text(json.dumps(qar))


def finetune_synthetic(cache_dir: str | os.PathLike | None = None, config: FinetuneSynthConfig | None = None,
                       force: bool = False) -> FinetuneSynthData:
    """The synthetic fine-tuning data for ``config`` under ``cache_dir`` (default: the corpus cache), generated on
    first use into ``<cache_dir>/finetune-<hash>/`` (atomically: temp folder + rename) and reused afterwards."""
    cfg = config or FinetuneSynthConfig()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root, info = cached_folder(cache, f"finetune-{cfg.key()}", "finetune.json", lambda tmp: _write(tmp, cfg), force)
    return FinetuneSynthData(root, cfg, info)
