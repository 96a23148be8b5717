"""Query / caption dbs from annotation jsonl files (the rows of the official TVR, TVQA, VIOLIN and TVC releases).

Rows per task (one JSON object per line; seconds for every time):

- ``tvr``: ``{desc_id, desc, vid_name, ts: [st, ed]}``
- ``tvqa``: ``{qid, q, a0, a1, a2, a3, a4, answer_idx, vid_name, ts: "st-ed"}`` (``answer_idx`` / ``ts`` optional)
- ``violin``: ``{qid: "<id>-<label>", statement, vid_name}`` or ``{id, statement, label: 0|1, vid_name}`` (the id
  then becomes ``<id>-<label>``); every statement needs its pair (the same id with the other label)
- ``tvc``: ``{clip_id, vid_name, ts: [st, ed], descs: [{desc}, ...]}``

A row of an unknown video, a moment outside its video, or a malformed row raises :class:`DataError` naming the file
and the row's id (or line), or is skipped and counted with ``skip_bad_examples``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import BadExampleCounter, DataError
from .downstream import moment_frames
from .query_db import CaptionDBWriter, QueryDBWriter, paired_statement_id
from .vocab import WordVocab

__all__ = ["QUERY_TASKS", "read_query_rows", "query_texts", "write_query_db"]

QUERY_TASKS = ("tvr", "tvqa", "violin", "tvc")
_ID = {"tvr": "desc_id", "tvqa": "qid", "violin": "qid", "tvc": "clip_id"}


def read_query_rows(path: str | os.PathLike, task: str, skip: bool = False,
                    bad: BadExampleCounter | None = None) -> list[dict]:
    """The checked rows of ``path`` for ``task`` (``_key`` added: the row's id)."""
    if task not in QUERY_TASKS:
        raise ValueError(f"read_query_rows: 'task' must be one of {QUERY_TASKS}, got {task!r}")
    bad = bad if bad is not None else BadExampleCounter()
    path = Path(path)
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(_check(path, n, line, task))
            except DataError as e:
                bad.skip_or_raise(e, skip)
    if task == "violin":
        ids = {r["_key"] for r in rows}
        for r in list(rows):
            if paired_statement_id(r["_key"]) not in ids:
                err = DataError(str(path), r["_key"], f"statement has no pair {paired_statement_id(r['_key'])!r}",
                                "corrupt_record")
                bad.skip_or_raise(err, skip)
                rows.remove(r)
    return rows


def _check(path: Path, n: int, line: str, task: str) -> dict:
    try:
        row = json.loads(line)
    except ValueError as e:
        raise DataError(str(path), f"line {n}", f"is not valid JSON ({e})", "corrupt_record") from e
    if not isinstance(row, dict):
        raise DataError(str(path), f"line {n}", "is not a JSON object", "corrupt_record")
    if task == "violin" and "qid" not in row and "id" in row and row.get("label") in (0, 1):
        row["qid"] = f"{row['id']}-{row['label']}"
    need = {"tvr": ("desc_id", "desc", "vid_name", "ts"), "tvqa": ("qid", "q", "a0", "a1", "a2", "a3", "a4",
                                                                   "vid_name"),
            "violin": ("qid", "statement", "vid_name"), "tvc": ("clip_id", "vid_name", "ts", "descs")}[task]
    missing = [k for k in need if k not in row]
    key = str(row.get(_ID[task], f"line {n}"))
    if missing:
        raise DataError(str(path), key, f"row lacks {missing}", "corrupt_record")
    if task == "violin":
        try:
            paired_statement_id(str(row["qid"]))
        except ValueError as e:
            raise DataError(str(path), key, str(e), "corrupt_record") from e
        row["target"] = str(row["qid"]).endswith("-1")
    if task == "tvc" and (not isinstance(row["descs"], list) or not all(isinstance(d, dict) and "desc" in d
                                                                          for d in row["descs"])):
        raise DataError(str(path), key, "'descs' must be a list of {desc: text}", "corrupt_record")
    row["_key"] = key
    return row


def query_texts(rows: list[dict], task: str) -> list[str]:
    """Every text of the rows (for building a vocabulary)."""
    if task == "tvr":
        return [r["desc"] for r in rows]
    if task == "tvqa":
        return [r[k] for r in rows for k in ("q", "a0", "a1", "a2", "a3", "a4")]
    if task == "violin":
        return [r["statement"] for r in rows]
    return [d["desc"] for r in rows for d in r["descs"]]


def _moment(row: dict, task: str):
    if task == "tvqa":
        ts = row.get("ts")
        if ts is None:
            return None
        try:
            st, ed = (float(x) for x in str(ts).split("-"))
        except ValueError:
            return None  # the official loader turns an unparsable ts into the target (-1, -1)
        return [st, ed]
    if task == "violin":
        return None
    try:
        return [float(row["ts"][0]), float(row["ts"][1])]
    except (TypeError, ValueError, IndexError, KeyError):
        return [float("nan"), float("nan")]


def write_query_db(rows: list[dict], task: str, out: str | os.PathLike, vocab: WordVocab, name2nframe: dict[str, int],
                   interval: float, source: str, skip: bool = False, bad: BadExampleCounter | None = None) -> int:
    """Write the rows as the official query db (tvr / tvqa / violin) or caption db (tvc) at ``out``; rows of videos
    not in ``name2nframe`` or with a moment outside the video are errors (or counted skips). Returns rows written."""
    bad = bad if bad is not None else BadExampleCounter()
    meta = {**vocab.meta(), "source": source}
    good = []
    for r in rows:
        try:
            vid = str(r["vid_name"])
            if vid not in name2nframe:
                raise DataError(source, r["_key"], f"video {vid!r} is not in the video db", "missing_video")
            texts = query_texts([r], task)
            empty = [t for t in texts if not vocab.encode(t)]
            if empty and task != "tvqa" or task == "tvqa" and not vocab.encode(r["q"]):
                raise DataError(source, r["_key"], f"text without any word: {empty[0]!r}", "empty_text")
            ts = _moment(r, task)
            if ts is not None:
                moment_frames(ts, interval, name2nframe[vid], source, r["_key"], caption=task == "tvc")
        except DataError as e:
            bad.skip_or_raise(e, skip)
            continue
        good.append(r)
    if task == "violin":  # a statement whose pair was dropped is dropped too
        keys = {r["_key"] for r in good}
        good = [r for r in good if paired_statement_id(r["_key"]) in keys]
    enc = vocab.encode
    raw = [{k: v for k, v in r.items() if k != "_key"} for r in good]
    if task == "tvc":
        with CaptionDBWriter(out, meta) as w:
            for r in raw:
                for j, d in enumerate(r["descs"]):
                    w.put_caption(str(d.get("desc_id", f"{r['clip_id']}_{j}")), r["vid_name"], r["ts"],
                                  enc(d["desc"]), d["desc"], str(r["clip_id"]))
                w.put_clip(str(r["clip_id"]), r["vid_name"], r["ts"], [d["desc"] for d in r["descs"]])
        return len(raw)
    with QueryDBWriter(out, meta, task) as w:
        for r in raw:
            if task == "tvr":
                w.put(r["desc_id"], {**r, "input_ids": enc(r["desc"]), "target": r["ts"]}, raw=r)
            elif task == "tvqa":
                ids = [enc(r[k]) for k in ("q", "a0", "a1", "a2", "a3", "a4")]
                w.put(r["qid"], {**r, "input_ids": ids, "target": r.get("answer_idx"), "ts": r.get("ts")}, raw=r)
            else:
                w.put(r["qid"], {**r, "input_ids": enc(r["statement"])}, raw=r)
    return len(raw)
