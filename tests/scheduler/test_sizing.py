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
from scheduler.sizing import StepSizer
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


def test_engine_sizes_steps_only_while_several_tenants_are_active(tiny_checkpoint):
    world = World(tiny_checkpoint)
    steps = []
    engine = Engine(EngineConfig(latency_target_s=0.004, prepare_lead_s=0.0005), SchedulerConfig(max_tokens_per_step=4096),
                    ModelRunner(world.model, world.cache), world.cache,
                    on_step=lambda batch, out: steps.append((batch.num_rows, batch.num_tokens, batch.token_budget)))
    ids = [2] + [7] * 30 + [3]
    try:
        with engine:
            solo = [engine.submit(Request(tenant_id=1, adapter_id=None, deadline=time.monotonic() + 60,
                                          prompt_ids=ids)) for _ in range(64)]
            [f.result(60) for f in solo]
            assert all(budget is None for _, _, budget in steps)   # one tenant: no sizing
            assert engine.sizer.num_observed == len(steps)
            steps.clear()
            both = [engine.submit(Request(tenant_id=t, adapter_id=None, deadline=time.monotonic() + 60,
                                          prompt_ids=ids)) for _ in range(64) for t in (1, 2)]
            [f.result(60) for f in both]
    finally:
        world.cache.close()
    sized = [(rows, tokens, budget) for rows, tokens, budget in steps if budget is not None]
    assert sized, steps
    assert all(tokens <= budget or rows == 1 for rows, tokens, budget in sized)
    assert max(tokens for _, tokens, _ in sized) < 64 * len(ids)   # smaller than an unsized step
