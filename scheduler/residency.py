"""The policy's view of the adapter cache (scheduler.adapter_waits.Residency over manager.cache.TieredCache):
which adapters are resident, bounded asynchronous loads, and how many adapters one step may use."""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future

from manager.cache import CacheFullError, TieredCache


class CacheResidency:
    """The policy's view of the adapter cache: is an adapter resident; start loading some.

    Loads are bounded: at most `max_outstanding` adapters are loading or loaded-but-unclaimed at a
    time, and a loaded adapter stays held (cannot be evicted) until the step that uses it takes its
    own hold (`claimed`) or `hold_s` passes. Without the bound, asking for every parked adapter at
    once makes later loads evict earlier ones before any step uses them."""

    def __init__(self, cache: TieredCache, on_change, max_outstanding: int, hold_s: float = 2.0):
        self.cache, self.on_change = cache, on_change
        self.max_outstanding, self.hold_s = max_outstanding, hold_s
        self.failed: dict[int, BaseException] = {}
        self._loading: set[int] = set()
        self._held: dict[int, float] = {}      # adapter id -> when its load finished
        self._lock = threading.Lock()

    def is_resident(self, adapter_id: int) -> bool:
        return self.cache.is_resident(adapter_id)

    def request(self, adapter_ids: list[int]) -> None:
        self.expire()
        start = []
        with self._lock:
            for a in adapter_ids:
                if len(self._loading) + len(self._held) >= self.max_outstanding:
                    break
                if a not in self._loading and a not in self._held:
                    self._loading.add(a)
                    start.append(a)
        for a in start:   # one by one: a broken adapter must not block the others
            self.cache.prefetch([a]).add_done_callback(lambda f, a=a: self._loaded(a, f))

    def _loaded(self, adapter_id: int, fut: Future) -> None:
        exc = fut.exception()
        with self._lock:
            self._loading.discard(adapter_id)
            if exc is None:
                self._held[adapter_id] = time.monotonic()
            elif not isinstance(exc, CacheFullError):   # full: the policy asks again later
                self.failed[adapter_id] = exc
        self.on_change()

    def claimed(self, adapter_ids) -> None:
        """A step holds these now: give back the prefetch holds."""
        with self._lock:
            mine = [a for a in adapter_ids if self._held.pop(a, None) is not None]
        if mine:
            self.cache.release(mine)

    def expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            old = [a for a, t in self._held.items() if now - t > self.hold_s]
            for a in old:
                del self._held[a]
        if old:
            self.cache.release(old)

    def close(self) -> None:
        with self._lock:
            held, self._held = list(self._held), {}
        if held:
            self.cache.release(held)

    def take_failures(self) -> dict[int, BaseException]:
        with self._lock:
            failed, self.failed = self.failed, {}
        return failed


def adapters_per_step(cache: TieredCache | None, is_pipelined: bool) -> int | None:
    """How many distinct adapters one step may use so that its adapters fit on the device: the
    smallest non-empty bank, halved when pipelining (the step computing and the next one each
    hold theirs)."""
    if cache is None:
        return None
    banks = [n for n in cache.pool.capacity.values() if n > 0]
    if not banks:
        return None
    return max(1, min(banks) // 2) if is_pipelined else min(banks)
