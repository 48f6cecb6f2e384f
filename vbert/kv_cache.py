"""The paged KV cache of a decoder: a preallocated pool of fixed-size blocks, a block table per sequence.

Storage (allocated once, at construction):
  k, v [num_layers, num_blocks, block_size, num_kv_heads, head_dim]
A sequence's token at position p lives in block `table[p // block_size]`, offset `p % block_size`;
its flat slot is `table[p // block_size] * block_size + p % block_size`.

This module is the mechanism and its accounting only (allocate, free, write, read, free-block
count); which sequence is admitted or preempted when blocks run out is the scheduler's policy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable

import numpy as np
import torch

from .device import DeviceContext

CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class KVCacheFullError(RuntimeError):
    """Not enough free blocks for an allocation; nothing was changed."""


@dataclass(frozen=True)
class KVCacheConfig:
    """Size of the paged KV cache.

    block_size: tokens per block.
    num_blocks or budget_bytes (exactly one): the pool's size as a block count, or as a byte budget
        for K and V of all layers together (num_blocks = budget_bytes // bytes per block).
    dtype: "auto" (the model's compute dtype) or an explicit one.
    """

    block_size: int = 16
    num_blocks: int | None = None
    budget_bytes: int | None = None
    dtype: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {self.block_size!r}")
        if (self.num_blocks is None) == (self.budget_bytes is None):
            raise ValueError("give exactly one of num_blocks and budget_bytes")
        if self.num_blocks is not None and (not isinstance(self.num_blocks, int) or self.num_blocks < 1):
            raise ValueError(f"num_blocks must be an integer >= 1, got {self.num_blocks!r}")
        budget = self.budget_bytes
        if budget is not None and (not isinstance(budget, int) or budget < 1):
            raise ValueError(f"budget_bytes must be an integer >= 1, got {self.budget_bytes!r}")
        if self.dtype != "auto" and self.dtype not in CACHE_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not 'auto' or one of {sorted(CACHE_DTYPES)}")


class PagedKVCache:
    def __init__(self, config: KVCacheConfig, num_layers: int, num_kv_heads: int, head_dim: int,
                 device: DeviceContext):
        self.config, self.device = config, device
        self.dtype = device.dtype if config.dtype == "auto" else CACHE_DTYPES[config.dtype]
        self.block_size = config.block_size
        elt = torch.finfo(self.dtype).bits // 8
        self.bytes_per_block = 2 * num_layers * config.block_size * num_kv_heads * head_dim * elt
        if config.num_blocks is not None:
            num_blocks = config.num_blocks
        else:
            num_blocks = config.budget_bytes // self.bytes_per_block
            if num_blocks < 1:
                raise ValueError(f"budget_bytes {config.budget_bytes} is below one block "
                                 f"({self.bytes_per_block} bytes: K and V of {num_layers} layers, "
                                 f"{config.block_size} tokens)")
        self.num_blocks = num_blocks
        shape = (num_layers, num_blocks, config.block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, device=device.device, dtype=self.dtype)
        self.v = torch.zeros(shape, device=device.device, dtype=self.dtype)
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))   # pop() hands out low blocks first
        self._tables: dict[Hashable, list[int]] = {}

    # -- accounting -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def total_bytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_blocks_needed(self, seq_id: Hashable, num_tokens: int) -> int:
        """More blocks `seq_id` needs to hold `num_tokens` tokens in all (0 if it has them)."""
        return max(0, self.blocks_for(num_tokens) - len(self._tables.get(seq_id, ())))

    def can_allocate(self, seq_id: Hashable, num_tokens: int) -> bool:
        return self.num_blocks_needed(seq_id, num_tokens) <= len(self._free)

    def has_sequence(self, seq_id: Hashable) -> bool:
        return seq_id in self._tables

    def block_table(self, seq_id: Hashable) -> tuple[int, ...]:
        return tuple(self._table(seq_id))

    def capacity(self, seq_id: Hashable) -> int:
        """Tokens `seq_id` can hold with the blocks it has."""
        return len(self._tables.get(seq_id, ())) * self.block_size

    # -- allocate / free --------------------------------------------------------------------
    def allocate(self, seq_id: Hashable, num_tokens: int) -> None:
        """Grow `seq_id`'s block table so that it holds `num_tokens` tokens in all (a new sequence
        starts with an empty table). Raises KVCacheFullError, changing nothing, when too few are free."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        need = self.num_blocks_needed(seq_id, num_tokens)
        if need > len(self._free):
            raise KVCacheFullError(f"sequence {seq_id!r} needs {need} more KV blocks for {num_tokens} "
                                   f"tokens; {len(self._free)} of {self.num_blocks} are free")
        table = self._tables.setdefault(seq_id, [])
        table.extend(self._free.pop() for _ in range(need))

    def free(self, seq_id: Hashable) -> int:
        """Return all of `seq_id`'s blocks to the pool; returns how many."""
        table = self._tables.pop(seq_id, None)
        if table is None:
            raise KeyError(f"sequence {seq_id!r} has no KV blocks")
        self._free.extend(reversed(table))
        return len(table)

    # -- slots, write, read -----------------------------------------------------------------
    def _table(self, seq_id: Hashable) -> list[int]:
        table = self._tables.get(seq_id)
        if table is None:
            raise KeyError(f"sequence {seq_id!r} has no KV blocks")
        return table

    def slots(self, seq_id: Hashable, start: int, end: int) -> np.ndarray:
        """Flat slot indices [end - start] of positions start..end-1 of `seq_id` (host, int64)."""
        table = self._table(seq_id)
        if not 0 <= start <= end or end > len(table) * self.block_size:
            raise ValueError(f"positions [{start}, {end}) of sequence {seq_id!r} are outside its "
                             f"{len(table)} blocks of {self.block_size} (allocate first)")
        pos = np.arange(start, end, dtype=np.int64)
        blocks = np.asarray(table, dtype=np.int64)[pos // self.block_size]
        return blocks * self.block_size + pos % self.block_size

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Semantics: for each i, K[layer][slots[i]] = k[i] and V[layer][slots[i]] = v[i].
        slots [n] long on the cache's device; k, v [n, num_kv_heads, head_dim]."""
        kvh, d = self.k.shape[-2:]
        self.k[layer].view(-1, kvh, d).index_copy_(0, slots, k.to(self.dtype))
        self.v[layer].view(-1, kvh, d).index_copy_(0, slots, v.to(self.dtype))

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Semantics: (K[layer][slots[i]] for i, V[layer][slots[i]] for i), each
        [n, num_kv_heads, head_dim]: a sequence's K/V gathered through its block table."""
        kvh, d = self.k.shape[-2:]
        return (self.k[layer].view(-1, kvh, d).index_select(0, slots),
                self.v[layer].view(-1, kvh, d).index_select(0, slots))
