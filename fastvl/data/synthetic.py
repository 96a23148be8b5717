"""The embedded default corpus: synthetic scenes with detector-like region features and grounded captions.

A scene has 1-2 objects (by default; up to 9), each with a class, a colour, a size and a cell of a 3x3 grid (classes,
colours and cells distinct within a scene). For every object the "detector" gives one region:

- feature [D] = prototype[class] + direction[colour] + direction[size] + Gaussian noise (fp16 in the db);
- box (norm_bb) around the cell centre, scaled by size, with a class-specific aspect ratio;
- conf in [0.5, 1) and soft labels over ``n_classes + 1`` classes (background at 0) peaked on the true class.

Low-confidence clutter regions (conf < 0.2, soft labels peaked on background) follow the objects, so the
nbb = clip(#(conf > 0.2), min, max) rule drops them. Captions mention every object with its size and colour and
either its grid cell ("at the top left") or its relation to an object mentioned before ("left of the cup").
So ITM (caption objects vs regions), MLM on object / colour / size words (read from the matching region), MRC
(the caption and the other regions tell which class is missing; the box shape hints too) and WRA all have signal.

Everything is deterministic from ``SyntheticConfig.seed``; the default corpus (3000 + 300 images, 2 captions each,
64-d features, 8 classes, 6 colours) is written in the official db formats in a few seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .lmdb_db import ImageDBWriter, TxtDBWriter
from .tokenizer import WordPieceTokenizer, bert_layout_vocab, write_vocab

__all__ = ["SyntheticConfig", "SyntheticCorpus", "synthetic_corpus", "generate_scenes", "synthetic_vocab",
           "write_synthetic_raw", "default_cache_dir", "CLASSES", "COLOURS", "SIZES"]

VERSION = 1
CLASSES = ["cup", "ball", "book", "lamp", "chair", "vase", "clock", "shoe", "hat", "bottle", "plant", "bowl",
           "kite", "phone", "key", "box"]
COLOURS = ["red", "blue", "green", "yellow", "white", "black", "orange", "purple"]
SIZES = ["small", "large"]
ROWS = ["top", "middle", "bottom"]
COLS = ["left", "center", "right"]
RELATIONS = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
OPENINGS = ["there is", "we see", "here is", "the image has"]
_GLUE = "a an the at in on of and is with , . next to".split()


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the synthetic corpus (all deterministic from ``seed``)."""

    seed: int = 0
    n_train_images: int = 3000
    n_val_images: int = 300
    captions_per_image: int = 2
    img_dim: int = 64
    n_classes: int = 8  # soft labels have n_classes + 1 entries (background at 0)
    n_colours: int = 6
    min_objects: int = 1
    max_objects: int = 2
    max_clutter: int = 2
    feature_noise: float = 0.3
    compress: bool = False  # img_db values as msgpack (False, fastest to read) or compressed npz (True)
    conf_th: float = 0.2

    def __post_init__(self) -> None:
        if not 2 <= self.n_classes <= len(CLASSES):
            raise ValueError(f"SyntheticConfig: 'n_classes' must be in [2, {len(CLASSES)}], got {self.n_classes}")
        if not 2 <= self.n_colours <= len(COLOURS):
            raise ValueError(f"SyntheticConfig: 'n_colours' must be in [2, {len(COLOURS)}], got {self.n_colours}")
        if not 1 <= self.min_objects <= self.max_objects <= min(self.n_classes, self.n_colours, 9):
            raise ValueError(f"SyntheticConfig: need 1 <= min_objects <= max_objects <= "
                             f"{min(self.n_classes, self.n_colours, 9)}, got {self.min_objects}, {self.max_objects}")
        if self.img_dim < 4:
            raise ValueError(f"SyntheticConfig: 'img_dim' must be >= 4, got {self.img_dim}")
        for name in ("n_train_images", "n_val_images", "captions_per_image"):
            if getattr(self, name) < 1:
                raise ValueError(f"SyntheticConfig: '{name}' must be >= 1, got {getattr(self, name)}")

    @property
    def img_db_params(self) -> dict:
        """conf_th / max_bb / min_bb of the written img_db (every object kept, every clutter region dropped)."""
        return {"conf_th": self.conf_th, "max_bb": self.max_objects, "min_bb": self.min_objects}

    def key(self) -> str:
        return config_key(self, VERSION)


