#!/usr/bin/env python
"""How reproducible the real server's numbers are: several benchmarks/sim_validation.py JSONs of the same arrival
sequences (same seeds and settings), compared configuration by configuration.

    python benchmarks/sim_reproducibility.py RUN1.json RUN2.json RUN3.json --json OUT.json

Per configuration: the real p99 and SLO attainment of every run, the largest pairwise relative difference of the
real p99s, and the last run's simulated p99 against the median of the real ones (error, and whether it lies inside
the real runs' range). A simulator cannot be shown closer to the real server than the real server is to itself.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def compare(runs: list[dict]) -> dict:
    keys = [[(r["replicas"], r["rate_fraction"], r["cv"]) for r in d["runs"]] for d in runs]
    if any(k != keys[0] for k in keys):
        raise SystemExit("the runs do not cover the same configurations in the same order")
    configs = []
    for rows in zip(*[d["runs"] for d in runs]):
        real = [r["real"]["p99_s"] for r in rows]
        med, sim = statistics.median(real), rows[-1]["sim"]["p99_s"]
        configs.append({"replicas": rows[0]["replicas"], "rate_fraction": rows[0]["rate_fraction"], "cv": rows[0]["cv"],
                        "real_p99_s": real, "real_slo_attainment": [r["real"]["slo_attainment"] for r in rows],
                        "real_p99_largest_pairwise_difference": round(max(abs(a - b) / min(a, b)
                                                                          for a in real for b in real), 3),
                        "sim_p99_s": [r["sim"]["p99_s"] for r in rows],
                        "sim_p99_error_vs_median_real": round(abs(sim - med) / med, 3),
                        "sim_inside_real_range": min(real) <= sim <= max(real)})
    spread = [c["real_p99_largest_pairwise_difference"] for c in configs]
    err = [c["sim_p99_error_vs_median_real"] for c in configs]
    return {"runs": [{"git_revision": d.get("git_revision"), "date": d["date"], "command": d.get("command"),
                      "max_slo_attainment_error": d["max_slo_attainment_error"],
                      "max_p99_relative_error": d["max_p99_relative_error"]} for d in runs],
            "summary": {"real_p99_pairwise_difference_max": max(spread),
                        "real_p99_pairwise_difference_median": statistics.median(spread),
                        "sim_p99_error_vs_median_real_max": max(err),
                        "sim_p99_error_vs_median_real_median": statistics.median(err),
                        "sim_inside_real_range": sum(c["sim_inside_real_range"] for c in configs),
                        "configurations": len(configs)},
            "configs": configs}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="sim_validation JSONs; the last one's simulator is compared")
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args(argv)
    if len(args.runs) < 2:
        p.error("need at least two runs")
    out = compare([json.loads(f.read_text()) for f in args.runs])
    out["inputs"] = [str(f) for f in args.runs]
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["summary"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
