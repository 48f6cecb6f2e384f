"""The tiered adapter cache: device pool slots <- host memory <- disk store.

- device tier: a slot pool's slots (count-limited per adapter kind), LRU: the encoder's vbert AdapterPool
  or the decoder's vbert.decoder_lora.DecoderLoraPool (anything with the SlotPool interface);
- host tier: decoded artifacts in host memory (pinned under CUDA), LRU within a byte budget;
- disk tier: the adapter store, read through the `loader` callable given at construction.

Residency protocol for the engine (a step never blocks on a disk read):
    fut = cache.prefetch(ids)    # async: loads missing adapters on loader threads, HOLDS each id
    ...                          # the engine keeps scheduling other work meanwhile
    slots = cache.resolve(ids)   # once fut is done: slot of every id (NotResidentError if not)
    ...forward...
    cache.release(ids)           # drop the holds taken by prefetch
A held or pinned adapter is never evicted, so a batch in flight keeps its slots. `use(ids)` wraps
the three calls for synchronous callers.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter, OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Protocol, Sequence

from vbert.artifact import AdapterArtifact
from vbert.device import DeviceContext


class SlotPool(Protocol):
    """What the cache needs of a device pool (vbert.pool.AdapterPool, vbert.decoder_lora.DecoderLoraPool)."""

    device: DeviceContext

    @property
    def capacity(self) -> dict[str, int]: ...      # adapter kind -> slots

    def fits(self, artifact: AdapterArtifact) -> bool: ...

    def load(self, artifact: AdapterArtifact, stream=None) -> int: ...   # -> slot (0 is "no adapter")

    def unload(self, slot: int) -> None: ...


class NotResidentError(RuntimeError):
    def __init__(self, missing: Sequence[int]):
        super().__init__(f"adapters {sorted(missing)} are not resident on the device")
        self.missing = list(missing)


class CacheFullError(RuntimeError):
    """Every device slot of the kind needed is pinned or held by a batch in flight."""


@dataclass(frozen=True)
class CacheConfig:
    host_budget_bytes: int = 2 * 1024 ** 3
    num_loader_threads: int = 2

    def __post_init__(self) -> None:
        if self.host_budget_bytes < 0:
            raise ValueError(f"host_budget_bytes must be >= 0, got {self.host_budget_bytes}")
        if self.num_loader_threads < 1:
            raise ValueError(f"num_loader_threads must be >= 1, got {self.num_loader_threads}")


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    loads: int = 0
    load_seconds: float = 0.0
    errors: int = 0


@dataclass
class _Tiers:
    device: OrderedDict = field(default_factory=OrderedDict)   # adapter id -> slot, LRU first
    kinds: dict = field(default_factory=dict)                  # adapter id -> kind on device
    events: dict = field(default_factory=dict)                 # adapter id -> upload event (CUDA)
    host: OrderedDict = field(default_factory=OrderedDict)     # adapter id -> AdapterArtifact
    host_bytes: int = 0


class TieredCache:
    def __init__(self, config: CacheConfig, pool: SlotPool, loader: Callable[[int], AdapterArtifact]):
        self.config, self.pool, self.loader = config, pool, loader
        self.device = pool.device
        self._lock = threading.RLock()
        self._t = _Tiers()
        self._holds: Counter = Counter()
        self._pinned: set[int] = set()
        self._doomed: set[int] = set()
        self._pending: dict[int, Future] = {}
        self._stats = {"device": TierStats(), "host": TierStats(), "disk": TierStats()}
        self._executor = ThreadPoolExecutor(config.num_loader_threads, thread_name_prefix="adapter-loader")
        self._stream = self.device.new_stream()

    # -- the residency protocol ----------------------------------------------------------------
    def prefetch(self, adapter_ids: Iterable[int]) -> Future:
        """Make the adapters device-resident; the returned future completes when all are, or fails
        with the first loading error (e.g. CorruptAdapterError, CacheFullError) once every id has
        finished loading or failing; the ids that did load are then released again. On success
        each id is held until `release`."""
        ids = list(adapter_ids)
        outer: Future = Future()
        if not ids:
            outer.set_result(None)
            return outer
        remaining = [len(ids)]
        held: list[int] = []
        errors: list[BaseException] = []
        gate = threading.Lock()

        def done(adapter_id: int, inner: Future) -> None:
            exc = inner.exception()
            with gate:
                if exc is None:
                    held.append(adapter_id)
                else:
                    errors.append(exc)
                remaining[0] -= 1
                finished = remaining[0] == 0
            if not finished:
                return
            # Settle only once every id has finished, so that a caller who sees the failure also
            # sees its holds given back (no load still in flight that would take a hold later).
            if errors:
                self.release(held)
                outer.set_exception(errors[0])
            else:
                outer.set_result(None)

        for adapter_id in ids:
            self._request(adapter_id).add_done_callback(lambda f, a=adapter_id: done(a, f))
        return outer

    def _request(self, adapter_id: int) -> Future:
        """A future for one id that completes once it is resident AND held for the caller."""
        with self._lock:
            if adapter_id in self._t.device:
                self._stats["device"].hits += 1
                self._t.device.move_to_end(adapter_id)
                self._holds[adapter_id] += 1
                f: Future = Future()
                f.set_result(None)
                return f
            pending = self._pending.get(adapter_id)
            if pending is None:
                self._stats["device"].misses += 1
                pending = self._executor.submit(self._load, adapter_id)
                self._pending[adapter_id] = pending
        mine: Future = Future()

        def hold(f: Future) -> None:
            if f.exception() is not None:
                mine.set_exception(f.exception())
                return
            with self._lock:
                if adapter_id in self._t.device:
                    self._holds[adapter_id] += 1
                    ok = True
                else:
                    ok = False
            if ok:
                mine.set_result(None)
            else:   # evicted or invalidated between load and hold: try again
                self._request(adapter_id).add_done_callback(
                    lambda g: mine.set_exception(g.exception()) if g.exception() else mine.set_result(None))

        pending.add_done_callback(hold)
        return mine

    def resolve(self, adapter_ids: Sequence[int]) -> list[int]:
        """Slot of each id (all must be resident: prefetched and held)."""
        with self._lock:
            missing = [a for a in adapter_ids if a not in self._t.device]
            if missing:
                raise NotResidentError(missing)
            slots = []
            for a in adapter_ids:
                self._t.device.move_to_end(a)
                slots.append(self._t.device[a])
            events = [self._t.events.get(a) for a in adapter_ids]
        for e in events:
            self.device.wait_event(e)
        return slots

    def release(self, adapter_ids: Iterable[int]) -> None:
        with self._lock:
            for a in adapter_ids:
                if self._holds[a] <= 0:
                    raise RuntimeError(f"release of adapter {a} without a hold")
                self._holds[a] -= 1
                if self._holds[a] == 0:
                    del self._holds[a]
                    if a in self._doomed:
                        self._drop_device(a)
                        self._doomed.discard(a)

    @contextlib.contextmanager
    def use(self, adapter_ids: Sequence[int], timeout: float | None = None):
        """Synchronous prefetch + resolve + release around a block; yields the slots."""
        self.prefetch(adapter_ids).result(timeout)
        try:
            yield self.resolve(adapter_ids)
        finally:
            self.release(adapter_ids)

    # -- pinning and invalidation --------------------------------------------------------------
    def pin(self, adapter_id: int) -> Future:
        """Keep the adapter on the device until unpinned (loads it if needed)."""
        with self._lock:
            self._pinned.add(adapter_id)
        fut = self.prefetch([adapter_id])
        fut.add_done_callback(lambda f: f.exception() is None and self.release([adapter_id]))
        return fut

    def unpin(self, adapter_id: int) -> None:
        with self._lock:
            self._pinned.discard(adapter_id)

    def invalidate(self, adapter_id: int) -> None:
        """Remove from every tier (deleted adapter or tenant). If a batch in flight holds it, the
        device slot is freed when the last hold is released."""
        with self._lock:
            self._pinned.discard(adapter_id)
            art = self._t.host.pop(adapter_id, None)
            if art is not None:
                self._t.host_bytes -= art.nbytes()
            if adapter_id in self._t.device:
                if self._holds.get(adapter_id):
                    self._doomed.add(adapter_id)
                else:
                    self._drop_device(adapter_id)
            elif adapter_id in self._pending:
                self._doomed.add(adapter_id)

    # -- loading (loader threads) ------------------------------------------------------------------
    def _load(self, adapter_id: int) -> None:
        try:
            art = self._host_get(adapter_id)
            with self._lock:
                if adapter_id in self._t.device:
                    return
                kind = art.kind
                while not self.pool.fits(art):        # a Houlsby bottleneck needs two bank entries
                    self._evict_device_lru(kind)
                t0 = time.perf_counter()
                slot = self.pool.load(art, self._stream)
                self._t.events[adapter_id] = self.device.record_event(self._stream)
                st = self._stats["device"]
                st.loads += 1
                st.load_seconds += time.perf_counter() - t0
                self._t.device[adapter_id] = slot
                self._t.kinds[adapter_id] = kind
                if adapter_id in self._doomed and not self._holds.get(adapter_id):
                    self._doomed.discard(adapter_id)   # invalidated while loading
                    self._drop_device(adapter_id)
        finally:
            with self._lock:
                self._pending.pop(adapter_id, None)

    def _host_get(self, adapter_id: int) -> AdapterArtifact:
        with self._lock:
            art = self._t.host.get(adapter_id)
            if art is not None:
                self._stats["host"].hits += 1
                self._t.host.move_to_end(adapter_id)
                return art
            self._stats["host"].misses += 1
        t0 = time.perf_counter()
        try:
            art = self.loader(adapter_id)
        except Exception:
            with self._lock:
                self._stats["disk"].errors += 1
            raise
        if self.device.is_cuda:
            art = art.map_tensors(self.device.host_tensor)
        with self._lock:
            st = self._stats["disk"]
            st.loads += 1
            st.load_seconds += time.perf_counter() - t0
            size = art.nbytes()
            if size <= self.config.host_budget_bytes:
                self._t.host[adapter_id] = art
                self._t.host_bytes += size
                while self._t.host_bytes > self.config.host_budget_bytes:
                    _, old = self._t.host.popitem(last=False)
                    self._t.host_bytes -= old.nbytes()
                    self._stats["host"].evictions += 1
        return art

    def _evict_device_lru(self, kind: str) -> None:
        for a in self._t.device:   # least recently used first
            same_bank = kind == "none" or self._t.kinds[a] == kind
            if same_bank and a not in self._pinned and not self._holds.get(a):
                self._drop_device(a)
                self._stats["device"].evictions += 1
                return
        raise CacheFullError(f"every device slot for {kind} adapters is pinned or in use "
                             f"({self.pool.capacity} slots)")

    def _drop_device(self, adapter_id: int) -> None:
        slot = self._t.device.pop(adapter_id)
        self._t.kinds.pop(adapter_id, None)
        self._t.events.pop(adapter_id, None)
        self.pool.unload(slot)

    # -- observability -------------------------------------------------------------------------
    def is_resident(self, adapter_id: int) -> bool:
        with self._lock:
            return adapter_id in self._t.device

    def is_pinned(self, adapter_id: int) -> bool:
        with self._lock:
            return adapter_id in self._pinned

    def stats(self) -> dict:
        with self._lock:
            out = {tier: asdict(s) for tier, s in self._stats.items()}
            out["device"].update(resident=len(self._t.device), pinned=len(self._pinned), held=len(self._holds))
            out["host"].update(resident=len(self._t.host), bytes=self._t.host_bytes)
            return out

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
