"""Token-bucket batching: the budget rule, determinism, sharding invariance, and task mixing."""

import collections

import numpy as np
import pytest

from fastvl.data import TaskMixer, TokenBucketSampler


def _lens(seed, n=997):
    return np.random.default_rng(seed).integers(5, 70, n).tolist()


@pytest.mark.parametrize("drop_last", [True, False])
def test_budget_rule_and_coverage(seed, drop_last):
    lens = _lens(seed)
    s = TokenBucketSampler(lens, max_tokens=900, bucket_size=128, size_multiple=8, drop_last=drop_last, seed=seed)
    batches = s.global_batches(0)
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat))
    for b in batches:
        assert max(lens[i] for i in b) * len(b) <= 900
    n_buckets = -(-len(lens) // 128)
    if drop_last:  # one (the last) batch per bucket dropped
        assert len(lens) - len(flat) > 0
        full = TokenBucketSampler(lens, 900, 128, 8, drop_last=False, seed=seed).global_batches(0)
        assert len(full) - len(batches) == n_buckets
    else:
        assert sorted(flat) == list(range(len(lens)))
    # groups of size_multiple: every batch but a bucket's tail is a multiple of 8
    assert sum(len(b) % 8 != 0 for b in batches) <= n_buckets


def test_deterministic_per_seed_and_epoch(seed):
    lens = _lens(seed)
    a = TokenBucketSampler(lens, 1000, seed=seed).global_batches(3)
    assert a == TokenBucketSampler(lens, 1000, seed=seed).global_batches(3)
    assert a != TokenBucketSampler(lens, 1000, seed=seed).global_batches(4)
    assert a != TokenBucketSampler(lens, 1000, seed=seed + 1).global_batches(3)
    ordered = TokenBucketSampler(lens, 1000, shuffle=False, drop_last=False).global_batches(0)
    assert [i for b in ordered for i in b] == sorted(range(len(lens)), key=lambda i: -lens[i])


@pytest.mark.parametrize("world", [2, 3])
def test_shards_split_the_global_batches(seed, world):
    """N ranks with max_tokens each see exactly what one process sees with N * max_tokens."""
    lens = _lens(seed)
    single = TokenBucketSampler(lens, 600 * world, seed=seed).batches(1)
    shards = [TokenBucketSampler(lens, 600, seed=seed, rank=r, world_size=world).batches(1) for r in range(world)]
    assert all(len(s) == len(single) for s in shards)
    for k, b in enumerate(single):
        parts = [s[k] for s in shards]
        assert all(parts)  # every rank gets examples
        assert sorted(i for p in parts for i in p) == sorted(b)
        assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


def test_errors():
    with pytest.raises(ValueError, match="max_tokens"):
        TokenBucketSampler([10, 20], 0)
    with pytest.raises(ValueError, match="raise max_tokens to at least 160"):
        TokenBucketSampler([10, 20] * 8, 100, size_multiple=8)
    with pytest.raises(ValueError, match="rank"):
        TokenBucketSampler([10], 100, rank=2, world_size=2)


def test_task_mixer_ratio_and_state(seed):
    ratios = {"itm": 3, "mlm": 4, "mrfr": 2, "mrc-kl": 2, "off": 0}
    mix = TaskMixer(ratios, seed=seed)
    draws = [mix.next() for _ in range(4000)]
    counts = collections.Counter(draws)
    assert "off" not in counts
    for t in ("itm", "mlm", "mrfr", "mrc-kl"):
        assert abs(counts[t] / 4000 - ratios[t] / 11) < 0.04
    again = TaskMixer(ratios, seed=seed)
    assert [again.next() for _ in range(4000)] == draws
    state = mix.state_dict()
    nxt = [mix.next() for _ in range(20)]
    resumed = TaskMixer(ratios, seed=0)
    resumed.load_state_dict(state)
    assert [resumed.next() for _ in range(20)] == nxt
    with pytest.raises(ValueError, match="ratios"):
        TaskMixer({"mlm": 0})
