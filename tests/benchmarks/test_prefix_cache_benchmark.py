"""benchmarks/prefix_cache.py --quick: a tiny random decoder end to end; every scenario has both contenders,
the cache-on runs reuse the shared system prompts (the control shares nothing, a chat's second turn reuses its
first), the tokens agree, the PNG exists."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_prefix_cache_benchmark_quick(tmp_path):
    out = tmp_path / "prefix.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "prefix_cache.py"), "--quick", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["partial"] is False and set(result["scenarios"]) == {"offline", "open_loop", "control", "chat"}
    for name, sc in result["scenarios"].items():
        for run in sc["runs"]:
            assert run["off"]["cached_prompt_tokens"] == 0 and run["on"]["num_requests"] == 16
            assert run["off"]["prompt_tokens"] == run["on"]["prompt_tokens"] > 0
        assert sc["same_tokens_share"] >= 0.9
        for key in ("throughput_on_over_off", "ttft_p50_on_over_off", "ttft_p99_on_over_off"):
            assert sc[key] > 0
    assert result["scenarios"]["offline"]["cached_share_of_prompt_tokens"] > 0.2       # the system prompts
    assert result["scenarios"]["offline"]["prefill_tokens_on_over_off"] < 0.8
    assert result["scenarios"]["control"]["cached_share_of_prompt_tokens"] < 0.05
    chat = result["scenarios"]["chat"]                 # the second turns reuse the first turn and its answer too
    assert chat["cached_share_of_prompt_tokens"] > result["scenarios"]["offline"]["cached_share_of_prompt_tokens"]
    assert chat["runs"][0]["on"]["turn1"]["num_requests"] == 16
    assert result["scenarios"]["open_loop"]["runs"][0]["rate"] > 0
    assert out.with_suffix(".png").stat().st_size > 0
