"""The simulator against cases whose answer is known: step times from a profile with exact arithmetic."""
from __future__ import annotations

import statistics

import pytest

from scheduler.latency_profile import BackboneProfile, Curve, Grid, LatencyProfile
from scheduler.simulator import EngineLimits, TenantLoad, arrivals, daily_sine, latencies, simulate, zipf_rates

STEP = 0.1   # every encoder step takes 0.1 s whatever its size: capacity = max_rows / 0.1 rows/s


def profile() -> LatencyProfile:
    enc = BackboneProfile("encoder", "encoder", 5.0, {"weights": 1},
                          step=Grid((1, 64), (16, 512), ((STEP, STEP), (STEP, STEP))))
    dec = BackboneProfile("decoder", "decoder", 9.0, {"weights": 1},
                          decode=Grid((1, 32), (1, 1024), ((0.02, 0.02), (0.02, 0.02))),
                          prefill=Curve((1, 1024), (0.05, 0.05)))
    return LatencyProfile({"encoder": enc, "decoder": dec})


def test_gamma_arrivals_have_the_rate_and_burstiness_asked_for():
    tenants = [TenantLoad("a", "encoder", rate=50, slo_s=1, cv=1.0), TenantLoad("b", "encoder", rate=20, slo_s=1, cv=3.0)]
    arr = arrivals(tenants, 400, seed=1)
    for k, t in enumerate(tenants):
        times = [x for x, i in arr if i == k]
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert len(times) / 400 == pytest.approx(t.rate, rel=0.1)
        assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(t.cv, rel=0.15)
    trend = daily_sine(0.5, 1.5, period_s=400)
    thinned = arrivals(tenants[:1], 400, seed=1, trend=trend)
    first, second = (sum(1 for x, _ in thinned if lo <= x < lo + 100) for lo in (0, 100))
    assert len(thinned) / 400 == pytest.approx(50, rel=0.1) and first < second       # rising from the trough
    assert sum(zipf_rates(30, 3)) == pytest.approx(30) and zipf_rates(30, 3)[0] == pytest.approx(2 * zipf_rates(30, 3)[1])


def test_below_capacity_a_request_waits_at_most_for_the_step_computing_and_its_own():
    tenants = [TenantLoad("a", "encoder", rate=2, slo_s=2 * STEP + 1e-9)]
    res = simulate(profile(), ["encoder"], tenants, arrivals(tenants, 100, seed=0))
    assert res.slo_attainment == 1.0 and res.p50_s == pytest.approx(STEP) and res.dropped == 0
    assert STEP < res.p99_s <= 2 * STEP      # some arrive while a step computes
    tight = simulate(profile(), ["encoder"], [TenantLoad("a", "encoder", rate=2, slo_s=1.5 * STEP)],
                     arrivals(tenants, 100, seed=0))
    assert 0.75 < tight.slo_attainment < 0.97
    assert res.utilization[0] == pytest.approx(0.2 * STEP * 10, rel=0.2)


def test_two_replicas_serve_what_overloads_one_and_a_missing_backbone_misses_everything():
    limits = EngineLimits(max_rows=4)                     # capacity 40 rows/s per replica
    tenants = [TenantLoad(f"t{i}", "encoder", rate=15, slo_s=0.5) for i in range(4)]   # 60 rows/s
    arr = arrivals(tenants, 60, seed=2)
    one = simulate(profile(), ["encoder"], tenants, arr, limits)
    two = simulate(profile(), ["encoder", "encoder"], tenants, arr, limits)
    assert one.slo_attainment < 0.3 and two.slo_attainment > 0.95
    assert one.utilization[0] > 0.95 and one.dropped > 0
    assert simulate(profile(), ["decoder"], tenants, arr, limits).slo_attainment == 0


def test_a_flood_does_not_starve_a_light_tenant():
    limits = EngineLimits(max_rows=4)
    tenants = [TenantLoad("flood", "encoder", rate=100, slo_s=0.5), TenantLoad("light", "encoder", rate=2, slo_s=0.25)]
    arr = arrivals(tenants, 60, seed=3)
    res = simulate(profile(), ["encoder"], tenants, arr, limits)
    assert res.slo_attainment < 0.5          # the flood is far over capacity
    light = [(t, k) for t, k in arr if k == 1]
    alone = simulate(profile(), ["encoder"], tenants, light, limits)
    assert alone.slo_attainment == 1.0


def test_a_decoder_request_takes_a_prefill_and_then_one_step_per_token():
    tenants = [TenantLoad("g", "decoder", rate=0.5, slo_s=1.0, tokens=100, output_tokens=11)]
    res = simulate(profile(), ["decoder"], tenants, [(0.0, 0), (100.0, 0)])
    assert res.p50_s == pytest.approx(0.05 + 10 * 0.02) and res.slo_attainment == 1.0


