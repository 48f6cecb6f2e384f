"""The n-gram lookup table of SkipBERT-style lower-layer skipping: keys, counting, exact index, file format.

A table entry holds the shallow layers' output [3, H] (left, centre, right slot) for one trigram of token ids.
Ids pack into one non-negative int64 key, `(a << 2*bits) | (b << bits) | c`, with `bits = key_bits(vocab)`.
There is ONE key space: positions outside a sentence are the edge id (the tokenizer's pad id), so the
fallbacks are ordinary keys with the edge id in outer slots: left bigram (a, b, E), right bigram (E, b, c),
unigram (E, b, E). `KeyIndex` maps keys to row positions exactly; its backends are "numba" (a CPU
open-addressing hash table, splitmix64 mixer, linear probing, one compiled loop per lookup call) and "torch"
(sorted keys + `searchsorted`; the CUDA path, works on CPU too). A table is one safetensors file (`keys`
[N] int64, `values` [N, 3, H]) whose metadata names the format, the TableMeta fields and a sha256 of the
data, so a corrupt file, or one built for other shallow weights, is refused at load.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numba
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "vbert-ngram-table/1"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TABLE_COMPUTE_DTYPES = ("float32", "bfloat16")   # what a table's shallow layers may have computed in
KINDS = ("trigram", "bigram", "unigram")
_COUNT_CHUNK_TOKENS = 1 << 20   # tokens per vectorized counting chunk


class TableError(ValueError):
    """A table file that is corrupt, truncated, of another format, or built for other shallow weights.
    The message names the file and the problem."""


class _DuplicateKeyError(ValueError):
    """KeyIndex.build got a key twice."""


# ---------------------------------------------------------------------------------------------- keys

def key_bits(vocab_size: int) -> int:
    """Bits per id: max(1, ceil(log2(vocab_size))); the packed key (3 ids) must fit a non-negative int64."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    bits = max(1, (int(vocab_size) - 1).bit_length())
    if 3 * bits > 62:
        raise ValueError(f"vocab_size {vocab_size} needs {bits} bits per id; 3 ids do not fit a 62-bit key")
    return bits


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 20:
        raise ValueError(f"bits must be in [1, 20], got {bits}")


def pack(ids: torch.Tensor, bits: int) -> torch.Tensor:
    """ids [..., 3] int64, each in [0, 2**bits) (not checked) -> keys [...] int64 (any device)."""
    _check_bits(bits)
    if ids.shape[-1:] != (3,):
        raise ValueError(f"ids must have a last dimension of 3, got shape {tuple(ids.shape)}")
    ids = ids.long()
    return (ids[..., 0] << (2 * bits)) | (ids[..., 1] << bits) | ids[..., 2]


def unpack(keys: torch.Tensor, bits: int) -> torch.Tensor:
    """keys [...] int64 -> ids [..., 3] int64; inverse of pack."""
    _check_bits(bits)
    m = (1 << bits) - 1
    keys = keys.long()
    return torch.stack([(keys >> (2 * bits)) & m, (keys >> bits) & m, keys & m], dim=-1)


def trigram_ids(input_ids: torch.Tensor, mask: torch.Tensor, edge_id: int) -> torch.Tensor:
    """input_ids [B, L] long, mask [B, L] bool (True = real token) -> [B, L, 3] long.

    Semantics: out[r, i] = (id[i-1], id[i], id[i+1]) where a neighbour outside [0, L) or with mask False
    is edge_id; out[r, i] = (edge_id,) * 3 where mask[r, i] is False.
    """
    if input_ids.dim() != 2 or mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and mask must both be [B, L], got {tuple(input_ids.shape)} and "
                         f"{tuple(mask.shape)}")
    mask = mask.bool()
    ids = torch.where(mask, input_ids.long(), edge_id)                          # [B, L]
    edge = torch.full_like(ids[:, :1], edge_id)                                 # [B, 1]
    left = torch.cat([edge, ids[:, :-1]], dim=1)                                # [B, L]
    right = torch.cat([ids[:, 1:], edge], dim=1)                                # [B, L]
    out = torch.stack([left, ids, right], dim=-1)                               # [B, L, 3]
    return torch.where(mask.unsqueeze(-1), out, edge_id)


