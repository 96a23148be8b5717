"""The embedded default video corpus: synthetic scenes that change over time, in the official HERO db formats.

A video has 1-30 frames (``frame_interval`` seconds each) showing 1-3 objects on a 3x3 grid. Objects appear (the
first at frame 0), move to other cells and change colour; each change is an event at one frame. A frame's feature
[D] is, over the visible objects, ``(prototype[class] + colour_dir[colour]) * cell_key[cell] + 0.5 cell_dir[cell]``
(the cell key binds what to where) plus a drift that grows with the frame index and a "lighting cycle" (sin / cos of
the frame index at a few periods), so a frame's position is visible (FOM, MFM-NCE), and Gaussian noise.

Text (word-level vocab in the RoBERTa layout: ``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3, ``<mask>``=4):

- subtitles describe the events ("a red cup appears at the top left", "the cup moves to the middle right", "the cup
  turns blue") over 1-3 frames; some frames have no subtitle (unmatched); short filler lines ("look at that")
  inside an event's span end up with no frame; ~10% of the videos have no subtitles and get empty
  pseudo-subtitles over 5-frame chunks;
- TVR queries paraphrase one event, with its moment ``ts`` [st, ed] in seconds;
- TVQA: "what colour does the cup turn ?" / "where does the cup move ?" / "what appears at the top left ?" with 5
  candidates (wrong ones preferably never seen in the video), ``answer_idx`` and ``ts`` "st-ed", one question per
  event for ``qa_events`` events (default 2 per video; 0 = every event, ~7.8 per video: 4x the distinct
  examples, with the same videos, subtitles, TVR and TVC rows and the same first two questions);
- VIOLIN: an entailed statement (an event as it happened) and a contradicted one (same event with another object,
  colour or cell, preferably one the video never shows) per chosen event (as TVQA); ids ``<vid>_<k>-1`` /
  ``<vid>_<k>-0``;
- TVC: a clip of 1-3 consecutive events and its caption.

MLM (colour / class / cell words are in the frames), MFM (frames follow from the subtitles and the neighbours), FOM
(drift and object states order the frames), VSM / TVR (the query names an event at known frames), QA, VIOLIN and
TVC are all learnable. Deterministic from ``VideoSyntheticConfig.seed``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..synthetic import cached_folder, config_key, default_cache_dir
from .align import align_subtitles
from .query_db import CaptionDBWriter, QueryDBWriter
from .video_db import SubtitleDBWriter, VideoFeatDBWriter
from .vocab import WordVocab

__all__ = ["VideoSyntheticConfig", "VideoCorpus", "video_synthetic_corpus", "generate_videos", "video_vocab",
           "write_video_raw", "SPLITS"]

VERSION = 5
SPLITS = ("train", "val")
CLASSES = ["cup", "ball", "book", "lamp", "chair", "vase", "clock", "shoe", "hat", "bottle"]
COLOURS = ["red", "blue", "green", "yellow", "white", "black", "orange", "purple"]
ROWS = ["top", "middle", "bottom"]
COLS = ["left", "center", "right"]
CELLS = [f"{r} {c}" for r in ROWS for c in COLS]
FILLERS = ["look at that", "oh wow", "hmm okay", "see this", "right there"]
_WORDS = ("a the at to it appears moves move turns turn shows up goes changes becomes what colour does where which is "
          "there then and ? . in video clip object").split()


@dataclass(frozen=True)
class VideoSyntheticConfig:
    """Knobs of the synthetic video corpus (all deterministic from ``seed``)."""

    seed: int = 0
    n_train_videos: int = 300
    n_val_videos: int = 60
    vfeat_dim: int = 64
    min_frames: int = 1
    max_frames: int = 30
    frame_interval: float = 1.5
    n_classes: int = 8
    n_colours: int = 6
    max_objects: int = 3
    no_subtitle_prob: float = 0.1
    filler_prob: float = 0.3
    feature_noise: float = 0.3
    qa_events: int = 2  # events per video with a TVQA question and a VIOLIN pair (0 = every event)
    compress: bool = False
    fp16: bool = False

    def __post_init__(self) -> None:
        if not 5 <= self.n_classes <= len(CLASSES):
            raise ValueError(f"VideoSyntheticConfig: 'n_classes' must be in [5, {len(CLASSES)}], got {self.n_classes}")
        if not 5 <= self.n_colours <= len(COLOURS):
            raise ValueError(f"VideoSyntheticConfig: 'n_colours' must be in [5, {len(COLOURS)}], got "
                             f"{self.n_colours}")
        if not 1 <= self.min_frames <= self.max_frames:
            raise ValueError(f"VideoSyntheticConfig: need 1 <= min_frames <= max_frames, got {self.min_frames}, "
                             f"{self.max_frames}")
        if self.qa_events < 0:
            raise ValueError(f"VideoSyntheticConfig: 'qa_events' must be >= 0 (0 = every event), got {self.qa_events}")
        if not 1 <= self.max_objects <= 3:
            raise ValueError(f"VideoSyntheticConfig: 'max_objects' must be in [1, 3], got {self.max_objects}")
        if self.vfeat_dim < 8 or self.frame_interval <= 0:
            raise ValueError("VideoSyntheticConfig: need vfeat_dim >= 8 and frame_interval > 0")
        for name in ("n_train_videos", "n_val_videos"):
            if getattr(self, name) < 2:
                raise ValueError(f"VideoSyntheticConfig: '{name}' must be >= 2, got {getattr(self, name)}")

    def key(self) -> str:
        return config_key(self, VERSION)


@dataclass
class VideoCorpus:
    """Paths and facts of a written synthetic video corpus (see :func:`video_synthetic_corpus`).

    ``video_db`` / ``sub_db``: every video; ``vids[split]``: the videos of a split; ``query_db(task, split)``:
    tvr / tvqa / violin / tvc dbs; ``info``: vfeat_dim, vocab_size, special ids, word ids, counts."""

    root: Path
    config: VideoSyntheticConfig
    info: dict = field(default_factory=dict)

    @property
    def video_db(self) -> Path:
        return self.root / "video_db"

    @property
    def sub_db(self) -> Path:
        return self.root / "sub_db"

    @property
    def vocab_file(self) -> Path:
        return self.root / "vocab.txt"

    def vids(self, split: str) -> list[str]:
        return json.loads((self.root / f"vids_{split}.json").read_text())

    def query_db(self, task: str, split: str) -> Path:
        if task not in ("tvr", "tvqa", "violin", "tvc") or split not in SPLITS:
            raise ValueError(f"VideoCorpus.query_db: task must be tvr/tvqa/violin/tvc and split {SPLITS}, got "
                             f"{task!r}, {split!r}")
        return self.root / f"{task}_{split}.db"

    @property
    def vfeat_dim(self) -> int:
        return self.info["vfeat_dim"]

    @property
    def vocab_size(self) -> int:
        return self.info["vocab_size"]

    @property
    def special_ids(self) -> dict[str, int]:
        return self.info["special_ids"]


def video_vocab(cfg: VideoSyntheticConfig | None = None) -> WordVocab:
    words = list(_WORDS) + CLASSES + COLOURS + ROWS + COLS
    for f in FILLERS:
        words += f.split()
    return WordVocab(words, name="fastvl-video-synthetic")


# ----------------------------------------------------------------------------------------------- generation
class _World:
    def __init__(self, cfg: VideoSyntheticConfig):
        rng = np.random.default_rng([cfg.seed, 0xE0])
        d = cfg.vfeat_dim
        self.proto = rng.normal(0, 1, (cfg.n_classes, d)) / np.sqrt(d) * 4
        self.colour = rng.normal(0, 1, (cfg.n_colours, d)) / np.sqrt(d) * 3
        self.key = rng.choice([-1.0, 1.0], (9, d))
        self.cell = rng.normal(0, 1, (9, d)) / np.sqrt(d) * 3
        self.drift = rng.normal(0, 1, d) / np.sqrt(d) * 4
        # a slow "lighting cycle": sin / cos of the frame index at 4 periods, each pair along its own directions
        self.periods = np.array([5.0, 9.0, 17.0, 33.0])
        self.clock = rng.normal(0, 1, (8, d)) / np.sqrt(d) * 1.2


def _video(cfg: VideoSyntheticConfig, world: _World, rng: np.random.Generator, vid: str) -> dict:
    n = int(rng.integers(cfg.min_frames, cfg.max_frames + 1))
    k = int(rng.integers(1, min(cfg.max_objects, n) + 1))
    classes = rng.choice(cfg.n_classes, k, replace=False).tolist()
    appear = [0] + sorted(rng.choice(np.arange(1, n), k - 1, replace=False).tolist()) if k > 1 else [0]
    cells = rng.choice(9, k, replace=False).tolist()
    colours = rng.integers(0, cfg.n_colours, k).tolist()
    state = {}  # object -> (cell, colour)
    events: list[dict] = []
    feats = np.zeros((n, cfg.vfeat_dim))
    busy = set(appear)
    for t in range(n):
        for o in range(k):
            if appear[o] == t:
                state[o] = (cells[o], colours[o])
                events.append({"t": t, "kind": "appear", "obj": o, "cls": classes[o], "cell": cells[o],
                               "colour": colours[o]})
        if t not in busy and state and rng.random() < 0.45:
            o = int(rng.choice(sorted(state)))
            cell, col = state[o]
            if rng.random() < 0.5:
                taken = {c for c, _ in state.values()}
                free = [c for c in range(9) if c not in taken]
                if free:
                    new = int(rng.choice(free))
                    state[o] = (new, col)
                    events.append({"t": t, "kind": "move", "obj": o, "cls": classes[o], "cell": new, "old": cell,
                                   "colour": col})
            else:
                new = int(rng.choice([c for c in range(cfg.n_colours) if c != col]))
                state[o] = (cell, new)
                events.append({"t": t, "kind": "turn", "obj": o, "cls": classes[o], "cell": cell, "colour": new,
                               "old": col})
        for o, (cell, col) in state.items():
            feats[t] += (world.proto[classes[o]] + world.colour[col]) * world.key[cell] + 0.5 * world.cell[cell]
        feats[t] += world.drift * (t / max(cfg.max_frames - 1, 1))
        phase = 2 * np.pi * t / world.periods
        feats[t] += np.concatenate([np.sin(phase), np.cos(phase)]) @ world.clock
    feats += rng.normal(0, cfg.feature_noise / np.sqrt(cfg.vfeat_dim) * 2, feats.shape)
    return {"vid": vid, "nframes": n, "features": feats.astype(np.float32), "events": events}


def _event_text(e: dict) -> str:
    cls, col = CLASSES[e["cls"]], COLOURS[e["colour"]]
    if e["kind"] == "appear":
        return f"a {col} {cls} appears at the {CELLS[e['cell']]}"
    if e["kind"] == "move":
        return f"the {cls} moves to the {CELLS[e['cell']]}"
    return f"the {cls} turns {col}"


def _query_text(e: dict) -> str:
    cls, col = CLASSES[e["cls"]], COLOURS[e["colour"]]
    if e["kind"] == "appear":
        return f"a {col} {cls} shows up"
    if e["kind"] == "move":
        return f"the {col} {cls} goes to the {CELLS[e['cell']]}"
    return f"the {cls} becomes {col}"


def _subtitles(cfg: VideoSyntheticConfig, video: dict, rng: np.random.Generator) -> list[dict]:
    iv, n = cfg.frame_interval, video["nframes"]
    subs = []
    for e in video["events"]:
        start = (e["t"] + float(rng.uniform(0.0, 0.2))) * iv
        end = min(start + float(rng.uniform(0.7, 2.6)) * iv, n * iv)
        if end <= start:
            end = start + 0.1 * iv
        subs.append({"start": round(start, 3), "end": round(end, 3), "text": _event_text(e)})
        if rng.random() < cfg.filler_prob:
            fs = start + 0.05 * iv
            subs.append({"start": round(fs, 3), "end": round(fs + 0.2 * iv, 3),
                         "text": FILLERS[int(rng.integers(len(FILLERS)))]})
    subs.sort(key=lambda s: s["start"])
    return subs


def _moment(cfg: VideoSyntheticConfig, t: int, n: int) -> list[float]:
    iv = cfg.frame_interval
    return [round(t * iv + 0.01, 3), round(min(t + 2, n) * iv - 0.01, 3)]


def _prefer_absent(options: list, text: Callable[[Any], str], seen: set[str], k: int, rng: np.random.Generator
                   ) -> list:
    """``k`` options drawn at random, first among those whose text has a word the video never shows (so a wrong
    answer / a contradiction can be told from the video), then among the rest."""
    fresh = [o for o in options if set(text(o).split()) - seen]
    rest = [o for o in options if o not in fresh]
    out = []
    for group in (fresh, rest):
        order = rng.permutation(len(group)).tolist()
        out += [group[i] for i in order[:k - len(out)]]
    return out


def _qa_row(cfg: VideoSyntheticConfig, vid: str, j: int, e: dict, n: int, seen: set[str],
            rng: np.random.Generator) -> dict:
    """A TVQA row about event ``e``: the question, 5 candidates (the right one at a random index) and its moment."""
    if e["kind"] == "turn":
        q = f"what colour does the {CLASSES[e['cls']]} turn ?"
        right, pool = COLOURS[e["colour"]], COLOURS[:cfg.n_colours]
    elif e["kind"] == "move":
        q = f"where does the {CLASSES[e['cls']]} move ?"
        right, pool = CELLS[e["cell"]], CELLS
    else:
        q = f"what appears at the {CELLS[e['cell']]} ?"
        right, pool = CLASSES[e["cls"]], CLASSES[:cfg.n_classes]
    cands = _prefer_absent([p for p in pool if p != right], str, seen, 4, rng)
    ans = int(rng.integers(5))
    cands.insert(ans, right)
    ts = _moment(cfg, e["t"], n)
    return {"qid": f"{vid}_q{j}", "q": q, **{f"a{a}": c for a, c in enumerate(cands)}, "answer_idx": ans,
            "ts": f"{ts[0]}-{ts[1]}", "vid_name": vid}


def _violin_rows(cfg: VideoSyntheticConfig, vid: str, j: int, e: dict, seen: set[str],
                 rng: np.random.Generator) -> list[dict]:
    """The VIOLIN pair of event ``e``: the entailed statement (``<vid>_<j>-1``) and a contradicted one (``-0``)."""
    if e["kind"] == "move":
        options = [{**e, "cell": c} for c in range(9) if c != e["cell"]]
    elif e["kind"] == "turn":
        options = [{**e, "colour": c} for c in range(cfg.n_colours) if c != e["colour"]]
    else:  # another object (one the video never shows first) or another colour
        options = [{**e, "cls": c} for c in range(cfg.n_classes) if c != e["cls"]]
        options += [{**e, "colour": c} for c in range(cfg.n_colours) if c != e["colour"]]
    fake = _prefer_absent(options, _event_text, seen, 1, rng)[0]
    return [{"qid": f"{vid}_{j}-{label}", "statement": _event_text(ev), "vid_name": vid, "target": bool(label)}
            for label, ev in ((1, e), (0, fake))]


def _annotations(cfg: VideoSyntheticConfig, video: dict, rng: np.random.Generator,
                 extra_rng: np.random.Generator | None = None) -> dict:
    """TVR / TVC rows for 2 events / 1 clip, TVQA + VIOLIN rows for ``cfg.qa_events`` events (0: every event); the
    first two events' TVQA / VIOLIN rows come from ``rng`` as in version 4, the further ones from ``extra_rng``."""
    vid, n, events = video["vid"], video["nframes"], video["events"]
    seen = {w for e in events for w in _event_text(e).split()}
    out: dict[str, list[dict]] = {"tvr": [], "tvqa": [], "violin": [], "tvc": []}
    order = rng.permutation(len(events)).tolist()
    for j, i in enumerate(order[:2]):
        e = events[i]
        out["tvr"].append({"desc_id": f"{vid}_r{j}", "desc": _query_text(e), "vid_name": vid,
                           "ts": _moment(cfg, e["t"], n), "duration": n * cfg.frame_interval})
    n_qa = len(events) if cfg.qa_events == 0 else min(cfg.qa_events, len(events))
    for j, i in enumerate(order[:min(2, n_qa)]):
        out["tvqa"].append(_qa_row(cfg, vid, j, events[i], n, seen, rng))
    for j, i in enumerate(order[:min(2, n_qa)]):
        out["violin"] += _violin_rows(cfg, vid, j, events[i], seen, rng)
    if events:
        s = int(rng.integers(len(events)))
        group = events[s:s + int(rng.integers(1, 4))]
        st_t, ed_t = group[0]["t"], group[-1]["t"]
        ts = [round(st_t * cfg.frame_interval, 3), round(min(ed_t + 2, n) * cfg.frame_interval, 3)]
        cap = " then ".join(_event_text(e) for e in group)
        out["tvc"].append({"clip_id": "", "vid_name": vid, "ts": ts, "desc": cap})
    if n_qa > 2:
        extra = extra_rng if extra_rng is not None else np.random.default_rng([cfg.seed, len(events), n])
        for j in range(2, n_qa):
            out["tvqa"].append(_qa_row(cfg, vid, j, events[order[j]], n, seen, extra))
            out["violin"] += _violin_rows(cfg, vid, j, events[order[j]], seen, extra)
    return out