def test_replicas_on_one_device_share_it():
    limits = EngineLimits(max_rows=4)
    tenants = [TenantLoad(f"t{i}", "encoder", rate=15, slo_s=0.5) for i in range(4)]   # 60 rows/s, 40 per device
    arr = arrivals(tenants, 60, seed=2)
    shared = simulate(profile(), [("encoder", 0), ("encoder", 0)], tenants, arr, limits)
    apart = simulate(profile(), [("encoder", 0), ("encoder", 1)], tenants, arr, limits)
    assert shared.slo_attainment < 0.3 and apart.slo_attainment > 0.95
    assert sum(shared.utilization) == pytest.approx(1.0, abs=0.05)     # one device's time, split between the two


def kv_profile(kv_tokens: int) -> LatencyProfile:
    dec = BackboneProfile("decoder", "decoder", 9.0, {"weights": 1},
                          decode=Grid((1, 32), (1, 1024), ((0.02, 0.02), (0.02, 0.02))),
                          prefill=Curve((1, 1024), (0.05, 0.05)), kv_tokens=kv_tokens)
    return LatencyProfile({"decoder": dec})


def test_the_kv_cache_bounds_what_runs_at_once_and_what_can_run_at_all():
    tenants = [TenantLoad("g", "decoder", rate=1, slo_s=100, tokens=100, output_tokens=11)]
    both = [(0.0, 0), (0.0, 0)]
    alone = 0.05 + 10 * 0.02                              # a prefill, then 10 decode steps
    roomy = latencies(kv_profile(1000), ["decoder"], tenants, both)
    assert roomy[0] == pytest.approx(0.05 + 0.07 + 9 * 0.02)   # step 2: its decode + the second's prefill
    assert max(roomy) < 1.5 * alone                                       # the two ran together
    tight = latencies(kv_profile(150), ["decoder"], tenants, both)        # one sequence's 111 tokens fit, two do not
    assert tight == pytest.approx([alone, 2 * alone])                     # the second waits for the first to finish
    never = simulate(kv_profile(100), ["decoder"], tenants, both)     # 111 tokens never fit: refused, missed
    assert never.slo_attainment == 0 and never.p50_s is None
    assert LatencyProfile.from_json(kv_profile(150).to_json())["decoder"].kv_tokens == 150


def test_a_full_kv_cache_preempts_the_newest_sequence_which_is_recomputed_and_still_finishes():
    tenants = [TenantLoad("g", "decoder", rate=1, slo_s=100, tokens=10, output_tokens=40)]
    # both admitted (22 tokens), then they grow by 2 a step: at 50 tokens the second is preempted and waits
    first, second = latencies(kv_profile(50), ["decoder"], tenants, [(0.0, 0), (0.0, 0)])
    together = latencies(kv_profile(1000), ["decoder"], tenants, [(0.0, 0), (0.0, 0)])
    assert together[1] - together[0] < 0.1                     # with room, the second ends a step after the first
    # preempted after about 13 tokens, it waits for the first, then recomputes prompt + output and decodes the rest
    assert second is not None and second - first > 0.4 and second < first + 0.05 + 40 * 0.02 + 1e-9


def test_step_and_request_overheads_are_added_and_sizing_keeps_steps_near_the_target():
    tenants = [TenantLoad("a", "encoder", rate=2, slo_s=1)]
    arr = arrivals(tenants, 50, seed=0)
    base = simulate(profile(), ["encoder"], tenants, arr)
    more = simulate(profile(), ["encoder"], tenants, arr, EngineLimits(step_overhead_s=0.01, overhead_s=0.02))
    assert more.p50_s == pytest.approx(base.p50_s + 0.03)
    # steps cost 1 ms per row: a heavy tenant and a light one; sized steps stay near 20 ms (20 rows)
    per_row = BackboneProfile("encoder", "encoder", 5.0, {"weights": 1},
                              step=Grid((1, 64), (16, 512), ((0.001, 0.001), (0.064, 0.064))))
    prof = LatencyProfile({"encoder": per_row})
    load = [TenantLoad("heavy", "encoder", rate=2000, slo_s=1, tokens=16), TenantLoad("light", "encoder", rate=5,
                                                                                     slo_s=1, tokens=16)]
    arr = arrivals(load, 5, seed=1)
    sized = simulate(prof, ["encoder"], load, arr, EngineLimits(step_target_s=0.02))
    unsized = simulate(prof, ["encoder"], load, arr)
    assert sized.p50_s < unsized.p50_s


