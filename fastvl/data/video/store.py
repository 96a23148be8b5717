"""LMDB plumbing shared by the HERO dbs: lazily opened read handles (one per file and process) and a writer that
commits in chunks and grows its map. Values are encoded by the callers (msgpack / npz / lz4+msgpack)."""

from __future__ import annotations

import os
from pathlib import Path

from ..lmdb_db import LazyEnv as _BytesEnv
from ..lmdb_db import LmdbWriter as _BytesWriter
from ..lmdb_db import open_env, release_db

__all__ = ["LazyEnv", "LmdbWriter", "open_env", "release"]

#: Close this process's shared read handle of the LMDB at a path (before rewriting it).
release = release_db


class LazyEnv(_BytesEnv):
    """The shared lazily opened read-only LMDB of :mod:`fastvl.data.lmdb_db` with ``str`` keys (HERO dbs key by
    video / query id); picklable, reopened when the db is rewritten on disk."""

    def get(self, key: str) -> bytes | None:  # type: ignore[override]
        return super().get(key.encode("utf-8"))

    def keys(self) -> list[str]:  # type: ignore[override]
        return [k.decode("utf-8") for k in super().keys()]


class LmdbWriter(_BytesWriter):
    """:class:`fastvl.data.lmdb_db.LmdbWriter` with ``str`` keys, a duplicate-key check; refuses an existing LMDB."""

    def __init__(self, path: str | os.PathLike, what: str, commit_every: int = 1000):
        if (Path(path) / "data.mdb").exists():
            raise FileExistsError(f"{what}: {path} already exists; remove it to rewrite")
        super().__init__(Path(path), what, commit_every)
        self.keys: set[str] = set()
        self.what = what

    def put(self, key: str, value: bytes) -> None:  # type: ignore[override]
        if key in self.keys:
            raise ValueError(f"{self.what}({self.path}): duplicate key {key!r}")
        self.keys.add(key)
        super().put(key.encode("utf-8"), value)