def fallback_keys(keys: torch.Tensor, bits: int,
                  edge_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Trigram keys [...] -> (left bigram (a, b, E), right bigram (E, b, c), unigram (E, b, E)) keys [...]."""
    _check_bits(bits)
    m = (1 << bits) - 1
    keys = keys.long()
    outer_a, outer_c = m << (2 * bits), m
    edge_a, edge_c = edge_id << (2 * bits), edge_id
    left = (keys & ~outer_c) | edge_c
    right = (keys & ~outer_a) | edge_a
    uni = (keys & (m << bits)) | edge_a | edge_c
    return left, right, uni


def count_kinds(keys: torch.Tensor, bits: int, edge_id: int) -> dict[str, int]:
    """Entries by kind: unigram if both outer ids are the edge id, bigram if exactly one is, else trigram."""
    ids = unpack(keys.reshape(-1), bits)                                        # [N, 3]
    num_edges = (ids[:, 0] == edge_id).long() + (ids[:, 2] == edge_id).long()  # [N]
    return {"trigram": int((num_edges == 0).sum()), "bigram": int((num_edges == 1).sum()),
            "unigram": int((num_edges == 2).sum())}


# ------------------------------------------------------------------------------------------ counting

def _np_pack(a: np.ndarray, b: np.ndarray, c: np.ndarray, bits: int) -> np.ndarray:
    return (a << (2 * bits)) | (b << bits) | c


def _chunk_counts(seqs: list[np.ndarray], edge_id: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Unique keys and counts of one chunk of sentences (see count_ngrams for what is counted)."""
    flat = np.concatenate(seqs)                                                 # [T]
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    if flat.size and (flat.min() < 0 or flat.max() >= (1 << bits)):
        raise ValueError(f"token ids must be in [0, {1 << bits}) for {bits}-bit keys, got "
                         f"[{flat.min()}, {flat.max()}]")
    ends = np.cumsum(lengths)
    starts = ends - lengths
    a = np.empty_like(flat)
    c = np.empty_like(flat)
    a[1:], c[:-1] = flat[:-1], flat[1:]
    a[starts[lengths > 0]] = edge_id                                            # sentence starts
    c[ends[lengths > 0] - 1] = edge_id                                          # sentence ends
    e = np.int64(edge_id)
    # a position's distinct keys only: L == T iff c == E, R == T iff a == E, U == L iff a == E,
    # U == R iff c == E
    has_a, has_c = a != e, c != e
    keys = np.concatenate([
        _np_pack(a, flat, c, bits),                                             # trigram
        _np_pack(a[has_c], flat[has_c], np.full(int(has_c.sum()), e), bits),    # left bigram
        _np_pack(np.full(int(has_a.sum()), e), flat[has_a], c[has_a], bits),    # right bigram
        _np_pack(e, flat[has_a & has_c], e, bits),                              # unigram
    ])
    return np.unique(keys, return_counts=True)


def _merge_counts(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Sum counts of equal keys over several (keys, counts) -> (unique keys ascending, counts)."""
    if len(parts) == 1:
        return parts[0]
    keys = np.concatenate([k for k, _ in parts])
    counts = np.concatenate([n for _, n in parts])
    order = np.argsort(keys, kind="stable")
    keys, counts = keys[order], counts[order]
    if keys.size == 0:
        return keys, counts
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])                # first key of each run
    return keys[starts], np.add.reduceat(counts, starts)


def count_ngrams(sequences: Iterable[Sequence[int]], edge_id: int, bits: int, *,
                 show_progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Count the keys of every position of every sentence (token ids incl. special tokens).

    Semantics: at position i of a sentence, with a = id[i-1] and c = id[i+1] (edge_id beyond the sentence),
    the keys are the trigram (a, b, c), left bigram (a, b, E), right bigram (E, b, c) and unigram (E, b, E);
    each DISTINCT key among the four counts once per position (at a sentence end some coincide, e.g. the
    trigram of the first token is its right bigram), so a count is the number of positions whose lookup can
    use that key. Returns (keys [N] int64 unique, counts [N] int64), by count descending, then key ascending.
    """
    _check_bits(bits)
    if not 0 <= edge_id < (1 << bits):
        raise ValueError(f"edge_id {edge_id} does not fit {bits}-bit ids")
    if show_progress:
        from tqdm import tqdm
        sequences = tqdm(sequences, desc="counting n-grams", unit="seq")
    total: tuple[np.ndarray, np.ndarray] = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    pending: list[tuple[np.ndarray, np.ndarray]] = []
    num_pending = 0
    it = iter(sequences)
    while True:
        chunk, num_tokens = [], 0
        for s in itertools.islice(it, 4096):
            arr = np.asarray(s, dtype=np.int64).reshape(-1)
            chunk.append(arr)
            num_tokens += arr.size
            if num_tokens >= _COUNT_CHUNK_TOKENS:
                break
        if chunk:
            part = _chunk_counts(chunk, edge_id, bits)
            pending.append(part)
            num_pending += part[0].size
        # merge when the pending parts are as large as the running total (amortized O(N log N) overall)
        if pending and (not chunk or num_pending >= max(total[0].size, _COUNT_CHUNK_TOKENS)):
            total = _merge_counts([total, *pending])
            pending, num_pending = [], 0
        if not chunk:
            break
    keys, counts = total
    order = np.lexsort((keys, -counts))
    return keys[order].astype(np.int64), counts[order].astype(np.int64)


# ------------------------------------------------------------------------------------------- indexes

_C1, _C2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


@numba.njit(nogil=True, cache=False)
def _mix(key):
    z = np.uint64(key)                                                          # splitmix64 finalizer
    z = (z ^ (z >> _S30)) * _C1
    z = (z ^ (z >> _S27)) * _C2
    return z ^ (z >> _S31)


@numba.njit(nogil=True, cache=False)
def _nb_build(keys, slot_mask):
    """keys [N] int64 -> (slot_keys [cap], slot_pos [cap] (-1 = empty), index of a duplicate or -1)."""
    cap = slot_mask + 1
    slot_keys = np.zeros(cap, np.int64)
    slot_pos = np.full(cap, -1, np.int64)
    um = np.uint64(slot_mask)
    for i in range(keys.size):
        k = keys[i]
        h = np.int64(_mix(k) & um)
        while slot_pos[h] != -1:
            if slot_keys[h] == k:
                return slot_keys, slot_pos, i
            h = (h + 1) & slot_mask
        slot_keys[h] = k
        slot_pos[h] = i
    return slot_keys, slot_pos, -1


@numba.njit(nogil=True, cache=False)
def _nb_find(slot_keys, slot_pos, slot_mask, queries, out):
    um = np.uint64(slot_mask)
    for i in range(queries.size):
        q = queries[i]
        h = np.int64(_mix(q) & um)
        pos = -1
        while slot_pos[h] != -1:
            if slot_keys[h] == q:
                pos = slot_pos[h]
                break
            h = (h + 1) & slot_mask
        out[i] = pos


class _NumbaIndex:
    """CPU open-addressing hash table: capacity a power of two >= 2N, linear probing."""

    def __init__(self, keys: torch.Tensor):
        if keys.device.type != "cpu":
            raise ValueError(f"the numba backend needs CPU keys, got keys on {keys.device}")
        k = keys.contiguous().numpy()
        cap = 1 << max(1, (2 * k.size - 1).bit_length())
        self.mask = cap - 1
        self.slot_keys, self.slot_pos, dup = _nb_build(k, self.mask)             # [cap], [cap]
        if dup >= 0:
            raise _DuplicateKeyError(f"duplicate key {int(k[dup])} at position {dup}")

    def find(self, queries: torch.Tensor) -> torch.Tensor:
        q = queries.contiguous().numpy()                                         # [M]
        out = np.empty(q.size, np.int64)
        _nb_find(self.slot_keys, self.slot_pos, self.mask, q, out)
        return torch.from_numpy(out)

    def nbytes(self) -> int:
        return self.slot_keys.nbytes + self.slot_pos.nbytes


class _TorchIndex:
    """Sorted keys + searchsorted; works on any device."""

    def __init__(self, keys: torch.Tensor):
        self.sorted, self.order = torch.sort(keys)                               # [N], [N]
        dup = self.sorted[1:] == self.sorted[:-1]
        if keys.numel() > 1 and bool(dup.any()):
            i = int(dup.nonzero()[0, 0])
            raise _DuplicateKeyError(f"duplicate key {int(self.sorted[i])} at position "
                                     f"{int(self.order[i + 1])}")

    def find(self, queries: torch.Tensor) -> torch.Tensor:
        n = self.sorted.numel()
        if n == 0:
            return torch.full_like(queries, -1)
        queries = queries.contiguous()
        i = torch.searchsorted(self.sorted, queries).clamp_(max=n - 1)          # [M]
        return torch.where(self.sorted[i] == queries, self.order[i], -1)

    def nbytes(self) -> int:
        return self.sorted.nbytes + self.order.nbytes


_BACKENDS = {"numba": _NumbaIndex, "torch": _TorchIndex}


class KeyIndex:
    """Immutable exact index over unique int64 keys: find() returns each query's position in the keys the
    index was built from, or -1."""

    def __init__(self, impl: _NumbaIndex | _TorchIndex, backend: str, device: torch.device, size: int):
        self._impl, self._backend, self._device, self._size = impl, backend, device, size

    @classmethod
    def build(cls, keys: torch.Tensor, backend: str = "auto") -> KeyIndex:
        """keys [N] int64, unique (ValueError naming a duplicate otherwise). backend: "numba", "torch" or
        "auto" (numba for CPU keys, else torch)."""
        if keys.dim() != 1 or keys.dtype != torch.int64:
            raise ValueError(f"keys must be 1-D int64, got {tuple(keys.shape)} {keys.dtype}")
        if backend == "auto":
            backend = "numba" if keys.device.type == "cpu" else "torch"
        if backend not in _BACKENDS:
            raise ValueError(f"unknown index backend {backend!r}; one of {sorted(_BACKENDS)} or 'auto'")
        return cls(_BACKENDS[backend](keys), backend, keys.device, keys.numel())

    @property
    def backend(self) -> str:
        return self._backend

    @property
    def device(self) -> torch.device:
        return self._device

    def __len__(self) -> int:
        return self._size

    def find(self, queries: torch.Tensor) -> torch.Tensor:
        """queries [...] int64 on the index's device -> positions [...] int64, -1 where absent."""
        if queries.dtype != torch.int64:
            raise ValueError(f"queries must be int64, got {queries.dtype}")
        if queries.device != self._device:
            raise ValueError(f"queries on {queries.device}, index on {self._device}")
        return self._impl.find(queries.reshape(-1)).reshape(queries.shape)

    def nbytes(self) -> int:
        return self._impl.nbytes()


MISS_CACHE_FORMAT = "vbert-miss-cache/1"


class MissCache:
    """Bounded cache of computed entries (FIFO replacement) for keys missing from a table.

    Slots fill 0, 1, ... and then wrap around, overwriting the oldest; the occupied slots are always a prefix
    [0, size), so the index over that prefix maps a key straight to its slot in `values`.
    """

    def __init__(self, capacity: int, entry_shape: tuple[int, ...], dtype: torch.dtype, device,
                 backend: str = "auto"):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity, self.entry_shape, self.dtype = int(capacity), tuple(entry_shape), dtype
        self.device = torch.device(device)
        self.backend = backend
        # only the occupied prefix is ever read: empty, so the OS backs a large cache's pages as entries arrive
        self.values = torch.empty(self.capacity, *self.entry_shape, dtype=dtype, device=self.device)
        self._keys = torch.zeros(self.capacity, dtype=torch.int64, device=self.device)   # [capacity]
        self._size, self._next, self._inserts, self._evictions = 0, 0, 0, 0
        self._index = KeyIndex.build(self._keys[:0], backend)

    def find(self, keys: torch.Tensor) -> torch.Tensor:
        """keys [...] int64 -> slots [...] into self.values, -1 where absent."""
        return self._index.find(keys)

    def insert(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """keys [n] int64 unique and absent, values [n, *entry_shape] -> slots [n] (-1: not kept, only the
        last `capacity` are kept when n > capacity). Overwrites the oldest entries."""
        n = keys.numel()
        if keys.dim() != 1 or tuple(values.shape) != (n, *self.entry_shape):
            shape = ", ".join(map(str, self.entry_shape))
            raise ValueError(f"expected keys [n] and values [n, {shape}], got "
                             f"{tuple(keys.shape)} and {tuple(values.shape)}")
        keys = keys.to(self.device, torch.int64)
        if n > 1 and torch.unique(keys).numel() != n:
            raise ValueError("keys to insert are not unique")
        if n and bool((self._index.find(keys) >= 0).any()):
            raise ValueError("some keys to insert are already cached")
        slots = torch.full((n,), -1, dtype=torch.int64, device=self.device)
        m = min(n, self.capacity)
        if m == 0:
            return slots
        kept = torch.arange(self._next, self._next + m, device=self.device) % self.capacity   # [m]
        self._keys[kept] = keys[n - m:]
        self.values[kept] = values[n - m:].to(self.device, self.dtype)
        self._evictions += max(0, self._size + m - self.capacity)
        self._inserts += m
        self._size = min(self.capacity, self._size + m)
        self._next = (self._next + m) % self.capacity
        self._index = KeyIndex.build(self._keys[:self._size], self.backend)
        slots[n - m:] = kept
        return slots

    def stats(self) -> dict[str, int]:
        """size (entries now), capacity, inserts (entries written, cumulative), evictions (entries
        overwritten, cumulative)."""
        return {"size": self._size, "capacity": self.capacity, "inserts": self._inserts,
                "evictions": self._evictions}

    def clear(self) -> None:
        """Drop every entry (the cumulative counters stay)."""
        self._size, self._next = 0, 0
        self._index = KeyIndex.build(self._keys[:0], self.backend)

    def entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys [size], values [size, *entry_shape]) on the cache's device, oldest first."""
        order = torch.arange(self._size, device=self.device)
        if self._size == self.capacity:                                         # wrapped: the oldest at _next
            order = (order + self._next) % self.capacity
        return self._keys[order], self.values[order]

    def save(self, path: str | Path, metadata: dict[str, str]) -> int:
        """Write the entries (oldest first) to a safetensors file, atomically, with `metadata` (strings: what
        the entries are valid for); returns the number written."""
        keys, values = self.entries()
        write_atomic(path, {"keys": keys.cpu().contiguous(), "values": values.cpu().contiguous()},
                     {"format": MISS_CACHE_FORMAT, **metadata})
        return keys.numel()

    def restore(self, path: str | Path, metadata: dict[str, str], defaults: dict[str, str] | None = None) -> int:
        """Insert the entries of a file `save` wrote (the newest `capacity` when it holds more), after
        checking that its metadata matches `metadata` (`defaults`: the value of a field older files lack) and
        its tensors this cache's shape and dtype. Raises
        ValueError naming the problem and changes nothing when they do not; returns the number restored."""
        if self._size:
            raise ValueError("restore into an empty cache only")
        try:
            with safe_open(str(path), framework="pt") as f:
                md = f.metadata() or {}
                if md.get("format") != MISS_CACHE_FORMAT:
                    raise ValueError(f"not a miss cache file (format {md.get('format')!r})")
                for k, v in metadata.items():
                    saved = md.get(k, (defaults or {}).get(k))
                    if saved != v:
                        raise ValueError(f"saved for {k} {saved!r}, this cache is for {v!r}")
                if set(f.keys()) != {"keys", "values"}:
                    raise ValueError(f"expected tensors keys and values, found {sorted(f.keys())}")
                keys, values = f.get_tensor("keys"), f.get_tensor("values")
        except ValueError:
            raise
        except Exception as e:                                                   # truncated, not safetensors, ...
            raise ValueError(f"unreadable ({type(e).__name__}: {e})") from None
        n = keys.numel()
        if keys.dtype != torch.int64 or keys.dim() != 1 or tuple(values.shape) != (n, *self.entry_shape) \
                or values.dtype != self.dtype:
            raise ValueError(f"holds keys {keys.dtype} {tuple(keys.shape)} and values {values.dtype} "
                             f"{tuple(values.shape)}, this cache keeps {self.dtype} [n, "
                             f"{', '.join(map(str, self.entry_shape))}]")
        if n > 1 and torch.unique(keys).numel() != n:
            raise ValueError("duplicate keys")
        if n and not bool(torch.isfinite(values).all()):
            raise ValueError("values contain NaN or Inf")
        self.insert(keys.to(self.device), values.to(self.device))
        return min(n, self.capacity)


# --------------------------------------------------------------------------------------------- files

@dataclass(frozen=True)
class TableMeta:
    weights_hash: str
    edge_id: int
    bits: int
    hidden_size: int
    dtype: str                                  # "float32" | "float16" | "bfloat16"
    num_entries: int
    kinds: dict[str, int]                       # entries by kind: trigram, bigram, unigram
    extra: dict[str, str] = field(default_factory=dict)   # free-form: corpus, backbone, ...
    compute_dtype: str = "float32"              # the shallow layers ran in it: misses must be computed alike

    def __post_init__(self):
        _check_bits(self.bits)
        if not 0 <= self.edge_id < (1 << self.bits):
            raise ValueError(f"edge_id {self.edge_id} does not fit {self.bits}-bit ids")
        if self.hidden_size < 1 or self.num_entries < 0:
            raise ValueError(f"bad hidden_size {self.hidden_size} or num_entries {self.num_entries}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.compute_dtype not in TABLE_COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype {self.compute_dtype!r} is not one of {TABLE_COMPUTE_DTYPES}")
        if set(self.kinds) != set(KINDS) or sum(self.kinds.values()) != self.num_entries:
            raise ValueError(f"kinds {self.kinds} must count {KINDS} and sum to num_entries "
                             f"{self.num_entries}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.extra.items()):
            raise ValueError("extra must map str to str")


_INT_FIELDS = ("edge_id", "bits", "hidden_size", "num_entries")


def _meta_to_strings(meta: TableMeta) -> dict[str, str]:
    return {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in asdict(meta).items()}


def _meta_from_strings(md: dict[str, str]) -> TableMeta:
    """Raises KeyError / ValueError / TypeError on a missing or malformed field."""
    fields = {"weights_hash": md["weights_hash"], "dtype": md["dtype"],
              "compute_dtype": md.get("compute_dtype", "float32")}        # tables before it: float32
    for k in _INT_FIELDS:
        v = json.loads(md[k])
        if type(v) is not int:
            raise ValueError(f"{k} is not an integer: {md[k]!r}")
        fields[k] = v
    for k in ("kinds", "extra"):
        v = json.loads(md[k])
        if not isinstance(v, dict):
            raise ValueError(f"{k} is not a JSON object: {md[k]!r}")
        fields[k] = v
    return TableMeta(**fields)


def _bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (contiguous, CPU)."""
    return memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def _data_sha256(keys: torch.Tensor, values: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(_bytes(keys))
    h.update(_bytes(values))
    return h.hexdigest()


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 hex over sorted names + dtype + shape + raw bytes of each tensor: names the shallow weights."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        h.update(f"{name}\0{str(t.dtype)}\0{tuple(t.shape)}\0{t.numel() * t.element_size()}\0".encode())
        h.update(_bytes(t))
    return h.hexdigest()


def _check_table(keys: torch.Tensor, values: torch.Tensor, meta: TableMeta) -> None:
    n, hsz = meta.num_entries, meta.hidden_size
    if keys.dtype != torch.int64 or tuple(keys.shape) != (n,):
        raise ValueError(f"keys must be int64 [{n}], got {keys.dtype} {tuple(keys.shape)}")
    if values.dtype != DTYPES[meta.dtype] or tuple(values.shape) != (n, 3, hsz):
        raise ValueError(f"values must be {meta.dtype} [{n}, 3, {hsz}], got {values.dtype} "
                         f"{tuple(values.shape)}")
    if n and (int(keys.min()) < 0 or int(keys.max()) >= (1 << (3 * meta.bits))):
        raise ValueError(f"keys out of range for {meta.bits}-bit ids")
    kinds = count_kinds(keys, meta.bits, meta.edge_id)
    if kinds != meta.kinds:
        raise ValueError(f"meta.kinds {meta.kinds} do not match the keys' kinds {kinds}")


def save_table(path: str | Path, keys: torch.Tensor, values: torch.Tensor, meta: TableMeta) -> None:
    """Write one safetensors file atomically (temporary sibling, fsync, rename). Raises ValueError before
    writing anything if keys [N] int64 unique / values [N, 3, H] of meta.dtype / meta disagree."""
    path = Path(path)
    keys, values = keys.detach().cpu().contiguous(), values.detach().cpu().contiguous()
    _check_table(keys, values, meta)
    KeyIndex.build(keys, "torch")                                               # raises on a duplicate key
    if not bool(torch.isfinite(values).all()):
        raise ValueError("values contain NaN or Inf")
    metadata = {"format": FORMAT, **_meta_to_strings(meta), "sha256": _data_sha256(keys, values)}
    write_atomic(path, {"keys": keys, "values": values}, metadata)


def write_atomic(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically: a temporary sibling, fsync, rename (a reader sees the old file or
    the whole new one, never a half-written one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:                                                                        # make the rename durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


class NgramTable:
    """A loaded table: keys [N] int64, values [N, 3, H], their meta, and an exact index over the keys."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, meta: TableMeta, index: KeyIndex,
                 path: Path | None = None):
        self.keys, self.values, self.meta, self.index, self.path = keys, values, meta, index, path

    def lookup(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """keys [...] int64 -> (positions [...] into values, -1 where missing; hit [...] bool)."""
        pos = self.index.find(keys)
        return pos, pos >= 0

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + self.index.nbytes()

    def __len__(self) -> int:
        return self.keys.numel()


def load_table(path: str | Path, *, weights_hash: str | None, device="cpu", backend: str = "auto",
               verify: bool = True) -> NgramTable:
    """Read a table file to host memory, check it, move it to `device` and index it. TableError names the
    file and the problem. weights_hash: refuse a table built for other shallow weights (None: no check).
    verify: check the data's sha256, key uniqueness and kinds (reads every byte once)."""
    path = Path(path)
    if backend != "auto" and backend not in _BACKENDS:
        raise ValueError(f"unknown index backend {backend!r}; one of {sorted(_BACKENDS)} or 'auto'")
    if not path.is_file():
        raise TableError(f"table {path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            names = set(f.keys())
            if md.get("format") != FORMAT:
                raise TableError(f"table {path}: format {md.get('format')!r}, expected {FORMAT!r}")
            try:
                meta = _meta_from_strings(md)
            except (KeyError, ValueError, TypeError) as e:
                raise TableError(f"table {path}: missing or malformed metadata ({type(e).__name__}: {e})")
            if weights_hash is not None and weights_hash != meta.weights_hash:
                raise TableError(f"table {path} was built for shallow weights {meta.weights_hash}, these are "
                                 f"{weights_hash}; rebuild it with vbert build-table")
            if not {"keys", "values"} <= names:
                raise TableError(f"table {path}: missing tensors {sorted({'keys', 'values'} - names)}")
            keys, values = f.get_tensor("keys"), f.get_tensor("values")
    except TableError:
        raise
    except Exception as e:  # safetensors raises several types for damaged files
        raise TableError(f"table {path}: not a readable safetensors file, truncated or damaged ({e})") from e
    try:
        _check_table(keys, values, meta)
    except ValueError as e:
        raise TableError(f"table {path}: tensors do not match the metadata ({e})") from e
    if verify:
        if _data_sha256(keys, values) != md.get("sha256"):
            raise TableError(f"table {path} is corrupt: sha256 of its data does not match the recorded one")
    keys, values = keys.to(device), values.to(device)
    try:
        index = KeyIndex.build(keys, backend)
    except _DuplicateKeyError as e:
        raise TableError(f"table {path} is corrupt: {e}") from e
    return NgramTable(keys, values, meta, index, path)
