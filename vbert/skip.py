"""Skip mode's runtime: serving the lower layers from precomputed n-gram tables (the shallow layers
themselves, their merge and their files are in vbert.shallow).

SkipRuntime holds, for one or more named tables, a ShallowModel, its NgramTable and a bounded miss
cache, and turns a padded batch into layer-k states: unique keys, one vectorized table lookup, then
misses computed by the shallow layers (exact) or, in fallback mode, looked up as bigrams / unigrams
(approximate).

Routing (exact mode): a trigram the table lacks costs three tokens through k shallow layers, a token of
the full model one pass through the real lower layers, so a row of mostly unseen text is cheaper on the
real layers. With route "cost" the runtime looks every row's keys up first and sends each row the
cheaper way, from measured costs (SkipCosts: calibrated at start-up, then updated from the steps it
times), so a batch is never predicted slower than the full model. A row on the real lower layers
gets exactly the full model's layer-k states: for adapters trained on the full model that is exactly
the full model; rows of adapters trained in skip mode stay on the table (docs/skip-mode.md).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .config import SKIP_MODES, SKIP_ROUTES
from .device import fast_bfloat16
from .ngram import MissCache, NgramTable, TableError, fallback_keys, key_bits, load_table, pack, trigram_ids, unpack
from .shallow import (COMPUTE_CHUNK, TABLE_DTYPES, ShallowMeta, ShallowModel, SkipError, compute_entries, load_shallow,
                      resolve_compute_dtype)

log = logging.getLogger("vbert.skip")

# -- the runtime -----------------------------------------------------------------------------------
@dataclass
class TableCounters:
    tokens: int = 0               # real token positions served
    lookups: int = 0              # unique trigram keys looked up
    table_hits: int = 0
    cache_hits: int = 0
    computed: int = 0             # misses computed by the shallow layers (exact)
    fallback: int = 0             # misses served by a bigram / unigram entry (approximate)
    rows_table: int = 0           # rows served from this table (lookups + computed misses)
    rows_layers: int = 0          # rows routed to the real lower layers (cheaper for them)
    layer_tokens: int = 0         # real token positions of those rows
    probed: int = 0               # unique keys looked up to route rows (every row, either way)
    probed_known: int = 0         # of those, in the table or the miss cache

    def hit_rate(self) -> float:
        """Share of unique keys served without computing (table + miss cache)."""
        return (self.table_hits + self.cache_hits) / self.lookups if self.lookups else 0.0

    def coverage(self) -> float:
        """Share of the routed rows' unique keys that the table or the miss cache held (the hit rate
        the traffic would have had on the table path, whichever way its rows went)."""
        return self.probed_known / self.probed if self.probed else 0.0


@dataclass
class SkipCosts:
    """Measured seconds of the two ways to a row's layer-k states (see SkipRuntime.calibrate).

    chunk_s / edge_chunk_s: one compute chunk (COMPUTE_CHUNK trigrams) through the shallow layers,
        without / with an edge id (a key always computes in whole chunks), in `compute_dtype`;
    token_s: seconds per token of the real lower layers at a sequence length (measured lengths; others
        interpolated linearly, clamped at the ends);
    table_token_s: the table path's own cost per token (keys, lookup, gather, merge), 0 until timed;
    compute_dtype: what chunk_s / edge_chunk_s were measured in (the default table's compute dtype);
    other_chunks: [chunk_s, edge_chunk_s] of each other compute dtype the runtime's tables use (a float32 table's
        misses cost about twice a bfloat16 one's on a CPU with AVX-512 BF16), so each table is predicted at its own
        speed. Methods that take `dtype` use its entry, or chunk_s / edge_chunk_s for compute_dtype, None or a
        dtype without one.
    """

    chunk_s: float
    edge_chunk_s: float
    token_s: dict[int, float]
    table_token_s: float = 0.0
    compute_dtype: str = "float32"
    other_chunks: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.token_s:
            raise SkipError("SkipCosts needs the real layers' cost at one sequence length at least")
        self.token_s = dict(sorted((int(k), float(v)) for k, v in self.token_s.items()))
        self.other_chunks = {d: [float(c), float(e)] for d, (c, e) in self.other_chunks.items()
                             if d != self.compute_dtype}

    def chunks_s(self, dtype: str | None = None) -> tuple[float, float]:
        """(chunk_s, edge_chunk_s) of tables computing in `dtype`."""
        if dtype is not None and dtype in self.other_chunks:
            chunk, edge = self.other_chunks[dtype]
            return chunk, edge
        return self.chunk_s, self.edge_chunk_s

    def layer_token_s(self, length: int) -> float:
        """Seconds per token of the real lower layers in rows of `length` tokens."""
        ks = list(self.token_s)
        if length <= ks[0]:
            return self.token_s[ks[0]]
        for lo, hi in zip(ks, ks[1:]):
            if length <= hi:
                f = (length - lo) / (hi - lo)
                return self.token_s[lo] * (1 - f) + self.token_s[hi] * f
        return self.token_s[ks[-1]]

    def misses_s(self, plain: float, edge: float, dtype: str | None = None) -> float:
        """Seconds to compute `plain` trigrams without and `edge` with an edge id (in `dtype`)."""
        chunk, edge_chunk = self.chunks_s(dtype)
        return math.ceil(plain / COMPUTE_CHUNK) * chunk + math.ceil(edge / COMPUTE_CHUNK) * edge_chunk

    def choose_layers(self, plain: np.ndarray, edge: np.ndarray, tokens: np.ndarray, length: int,
                      warm_budget: float = 0.0, dtype: str | None = None) -> np.ndarray:
        """Which rows of one padded bucket (length `length`) go to the real lower layers: bool [B].
        plain / edge [B]: each row's trigrams that neither the table nor the miss cache holds; tokens
        [B]: its real tokens. Rows are taken in order of their miss cost, and the split with the least
        predicted time wins (a tie keeps the table, which caches what it computes); warm_budget w lets
        the table's side be up to (1 + w) times dearer and still be chosen, so it computes and caches
        more of the traffic's trigrams (0: never predicted slower than the real layers). dtype: the table's
        compute dtype (its misses' cost)."""
        b = len(tokens)
        order = np.argsort(-(plain + edge), kind="stable")
        p_rest = np.concatenate([np.cumsum(plain[order][::-1])[::-1], [0]])          # [B + 1]: rows k.. of order
        e_rest = np.concatenate([np.cumsum(edge[order][::-1])[::-1], [0]])
        t_rest = np.concatenate([np.cumsum(tokens[order][::-1])[::-1], [0]])
        per_row = length * self.layer_token_s(length)
        best_k, best = 0, math.inf
        for k in range(b + 1):                          # the first k rows of `order` on the real layers
            table = self.misses_s(p_rest[k], e_rest[k], dtype) + self.table_token_s * t_rest[k]
            total = table / (1.0 + warm_budget) + k * per_row
            if total < best - 1e-12:
                best_k, best = k, total
        out = np.zeros(b, dtype=bool)
        out[order[:best_k]] = True
        return out

    def observe(self, kind: str, seconds: float, count: float, length: int = 0, weight: float = 0.2,
                dtype: str | None = None) -> None:
        """Fold a timed step into the estimate (exponential average): kind "layers" (count tokens at
        `length`, credited to the nearest measured length), "chunk" / "edge_chunk" (count chunks, computed in
        `dtype`) or "table" (count tokens, the table path without its computed misses)."""
        if count <= 0 or seconds < 0:
            return
        per = seconds / count
        if kind == "layers":
            key = min(self.token_s, key=lambda k: abs(k - length))
            per *= self.token_s[key] / max(self.layer_token_s(length), 1e-12)   # as if measured at `key`
            self.token_s[key] += weight * (per - self.token_s[key])
        elif kind in ("chunk", "edge_chunk"):
            i = 0 if kind == "chunk" else 1
            if dtype is not None and dtype in self.other_chunks:
                self.other_chunks[dtype][i] += weight * (per - self.other_chunks[dtype][i])
            else:
                name = ("chunk_s", "edge_chunk_s")[i]
                setattr(self, name, getattr(self, name) + weight * (per - getattr(self, name)))
        elif kind == "table":
            self.table_token_s += weight * (per - self.table_token_s)
        else:
            raise ValueError(f"unknown cost kind {kind!r}")

    def to_dict(self) -> dict:
        return {"chunk_s": self.chunk_s, "edge_chunk_s": self.edge_chunk_s,
                "token_s": {str(k): v for k, v in self.token_s.items()}, "table_token_s": self.table_token_s,
                "compute_dtype": self.compute_dtype, "other_chunks": {d: list(v) for d, v in self.other_chunks.items()}}


class SkipTable:
    """One named set of shallow layers with its n-gram table (or none) and miss cache."""

    def __init__(self, name: str, shallow: ShallowModel, meta: ShallowMeta, table: NgramTable | None,
                 cache_entries: int, dtype: torch.dtype, device: torch.device):
        self.name, self.shallow, self.meta, self.table = name, shallow.to(device), meta, table
        self.bits = key_bits(shallow.spec.vocab_size)
        self.dtype = TABLE_DTYPES[table.meta.dtype] if table is not None else dtype
        # a table's entries were computed in its compute dtype: its misses are computed in the same one, so a
        # lookup and a computed miss give the same bits; without a table, what build-table would choose here
        self.compute_dtype = (table.meta.compute_dtype if table is not None
                              else resolve_compute_dtype("auto", device))
        self.computer = self.shallow.for_compute(self.compute_dtype)
        if self.compute_dtype == "bfloat16" and not fast_bfloat16(device):
            log.warning("skip table %r was computed in bfloat16, which this %s emulates (much slower than float32); "
                        "its misses are computed in bfloat16 too, so most rows will take the real lower layers. "
                        "Build the table on this machine (`vbert build-table --compute-dtype auto`) for it to pay "
                        "off here", name, torch.device(device).type.upper())
        self.cache = MissCache(cache_entries, (3, shallow.spec.hidden_size), self.dtype, device)
        self.counters = TableCounters()

    def compute(self, keys: torch.Tensor, timings: dict | None = None) -> torch.Tensor:
        """Slot outputs of trigram keys [N] computed by the shallow layers, as the table's entries were."""
        return compute_entries(self.computer, keys, self.bits, self.dtype, timings=timings)

    def known(self, keys: torch.Tensor) -> tuple[torch.Tensor, tuple | None]:
        """(bool [N]: which keys the table or the miss cache holds, the table lookup (pos, hit) or None
        without a table, for `slots` to reuse). No counters, nothing computed."""
        found = self.cache.find(keys) >= 0
        lookup = None
        if self.table is not None:
            lookup = self.table.lookup(keys)
            found |= lookup[1]
        return found, lookup

    @torch.inference_mode()
    def slots(self, keys: torch.Tensor, mode: str, force: bool = False, timings: dict | None = None,
              lookup: tuple | None = None) -> torch.Tensor:
        """Slot outputs [N, 3, H] of unique trigram keys [N], from the table, the miss cache, or
        computed (exact mode, and anything fallback cannot find), computed ones cached. `lookup`: the
        table lookup of these keys, if already made (known())."""
        c = self.counters
        n = keys.shape[0]
        c.lookups += n
        if force:
            c.computed += n
            return self.compute(keys, timings)
        out = None
        todo = torch.ones(n, dtype=torch.bool, device=keys.device)
        if self.table is not None:
            pos, hit = lookup if lookup is not None else self.table.lookup(keys)
            hits = int(hit.sum())
            c.table_hits += hits
            if hits == n:                              # everything in the table: one gather
                return self.table.values[pos]
            out = torch.empty((n, 3, self.shallow.spec.hidden_size), dtype=self.dtype, device=keys.device)
            out[hit] = self.table.values[pos[hit]]
            todo &= ~hit
        if out is None:
            out = torch.empty((n, 3, self.shallow.spec.hidden_size), dtype=self.dtype, device=keys.device)
        if mode == "fallback" and self.table is not None and bool(todo.any()):
            idx = todo.nonzero().squeeze(1)
            remaining = torch.ones_like(idx, dtype=torch.bool)
            for alt in fallback_keys(keys[idx], self.bits, self.shallow.edge_id):   # left bigram, right, unigram
                pos, hit = self.table.lookup(alt)
                hit &= remaining
                out[idx[hit]] = self.table.values[pos[hit]]
                remaining &= ~hit
                c.fallback += int(hit.sum())
            todo[idx[~remaining]] = False
        if bool(todo.any()):
            idx = todo.nonzero().squeeze(1)
            pos = self.cache.find(keys[idx])
            found = pos >= 0
            out[idx[found]] = self.cache.values[pos[found]]
            c.cache_hits += int(found.sum())
            idx = idx[~found]
            if idx.numel():
                values = self.compute(keys[idx], timings)
                out[idx] = values
                self.cache.insert(keys[idx], values)
                c.computed += idx.numel()
        return out

    def nbytes(self) -> int:
        return (self.table.nbytes() if self.table is not None else 0) + self.cache.values.nbytes

    def cache_metadata(self) -> dict[str, str]:
        """What a saved miss cache of this table is valid for: the entries are the shallow layers' outputs,
        computed in the same dtype, so the same weights and compute dtype (a rebuilt table keeps them valid)."""
        return {"weights_hash": self.meta.weights_hash, "compute_dtype": self.compute_dtype}


LowerLayers = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(input_ids, token_type_ids, mask) of some rows -> their layer-k states from the real lower layers."""


class SkipRuntime:
    """The lower layers of skip mode for every configured table; rows of a batch may use different
    tables (row_tables), and all rows then share the upper layers.

    route: "cost" (exact mode: each row the cheaper way, table or real lower layers, from `costs`),
    "table" (every row from its table) or "layers" (every row on the real lower layers: the full
    model's states). Fallback mode always uses the table (its misses cost no compute)."""

    def __init__(self, tables: dict[str, SkipTable], mode: str = "exact", default: str | None = None,
                 route: str = "cost", warm_budget: float = 0.0, costs: SkipCosts | None = None):
        if mode not in SKIP_MODES:
            raise SkipError(f"skip mode {mode!r} is not one of {SKIP_MODES}")
        if route not in SKIP_ROUTES:
            raise SkipError(f"skip route {route!r} is not one of {SKIP_ROUTES}")
        if not tables:
            raise SkipError("skip mode needs at least one table")
        if warm_budget < 0:
            raise SkipError(f"warm_budget must be >= 0, got {warm_budget}")
        layers = {t.meta.skip_layers for t in tables.values()}
        if len(layers) != 1:
            raise SkipError(f"all shallow layer sets must replace the same number of layers, got {sorted(layers)}")
        self.tables = tables
        self.names = list(tables)
        self.mode, self.route, self.warm_budget = mode, route, warm_budget
        self.costs = costs
        self.timed = True             # fold measured step times into `costs` (wall clock: CPU only)
        self.default = default if default is not None else self.names[0]
        if self.default not in tables:
            raise SkipError(f"default table {self.default!r} is not one of {self.names}")
        self.skip_layers = layers.pop()
        self.force = False            # True: ignore tables and caches, compute every trigram

    @staticmethod
    def cache_file(directory: str | Path, name: str) -> Path:
        """Where table `name`'s miss cache is kept between runs."""
        return Path(directory) / f"{name}.misses.safetensors"

    def save_caches(self, directory: str | Path) -> dict[str, int]:
        """Write every table's miss cache to `directory` (atomically, one file per table, keyed to its
        shallow weights); returns the entries written per table."""
        return {name: t.cache.save(self.cache_file(directory, name), t.cache_metadata())
                for name, t in self.tables.items()}

    def restore_caches(self, directory: str | Path) -> dict[str, int | str]:
        """Fill the (empty) miss caches from `directory`: per table the entries restored, or why none were
        (no file yet; a file for other shallow weights or otherwise unusable: left as it is, and
        overwritten by the next save_caches)."""
        out: dict[str, int | str] = {}
        for name, t in self.tables.items():
            path = self.cache_file(directory, name)
            if not path.is_file():
                out[name] = "no saved cache"
                continue
            try:
                out[name] = t.cache.restore(path, t.cache_metadata(), defaults={"compute_dtype": "float32"})
            except ValueError as e:
                out[name] = f"{path} not used: {e}"
        return out

    def index_of(self, name: str | None) -> int:
        name = self.default if name is None else name
        if name not in self.tables:
            raise SkipError(f"table {name!r} is not loaded (loaded: {self.names})")
        return self.names.index(name)

    @torch.inference_mode()
    def calibrate(self, lower: LowerLayers, max_length: int, device: torch.device, synchronize=lambda: None,
                  tokens: int = 512) -> SkipCosts:
        """Measure both ways once (a chunk of trigrams with and without an edge id, in each compute dtype the
        tables use, the default table's first; the real lower layers at lengths 8, 32, 128, ... max_length on about
        `tokens` tokens each) and keep them as `costs`. `synchronize` waits for the device (CUDA) before a clock
        is read."""
        table = self.tables[self.default]
        vocab = table.shallow.spec.vocab_size
        g = torch.Generator().manual_seed(0)

        def best_of(fn, reps=2):
            fn()                                       # warm-up: first calls allocate
            times = []
            for _ in range(reps):
                synchronize()
                t0 = time.perf_counter()
                fn()
                synchronize()
                times.append(time.perf_counter() - t0)
            return min(times)

        chunks: dict[str, tuple[float, float]] = {}
        for t in [table] + [t for t in self.tables.values() if t is not table]:
            if t.compute_dtype in chunks:
                continue
            edge = t.shallow.edge_id
            ids = torch.randint(0, vocab, (COMPUTE_CHUNK, 3), generator=g)
            ids[ids == edge] = (edge + 1) % vocab
            edged_ids = ids.clone()
            edged_ids[:, 0] = edge
            plain, edged = pack(ids, t.bits).to(device), pack(edged_ids, t.bits).to(device)
            chunks[t.compute_dtype] = (best_of(lambda: t.compute(plain)), best_of(lambda: t.compute(edged)))
        token_s = {}
        length = 8
        while True:
            length = min(length, max_length)
            rows = max(1, tokens // length)
            x = torch.randint(0, vocab, (rows, length), generator=g).to(device)
            types = torch.zeros_like(x)
            mask = torch.ones_like(x, dtype=torch.bool)
            token_s[length] = best_of(lambda: lower(x, types, mask)) / (rows * length)
            if length >= max_length:
                break
            length *= 4                                # interpolated in between
        chunk_s, edge_chunk_s = chunks[table.compute_dtype]
        self.costs = SkipCosts(chunk_s, edge_chunk_s, token_s, compute_dtype=table.compute_dtype,
                               other_chunks={d: list(c) for d, c in chunks.items() if d != table.compute_dtype})
        return self.costs

    @torch.inference_mode()
    def lower_states(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, mask: torch.Tensor,
                     row_tables: Sequence[int] | np.ndarray, dtype: torch.dtype,
                     lower: LowerLayers | None = None, table_only: np.ndarray | None = None) -> torch.Tensor:
        """The input of layer k for a padded batch: [B, L, H] in `dtype`. row_tables[b]: the index
        (into self.names) of the table row b uses. `lower` runs the real lower layers (needed unless
        the route is "table"); rows the route sends there get exactly the full model's states.
        table_only[b]: the cost route keeps row b on the table (its adapter was trained on the merged
        states, so the real layers would change its function; route "layers" still moves it)."""
        row_tables = np.asarray(row_tables, dtype=np.int64)
        bsz, seq = input_ids.shape
        route = self.route if lower is not None else "table"
        if self.force or self.mode == "fallback":
            route = "table"
        if route == "cost" and self.costs is None:
            raise SkipError("skip route 'cost' needs measured costs: call calibrate() first")
        used = np.unique(row_tables).tolist()
        on_layers = np.zeros(bsz, dtype=bool)
        groups = []                                    # (table, rows or None for all, keys [b, L])
        for t in used:
            table = self.tables[self.names[t]]
            rows = None if len(used) == 1 else np.nonzero(row_tables == t)[0]
            if rows is None:
                ids_t, mask_t = input_ids, mask
            else:
                r = torch.from_numpy(rows).to(input_ids.device)
                ids_t, mask_t = input_ids[r], mask[r]
            keys = pack(trigram_ids(ids_t, mask_t, table.shallow.edge_id), table.bits)                # [b, L]
            probe = None
            if route == "layers":
                choice = np.ones(ids_t.shape[0], dtype=bool)
            elif route == "cost":
                pinned = None
                if table_only is not None:
                    pinned = np.asarray(table_only, dtype=bool)
                    pinned = pinned if rows is None else pinned[rows]
                choice, probe = self._choose(table, keys, mask_t, seq, pinned)
            else:
                choice = np.zeros(ids_t.shape[0], dtype=bool)
            c = table.counters
            c.rows_layers += int(choice.sum())
            c.rows_table += int((~choice).sum())
            c.layer_tokens += int(mask_t[torch.from_numpy(choice).to(mask_t.device)].sum()) if choice.any() else 0
            if rows is None:
                on_layers[:] = choice
            else:
                on_layers[rows] = choice
            groups.append((table, rows, keys, choice, probe))
        if not on_layers.any() and len(groups) == 1:   # the common case: no row gathering at all
            table, _, keys, _, probe = groups[0]           # (the probe's unique keys and lookup reused)
            return self._timed_table(table, keys, token_type_ids, mask, probe).to(dtype)
        if on_layers.all():
            return self._timed_layers(lower, input_ids, token_type_ids, mask, seq).to(dtype)
        h = next(iter(self.tables.values())).shallow.spec.hidden_size
        out = torch.empty((bsz, seq, h), dtype=dtype, device=input_ids.device)
        for table, rows, keys, choice, _ in groups:
            idx = np.arange(bsz) if rows is None else rows
            keep = ~choice
            if not keep.any():
                continue
            r = torch.from_numpy(idx[keep]).to(input_ids.device)
            k = torch.from_numpy(np.nonzero(keep)[0]).to(keys.device)
            out[r] = self._timed_table(table, keys[k], token_type_ids[r], mask[r]).to(dtype)
        if on_layers.any():
            r = torch.from_numpy(np.nonzero(on_layers)[0]).to(input_ids.device)
            out[r] = self._timed_layers(lower, input_ids[r], token_type_ids[r], mask[r], seq).to(dtype)
        return out

    def _choose(self, table: SkipTable, keys: torch.Tensor, mask: torch.Tensor, seq: int,
                pinned: np.ndarray | None = None) -> tuple[np.ndarray, tuple]:
        """Per row of one table: True where the real lower layers are predicted cheaper; and the probe
        (unique keys, inverse, table lookup) for the table path to reuse when every row stays."""
        unique, inverse = torch.unique(keys[mask], return_inverse=True)
        known, lookup = table.known(unique)
        c = table.counters
        c.probed += unique.numel()
        c.probed_known += int(known.sum())
        missing = torch.zeros(keys.shape, dtype=torch.bool, device=keys.device)
        missing[mask] = ~known[inverse]
        edged = (unpack(keys, table.bits) == table.shallow.edge_id).any(-1) & mask                  # [b, L]
        plain = (missing & ~edged).sum(1).cpu().numpy().astype(np.float64)
        edge = (missing & edged).sum(1).cpu().numpy().astype(np.float64)
        tokens = mask.sum(1).cpu().numpy().astype(np.float64)
        free = np.ones(len(tokens), dtype=bool) if pinned is None else ~pinned
        choice = np.zeros(len(tokens), dtype=bool)
        if free.any():                                 # pinned rows' misses are paid anyway: not in the choice
            choice[free] = self.costs.choose_layers(plain[free], edge[free], tokens[free], seq, self.warm_budget,
                                                    table.compute_dtype)
        return choice, (unique, inverse, lookup)

    def _timed_layers(self, lower: LowerLayers, ids, types, mask, seq: int) -> torch.Tensor:
        t0 = time.perf_counter()
        out = lower(ids, types, mask)
        if self.timed and self.costs is not None:
            self.costs.observe("layers", time.perf_counter() - t0, ids.shape[0] * seq, seq)
        return out

    def _timed_table(self, table: SkipTable, keys: torch.Tensor, types: torch.Tensor, mask: torch.Tensor,
                     probe: tuple | None = None) -> torch.Tensor:
        timings = {} if self.timed and self.costs is not None else None
        t0 = time.perf_counter()
        out = self._lower(table, keys, types, mask, timings, probe)
        if timings is not None:
            spent = time.perf_counter() - t0
            for kind, (seconds, chunks) in timings.items():
                self.costs.observe(kind, seconds, chunks, dtype=table.compute_dtype)
                spent -= seconds
            self.costs.observe("table", max(spent, 0.0), keys.numel())
        return out

    def _lower(self, table: SkipTable, keys: torch.Tensor, types: torch.Tensor, mask: torch.Tensor,
               timings: dict | None = None, probe: tuple | None = None) -> torch.Tensor:
        """Rows of one table (their trigram keys [b, L]): unique keys, their slot outputs, merged ->
        [b, L, H] float32. probe: (unique, inverse, lookup) of exactly these rows' keys, if made."""
        bsz, seq = keys.shape
        all_real = bool(mask.all())
        if probe is None:
            real_keys = keys.reshape(-1) if all_real else keys[mask]                                # [n]
            unique, inverse = torch.unique(real_keys, return_inverse=True)
            lookup = None
        else:
            unique, inverse, lookup = probe
        table.counters.tokens += inverse.numel()
        values = table.slots(unique, self.mode, self.force, timings, lookup)                       # [U, 3, H]
        if all_real:
            slots = values[inverse].view(bsz, seq, 3, -1)
        else:
            slots = torch.zeros((bsz, seq, *values.shape[1:]), dtype=values.dtype, device=keys.device)
            slots[mask] = values[inverse]
        return table.shallow.merge(slots, types)

    def stats(self) -> dict:
        return {name: {**asdict(t.counters), "hit_rate": t.counters.hit_rate(), "coverage": t.counters.coverage(),
                       "table_entries": len(t.table.keys) if t.table is not None else 0,
                       "compute_dtype": t.compute_dtype,
                       "cache": t.cache.stats(), "bytes": t.nbytes()} for name, t in self.tables.items()}


def open_table(name: str, shallow_dir: str | Path, table_path: str | Path | None, teacher, device: torch.device,
               cache_entries: int, dtype: str = "float32") -> SkipTable:
    """Load shallow layers (checked against `teacher`) and their table (checked against the layers)."""
    model, meta = load_shallow(shallow_dir, teacher)
    table = None
    if table_path is not None:
        table = load_table(table_path, weights_hash=meta.weights_hash, device=device)
        if table.meta.edge_id != meta.edge_id or table.meta.hidden_size != model.spec.hidden_size:
            raise TableError(f"table {table_path}: built for another edge id or hidden size")
    return SkipTable(name, model, meta, table, cache_entries, TABLE_DTYPES[dtype], device)


__all__ = ["LowerLayers", "SkipCosts", "SkipRuntime", "SkipTable", "TableCounters", "open_table"]
