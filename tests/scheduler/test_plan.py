"""`vbert plan` on the recorded profile of this machine and the shipped example workload, and its errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from dispatcher.cli import main
from scheduler.plan import load_workload

ROOT = Path(__file__).resolve().parents[2]
PROFILE = ROOT / "benchmarks" / "results" / "cpu-2026-12-06" / "profile" / "profile.json"
EXAMPLE = ROOT / "examples" / "plan" / "three-devices.toml"
PROFILE_THREE = ROOT / "benchmarks" / "results" / "cpu-2026-12-06" / "profile" / "profile-three.json"
EXAMPLE_THREE = ROOT / "examples" / "plan" / "three-backbones.toml"


def test_plan_places_more_encoders_than_one_per_backbone_and_meets_more_slos():
    out = CliRunner().invoke(main, ["plan", "--profile", str(PROFILE), "--workload", str(EXAMPLE), "-o", "json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.output)
    greedy, base = result["greedy"], result["one_per_backbone"]
    encoders = sum(r.count("encoder") for r in greedy["placement"].values())
    assert encoders >= 2 and greedy["slo_attainment"] > base["slo_attainment"] + 0.5
    assert set(greedy["placement"]) == {"dev0", "dev1", "dev2"}
    text = CliRunner().invoke(main, ["plan", "--profile", str(PROFILE), "--workload", str(EXAMPLE)])
    assert "greedy: SLO attainment" in text.output and "dev0" in text.output


def test_three_backbones_need_a_pair_of_replicas_that_no_single_one_finds():
    """The BERT-base-sized encoder's second replica fits only beside a small encoder, which then loses half its
    device: no single replica raises the attainment, a small encoder on the decoder's idle device first does."""
    from scheduler.latency_profile import LatencyProfile
    from scheduler.placement import greedy, selective_replication
    from scheduler.simulator import arrivals, simulate

    profile, work = LatencyProfile.load(PROFILE_THREE), load_workload(EXAMPLE_THREE)
    arr = arrivals(work.tenants, work.duration_s, work.seed)
    found = greedy(profile, work.devices, work.tenants, arr)
    scores = [a for _, a in found.trace]
    assert scores == sorted(scores) and found.result.slo_attainment >= 0.999
    i = next(k for k in range(1, len(scores)) if scores[k] == scores[k - 1])      # the pair's first replica
    before = found.trace[i - 1][0]
    free = [d.memory_bytes for d in work.devices]
    for b, d in before:
        free[d] -= profile[b].replica_bytes
    for b in ("encoder", "encoder-base", "decoder"):                   # no single replica would have helped
        for d in range(len(work.devices)):
            if free[d] >= profile[b].replica_bytes:
                alone = simulate(profile, before + [(b, d)], work.tenants, arr)
                assert alone.slo_attainment <= scores[i - 1]
    assert found.placement.count("encoder-base") == 2
    rival = selective_replication(profile, work.devices, work.tenants)
    assert len(found.placement.replicas) < len(rival.replicas)


def test_workload_errors_name_the_problem(tmp_path):
    bad = tmp_path / "w.toml"
    bad.write_text('[[devices]]\nname = "d"\nmemory_gb = 4\n[[tenants]]\nname = "a"\nbackbone = "encoder"\n'
                   'rate = 1\nslo_ms = 100\nburst = 3\n')
    with pytest.raises(ValueError, match=r"tenants\[0\]: unknown keys \['burst'\]"):
        load_workload(bad)
    bad.write_text('[[tenants]]\nname = "a"\nbackbone = "encoder"\nrate = 1\nslo_ms = 100\n')
    with pytest.raises(ValueError, match="no \\[\\[devices\\]\\]"):
        load_workload(bad)
    bad.write_text('[[devices]]\nmemory_gb = 4\n[[tenants]]\nname = "a"\nbackbone = "bert-base"\nrate = 1\nslo_ms = 100\n')
    out = CliRunner().invoke(main, ["plan", "--profile", str(PROFILE), "--workload", str(bad)])
    assert out.exit_code == 2 and "no backbone 'bert-base'" in out.output
