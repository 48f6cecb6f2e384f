"""benchmarks/sim_validation.py's models of the real server (busy; corun: the co-running fit), its re-simulation of a
recorded run, and autoscale_ray's use of the default model, on numbers whose answer is known."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from autoscale_ray import calibrated  # noqa: E402
from sim_validation import Calibration, build_model, corun_fit, main  # noqa: E402

from scheduler.latency_profile import BackboneProfile, Grid, LatencyProfile  # noqa: E402
from scheduler.simulator import EngineLimits, TenantLoad, arrivals, zipf_rates  # noqa: E402


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


def enc_profile() -> LatencyProfile:
    return LatencyProfile({"encoder": BackboneProfile("encoder", "encoder", 5.0, {"weights": 1},
                                                      step=Grid((2, 60), (16, 512), ((0.01, 0.01), (0.1, 0.1))))})


def row(replicas: int, calibration: dict | None) -> dict:
    r = {"replicas": replicas, "rate_fraction": 0.3, "cv": 1.0, "rate_rps": 20.0, "idle_latency_s": 0.05,
         "saturated_steps": {"step_overhead_s": 0.03}, "compute_factor": {"light": [2.0, 2.0], "saturated": [60.0, 1.8]},
         "calibration_steps": {"light": [[2, 0.02]], "saturated": [[60, 0.2]]},
         "real": {"slo_attainment": 1.0, "p99_s": 0.1, "attainment_by_slo_scale": {"1.0": 1.0}}}
    if calibration is not None:
        r["calibration"] = calibration
    return r


TWO = {"light": [2.0, 2.0, 0.5], "saturated": [60.0, 1.8, 1.0], "between_s": 0.03, "idle_s": 0.05,
       "idle_factor": 1.6}        # c = 1 + (2.0 / 1.6 - 1) / 0.5 = 1.5; saturated multiplier 1.5


def test_the_corun_model_slows_steps_by_what_runs_beside_them_the_busy_model_always():
    profile, base = enc_profile(), EngineLimits(max_rows=64)
    measured = profile["encoder"]
    slowed, lim, info = build_model(profile, Calibration.from_row(row(2, TWO)), 32, base, "corun")
    assert lim.corun_slowdown == pytest.approx(1.5) and info["name"] == "corun"
    assert slowed["encoder"].encoder_step_s(2, 32) == pytest.approx(1.6 * measured.encoder_step_s(2, 32))   # alone
    assert slowed["encoder"].encoder_step_s(60, 32) == pytest.approx(1.2 * measured.encoder_step_s(60, 32))
    assert lim.step_overhead_s == pytest.approx(0.02)            # 30 ms measured with both busy, / 1.5
    assert lim.overhead_s == pytest.approx(0.05 - 1.6 * 0.01 - 0.02)       # the idle call's rest
    assert lim.step_noise_s[0][1][0] == pytest.approx(0.02 / 1.25 - 1.6 * 0.01, abs=1e-5)   # light multiplier 1.25
    # busy (the default): the measured slowdown for every step, 30 ms between steps, no co-running
    slowed, lim, info = build_model(profile, Calibration.from_row(row(2, TWO)), 32, base)
    assert (lim.corun_slowdown, lim.step_overhead_s, info["corun"]) == (1.0, 0.03, None)
    assert slowed["encoder"].encoder_step_s(2, 32) == pytest.approx(2.0 * measured.encoder_step_s(2, 32))
    assert lim.step_noise_s[0][1][0] == pytest.approx(0.02 - 2.0 * 0.01, abs=1e-5)
    # one replica, or a run recorded before the busy shares were: corun is busy
    for r in (row(1, TWO), row(2, None)):
        assert build_model(profile, Calibration.from_row(r), 32, base, "corun")[1].corun_slowdown == 1.0
    with pytest.raises(ValueError, match="model 'magic'"):
        build_model(profile, Calibration.from_row(row(2, TWO)), 32, base, "magic")


def test_autoscale_ray_simulates_with_the_default_model_of_the_nearest_calibration():
    data = {"profile": enc_profile().to_json(), "runs": [row(1, {**TWO, "between_s": 0.01}), row(2, TWO)]}
    measured, slowed, lim, at = calibrated(data, 2, 32, EngineLimits(max_rows=64))
    assert (at, lim.step_overhead_s, lim.corun_slowdown) == (2, 0.03, 1.0)
    assert slowed["encoder"].encoder_step_s(60, 32) == pytest.approx(1.8 * measured["encoder"].encoder_step_s(60, 32))
    assert calibrated(data, 1, 32, EngineLimits(max_rows=64))[2].step_overhead_s == 0.01


def test_a_recorded_run_is_simulated_again_on_the_same_arrivals_by_both_models(tmp_path):
    w = {"tenants": 4, "zipf": 1.0, "tokens": 32, "slo_ms": 500.0, "seconds": 5.0, "seed": 3, "rpc_timeout_s": 30.0}
    r = row(2, TWO)
    tenants = [TenantLoad(f"t{i}", "encoder", x, 0.5, tokens=32) for i, x in enumerate(zipf_rates(20.0, 4))]
    r["num_requests"] = len(arrivals(tenants, 5.0, seed=3 * 1000 + 2 * 100 + 15 + 7))
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"date": "2026-12-07", "workload": w, "profile": enc_profile().to_json(), "runs": [r]}))
    out = tmp_path / "again.json"
    assert main(["--resimulate", str(old), "--json", str(out), "--sim-seeds", "2", "--quiet"]) == 0
    data = json.loads(out.read_text())
    (again,) = data["runs"]
    assert data["resimulated_from"]["path"] == str(old) and again["real"] == r["real"]
    assert again["sim"]["model"]["name"] == "busy" and again["sim"]["model"]["corun"] is None
    assert again["sim_alternative"]["model"]["corun"]["corun_slowdown"] == pytest.approx(1.5)
    # the same arrival sequence as recorded: as many requests simulated as were sent
    assert again["sim"]["num_requests"] == again["sim_alternative"]["num_requests"] == r["num_requests"] > 50
    assert data["max_p99_relative_error"] == again["p99_relative_error"]
    alternative = data["alternative_model"]
    assert alternative["name"] == "corun"
    assert alternative["max_p99_relative_error"] == again["sim_alternative"]["p99_relative_error"]
    assert out.with_suffix(".png").exists()
