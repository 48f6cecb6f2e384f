#!/usr/bin/env python
"""Scale-out on Ray Serve against the in-process server, every figure a ratio from one run on this machine.

    python benchmarks/scaleout.py --json benchmarks/results/cpu-DATE/scaleout.json

One local Ray cluster (dashboard off, started here) serves every configuration in turn; each configuration is a
real server (dispatcher.server.Server on 127.0.0.1, port 0, the default backbone) with its tenants registered
through app.manager, loaded by the gRPC client of benchmarks/grpc_load.py in a child process (closed loop,
unary Classify of --texts-per-call sci-cite sentences for a uniformly random tenant):

- throughput (--tenants tenants, LoRA adapters): the in-process server with one compute thread; the front door +
  one replica with one thread; the front door + two replicas with one thread each.
  scaling_efficiency = (two replicas' texts/s) / (one replica's) / 2 (target >= 0.8);
  ray_over_inprocess = (front door + one replica) / (in-process) (target >= 0.85).
- locality (--locality-tenants tenants, two replicas each keeping --replica-adapters adapters loaded, fewer than
  the tenants): after a warm-up pass, the share of Ray calls whose replica already had the adapter loaded, with
  multiplexed routing (`replica_routing = adapter`: the call names the adapter) and with Ray's default routing
  (`any`); locality_gain = multiplexed hit rate / default hit rate.

The load generator targets loopback only and stops by itself (bounded calls and seconds per level). Writes JSON
and a PNG next to it.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from grpc_load import (ADAPTER, DATA_DIR, OwnServer, SubprocessClient, load_texts, make_artifacts,  # noqa: E402
                       summarize)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, required=True, help="where to write the results (a PNG goes next to it)")
    p.add_argument("--tenants", type=int, default=20, help="tenants of the throughput runs")
    p.add_argument("--texts-per-call", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=32, help="calls in flight (closed loop): 32 x 8 texts keep a next "
                   "step waiting on each of two replicas (64 rows per step), so none idles while answers travel")
    p.add_argument("--seconds", type=float, default=30.0, help="measured seconds per configuration")
    p.add_argument("--warmup", type=int, default=60, help="untimed calls per configuration first")
    p.add_argument("--locality-tenants", type=int, default=300)
    p.add_argument("--replica-adapters", type=int, default=100, help="adapters a replica keeps loaded (locality)")
    p.add_argument("--locality-calls", type=int, default=1500, help="measured calls per routing (after a warm-up "
                   "pass of as many)")
    p.add_argument("--parts", default="throughput,locality", help="which parts to run (comma-separated)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--backbone", default=None, help="checkpoint directory (default: all-MiniLM-L6-v2)")
    p.add_argument("--log-level", default="WARNING")
    p.add_argument("--data-dir", type=Path, default=DATA_DIR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args.parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    if not args.parts or args.parts - {"throughput", "locality"}:
        p.error("--parts takes throughput and/or locality")
    for name in ("tenants", "texts_per_call", "concurrency", "locality_tenants", "replica_adapters",
                 "locality_calls"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.replica_adapters >= args.locality_tenants:
        p.error("--replica-adapters must be below --locality-tenants (the point is a cache smaller than the tenants)")
    # what grpc_load.OwnServer reads
    args.max_in_flight, args.requests, args.latency_target_ms = 4 * args.concurrency, 10 ** 6, None
    return args


class Run:
    """One configuration: a server with tenants, a client process, closed-loop jobs."""

    def __init__(self, args, texts: list[str], num_tenants: int, num_calls: int, **overrides):
        self.args, self.tmp = args, tempfile.TemporaryDirectory(prefix="scaleout-")
        t0 = time.perf_counter()
        self.server = OwnServer(args, self.tmp.name, backbones="encoder", lora_slots=max(256, args.replica_adapters + 8),
                                **overrides)
        self.start_s = time.perf_counter() - t0
        names = [f"so{args.seed}-t{i:03d}" for i in range(num_tenants)]
        shape = self.server.app.model.spec.shape
        keys = self.server.add_tenants(names, make_artifacts(shape, num_tenants, args.seed, args.rank))
        rng = random.Random(args.seed)
        calls = [(rng.randrange(num_tenants), rng.randrange(len(texts))) for _ in range(num_calls)]
        self.client = SubprocessClient({"address": self.server.address, "keys": keys, "adapter": ADAPTER,
                                        "texts": texts, "calls": calls, "rpc_timeout_s": 60.0,
                                        "texts_per_call": args.texts_per_call}, script=ROOT / "benchmarks" / "grpc_load.py")

    def job(self, label: str, num: int, max_seconds: float) -> dict:
        before, t0 = cpu_seconds(self.client.proc.pid), time.perf_counter()
        out = self.client.run({"op": "closed", "label": label, "num": num, "concurrency": self.args.concurrency,
                               "max_seconds": max_seconds, "quiet": self.args.quiet})
        after, wall = cpu_seconds(self.client.proc.pid), time.perf_counter() - t0
        summary = summarize(out["records"], is_open=False)
        summary["texts_per_s"] = round(summary["throughput_rps"] * self.args.texts_per_call, 1)
        summary["cores_used"] = {k: round((after.get(k, 0) - before.get(k, 0)) / wall, 3) for k in after}
        return summary

    def reset_stats(self) -> None:
        from dispatcher.scaleout import ScaleOutStats

        self.server.app.engine.stats = ScaleOutStats()

    def close(self) -> None:
        self.client.close()
        self.server.close()
        self.tmp.cleanup()


def cpu_seconds(client_pid: int) -> dict[str, float]:
    """CPU seconds so far of: replicas (ray::ServeReplica processes), this process (the front door, or the whole
    in-process server), the load client, Ray's other processes (raylet, GCS, Serve controller, workers) and the
    rest of the machine. Where the cores went during a run is the difference of two calls."""
    import psutil

    out = {"replicas": 0.0, "server_process": 0.0, "client": 0.0, "ray_system": 0.0, "other": 0.0}
    me = os.getpid()
    for proc in psutil.process_iter(["pid", "name", "cmdline", "cpu_times"]):
        info = proc.info
        if info["cpu_times"] is None:
            continue
        cmd = " ".join(info["cmdline"] or ()) or info["name"] or ""
        used = info["cpu_times"].user + info["cpu_times"].system
        if info["pid"] == me:
            key = "server_process"
        elif info["pid"] == client_pid:
            key = "client"
        elif cmd.startswith("ray::ServeReplica"):
            key = "replicas"
        elif "ray" in cmd or info["name"] in ("raylet", "gcs_server"):
            key = "ray_system"
        else:
            key = "other"
        out[key] += used
    return out


def throughput(args, texts, label: str, **overrides) -> dict:
    run = Run(args, texts, args.tenants, 10 ** 5, **overrides)
    try:
        run.job(f"{label} warm-up", args.warmup, 120)
        out = run.job(label, 10 ** 5, args.seconds)
        out["start_s"] = round(run.start_s, 2)
        if overrides.get("replicas"):
            stats = run.server.app.engine.stats
            out["rows_per_replica"] = {str(k): v for k, v in stats.rows_per_replica.items()}
            out["ray_calls"], out["retries"] = stats.calls, stats.retries
        return out
    finally:
        run.close()


def locality(args, texts, routing: str) -> dict:
    n = args.locality_calls
    run = Run(args, texts, args.locality_tenants, 2 * n, replicas=2, replica_routing=routing,
              replica_adapters=args.replica_adapters)
    try:
        run.job(f"locality {routing} warm-up", n, 600)
        run.reset_stats()
        out = run.job(f"locality {routing}", n, 600)
        stats = run.server.app.engine.stats
        out.update(adapter_hit_rate=round(stats.adapter_hit_rate, 4), adapter_calls=stats.adapter_calls,
                   adapter_loads=stats.adapter_loads,
                   rows_per_replica={str(k): v for k, v in stats.rows_per_replica.items()})
        return out
    finally:
        run.close()


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.pop("RAY_ADDRESS", None)
    import ray

    from dispatcher.logs import configure
    from multitenant import git_revision, host_cpu
    from vbert.device import reserve_cpu_for_steps

    configure(args.log_level)
    reserve_cpu_for_steps(1)            # the in-process server's compute: one thread, as each replica's
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=512 << 20,
             configure_logging=False, log_to_driver=False)
    texts = load_texts(args.data_dir)
    steps = [("one_replica", dict(replicas=1)), ("two_replicas", dict(replicas=2)), ("inprocess", {})]
    results: dict = {"throughput": {}, "locality": {}}
    steps = steps if "throughput" in args.parts else []
    routings = ("adapter", "any") if "locality" in args.parts else ()
    bar = tqdm(total=len(steps) + len(routings), desc="configurations", disable=args.quiet)
    try:
        for label, overrides in steps:
            results["throughput"][label] = throughput(args, texts, label, replica_threads=1, **overrides)
            bar.update()
        for routing in routings:
            results["locality"][routing] = locality(args, texts, routing)
            bar.update()
    finally:
        ray.shutdown()
    t, loc = results["throughput"], results["locality"]
    one, two, inproc = (t[k]["texts_per_s"] if t else None for k in ("one_replica", "two_replicas", "inprocess"))
    hit_mux, hit_any = (loc[k]["adapter_hit_rate"] if loc else None for k in ("adapter", "any"))
    out = {"benchmark": "scaleout", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": sys.argv,
           "git_revision": git_revision(), "host_cpu": host_cpu(), "cpu_count": os.cpu_count(),
           "ray": ray.__version__,
           "workload": {"throughput_tenants": args.tenants, "texts_per_call": args.texts_per_call,
                        "concurrency": args.concurrency, "seconds": args.seconds,
                        "locality_tenants": args.locality_tenants, "replica_adapters": args.replica_adapters,
                        "adapter": f"LoRA rank {args.rank}, classify head", "texts": "sci-cite train sentences",
                        "client": "grpc_load's client in a child process, closed loop, uniform tenants"},
           "scaling_efficiency": round(two / one / 2, 3) if t else None,
           "ray_over_inprocess": round(one / inproc, 3) if t else None,
           "locality_gain": round(hit_mux / hit_any, 3) if hit_any else None,
           "targets": {"scaling_efficiency": 0.8, "ray_over_inprocess": 0.85},
           **results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    if t and loc:
        write_plot(out, args.json.with_suffix(".png"))
    print(json.dumps({k: out[k] for k in ("scaling_efficiency", "ray_over_inprocess", "locality_gain")}))
    return 0


def write_plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, loc = out["throughput"], out["locality"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    names = ["inprocess", "one_replica", "two_replicas"]
    a.bar(["in-process\n1 thread", "front door +\n1 replica", "front door +\n2 replicas"],
          [t[n]["texts_per_s"] for n in names], color=["#888", "#4a7", "#27a"])
    a.set_ylabel("texts / s")
    a.set_title(f"throughput: scaling {out['scaling_efficiency']:.2f}, ray/in-process {out['ray_over_inprocess']:.2f}")
    b.bar(["multiplexed\n(by adapter)", "Ray default"], [loc["adapter"]["adapter_hit_rate"], loc["any"]["adapter_hit_rate"]],
          color=["#27a", "#888"])
    b.set_ylim(0, 1)
    b.set_ylabel("calls finding their adapter loaded")
    b.set_title(f"{out['workload']['locality_tenants']} tenants, {out['workload']['replica_adapters']} adapters "
                f"per replica: gain {out['locality_gain']}")
    fig.suptitle(f"Scale-out on Ray Serve {out['ray']} ({out['cpu_count']} CPUs, {out['date'][:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
