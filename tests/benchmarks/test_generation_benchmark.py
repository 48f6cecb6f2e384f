"""benchmarks/generation.py --quick: a tiny random decoder end to end; the JSON has every section and the PNG exists."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_generation_benchmark_quick(tmp_path):
    out = tmp_path / "generation.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "generation.py"), "--quick", "--device", "cpu",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["partial"] is False
    for key in ("model", "device", "torch_threads", "machine", "date", "git", "parameters", "adapter_residency",
                "calibration", "slo_s_per_token", "offline", "ours_over_hf", "lora_over_base",
                "iteration_over_request", "table", "targets"):
        assert key in result, key
    assert set(result["targets"]) == {"iteration_over_request", "ours_over_hf", "lora_over_base"}
    for t in result["targets"].values():
        assert set(t) == {"value", "target", "met"}
    sweeps = result["iteration_over_request"]["sweeps"]
    assert set(sweeps) == {"iteration", "request"}
    for sweep in sweeps.values():
        assert sweep["points"]
        for p in sweep["points"]:
            for k in ("rate", "throughput_tokens_per_s", "e2e_s_p50", "e2e_s_p99", "normalized_s_per_token_p50",
                      "normalized_s_per_token_p99", "ttft_s_p50", "ttft_s_p99", "tpot_s_p50", "tpot_s_p99",
                      "preemptions", "passes"):
                assert k in p, k
            assert p["num_requests"] > 0 and p["generated_tokens"] > 0
    hf = result["ours_over_hf"]
    assert hf["hf"]["generated_tokens"] == hf["ours"]["generated_tokens"] > 0
    assert hf["first_8_tokens_agree_fraction"] >= 0.5    # same model, same adapters, greedy
    assert result["lora_over_base"]["lora_tokens_per_s"] > 0
    assert out.with_suffix(".png").stat().st_size > 0
    assert out.with_suffix(".md").read_text().startswith("| rate")
