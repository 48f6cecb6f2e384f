"""The scheduling policy against a fake runner, a fake clock and a fake adapter residency (they stand in
for the torch runner and the adapter cache, which are other components)."""
from __future__ import annotations

import random
import subprocess
import sys
import threading

import pytest

from scheduler.config import SchedulerConfig
from scheduler.policy import QueueFullError, Scheduler
from scheduler.types import Request, RequestStatus, RowResult, ScheduledBatch, StepOutput

INF = float("inf")
NEW_TOKEN = 7


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, dt: float) -> None:
        self.now += dt


class FakeResidency:
    def __init__(self, resident=()):
        self.resident = set(resident)
        self.requested: list[int] = []

    def is_resident(self, adapter_id: int) -> bool:
        return adapter_id in self.resident

    def request(self, adapter_ids: list[int]) -> None:
        self.requested.extend(adapter_ids)


def fake_run(batch: ScheduledBatch) -> StepOutput:
    """The runner's contract: one RowResult per row; generative rows sample a token."""
    return StepOutput(batch.step, tuple(
        RowResult(r.request.request_id, output=("out", r.num_tokens),
                  new_token_id=NEW_TOKEN if r.request.is_generative else None) for r in batch.rows))


def req(tenant: int, num_tokens: int, *, adapter: int | None = None, deadline: float = INF,
        weight: float = 1.0, max_new_tokens: int = 0) -> Request:
    return Request(tenant_id=tenant, adapter_id=adapter, deadline=deadline, prompt_ids=[1] * num_tokens,
                   weight=weight, max_new_tokens=max_new_tokens)


def step(sched: Scheduler) -> tuple[ScheduledBatch, list[Request]]:
    batch = sched.schedule()
    return batch, sched.update(fake_run(batch))


def served(sched: Scheduler, tenant: int) -> int:
    return sched.stats()["tenants"][tenant]["num_served_tokens"]


def backlogged_counters(sched: Scheduler) -> dict[int, float]:
    return {t: s["virtual_counter"] for t, s in sched.stats()["tenants"].items() if s["num_waiting"]}


# -- config ---------------------------------------------------------------------------------------
def test_config_defaults_and_validation():
    cfg = SchedulerConfig()
    assert (cfg.max_tokens_per_step, cfg.max_rows_per_step, cfg.max_waiting, cfg.max_waiting_per_tenant,
            cfg.residency_retry_s) == (8192, 64, 10_000, 1000, 0.05)
    for bad in (dict(max_tokens_per_step=0), dict(max_rows_per_step=-1), dict(max_waiting=1.5),
                dict(max_waiting_per_tenant=True), dict(max_waiting=10, max_waiting_per_tenant=11),
                dict(residency_retry_s=-0.1), dict(residency_retry_s=INF), dict(max_skips_per_step=0)):
        with pytest.raises(ValueError):
            SchedulerConfig(**bad)


def test_policy_does_not_import_torch():
    code = "import scheduler.policy, sys; assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- budgets -------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_budgets_respected_on_random_workloads(seed):
    rng = random.Random(seed)
    cfg = SchedulerConfig(max_tokens_per_step=200, max_rows_per_step=8)
    sched = Scheduler(cfg, clock=FakeClock())
    requests = []
    for i in range(400):
        r = req(rng.randrange(12), rng.randint(1, 200), max_new_tokens=rng.choice([0, 0, 0, 3, 9]))
        requests.append(r)
    pending = list(requests)
    seen_running: set[int] = set()
    for _ in range(2000):
        for _ in range(rng.randint(0, 6)):
            if pending:
                sched.add(pending.pop())
        batch = sched.schedule()
        assert batch.num_tokens <= cfg.max_tokens_per_step and batch.num_rows <= cfg.max_rows_per_step
        ids = [r.request.request_id for r in batch.rows]
        assert len(ids) == len(set(ids))
        for row in batch.rows:
            assert row.request.status is RequestStatus.RUNNING
            is_decode = row.request.request_id in seen_running
            assert row.num_tokens == (1 if is_decode else len(row.request.prompt_ids))
            seen_running.add(row.request.request_id)
        sched.update(fake_run(batch))
        if not pending and not sched.num_waiting and not sched.num_running:
            break
    assert all(r.status is RequestStatus.FINISHED for r in requests)
    assert all(len(r.output_ids) == r.max_new_tokens for r in requests)


