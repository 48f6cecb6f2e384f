#!/usr/bin/env python
"""Sweep of benchmarks/multitenant.py over tenant counts and adapter kinds.

    python benchmarks/multitenant_table.py --tenants 1,100,1000 --adapters lora,bottleneck \
        --batch 32 --seq 128 --out-dir benchmarks/results/cpu-2026-11-23

Each point runs in its own subprocess (clean memory, no state shared between points) and writes
`<adapter>-n<N>.json` + `.png`; then `summary.json`, `summary.png` and `table.md` combine them, and
the Markdown table is printed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "multitenant.py"
PASS_THROUGH = ("batch", "seq", "rank", "bottleneck_size", "iters", "warmup", "peft_max_tenants", "backbone",
                "device", "dtype", "seed", "threads")
COLUMNS = ("adapter", "N", "tokens/s", "base tokens/s", "multitenant/base", "PEFT tokens/s", "ours/PEFT",
           "bytes/adapter")


def csv_of(kind):
    return lambda s: [kind(x) for x in s.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tenants", type=csv_of(int), default=[1, 100, 1000], help="comma-separated N values")
    p.add_argument("--adapters", type=csv_of(str), default=["lora", "bottleneck"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--out-dir", type=Path, default=None, help="default benchmarks/results/<cpu|cuda>-<date>")
    p.add_argument("--skip-existing", action="store_true",
                   help="reuse a point whose JSON is already in --out-dir (resume, or redo only deleted points)")
    for name in PASS_THROUGH[2:]:
        p.add_argument("--" + name.replace("_", "-"), default=None, help="passed to multitenant.py")
    return p.parse_args(argv)


def default_out_dir(device: str | None) -> Path:
    import torch

    device = device or "auto"
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return HERE / "results" / f"{'cuda' if cuda else 'cpu'}-{datetime.date.today().isoformat()}"


def point_command(args: argparse.Namespace, adapter: str, tenants: int, out: Path) -> list[str]:
    cmd = [sys.executable, str(SCRIPT), "--tenants", str(tenants), "--adapter", adapter, "--json", str(out)]
    for name in PASS_THROUGH:
        value = getattr(args, name)
        if value is not None:
            cmd += ["--" + name.replace("_", "-"), str(value)]
    return cmd


def run_point(cmd: list[str], out: Path) -> dict | None:
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd)
    if proc.returncode != 0 or not out.is_file():
        print(f"error: exit status {proc.returncode} for {out.name}", file=sys.stderr)
        return None
    return json.loads(out.read_text())


def fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def table_markdown(results: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    notes = []
    for r in results:
        ratio = fmt(r["ours_over_peft"], ".2f")
        if r["peft_tokens_per_s"] is not None and r["peft_num_adapters"] < r["num_tenants"]:
            ratio += f" (on {r['peft_num_adapters']} tenants)"
            notes.append(f"ours/PEFT at N={r['num_tenants']} compares both on rows drawn from the "
                         f"{r['peft_num_adapters']} adapters PEFT holds.")
        cells = (r["adapter"], str(r["num_tenants"]), fmt(r["tokens_per_s"], ",.0f"),
                 fmt(r["base_tokens_per_s"], ",.0f"), fmt(r["multitenant_over_base"], ".3f"),
                 fmt(r["peft_tokens_per_s"], ",.0f"), ratio, fmt(r["bytes_per_adapter"], ","))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + ([""] + sorted(set(notes)) if notes else []))


def write_plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    series = (("base", "base_tokens_per_s", "#999999"), ("ours", "tokens_per_s", "#1f77b4"),
              ("PEFT", "peft_tokens_per_s", "#ff7f0e"))
    x = np.arange(len(results))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(results) + 2), 4.2))
    for k, (label, key, color) in enumerate(series):
        vals = [r[key] if r[key] is not None else 0.0 for r in results]
        ax.bar(x + (k - 1) * 0.27, vals, 0.27, label=label, color=color)
    ax.set_xticks(x, [f"{r['adapter']}\nN={r['num_tenants']}" for r in results])
    ax.set_ylabel("tokens / s")
    r0 = results[0]
    ax.set_title(f"mixed-tenant batches, B={r0['batch']}, L={r0['seq']} on {r0['device']} ({r0['dtype']})",
                 fontsize=10)
    ax.set_ylim(0, 1.18 * max(r[key] or 0.0 for r in results for _, key, _ in series))
    ax.legend(ncol=len(series), loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    out_dir = args.out_dir or default_out_dir(args.device)
    out_dir.mkdir(parents=True, exist_ok=True)
    results, failed = [], []
    for adapter in args.adapters:
        for n in args.tenants:
            out = out_dir / f"{adapter}-n{n}.json"
            if args.skip_existing and out.is_file():
                print(f"reusing {out}", flush=True)
                r = json.loads(out.read_text())
            else:
                r = run_point(point_command(args, adapter, n, out), out)
            if r is None:
                failed.append(out.name)
            else:
                results.append(r)
    if not results:
        return 1
    table = table_markdown(results)
    summary = {"command": [sys.executable, sys.argv[0], *argv],
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "failed": failed, "table_markdown": table, "results": results}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "table.md").write_text(table + "\n")
    write_plot(results, out_dir / "summary.png")
    print("\n" + table + f"\n\nwrote {out_dir}/summary.json, summary.png, table.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
