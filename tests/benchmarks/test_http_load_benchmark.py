"""benchmarks/http_load.py --quick: a tiny random decoder served in-process, the same streamed chat requests
over HTTP (openai client, SSE), gRPC Generate and the engine in-process; the JSON has all three paths with
generated tokens, the ratios, equal HTTP and gRPC texts, and the PNG and Markdown table exist."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("openai")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[2]
PATHS = ("http", "grpc", "inprocess")


@pytest.mark.slow
def test_http_load_benchmark_quick(tmp_path):
    out = tmp_path / "http_load.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "http_load.py"), "--quick", "--quiet",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("machine", "date", "git", "parameters", "workload", "targets", "paths", "rounds",
                "http_over_grpc", "grpc_over_inprocess", "http_over_inprocess", "outputs_agree"):
        assert key in result, key
    assert result["targets"]["http_over_grpc"]["target"] == 0.9
    w = result["workload"]
    assert len(result["rounds"]) == w["rounds"] >= 2
    assert [r["order"][0] for r in result["rounds"]][:2] == ["http", "grpc"]      # order rotated
    for p in PATHS:
        s = result["paths"][p]
        assert s["errors"] == {} and s["num_ok"] == s["num_requests"] == w["rounds"] * w["requests_per_round_per_path"]
        assert s["completion_tokens"] == s["num_ok"] * w["max_tokens"]        # ignore_eos: exactly max_tokens each
        assert s["tokens_per_s"] > 0 and s["ttft_ms_p50"] > 0 and s["ttft_ms_p99"] >= s["ttft_ms_p50"]
    for name in ("http_over_grpc", "grpc_over_inprocess", "http_over_inprocess"):
        assert result[name] > 0 and len(result[f"{name}_rounds"]) == w["rounds"]
    agree = result["outputs_agree"]
    assert agree["http_vs_grpc"]["compared"] == result["paths"]["http"]["num_ok"]
    assert agree["http_vs_grpc"]["fraction"] == 1.0          # greedy, same model: the same text
    assert agree["inprocess_vs_grpc"]["fraction"] == 1.0
    assert out.with_suffix(".png").stat().st_size > 0
    assert out.with_suffix(".md").read_text().startswith("| path")