def test_budget_filled_past_a_head_that_does_not_fit():
    sched = Scheduler(SchedulerConfig(max_tokens_per_step=200, max_rows_per_step=8), clock=FakeClock())
    a, b, c = req(1, 150), req(2, 100), req(3, 40)
    b2 = req(2, 10)   # behind b: must not jump ahead of it (FIFO within a tenant)
    for r in (a, b, b2, c):
        sched.add(r)
    batch, _ = step(sched)
    assert [row.request for row in batch.rows] == [a, c]
    batch, _ = step(sched)
    assert [row.request for row in batch.rows] == [b, b2]


def test_rows_budget():
    sched = Scheduler(SchedulerConfig(max_tokens_per_step=1000, max_rows_per_step=3), clock=FakeClock())
    for i in range(10):
        sched.add(req(i % 4, 5))
    sizes = [step(sched)[0].num_rows for _ in range(4)]
    assert sizes == [3, 3, 3, 1]


def test_request_bigger_than_the_step_budget_is_rejected_at_add():
    sched = Scheduler(SchedulerConfig(max_tokens_per_step=64), clock=FakeClock())
    with pytest.raises(ValueError, match="max_tokens_per_step=64"):
        sched.add(req(1, 65))
    with pytest.raises(ValueError, match="not tokenized"):
        sched.add(Request(tenant_id=1, adapter_id=None, deadline=INF, text="hello"))
    sched.add(req(1, 64))
    assert sched.num_waiting == 1


# -- fairness ------------------------------------------------------------------------------------
def test_fairness_bound_under_an_overloading_tenant():
    """Tenant 0 submits 100x the requests of each of tenants 1..5; all backlogged."""
    rng = random.Random(0)
    max_req, budget = 64, 256
    cfg = SchedulerConfig(max_tokens_per_step=budget, max_rows_per_step=16, max_waiting=20_000,
                          max_waiting_per_tenant=10_000)
    sched = Scheduler(cfg, clock=FakeClock())
    light = range(1, 6)
    demand = dict.fromkeys(light, 0)   # 10,000 heavy requests, 100 per light tenant, all queued
    for i in range(10_000):
        sched.add(req(0, rng.randint(8, max_req)))
        if i % 100 == 0:
            for t in light:
                r = req(t, rng.randint(8, max_req))
                sched.add(r)
                demand[t] += r.num_tokens
    num_steps, checked = 0, 0
    while all(sched.num_waiting_for(t) for t in light):
        step(sched)
        num_steps += 1
        counters = backlogged_counters(sched)
        if len(counters) == 6:
            assert max(counters.values()) - min(counters.values()) <= max_req + budget
            total = sum(served(sched, t) for t in range(6))
            for t in range(6):   # every tenant within one request + one step of the fair share
                assert abs(served(sched, t) - total / 6) <= max_req + budget
            checked += 1
    assert checked >= 60
    total = sum(served(sched, t) for t in range(6))
    for t in light:
        assert served(sched, t) >= 0.9 * min(demand[t], total / 6)
    while any(sched.num_waiting_for(t) for t in light):   # no light request waits for the heavy backlog
        step(sched)
        num_steps += 1
    assert num_steps * budget <= 6 * max(demand.values()) + 2 * budget
    assert sched.num_waiting_for(0) > 9000


def test_weights_respected():
    sched = Scheduler(SchedulerConfig(max_tokens_per_step=50, max_rows_per_step=5), clock=FakeClock())
    for _ in range(300):
        sched.add(req(1, 10, weight=2.0))
        sched.add(req(2, 10, weight=1.0))
    for _ in range(60):
        step(sched)
    a, b = served(sched, 1), served(sched, 2)
    assert a + b == 60 * 50
    assert 1.9 <= a / b <= 2.1
    counters = backlogged_counters(sched)
    assert abs(counters[1] - counters[2]) <= 10 + 50


def test_no_starvation_under_continuous_overload():
    sched = Scheduler(SchedulerConfig(max_tokens_per_step=100, max_rows_per_step=10, max_waiting=100_000,
                                      max_waiting_per_tenant=100_000), clock=FakeClock())
    victims = [req(2, 30) for _ in range(10)] + [req(3, 100)]   # the biggest possible request too
    for r in victims:
        sched.add(r)
    gen = req(4, 5, max_new_tokens=10_000)   # a decode row takes 1 token of every step
    sched.add(gen)
    for i in range(60):
        for _ in range(20):
            sched.add(req(1, 10))
        step(sched)
    assert all(r.status is RequestStatus.FINISHED for r in victims)
    assert gen.status is RequestStatus.RUNNING


