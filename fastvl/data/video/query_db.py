"""The official HERO query dbs (TVR, TVQA, VIOLIN) and caption db (TVC), read and written.

Query db (``QueryTokLmdb`` / ``QaQueryTokLmdb``): LMDB values ``lz4(msgpack(example))`` keyed by query id, side
files ``meta.json`` (special ids), ``id2len.json``, ``query2video.json`` and ``query_data.jsonl`` (the raw rows).

- tvr: ``{desc_id, desc, vid_name, ts: [st, ed] seconds, input_ids, target: ts, qid}``; id2len = token count.
- tvqa: ``{qid, q, a0..a4, answer_idx, ts: "st-ed" seconds, vid_name, input_ids: [q, a0, .., a4], target}``;
  id2len = the six token counts.
- violin: ``{qid: "<clip>_<k>-<label>", statement, vid_name, input_ids, target: bool}``; the paired statement of
  qid ``x-1`` is ``x-0`` (official ``get_paired_statement_id``).

Caption db (TVC, ``CaptionTokLmdb``): ``<db>/meta.json`` (PAD, BOS, EOS), ``<db>/cap.db`` (LMDB ``{input_ids, ts,
vid_name, clip_id, desc}`` per caption id + ``cap2vid.json``, ``vid2caps.json``) and ``<db>/clip.db`` (LMDB
``{ts, vid_name, captions: [{text}]}`` per clip id + ``clip2vid.json``, ``vid2clips.json``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import DataError
from .store import LazyEnv, LmdbWriter
from .video_db import META_KEYS, decode_record, encode_record, read_json

__all__ = ["QueryDB", "QueryDBWriter", "CaptionDB", "CaptionDBWriter", "QUERY_KINDS", "paired_statement_id"]

QUERY_KINDS = ("tvr", "tvqa", "violin")


def paired_statement_id(qid: str) -> str:
    """The VIOLIN statement paired with ``qid`` (``x-1`` <-> ``x-0``)."""
    head, _, label = qid.rpartition("-")
    if label not in ("0", "1") or not head:
        raise ValueError(f"paired_statement_id: VIOLIN query id must end in '-0' or '-1', got {qid!r}")
    return f"{head}-{1 - int(label)}"


class QueryDB:
    """Reader of an official query db. ``max_txt_len`` drops queries longer than it (-1 keeps all; for tvqa the rule
    is question + longest answer, as official)."""

    def __init__(self, db_dir: str | os.PathLike, max_txt_len: int = -1):
        self.db_dir = Path(db_dir)
        self.name = str(self.db_dir)
        if not self.db_dir.is_dir():
            raise DataError(self.name, None, "query db folder does not exist", "missing_db")
        self.meta = read_json(self.db_dir / "meta.json", self.name)
        missing = [k for k in META_KEYS if k not in self.meta]
        if missing:
            raise DataError(str(self.db_dir / "meta.json"), None, f"lacks keys {missing}", "corrupt_db")
        self.cls_, self.sep, self.mask = int(self.meta["CLS"]), int(self.meta["SEP"]), int(self.meta["MASK"])
        self.bos, self.eos, self.pad = int(self.meta["BOS"]), int(self.meta["EOS"]), int(self.meta["PAD"])
        self.v_range = tuple(self.meta["v_range"])
        self.kind = self.meta.get("task")
        lens = read_json(self.db_dir / "id2len.json", self.name)
        self.id2len = {str(k): v for k, v in lens.items() if max_txt_len == -1 or _short(v, max_txt_len)}
        q2v = self.db_dir / "query2video.json"
        self.query2video: dict[str, str] = read_json(q2v, self.name) if q2v.is_file() else {}
        self.video2query: dict[str, list[str]] = {}
        for q, v in self.query2video.items():
            self.video2query.setdefault(v, []).append(q)
        self._env = LazyEnv(self.db_dir, "query db")

    @property
    def ids(self) -> list[str]:
        return list(self.id2len)

    @property
    def query_data(self) -> dict[str, dict]:
        """The raw rows of ``query_data.jsonl`` by query id (``desc_id`` / ``qid``); {} when the file is absent."""
        path = self.db_dir / "query_data.jsonl"
        if not path.is_file():
            return {}
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return {str(r.get("desc_id", r.get("qid"))): r for r in rows}

    def __len__(self) -> int:
        return len(self.id2len)

    def __getitem__(self, qid: str) -> dict:
        ex = decode_record(self._env.get(qid), self.name, qid, "query")
        ids = ex.get("input_ids")
        if not isinstance(ids, list) or not ids:
            raise DataError(self.name, qid, "record has no non-empty 'input_ids'", "corrupt_record")
        return ex


def _short(length, max_len: int) -> bool:
    if isinstance(length, list):
        return length[0] + max(length[1:]) <= max_len
    return int(length) <= max_len


class QueryDBWriter:
    """Writes an official query db of ``kind`` tvr / tvqa / violin (context manager): ``put(qid, example)`` where
    ``example`` has ``input_ids`` (a list, or for tvqa six lists) and ``vid_name``; other keys are stored as given."""

    def __init__(self, db_dir: str | os.PathLike, meta: dict, kind: str):
        if kind not in QUERY_KINDS:
            raise ValueError(f"QueryDBWriter: 'kind' must be one of {QUERY_KINDS}, got {kind!r}")
        missing = [k for k in META_KEYS if k not in meta]
        if missing:
            raise ValueError(f"QueryDBWriter: 'meta' lacks keys {missing}")
        self.db_dir, self.kind = Path(db_dir), kind
        self.meta = {**meta, "task": kind}
        self._w = LmdbWriter(self.db_dir, "QueryDBWriter")
        self.id2len: dict[str, int | list[int]] = {}
        self.query2video: dict[str, str] = {}
        self.rows: list[dict] = []

    def put(self, qid: str, example: dict, raw: dict | None = None) -> None:
        qid = str(qid)
        ids = example.get("input_ids")
        if not isinstance(ids, list) or not ids:
            raise ValueError(f"QueryDBWriter({self.db_dir}): query {qid!r} needs non-empty 'input_ids'")
        if self.kind == "tvqa":
            if len(ids) != 6:
                raise ValueError(f"QueryDBWriter({self.db_dir}): tvqa query {qid!r} needs 6 token lists (q, a0..a4)")
            self.id2len[qid] = [len(x) for x in ids]
        else:
            self.id2len[qid] = len(ids)
        vid = example.get("vid_name")
        if vid is not None:
            self.query2video[qid] = str(vid)
        self._w.put(qid, encode_record({**example, "qid": qid, "vid": vid}))
        self.rows.append(raw if raw is not None else {k: v for k, v in example.items() if k != "input_ids"})

    def close(self) -> None:
        self._w.close()
        (self.db_dir / "meta.json").write_text(json.dumps(self.meta, indent=4))
        (self.db_dir / "id2len.json").write_text(json.dumps(self.id2len))
        (self.db_dir / "query2video.json").write_text(json.dumps(self.query2video))
        with open(self.db_dir / "query_data.jsonl", "w") as f:
            for row in self.rows:
                f.write(json.dumps(row) + "\n")

    def __enter__(self) -> QueryDBWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------- TVC captions
class CaptionDB:
    """Reader of an official TVC caption db (``CaptionTokLmdb``): ``caption(cid)`` -> dict with ``input_ids``
    ([BOS] + ids, cut to ``max_txt_len``), ``tgt_ids`` (ids + [EOS], cut) and ``ts``; ``clip(clip_id)`` the raw
    clip record."""

    def __init__(self, db_dir: str | os.PathLike, max_txt_len: int = -1):
        self.db_dir = Path(db_dir)
        self.name = str(self.db_dir)
        meta = read_json(self.db_dir / "meta.json", self.name)
        for k in ("PAD", "BOS", "EOS"):
            if k not in meta:
                raise DataError(str(self.db_dir / "meta.json"), None, f"lacks key {k!r}", "corrupt_db")
        self.meta = meta
        self.pad, self.bos, self.eos = int(meta["PAD"]), int(meta["BOS"]), int(meta["EOS"])
        self.max_txt_len = max_txt_len
        self.vid2caps: dict[str, list[str]] = read_json(self.db_dir / "cap.db" / "vid2caps.json", self.name)
        self.cap2vid: dict[str, str] = read_json(self.db_dir / "cap.db" / "cap2vid.json", self.name)
        clip_dir = self.db_dir / "clip.db"
        self.vid2clips: dict[str, list[str]] = (read_json(clip_dir / "vid2clips.json", self.name)
                                                if (clip_dir / "vid2clips.json").is_file() else {})
        self._cap = LazyEnv(self.db_dir / "cap.db", "caption db")
        self._clip = LazyEnv(clip_dir, "clip db")

    def caption(self, cid: str) -> dict:
        ex = decode_record(self._cap.get(cid), str(self.db_dir / "cap.db"), cid, "caption")
        ids = ex.get("input_ids")
        if not isinstance(ids, list) or not ids:
            raise DataError(str(self.db_dir / "cap.db"), cid, "caption has no non-empty 'input_ids'",
                            "corrupt_record")
        inp, tgt = [self.bos] + ids, ids + [self.eos]
        if self.max_txt_len != -1:
            inp, tgt = inp[:self.max_txt_len], tgt[:self.max_txt_len]
        return {**ex, "input_ids": inp, "tgt_ids": tgt}

    def clip(self, clip_id: str) -> dict:
        return decode_record(self._clip.get(clip_id), str(self.db_dir / "clip.db"), clip_id, "clip")


class CaptionDBWriter:
    """Writes an official TVC caption db (context manager): ``put_caption(cid, vid, ts, input_ids, desc, clip_id)``
    and ``put_clip(clip_id, vid, ts, texts)``."""

    def __init__(self, db_dir: str | os.PathLike, meta: dict):
        self.db_dir = Path(db_dir)
        self.meta = {k: meta[k] for k in ("PAD", "BOS", "EOS")} | dict(meta)
        self._cap = LmdbWriter(self.db_dir / "cap.db", "CaptionDBWriter")
        self._clip = LmdbWriter(self.db_dir / "clip.db", "CaptionDBWriter")
        self.vid2caps: dict[str, list[str]] = {}
        self.cap2vid: dict[str, str] = {}
        self.vid2clips: dict[str, list[str]] = {}
        self.clip2vid: dict[str, str] = {}

    def put_caption(self, cid: str, vid: str, ts: list[float], input_ids: list[int], desc: str = "",
                    clip_id: str | None = None) -> None:
        if not input_ids:
            raise ValueError(f"CaptionDBWriter({self.db_dir}): caption {cid!r} has no tokens")
        self._cap.put(cid, encode_record({"input_ids": [int(t) for t in input_ids], "ts": [float(x) for x in ts],
                                          "vid_name": vid, "desc": desc, "clip_id": clip_id}))
        self.vid2caps.setdefault(vid, []).append(cid)
        self.cap2vid[cid] = vid

    def put_clip(self, clip_id: str, vid: str, ts: list[float], texts: list[str]) -> None:
        self._clip.put(clip_id, encode_record({"ts": [float(x) for x in ts], "vid_name": vid,
                                               "captions": [{"text": t} for t in texts]}))
        self.vid2clips.setdefault(vid, []).append(clip_id)
        self.clip2vid[clip_id] = vid

    def close(self) -> None:
        self._cap.close()
        self._clip.close()
        (self.db_dir / "meta.json").write_text(json.dumps(self.meta, indent=4))
        for folder, name, obj in (("cap.db", "vid2caps", self.vid2caps), ("cap.db", "cap2vid", self.cap2vid),
                                  ("clip.db", "vid2clips", self.vid2clips), ("clip.db", "clip2vid", self.clip2vid)):
            (self.db_dir / folder / f"{name}.json").write_text(json.dumps(obj))

    def __enter__(self) -> CaptionDBWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