def generate_videos(cfg: VideoSyntheticConfig, split: str) -> list[dict]:
    """The videos of ``split``: dicts with vid, nframes, features [n, D] fp32, events, subs (list of {start, end,
    text}; empty for a video without subtitles) and annotations {tvr, tvqa, violin, tvc}."""
    if split not in SPLITS:
        raise ValueError(f"generate_videos: 'split' must be one of {SPLITS}, got {split!r}")
    world = _World(cfg)
    count = cfg.n_train_videos if split == "train" else cfg.n_val_videos
    out = []
    for i in range(count):
        rng = np.random.default_rng([cfg.seed, SPLITS.index(split), i])
        v = _video(cfg, world, rng, f"{split}_{i:05d}")
        v["subs"] = [] if rng.random() < cfg.no_subtitle_prob else _subtitles(cfg, v, rng)
        extra = np.random.default_rng([cfg.seed, SPLITS.index(split), i, 1])
        v["annotations"] = _annotations(cfg, v, rng, extra)
        for j, row in enumerate(v["annotations"]["tvc"]):
            row["clip_id"] = str(SPLITS.index(split) * 10**6 + i * 10 + j)
        out.append(v)
    return out


# ----------------------------------------------------------------------------------------------- writing
def _write_corpus(root: Path, cfg: VideoSyntheticConfig) -> dict:
    vocab = video_vocab(cfg)
    vocab.save(root / "vocab.txt")
    meta = {**vocab.meta(), "source": "fastvl synthetic video corpus", "frame_length": cfg.frame_interval}
    counts: dict[str, dict[str, int]] = {}
    with VideoFeatDBWriter(root / "video_db", "synthetic", cfg.frame_interval, cfg.compress, cfg.fp16) as vw, \
            SubtitleDBWriter(root / "sub_db", meta) as sw:
        for split in SPLITS:
            videos = generate_videos(cfg, split)
            (root / f"vids_{split}.json").write_text(json.dumps([v["vid"] for v in videos]))
            c = counts.setdefault(split, {"videos": len(videos), "no_subtitles": 0})
            for v in videos:
                vw.put(v["vid"], v["features"])
                if not v["subs"]:
                    sw.put_pseudo(v["vid"], v["nframes"])
                    c["no_subtitles"] += 1
                    continue
                unique, unmatched, _ = align_subtitles([(s["start"], s["end"]) for s in v["subs"]], v["nframes"],
                                                       cfg.frame_interval)
                sw.put(v["vid"], [vocab.encode(s["text"]) for s in v["subs"]], unique, unmatched, v["nframes"],
                       sub=v["subs"])
            _write_annotations(root, split, videos, vocab, meta, c)
    return {"version": VERSION, "config": asdict(cfg), "vfeat_dim": cfg.vfeat_dim, "vocab_size": vocab.vocab_size,
            "special_ids": vocab.special_ids(), "v_range": list(vocab.v_range), "frame_interval": cfg.frame_interval,
            "max_frames": cfg.max_frames, "counts": counts,
            "word_ids": {"object": [vocab.token_to_id(w) for w in CLASSES[:cfg.n_classes]],
                         "colour": [vocab.token_to_id(w) for w in COLOURS[:cfg.n_colours]],
                         "cell": sorted({vocab.token_to_id(w) for w in ROWS + COLS})}}


