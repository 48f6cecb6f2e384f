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