def test_big_head_passed_over_goes_first_in_the_next_step():
    sched = Scheduler(SchedulerConfig(max_tokens_per_step=100, max_rows_per_step=10), clock=FakeClock())
    gen = req(1, 5, max_new_tokens=50)
    sched.add(gen)
    step(sched)                      # gen now decodes 1 token per step
    small = [req(2, 10) for _ in range(30)]
    for r in small:
        sched.add(r)
    big = req(3, 100)
    sched.add(big)
    batch, _ = step(sched)           # 99 tokens left after the decode row: big does not fit
    assert big not in [r.request for r in batch.rows] and batch.num_tokens > 1
    batch, _ = step(sched)           # the decode row yields to it for one step
    assert [r.request for r in batch.rows] == [big]
    batch, _ = step(sched)
    assert gen in [r.request for r in batch.rows]


def test_idle_tenant_does_not_bank_credit():
    max_req, budget = 20, 60
    sched = Scheduler(SchedulerConfig(max_tokens_per_step=budget, max_rows_per_step=10), clock=FakeClock())
    for _ in range(400):
        sched.add(req(1, 20))
        sched.add(req(2, 20))
    sched.add(req(3, 20))
    step(sched)                      # tenant 3 served once, then idle
    for _ in range(100):
        step(sched)
    before = {t: served(sched, t) for t in (1, 2, 3)}
    for _ in range(200):
        sched.add(req(3, 20))        # tenant 3 returns with a burst
    for _ in range(30):
        step(sched)
    window = {t: served(sched, t) - before[t] for t in (1, 2, 3)}
    total = sum(window.values())
    assert window[3] <= total / 3 + max_req + budget   # no catch-up for the 100 idle steps
    assert window[3] >= total / 3 - (max_req + budget)


# -- deadlines, queues, cancellation ---------------------------------------------------------------
def test_expired_requests_are_dropped_before_compute():
    clock = FakeClock(100.0)
    sched = Scheduler(SchedulerConfig(), clock=clock)
    keep, late, other = req(1, 5, deadline=105.0), req(1, 5, deadline=101.0), req(2, 5, deadline=200.0)
    for r in (late, keep, other):
        sched.add(r)
    clock.advance(2.0)
    batch, finished = step(sched)
    assert batch.dropped == (late,) and late.status is RequestStatus.EXPIRED
    assert late not in [r.request for r in batch.rows] and late.num_computed_tokens == 0
    assert {r.request for r in batch.rows} == {keep, other}
    assert all(r.status is RequestStatus.FINISHED for r in finished)
    assert sched.stats()["num_expired"] == 1 and sched.cancel(late.request_id) is None


def test_expired_head_of_a_parked_tenant_releases_the_tenant():
    clock, res = FakeClock(0.0), FakeResidency()
    sched = Scheduler(SchedulerConfig(), residency=res, clock=clock)
    head, nxt = req(1, 5, adapter=9, deadline=1.0), req(1, 5)
    sched.add(head)
    sched.add(nxt)
    batch, _ = step(sched)
    assert not batch.rows
    clock.advance(2.0)
    batch, _ = step(sched)
    assert batch.dropped == (head,) and [r.request for r in batch.rows] == [nxt]


def test_bounded_queues_raise_queue_full_and_change_nothing():
    sched = Scheduler(SchedulerConfig(max_waiting=5, max_waiting_per_tenant=3), clock=FakeClock())
    for _ in range(3):
        sched.add(req(1, 5))
    extra = req(1, 5)
    with pytest.raises(QueueFullError, match="max_waiting_per_tenant"):
        sched.add(extra)
    assert sched.num_waiting == 3 and sched.num_waiting_for(1) == 3 and extra.status is RequestStatus.WAITING
    sched.add(req(2, 5))
    sched.add(req(2, 5))
    with pytest.raises(QueueFullError, match="max_waiting"):
        sched.add(req(3, 5))
    assert sched.num_waiting == 5 and sched.num_waiting_for(3) == 0
    stats = sched.stats()
    assert (stats["num_rejected_tenant"], stats["num_rejected_total"]) == (1, 1)
    step(sched)
    sched.add(extra)   # room again once the queue drains
    assert sched.num_waiting_for(1) == 1


