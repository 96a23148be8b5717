"""The official HERO video feature db and subtitle db, read and written.

Video db (``img_dir``, official ``VideoFeatLmdb``): an LMDB folder ``{feat_version}_{frame_interval}`` (plus
``_compressed`` when values are ``np.savez_compressed`` bytes; else msgpack-numpy dicts) beside ``id2nframe.json``
(video id -> frame count). Key = video id, value = ``{'features': [n, D]}``; stored fp32 or fp16, read as fp32;
``max_clip_len`` (official 100) cuts longer videos.

Subtitle db (``db_dir``, official ``SubTokLmdb``): LMDB values ``lz4.frame(msgpack(example))`` per video with
``input_ids`` (one token list per subtitle, no special tokens), ``unique_sub2frames`` ([[sub_idx, [frame, ...]], ...]:
each frame in at most one subtitle) and ``unmatched_frames`` (frames of no subtitle); side files ``meta.json``
(BOS, EOS, SEP, CLS, PAD, MASK, UNK, v_range), ``vid2len.json`` (frames) and ``vid2max_frame_sub_len.json`` (longest
subtitle + its frames). A video without subtitles has EMPTY pseudo-subtitles over 5-frame chunks (valid data).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import lz4.frame
import numpy as np

from ..errors import DataError
from ..lmdb_db import dumps_msgpack, dumps_npz, loads_msgpack, loads_npz
from .store import LazyEnv, LmdbWriter

__all__ = ["VideoFeatDB", "VideoFeatDBWriter", "SubtitleDB", "SubtitleDBWriter", "video_db_name", "read_json",
           "decode_record", "encode_record", "META_KEYS"]

META_KEYS = ("BOS", "EOS", "SEP", "CLS", "PAD", "MASK", "UNK", "v_range")


def video_db_name(feat_version: str = "resnet_slowfast", frame_interval: float = 1.5, compress: bool = True) -> str:
    return f"{feat_version}_{frame_interval}" + ("_compressed" if compress else "")


def read_json(path: Path, db: str):
    if not path.is_file():
        raise DataError(db, None, f"missing side file {path.name}", "missing_db")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(str(path), None, f"is not valid JSON: {e}", "corrupt_db") from e


def encode_record(obj) -> bytes:
    """lz4(msgpack(obj)): the official text-db value encoding."""
    return lz4.frame.compress(dumps_msgpack(obj))


def decode_record(data: bytes | None, db: str, key: str, what: str = "record") -> dict:
    if data is None:
        raise DataError(db, key, f"{what} is not in the db", "missing_record")
    try:
        out = loads_msgpack(lz4.frame.decompress(data))
    except Exception as e:  # noqa: BLE001  (any decode failure is a corrupt record)
        raise DataError(db, key, f"corrupt or truncated record ({type(e).__name__}: {e})", "corrupt_record") from e
    if not isinstance(out, dict):
        raise DataError(db, key, f"record is a {type(out).__name__}, expected a dict", "corrupt_record")
    return out


# ----------------------------------------------------------------------------------------------- video db
class VideoFeatDB:
    """Reader of an official HERO video db folder.

    Args:
        img_dir: folder with the ``{feat_version}_{frame_interval}[_compressed]`` LMDB and ``id2nframe.json``.
        feat_version, frame_interval: name of the LMDB; both None: the one LMDB folder in ``img_dir``.
        compress: which of ``…_compressed`` / plain to open (None: whichever exists; values decode either way).
        max_clip_len: frames kept per video (-1: all).
        vfeat_dim: expected feature dimension (None: from the first video).
    """

    def __init__(self, img_dir: str | os.PathLike, feat_version: str | None = None,
                 frame_interval: float | None = None, compress: bool | None = None, max_clip_len: int = -1,
                 vfeat_dim: int | None = None):
        self.img_dir = Path(img_dir)
        if not self.img_dir.is_dir():
            raise DataError(str(self.img_dir), None, "video db folder does not exist", "missing_db")
        self.db_path = self._find(feat_version, frame_interval, compress)
        self.name = str(self.db_path)
        stem = self.db_path.name.removesuffix("_compressed")
        version, _, interval = stem.rpartition("_")
        self.feat_version = version
        try:
            self.frame_interval = float(interval)
        except ValueError:
            raise DataError(str(self.db_path), None, "LMDB folder name is not {feat_version}_{frame_interval}",
                            "corrupt_db") from None
        side = self.img_dir / "id2nframe.json"
        if not side.is_file() and (self.img_dir / "id2frame_len.json").is_file():
            side = self.img_dir / "id2frame_len.json"  # the name scripts/convert_videodb.py writes
        raw = read_json(side, str(self.img_dir))
        self.name2nframe: dict[str, int] = {}
        for k, v in raw.items():
            if not isinstance(v, int) or v < 0:
                raise DataError(str(side), str(k), f"frame count must be an integer >= 0, got {v!r}", "corrupt_db")
            self.name2nframe[str(k)] = v
        self.max_clip_len = max_clip_len
        self._vfeat_dim = vfeat_dim
        self._env = LazyEnv(self.db_path, "video db")

    def _find(self, feat_version, frame_interval, compress) -> Path:
        if feat_version is not None or frame_interval is not None:
            tried = []
            for comp in ([True, False] if compress is None else [compress]):
                name = video_db_name(feat_version or "resnet_slowfast", 1.5 if frame_interval is None
                                     else frame_interval, comp)
                tried.append(name)
                if (self.img_dir / name / "data.mdb").is_file():
                    return self.img_dir / name
            raise DataError(str(self.img_dir), None, f"no video LMDB named {tried}; found "
                            f"{sorted(p.name for p in self.img_dir.iterdir())}", "missing_db")
        found = sorted(p for p in self.img_dir.iterdir() if (p / "data.mdb").is_file()
                       and (compress is None or p.name.endswith("_compressed") == compress))
        if len(found) != 1:
            raise DataError(str(self.img_dir), None, f"expected one {{feat_version}}_{{frame_interval}} LMDB folder, "
                            f"found {[p.name for p in found]}; pass feat_version and frame_interval", "missing_db")
        return found[0]

    def __len__(self) -> int:
        return len(self.name2nframe)

    def __contains__(self, vid: str) -> bool:
        return vid in self.name2nframe

    @property
    def vids(self) -> list[str]:
        return list(self.name2nframe)

    def nframes(self, vid: str) -> int:
        """Frames of ``vid`` after the ``max_clip_len`` cut."""
        n = self.name2nframe[vid]
        return n if self.max_clip_len < 0 else min(n, self.max_clip_len)

    def get_raw(self, vid: str) -> dict[str, np.ndarray]:
        """The stored arrays of ``vid`` as written (fp16 stays fp16, no cut)."""
        data = self._env.get(vid)
        if data is None:
            raise DataError(self.name, vid, "video is not in the video db", "missing_video")
        try:
            out = loads_npz(data) if bytes(data[:2]) == b"PK" else loads_msgpack(data)
        except Exception as e:  # noqa: BLE001
            raise DataError(self.name, vid, f"corrupt or truncated record ({type(e).__name__}: {e})",
                            "corrupt_record") from e
        if not isinstance(out, dict):
            raise DataError(self.name, vid, f"record is a {type(out).__name__}, expected {{'features': ...}}",
                            "corrupt_record")
        return out

    @property
    def vfeat_dim(self) -> int:
        if self._vfeat_dim is None:
            if not self.name2nframe:
                raise DataError(self.name, None, "video db is empty", "missing_video")
            feat = self.get_raw(next(iter(self.name2nframe))).get("features")
            if feat is None or np.ndim(feat) != 2:
                raise DataError(self.name, next(iter(self.name2nframe)), "record has no [n, D] 'features'",
                                "corrupt_record")
            self._vfeat_dim = int(np.shape(feat)[1])
        return self._vfeat_dim

    def get(self, vid: str) -> np.ndarray:
        """Validated fp32 frame features [nframes, D] of ``vid`` (cut to ``max_clip_len``)."""
        if vid not in self.name2nframe:
            raise DataError(self.name, vid, "video is not in id2nframe.json", "missing_video")
        feat = self.get_raw(vid).get("features")
        n = self.nframes(vid)
        if feat is None:
            raise DataError(self.name, vid, "record has no 'features'", "corrupt_record")
        if feat.ndim != 2 or feat.shape[1] != self.vfeat_dim:
            raise DataError(self.name, vid, f"features must be [n, {self.vfeat_dim}] (vfeat_dim), got "
                            f"{list(feat.shape)}", "wrong_dim")
        if feat.shape[0] < n:
            raise DataError(self.name, vid, f"id2nframe.json says {self.name2nframe[vid]} frames but the record has "
                            f"{feat.shape[0]}", "corrupt_record")
        if n == 0:
            raise DataError(self.name, vid, "video has no frames", "empty_video")
        out = feat[:n].astype(np.float32)
        if not np.isfinite(out).all():
            raise DataError(self.name, vid, "features contain NaN/inf", "nonfinite_feature")
        return out


class VideoFeatDBWriter:
    """Writes an official video db under ``img_dir`` (context manager): ``put(vid, features [n, D])``.

    ``fp16`` stores float16 (the reader upcasts); default fp32 as the official converter writes."""

    def __init__(self, img_dir: str | os.PathLike, feat_version: str = "resnet_slowfast", frame_interval: float = 1.5,
                 compress: bool = True, fp16: bool = False):
        self.img_dir = Path(img_dir)
        self.compress, self.fp16 = compress, fp16
        self.db_path = self.img_dir / video_db_name(feat_version, frame_interval, compress)
        self._w = LmdbWriter(self.db_path, "VideoFeatDBWriter")
        self.name2nframe: dict[str, int] = {}
        self.vfeat_dim: int | None = None

    def put(self, vid: str, features: np.ndarray) -> None:
        feat = np.asarray(features)
        if feat.ndim != 2 or feat.shape[0] == 0 or not np.issubdtype(feat.dtype, np.floating):
            raise ValueError(f"VideoFeatDBWriter({self.db_path}): video {vid!r} 'features' must be a float "
                             f"[n>0, D] array, got {feat.dtype} {list(feat.shape)}")
        if self.vfeat_dim is None:
            self.vfeat_dim = feat.shape[1]
        elif feat.shape[1] != self.vfeat_dim:
            raise ValueError(f"VideoFeatDBWriter({self.db_path}): video {vid!r} has feature dim {feat.shape[1]}, "
                             f"earlier videos {self.vfeat_dim}")
        feat = feat.astype(np.float16 if self.fp16 else np.float32)
        dump = {"features": feat}
        self._w.put(vid, dumps_npz(dump, compress=True) if self.compress else dumps_msgpack(dump))
        self.name2nframe[vid] = int(feat.shape[0])

    def close(self) -> dict[str, int]:
        self._w.put("__keys__", json.dumps(list(self.name2nframe)).encode("utf-8"))
        self._w.close()
        (self.img_dir / "id2nframe.json").write_text(json.dumps(self.name2nframe))
        return self.name2nframe

    def __enter__(self) -> VideoFeatDBWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------- subtitle db
class SubtitleDB:
    """Reader of an official HERO subtitle db (``SubTokLmdb``).

    ``sub2frames(vid)`` gives the official ``vid_sub2frame[vid]`` (after the ``max_clip_len`` cut: frames past it
    dropped, a subtitle whose frames all fall past it dropped, reading stops after the first cut subtitle),
    ``input_ids(vid)`` the token lists, ``unmatched_frames(vid)`` the frames of no subtitle.
    """

    def __init__(self, db_dir: str | os.PathLike, max_clip_len: int = -1):
        self.db_dir = Path(db_dir)
        self.name = str(self.db_dir)
        if not self.db_dir.is_dir():
            raise DataError(self.name, None, "subtitle db folder does not exist", "missing_db")
        self.meta = read_json(self.db_dir / "meta.json", self.name)
        missing = [k for k in META_KEYS if k not in self.meta]
        if missing:
            raise DataError(str(self.db_dir / "meta.json"), None, f"lacks keys {missing}", "corrupt_db")
        self.cls_, self.eos, self.pad, self.bos = (int(self.meta[k]) for k in ("CLS", "EOS", "PAD", "BOS"))
        self.sep, self.mask = int(self.meta["SEP"]), int(self.meta["MASK"])
        self.v_range = (int(self.meta["v_range"][0]), int(self.meta["v_range"][1]))
        # the model's vocabulary: meta's vocab_size (fastvl dbs), else one past the largest id the meta names
        # (RoBERTa: <mask> 50264 -> 50265)
        self.vocab_size = int(self.meta.get("vocab_size", 0)) or max(
            [self.v_range[1]] + [int(self.meta[k]) + 1 for k in META_KEYS if k != "v_range"])
        self.max_clip_len = max_clip_len
        self.vid2len = {str(k): int(v) for k, v in read_json(self.db_dir / "vid2len.json", self.name).items()}
        self.vid2max_len = read_json(self.db_dir / "vid2max_frame_sub_len.json", self.name)
        self._env = LazyEnv(self.db_dir, "subtitle db")
        self._cache: dict[tuple[str, int | None], tuple] = {}

    def __len__(self) -> int:
        return len(self.vid2len)

    def __contains__(self, vid: str) -> bool:
        return vid in self.vid2len

    @property
    def vids(self) -> list[str]:
        return list(self.vid2len)

    def __getitem__(self, vid: str) -> dict:
        return decode_record(self._env.get(vid), self.name, vid, "video")

    def read(self, vid: str, nframes: int | None = None) -> tuple[list[list[int]], list[tuple[int, list[int]]],
                                                                  list[int]]:
        """(input_ids per subtitle, sub2frames after the cut, unmatched frames), validated.

        ``nframes``: the video's stored frame count (before any cut); a subtitle aligned to a frame >= nframes
        raises :class:`DataError` (reason ``frame_past_video``)."""
        hit = self._cache.get((vid, nframes))
        if hit is not None:
            return hit
        ex = self[vid]
        ids, pairs = ex.get("input_ids"), ex.get("unique_sub2frames")
        if not isinstance(ids, list) or not isinstance(pairs, list):
            raise DataError(self.name, vid, "record needs lists 'input_ids' and 'unique_sub2frames' (has "
                            f"{sorted(ex)})", "corrupt_record")
        try:
            ids = [[int(t) for t in sub] for sub in ids]
            pairs = [(int(s), [int(f) for f in frames]) for s, frames in pairs]
            unmatched = [int(f) for f in ex.get("unmatched_frames") or []]
        except (TypeError, ValueError) as e:
            raise DataError(self.name, vid, f"malformed subtitle record ({e})", "corrupt_record") from e
        seen: set[int] = set()
        for s, frames in pairs:
            if not 0 <= s < len(ids):
                raise DataError(self.name, vid, f"unique_sub2frames names subtitle {s} but there are {len(ids)}",
                                "corrupt_record")
            for f in frames:
                if f < 0 or f in seen:
                    raise DataError(self.name, vid, f"frame {f} of subtitle {s} is negative or in two subtitles",
                                    "corrupt_record")
                seen.add(f)
                if nframes is not None and f >= nframes:
                    raise DataError(self.name, vid, f"subtitle {s} is aligned to frame {f} but the video has "
                                    f"{nframes} frames", "frame_past_video")
        hi = self.vocab_size
        for sub in ids:
            if sub and (min(sub) < 0 or (hi is not None and max(sub) >= hi)):
                raise DataError(self.name, vid, f"token id out of range [0, {hi}): {sub}", "corrupt_record")
        out = (ids, self._cut(pairs), self._cut_unmatched(unmatched))
        self._cache[(vid, nframes)] = out
        return out

    def _cut(self, pairs: list[tuple[int, list[int]]]) -> list[tuple[int, list[int]]]:
        if self.max_clip_len < 0:
            return pairs
        out = []
        for s, frames in pairs:
            keep = [f for f in sorted(frames) if f < self.max_clip_len]
            if keep or not frames:
                out.append((s, keep))
            if len(keep) < len(frames):
                break
        return out

    def _cut_unmatched(self, frames: list[int]) -> list[int]:
        return frames if self.max_clip_len < 0 else [f for f in frames if f < self.max_clip_len]

    def nframes(self, vid: str) -> int:
        n = self.vid2len[vid]
        return n if self.max_clip_len < 0 else min(n, self.max_clip_len)


class SubtitleDBWriter:
    """Writes an official subtitle db (context manager).

    ``put(vid, input_ids, unique_sub2frames, unmatched_frames, nframes, **extra)``; ``meta`` must give
    :data:`META_KEYS`. ``put_pseudo(vid, nframes)`` writes the empty pseudo-subtitles of a video without any."""

    def __init__(self, db_dir: str | os.PathLike, meta: dict):
        self.db_dir = Path(db_dir)
        missing = [k for k in META_KEYS if k not in meta]
        if missing:
            raise ValueError(f"SubtitleDBWriter: 'meta' lacks keys {missing}")
        self.meta = dict(meta)
        self._w = LmdbWriter(self.db_dir, "SubtitleDBWriter")
        self.vid2len: dict[str, int] = {}
        self.vid2max_len: dict[str, int] = {}

    def put(self, vid: str, input_ids: Sequence[Sequence[int]], unique_sub2frames: Sequence[tuple[int, Sequence[int]]],
            unmatched_frames: Sequence[int], nframes: int, **extra) -> None:
        ids = [[int(t) for t in sub] for sub in input_ids]
        pairs = [[int(s), sorted(int(f) for f in frames)] for s, frames in unique_sub2frames]
        for s, frames in pairs:
            if not 0 <= s < len(ids):
                raise ValueError(f"SubtitleDBWriter({self.db_dir}): video {vid!r} maps subtitle {s} of {len(ids)}")
            if frames and frames[-1] >= nframes:
                raise ValueError(f"SubtitleDBWriter({self.db_dir}): video {vid!r} subtitle {s} is aligned to frame "
                                 f"{frames[-1]} but the video has {nframes} frames")
        longest = max((len(ids[s]) + len(f) for s, f in pairs), default=0)
        example = {**extra, "v_id": vid, "input_ids": ids, "unique_sub2frames": pairs,
                   "unmatched_frames": sorted(int(f) for f in unmatched_frames), "duration": int(nframes),
                   "max_mtached_sub_len": longest}
        self._w.put(vid, encode_record(example))
        self.vid2len[vid] = int(nframes)
        self.vid2max_len[vid] = longest

    def put_pseudo(self, vid: str, nframes: int, chunk: int = 5, **extra) -> None:
        """Empty pseudo-subtitles over ``chunk``-frame pieces (the official rule for videos without subtitles)."""
        starts = list(range(0, nframes, chunk))
        pairs = [(k, list(range(s, min(s + chunk, nframes)))) for k, s in enumerate(starts)]
        self.put(vid, [[] for _ in starts], pairs, [], nframes, **extra)

    def close(self) -> None:
        self._w.close()
        (self.db_dir / "meta.json").write_text(json.dumps(self.meta, indent=4))
        (self.db_dir / "vid2len.json").write_text(json.dumps(self.vid2len))
        (self.db_dir / "vid2max_frame_sub_len.json").write_text(json.dumps(self.vid2max_len))

    def __enter__(self) -> SubtitleDBWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
