"""Bad-data errors and the skip counter.

Every problem found in a database names the database and the key: a corrupt or truncated record, an image
referenced by text but missing, a feature of the wrong dimension, a non-finite feature, an empty caption. With
``skip_bad_examples`` the example is dropped instead and counted in a :class:`BadExampleCounter` (the trainer
logs ``counter.as_dict()``); the first few skips are also logged as warnings.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

log = logging.getLogger("fastvl.data")

__all__ = ["DataError", "BadExampleCounter"]


class DataError(ValueError):
    """A bad record in a database: ``db`` and ``key`` say where, ``reason`` says what (a short tag)."""

    def __init__(self, db: str, key: str | None, message: str, reason: str = "bad_record"):
        self.db, self.key, self.reason = str(db), key, reason
        where = f"{self.db}" + (f", key {key!r}" if key is not None else "")
        super().__init__(f"{where}: {message}")


class BadExampleCounter:
    """Counts skipped examples by reason (thread-safe; picklable as a plain dict snapshot)."""

    def __init__(self, warn_first: int = 5):
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._warned = 0
        self.warn_first = warn_first

    def skip(self, err: DataError) -> None:
        with self._lock:
            self._counts[err.reason] += 1
            warn = self._warned < self.warn_first
            self._warned += warn
        if warn:
            log.warning("skipping bad example (%s): %s", err.reason, err)

    def skip_or_raise(self, err: DataError, skip: bool) -> None:
        """The bad-example policy: raise ``err`` unless ``skip`` (``--skip-bad-examples``), else count it."""
        if not skip:
            raise err
        self.skip(err)

    def merge(self, counts: dict[str, int]) -> None:
        """Add counts gathered elsewhere (e.g. in a DataLoader worker process)."""
        with self._lock:
            self._counts.update(counts)

    def __getstate__(self) -> dict:
        return {"counts": self.as_dict(), "warned": self._warned, "warn_first": self.warn_first}

    def __setstate__(self, state: dict) -> None:
        self._counts, self._lock = Counter(state["counts"]), threading.Lock()
        self._warned, self.warn_first = state["warned"], state["warn_first"]

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def __repr__(self) -> str:
        return f"BadExampleCounter({self.as_dict()})"
