"""Waiting requests by deadline, shared by the encoder policy (scheduler/policy.py) and the generation policy
(scheduler/generation_policy.py). Pure Python, no torch.

A heap of (deadline, request id, request) with lazy deletion: a request that left the queue (admitted,
cancelled) keeps its entry, which is skipped when its time comes, and the entries of requests no longer waiting
are compacted away when they outnumber the waiting ones. A step's check costs O(log n) per request due, not a
scan of every queue.
"""
from __future__ import annotations

import heapq
from typing import Callable

from .types import Request, RequestStatus


class Deadlines:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Request]] = []

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, request: Request) -> None:
        """Track a request that is (again) waiting (a request tracked twice is returned once)."""
        heapq.heappush(self._heap, (request.deadline, request.request_id, request))

    def due(self, now: float, is_waiting: Callable[[Request], bool], num_waiting: int) -> list[Request]:
        """The tracked requests whose deadline is <= now and that `is_waiting` still holds waiting, oldest
        deadline first (their entries are removed). `num_waiting`: how many requests wait, for compaction."""
        out, seen = [], set()
        while self._heap and self._heap[0][0] <= now:
            req = heapq.heappop(self._heap)[2]
            if req.request_id not in seen and is_waiting(req):   # a request tracked twice is returned once
                seen.add(req.request_id)
                out.append(req)
        if len(self._heap) > 2 * num_waiting + 1024:
            self._heap = [e for e in self._heap if e[2].status is RequestStatus.WAITING]
            heapq.heapify(self._heap)
        return out
