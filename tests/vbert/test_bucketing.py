import random

import pytest

from vbert.bucketing import padding_fraction, plan_buckets
from vbert.config import BatchingConfig


def cost(lengths, buckets, cfg):
    return sum(cfg.bucket_overhead_tokens + len(b) * max(lengths[i] for i in b) for b in buckets)


def brute_force_best(lengths, cfg):
    """Every way to cut the sorted rows into contiguous runs (small n only)."""
    s = sorted(lengths, reverse=True)
    n, best = len(s), float("inf")
    for mask in range(1 << (n - 1)):
        cuts = [0] + [i + 1 for i in range(n - 1) if mask >> i & 1] + [n]
        total, ok = 0, True
        for a, b in zip(cuts, cuts[1:]):
            if (b - a) * s[a] > cfg.max_bucket_tokens and b - a > 1:
                ok = False
            total += cfg.bucket_overhead_tokens + (b - a) * s[a]
        if ok:
            best = min(best, total)
    return best


@pytest.mark.parametrize("seed", range(8))
def test_plan_is_a_partition_and_optimal(seed):
    rng = random.Random(seed)
    lengths = [rng.randrange(1, 300) for _ in range(rng.randrange(1, 11))]
    cfg = BatchingConfig(bucket_overhead_tokens=rng.choice([0, 50, 500]), max_bucket_tokens=rng.choice([300, 4096]))
    buckets = plan_buckets(lengths, cfg)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    for b in buckets:
        assert len(b) * max(lengths[i] for i in b) <= cfg.max_bucket_tokens or len(b) == 1
    assert cost(lengths, buckets, cfg) == brute_force_best(lengths, cfg)


def test_extremes_of_the_overhead():
    lengths = [5, 9, 5, 30, 9, 9]
    assert padding_fraction(lengths, plan_buckets(lengths, BatchingConfig(bucket_overhead_tokens=0))) == 0.0
    assert len(plan_buckets(lengths, BatchingConfig(bucket_overhead_tokens=10**6))) == 1
    assert plan_buckets([128] * 32, BatchingConfig()) == [list(range(32))]


def test_buckets_save_padding_against_one_padded_batch():
    lengths = [8] * 30 + [120] * 2
    one = [list(range(len(lengths)))]
    planned = plan_buckets(lengths, BatchingConfig())
    assert padding_fraction(lengths, planned) == 0.0 < 0.5 < padding_fraction(lengths, one)