@dataclass
class SyntheticCorpus:
    """Paths and facts of a written synthetic corpus (see :func:`synthetic_corpus`)."""

    root: Path
    txt_train: Path
    txt_val: Path
    img_db: Path
    vocab_file: Path
    config: SyntheticConfig
    info: dict = field(default_factory=dict)

    @property
    def img_dim(self) -> int:
        return self.info["img_dim"]

    @property
    def img_label_dim(self) -> int:
        return self.info["img_label_dim"]

    @property
    def vocab_size(self) -> int:
        return self.info["vocab_size"]

    @property
    def content_token_ids(self) -> list[int]:
        """Token ids of object, colour and size words (for 'MLM accuracy on object/attribute words')."""
        return sorted({i for k in ("object", "colour", "size") for i in self.info["word_ids"][k]})


# ----------------------------------------------------------------------------------------------- vocab
def synthetic_vocab() -> list[str]:
    """The corpus vocab in the bert-base-cased layout: punctuation, the grammar's words, letters and digits
    (whole and ``##`` pieces, so any plain ASCII word tokenises without [UNK])."""
    punct = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
    words = set(CLASSES + COLOURS + SIZES + ROWS + COLS + _GLUE)
    for r in RELATIONS.values():
        words.update(r.split())
    for o in OPENINGS:
        words.update(o.split())
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    chars += [str(d) for d in range(10)]
    return bert_layout_vocab(punct + sorted(words) + chars + ["##" + c for c in chars])


# ----------------------------------------------------------------------------------------------- scenes
class _World:
    """Fixed per seed: class prototypes, attribute directions, box aspect ratios."""

    def __init__(self, cfg: SyntheticConfig):
        rng = np.random.default_rng([cfg.seed, 7])
        d = cfg.img_dim
        self.proto = rng.normal(0.0, 1.0, (cfg.n_classes, d))
        self.colour_dir = rng.normal(0.0, 0.7, (len(COLOURS), d))
        self.size_dir = rng.normal(0.0, 0.5, (len(SIZES), d))
        self.aspect = np.exp(rng.permutation(np.linspace(-0.7, 0.7, cfg.n_classes)))


def _location_phrase(row: int, col: int) -> str:
    if row == 1 and col == 1:
        return "in the center"
    if row == 1:
        return f"on the {COLS[col]}"
    if col == 1:
        return f"at the {ROWS[row]}"
    return f"at the {ROWS[row]} {COLS[col]}"


def _relation(a: dict, b: dict) -> str:
    """Where object a is relative to object b (box centres; y grows downwards)."""
    dx, dy = a["cx"] - b["cx"], a["cy"] - b["cy"]
    if abs(dx) >= abs(dy):
        return RELATIONS["left" if dx < 0 else "right"]
    return RELATIONS["above" if dy < 0 else "below"]


