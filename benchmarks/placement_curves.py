#!/usr/bin/env python
"""SLO attainment of the three placements against rate scale, CV scale and SLO scale, as AlpaServe draws them.

    python benchmarks/placement_curves.py --json benchmarks/results/cpu-DATE/placement/placement_curves.json

A cluster and workload (`vbert plan`'s TOML, default examples/plan/three-devices.toml) and a measured latency
profile (default the recorded one). For each point, every tenant's rate, CV or SLO is multiplied by the scale
(the other two at 1), each policy places replicas for that workload (greedy: AlpaServe's simulator-guided
search; one replica per backbone; selective replication: replicas by load, while memory lasts) and the simulator
serves the same arrivals on each placement. No torch: seconds on a CPU. Writes JSON and a PNG next to it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scheduler.latency_profile import LatencyProfile  # noqa: E402
from scheduler.placement import greedy, one_per_backbone, selective_replication  # noqa: E402
from scheduler.plan import load_workload  # noqa: E402
from scheduler.simulator import arrivals, simulate  # noqa: E402

PROFILE = ROOT / "benchmarks" / "results" / "cpu-2026-12-06" / "profile" / "profile.json"
WORKLOAD = ROOT / "examples" / "plan" / "three-devices.toml"
POLICIES = ("greedy", "selective_replication", "one_per_backbone")


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, required=True, help="where to write the results (a PNG goes next to it)")
    p.add_argument("--profile", type=Path, default=PROFILE)
    p.add_argument("--workload", type=Path, default=WORKLOAD)
    p.add_argument("--rate-scales", default="0.25,0.5,1,1.5,2,3,4")
    p.add_argument("--cv-scales", default="0.5,1,2,3,4,6")
    p.add_argument("--slo-scales", default="0.25,0.5,0.75,1,1.5,2,3")
    p.add_argument("--duration-s", type=float, default=None, help="simulated seconds (default: the workload's)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args.scales = {"rate": floats(args.rate_scales), "cv": floats(args.cv_scales), "slo": floats(args.slo_scales)}
    if any(not v or min(v) <= 0 for v in args.scales.values()):
        p.error("every scale must be a positive number")
    return args


def scaled(tenants, dimension: str, scale: float):
    field = {"rate": "rate", "cv": "cv", "slo": "slo_s"}[dimension]
    return [dataclasses.replace(t, **{field: getattr(t, field) * scale}) for t in tenants]


def point(profile, workload, tenants, duration_s: float) -> dict:
    arr = arrivals(tenants, duration_s, workload.seed)
    out = {}
    found = greedy(profile, workload.devices, tenants, arr)
    out["greedy"] = (found.placement, found.result)
    for name, make in (("selective_replication", selective_replication), ("one_per_backbone", one_per_backbone)):
        placement = make(profile, workload.devices, tenants)
        out[name] = (placement, simulate(profile, placement.replicas, tenants, arr))
    return {name: {"slo_attainment": round(result.slo_attainment, 4), "p99_s": result.p99_s,
                   "replicas": [b for b, _ in placement.replicas]} for name, (placement, result) in out.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    profile = LatencyProfile.load(args.profile)
    workload = load_workload(args.workload)
    duration = args.duration_s or workload.duration_s
    curves: dict = {}
    bar = tqdm(total=sum(len(v) for v in args.scales.values()), desc="placement curves", disable=args.quiet)
    t0 = time.perf_counter()
    for dimension, scales in args.scales.items():
        curves[dimension] = []
        for scale in scales:
            curves[dimension].append({"scale": scale, **point(profile, workload, scaled(workload.tenants, dimension, scale),
                                                               duration)})
            bar.update()
    bar.close()
    out = {"benchmark": "placement_curves", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": sys.argv,
           "profile": str(args.profile.relative_to(ROOT) if args.profile.is_relative_to(ROOT) else args.profile),
           "profile_machine": profile.machine,
           "workload": str(args.workload.relative_to(ROOT) if args.workload.is_relative_to(ROOT) else args.workload),
           "devices": [d.name for d in workload.devices], "num_tenants": len(workload.tenants),
           "duration_s": duration, "seconds": round(time.perf_counter() - t0, 1), "curves": curves}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    write_plot(out, args.json.with_suffix(".png"))
    print(json.dumps({d: {p: [c[p]["slo_attainment"] for c in curve] for p in POLICIES} for d, curve in curves.items()}))
    return 0


def write_plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"greedy": ("o-", "#27a"), "selective_replication": ("s--", "#e72"), "one_per_backbone": ("^:", "#888")}
    labels = {"rate": "rate scale", "cv": "CV scale", "slo": "SLO scale"}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    for ax, (dimension, curve) in zip(axes, out["curves"].items()):
        xs = [c["scale"] for c in curve]
        for policy in POLICIES:
            marker, color = styles[policy]
            ax.plot(xs, [c[policy]["slo_attainment"] for c in curve], marker, color=color,
                    label=policy.replace("_", " "))
        ax.set_xlabel(labels[dimension])
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("SLO attainment (simulated)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Placements on {len(out['devices'])} devices, {out['num_tenants']} tenants "
                 f"({out['workload']}, profile {out['profile_machine'].get('date', '')[:10]})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
