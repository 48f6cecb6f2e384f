"""benchmarks/paged_attention.py on a tiny random decoder: ours (decode staging), ours reading the blocks and
transformers decode the same rows at two contexts, our first-step logits agree with transformers', the ratios, the
attention shares and the K/V read timings exist; prefill
steps timed with the chunks in one call, one by one and in transformers; JSON and PNG written."""
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
def test_paged_attention_benchmark_on_a_tiny_decoder(tmp_path):
    model = write_tiny_decoder_checkpoint(tmp_path / "tiny-decoder")
    out = tmp_path / "paged_attention.json"
    # 37 tokens: the last of 3 blocks of 16 only partly filled, so the masked pad is exercised
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "paged_attention.py"), "--model", str(model),
                           "--contexts", "8", "37", "--batch", "3", "--steps", "3", "--rounds", "3",
                           "--gather-reps", "2", "--prefill-shapes", "4x5", "1x9", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert [c["context"] for c in r["contexts"]] == [8, 37]
    for c in r["contexts"]:
        assert {k: len(v) for k, v in c["rounds_tokens_per_s"].items()} == {"ours": 3, "blocks": 3, "hf": 3}
        for ratio in ("ours_over_hf", "blocks_over_hf", "ours_over_blocks"):
            lo, hi = c[f"{ratio}_ci95"]
            assert lo <= c[ratio] <= hi
        assert 0 < c["attention_share_of_our_step"] < 1 and 0 < c["attention_share_of_blocks_step"] < 1
        assert c["gather_ms_one_layer"]["per_token"] > 0 and c["gather_ms_one_layer"]["per_block"] > 0
        # the paged cache computes what transformers' contiguous cache does
        assert c["first_step_max_abs_logit_diff"] < 1e-4
        assert c["first_step_greedy_agreement"] == 1.0
    assert [(p["chunks"], p["tokens_per_chunk"]) for p in r["prefill"]] == [(4, 5), (1, 9)]
    for p in r["prefill"]:
        assert all(len(v) == 3 for v in p["rounds_s"].values())
        assert min(p["step_ms"].values()) > 0 and min(p["attention_ms"].values()) > 0
    assert out.with_suffix(".png").stat().st_size > 0