def _np(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _caption(objs: list[dict], rng: np.random.Generator) -> str:
    order = rng.permutation(len(objs))
    clauses = []
    for n, i in enumerate(order):
        o = objs[i]
        words = f"{SIZES[o['size']]} {COLOURS[o['colour']]} {CLASSES[o['cls']]}"
        phrase = f"{_np(words)} {words}"
        if n == 0 or rng.random() < 0.5:
            phrase += " " + _location_phrase(o["row"], o["col"])
        else:
            ref = objs[order[rng.integers(n)]]
            phrase += f" {_relation(o, ref)} the {CLASSES[ref['cls']]}"
        clauses.append(phrase)
    body = clauses[0] if len(clauses) == 1 else " , ".join(clauses[:-1]) + " and " + clauses[-1]
    opening = OPENINGS[rng.integers(len(OPENINGS))] + " " if rng.random() < 0.5 else ""
    return f"{opening}{body} ."


def _scene(cfg: SyntheticConfig, world: _World, rng: np.random.Generator) -> tuple[dict, list[dict]]:
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    classes = rng.choice(cfg.n_classes, n, replace=False)
    colours = rng.choice(cfg.n_colours, n, replace=False)
    cells = rng.choice(9, n, replace=False)
    objs = []
    for k in range(n):
        row, col = divmod(int(cells[k]), 3)
        size = int(rng.integers(len(SIZES)))
        cx = (col + 0.5) / 3 + rng.uniform(-0.06, 0.06)
        cy = (row + 0.5) / 3 + rng.uniform(-0.06, 0.06)
        base = (0.12 if size == 0 else 0.22) * rng.uniform(0.9, 1.1)
        a = world.aspect[classes[k]]
        w, h = base * np.sqrt(a), base / np.sqrt(a)
        objs.append({"cls": int(classes[k]), "colour": int(colours[k]), "size": size, "row": row, "col": col,
                     "cx": cx, "cy": cy, "w": w, "h": h, "conf": rng.uniform(0.5, 0.99)})
    n_lab = cfg.n_classes + 1
    feats, boxes, confs, softs = [], [], [], []
    for o in objs:
        f = (world.proto[o["cls"]] + world.colour_dir[o["colour"]] + world.size_dir[o["size"]]
             + rng.normal(0.0, cfg.feature_noise, cfg.img_dim))
        logits = rng.normal(0.0, 0.5, n_lab)
        logits[0] += 1.0
        logits[o["cls"] + 1] = logits[1:].max() + rng.uniform(2.5, 4.5)
        feats.append(f)
        boxes.append((o["cx"], o["cy"], o["w"], o["h"]))
        confs.append(o["conf"])
        softs.append(logits)
    for _ in range(int(rng.integers(cfg.max_clutter + 1))):
        f = 0.3 * world.proto[rng.integers(cfg.n_classes)] + rng.normal(0.0, 0.8, cfg.img_dim)
        logits = rng.normal(0.0, 0.5, n_lab)
        logits[0] += 4.0
        feats.append(f)
        boxes.append((rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.3), rng.uniform(0.05, 0.3)))
        confs.append(rng.uniform(0.01, cfg.conf_th * 0.9))
        softs.append(logits)
    b = np.asarray(boxes)
    x1, y1 = np.clip(b[:, 0] - b[:, 2] / 2, 0, 1), np.clip(b[:, 1] - b[:, 3] / 2, 0, 1)
    x2, y2 = np.clip(b[:, 0] + b[:, 2] / 2, 0, 1), np.clip(b[:, 1] + b[:, 3] / 2, 0, 1)
    norm_bb = np.stack([x1, y1, x2, y2, x2 - x1, y2 - y1], axis=1)
    soft = np.exp(np.asarray(softs) - np.max(softs, axis=1, keepdims=True))
    soft /= soft.sum(axis=1, keepdims=True)
    order = np.argsort(-np.asarray(confs), kind="stable")  # detectors emit regions by confidence
    dump = {"features": np.asarray(feats, np.float32)[order], "norm_bb": norm_bb.astype(np.float32)[order],
            "conf": np.asarray(confs, np.float32)[order], "soft_labels": soft.astype(np.float32)[order]}
    return dump, objs


def generate_scenes(cfg: SyntheticConfig, split: str) -> list[tuple[str, dict, list[str]]]:
    """``(npz_name, region dump, captions)`` for every image of ``split`` ('train' or 'val')."""
    if split not in ("train", "val"):
        raise ValueError(f"generate_scenes: 'split' must be 'train' or 'val', got {split!r}")
    world = _World(cfg)
    n = cfg.n_train_images if split == "train" else cfg.n_val_images
    rng = np.random.default_rng([cfg.seed, 0 if split == "train" else 1])
    out = []
    for i in range(n):
        dump, objs = _scene(cfg, world, rng)
        caps = [_caption(objs, rng) for _ in range(cfg.captions_per_image)]
        out.append((f"synthetic_{split}_{i:06d}.npz", dump, caps))
    return out


# ----------------------------------------------------------------------------------------------- writing
def default_cache_dir() -> Path:
    """``$FASTVL_CACHE`` or ``~/.cache/fastvl``."""
    return Path(os.environ.get("FASTVL_CACHE", Path.home() / ".cache" / "fastvl"))


def _word_ids(tok: WordPieceTokenizer, cfg: SyntheticConfig) -> dict[str, list[int]]:
    groups = {"object": CLASSES[:cfg.n_classes], "colour": COLOURS[:cfg.n_colours], "size": SIZES,
              "spatial": ROWS + COLS + ["above", "below"]}
    return {k: sorted({tok.token_to_id(w) for w in ws}) for k, ws in groups.items()}


