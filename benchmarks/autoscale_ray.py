#!/usr/bin/env python
"""Predictive autoscaling on Ray Serve for real: one compressed day of the seed study's load on this machine.

    python benchmarks/autoscale_ray.py --json benchmarks/results/cpu-DATE/autoscale_ray/autoscale_ray.json

A real server (dispatcher.server.Server on 127.0.0.1, the default backbone) with `autoscale = predictive`: its
encoder replicas are scaled by dispatcher/autoscaling.py running as Ray Serve's custom autoscaling policy, from the
rows per second the replicas report. The load (scheduler.autoscale.seed_study_load: a daily sine between 7 and 13
units, +-10 % noise, bursts) is compressed to --day-s seconds in intervals of --interval-s, one unit being
--unit-rps calls/s of one 32-token text over --tenants Zipf tenants (Gamma arrivals, CV --cv, seeded). The policy's
history holds --history-days earlier (compressed) days of the same load (`autoscale_history`; Holt-Winters needs
two), then the benchmark sends the next day, open loop, from grpc_load's client in a child process, polling Ray
for the running replicas every second.

Reported: the run's SLO attainment and p99, and what the simulator predicts for the same arrivals served on the
run's replica timeline (scheduler/simulator.py with the one-thread profile and the in-server step cost that
benchmarks/sim_validation.py measured: --calibration); efficiency (needed replicas / running replicas, per
interval) and the share of intervals overloaded (load above the running replicas' capacity), the seed study's two
measures. Writes JSON and a PNG (load and capacity over the day; attainment per interval, real and simulated).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from grpc_load import ADAPTER, DATA_DIR, OwnServer, SubprocessClient, load_texts, make_artifacts  # noqa: E402

from scheduler.autoscale import replicas_for, seed_study_load  # noqa: E402
from scheduler.latency_profile import LatencyProfile  # noqa: E402
from scheduler.simulator import (EngineLimits, TenantLoad, arrivals, latencies, percentile,  # noqa: E402
                                 zipf_rates)

CALIBRATION = ROOT / "benchmarks" / "results" / "cpu-2026-12-06" / "sim_validation" / "sim_validation.json"


def day_parser(description: str, tenants: int, slo_ms: float, rpc_timeout_s: float) -> argparse.ArgumentParser:
    """The options of a compressed day that this script and autoscale_ray_decoder.py share."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", type=Path, required=True, help="where to write the results (a PNG goes next to it)")
    p.add_argument("--policy", default="predictive", choices=("predictive", "reactive"))
    p.add_argument("--day-s", type=float, default=600.0, help="seconds of one compressed day")
    p.add_argument("--interval-s", type=float, default=12.5, help="one load sample and decision per interval")
    p.add_argument("--history-days", type=int, default=2)
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, default=3)
    p.add_argument("--tenants", type=int, default=tenants)
    p.add_argument("--cv", type=float, default=1.0)
    p.add_argument("--slo-ms", type=float, default=slo_ms)
    p.add_argument("--rpc-timeout-s", type=float, default=rpc_timeout_s)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", type=Path, default=DATA_DIR)
    p.add_argument("--log-level", default="WARNING")
    return p


def check_day(p: argparse.ArgumentParser, args, *positive: float) -> None:
    """Refuse (p.error) a day the run cannot make; `positive`: the script's own rates and capacities."""
    if args.history_days < 2 and args.policy == "predictive":
        p.error("the forecast needs --history-days >= 2")
    if args.day_s < 4 * args.interval_s or min(*positive, args.slo_ms, args.cv) <= 0:
        p.error("need --day-s >= 4 intervals and positive rates, capacity, SLO and CV")
    if not 1 <= args.min_replicas <= args.max_replicas:
        p.error("need 1 <= --min-replicas <= --max-replicas")
    args.max_in_flight, args.requests, args.latency_target_ms = 25_000, 10 ** 6, None   # what OwnServer reads


def parse_args(argv=None):
    p = day_parser(__doc__.split("\n\n")[0], tenants=8, slo_ms=500.0, rpc_timeout_s=30.0)
    p.add_argument("--unit-rps", type=float, default=4.0, help="calls/s of one load unit (the load is 7-13 units)")
    p.add_argument("--capacity-rps", type=float, default=30.0, help="calls/s one replica serves within the SLO "
                   "(replica_capacity_rps)")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--sim-seeds", type=int, default=5, help="simulate with the calibration's step noise this many "
                   "times (seeded) and keep the run of median p99, as sim_validation does; 0: no step noise")
    p.add_argument("--calibration", type=Path, default=CALIBRATION,
                   help="benchmarks/sim_validation.py's JSON (profile and in-server step cost)")
    p.add_argument("--backbone", default=None)
    args = p.parse_args(argv)
    check_day(p, args, args.unit_rps, args.capacity_rps)
    return args


