"""benchmarks/sim_reproducibility.py on runs whose answers are known."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from sim_reproducibility import compare  # noqa: E402


def run(p99s: list[float], sim_p99: float) -> dict:
    return {"date": "2026-12-06", "max_slo_attainment_error": 0.5, "max_p99_relative_error": 0.1,
            "runs": [{"replicas": n, "rate_fraction": 0.3, "cv": 1.0, "real": {"p99_s": p, "slo_attainment": 1.0},
                      "sim": {"p99_s": sim_p99}} for n, p in enumerate(p99s)]}


def test_spread_of_the_real_runs_and_the_last_simulator_against_their_median(tmp_path):
    runs = [run([0.1, 0.2], 9.0), run([0.15, 0.2], 9.0), run([0.2, 0.2], 0.12)]
    out = compare(runs)
    first, second = out["configs"]
    assert first["real_p99_largest_pairwise_difference"] == 1.0                       # 0.2 vs 0.1
    assert first["sim_p99_error_vs_median_real"] == pytest.approx(0.2)               # 0.12 vs median 0.15
    assert first["sim_inside_real_range"] and not second["sim_inside_real_range"]    # 0.12 < 0.2 = every real run
    assert out["summary"]["sim_inside_real_range"] == 1 and out["summary"]["real_p99_pairwise_difference_median"] == 0.5
    files = []
    for i, r in enumerate(runs):
        files.append(tmp_path / f"r{i}.json")
        files[-1].write_text(json.dumps(r))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sim_reproducibility.py"), *map(str, files),
                           "--json", str(tmp_path / "out.json")], capture_output=True, text=True)
    assert done.returncode == 0 and json.loads((tmp_path / "out.json").read_text())["summary"] == out["summary"]
    other = run([0.1, 0.2], 0.1)
    other["runs"][1]["cv"] = 3.0
    with pytest.raises(SystemExit, match="same configurations"):
        compare([runs[0], other])
