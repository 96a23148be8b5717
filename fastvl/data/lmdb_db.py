"""The official UNITER feature and text databases (LMDB), read and written.

img_db (``img_dir``): an LMDB folder named ``feat_th{conf_th}_max{max_bb}_min{min_bb}`` (``_compressed`` when
values are ``np.savez_compressed`` bytes, else msgpack-numpy dicts; ``all[_compressed]`` with every region
kept) beside ``nbb_th{conf_th}_max{max_bb}_min{min_bb}.json`` (name -> region count). Key = npz file name,
value = dict of arrays ``features`` [n, D] fp16, ``norm_bb`` [n, 6], ``conf`` [n], ``soft_labels`` [n, C]
(background at 0); key ``__keys__`` = JSON list of names. Float32 arrays are stored as fp16, loaded as fp32.
nbb = clip(#(conf > conf_th), min_bb, max_bb); the writer keeps the first nbb rows (rows sorted by confidence).

txt_db (``db_dir``): LMDB values ``lz4.frame(msgpack(example))`` with ``input_ids`` (no [CLS]/[SEP]) and
``img_fname``; side files ``meta.json`` (CLS, SEP, MASK, UNK, v_range, tokenizer), ``id2len.json``,
``txt2img.json``, ``img2txts.json``.

Readers open their LMDB lazily per process (safe in DataLoader workers) and raise :class:`DataError` naming the
database and key for any bad record.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import lmdb
import lz4.frame
import msgpack
import msgpack_numpy
import numpy as np

from .errors import DataError

__all__ = [
    "compute_nbb", "img_db_name", "nbb_file_name", "dumps_msgpack", "loads_msgpack", "dumps_npz", "loads_npz",
    "ImageRecord", "ImageDB", "ImageDBWriter", "TxtDB", "TxtDBWriter", "position_features", "put_all", "release_db",
    "open_env", "shared_env", "LazyEnv", "LmdbWriter",
]

KEYS_KEY = b"__keys__"
_DB_NAME = re.compile(r"feat_th([0-9.eE+-]+)_max(\d+)_min(\d+)(?:_compressed)?")
_INITIAL_MAP = 1 << 28  # bytes; writers grow the map when it fills


# ----------------------------------------------------------------------------------------------- encodings
def dumps_msgpack(obj) -> bytes:
    """msgpack with numpy arrays encoded as msgpack-numpy does (the official, patched encoding)."""
    return msgpack.packb(obj, default=msgpack_numpy.encode, use_bin_type=True)


def loads_msgpack(data: bytes):
    return msgpack.unpackb(data, object_hook=msgpack_numpy.decode, raw=False)


def dumps_npz(dump: dict[str, np.ndarray], compress: bool = True) -> bytes:
    with io.BytesIO() as buf:
        (np.savez_compressed if compress else np.savez)(buf, **dump)
        return buf.getvalue()


def loads_npz(data: bytes, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """The arrays of npz bytes (only ``keys`` when given: members not asked for are not decompressed)."""
    with io.BytesIO(bytes(data)) as buf, np.load(buf, allow_pickle=False) as z:
        names = z.files if keys is None else [k for k in keys if k in z.files]
        return {k: z[k] for k in names}


def _loads_image_value(data: bytes, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """An img_db value in either official encoding (npz bytes start with the zip magic)."""
    out = loads_npz(data, keys) if bytes(data[:2]) == b"PK" else loads_msgpack(data)
    if not isinstance(out, dict):
        raise TypeError(f"expected a dict of arrays, got {type(out).__name__}")
    return out


def compute_nbb(conf: np.ndarray, conf_th: float, min_bb: int, max_bb: int) -> int:
    """clip(#(conf > conf_th), min_bb, max_bb) (the official region count)."""
    return int(min(max_bb, max(min_bb, int((np.asarray(conf) > conf_th).sum()))))


def img_db_name(conf_th: float = 0.2, max_bb: int = 100, min_bb: int = 10, num_bb: int = 36, compress: bool = True,
                keep_all: bool = False) -> str:
    if keep_all:
        name = "all"
    elif conf_th == -1:
        name = f"feat_numbb{num_bb}"
    else:
        name = f"feat_th{conf_th}_max{max_bb}_min{min_bb}"
    return name + ("_compressed" if compress else "")


def nbb_file_name(conf_th: float = 0.2, max_bb: int = 100, min_bb: int = 10) -> str:
    return f"nbb_th{conf_th}_max{max_bb}_min{min_bb}.json"


def position_features(norm_bb: np.ndarray) -> np.ndarray:
    """norm_bb [n, 6] (x1, y1, x2, y2, w, h; normalised) -> the 7-d box feature [n, 7] = norm_bb ++ w*h."""
    return np.concatenate([norm_bb, norm_bb[:, 4:5] * norm_bb[:, 5:6]], axis=1)


def open_env(path: Path, what: str, readonly: bool = True) -> lmdb.Environment:
    """Open the LMDB at ``path``; a missing or unreadable one raises :class:`DataError` naming it."""
    if readonly and not (path / "data.mdb").is_file():
        raise DataError(str(path), None, f"no LMDB here (missing data.mdb); is this a {what}?", "missing_db")
    try:
        if readonly:
            return lmdb.open(str(path), readonly=True, create=False, lock=False, readahead=False, max_readers=512)
        path.mkdir(parents=True, exist_ok=True)
        return lmdb.open(str(path), map_size=_INITIAL_MAP, readonly=False, create=True)
    except lmdb.Error as e:
        raise DataError(str(path), None, f"cannot open {what} LMDB: {e}", "corrupt_db") from e


_ENVS: dict[str, tuple[int, lmdb.Environment]] = {}


def shared_env(path: Path, what: str) -> lmdb.Environment:
    """One read-only environment per LMDB file and process tree (LMDB refuses a second open of the same file in
    one process; forked DataLoader workers keep using the parent's read-only handle, as the official loaders do).
    A db rewritten on disk (new inode) gets a fresh handle."""
    key = os.path.realpath(path)
    try:
        ino = os.stat(Path(key) / "data.mdb").st_ino
    except OSError:
        ino = -1
    hit = _ENVS.get(key)
    if hit is not None and hit[0] == ino:
        return hit[1]
    if hit is not None:
        hit[1].close()
        del _ENVS[key]
    env = open_env(path, what)
    _ENVS[key] = (ino, env)
    return env


def release_db(path: str | os.PathLike) -> None:
    """Close this process's shared read handle of the LMDB at ``path`` (before rewriting it in place)."""
    hit = _ENVS.pop(os.path.realpath(path), None)
    if hit is not None:
        hit[1].close()


class LazyEnv:
    """A read-only LMDB environment opened on first use (shared per file, see :func:`shared_env`)."""

    def __init__(self, path: str | os.PathLike, what: str):
        self.path, self.what = Path(path), what
        self.key = os.path.realpath(self.path)
        self._handle: lmdb.Environment | None = None

    def _env(self) -> lmdb.Environment:
        hit = _ENVS.get(self.key)
        if hit is None or hit[1] is not self._handle:
            self._handle = shared_env(self.path, self.what)
        return self._handle

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handle": None}

    def get(self, key: bytes) -> bytes | None:
        env = self._env()
        try:
            with env.begin(buffers=False) as txn:
                return txn.get(key)
        except lmdb.Error as e:
            raise DataError(str(self.path), key.decode("utf-8", "replace"), f"LMDB read failed: {e}",
                            "corrupt_record") from e

    def keys(self) -> list[bytes]:
        with self._env().begin() as txn:
            return [k for k in txn.cursor().iternext(keys=True, values=False)]


def put_all(env: lmdb.Environment, items: list[tuple[bytes, bytes]]) -> None:
    """Write ``items`` (key, value) in one transaction; when the map is full it doubles and the whole transaction is
    replayed, so nothing is lost or half-written."""
    while True:
        try:
            with env.begin(write=True) as txn:
                for k, v in items:
                    txn.put(k, v)
            return
        except lmdb.MapFullError:
            env.set_mapsize(env.info()["map_size"] * 2)


class LmdbWriter:
    """LMDB puts with periodic commits; the map grows when full (pending puts are replayed)."""

    def __init__(self, path: Path, what: str, commit_every: int = 1000):
        self.path, self.commit_every = Path(path), commit_every
        release_db(self.path)
        self.env = open_env(self.path, what, readonly=False)
        self.pending: list[tuple[bytes, bytes]] = []

    def put(self, key: bytes, value: bytes) -> None:
        self.pending.append((key, value))
        if len(self.pending) >= self.commit_every:
            self.commit()

    def commit(self) -> None:
        put_all(self.env, self.pending)
        self.pending = []

    def close(self) -> None:
        self.commit()
        self.env.sync()
        self.env.close()


# ----------------------------------------------------------------------------------------------- img_db
class ImageRecord:
    """One image's regions as fp32 arrays: feat [n, D], norm_bb [n, 6], pos [n, 7], soft_labels [n, C] or None."""

    __slots__ = ("name", "feat", "norm_bb", "soft_labels")

    def __init__(self, name: str, feat: np.ndarray, norm_bb: np.ndarray, soft_labels: np.ndarray | None):
        self.name, self.feat, self.norm_bb, self.soft_labels = name, feat, norm_bb, soft_labels

    @property
    def nbb(self) -> int:
        return self.feat.shape[0]

    @property
    def pos(self) -> np.ndarray:
        return position_features(self.norm_bb)


class ImageDB:
    """Reader of an official img_db folder.

    Args:
        img_dir: the folder holding ``feat_th…`` / ``all…`` LMDBs and the nbb json (as the official
            ``DetectFeatLmdb``), or an LMDB folder itself (nbb then computed from ``conf``).
        conf_th, max_bb, min_bb, num_bb: the region-count rule (``conf_th=-1``: a fixed ``num_bb``). All three
            None: taken from the name of the one ``feat_th…`` LMDB in ``img_dir`` (else the official 0.2, 100, 10).
        compress: which of the ``…_compressed`` / plain LMDBs to open; None takes whichever exists (values are
            decoded by their content either way).
        img_dim: expected feature dimension; None takes it from the first image.
    """

    def __init__(self, img_dir: str | os.PathLike, conf_th: float | None = None, max_bb: int | None = None,
                 min_bb: int | None = None, num_bb: int = 36, compress: bool | None = None, img_dim: int | None = None):
        self.img_dir = Path(img_dir)
        if not self.img_dir.is_dir():
            raise DataError(str(self.img_dir), None, "img_db folder does not exist", "missing_db")
        if conf_th is None and max_bb is None and min_bb is None:
            conf_th, max_bb, min_bb = self._detect_params()
        self.conf_th = 0.2 if conf_th is None else conf_th
        self.max_bb = 100 if max_bb is None else max_bb
        self.min_bb = 10 if min_bb is None else min_bb
        self.num_bb = num_bb
        conf_th = self.conf_th
        self.db_path, nbb_json = self._locate(compress)
        self.name = str(self.db_path)
        self._env = LazyEnv(self.db_path, "img_db")
        raw = self._env.get(KEYS_KEY)
        if raw is not None:
            try:
                self.keys: list[str] = json.loads(bytes(raw).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise DataError(self.name, "__keys__", f"is not a JSON list of names: {e}", "corrupt_record") from e
        else:
            self.keys = [k.decode("utf-8") for k in self._env.keys() if k != KEYS_KEY]
        if conf_th == -1:
            self.name2nbb = {k: num_bb for k in self.keys}
        elif nbb_json is not None:
            try:
                self.name2nbb = {k: int(v) for k, v in json.loads(nbb_json.read_text()).items()}
            except (ValueError, AttributeError) as e:
                raise DataError(str(nbb_json), None, f"is not a JSON dict name -> count: {e}", "corrupt_db") from e
        else:
            self.name2nbb = self._compute_nbb()
        self._img_dim = img_dim
        self._label_dim: int | None = None

    def _detect_params(self) -> tuple[float | None, int | None, int | None]:
        found = set()
        for p in self.img_dir.iterdir():
            m = _DB_NAME.fullmatch(p.name)
            if m and (p / "data.mdb").is_file():
                th = m.group(1)
                found.add((float(th) if any(c in th for c in ".eE") else int(th), int(m.group(2)), int(m.group(3))))
        if len(found) > 1:
            raise DataError(str(self.img_dir), None, f"holds several img_db LMDBs {sorted(found)}; pass conf_th, "
                            "max_bb and min_bb to pick one", "ambiguous_db")
        return found.pop() if found else (None, None, None)

    def _locate(self, compress: bool | None) -> tuple[Path, Path | None]:
        if (self.img_dir / "data.mdb").is_file():
            return self.img_dir, None
        nbb = self.img_dir / nbb_file_name(self.conf_th, self.max_bb, self.min_bb)
        tried = []
        for comp in ([True, False] if compress is None else [compress]):
            name = img_db_name(self.conf_th, self.max_bb, self.min_bb, self.num_bb, comp)
            tried.append(name)
            if (self.img_dir / name / "data.mdb").is_file():
                return self.img_dir / name, (nbb if nbb.is_file() and self.conf_th != -1 else None)
        for comp in ([True, False] if compress is None else [compress]):
            name = img_db_name(compress=comp, keep_all=True)
            tried.append(name)
            if (self.img_dir / name / "data.mdb").is_file():
                return self.img_dir / name, None
        present = sorted(p.name for p in self.img_dir.iterdir())
        raise DataError(str(self.img_dir), None, f"no img_db LMDB for conf_th={self.conf_th}, max_bb={self.max_bb}, "
                        f"min_bb={self.min_bb}: looked for {tried}, found {present}", "missing_db")

    def _compute_nbb(self) -> dict[str, int]:
        out = {}
        for k in self.keys:
            conf = self.get_raw(k, ("conf",)).get("conf")
            if conf is None:
                raise DataError(self.name, k, "has no 'conf' array, needed to count regions", "corrupt_record")
            out[k] = compute_nbb(conf, self.conf_th, self.min_bb, self.max_bb)
        return out

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, name: str) -> bool:
        return name in self.name2nbb

    # -------------------------------------------------------------------------------------------- reading
    def get_raw(self, name: str, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """The stored arrays of ``name`` exactly as written (fp16 stays fp16, no region cut); ``keys`` limits the
        arrays decoded from compressed values (a hint: others may be returned too)."""
        data = self._env.get(name.encode("utf-8"))
        if data is None:
            raise DataError(self.name, name, "image is not in the img_db", "missing_image")
        try:
            return _loads_image_value(data, keys)
        except Exception as e:  # noqa: BLE001  (any decode failure is a corrupt record)
            raise DataError(self.name, name, f"corrupt or truncated record ({type(e).__name__}: {e})",
                            "corrupt_record") from e

    def get_dump(self, name: str) -> dict[str, np.ndarray]:
        """Every array of ``name`` cut to its nbb regions, float16 converted to float32 (as official)."""
        if name not in self.name2nbb:
            raise DataError(self.name, name, "image is not in the img_db", "missing_image")
        nbb = self.name2nbb[name]
        return {k: (a.astype(np.float32) if a.dtype == np.float16 else a)[:nbb] if a.ndim else a
                for k, a in self.get_raw(name).items()}

    @property
    def img_dim(self) -> int:
        if self._img_dim is None:
            if not self.keys:
                raise DataError(self.name, None, "img_db is empty", "missing_image")
            self._img_dim = int(np.shape(self.get_raw(self.keys[0]).get("features", np.zeros((0, 0))))[-1])
        return self._img_dim

    @property
    def label_dim(self) -> int | None:
        """Width of ``soft_labels`` (classes incl. background), from the first image; None if it has none."""
        if self._label_dim is None and self.keys:
            soft = self.get_raw(self.keys[0]).get("soft_labels")
            self._label_dim = None if soft is None else int(soft.shape[-1])
        return self._label_dim

    def get(self, name: str, soft_labels: bool = False) -> ImageRecord:
        """Validated fp32 regions of ``name`` (features, boxes and, if asked, soft labels), cut to nbb."""
        dump = self.get_raw(name, ("features", "norm_bb", "soft_labels") if soft_labels else ("features", "norm_bb"))
        nbb = self.name2nbb.get(name)
        if nbb is None:
            raise DataError(self.name, name, "image has no region count (not in __keys__ / nbb json)",
                            "missing_image")
        feat, bb = dump.get("features"), dump.get("norm_bb")
        if feat is None or bb is None:
            raise DataError(self.name, name, f"record lacks 'features' or 'norm_bb' (has {sorted(dump)})",
                            "corrupt_record")
        if feat.ndim != 2 or feat.shape[1] != self.img_dim:
            raise DataError(self.name, name, f"features must be [n, {self.img_dim}] (img_dim), got "
                            f"{list(feat.shape)}", "wrong_dim")
        nbb = min(nbb, feat.shape[0])
        if nbb == 0:
            raise DataError(self.name, name, "image has no regions", "empty_image")
        if bb.ndim != 2 or bb.shape[1] != 6 or bb.shape[0] < nbb:
            raise DataError(self.name, name, f"norm_bb must be [n>={nbb}, 6], got {list(bb.shape)}", "wrong_dim")
        feat = feat[:nbb].astype(np.float32)
        bb = bb[:nbb].astype(np.float32)
        if not (np.isfinite(feat).all() and np.isfinite(bb).all()):
            raise DataError(self.name, name, "features or boxes contain NaN/inf", "nonfinite_feature")
        soft = None
        if soft_labels:
            soft = dump.get("soft_labels")
            if soft is None:
                raise DataError(self.name, name, "record has no 'soft_labels' (needed by region classification)",
                                "corrupt_record")
            want = self.label_dim
            if soft.ndim != 2 or soft.shape[0] < nbb or soft.shape[1] != want:
                raise DataError(self.name, name, f"soft_labels must be [n>={nbb}, {want}], got {list(soft.shape)}",
                                "wrong_dim")
            soft = soft[:nbb].astype(np.float32)
            if not np.isfinite(soft).all():
                raise DataError(self.name, name, "soft_labels contain NaN/inf", "nonfinite_feature")
        return ImageRecord(name, feat, bb, soft)


class ImageDBWriter:
    """Writes an official img_db under ``img_dir`` (context manager). ``put(name, dump)`` takes a dict of
    1-D / 2-D arrays with rows sorted by confidence (``features`` [n, D], ``norm_bb`` [n, 6], ``conf`` [n],
    ``soft_labels`` [n, C]); float32 arrays are stored as fp16; unless ``keep_all``, only the first nbb rows."""

    def __init__(self, img_dir: str | os.PathLike, conf_th: float = 0.2, max_bb: int = 100, min_bb: int = 10,
                 num_bb: int = 36, compress: bool = True, keep_all: bool = False):
        self.img_dir = Path(img_dir)
        self.conf_th, self.max_bb, self.min_bb, self.num_bb = conf_th, max_bb, min_bb, num_bb
        self.compress, self.keep_all = compress, keep_all
        self.db_path = self.img_dir / img_db_name(conf_th, max_bb, min_bb, num_bb, compress, keep_all)
        if (self.db_path / "data.mdb").exists():
            raise FileExistsError(f"ImageDBWriter: {self.db_path} already exists; remove it to rewrite")
        self._w = LmdbWriter(self.db_path, "img_db")
        self.name2nbb: dict[str, int] = {}

    def nbb_of(self, dump: dict[str, np.ndarray]) -> int:
        n = int(np.shape(dump["features"])[0])
        if self.keep_all:
            return n
        if self.conf_th == -1:
            return min(self.num_bb, n)
        return compute_nbb(dump["conf"], self.conf_th, self.min_bb, self.max_bb)

    def put(self, name: str, dump: dict[str, np.ndarray]) -> int:
        """Store one image; returns its nbb. Raises ValueError for a dump that is not 1-D/2-D arrays."""
        if name == KEYS_KEY.decode() or name in self.name2nbb:
            raise ValueError(f"ImageDBWriter({self.db_path}): duplicate or reserved image name {name!r}")
        for k in ("features", "norm_bb") + (() if self.keep_all or self.conf_th == -1 else ("conf",)):
            if k not in dump:
                raise ValueError(f"ImageDBWriter({self.db_path}): image {name!r} lacks array '{k}' "
                                 f"(has {sorted(dump)})")
        nbb = self.nbb_of(dump)
        cut = None if self.keep_all else nbb
        out = {}
        for k, arr in dump.items():
            arr = np.asarray(arr)
            if arr.dtype == np.float32:
                arr = arr.astype(np.float16)
            if arr.ndim not in (0, 1, 2):
                raise ValueError(f"ImageDBWriter({self.db_path}): image {name!r} array '{k}' must be 1-D or 2-D, got "
                                 f"shape {list(arr.shape)}")
            out[k] = arr[:cut] if arr.ndim else arr
        value = dumps_npz(out, compress=True) if self.compress else dumps_msgpack(out)
        self._w.put(name.encode("utf-8"), value)
        self.name2nbb[name] = int(min(nbb, np.shape(dump["features"])[0]))
        return self.name2nbb[name]

    def close(self) -> dict[str, int]:
        self._w.put(KEYS_KEY, json.dumps(list(self.name2nbb)).encode("utf-8"))
        self._w.close()
        if not self.keep_all and self.conf_th != -1:
            path = self.img_dir / nbb_file_name(self.conf_th, self.max_bb, self.min_bb)
            path.write_text(json.dumps(self.name2nbb))
        return self.name2nbb

    def __enter__(self) -> ImageDBWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------- txt_db
class TxtDB:
    """Reader of an official txt_db folder; examples longer than ``max_txt_len`` tokens are dropped (-1 keeps all)."""

    def __init__(self, db_dir: str | os.PathLike, max_txt_len: int = 60):
        self.db_dir = Path(db_dir)
        self.name = str(self.db_dir)
        if not self.db_dir.is_dir():
            raise DataError(self.name, None, "txt_db folder does not exist", "missing_db")
        self.meta = self._json("meta.json")
        for k in ("CLS", "SEP", "MASK", "v_range"):
            if k not in self.meta:
                raise DataError(str(self.db_dir / "meta.json"), None, f"lacks key '{k}'", "corrupt_db")
        self.cls, self.sep, self.mask = int(self.meta["CLS"]), int(self.meta["SEP"]), int(self.meta["MASK"])
        self.unk = int(self.meta.get("UNK", 100))
        self.v_range = (int(self.meta["v_range"][0]), int(self.meta["v_range"][1]))
        id2len = {str(k): int(v) for k, v in self._json("id2len.json").items()}
        self.all_ids = list(id2len)
        self.id2len = id2len if max_txt_len == -1 else {k: v for k, v in id2len.items() if v <= max_txt_len}
        self.ids = list(self.id2len)
        self.txt2img: dict[str, str] = self._json("txt2img.json")
        self._env = LazyEnv(self.db_dir, "txt_db")

    def _json(self, name: str):
        path = self.db_dir / name
        if not path.is_file():
            raise DataError(self.name, None, f"missing side file {name}", "missing_db")
        try:
            return json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(str(path), None, f"is not valid JSON: {e}", "corrupt_db") from e

    @property
    def img2txts(self) -> dict[str, list[str]]:
        return self._json("img2txts.json")

    @property
    def vocab_size(self) -> int:
        return self.v_range[1]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, id_: str) -> dict:
        data = self._env.get(str(id_).encode("utf-8"))
        if data is None:
            raise DataError(self.name, id_, "text example is not in the txt_db", "missing_record")
        try:
            example = loads_msgpack(lz4.frame.decompress(data))
        except Exception as e:  # noqa: BLE001  (any decode failure is a corrupt record)
            raise DataError(self.name, id_, f"corrupt or truncated record ({type(e).__name__}: {e})",
                            "corrupt_record") from e
        if not isinstance(example, dict):
            raise DataError(self.name, id_, f"record is a {type(example).__name__}, expected a dict",
                            "corrupt_record")
        return example

    def input_ids(self, id_: str) -> list[int]:
        """The validated token ids of example ``id_`` (without [CLS]/[SEP])."""
        ids = self[id_].get("input_ids")
        if ids is None:
            raise DataError(self.name, id_, "record has no 'input_ids'", "corrupt_record")
        ids = [int(t) for t in ids]
        if not ids:
            raise DataError(self.name, id_, "empty caption (no tokens)", "empty_caption")
        lo = min(ids)
        hi = max(ids)
        if lo < 0 or hi >= self.vocab_size:
            raise DataError(self.name, id_, f"token id out of range [0, {self.vocab_size}): min {lo}, max {hi}",
                            "corrupt_record")
        return ids


class TxtDBWriter:
    """Writes an official txt_db (context manager). ``put(id, example)`` needs ``input_ids`` and ``img_fname``;
    ``meta`` must give CLS, SEP, MASK, UNK, v_range and tokenizer."""

    def __init__(self, db_dir: str | os.PathLike, meta: dict):
        self.db_dir = Path(db_dir)
        missing = [k for k in ("CLS", "SEP", "MASK", "UNK", "v_range", "tokenizer") if k not in meta]
        if missing:
            raise ValueError(f"TxtDBWriter: 'meta' lacks keys {missing}")
        if (self.db_dir / "data.mdb").exists():
            raise FileExistsError(f"TxtDBWriter: {self.db_dir} already exists; remove it to rewrite")
        self.meta = dict(meta)
        self._w = LmdbWriter(self.db_dir, "txt_db")
        self.id2len: dict[str, int] = {}
        self.txt2img: dict[str, str] = {}
        self.img2txts: dict[str, list[str]] = {}

    def put(self, id_: str, example: dict) -> None:
        id_ = str(id_)
        if id_ in self.id2len:
            raise ValueError(f"TxtDBWriter({self.db_dir}): duplicate example id {id_!r}")
        if "input_ids" not in example or "img_fname" not in example:
            raise ValueError(f"TxtDBWriter({self.db_dir}): example {id_!r} needs 'input_ids' and 'img_fname'")
        self._w.put(id_.encode("utf-8"), lz4.frame.compress(dumps_msgpack(example)))
        self.id2len[id_] = len(example["input_ids"])
        img = example["img_fname"]
        self.txt2img[id_] = img
        if isinstance(img, str):
            self.img2txts.setdefault(img, []).append(id_)

    def close(self) -> None:
        self._w.close()
        for name, obj in (("meta", self.meta), ("id2len", self.id2len), ("txt2img", self.txt2img),
                          ("img2txts", self.img2txts)):
            (self.db_dir / f"{name}.json").write_text(json.dumps(obj, indent=4 if name == "meta" else None))

    def __enter__(self) -> TxtDBWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_img_db(img_dir: str | os.PathLike, items: Iterable[tuple[str, dict[str, np.ndarray]]],
                 **params) -> dict[str, int]:
    """Write ``(name, dump)`` pairs as an img_db (``params`` as :class:`ImageDBWriter`); returns name -> nbb."""
    with ImageDBWriter(img_dir, **params) as w:
        for name, dump in items:
            w.put(name, dump)
    return w.name2nbb