class ReplicaPoll(threading.Thread):
    """Ray's count of running replicas of the encoder deployment, every second: [(seconds since start, running)]."""

    def __init__(self, app_name: str):
        super().__init__(daemon=True, name="replica-poll")
        self.app_name, self.samples, self.t0 = app_name, [], time.perf_counter()
        self._halt = threading.Event()

    def running(self) -> int:
        from ray import serve

        app = serve.status().applications.get(self.app_name)
        if app is None:
            return 0
        return sum(int(n) for d in app.deployments.values() for s, n in d.replica_states.items()
                   if str(getattr(s, "value", s)) == "RUNNING")

    def run(self) -> None:
        while not self._halt.wait(1.0):
            try:
                self.samples.append((time.perf_counter() - self.t0, self.running()))
            except Exception:  # noqa: BLE001 - a missed poll leaves a gap, not a failed run
                pass

    def halt(self) -> None:
        self._halt.set()
        self.join(5)


def send_day(client, seq, day_s: float, poll: ReplicaPoll) -> dict:
    """Send the day's requests (`seq`: (time, tenant), open loop) through `client` with a progress bar of the
    running replicas; then close the client and stop polling. The client's result (records per request)."""
    from tqdm import tqdm

    done = threading.Event()

    def progress():
        with tqdm(total=int(day_s), desc="compressed day", unit="s") as bar:
            while not done.wait(5):
                bar.n = min(int(day_s), int(time.perf_counter() - poll.t0))
                bar.set_postfix(replicas=poll.samples[-1][1] if poll.samples else 0)
                bar.refresh()

    threading.Thread(target=progress, daemon=True).start()
    try:
        return client.run({"op": "scheduled", "label": "day", "num": len(seq), "times": [t for t, _ in seq],
                           "quiet": True})
    finally:
        done.set()
        client.close()
        poll.halt()


def windows_of(samples: list[tuple[float, int]], end_s: float) -> list[tuple[float, float]]:
    """The replica timeline as one [start, end) per replica stint: replica j is up while the count exceeds j."""
    out, open_at = [], {}
    for t, n in samples + [(end_s, 0)]:
        for j in range(max(n, max(open_at, default=-1) + 1)):
            if j < n and j not in open_at:
                open_at[j] = t
            elif j >= n and j in open_at:
                out.append((open_at.pop(j), t))
    return out


def attainment(lat: list, slo_s: float) -> float:
    """Share of the requests answered within slo_s (None: not answered)."""
    return sum(1 for x in lat if x is not None and x <= slo_s) / max(1, len(lat))


def day_intervals(seq, samples, real, sim, per_day: int, interval_s: float, slo_s: float,
                  capacity: float) -> list[dict]:
    """Per interval of the day: its load (arrivals of `seq` per second), the fewest replicas Ray ran in it (the
    polled `samples`), the replicas that load needs at `capacity` each, and the real and simulated SLO attainment
    of its requests (latencies `real`, `sim` in arrival order)."""
    calls_in: list[list[int]] = [[] for _ in range(per_day)]          # interval -> its calls
    running_in: list[list[int]] = [[] for _ in range(per_day)]        # interval -> the replica counts polled in it
    for i, (t, _) in enumerate(seq):
        calls_in[min(per_day - 1, int(t / interval_s))].append(i)
    for t, n in samples:
        if int(t / interval_s) < per_day:
            running_in[int(t / interval_s)].append(n)
    out = []
    for k in range(per_day):
        idx, in_k = calls_in[k], running_in[k]
        load = len(idx) / interval_s
        out.append({"interval": k, "load_rps": round(load, 3), "running_replicas": min(in_k) if in_k else None,
                    "needed_replicas": replicas_for(load, capacity),
                    "real_attainment": round(attainment([real[i] for i in idx], slo_s), 4) if idx else None,
                    "sim_attainment": round(attainment([sim[i] for i in idx], slo_s), 4) if idx else None})
    return out


def day_measures(intervals: list[dict], load: str, needed: str, capacity: float, suffix: str = "") -> dict:
    """The seed study's two measures over the intervals Ray ran replicas in: efficiency (needed / running
    replicas) and the share of intervals whose `load` exceeded running x `capacity`."""
    counted = [r for r in intervals if r["running_replicas"]]
    return {f"efficiency{suffix}": round(sum(r[needed] for r in counted)
                                         / max(1, sum(r["running_replicas"] for r in counted)), 4),
            f"overloaded_share{suffix}": round(sum(1 for r in counted if r[load] > r["running_replicas"] * capacity)
                                               / max(1, len(counted)), 4)}


