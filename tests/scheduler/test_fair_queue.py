"""The two structures both policies share: the VTC backlog (a lazy heap) and the deadline heap."""
from __future__ import annotations

import random
from dataclasses import dataclass

from scheduler.deadlines import Deadlines
from scheduler.fair_queue import FairQueue
from scheduler.types import Request, RequestStatus


@dataclass(eq=False)
class T:
    name: str
    counter: float = 0.0
    heap_seq: int | None = None


def test_smallest_counter_first_equal_counters_in_keying_order_and_rekeying():
    q = FairQueue()
    a, b, c = T("a", 5.0), T("b", 1.0), T("c", 1.0)
    for t in (a, b, c):
        q.push(t)
    assert len(q) == 3 and q.min_counter() == 1.0 and q.peek() is b
    b.counter = 9.0
    q.push(b)                                      # re-keyed: its old entry goes stale
    assert len(q) == 3 and [q.pop().name for _ in range(3)] == ["c", "a", "b"]
    assert q.pop() is None and q.min_counter() is None and len(q) == 0
    q.push(a)
    q.drop(a)
    assert a not in q and q.peek() is None and len(q) == 0


def test_many_rekeys_stay_correct_and_compact():
    rng = random.Random(0)
    tenants = [T(str(i), rng.random()) for i in range(50)]
    q = FairQueue()
    for t in tenants:
        q.push(t)
    for _ in range(5000):                          # charge the head, as a policy does, or drop and re-add one
        t = q.peek()
        t.counter += rng.random()
        q.push(t)
        if rng.random() < 0.1:
            other = rng.choice(tenants)
            q.drop(other)
            q.push(other)
        assert q.min_counter() == min(x.counter for x in tenants)
    assert len(q._heap) <= 2 * len(q) + 65 and len(q) == 50


def _req(deadline: float) -> Request:
    return Request(tenant_id=1, adapter_id=None, deadline=deadline, prompt_ids=[1])


def test_deadlines_return_the_due_waiting_requests_oldest_first():
    d = Deadlines()
    late, early, gone = _req(5.0), _req(1.0), _req(2.0)
    for r in (late, early, gone):
        d.add(r)
    gone.status = RequestStatus.RUNNING            # admitted before its deadline: skipped, not returned
    waiting = lambda r: r.status is RequestStatus.WAITING   # noqa: E731
    assert d.due(0.5, waiting, 3) == []
    assert d.due(3.0, waiting, 3) == [early] and len(d) == 1
    assert d.due(10.0, waiting, 3) == [late] and len(d) == 0
    again = _req(1.0)
    d.add(again)
    d.add(again)                                   # waiting again after a preemption: tracked twice
    assert d.due(2.0, waiting, 1) == [again]