def test_replica_windows_route_only_to_replicas_that_are_up():
    limits = EngineLimits(max_rows=4)                     # 40 rows/s per replica
    tenants = [TenantLoad(f"t{i}", "encoder", rate=15, slo_s=0.5) for i in range(4)]   # 60 rows/s
    arr = arrivals(tenants, 60, seed=2)
    late = simulate(profile(), ["encoder", "encoder"], tenants, arr, limits, windows=[(0, 1e9), (30, 1e9)])
    early = simulate(profile(), ["encoder", "encoder"], tenants, arr, limits, windows=[(0, 1e9), (0, 1e9)])
    assert early.slo_attainment > 0.95 and 0.3 < late.slo_attainment < 0.8    # the first half overloads one
    with pytest.raises(ValueError, match="one \\(start, end\\) per replica"):
        simulate(profile(), ["encoder"], tenants, arr, limits, windows=[])


def test_step_noise_with_zero_mean_lengthens_the_tail_reproducibly_and_bad_pools_are_refused():
    limits = EngineLimits(max_rows=4)                     # 40 rows/s per replica; 30 rows/s offered: busy, not over
    tenants = [TenantLoad(f"t{i}", "encoder", rate=7.5, slo_s=1) for i in range(4)]
    arr = arrivals(tenants, 200, seed=3)
    steady = simulate(profile(), ["encoder"], tenants, arr, limits)
    varied = EngineLimits(max_rows=4, step_noise_s=[(4, (-0.05, 0.05))], seed=7)   # mean 0: the same capacity
    noisy = simulate(profile(), ["encoder"], tenants, arr, varied)
    assert noisy.p99_s > 1.2 * steady.p99_s                                      # queueing grows with the variance
    assert noisy.utilization[0] == pytest.approx(steady.utilization[0], rel=0.05)
    assert simulate(profile(), ["encoder"], tenants, arr, varied).latencies == noisy.latencies   # seeded
    # pools by step size: small steps (1 row) draw from the first, larger ones from the last
    quiet_small = EngineLimits(max_rows=4, step_noise_s=[(1, (0.0,)), (4, (0.2,))])
    alone = [TenantLoad("a", "encoder", rate=0.5, slo_s=1)]
    one_row = simulate(profile(), ["encoder"], alone, arrivals(alone, 100, seed=0), quiet_small)
    assert one_row.p50_s == pytest.approx(STEP)                                  # never a 4-row step: no noise
    for bad in ([(0, (0.1,))], [(4, ())], [(4, (float("nan"),))], [(4, 0.1)], [("x", (0.1,))]):
        with pytest.raises(ValueError, match="step_noise_s"):
            EngineLimits(step_noise_s=bad)


def test_devices_on_one_host_slow_each_other_while_both_compute():
    tenants = [TenantLoad("a", "encoder", rate=1, slo_s=10)]
    host = EngineLimits(corun_slowdown=2.0)           # both computing: each at half speed
    both = latencies(profile(), ["encoder", "encoder"], tenants, [(0.0, 0), (0.0, 0)], host)
    assert both == pytest.approx([2 * STEP, 2 * STEP])
    assert latencies(profile(), ["encoder", "encoder"], tenants, [(0.0, 0), (0.0, 0)]) == pytest.approx([STEP, STEP])
    assert latencies(profile(), ["encoder", "encoder"], tenants, [(0.0, 0)], host) == pytest.approx([STEP])
    # the second starts halfway through the first: the first's second half runs at half speed (1.5 steps), the
    # second computes half a step's work meanwhile, then the rest alone (1.5 steps after it arrived)
    staggered = latencies(profile(), ["encoder", "encoder"], tenants, [(0.0, 0), (STEP / 2, 0)], host)
    assert staggered == pytest.approx([1.5 * STEP, 1.5 * STEP])
    # three devices, c = 3: one other computing of two costs (1 + 2 * 1/2) = 2x, both others 3x
    three = [("encoder", 0), ("encoder", 1), ("encoder", 2)]
    assert latencies(profile(), three, tenants, [(0.0, 0)] * 2, EngineLimits(corun_slowdown=3.0)) == \
        pytest.approx([2 * STEP, 2 * STEP])
    assert latencies(profile(), three, tenants, [(0.0, 0)] * 3, EngineLimits(corun_slowdown=3.0)) == \
        pytest.approx([3 * STEP] * 3)
    # under load: the same arrivals take longer on a shared host, and the busy time counts the slowed steps
    load = [TenantLoad(f"t{i}", "encoder", rate=5, slo_s=1) for i in range(4)]
    arr = arrivals(load, 60, seed=4)
    apart, shared = (simulate(profile(), ["encoder", "encoder"], load, arr, EngineLimits(max_rows=4, corun_slowdown=c))
                     for c in (1.0, 1.5))
    assert shared.p50_s > apart.p50_s and sum(shared.utilization) > 1.1 * sum(apart.utilization)
    for bad in (0.5, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="corun_slowdown"):
            EngineLimits(corun_slowdown=bad)
