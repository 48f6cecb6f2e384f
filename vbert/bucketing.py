"""Cutting a batch of variable-length rows into length buckets (pure Python, no torch).

Padding is paid only inside a bucket: rows are sorted by length (longest first) and a bucket is
closed when the next row would waste more than `max_padding_fraction` of a padded row, or when the
bucket's padded size would pass `max_bucket_tokens`. A bucket smaller than `min_bucket_rows` is
never closed before it holds `min_bucket_rows` rows (tiny matmuls cost more per token than a
little padding).
"""
from __future__ import annotations

from typing import Sequence

from .config import BatchingConfig


def plan_buckets(lengths: Sequence[int], config: BatchingConfig) -> list[list[int]]:
    """Row indices grouped into buckets; every index appears exactly once."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    buckets: list[list[int]] = []
    for i in order:
        if buckets:
            cur = buckets[-1]
            longest = lengths[cur[0]]
            fits_padding = lengths[i] >= (1.0 - config.max_padding_fraction) * longest
            fits_tokens = (len(cur) + 1) * longest <= config.max_bucket_tokens
            if (fits_padding and fits_tokens) or (len(cur) < config.min_bucket_rows and fits_tokens):
                cur.append(i)
                continue
        buckets.append([i])
    return buckets


def padding_fraction(lengths: Sequence[int], buckets: list[list[int]]) -> float:
    """Share of computed token positions that are padding under this plan."""
    real = sum(lengths)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in buckets)
    return 0.0 if padded == 0 else 1.0 - real / padded