def _write_annotations(root: Path, split: str, videos: list[dict], vocab: WordVocab, meta: dict, counts: dict
                       ) -> None:
    enc = vocab.encode
    with QueryDBWriter(root / f"tvr_{split}.db", meta, "tvr") as w:
        for v in videos:
            for row in v["annotations"]["tvr"]:
                w.put(row["desc_id"], {**row, "input_ids": enc(row["desc"]), "target": row["ts"]}, raw=row)
        counts["tvr"] = len(w.id2len)
    with QueryDBWriter(root / f"tvqa_{split}.db", meta, "tvqa") as w:
        for v in videos:
            for row in v["annotations"]["tvqa"]:
                ids = [enc(row["q"])] + [enc(row[f"a{a}"]) for a in range(5)]
                w.put(row["qid"], {**row, "input_ids": ids, "target": row["answer_idx"]}, raw=row)
        counts["tvqa"] = len(w.id2len)
    with QueryDBWriter(root / f"violin_{split}.db", meta, "violin") as w:
        for v in videos:
            for row in v["annotations"]["violin"]:
                w.put(row["qid"], {**row, "input_ids": enc(row["statement"])}, raw=row)
        counts["violin"] = len(w.id2len)
    with CaptionDBWriter(root / f"tvc_{split}.db", meta) as w:
        n = 0
        for v in videos:
            for j, row in enumerate(v["annotations"]["tvc"]):
                w.put_caption(f"{row['clip_id']}_{j}", row["vid_name"], row["ts"], enc(row["desc"]), row["desc"],
                              row["clip_id"])
                w.put_clip(row["clip_id"], row["vid_name"], row["ts"], [row["desc"]])
                n += 1
        counts["tvc"] = n


