"""benchmarks/sim_validation.py's co-running fit and autoscale_ray's use of it, on numbers whose answer is known."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from autoscale_ray import calibrated  # noqa: E402
from sim_validation import corun_fit  # noqa: E402

from scheduler.latency_profile import BackboneProfile, Grid, LatencyProfile  # noqa: E402


def test_the_fit_splits_each_phase_into_the_replicas_own_slowdown_and_the_co_running_one():
    # made from the model: own slowdown 1.3 (small steps) and 1.2 (large), c = 1.6, busy 0.5 and 0.9
    light, sat = 1.3 * (1 + 0.6 * 0.5), 1.2 * (1 + 0.6 * 0.9)
    fit = corun_fit(1.3, (light, 0.5), (sat, 0.9))
    assert fit["corun_slowdown"] == pytest.approx(1.6)
    assert fit["alone"]["light"] == pytest.approx(1.3) and fit["alone"]["saturated"] == pytest.approx(1.2)
    assert fit["multiplier"] == pytest.approx({"light": 1.3, "saturated": 1.54})
    # steps no slower with the others busy than alone: no co-running slowdown; nobody busy: nothing to fit
    assert corun_fit(1.5, (1.4, 0.5), (1.3, 0.9))["corun_slowdown"] == 1.0
    assert corun_fit(1.5, (1.9, 0.0), (1.3, 0.9))["corun_slowdown"] == 1.0


def run(replicas: int, corun: dict | None) -> dict:
    return {"replicas": replicas, "overhead_s": 0.004, "saturated_steps": {"step_overhead_s": 0.003},
            "compute_factor": {"light": [2.0, 2.0], "saturated": [60.0, 1.8]}, "corun": corun,
            "calibration_steps": {"light": [[2, 0.02]], "saturated": [[60, 0.2]]}}


def test_autoscale_ray_simulates_with_the_co_running_model_when_the_calibration_has_one():
    enc = BackboneProfile("encoder", "encoder", 5.0, {"weights": 1},
                          step=Grid((2, 60), (16, 512), ((0.01, 0.01), (0.1, 0.1))))
    data = {"profile": LatencyProfile({"encoder": enc}).to_json(), "runs": [run(1, None), run(2, {
        "corun_slowdown": 1.5, "busy_share": {"light": 0.5, "saturated": 1.0}, "step_overhead_alone_s": 0.002,
        "alone_factor": {"light": [2.0, 1.6], "saturated": [60.0, 1.2]}})]}
    measured, slowed, overhead_s, step_overhead_s, at, noise, corun = calibrated(data, 2, 32, 64)
    assert (at, corun, step_overhead_s) == (2, 1.5, 0.002)
    assert slowed["encoder"].encoder_step_s(2, 32) == pytest.approx(1.6 * measured["encoder"].encoder_step_s(2, 32))
    assert slowed["encoder"].encoder_step_s(60, 32) == pytest.approx(1.2 * measured["encoder"].encoder_step_s(60, 32))
    # the light step's residual is taken after dividing out that phase's co-running multiplier (1.25)
    light_pool = noise[0][1]
    assert light_pool[0] == pytest.approx(0.02 / 1.25 - 1.6 * measured["encoder"].encoder_step_s(2, 32), abs=1e-5)
    # a calibration without the model (one replica): the slowdowns as measured, no co-running
    *_, corun_one = calibrated(data, 1, 32, 64)
    assert corun_one == 1.0
