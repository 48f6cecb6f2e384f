"""The backlogged tenants ordered by their virtual token counter (VTC, Sheng et al. OSDI'24), shared by the
encoder policy (scheduler/policy.py) and the generation policy (scheduler/generation_policy.py). Pure Python,
no torch.

A binary heap of (counter, sequence number, tenant) with lazy deletion: re-keying a tenant (its counter grew) or
dropping it only marks its old entry stale (the tenant's `heap_seq` no longer matches), and stale entries are
skipped at the top and compacted away when they outnumber the live ones. Every operation is O(log n) amortized,
so a step's admissions cost the same with ten tenants as with ten thousand. Equal counters leave in the order
they were (re)keyed.
"""
from __future__ import annotations

import heapq
from typing import Protocol


class Tenant(Protocol):
    counter: float
    heap_seq: int | None          # the sequence number of its live entry; None when not in the queue


class FairQueue:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Tenant]] = []
        self._seq = 0
        self._live = 0

    def __len__(self) -> int:
        return self._live

    def __contains__(self, tenant: Tenant) -> bool:
        return tenant.heap_seq is not None

    def push(self, tenant: Tenant) -> None:
        """Insert the tenant, or re-key it with its current counter."""
        if tenant.heap_seq is None:
            self._live += 1
        self._seq += 1
        tenant.heap_seq = self._seq
        heapq.heappush(self._heap, (tenant.counter, self._seq, tenant))
        if len(self._heap) > 2 * self._live + 64:
            self._heap = [e for e in self._heap if e[2].heap_seq == e[1]]
            heapq.heapify(self._heap)

    def drop(self, tenant: Tenant) -> None:
        if tenant.heap_seq is not None:
            tenant.heap_seq = None
            self._live -= 1

    def _clean_top(self) -> None:
        while self._heap and self._heap[0][2].heap_seq != self._heap[0][1]:
            heapq.heappop(self._heap)

    def peek(self) -> Tenant | None:
        """The tenant with the smallest counter, left in the queue."""
        self._clean_top()
        return self._heap[0][2] if self._heap else None

    def pop(self) -> Tenant | None:
        """The tenant with the smallest counter, taken out of the queue."""
        tenant = self.peek()
        if tenant is not None:
            heapq.heappop(self._heap)
            self.drop(tenant)
        return tenant

    def min_counter(self) -> float | None:
        self._clean_top()
        return self._heap[0][0] if self._heap else None
