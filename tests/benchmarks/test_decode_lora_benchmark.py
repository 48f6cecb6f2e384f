"""benchmarks/decode_lora.py on a tiny random decoder: both bank dtypes timed against no adapter, the output
check compares bfloat16 with float32 banks, the kernel-only timings exist, JSON and PNG written."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from tests.decoder_models import write_tiny_decoder_checkpoint

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_decode_lora_benchmark_on_a_tiny_decoder(tmp_path):
    model = write_tiny_decoder_checkpoint(tmp_path / "tiny-decoder")
    out = tmp_path / "decode_lora.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode_lora.py"), "--model", str(model),
                           "--adapters", "6", "--batch", "4", "--prompt-tokens", "8", "--steps", "3", "--rounds", "3",
                           "--check-steps", "4", "--kernel-reps", "3", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["pool_bytes"]["float32"] == 2 * r["pool_bytes"]["bfloat16"]
    for dt in ("float32", "bfloat16"):
        assert len(r["ratios"][dt]["per_round"]) == 3 and r["ratios"][dt]["median_of_round_ratios"] > 0
        lo, hi = r["ratios"][dt]["ci95"]
        assert lo <= r["ratios"][dt]["median_of_round_ratios"] <= hi
        for case in ("one_adapter", "distinct_adapters"):
            assert r["kernel_ms_per_step"][case][dt] > 0
    check = r["output_check"]
    assert check["positions"] == 4 * 4
    # the adapters change the logits; bfloat16 banks change them far less than the adapters do
    assert check["max_abs_logit_diff_lora_vs_base"] > 0
    assert 0 < check["max_abs_logit_diff_bfloat16_vs_float32"] < 0.1 * check["max_abs_logit_diff_lora_vs_base"]
    assert out.with_suffix(".png").stat().st_size > 0
