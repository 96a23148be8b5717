"""LMDB plumbing shared by the HERO dbs: lazily opened read handles (one per file and process) and a writer that
commits in chunks and grows its map. Values are encoded by the callers (msgpack / npz / lz4+msgpack)."""

from __future__ import annotations

import os
from pathlib import Path

import lmdb

from ..errors import DataError
from ..lmdb_db import put_all, release_db

__all__ = ["LazyEnv", "LmdbWriter", "open_env", "release"]

_INITIAL_MAP = 1 << 26
_ENVS: dict[str, tuple[int, lmdb.Environment]] = {}


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


def _inode(path: Path) -> int:
    try:
        return os.stat(path / "data.mdb").st_ino
    except OSError:
        return -1


class LazyEnv:
    """A read-only LMDB opened on first use, shared per file in a process (LMDB refuses a second open of one file);
    picklable (DataLoader workers reopen it). A db rewritten on disk (new inode) is reopened."""

    def __init__(self, path: str | os.PathLike, what: str):
        self.path, self.what = Path(path), what
        self.key = os.path.realpath(self.path)

    def _env(self) -> lmdb.Environment:
        ino = _inode(self.path)
        hit = _ENVS.get(self.key)
        if hit is not None and hit[0] == ino:
            return hit[1]
        if hit is not None:
            hit[1].close()
        env = open_env(self.path, self.what)
        _ENVS[self.key] = (ino, env)
        return env

    def get(self, key: str) -> bytes | None:
        try:
            with self._env().begin(buffers=False) as txn:
                return txn.get(key.encode("utf-8"))
        except lmdb.Error as e:
            raise DataError(str(self.path), key, f"LMDB read failed: {e}", "corrupt_record") from e

    def keys(self) -> list[str]:
        with self._env().begin() as txn:
            return [k.decode("utf-8") for k in txn.cursor().iternext(keys=True, values=False)]


def release(path: str | os.PathLike) -> None:
    hit = _ENVS.pop(os.path.realpath(path), None)
    if hit is not None:
        hit[1].close()
    release_db(path)


class LmdbWriter:
    """Puts with a commit every ``commit_every`` records; the map doubles when full. Refuses an existing LMDB."""

    def __init__(self, path: str | os.PathLike, what: str, commit_every: int = 1000):
        self.path, self.commit_every = Path(path), commit_every
        if (self.path / "data.mdb").exists():
            raise FileExistsError(f"{what}: {self.path} already exists; remove it to rewrite")
        release(self.path)
        self.env = open_env(self.path, what, readonly=False)
        self.pending: list[tuple[bytes, bytes]] = []
        self.keys: set[str] = set()
        self.what = what

    def put(self, key: str, value: bytes) -> None:
        if key in self.keys:
            raise ValueError(f"{self.what}({self.path}): duplicate key {key!r}")
        self.keys.add(key)
        self.pending.append((key.encode("utf-8"), value))
        if len(self.pending) >= self.commit_every:
            self.commit()

    def commit(self) -> None:
        put_all(self.env, self.pending)
        self.pending = []

    def close(self) -> None:
        self.commit()
        self.env.sync()
        self.env.close()
