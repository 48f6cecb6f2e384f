"""The paged KV cache of a decoder: a preallocated pool of fixed-size blocks, a block table per sequence.

Storage (allocated once, at construction):
  k, v [num_layers, num_blocks, block_size, num_kv_heads, head_dim]
A sequence's token at position p lives in block `table[p // block_size]`, offset `p % block_size`;
its flat slot is `table[p // block_size] * block_size + p % block_size`.

This module is the mechanism and its accounting only (allocate, free, write, read, free-block
count); which sequence is admitted or preempted when blocks run out is the scheduler's policy.

Prefix caching (the caller decides whether to use it: `match_prefix` and `commit`): a block whose tokens
are all computed can be registered under a hash of its tokens, every token before it and a salt (whose
adapter's K/V, whose tenant may share them), chained block by block. A new sequence whose leading blocks'
hashes are registered takes those blocks (shared, reference-counted, never written again: a sequence
only writes positions past its shared blocks) instead of computing them. A registered block nobody holds
stays in the pool with its contents and counts as free; it is evicted (least recently released first,
a sequence's last blocks before its first) only when no never-registered block is left.
"""
from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np
import torch

from .device import DeviceContext

log = logging.getLogger("vbert.kv_cache")

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
    staging_bytes: a second, contiguous copy of the running decode rows' K/V (DecodeStaging) up to this many bytes,
        in the compute dtype; 0: decode reads the blocks every step.
    """

    block_size: int = 16
    num_blocks: int | None = None
    budget_bytes: int | None = None
    dtype: str = "auto"
    staging_bytes: int = 0

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
        if isinstance(self.staging_bytes, bool) or not isinstance(self.staging_bytes, int) or self.staging_bytes < 0:
            raise ValueError(f"staging_bytes must be an integer >= 0, got {self.staging_bytes!r}")


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
        # prefix caching: registered blocks by hash; those nobody holds, oldest release first (evicted first)
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}
        self._by_hash: dict[bytes, int] = {}
        self._released: OrderedDict[int, None] = OrderedDict()
        self._chains: dict[Hashable, tuple[bytes, list[bytes]]] = {}   # seq -> (root hash, hashes of its blocks)
        self.num_evicted_blocks = 0                                       # registered blocks reused for others
        self.staging = (DecodeStaging(config.staging_bytes, num_layers, num_kv_heads, head_dim, device)
                        if config.staging_bytes else None)

    # -- accounting -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: never registered, or registered and held by no sequence."""
        return len(self._free) + len(self._released)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Registered blocks (prefix caching), held or not."""
        return len(self._hash_of)

    def total_bytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_blocks_needed(self, seq_id: Hashable, num_tokens: int) -> int:
        """More blocks `seq_id` needs to hold `num_tokens` tokens in all (0 if it has them)."""
        return max(0, self.blocks_for(num_tokens) - len(self._tables.get(seq_id, ())))

    def can_allocate(self, seq_id: Hashable, num_tokens: int) -> bool:
        return self.num_blocks_needed(seq_id, num_tokens) <= self.num_free_blocks

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
        if need > self.num_free_blocks:
            raise KVCacheFullError(f"sequence {seq_id!r} needs {need} more KV blocks for {num_tokens} "
                                   f"tokens; {self.num_free_blocks} of {self.num_blocks} are free")
        table = self._tables.setdefault(seq_id, [])
        for _ in range(need):
            block = self._free.pop() if self._free else self._evict()
            self._refs[block] = 1
            table.append(block)

    def free(self, seq_id: Hashable) -> int:
        """Release all of `seq_id`'s blocks; returns how many. A block back at no holder returns to the
        pool, a registered one keeping its contents (reusable by match_prefix until evicted)."""
        table = self._tables.pop(seq_id, None)
        if table is None:
            raise KeyError(f"sequence {seq_id!r} has no KV blocks")
        self._chains.pop(seq_id, None)
        if self.staging is not None:
            self.staging.drop(seq_id)
        for block in reversed(table):               # its last blocks are evicted before its first
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._released[block] = None
                else:
                    self._free.append(block)
        return len(table)

    # -- prefix caching ---------------------------------------------------------------------------
    @staticmethod
    def _chain(previous: bytes, tokens: Sequence[int]) -> bytes:
        return hashlib.blake2b(previous + np.asarray(tokens, dtype=np.int64).tobytes(), digest_size=16).digest()

    def match_prefix(self, seq_id: Hashable, tokens: Sequence[int], salt: bytes) -> int:
        """For a sequence that holds no blocks: take the registered blocks that hold its leading full
        blocks of `tokens` (under `salt`) and return how many tokens they cover (a multiple of
        block_size, at most len(tokens); 0 when the first block is not registered). The sequence then
        computes from there; its later blocks are allocated as usual. Pass the tokens whose K/V may come
        from the cache: all but the last one the caller must compute to get logits."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id!r} already holds KV blocks; match_prefix is for a new one")
        bs = self.block_size
        root = hashlib.blake2b(b"vbert-kv-prefix:" + salt, digest_size=16).digest()
        hashes: list[bytes] = []
        table: list[int] = []
        previous = root
        for start in range(0, len(tokens) - bs + 1, bs):
            h = self._chain(previous, tokens[start:start + bs])
            block = self._by_hash.get(h)
            if block is None:
                break
            if self._refs[block] == 0:
                del self._released[block]
            self._refs[block] += 1
            table.append(block)
            hashes.append(h)
            previous = h
        self._tables[seq_id] = table
        self._chains[seq_id] = (root, hashes)
        return len(table) * bs

    def commit(self, seq_id: Hashable, tokens: Sequence[int], num_computed: int) -> int:
        """Register `seq_id`'s blocks that `num_computed` (<= len(tokens)) computed tokens filled and
        that are not registered yet (for a sequence started with match_prefix; others are ignored).
        A block whose hash another block already has stays unregistered. Returns the blocks registered."""
        chain = self._chains.get(seq_id)
        if chain is None:
            return 0
        root, hashes = chain
        table, bs, added = self._tables[seq_id], self.block_size, 0
        full = min(num_computed, len(tokens)) // bs
        for i in range(len(hashes), min(full, len(table))):
            h = self._chain(hashes[-1] if hashes else root, tokens[i * bs:(i + 1) * bs])
            hashes.append(h)
            block = table[i]
            if h not in self._by_hash and block not in self._hash_of:
                self._by_hash[h] = block
                self._hash_of[block] = h
                added += 1
        return added

    def clear_prefix_cache(self) -> int:
        """Forget every registered block: released ones become plain free blocks, held ones stay with their
        sequences, unregistered (a cold cache, e.g. between benchmark runs). Returns how many there were."""
        n = len(self._hash_of)
        self._free.extend(sorted(self._released, reverse=True))
        self._released.clear()
        self._hash_of.clear()
        self._by_hash.clear()
        self._chains.clear()
        return n

    def _evict(self) -> int:
        block, _ = self._released.popitem(last=False)
        h = self._hash_of.pop(block)
        if self._by_hash.get(h) == block:
            del self._by_hash[h]
        self.num_evicted_blocks += 1
        return block

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

    def blocks(self, seq_id: Hashable, num_tokens: int) -> np.ndarray:
        """The ids of the blocks that hold positions 0..num_tokens-1 of `seq_id` (host, int64)."""
        table = self._table(seq_id)
        n = self.blocks_for(num_tokens)
        if num_tokens < 0 or n > len(table):
            raise ValueError(f"{num_tokens} tokens of sequence {seq_id!r} are outside its {len(table)} blocks of "
                             f"{self.block_size} (allocate first)")
        return np.asarray(table[:n], dtype=np.int64)

    def read_blocks(self, layer: int, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Semantics: K and V of `layer` at the positions of blocks block_ids[0], block_ids[1], ... in that order,
        each [len(block_ids) * block_size, num_kv_heads, head_dim]: a sequence's K/V gathered through its block
        table a whole block at a time (one copy of block_size tokens per index: 1.4-1.9x faster on a 2-core CPU than
        one index per token, benchmarks/paged_attention.py). block_ids [n] long on the cache's device."""
        shape = (-1, *self.k.shape[-2:])
        return (self.k[layer].view(self.num_blocks, -1).index_select(0, block_ids).view(shape),
                self.v[layer].view(self.num_blocks, -1).index_select(0, block_ids).view(shape))


class DecodeStaging:
    """The running decode rows' K/V, contiguous: k, v [num_layers, rows, num_kv_heads, tokens, head_dim] in the
    compute dtype, row r holding one sequence's positions 0..length-1. A decode step appends each row's new token
    (one write per row and layer) and attends over k[layer, :D, :, :T] as it is, where reading the blocks would
    copy every row's whole context out of the pool every step (at 16 rows x 1,024 tokens the copy is nearly half of
    a layer's attention on a 2-core CPU: benchmarks/paged_attention.py). The pool stays the truth (it is written
    too); a sequence's row is filled from its blocks once, when it starts decoding, and dropped when it is freed or
    leaves the decode rows. Costs a second copy of the running contexts, bounded by budget_bytes (while it grows,
    the old and the new allocation exist together for the copy): a step that would need more reads the blocks,
    and the staging is emptied.

    This is mechanism; the decoder asks it (prepare) before each step that has decode rows."""

    TOKEN_ROUND = 64       # the token capacity grows in steps of this many, and by at least a quarter

    def __init__(self, budget_bytes: int, num_layers: int, num_kv_heads: int, head_dim: int, device: DeviceContext):
        self.budget_bytes, self.device = budget_bytes, device
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.k = self.v = None                          # allocated on the first decode step
        self._rows: dict[Hashable, list[int]] = {}      # seq -> [row, length]
        self.num_fills = self.num_moves = self.num_fallbacks = self.num_alloc_failures = 0

    @property
    def nbytes(self) -> int:
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()

    def _bytes(self, rows: int, tokens: int) -> int:
        elt = torch.finfo(self.device.dtype).bits // 8
        return 2 * self.num_layers * rows * self.num_kv_heads * tokens * self.head_dim * elt

    def drop(self, seq_id: Hashable) -> None:
        self._rows.pop(seq_id, None)

    def clear(self) -> None:
        """Forget every row and give the memory back."""
        self._rows.clear()
        self.k = self.v = None

    def _reserve(self, rows: int, tokens: int) -> bool:
        """Room for `rows` rows of `tokens` tokens; False: more than the budget. Grows by a quarter of the tokens
        (at least TOKEN_ROUND) at a time, keeping what the rows hold, or as far as the budget allows: near the
        budget it neither reallocates every step nor gives up and retries each step. Where the rows it has leave
        too few tokens, it starts again with just `rows` rows (every sequence is filled again)."""
        have_rows, have_tokens = (0, 0) if self.k is None else (self.k.shape[1], self.k.shape[3])
        if rows <= have_rows and tokens <= have_tokens:
            return True
        per_token = self._bytes(1, 1)
        for keep in (True, False):
            r = max(rows, have_rows) if keep else rows
            fit = self.budget_bytes // (per_token * r)          # tokens per row the budget allows
            if tokens > fit or (keep and fit < have_tokens):
                continue
            step = self.TOKEN_ROUND
            t = min(fit, -(-max(tokens, have_tokens + have_tokens // 4) // step) * step)
            if not keep:                                # the old rows are filled again: free them first
                self.clear()
            shape = (self.num_layers, r, self.num_kv_heads, t, self.head_dim)
            try:
                # zeros, not empty: the positions past a row's length are masked, but a NaN there would still reach
                # the output through SDPA (0 x NaN)
                k = torch.zeros(shape, device=self.device.device, dtype=self.device.dtype)
                v = torch.zeros(shape, device=self.device.device, dtype=self.device.dtype)
            except RuntimeError as e:      # torch.OutOfMemoryError on a GPU; "can't allocate memory" on a CPU
                if not isinstance(e, torch.OutOfMemoryError) and "allocate" not in str(e):
                    raise
                # the budget was more than the device has: the step reads the blocks, and the staging asks for
                # at most half of what failed from now on
                self.budget_bytes = min(self.budget_bytes, self._bytes(r, t) // 2)
                self.num_alloc_failures += 1
                log.warning("decode staging: %d bytes could not be allocated (%s); its budget is now %d bytes",
                            self._bytes(r, t), str(e).splitlines()[0][:200], self.budget_bytes)
                return False
            if keep and self.k is not None:             # keep what the rows hold
                k[:, :have_rows, :, :have_tokens] = self.k
                v[:, :have_rows, :, :have_tokens] = self.v
            self.k, self.v = k, v
            return True
        return False

    def prepare(self, cache: "PagedKVCache", rows: Sequence[tuple[Hashable, int]]) -> np.ndarray | None:
        """rows: (seq_id, num_computed) of each sequence that decodes one token this step. Afterwards staging rows
        0..D-1 hold exactly these sequences' positions < num_computed (kept rows stay where they are, a kept row
        past D moves down, a new one is filled from its blocks), and each sequence's length counts the token the
        step writes (write). Returns the staging row of each sequence, in the order given; None: they would
        need more than budget_bytes (the staging is emptied and the step reads the blocks)."""
        num = len(rows)
        if not self._reserve(num, max(n for _, n in rows) + 1):
            self.num_fallbacks += 1
            self.clear()                                # gives the memory back while the rows do not fit
            return None
        wanted = dict(rows)
        for seq_id, (row, length) in list(self._rows.items()):
            if wanted.get(seq_id) != length:            # not decoding now, or its contents are not these positions
                del self._rows[seq_id]
        free = sorted(set(range(num)) - {row for row, _ in self._rows.values() if row < num}, reverse=True)
        out = np.empty(num, dtype=np.int64)
        for i, (seq_id, computed) in enumerate(rows):
            entry = self._rows.get(seq_id)
            if entry is not None and entry[0] < num:
                out[i] = entry[0]
            else:
                row = free.pop()
                if entry is not None:                   # staged past the D rows this step attends over
                    self.k[:, row, :, :computed] = self.k[:, entry[0], :, :computed]
                    self.v[:, row, :, :computed] = self.v[:, entry[0], :, :computed]
                    self.num_moves += 1
                elif computed:
                    self._fill(cache, row, seq_id, computed)
                out[i] = row
            self._rows[seq_id] = [int(out[i]), computed + 1]
        return out

    def _fill(self, cache: "PagedKVCache", row: int, seq_id: Hashable, num_tokens: int) -> None:
        blocks = self.device.to_device(torch.from_numpy(cache.blocks(seq_id, num_tokens)))
        for pool, staged in ((cache.k, self.k), (cache.v, self.v)):
            kv = pool.index_select(1, blocks).flatten(1, 2)[:, :num_tokens]        # [L, T, nkv, d]
            staged[:, row, :, :num_tokens] = kv.transpose(1, 2)
        self.num_fills += 1

    def write(self, layer: int, rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Semantics: K[layer, rows[i], :, positions[i]] = k[i], the same for V. k, v [n, num_kv_heads, head_dim]."""
        self.k[layer][rows, :, positions] = k
        self.v[layer][rows, :, positions] = v

    def view(self, layer: int, num_rows: int, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of rows 0..num_rows-1, positions < num_tokens: [num_rows, num_kv_heads, num_tokens, head_dim]
        views (no copy)."""
        return self.k[layer, :num_rows, :, :num_tokens], self.v[layer, :num_rows, :, :num_tokens]