def video_synthetic_corpus(cache_dir: str | os.PathLike | None = None, config: VideoSyntheticConfig | None = None,
                           force: bool = False) -> VideoCorpus:
    """The synthetic video corpus for ``config`` under ``cache_dir`` (default ``$FASTVL_CACHE`` or
    ``~/.cache/fastvl``), generated on first use into ``<cache_dir>/video-synthetic-<hash>/`` (atomically) and
    reused afterwards."""
    cfg = config or VideoSyntheticConfig()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root, info = cached_folder(cache, f"video-synthetic-{cfg.key()}", "corpus.json",
                               lambda tmp: _write_corpus(tmp, cfg), force)
    return VideoCorpus(root=root, config=cfg, info=info)


def write_video_raw(out_dir: str | os.PathLike, config: VideoSyntheticConfig | None = None,
                    split: str = "train") -> dict[str, Path]:
    """Raw inputs of ``make-data --video``: ``<out>/frames/<vid>.npz`` ({'features' [n, D] fp32, 'interval'}) and
    ``<out>/subtitles.jsonl`` ({vid, start, end, text} per subtitle). Returns {'frames', 'subtitles', 'vocab'}."""
    cfg = config or VideoSyntheticConfig()
    out = Path(out_dir)
    (out / "frames").mkdir(parents=True, exist_ok=True)
    with open(out / "subtitles.jsonl", "w") as f:
        for v in generate_videos(cfg, split):
            np.savez(out / "frames" / f"{v['vid']}.npz", features=v["features"],
                     interval=np.float32(cfg.frame_interval))
            for s in v["subs"]:
                f.write(json.dumps({"vid": v["vid"], **s}) + "\n")
    return {"frames": out / "frames", "subtitles": out / "subtitles.jsonl",
            "vocab": video_vocab(cfg).save(out / "vocab.txt")}
