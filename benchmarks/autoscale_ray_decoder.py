#!/usr/bin/env python
"""Predictive autoscaling of decoder replicas on Ray Serve for real: one compressed day of Generate streams.

    python benchmarks/autoscale_ray_decoder.py --json benchmarks/results/cpu-DATE/autoscale_ray/decoder.json

The decoder's counterpart of benchmarks/autoscale_ray.py. A real server (dispatcher.server.Server on 127.0.0.1,
the default decoder SmolLM2-135M-Instruct, no encoder) with `decoder_autoscale = predictive`: its decoder replicas
(one compute thread each) are scaled by dispatcher/autoscaling.py running as Ray Serve's custom autoscaling policy,
from the streams in flight the replicas report, at --target-streams per replica. The load (scheduler.autoscale.
seed_study_load: a daily sine between 7 and 13 units, +-10 % noise, bursts) is compressed to --day-s seconds in
intervals of --interval-s, one unit being --unit-sps Generate streams per second (greedy, --new-tokens tokens each,
a sci-cite sentence of about --prompt-tokens tokens as the prompt) over --tenants Zipf tenants (Gamma arrivals, CV
--cv, seeded), sent open loop from a client in a child process. A stream's time on a replica running
--target-streams of them (d) comes from the decoder's profile at one thread, measured first: its prefill plus
--new-tokens decode steps of --target-streams sequences. A replica's capacity is then --target-streams / d streams
per second, and the policy's history (--history-days earlier compressed days, `decoder_autoscale_history`, read
when the server starts) holds each interval's streams in flight as rate x d (Little's law). Before the day,
--warmup-streams streams one at a time on the idle first replica measure what a lone stream really takes
(reported beside d).

Reported: the run's SLO attainment (a stream's whole time, scheduled arrival to last token, within --slo-ms), its
p50 / p99 and time to first token; efficiency (needed replicas / running replicas per interval, needed = the
interval's streams per second over one replica's capacity) and the share of intervals overloaded (more streams per
second than the running replicas' capacity), the seed study's two measures; and the simulator's prediction for the
same arrivals on the run's replica timeline, from the decoder's profile at one thread measured at the start
(scheduler/profiling.py), without the in-server calibration sim_validation.py measures for the encoder. JSON and a
PNG (load and capacity over the day; attainment per interval, real and simulated).
"""
from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from autoscale_ray import (ReplicaPoll, attainment, check_day, day_intervals, day_measures, day_parser,  # noqa: E402
                           plot_attainment, send_day, windows_of)
from grpc_load import OwnServer, SubprocessClient, client_main, load_texts, run_job  # noqa: E402

APP = "vbert-decoder"