def test_cancel_waiting_and_running_requests():
    sched = Scheduler(SchedulerConfig(), clock=FakeClock())
    waiting, running, gen = req(1, 5), req(2, 5), req(3, 5, max_new_tokens=100)
    sched.add(running)
    sched.add(gen)
    batch = sched.schedule()                      # running and gen are in flight
    sched.add(waiting)
    assert sched.cancel(waiting.request_id) is waiting and waiting.status is RequestStatus.CANCELLED
    assert sched.num_waiting == 0 and sched.cancel(waiting.request_id) is None and sched.cancel(-1) is None
    assert sched.cancel(running.request_id) is running and running.status is RequestStatus.CANCELLED
    finished = sched.update(fake_run(batch))      # the in-flight result is discarded
    assert finished == [running] and running.status is RequestStatus.CANCELLED
    assert gen.status is RequestStatus.RUNNING and sched.num_running == 1
    assert sched.cancel(gen.request_id) is gen    # between steps: leaves at once
    for _ in range(3):
        batch, _ = step(sched)
        assert not batch.rows
    assert sched.num_running == 0 and sched.stats()["num_cancelled"] == 3


def test_fifo_within_a_tenant_across_steps():
    rng = random.Random(1)
    sched = Scheduler(SchedulerConfig(max_tokens_per_step=100, max_rows_per_step=4), clock=FakeClock())
    order: dict[int, list[int]] = {}
    for _ in range(300):
        sched.add(req(rng.randrange(4), rng.choice([1, 5, 30, 90, 100])))
    while sched.num_waiting:
        batch, _ = step(sched)
        for row in batch.rows:
            order.setdefault(row.request.tenant_id, []).append(row.request.request_id)
    assert sum(map(len, order.values())) == 300
    for ids in order.values():
        assert ids == sorted(ids)


# -- residency ------------------------------------------------------------------------------------
def test_non_resident_adapter_keeps_its_place_and_is_requested_once():
    clock, res = FakeClock(), FakeResidency(resident={1})
    cfg = SchedulerConfig(max_tokens_per_step=20, max_rows_per_step=2, residency_retry_s=0.05)
    sched = Scheduler(cfg, residency=res, clock=clock)
    blocked, behind = req(1, 10, adapter=7), req(1, 10, adapter=None)
    sched.add(blocked)
    sched.add(behind)
    others = [req(2, 10, adapter=1) for _ in range(20)]
    for r in others:
        sched.add(r)
    for _ in range(4):
        batch, _ = step(sched)
        assert [r.request.tenant_id for r in batch.rows] == [2, 2]   # the others proceed
        clock.advance(0.01)
    assert res.requested == [7]                   # asked once, not every step
    assert blocked.status is RequestStatus.WAITING and sched.num_waiting_for(1) == 2
    assert served(sched, 1) == 0 and sched.stats()["tenants"][1]["is_parked"]
    clock.advance(0.05)
    step(sched)
    assert res.requested == [7, 7]                # asked again after residency_retry_s
    res.resident.add(7)
    batch, _ = step(sched)
    assert [r.request.tenant_id for r in batch.rows] == [2, 1]   # lifted to the smallest counter: a tie
    assert batch.rows[1].request is blocked       # the first step after it became resident
    assert not sched.stats()["tenants"][1]["is_parked"]
    batch, _ = step(sched)
    assert behind in [r.request for r in batch.rows]


def test_without_residency_everything_is_resident():
    sched = Scheduler(SchedulerConfig(), residency=None, clock=FakeClock())
    r = req(1, 5, adapter=123)
    sched.add(r)
    assert step(sched)[1] == [r]


# -- iteration-level scheduling --------------------------------------------------------------------
def test_generative_request_joins_and_leaves_between_steps():
    sched = Scheduler(SchedulerConfig(max_tokens_per_step=64, max_rows_per_step=4), clock=FakeClock())
    gen = req(1, 5, max_new_tokens=10)
    sched.add(gen)
    rng = random.Random(2)
    encoders = []
    for i in range(10):
        for _ in range(rng.randint(0, 6)):
            encoders.append(req(2 + rng.randrange(3), rng.randint(1, 30)))
            sched.add(encoders[-1])
        batch, finished = step(sched)
        rows = {r.request: r.num_tokens for r in batch.rows}
        assert rows[gen] == (5 if i == 0 else 1)   # prompt first, then one token per step
        assert all(r.request.status is RequestStatus.FINISHED for r in batch.rows if r.request is not gen)
        assert (gen in finished) == (i == 9)
    assert gen.status is RequestStatus.FINISHED and gen.output_ids == [NEW_TOKEN] * 10
    assert gen.num_computed_tokens == 5 + 9
    while sched.num_waiting:
        batch, _ = step(sched)
        assert gen not in [r.request for r in batch.rows]
    assert all(r.status is RequestStatus.FINISHED for r in encoders)


