#!/usr/bin/env python
"""Predictive autoscaling against static and reactive allocation, over several days of the seed study's load.

    python benchmarks/autoscale.py --json benchmarks/results/cpu-DATE/autoscale.json

The load (scheduler.autoscale.seed_study_load): a daily sine between 7 and 13 capacity units, each interval times
(1 + U(-0.1, 0.1)), plus bursts (2 a day, +30-60 % for 5-20 intervals); one replica serves one unit. Replicas asked
for are ready after the replica start time (--start-s, default: benchmarks/scaleout.py's measured start of one
replica, rounded up to whole intervals). Policies: `static_mean` and `static_peak` (replicas for the mean and the
peak load), `reactive` (Ray Serve's default autoscaling delays: up after 30 s, down after 600 s), `predictive`
(a robust harmonic forecast of the daily trend, replicas bought at an overload cost, a reactive floor), and
`trend_oracle` (the same policy given the true daily sine instead of a forecast: the bound on any forecast). The first --warmup-days (the forecast needs two days of
history) are left out of every policy's measures. Each figure is the mean over --seeds loads; per-seed values are
in the JSON. Writes JSON and a PNG (one day of load and replicas) next to it.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from scheduler.autoscale import (FORECASTERS, Predictive, Reactive, Static, evaluate, replicas_for,  # noqa: E402
                                 seed_study_load)

SCALEOUT = ROOT / "benchmarks" / "results" / "cpu-2026-12-06" / "scaleout" / "scaleout.json"


class TrendOracle(Predictive):
    """The bound on any forecast: the predictive policy (the same overload cost, lead, burst handling and reactive
    floor) handed the seed study's daily sine exactly instead of its forecast (not the noise, not the bursts: it
    learns their spread from its errors as the predictive policy does). What a perfect forecast of the trend would
    reach."""

    def __init__(self, per_day: int, lead: int, overload_cost: float, low=7.0, high=13.0):
        super().__init__(1.0, per_day, lead=lead, overload_cost=overload_cost, name="trend_oracle")
        self.mid, self.amp = (low + high) / 2, (high - low) / 2

    def _forecast_at(self, observed, interval: int) -> float:
        return self.mid - self.amp * math.cos(2 * math.pi * interval / self.intervals_per_day)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--days", type=int, default=7)
    p.add_argument("--warmup-days", type=int, default=2)
    p.add_argument("--interval-s", type=float, default=60.0)
    p.add_argument("--start-s", type=float, default=None, help="replica start time (default: scaleout.json's)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--first-seed", type=int, default=0, help="loads are seeds first-seed .. first-seed + seeds - 1 "
                   "(the policy's settings were chosen on seeds 100-104, not on the reported 0-4)")
    p.add_argument("--quantile", type=float, default=None, help="the predictive policy's margin: this quantile of "
                   "its recent errors instead of the overload cost")
    p.add_argument("--overload-cost", type=float, default=None, help="the predictive policy's overload cost "
                   "(replicas an overloaded interval is worth; default: scheduler.autoscale.Predictive's)")
    p.add_argument("--forecaster", choices=FORECASTERS, default=None,
                   help="the predictive policy's forecast (default: scheduler.autoscale.Predictive's)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.days <= args.warmup_days or args.warmup_days < 2 or args.interval_s <= 0 or args.seeds < 1:
        p.error("need days > warmup-days >= 2 (the forecast needs two days), interval-s > 0, seeds >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start_s, source = args.start_s, "--start-s"
    if start_s is None:
        start_s, source = json.loads(SCALEOUT.read_text())["throughput"]["one_replica"]["start_s"], str(SCALEOUT.relative_to(ROOT))
    per_day = int(round(86400 / args.interval_s))
    start_intervals = max(1, math.ceil(start_s / args.interval_s))
    skip = args.warmup_days * per_day
    runs: dict[str, list[dict]] = {}
    example = {}
    margin = {} if args.quantile is None else {"quantile": args.quantile, "overload_cost": None}
    if args.overload_cost is not None:
        margin["overload_cost"] = args.overload_cost
    if args.forecaster is not None:
        margin["forecaster"] = args.forecaster
    for seed in tqdm(range(args.first_seed, args.first_seed + args.seeds), desc="loads", disable=args.quiet):
        load = seed_study_load(args.days, per_day, seed=seed)
        measured = load[skip:]
        policies = {"static_mean": Static(replicas_for(statistics.fmean(measured), 1.0)),
                    "static_peak": Static(replicas_for(max(measured), 1.0)),
                    "reactive": Reactive(1.0, args.interval_s), "predictive": Predictive(1.0, per_day, **margin)}
        if policies["predictive"].overload_cost is not None:
            policies["trend_oracle"] = TrendOracle(per_day, start_intervals, policies["predictive"].overload_cost)
        for name, policy in policies.items():
            out = evaluate(policy, load, 1.0, start_intervals, initial=replicas_for(load[0], 1.0), skip=skip)
            runs.setdefault(name, []).append(out.to_json())
            if seed == args.first_seed:
                example[name] = out.provisioned[skip:skip + per_day]
        if seed == args.first_seed:
            example["load"] = [round(x, 3) for x in load[skip:skip + per_day]]
    policies_out = {name: {"efficiency": round(statistics.fmean(r["efficiency"] for r in rs), 4),
                           "overloaded_share": round(statistics.fmean(r["overloaded_share"] for r in rs), 4),
                           "per_seed": rs} for name, rs in runs.items()}
    pred, react = policies_out["predictive"], policies_out["reactive"]
    result = {"benchmark": "autoscale", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": sys.argv,
              "load": {"days": args.days, "warmup_days": args.warmup_days, "interval_s": args.interval_s,
                       "sine": [7, 13], "noise": 0.1, "bursts_per_day": 2, "burst_height": [0.3, 0.6],
                       "burst_intervals": [5, 20], "seeds": args.seeds, "first_seed": args.first_seed, "replica_capacity_units": 1},
              "predictive_settings": {k: getattr(Predictive(1.0, per_day, **margin), k) for k in
                                      ("forecaster", "harmonics", "overload_cost", "quantile", "history_days",
                                                                                "burst_window")},
              "replica_start_s": start_s, "replica_start_source": source, "start_intervals": start_intervals,
              "policies": policies_out,
              "targets": {"predictive_efficiency_min": 0.9, "predictive_overloaded_max": 0.02,
                          "met": {"efficiency": pred["efficiency"] >= 0.9, "overloaded": pred["overloaded_share"] <= 0.02,
                                  "better_than_reactive_efficiency": pred["efficiency"] > react["efficiency"],
                                  "better_than_reactive_overloaded": pred["overloaded_share"] < react["overloaded_share"]}},
              "example_day": example}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    write_plot(result, args.json.with_suffix(".png"))
    print(json.dumps({k: {m: v[m] for m in ("efficiency", "overloaded_share")} for k, v in policies_out.items()}))
    return 0


def write_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ex = result["example_day"]
    hours = [i * result["load"]["interval_s"] / 3600 for i in range(len(ex["load"]))]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.plot(hours, ex["load"], color="#bbb", lw=0.8, label="load (units)")
    for name, color in (("reactive", "#d62"), ("predictive", "#27a"), ("static_mean", "#888")):
        p = result["policies"][name]
        ax.step(hours, ex[name], where="post", color=color, lw=1.2,
                label=f"{name}: efficiency {p['efficiency']:.3f}, overloaded {p['overloaded_share']:.3f}")
    ax.set_xlabel("hour of the day (first measured day, seed 0)")
    ax.set_ylabel("replicas ready / load units")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(f"Autoscaling over {result['load']['days'] - result['load']['warmup_days']} days x "
                 f"{result['load']['seeds']} loads (replica start {result['replica_start_s']:.1f} s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
