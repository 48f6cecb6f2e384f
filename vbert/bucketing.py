"""Cutting a batch of variable-length rows into length buckets (no torch).

Padding is paid only inside a bucket. Rows are sorted by length (longest first) and cut into
contiguous runs that minimize the modeled cost
    sum over buckets of (bucket_overhead_tokens + rows_in_bucket * longest_in_bucket)
subject to rows * longest <= max_bucket_tokens (a single row always fits). The overhead term is
what one more forward pass costs, in padded-token equivalents: 0 gives zero padding (one bucket per
distinct length), a large value gives one padded batch. Exact dynamic programming, vectorized per
row with numpy: O(n^2) arithmetic in O(n) numpy calls.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .config import BatchingConfig


def plan_buckets(lengths: Sequence[int], config: BatchingConfig) -> list[list[int]]:
    """Row indices grouped into buckets, longest bucket first; every index appears exactly once."""
    n = len(lengths)
    if n == 0:
        return []
    order = sorted(range(n), key=lambda i: (-lengths[i], i))
    s = np.array([lengths[i] for i in order], dtype=np.int64)   # non-increasing
    best = np.zeros(n + 1, dtype=np.float64)
    cut = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        j = np.arange(i)                     # bucket = sorted rows j..i-1, padded to s[j]
        padded = (i - j) * s[:i]
        cost = best[:i] + config.bucket_overhead_tokens + padded
        cost[(padded > config.max_bucket_tokens) & (j < i - 1)] = np.inf
        k = int(np.argmin(cost))
        best[i], cut[i] = cost[k], k
    buckets, i = [], n
    while i > 0:
        buckets.append(order[cut[i]:i])
        i = int(cut[i])
    return buckets[::-1]


def padding_fraction(lengths: Sequence[int], buckets: list[list[int]]) -> float:
    """Share of computed token positions that are padding under this plan."""
    real = sum(lengths)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in buckets)
    return 0.0 if padded == 0 else 1.0 - real / padded
