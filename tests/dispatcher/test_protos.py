"""The generated code is reproducible from protos/: a fresh generation equals the committed one."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_not_stale(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), "--out", str(tmp_path / "gen")], check=True,
                   capture_output=True)
    committed = {p.relative_to(ROOT / "dispatcher" / "gen"): p.read_bytes()
                 for p in (ROOT / "dispatcher" / "gen").rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    fresh = {p.relative_to(tmp_path / "gen"): p.read_bytes()
             for p in (tmp_path / "gen").rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert committed.keys() == fresh.keys(), "files differ: run .venv/bin/python protos/generate.py"
    stale = [str(k) for k in committed if committed[k] != fresh[k]]
    assert not stale, f"stale generated code {stale}: run .venv/bin/python protos/generate.py"
