"""Autoscaling policies replayed over known loads."""
from __future__ import annotations

import statistics

import pytest

from scheduler.autoscale import Predictive, Reactive, Static, cheapest_replicas, evaluate, replicas_for, seed_study_load


def test_seed_study_load_is_a_noisy_daily_sine_with_bursts():
    load = seed_study_load(2, 1440, seed=1)
    plain = seed_study_load(2, 1440, bursts_per_day=0, noise=0, seed=1)
    assert min(plain) == pytest.approx(7, abs=0.01) and max(plain) == pytest.approx(13, abs=0.01)
    assert statistics.fmean(plain) == pytest.approx(10, abs=0.01)
    ratios = [a / b for a, b in zip(load, plain)]
    assert min(ratios) >= 0.9 - 1e-9 and max(ratios) <= 1.1 + 0.6 + 1e-9
    assert sum(r > 1.15 for r in ratios) > 0                     # some bursts happened


def test_static_at_the_peak_is_never_overloaded_and_the_measures_add_up():
    load = [7.5, 9.2, 12.6, 10.0]
    out = evaluate(Static(13), load, capacity=1.0, start_intervals=1, initial=13)
    assert out.overloaded_share == 0 and out.efficiency == pytest.approx((8 + 10 + 13 + 10) / (4 * 13))
    low = evaluate(Static(9), load, capacity=1.0, start_intervals=1, initial=9)
    assert low.overloaded_share == pytest.approx(0.75)          # 9.2, 12.6 and 10.0 exceed 9 replicas


def test_reactive_scales_up_after_its_delay_and_down_after_ten_minutes():
    load = [5.0] * 3 + [9.0] * 15 + [5.0] * 15
    out = evaluate(Reactive(capacity=1.0, interval_s=60), load, capacity=1.0, start_intervals=1, initial=5)
    r = out.provisioned
    assert r[3] == 5 and r[5] == 9                                # asked at interval 3, ready two intervals later
    assert r[18 + 9] == 9 and r[18 + 11] == 5                     # down only after 600 s below
    assert out.overloaded_share == pytest.approx(2 / len(load))


@pytest.mark.parametrize("settings", [{}, {"forecaster": "holt-winters", "overload_cost": None}],
                         ids=["harmonic-cost", "holt-winters-quantile"])
def test_predictive_follows_a_daily_trend_ahead_of_it(settings):
    per_day = 288                                                  # 5-minute intervals
    load = seed_study_load(4, per_day, bursts_per_day=0, noise=0.02, seed=2)
    pred = evaluate(Predictive(1.0, per_day, **settings), load, 1.0, start_intervals=1, initial=replicas_for(load[0], 1.0),
                    skip=2 * per_day)
    react = evaluate(Reactive(1.0, 300), load, 1.0, start_intervals=1, initial=replicas_for(load[0], 1.0),
                     skip=2 * per_day)
    assert pred.efficiency > 0.9 and pred.overloaded_share <= 0.02
    assert pred.overloaded_share < react.overloaded_share


def test_an_overload_cost_buys_a_replica_only_where_it_removes_enough_overload():
    errors = [0.0] * 90 + [0.08] * 10                              # the forecast is right, or 8 % low in 10 % of cases
    dear, cheap = Predictive(1.0, 288, overload_cost=20.0), Predictive(1.0, 288, overload_cost=5.0)
    for p in (dear, cheap):
        p._errors.extend(errors)
    # forecast 10: 10 replicas are overloaded in 10 % of cases, 11 never
    assert dear._cheapest(10.0) == 11                              # 10 + 20 x 0.1 = 12 > 11: buy the replica
    assert cheap._cheapest(10.0) == 10                             # 10 + 5 x 0.1 = 10.5 < 11: accept the rare overload
    assert dear._cheapest(9.2) == 10                               # 9.2 x 1.08 < 10: 10 is never overloaded
    assert cheap._cheapest(0.0) == 1


def test_predictive_settings_are_validated():
    for bad in ({"forecaster": "arima"}, {"overload_cost": 0}, {"history_days": 1}, {"quantile": 1.0}):
        with pytest.raises(ValueError):
            Predictive(1.0, 288, **bad)


def test_cheapest_replicas_weighs_a_replica_against_the_overload_it_removes():
    p_over = {8: 0.5, 9: 0.2, 10: 0.05, 11: 0.0}.__getitem__
    assert cheapest_replicas(8, 11, 10.0, p_over) == 10     # 10.5 beats 13, 11 and 11
    assert cheapest_replicas(8, 11, 5.0, p_over) == 9       # cheaper overload: 10 beats 10.5, 10.25, 11
    assert cheapest_replicas(8, 11, 1.0, p_over) == 8       # cheap overload: 8.5 beats 9.2, 10.05, 11
    assert cheapest_replicas(8, 11, 100.0, p_over) == 11    # dear overload: never overloaded
    assert cheapest_replicas(8, 9, 10.0, {8: 0.1, 9: 0.0}.__getitem__) == 8   # a tie: fewer replicas
    with pytest.raises(ValueError, match="empty replica range"):
        cheapest_replicas(5, 4, 10.0, p_over)


def _burst_load(per_day: int, at: int, length: int, height: float) -> list[float]:
    load = seed_study_load(4, per_day, bursts_per_day=0, noise=0.05, seed=3)
    return [x * (1 + height) if at <= t < at + length else x for t, x in enumerate(load)]


def test_a_burst_is_planned_on_at_its_own_level_not_only_the_last_interval():
    per_day, at, length = 288, 3 * 288 + 100, 15
    load = _burst_load(per_day, at, length, 0.4)
    pred = Predictive(1.0, per_day)
    out = evaluate(pred, load, 1.0, start_intervals=1, initial=replicas_for(load[0], 1.0), skip=2 * per_day)
    over = [t for t in range(at, at + length) if load[t] > out.provisioned[t]]
    # the burst's first two intervals come before any replica asked for it is ready; after that the policy plans
    # on the burst's level with the noise's margin (the last interval's load alone would be short about half the time)
    assert over[:2] == [at, at + 1] and len(over) <= 3
    assert out.provisioned[at + length + 2] < out.provisioned[at + length - 1]   # and lets the replicas go after it
    excess, seen = pred.burst_excess(load[:at + 5])
    assert seen == 5 and excess == pytest.approx(0.4, abs=0.05)
    assert pred.burst_excess(load[:at]) is None                    # an ordinary interval is not a burst