def _write_corpus(root: Path, cfg: SyntheticConfig) -> dict:
    vocab_file = write_vocab(synthetic_vocab(), root / "vocab.txt")
    tok = WordPieceTokenizer(vocab_file, lowercase=False, name="fastvl-synthetic")
    meta = {**tok.meta(), "source": "fastvl synthetic corpus", "config": asdict(cfg)}
    counts = {}
    with ImageDBWriter(root / "img_db", compress=cfg.compress, num_bb=cfg.max_objects,
                       **cfg.img_db_params) as img_w:
        for split in ("train", "val"):
            scenes = generate_scenes(cfg, split)
            with TxtDBWriter(root / "txt_db" / f"{split}.db", meta) as txt_w:
                for name, dump, caps in scenes:
                    img_w.put(name, dump)
                    for j, (cap, ids) in enumerate(zip(caps, tok.encode_batch(caps))):
                        tid = f"{name[:-4]}_{j}"
                        txt_w.put(tid, {"id": tid, "img_fname": name, "sent": cap, "input_ids": ids})
            counts[split] = {"images": len(scenes), "captions": len(scenes) * cfg.captions_per_image}
    return {"version": VERSION, "config": asdict(cfg), "img_dim": cfg.img_dim, "img_label_dim": cfg.n_classes + 1,
            "vocab_size": tok.vocab_size, "img_db_params": cfg.img_db_params, "counts": counts,
            "word_ids": _word_ids(tok, cfg), "classes": CLASSES[:cfg.n_classes], "colours": COLOURS[:cfg.n_colours],
            "sizes": SIZES}


def _corpus(root: Path, cfg: SyntheticConfig, info: dict) -> SyntheticCorpus:
    return SyntheticCorpus(root=root, txt_train=root / "txt_db" / "train.db", txt_val=root / "txt_db" / "val.db",
                           img_db=root / "img_db", vocab_file=root / "vocab.txt", config=cfg, info=info)


def config_key(cfg, version: int) -> str:
    """Cache key of a synthetic-data config (a dataclass): its fields and the generator's ``version``, hashed."""
    blob = json.dumps({"version": version, **asdict(cfg)}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def cached_folder(cache: Path, name: str, marker: str, write, force: bool = False) -> tuple[Path, dict]:
    """``<cache>/<name>/`` built once by ``write(tmp_folder) -> info`` and reused afterwards; returns (folder, info).

    The folder appears atomically (written to a temp folder, then renamed), so concurrent callers (torchrun
    ranks) and interrupted runs never see a half-written folder; ``<marker>`` inside (``info`` as JSON) marks it
    complete. ``force`` rebuilds it.
    """
    root = cache / name
    done = root / marker
    if force and root.exists():
        shutil.rmtree(root)
    if not done.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=cache))
        try:
            info = write(tmp)
            (tmp / marker).write_text(json.dumps(info, indent=1))
            if root.exists() and not done.is_file():
                shutil.rmtree(root, ignore_errors=True)  # a stale partial folder from an older, non-atomic writer
            try:
                os.rename(tmp, root)
            except OSError:  # another process renamed its copy first
                if not done.is_file():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return root, json.loads(done.read_text())


def synthetic_corpus(cache_dir: str | os.PathLike | None = None, config: SyntheticConfig | None = None,
                     force: bool = False) -> SyntheticCorpus:
    """The synthetic corpus for ``config`` under ``cache_dir`` (default :func:`default_cache_dir`), generated on
    first use into ``<cache_dir>/synthetic-<hash>/`` (atomically, see :func:`cached_folder`) and reused afterwards.
    """
    cfg = config or SyntheticConfig()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root, info = cached_folder(cache, f"synthetic-{cfg.key()}", "corpus.json", lambda tmp: _write_corpus(tmp, cfg),
                               force)
    return _corpus(root, cfg, info)


def write_synthetic_raw(out_dir: str | os.PathLike, config: SyntheticConfig | None = None,
                        splits: tuple[str, ...] = ("train", "val")) -> dict[str, Path]:
    """The corpus as raw inputs of ``make_data``: ``<out>/npz/<name>.npz`` per image (fp32 arrays, as a feature
    extractor writes them) and ``<out>/captions_<split>.jsonl`` ({"id", "img_fname", "caption"} per line).
    Returns {'npz_dir': …, 'captions_<split>': …, 'vocab': …}."""
    cfg = config or SyntheticConfig()
    out = Path(out_dir)
    (out / "npz").mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {"npz_dir": out / "npz", "vocab": write_vocab(synthetic_vocab(), out / "vocab.txt")}
    for split in splits:
        path = out / f"captions_{split}.jsonl"
        with open(path, "w") as f:
            for name, dump, caps in generate_scenes(cfg, split):
                np.savez(out / "npz" / name, **dump)
                for j, cap in enumerate(caps):
                    f.write(json.dumps({"id": f"{name[:-4]}_{j}", "img_fname": name, "caption": cap}) + "\n")
        paths[f"captions_{split}"] = path
    return paths
