"""benchmarks/structured.py on a tiny random decoder: free text and four grammars in rotating rounds, the full
decode steps timed and compared, the grammar work measured for the constrained contenders only, every completed
answer valid; JSON and PNG written."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("llguidance")

from tests.decoder_models import write_tiny_decoder_checkpoint

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_structured_benchmark_on_a_tiny_decoder(tmp_path):
    model = write_tiny_decoder_checkpoint(tmp_path / "tiny-decoder")
    out = tmp_path / "structured.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "structured.py"), "--model", str(model),
                           "--batch", "4", "--tokens", "12", "--rounds", "1", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    rows = {c["contender"]: c for c in r["contenders"]}
    assert list(rows) == ["free", "regex", "json", "choice", "tools"]
    assert rows["free"]["over_free"] == 1 and rows["free"]["grammar_us_per_row_step"] == 0
    assert rows["free"]["full_decode_steps"] > 0 and rows["free"]["completed"] == 0     # EOS ignored, no grammar
    for name in ("regex", "json", "choice", "tools"):
        assert rows[name]["grammar_us_per_row_step"] > 0 and rows[name]["all_completed_valid"]
        assert rows[name]["answers"] == 4
    for name in ("regex", "tools"):     # grammars never complete here (no call tag): every row runs to the end
        assert rows[name]["completed"] == 0 and rows[name]["full_decode_steps"] > 0
    assert out.with_suffix(".png").stat().st_size > 0
