"""Generate the Python gRPC code from protos/ into dispatcher/gen/ (reproducible; a test checks
that the committed code equals a fresh generation).

    .venv/bin/python protos/generate.py [--out DIR]

Generated imports are rewritten to absolute `dispatcher.gen.` imports, so the proto package
`vbert.v1` never resolves to this project's `vbert` Python package.
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PROTOS = ["vbert/v1/tenant.proto", "vbert/v1/admin.proto", "inference/grpc_service.proto"]
PACKAGE = "dispatcher.gen"


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{ROOT}", f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *PROTOS]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(tmp, out)
    written = []
    for path in sorted(out.rglob("*.py*")):
        text = re.sub(r"^from (vbert\.v1|inference) import", rf"from {PACKAGE}.\1 import", path.read_text(), flags=re.M)
        path.write_text(text)
        written.append(path)
    for d in [out, *[p for p in out.rglob("*") if p.is_dir()]]:
        (d / "__init__.py").write_text("")
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=str(ROOT.parent / "dispatcher" / "gen"))
    files = generate(Path(p.parse_args().out))
    print(f"generated {len(files)} files into {p.parse_args().out}", file=sys.stderr)


if __name__ == "__main__":
    main()
