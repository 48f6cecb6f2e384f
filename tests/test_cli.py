"""The `vbert` console command, run as users run it (a real process)."""
import json
import subprocess
import sys
from pathlib import Path

VBERT = str(Path(sys.executable).parent / "vbert")


def test_info_json_on_default_backbone():
    out = subprocess.run([VBERT, "info", "-o", "json", "--device", "cpu", "--lora-slots", "3",
                          "--bottleneck-slots", "2", "--backbones", "encoder"], capture_output=True, text=True,
                         timeout=120, check=True)
    both = json.loads(out.stdout)
    assert set(both) == {"encoder"}                  # the decoder: tests/dispatcher/test_generate.py
    d = both["encoder"]
    assert d["backbone"] == "all-MiniLM-L6-v2" and d["layers"] == 6 and d["hidden_size"] == 384
    assert d["dtype"] == "float32" and d["device"].startswith("cpu")
    assert d["pool"]["lora_slots"] == 3 and d["pool"]["bottleneck_slots"] == 2


def test_info_rejects_bad_config_with_usage_error():
    out = subprocess.run([VBERT, "info", "--device", "cpu", "--dtype", "float16"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "only supported on CUDA" in out.stderr


def test_demo_runs_a_mixed_batch():
    out = subprocess.run([VBERT, "demo", "--tenants", "20", "--batch", "8"], capture_output=True, text=True,
                         timeout=300, check=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("tenant-")]
    assert len(lines) == 8
    assert "mixed batch: 8 rows" in out.stdout and "tokens/s" in out.stdout