def test_running_requests_are_not_picked_again_before_update():
    sched = Scheduler(SchedulerConfig(max_tokens_per_step=64, max_rows_per_step=2), clock=FakeClock())
    gen = req(1, 5, max_new_tokens=3)
    rs = [req(2, 5) for _ in range(3)]
    for r in [gen, *rs]:
        sched.add(r)
    first = sched.schedule()
    second = sched.schedule()          # pipelined: step k+1 prepared while step k computes
    ids1 = {r.request.request_id for r in first.rows}
    ids2 = {r.request.request_id for r in second.rows}
    assert ids1 and ids2 and not ids1 & ids2 and gen.request_id in ids1
    assert sched.update(fake_run(second)) and sched.num_running == 1 + 1
    sched.update(fake_run(first))      # out of order is fine
    assert gen.status is RequestStatus.RUNNING and len(gen.output_ids) == 1
    with pytest.raises(ValueError, match="not in flight"):
        sched.update(fake_run(first))


def test_abort_step_and_missing_results_fail_the_rows():
    sched = Scheduler(SchedulerConfig(), clock=FakeClock())
    a, b, c = req(1, 5), req(2, 5), req(3, 5)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert set(sched.abort_step(batch, "boom")) == {a, b}
    assert a.status is b.status is RequestStatus.FAILED and a.metadata["error"] == "boom"
    assert sched.abort_step(batch, "again") == [] and sched.num_running == 0
    sched.add(c)
    batch = sched.schedule()
    assert sched.update(StepOutput(batch.step, ())) == [c] and c.status is RequestStatus.FAILED
    assert sched.stats()["num_failed"] == 3


# -- threads ---------------------------------------------------------------------------------------
def test_thread_safety_smoke():
    sched = Scheduler(SchedulerConfig(max_tokens_per_step=128, max_rows_per_step=8, max_waiting=200,
                                      max_waiting_per_tenant=100))
    requests: list[Request] = []
    lock = threading.Lock()
    done_adding = threading.Event()

    def producer(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(250):
            r = req(rng.randrange(20), rng.randint(1, 64), max_new_tokens=rng.choice([0, 0, 2]))
            while True:
                try:
                    sched.add(r)
                    break
                except QueueFullError:
                    threading.Event().wait(0.0005)
            with lock:
                requests.append(r)
            if rng.random() < 0.05:
                sched.cancel(r.request_id)

    def loop() -> None:
        while not (done_adding.is_set() and sched.num_waiting == 0 and sched.num_running == 0):
            batch = sched.schedule()
            sched.update(fake_run(batch))

    producers = [threading.Thread(target=producer, args=(i,)) for i in range(4)]
    engine = threading.Thread(target=loop)
    engine.start()
    for t in producers:
        t.start()
    for t in producers:
        t.join(60)
    done_adding.set()
    engine.join(60)
    assert not engine.is_alive() and len(requests) == 1000
    assert all(r.status in (RequestStatus.FINISHED, RequestStatus.CANCELLED) for r in requests)
    stats = sched.stats()
    assert stats["num_finished"] + stats["num_cancelled"] == 1000
    assert stats["num_waiting"] == 0 and stats["num_running"] == 0


def test_distinct_adapters_per_step_are_capped_without_losing_places():
    sched = Scheduler(SchedulerConfig(max_adapters_per_step=3, max_rows_per_step=64))
    for t in range(8):
        for _ in range(2):
            sched.add(req(t, 4, adapter=100 + t))
    order: dict[int, list[int]] = {}
    steps = 0
    while sched.num_waiting:
        batch, _ = step(sched)
        steps += 1
        assert 1 <= len({r.request.adapter_id for r in batch.rows}) <= 3
        for r in batch.rows:
            order.setdefault(r.request.tenant_id, []).append(r.request.request_id)
    assert steps >= 3 and sum(len(v) for v in order.values()) == 16
    assert all(v == sorted(v) for v in order.values())   # FIFO within each tenant still holds