def plot_attainment(ax, out: dict) -> None:
    """SLO attainment per interval, real and simulated, on `ax` (the last panel of a day's plot)."""
    s, iv = out["setup"], out["intervals"]
    t = [r["interval"] * s["interval_s"] for r in iv]
    ax.plot(t, [r["real_attainment"] for r in iv], "o-", ms=3, color="#27a",
            label=f"real ({out['real']['slo_attainment']:.3f} over the day)")
    ax.plot(t, [r["sim_attainment"] for r in iv], "s--", ms=3, color="#e72",
            label=f"simulated ({out['sim']['slo_attainment']:.3f})")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel(f"SLO attainment ({s['slo_ms']:.0f} ms)")
    ax.set_xlabel("seconds into the compressed day")
    ax.legend(fontsize=8)


def calibrated(data: dict, replicas: int, tokens: int, limits):
    """The simulator's profile (as measured, and slowed as in the server) and limits (`limits`' budgets with the
    measured overheads and step noise: sim_validation's default model) from sim_validation's run with this many
    replicas (the nearest), and the replica count it was measured at."""
    from sim_validation import Calibration, build_model

    profile = LatencyProfile.from_json(data["profile"])
    r = min(data["runs"], key=lambda r: (abs(r["replicas"] - replicas), -r["replicas"]))
    slowed, lim, _ = build_model(profile, Calibration.from_row(r), tokens, limits)
    return profile, slowed, lim, r["replicas"]


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.pop("RAY_ADDRESS", None)
    from transformers import AutoTokenizer

    from dispatcher.config import ServerConfig
    from dispatcher.logs import configure
    from multitenant import git_revision, host_cpu
    from sim_validation import StepLog, texts_of_length
    from vbert.device import reserve_cpu_for_steps

    configure(args.log_level)
    reserve_cpu_for_steps(1)
    defaults = ServerConfig()
    measured, profile, limits, calibrated_at = calibrated(
        json.loads(args.calibration.read_text()), 2, args.tokens,
        EngineLimits(max_rows=defaults.max_rows_per_step, max_tokens=defaults.max_tokens_per_step,
                     step_target_s=defaults.engine_config().step_target_s,
                     drop_after_slo=args.rpc_timeout_s / (args.slo_ms / 1000)))
    if args.sim_seeds < 1:
        limits = replace(limits, step_noise_s=())
    noise = limits.step_noise_s
    per_day = int(round(args.day_s / args.interval_s))
    units = seed_study_load(args.history_days + 1, per_day, seed=args.seed)
    history = [u * args.unit_rps for u in units[:args.history_days * per_day]]
    day = units[args.history_days * per_day:]
    slo_s = args.slo_ms / 1000
    names = [f"as-t{i:02d}" for i in range(args.tenants)]
    tenants = [TenantLoad(n, "encoder", r, slo_s, cv=args.cv, tokens=args.tokens)
               for n, r in zip(names, zipf_rates(args.unit_rps, args.tenants))]
    seq = arrivals(tenants, args.day_s, seed=args.seed, trend=lambda t: day[min(len(day) - 1, int(t / args.interval_s))])
    tokenizer = AutoTokenizer.from_pretrained(ServerConfig(backbone=args.backbone).model_config().backbone.resolved_path,
                                              local_files_only=True)
    texts = texts_of_length(load_texts(args.data_dir), tokenizer, args.tokens)
    rng = random.Random(args.seed)
    calls = [(k, rng.randrange(len(texts))) for _, k in seq]
    tmp = tempfile.TemporaryDirectory(prefix="autoscale-ray-")
    hist_path = Path(tmp.name) / "history.json"
    hist_path.write_text(json.dumps(history))
    initial = min(args.max_replicas, max(args.min_replicas, replicas_for(day[0] * args.unit_rps, args.capacity_rps)))
    print(f"{len(seq)} calls over {args.day_s:.0f} s ({per_day} intervals of {args.interval_s} s); "
          f"{initial} replicas to start", file=sys.stderr)
    import ray

    # as benchmarks/sim_validation.py (its calibration): replicas' logs stay in their files; reports every 2.5 s
    os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", str(args.interval_s / 4))
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 << 20,
             configure_logging=False, log_to_driver=False)
    server = OwnServer(args, str(Path(tmp.name) / "data"), backbones="encoder", replicas=initial, replica_threads=1,
                       replica_cpus=0.5, max_concurrent_rpcs_per_tenant=10 ** 5, autoscale=args.policy,
                       min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                       replica_capacity_rps=args.capacity_rps, autoscale_interval_s=args.interval_s,
                       autoscale_day_s=args.day_s, autoscale_history=str(hist_path))
    try:
        log = StepLog(server.app.engine)
        keys = server.add_tenants(names, make_artifacts(server.app.model.spec.shape, args.tenants, args.seed, 8))
        client = SubprocessClient({"address": server.address, "keys": keys, "adapter": ADAPTER, "texts": texts,
                                   "calls": calls, "rpc_timeout_s": args.rpc_timeout_s, "texts_per_call": 1},
                                  script=ROOT / "benchmarks" / "grpc_load.py")
        poll = ReplicaPoll(server.app.config.scaleout_config().app_name)
        poll.start()
        got = send_day(client, seq, args.day_s, poll)
        steps = log.take(measured["encoder"], args.tokens)
    finally:
        server.close()
        ray.shutdown()
        tmp.cleanup()
    raw = args.json.with_name(args.json.stem + "_raw.json.gz")       # the run, before anything can go wrong
    raw.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(raw, "wt") as f:
        json.dump({"records": got["records"], "replica_samples": poll.samples}, f)
    real = [end - at if code == "OK" else None for at, end, code in got["records"]]
    # the simulator on the same arrivals and the run's replica timeline
    end_s = max(args.day_s, max((t for t, _ in poll.samples), default=0.0)) + 60
    wins = windows_of(poll.samples, end_s)
    # with step noise the simulated tail depends on where the residuals fell: the run of median p99 over seeds
    sims = sorted((latencies(profile, ["encoder"] * len(wins), tenants, seq, replace(limits, seed=k), wins)
                   for k in range(max(1, args.sim_seeds) if noise else 1)),
                  key=lambda lat: percentile([x for x in lat if x is not None], 99) or 0.0)
    sim = sims[len(sims) // 2]

    per_interval = day_intervals(seq, poll.samples, real, sim, per_day, args.interval_s, slo_s, args.capacity_rps)
    ok = [x for x in real if x is not None]
    out = {"benchmark": "autoscale_ray", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": sys.argv,
           "git_revision": git_revision(), "host_cpu": host_cpu(), "cpu_count": os.cpu_count(), "ray": ray.__version__,
           "setup": {"policy": args.policy, "day_s": args.day_s, "interval_s": args.interval_s,
                     "history_days": args.history_days, "unit_rps": args.unit_rps, "capacity_rps": args.capacity_rps,
                     "min_replicas": args.min_replicas, "max_replicas": args.max_replicas, "tenants": args.tenants,
                     "cv": args.cv, "tokens": args.tokens, "slo_ms": args.slo_ms, "replica_threads": 1,
                     "calibration": str(args.calibration.relative_to(ROOT) if args.calibration.is_relative_to(ROOT)
                                        else args.calibration), "calibrated_at_replicas": calibrated_at,
                     "sim_step_noise": {"used": bool(noise), "sim_seeds": args.sim_seeds if noise else 0,
                                        "pools": [{"up_to_rows": b, "steps": len(res)} for b, res in noise]}},
           "num_requests": len(seq),
           "real": {"slo_attainment": round(attainment(real, slo_s), 4), "p50_s": percentile(ok, 50),
                    "p99_s": percentile(ok, 99), "errors": len(real) - len(ok)},
           "sim": {"slo_attainment": round(attainment(sim, slo_s), 4),
                   "p99_s": percentile([x for x in sim if x is not None], 99)},
           **day_measures(per_interval, "load_rps", "needed_replicas", args.capacity_rps),
           "engine_steps": steps, "replica_samples": poll.samples, "intervals": per_interval}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    write_plot(out, args.json.with_suffix(".png"))
    print(json.dumps({k: out[k] for k in ("real", "sim", "efficiency", "overloaded_share")}))
    return 0


def write_plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, iv = out["setup"], out["intervals"]
    fig, (a, b) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    t = [r["interval"] * s["interval_s"] for r in iv]
    a.step(t, [r["load_rps"] for r in iv], where="post", color="#e72", label="load (calls/s)")
    samples = out["replica_samples"]
    a.step([x for x, _ in samples], [n * s["capacity_rps"] for _, n in samples], where="post", color="#27a",
           label=f"running replicas x {s['capacity_rps']:g} calls/s")
    a.set_ylabel("calls / s")
    a.legend(fontsize=8)
    a.set_title(f"{s['policy']} autoscaling on Ray Serve, one day in {s['day_s']:.0f} s: efficiency "
                f"{out['efficiency']}, overloaded {out['overloaded_share']:.1%} of intervals", fontsize=10)
    plot_attainment(b, out)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