def parse_args(argv=None):
    p = day_parser(__doc__.split("\n\n")[0], tenants=4, slo_ms=5000.0, rpc_timeout_s=120.0)
    p.add_argument("--unit-sps", type=float, default=0.4, help="streams/s of one load unit (the load is 7-13 units)")
    p.add_argument("--target-streams", type=float, default=4.0, help="streams in flight per replica the policy "
                   "aims for (decoder_target_streams)")
    p.add_argument("--prompt-tokens", type=int, default=24)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--warmup-streams", type=int, default=6)
    p.add_argument("--client-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv) if "--client-only" not in (argv or sys.argv) else argparse.Namespace(client_only=True)
    if args.client_only:
        return args
    check_day(p, args, args.unit_sps, args.target_streams)
    args.backbone = None                           # OwnServer: the default backbones
    return args


# -- the client (a child process: --client-only) ---------------------------------------------------
class GenerateClient:
    """The tenant API's Generate over one channel: stream i is prompt init["calls"][i] of tenant init["keys"][...];
    the time of each stream's first token is kept beside the records."""

    def __init__(self, init: dict):
        self.init = init

    async def start(self) -> None:
        import grpc

        from dispatcher.gen.vbert.v1 import tenant_pb2, tenant_pb2_grpc

        init = self.init
        self.channel = grpc.aio.insecure_channel(init["address"])
        await asyncio.wait_for(self.channel.channel_ready(), 30)
        self.stub = tenant_pb2_grpc.TenantServiceStub(self.channel)
        self.requests = [tenant_pb2.GenerateRequest(prompt=init["prompts"][x], max_new_tokens=init["new_tokens"],
                                                    temperature=0, ignore_eos=True) for _, x in init["calls"]]
        self.metadata = [(("authorization", f"Bearer {k}"),) for k in init["keys"]]
        self.tenant_of = [t for t, _ in init["calls"]]
        self.first: list = [None] * len(self.requests)
        self.tokens: list = [0] * len(self.requests)
        self.t0 = time.perf_counter()

    async def send(self, i: int) -> str:
        import grpc

        try:
            async for msg in self.stub.Generate(self.requests[i], metadata=self.metadata[self.tenant_of[i]],
                                                timeout=self.init["rpc_timeout_s"]):
                if msg.token_ids and self.first[i] is None:
                    self.first[i] = time.perf_counter() - self.t0
                self.tokens[i] += len(msg.token_ids)
            return "OK"
        except grpc.aio.AioRpcError as e:
            return e.code().name

    async def run(self, job: dict) -> dict:
        n = job["num"]
        self.first, self.tokens = [None] * n, [0] * n
        self.t0 = time.perf_counter()             # `scheduled` starts its clock right after this
        out = await run_job(self.send, job)
        out["first_token_s"], out["tokens"] = self.first, self.tokens
        return out

    async def close(self) -> None:
        await self.channel.close()


# -- the run ---------------------------------------------------------------------------------------
def prompts_of_length(texts: list[str], tokenizer, tokens: int, count: int = 200) -> list[str]:
    """Sentences cut to about `tokens` tokens of the decoder's tokenizer (whole words)."""
    out = []
    for t in texts:
        words = t.split()
        while words and len(tokenizer(" ".join(words))["input_ids"]) > tokens:
            words = words[:-1]
        if words and len(tokenizer(" ".join(words))["input_ids"]) >= tokens - 3:
            out.append(" ".join(words))
        if len(out) >= count:
            break
    if len(out) < 20:
        raise SystemExit(f"only {len(out)} prompts of about {tokens} tokens")
    return out


def in_flight_per_interval(records, per_day: int, interval_s: float) -> list[float]:
    """Mean streams in flight in each interval (the signal the policy scales on), from (arrival, end, code)."""
    out = [0.0] * per_day
    for at, end, _ in records:
        for k in range(max(0, int(at / interval_s)), min(per_day, int(end / interval_s) + 1)):
            lo, hi = k * interval_s, (k + 1) * interval_s
            out[k] += max(0.0, min(end, hi) - max(at, lo)) / interval_s
    return out


def decoder_profile_one_thread(config):
    """The decoder's step latency at one thread, as a replica computes (replica_threads = 1)."""
    import torch

    from scheduler.latency_profile import LatencyProfile
    from scheduler.profiling import machine, profile_decoder
    from vbert.device import DeviceContext

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dec = profile_decoder(config.decoder_config(), DeviceContext.create("cpu", "float32"),
                              batches=(1, 4, 8, 16), contexts=(32, 64, 128), prefill=(16, 32, 64, 128), repeats=3)
        return LatencyProfile({"decoder": dec}, machine())
    finally:
        torch.set_num_threads(threads)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.client_only:
        return client_main(GenerateClient)
    os.environ.pop("RAY_ADDRESS", None)
    from transformers import AutoTokenizer

    from dispatcher.config import ServerConfig
    from dispatcher.logs import configure
    from manager.records import Quotas
    from multitenant import git_revision, host_cpu
    from scheduler.autoscale import replicas_for, seed_study_load
    from scheduler.simulator import EngineLimits, TenantLoad, arrivals, latencies, percentile, zipf_rates
    from vbert.decoder_checkpoint import default_decoder_path
    from vbert.device import reserve_cpu_for_steps

    configure(args.log_level)
    reserve_cpu_for_steps(1)
    tmp = tempfile.TemporaryDirectory(prefix="autoscale-ray-decoder-")
    data = Path(tmp.name) / "data"
    defaults = ServerConfig(data_dir=str(data))
    print("profiling the decoder at one thread ...", file=sys.stderr)
    profile = decoder_profile_one_thread(defaults)
    tokenizer = AutoTokenizer.from_pretrained(default_decoder_path(data / "models"), local_files_only=True)
    prompts = prompts_of_length(load_texts(args.data_dir), tokenizer, args.prompt_tokens)
    per_day = int(round(args.day_s / args.interval_s))
    units = seed_study_load(args.history_days + 1, per_day, seed=args.seed)
    day = units[args.history_days * per_day:]
    slo_s = args.slo_ms / 1000
    names = [f"asd-t{i:02d}" for i in range(args.tenants)]
    tenants = [TenantLoad(n, "decoder", r, slo_s, cv=args.cv, tokens=args.prompt_tokens, output_tokens=args.new_tokens)
               for n, r in zip(names, zipf_rates(args.unit_sps, args.tenants))]
    seq = arrivals(tenants, args.day_s, seed=args.seed, trend=lambda t: day[min(len(day) - 1, int(t / args.interval_s))])
    rng = random.Random(args.seed)
    calls = [(k, rng.randrange(len(prompts))) for _, k in seq]
    import ray

    os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", str(args.interval_s / 4))
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 << 20,
             configure_logging=False, log_to_driver=False)
    hist_path = Path(tmp.name) / "history.json"
    stream_s = (profile["decoder"].prefill_s(args.prompt_tokens) + args.new_tokens
                * profile["decoder"].decode_step_s(round(args.target_streams), args.prompt_tokens + args.new_tokens / 2))
    capacity_sps = args.target_streams / stream_s
    history = [u * args.unit_sps * stream_s for u in units[:args.history_days * per_day]]   # streams in flight
    hist_path.write_text(json.dumps(history))
    initial = min(args.max_replicas, max(args.min_replicas, replicas_for(day[0] * args.unit_sps, capacity_sps)))
    print(f"profile: a stream takes {stream_s:.2f} s at {args.target_streams:g} in flight, {capacity_sps:.2f} "
          f"streams/s per replica; {len(seq)} streams over {args.day_s:.0f} s; {initial} replicas to start",
          file=sys.stderr)
    server = OwnServer(args, str(data), backbones="decoder", decoder_replicas=initial, replica_threads=1,
                       replica_cpus=0.5, max_concurrent_rpcs_per_tenant=10 ** 5, decoder_autoscale=args.policy,
                       decoder_min_replicas=args.min_replicas, decoder_max_replicas=args.max_replicas,
                       decoder_target_streams=args.target_streams, autoscale_interval_s=args.interval_s,
                       autoscale_day_s=args.day_s, decoder_autoscale_history=str(hist_path))
    poll = None
    try:
        keys = [server.app.manager.create_tenant(n, Quotas(requests_per_s=1e6, burst=10 ** 6))[1] for n in names]
        init = {"address": server.address, "keys": keys, "prompts": prompts, "new_tokens": args.new_tokens,
                "calls": calls, "rpc_timeout_s": args.rpc_timeout_s}
        warm_calls = [(0, i % len(prompts)) for i in range(args.warmup_streams)]
        warm = SubprocessClient({**init, "calls": warm_calls}, script=Path(__file__).resolve())
        durations = []
        for i in range(args.warmup_streams):                    # one at a time: one idle replica's stream
            got = warm.run({"op": "scheduled", "label": "warm-up", "num": 1, "times": [0.0], "quiet": True})
            at, end, code = got["records"][0]
            if code != "OK":
                raise SystemExit(f"a warm-up stream failed: {code}")
            if i:                                               # the first one warms the replica
                durations.append(end - at)
        warm.close()
        lone_s = sorted(durations)[len(durations) // 2] if durations else None
        print(f"a lone stream on an idle replica: {lone_s} s", file=sys.stderr)
        client = SubprocessClient(init, script=Path(__file__).resolve())
        poll = ReplicaPoll(APP)
        poll.start()
        got = send_day(client, seq, args.day_s, poll)
    finally:
        if poll is not None:
            poll.halt()
        server.close()
        ray.shutdown()
        tmp.cleanup()
    raw = args.json.with_name(args.json.stem + "_raw.json.gz")
    raw.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(raw, "wt") as f:
        json.dump({"records": got["records"], "first_token_s": got["first_token_s"],
                   "replica_samples": poll.samples}, f)
    real = [end - at if code == "OK" else None for at, end, code in got["records"]]
    ttft = [None if f is None else f - at for (at, _, _), f in zip(got["records"], got["first_token_s"])]
    end_s = max(args.day_s, max((t for t, _ in poll.samples), default=0.0)) + 60
    wins = windows_of(poll.samples, end_s)
    limits = EngineLimits(max_running=defaults.generation_max_running,
                          decoder_max_tokens=defaults.generation_max_tokens_per_step,
                          drop_after_slo=args.rpc_timeout_s / slo_s)
    sim = latencies(profile, ["decoder"] * len(wins), tenants, seq, limits, wins)

    per_interval = day_intervals(seq, poll.samples, real, sim, per_day, args.interval_s, slo_s, capacity_sps)
    for row, x in zip(per_interval, in_flight_per_interval(got["records"], per_day, args.interval_s)):
        row["streams_in_flight"] = round(x, 3)
        row["needed_by_streams"] = replicas_for(x, args.target_streams)
    ok = [x for x in real if x is not None]
    first = [x for x in ttft if x is not None]
    out = {"benchmark": "autoscale_ray_decoder", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": sys.argv,
           "git_revision": git_revision(), "host_cpu": host_cpu(), "cpu_count": os.cpu_count(), "ray": ray.__version__,
           "setup": {"policy": args.policy, "day_s": args.day_s, "interval_s": args.interval_s,
                     "history_days": args.history_days, "unit_sps": args.unit_sps,
                     "target_streams": args.target_streams, "stream_s_profile": stream_s,
                     "lone_stream_s_measured": lone_s,
                     "capacity_rps": capacity_sps, "min_replicas": args.min_replicas,
                     "max_replicas": args.max_replicas, "tenants": args.tenants, "cv": args.cv,
                     "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "slo_ms": args.slo_ms,
                     "replica_threads": 1, "profile": "the decoder at one thread, measured at the start"},
           "profile": profile.to_json(),
           "num_requests": len(seq),
           "real": {"slo_attainment": round(attainment(real, slo_s), 4), "p50_s": percentile(ok, 50),
                    "p99_s": percentile(ok, 99), "ttft_p50_s": percentile(first, 50),
                    "ttft_p99_s": percentile(first, 99), "errors": len(real) - len(ok),
                    "short_streams": sum(1 for n, r in zip(got["tokens"], real) if r is not None
                                         and n != args.new_tokens)},
           "sim": {"slo_attainment": round(attainment(sim, slo_s), 4),
                   "p99_s": percentile([x for x in sim if x is not None], 99)},
           **day_measures(per_interval, "load_rps", "needed_replicas", capacity_sps),
           # the same two measures on what the policy sees: streams in flight against --target-streams a replica
           **day_measures(per_interval, "streams_in_flight", "needed_by_streams", args.target_streams, "_in_flight"),
           "replica_samples": poll.samples, "intervals": per_interval}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    write_plot(out, args.json.with_suffix(".png"))
    print(json.dumps({k: out[k] for k in ("real", "sim", "efficiency", "overloaded_share", "efficiency_in_flight",
                                          "overloaded_share_in_flight")}))
    return 0


def write_plot(out: dict, path: Path) -> None:
    """Streams per second against the profile's capacity; streams in flight (the policy's signal) against the
    running replicas' target; SLO attainment per interval, real and simulated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, iv, samples = out["setup"], out["intervals"], out["replica_samples"]
    t = [r["interval"] * s["interval_s"] for r in iv]
    fig, (a, b, c) = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    a.step(t, [r["load_rps"] for r in iv], where="post", color="#e72", label="streams started / s")
    a.step([x for x, _ in samples], [n * s["capacity_rps"] for _, n in samples], where="post", color="#27a",
           label=f"running replicas x {s['capacity_rps']:.2f} streams/s (the profile's capacity)")
    a.set_ylabel("streams / s")
    a.legend(fontsize=8)
    a.set_title(f"{s['policy']} decoder autoscaling on Ray Serve, one day in {s['day_s']:.0f} s: efficiency "
                f"{out['efficiency']:.2f} by the profile, {out.get('efficiency_in_flight', float('nan')):.2f} by "
                f"streams in flight", fontsize=10)
    if "streams_in_flight" in iv[0]:
        b.step(t, [r["streams_in_flight"] for r in iv], where="post", color="#e72", label="streams in flight (mean)")
    b.step([x for x, _ in samples], [n * s["target_streams"] for _, n in samples], where="post", color="#27a",
           label=f"running replicas x {s['target_streams']:g} (decoder_target_streams)")
    b.set_ylabel("streams in flight")
    b.legend(fontsize=8)
    plot_attainment(c, out)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
