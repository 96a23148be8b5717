"""``fastvl make-data --video``: per-video npz frame features + a subtitle jsonl -> the official HERO video db and
subtitle db.

Inputs:
- ``frames``: one ``<vid>.npz`` per video with ``features`` [n, D] (one row per frame) and optionally the frame
  interval in seconds (``interval`` or ``frame_interval``, a scalar; else ``frame_interval``; all videos must agree).
- ``subtitles``: jsonl, one subtitle per line ``{"vid", "start", "end", "text"}`` (seconds; ``vid_name`` accepted for
  ``vid``). Lines of a video are sorted by start.

Outputs under ``out``: ``video_db/{feat_version}_{interval}[_compressed]`` + ``id2nframe.json``, ``sub_db/`` (LMDB +
meta.json, vid2len.json, vid2max_frame_sub_len.json) and ``vocab.txt`` (the word vocab used). Subtitles are aligned
to frames by temporal IoU (:func:`~fastvl.data.video.align.align_subtitles`); a video without subtitles gets empty
pseudo-subtitles over 5-frame chunks. A subtitle starting at or after its video's end, a video of the wrong feature
dimension, a subtitle of an unknown video or a bad line raise :class:`DataError` naming the file and key, or are
skipped and counted with ``skip_bad_examples``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import BadExampleCounter, DataError
from .align import align_subtitles
from .make_queries import QUERY_TASKS, query_texts, read_query_rows, write_query_db
from .synthetic import video_vocab
from .video_db import SubtitleDBWriter, VideoFeatDBWriter
from .vocab import WordVocab

__all__ = ["make_video_data", "MakeVideoDataResult"]


@dataclass
class MakeVideoDataResult:
    video_db: Path
    sub_db: Path
    vocab: Path
    n_videos: int
    n_subtitles: int
    n_pseudo: int
    frame_interval: float
    vfeat_dim: int
    query_db: Path | None = None
    n_queries: int = 0
    skipped: dict[str, int] = field(default_factory=dict)


def _read_subtitles(path: Path, skip: bool, bad: BadExampleCounter) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise DataError(str(path), f"line {n}", f"is not valid JSON ({e})", "corrupt_record") from e
                vid = row.get("vid", row.get("vid_name")) if isinstance(row, dict) else None
                if vid is None or not isinstance(row.get("text"), str):
                    raise DataError(str(path), f"line {n}", "needs 'vid' and a string 'text'", "corrupt_record")
                try:
                    start, end = float(row["start"]), float(row["end"])
                except (KeyError, TypeError, ValueError) as e:
                    raise DataError(str(path), f"line {n}", "needs numbers 'start' and 'end' (seconds)",
                                    "corrupt_record") from e
                if not (math.isfinite(start) and math.isfinite(end)) or start < 0 or end < start:
                    raise DataError(str(path), f"line {n}", f"needs 0 <= start <= end, got {start}, {end}",
                                    "corrupt_record")
            except DataError as e:
                bad.skip_or_raise(e, skip)
                continue
            out.setdefault(str(vid), []).append({"start": start, "end": end, "text": row["text"], "line": n})
    for subs in out.values():
        subs.sort(key=lambda s: s["start"])
    return out


def _npz_interval(z, default: float) -> float:
    """The ``interval`` / ``frame_interval`` scalar of an open npz (rounded to 1e-6 s), else ``default``."""
    return next((round(float(z[k]), 6) for k in ("interval", "frame_interval") if k in z.files), default)


def _load_frames(path: Path, default_interval: float) -> tuple[np.ndarray, float]:
    try:
        with np.load(path, allow_pickle=False) as z:
            feat = z["features"] if "features" in z.files else None
            iv = _npz_interval(z, default_interval)
    except Exception as e:  # noqa: BLE001  (any read failure is a corrupt file)
        raise DataError(str(path.parent), path.name, f"cannot read npz ({type(e).__name__}: {e})",
                        "corrupt_record") from e
    if feat is None:
        raise DataError(str(path.parent), path.name, "npz has no 'features' array", "corrupt_record")
    if feat.ndim != 2 or feat.shape[0] == 0 or not np.issubdtype(feat.dtype, np.floating):
        raise DataError(str(path.parent), path.name, f"'features' must be a float [n>0, D] array, got {feat.dtype} "
                        f"{list(feat.shape)}", "wrong_dim")
    if not np.isfinite(feat).all():
        raise DataError(str(path.parent), path.name, "'features' contain NaN/inf", "nonfinite_feature")
    return feat, iv


def _first_interval(files: list[Path], default: float) -> float:
    """The frame interval of the first readable npz (the LMDB folder name needs it before writing)."""
    for path in files:
        try:
            with np.load(path, allow_pickle=False) as z:
                return _npz_interval(z, default)
        except Exception:  # noqa: BLE001  (unreadable: reported when the file itself is converted)
            continue
    return default


def make_video_data(frames: str | os.PathLike, subtitles: str | os.PathLike | None, out: str | os.PathLike,
                    frame_interval: float = 1.5, feat_version: str = "resnet_slowfast", vocab_file: str | None = None,
                    compress: bool = True, fp16: bool = False, skip_bad_examples: bool = False,
                    overwrite: bool = False, progress: bool = True, queries: str | os.PathLike | None = None,
                    query_task: str | None = None) -> MakeVideoDataResult:
    """Write the official video db + subtitle db from ``frames`` (npz folder) and ``subtitles`` (jsonl; None: every
    video gets pseudo-subtitles). ``vocab_file``: a word list (default: every word of the subtitles and queries,
    or the synthetic corpus words when there are none). ``queries`` + ``query_task`` (tvr / tvqa / violin / tvc):
    an annotation jsonl written as ``<out>/<query_task>_db`` (see :mod:`~fastvl.data.video.make_queries`)."""
    frames, out = Path(frames), Path(out)
    if not frames.is_dir():
        raise FileNotFoundError(f"make_video_data: frames folder {str(frames)!r} does not exist")
    files = sorted(frames.glob("*.npz"))
    if not files:
        raise DataError(str(frames), None, "no .npz files", "no_examples")
    if frame_interval <= 0:
        raise ValueError(f"make_video_data: 'frame_interval' must be > 0, got {frame_interval}")
    if (queries is None) != (query_task is None) or (query_task is not None and query_task not in QUERY_TASKS):
        raise ValueError(f"make_video_data: give 'queries' with 'query_task' (one of {QUERY_TASKS}), got "
                         f"{queries!r}, {query_task!r}")
    outputs = ("video_db", "sub_db") + ((f"{query_task}_db",) if query_task else ())
    for sub in outputs:
        if (out / sub).exists():
            if not overwrite:
                raise FileExistsError(f"make_video_data: {out / sub} exists (pass overwrite=True / --overwrite)")
            shutil.rmtree(out / sub)
    bad = BadExampleCounter()
    subs = _read_subtitles(Path(subtitles), skip_bad_examples, bad) if subtitles is not None else {}
    known = {p.stem for p in files}
    for vid in sorted(set(subs) - known):
        err = DataError(str(subtitles), vid, f"subtitles of a video with no npz in {frames}", "missing_video")
        bad.skip_or_raise(err, skip_bad_examples)
        del subs[vid]
    qrows = read_query_rows(queries, query_task, skip_bad_examples, bad) if queries is not None else []
    if vocab_file is not None:
        vocab = WordVocab.from_file(vocab_file)
    else:
        texts = [s["text"] for rows in subs.values() for s in rows] + query_texts(qrows, query_task or "tvr")
        words = sorted({w for t in texts for w in WordVocab.split(t)})
        vocab = WordVocab(words, name="fastvl-word") if words else video_vocab()
    out.mkdir(parents=True, exist_ok=True)
    vocab_path = vocab.save(out / "vocab.txt")
    meta = {**vocab.meta(), "source": "fastvl make-data --video"}
    interval: float | None = None
    n_subs = n_pseudo = 0
    dim = None
    first = _first_interval(files, frame_interval)
    with VideoFeatDBWriter(out / "video_db", feat_version, first, compress, fp16) as vw, \
            SubtitleDBWriter(out / "sub_db", meta) as sw:
        for path in tqdm(files, desc="videos", disable=not progress):
            vid = path.stem
            try:
                feat, iv = _load_frames(path, frame_interval)
                if dim is not None and feat.shape[1] != dim:
                    raise DataError(str(frames), path.name, f"'features' has dim {feat.shape[1]} but earlier videos "
                                    f"have {dim}", "wrong_dim")
                if not math.isclose(iv, first, rel_tol=1e-6):
                    raise DataError(str(frames), path.name, f"frame interval {iv} s differs from {first} s of "
                                    "the other videos", "wrong_interval")
                n = feat.shape[0]
                rows = subs.get(vid, [])
                for s in rows:
                    if s["start"] >= n * iv:
                        raise DataError(str(subtitles), f"{vid} (line {s['line']})", f"subtitle starts at "
                                        f"{s['start']} s, at or after the video's end ({n} frames x {iv} s = "
                                        f"{n * iv} s): it would align to frame {math.floor(s['start'] / iv)} past "
                                        "the video", "frame_past_video")
            except DataError as e:
                bad.skip_or_raise(e, skip_bad_examples)
                continue
            dim, interval = feat.shape[1], iv
            vw.put(vid, feat)
            if rows:
                unique, unmatched, _ = align_subtitles([(s["start"], s["end"]) for s in rows], n, iv)
                sw.put(vid, [vocab.encode(s["text"]) for s in rows], unique, unmatched, n,
                       sub=[{k: s[k] for k in ("start", "end", "text")} for s in rows])
                n_subs += len(rows)
            else:
                sw.put_pseudo(vid, n)
                n_pseudo += 1
        if dim is None:
            raise DataError(str(frames), None, "every video was skipped as bad", "no_examples")
    query_db, n_queries = None, 0
    if queries is not None:
        query_db = out / f"{query_task}_db"
        n_queries = write_query_db(qrows, query_task, query_db, vocab, vw.name2nframe, interval, str(queries),
                                   skip_bad_examples, bad)
    return MakeVideoDataResult(video_db=out / "video_db", sub_db=out / "sub_db", vocab=vocab_path,
                               n_videos=len(vw.name2nframe), n_subtitles=n_subs, n_pseudo=n_pseudo,
                               frame_interval=interval, vfeat_dim=dim, query_db=query_db, n_queries=n_queries,
                               skipped=bad.as_dict())
