"""Token-bucket batching (deterministic, shardable) and task mixing by ratio.

Batching rule (UNITER): shuffle the examples, cut them into buckets of ``bucket_size``, sort each bucket by
length (longest first) and fill a batch in groups of ``size_multiple`` while ``max_len * count`` (padded tokens)
stays within the budget; drop each bucket's last batch in training; shuffle the batches.

Sharding: the GLOBAL batches are built with the budget ``max_tokens * world_size`` from ``(seed, epoch)`` only,
then rank r takes examples ``r::world_size`` of every global batch (lengths are sorted, so ranks get similar
loads). N processes with ``max_tokens`` therefore see exactly the examples one process sees with
``N * max_tokens``: the data order does not depend on the number of processes.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

__all__ = ["TokenBucketSampler", "TaskMixer"]


class TokenBucketSampler:
    """Batches of example indices by token budget.

    Args:
        lens: per-example length (text + regions).
        max_tokens: token budget per rank (padded: ``max_len * count``).
        bucket_size: examples sorted together (8192 official).
        size_multiple: examples are added in groups of this many (8 official).
        drop_last: drop each bucket's last (partial) batch (training).
        shuffle: shuffle examples and batches (False: length order, for evaluation).
        seed: with the epoch, fixes the order.
        rank, world_size: this process's shard.
    """

    def __init__(self, lens: Sequence[int], max_tokens: int, bucket_size: int = 8192, size_multiple: int = 8,
                 drop_last: bool = True, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1):
        if max_tokens <= 0:
            raise ValueError(f"TokenBucketSampler: 'max_tokens' must be positive, got {max_tokens}")
        if bucket_size <= 0 or size_multiple <= 0:
            raise ValueError(f"TokenBucketSampler: 'bucket_size' and 'size_multiple' must be positive, got "
                             f"{bucket_size}, {size_multiple}")
        if not 0 <= rank < world_size:
            raise ValueError(f"TokenBucketSampler: need 0 <= rank < world_size, got rank {rank}, world_size "
                             f"{world_size}")
        self.lens = np.asarray(lens, dtype=np.int64)
        longest = int(self.lens.max()) if len(self.lens) else 0
        budget = max_tokens * world_size
        if longest * min(size_multiple, max(len(self.lens), 1)) > budget:
            raise ValueError(f"TokenBucketSampler: 'max_tokens' {max_tokens} (x world_size {world_size}) cannot hold "
                             f"{size_multiple} examples of the longest length {longest}; raise max_tokens to at least "
                             f"{-(-longest * size_multiple // world_size)} or lower size_multiple")
        self.max_tokens, self.bucket_size, self.size_multiple = max_tokens, bucket_size, size_multiple
        self.drop_last, self.shuffle, self.seed = drop_last, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self._cache: tuple[int, list[list[int]]] | None = None
        self._rank_cache: tuple[int, list[list[int]]] | None = None

    def global_batches(self, epoch: int) -> list[list[int]]:
        """Every rank's examples of every batch of ``epoch`` (same for any world_size with the same global budget)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        n = len(self.lens)
        rng = np.random.default_rng([self.seed, epoch, 0x5EED])
        ids = rng.permutation(n) if self.shuffle else np.arange(n)
        budget = self.max_tokens * self.world_size
        batches: list[list[int]] = []
        for start in range(0, n, self.bucket_size):
            bucket = ids[start:start + self.bucket_size]
            bucket = bucket[np.argsort(-self.lens[bucket], kind="stable")].tolist()
            cur: list[int] = []
            max_len = 0
            for g in range(0, len(bucket), self.size_multiple):
                group = bucket[g:g + self.size_multiple]
                new_max = max(max_len, int(self.lens[group].max()))
                if cur and new_max * (len(cur) + len(group)) > budget:
                    batches.append(cur)
                    cur, max_len = list(group), int(self.lens[group].max())
                else:
                    cur.extend(group)
                    max_len = new_max
            if cur and not self.drop_last:
                batches.append(cur)
        if self.drop_last:  # every rank needs at least one example
            batches = [b for b in batches if len(b) >= self.world_size]
        if self.shuffle:
            order = rng.permutation(len(batches))
            batches = [batches[i] for i in order]
        self._cache = (epoch, batches)
        return batches

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's share of every global batch of ``epoch`` (may be empty for tiny evaluation batches)."""
        if self._rank_cache is None or self._rank_cache[0] != epoch:
            self._rank_cache = (epoch, [b[self.rank::self.world_size] for b in self.global_batches(epoch)])
        return self._rank_cache[1]

    def num_batches(self, epoch: int = 0) -> int:
        return len(self.global_batches(epoch))


class TaskMixer:
    """One task per gradient-accumulation cycle, drawn by ratio from ``seed`` (same rule as the trainer: a
    ``random.Random(seed)`` choice over the sorted task names); identical on every rank without communication."""

    def __init__(self, ratios: dict[str, float], seed: int = 0):
        ratios = {k: float(v) for k, v in ratios.items() if v > 0}
        if not ratios or any(v < 0 for v in ratios.values()):
            raise ValueError(f"TaskMixer: 'ratios' must give non-negative ratios with a positive sum, got {ratios}")
        self.names = sorted(ratios)
        self.weights = [ratios[n] for n in self.names]
        self.rng = random.Random(seed)

    def next(self) -> str:
        return self.rng.choices(self.names, weights=self.weights)[0]

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
