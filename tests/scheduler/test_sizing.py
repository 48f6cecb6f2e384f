"""Step sizing from a latency target (scheduler.sizing), the policy's per-step token budget, and the
engine sizing steps with a real model only while more than one tenant is active."""
from __future__ import annotations

import random
import time

import pytest

from scheduler.config import SchedulerConfig
from scheduler.engine import Engine, EngineConfig, take_round_robin
from scheduler.policy import Scheduler
from scheduler.runner import ModelRunner
from scheduler.sizing import Demand, StepSizer
from scheduler.types import Request
from tests.scheduler.test_policy import fake_run, req
from tests.scheduler.test_engine import World


def test_sizer_recovers_a_linear_cost_and_budgets_to_the_target():
    sizer = StepSizer(target_s=0.1, max_tokens=8192, min_tokens=16)
    assert sizer.budget() == 8192                      # nothing measured yet
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(50, 4000)
        sizer.observe(n, 0.01 + 2e-5 * n * rng.uniform(0.97, 1.03))
    assert sizer.overhead_s == pytest.approx(0.01, abs=0.005)
    assert sizer.s_per_token == pytest.approx(2e-5, rel=0.05)
    assert sizer.budget() == pytest.approx((0.1 - 0.01) / 2e-5, rel=0.1)
    assert sizer.predict_s(sizer.budget()) == pytest.approx(0.1, rel=0.05)


def test_sizer_follows_a_slower_machine_and_clamps():
    sizer = StepSizer(target_s=0.05, max_tokens=1000, min_tokens=32)
    for _ in range(30):
        sizer.observe(500, 0.005)                      # fast: the budget is the cap
    assert sizer.budget() == 1000
    for _ in range(60):
        sizer.observe(500, 5.0)                        # 1000x slower now: clamped to the floor
    assert sizer.budget() == 32
    for bad in (0, -1):
        sizer.observe(bad, 1.0)                        # ignored
    with pytest.raises(ValueError, match="target_s"):
        StepSizer(0, 100)
    with pytest.raises(ValueError, match="min_tokens"):
        StepSizer(0.1, 10, min_tokens=20)


@pytest.mark.parametrize("seed", range(5))
def test_sizer_is_stable_when_every_step_is_about_one_size(seed):
    """Steps of about one size (the budget, or the work there is) with noisy times: a free least-squares
    slope can come out near zero and send the budget to the cap: one step of max_tokens, a stall of
    seconds on a CPU while every other tenant waits."""
    sizer = StepSizer(target_s=0.12, max_tokens=8192)
    rng = random.Random(seed)
    for _ in range(500):
        n = sizer.budget() if sizer.num_observed else 700
        n = int(min(n, 910) * rng.uniform(0.93, 1.0))    # whole rows; no more work than ~910 tokens waits
        sizer.observe(n, 0.1 * n / 700 * rng.uniform(0.8, 1.25) + 0.01 * rng.random())
        assert sizer.budget() <= 2 * 910                 # never far past what was measured
    assert 500 < sizer.budget() <= 2 * 910


def test_policy_budget_bounds_a_step_but_always_takes_its_first_row():
    sched = Scheduler(SchedulerConfig(max_tokens_per_step=1000, max_rows_per_step=64))
    for t in (1, 2):
        for _ in range(10):
            sched.add(req(t, 30))
    batch = sched.schedule(max_tokens=100)
    assert batch.num_tokens <= 100 and batch.num_rows == 3 and batch.token_budget == 100
    assert {r.request.tenant_id for r in batch.rows} == {1, 2}   # still fair inside the smaller step
    sched.update(fake_run(batch))
    big = Scheduler(SchedulerConfig(max_tokens_per_step=1000))
    big.add(req(1, 600))
    big.add(req(1, 10))
    first = big.schedule(max_tokens=100)               # a row above the budget runs alone
    assert [r.num_tokens for r in first.rows] == [600]
    assert sched.schedule(max_tokens=5000).token_budget is None   # above the hard cap: no budget
    with pytest.raises(ValueError, match="max_tokens"):
        sched.schedule(max_tokens=0)


def test_round_robin_admission_takes_every_tenant_before_a_long_queue():
    a = [Request(tenant_id=1, adapter_id=None, deadline=1e12, text="x" * 1000) for _ in range(50)]
    b = Request(tenant_id=2, adapter_id=None, deadline=1e12, text="short")
    taken, left = take_round_robin(a + [b], max_chars=2500)
    assert b in taken and len(taken) == 3 and len(left) == 48
    assert take_round_robin([a[0]], max_chars=1) == ([a[0]], [])   # at least one is taken


def test_demand_finds_a_light_tenant_among_recent_ones():
    d = Demand(window_s=5.0, light_share=0.25, refresh_s=0)
    d.add(1, 10_000, now=0.0)
    assert not d.has_light_tenant(0.0)                 # one tenant: nobody to protect
    d.add(2, 9_000, now=0.0)
    assert not d.has_light_tenant(0.1)                 # two about equal: no light one
    d.add(3, 200, now=0.2)
    assert d.has_light_tenant(0.2)                     # a tenant far below an equal share
    assert not d.has_light_tenant(60.0)                # everyone's demand decayed away
    with pytest.raises(ValueError, match="light_share"):
        Demand(light_share=1.5)


def _run_engine(world, loads, target=0.004):
    """loads: (tenant, number of requests); returns each step's (rows, tokens, budget)."""
    steps = []
    engine = Engine(EngineConfig(latency_target_s=target, prepare_lead_s=0.0005),
                    SchedulerConfig(max_tokens_per_step=4096), ModelRunner(world.model, world.cache), world.cache,
                    on_step=lambda batch, out: steps.append((batch.num_rows, batch.num_tokens, batch.token_budget)))
    ids = [2] + [7] * 30 + [3]
    with engine:
        futures = [engine.submit(Request(tenant_id=t, adapter_id=None, deadline=time.monotonic() + 60, prompt_ids=ids))
                   for t, n in loads for _ in range(n)]
        for f in futures:
            f.result(60)
    return steps, len(ids)


def test_engine_sizes_steps_only_while_a_light_tenant_is_active(tiny_checkpoint):
    world = World(tiny_checkpoint)
    try:
        solo, _ = _run_engine(world, [(1, 64)])
        assert all(budget is None for _, _, budget in solo)        # one tenant: no sizing
        equal, _ = _run_engine(world, [(1, 64), (2, 64)])
        assert all(budget is None for _, _, budget in equal)       # equally loaded: no sizing
        mixed, n = _run_engine(world, [(2, 1), (1, 128)])          # a light and a heavy tenant
    finally:
        world.cache.close()
    sized = [(rows, tokens, budget) for rows, tokens, budget in mixed if budget is not None]
    assert sized, mixed
    assert all(tokens <= budget or rows == 1 for rows, tokens, budget in sized)
    assert max(tokens for _, tokens, _ in sized) < 64 * n          # smaller than an unsized step
