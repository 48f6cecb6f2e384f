#!/usr/bin/env python
"""The placement simulator (scheduler/simulator.py) against the real server on the same arrival sequences.

    python benchmarks/sim_validation.py --json benchmarks/results/cpu-DATE/sim_validation/sim_validation.json

1. Profile: the encoder's mixed-tenant step latency at one CPU thread (a replica's `replica_threads`), measured
   here with scheduler.profiling.profile_encoder (or read from --profile).
2. For one and two Ray Serve replicas (a local Ray cluster started here, one thread per replica), a real server
   (dispatcher.server.Server on 127.0.0.1, port 0, the default backbone, default engine settings: latency target
   250 ms) with --tenants tenants, each with a LoRA adapter. Its overhead (what a request costs outside the
   engine's steps: gRPC, tokenization, the Ray hop) is measured on the idle server: the median latency of
   sequential calls minus the profile's one-row step.
3. For each rate (fractions of a replica's capacity, times the replicas) and CV: Gamma arrivals with Zipf
   tenant rates (simulator.arrivals, seeded), sent by grpc_load's client in a child process at exactly those
   times (open loop, one text of --tokens tokens per call, latency counted from the scheduled arrival); the
   simulator serves the same sequence with the profile, the measured overhead and the engine's limits, each step's
   time the mean slowdown's plus a residual drawn from the calibration steps' (--no-noise: the mean alone; with
   noise the median p99 of --sim-seeds simulations). Two models of the step times (build_model; --model picks the
   one reported, the other is simulated beside it on the same runs): busy (default), the slowdown measured with
   every replica busy for every step; corun, with several replicas, a replica's own slowdown (its idle sequential
   calls') times a co-running one while the others compute (EngineLimits.corun_slowdown, fitted from the
   calibration phases' slowdowns and how busy the replicas were in each). --resimulate FILE simulates a recorded
   run again (its calibration and real results as recorded, the same arrivals), without real runs.
   Per configuration: SLO attainment and p50/p99, real and simulated, and the attainment at several SLO scales.

max_slo_attainment_error: the largest |simulated - real| attainment, in points; max_p99_relative_error: the
largest |simulated p99 - real p99| / real p99 (target for both: within 10 %). Loopback only; each run stops
by itself. Writes JSON and a PNG next to it.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from grpc_load import ADAPTER, DATA_DIR, OwnServer, SubprocessClient, load_texts, make_artifacts  # noqa: E402

from scheduler.simulator import (EngineLimits, TenantLoad, arrivals, percentile, simulate,  # noqa: E402
                                 zipf_rates)

SLO_SCALES = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0)


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, required=True, help="where to write the results (a PNG goes next to it)")
    p.add_argument("--profile", type=Path, default=None, help="a `vbert profile` JSON measured at one thread "
                   "(default: profile the encoder here first)")
    p.add_argument("--replicas", default="0,1,2", help="replica counts (comma-separated); 0: the single-process "
                   "server (one compute thread)")
    p.add_argument("--rates", default="0.3,0.6", help="load per replica, as fractions of one replica's capacity "
                   "(max_rows_per_step rows of --tokens tokens per profiled step)")
    p.add_argument("--cvs", default="1,3", help="coefficients of variation of the arrivals")
    p.add_argument("--tenants", type=int, default=8)
    p.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of the tenants' rates")
    p.add_argument("--tokens", type=int, default=32, help="tokens of every text (with [CLS] and [SEP])")
    p.add_argument("--slo-ms", type=float, default=500.0, help="the tenants' latency objective")
    p.add_argument("--seconds", type=float, default=60.0, help="seconds of arrivals per configuration")
    p.add_argument("--saturate-calls", type=int, default=1600, help="calls of the saturated calibration")
    p.add_argument("--idle-calls", type=int, default=40, help="sequential calls measuring the idle overhead")
    p.add_argument("--rpc-timeout-s", type=float, default=30.0)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--backbone", default=None, help="checkpoint directory (default: all-MiniLM-L6-v2)")
    p.add_argument("--log-level", default="WARNING")
    p.add_argument("--data-dir", type=Path, default=DATA_DIR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-noise", dest="noise", action="store_false", help="simulate every step at the mean "
                   "slowdown (default: plus a residual drawn from the calibration steps' measured ones)")
    p.add_argument("--model", choices=("busy", "corun"), default="busy", help="the simulator's model of the server's "
                   "step times (build_model; the other is simulated beside it on the same runs)")
    p.add_argument("--resimulate", type=Path, default=None, help="no real runs: simulate an earlier run's JSON "
                   "again with today's models (its real results and calibration as recorded; same arrivals)")
    p.add_argument("--sim-seeds", type=int, default=5, help="simulations per run with noise (their median p99 is "
                   "compared)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args.replicas = [int(x) for x in floats(args.replicas)]
    args.rates, args.cvs = floats(args.rates), floats(args.cvs)
    if not args.replicas or min(args.replicas) < 0 or not args.rates or min(args.rates) <= 0 or not args.cvs \
            or min(args.cvs) <= 0:
        p.error("--replicas need integers >= 0, --rates and --cvs positive numbers")
    if args.tenants < 1 or args.tokens < 3 or args.slo_ms <= 0 or args.seconds <= 0:
        p.error("need --tenants >= 1, --tokens >= 3, --slo-ms > 0, --seconds > 0")
    # what grpc_load.OwnServer reads
    args.max_in_flight, args.requests, args.latency_target_ms = 25_000, 10 ** 6, None
    return args


def texts_of_length(texts: list[str], tokenizer, tokens: int) -> list[str]:
    """The sentences that tokenize to exactly `tokens` ids (special tokens included): every call then costs
    the same, as the simulator's tenants declare."""
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    out = [t for t, i in zip(texts, ids) if len(i) == tokens]
    if len(out) < 20:
        raise SystemExit(f"only {len(out)} sentences have exactly {tokens} tokens: choose another --tokens")
    return out


def measure_profile(args):
    """The encoder's step latency at one thread, as a replica computes (replica_threads = 1)."""
    import torch

    from dispatcher.config import ServerConfig
    from scheduler.latency_profile import LatencyProfile
    from scheduler.profiling import machine, profile_encoder

    if args.profile is not None:
        return LatencyProfile.load(args.profile)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = ServerConfig(backbone=args.backbone).model_config()
        enc = profile_encoder(config, rows=(1, 2, 4, 8, 16, 32, 64), tokens=(16, 32, 64), repeats=5)
        return LatencyProfile({"encoder": enc}, machine())
    finally:
        torch.set_num_threads(threads)


def attainment(latencies: list[float | None], slo_s: float) -> float:
    return sum(1 for x in latencies if x is not None and x <= slo_s) / len(latencies) if latencies else 1.0


class StepLog:
    """The steps the real engines computed, read from the answers: each Completion names its step and that step's
    compute seconds (replicas send theirs back), so (replica, step) -> [rows of ours, compute_s, queue_s sum]."""

    def __init__(self, engine):
        self.steps: dict = {}
        self.engine_s: list[float] = []     # per request: submitted to the engine -> answered by it
        self.last_steps: list[tuple[int, float]] = []   # the last take's steps: (rows, compute_s)
        self._lock = threading.Lock()
        submit = engine.submit

        def recorded(req):
            fut = submit(req)
            fut.add_done_callback(lambda f, r=req, t0=time.perf_counter(): self._done(f, r, t0))
            return fut

        engine.submit = recorded

    def _done(self, fut, req, t0: float) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        c = fut.result()
        with self._lock:
            self.engine_s.append(time.perf_counter() - t0)
            entry = self.steps.setdefault((req.metadata.get("replica"), c.step), [0, c.inference_s, 0.0])
            entry[0] += 1
            entry[2] += c.queue_s

    def take(self, profile, tokens: int) -> dict:
        """What the engines computed since the last take: steps, rows per step, compute seconds against the
        profile's prediction for the same steps, and the mean time a request queued in an engine."""
        with self._lock:
            steps, self.steps = list(self.steps.values()), {}
            engine_s, self.engine_s = self.engine_s, []
        if not steps:
            return {}
        rows = sum(s[0] for s in steps)
        compute = sum(s[1] for s in steps)
        predicted = sum(profile.encoder_step_s(s[0], tokens) for s in steps)
        self.last_steps = [(s[0], s[1]) for s in steps]
        return {"steps": len(steps), "rows_per_step": round(rows / len(steps), 2), "compute_s": round(compute, 3),
                "profile_compute_s": round(predicted, 3), "compute_over_profile": round(compute / predicted, 3),
                "mean_engine_queue_s": round(sum(s[2] for s in steps) / rows, 4),
                # the engine's share of the latency (the rest: the edge, the Ray hop, the client): where a tail is
                "engine_p50_s": rnd(percentile(engine_s, 50)), "engine_p99_s": rnd(percentile(engine_s, 99))}


def step_noise(encoder_profile, factor, tokens: int, light: tuple[float, list], saturated: tuple[float, list],
               max_rows: int, scale: dict | None = None) -> tuple:
    """The simulator's step noise (EngineLimits.step_noise_s) from calibration steps: each step's time minus the
    mean slowdown's prediction for it (factor(rows) x the profile), in two pools by step size: the light steps'
    residuals for steps up to the geometric mean of the two phases' rows per step, the saturated ones' above.
    light / saturated: (rows per step, [(rows, compute seconds), ...]). scale {light, saturated}: the phase's
    co-running multiplier, when `factor` is the replica's own slowdown: each step's time is divided by it first
    (the simulator multiplies it back by the co-running it simulates)."""
    def residuals(raw, m):
        return tuple(sorted(round(c / m - factor(r) * encoder_profile.encoder_step_s(r, tokens), 5) for r, c in raw))

    scale = scale or {"light": 1.0, "saturated": 1.0}
    split = max(1, int((light[0] * saturated[0]) ** 0.5))
    return ((split, residuals(light[1], scale["light"])), (max_rows, residuals(saturated[1], scale["saturated"])))


def wall_of(records: list) -> float:
    """The wall time a closed-loop phase took: its first call's start to its last call's end."""
    return max(e for _, e, _ in records) - min(st for st, _, _ in records)


def slowdown(small: tuple[float, float], large: tuple[float, float]):
    """The in-server slowdown of a step of `rows` rows: measured at two step sizes (rows, factor), linear in
    log(rows) between them, the nearer one's beyond."""
    import math

    (r0, f0), (r1, f1) = sorted([small, large])
    if r1 <= r0 * 1.01:
        return lambda rows: (f0 + f1) / 2

    def at(rows: float) -> float:
        t = (math.log(max(rows, 1e-9)) - math.log(r0)) / (math.log(r1) - math.log(r0))
        return f0 + min(1.0, max(0.0, t)) * (f1 - f0)

    return at


def corun_fit(idle: float, light: tuple[float, float], saturated: tuple[float, float]) -> dict:
    """The co-running model of replicas sharing one machine, from three calibration phases' step slowdowns
    (compute / profile) and the replicas' busy share in each: idle (sequential calls: one replica computes at a
    time, busy share 0), light (factor, busy share), saturated (factor, busy share). A step's slowdown is its own
    (alone) times 1 + (c - 1) x the share of the others computing; alone is taken equal for the idle and the light
    steps (1 and about 2 rows), which gives c, then the alone slowdown of each phase's steps.
    Returns corun_slowdown (c), alone {light, saturated} and their multipliers {light, saturated}."""
    f_light, u_light = light
    f_sat, u_sat = saturated
    c = 1.0 if u_light <= 0 else max(1.0, 1 + (f_light / idle - 1) / u_light)
    mult = {"light": 1 + (c - 1) * u_light, "saturated": 1 + (c - 1) * u_sat}
    return {"corun_slowdown": c, "alone": {"light": f_light / mult["light"], "saturated": f_sat / mult["saturated"]},
            "multiplier": mult}


@dataclass(frozen=True)
class Calibration:
    """What a real server measured before its runs, on other calls than the runs' (run_replicas), and all the
    simulator's model of it is built from (build_model). light / saturated: (rows per step, step slowdown against the
    profile, the replicas' busy share: compute seconds over the phase's wall time per replica, None if not recorded);
    between_s: the time between back-to-back saturated steps; idle_s: the median latency of sequential calls;
    idle_factor: those calls' steps' slowdown (one replica computing at a time; None if not recorded); the light and
    saturated calibration steps: [(rows, compute seconds), ...]."""

    units: int
    light: tuple
    saturated: tuple
    between_s: float
    idle_s: float
    idle_factor: float | None
    light_raw: tuple
    sat_raw: tuple

    @classmethod
    def from_row(cls, r: dict) -> "Calibration":
        """From a run's JSON row (rows written before a field existed lack it: None)."""
        c = r.get("calibration") or {}
        light, sat = r["compute_factor"]["light"], r["compute_factor"]["saturated"]
        busy = (r.get("corun") or {}).get("busy_share") or {}      # as the 2026-12-07 runs recorded them
        return cls(units=max(1, r["replicas"]), light=tuple(c.get("light") or (*light, busy.get("light"))),
                   saturated=tuple(c.get("saturated") or (*sat, busy.get("saturated"))),
                   between_s=c.get("between_s", r["saturated_steps"]["step_overhead_s"]),
                   idle_s=c.get("idle_s", r["idle_latency_s"]),
                   idle_factor=c.get("idle_factor", (r.get("corun") or {}).get("idle_factor")),
                   light_raw=tuple(map(tuple, r["calibration_steps"]["light"])),
                   sat_raw=tuple(map(tuple, r["calibration_steps"]["saturated"])))

    def to_json(self) -> dict:
        return {"light": list(self.light), "saturated": list(self.saturated), "between_s": round(self.between_s, 5),
                "idle_s": round(self.idle_s, 5), "idle_factor": self.idle_factor}


MODELS = ("busy", "corun")


def build_model(profile, cal: Calibration, tokens: int, limits: EngineLimits, kind: str = "busy",
                noise: bool = True) -> tuple:
    """The simulator's profile, limits (from `limits`: the engine's budgets) and what was derived, for one of MODELS.
    busy: every step slowed by the slowdown measured with every replica busy (the calibration phases'), the measured
    time between back-to-back steps. corun: with several replicas, a step's own slowdown (the idle calls') times
    1 + (c - 1) x the share of the other replicas computing (EngineLimits.corun_slowdown, fitted by corun_fit), the
    time between steps divided by the saturated phase's co-running multiplier; with one replica, or a calibration
    without the busy shares, the same as busy."""
    if kind not in MODELS:
        raise ValueError(f"model {kind!r} is not one of {MODELS}")
    corun, scale = None, None
    own, between = (cal.light[1], cal.saturated[1]), cal.between_s
    if kind == "corun" and cal.units > 1 and cal.idle_factor and None not in (cal.light[2], cal.saturated[2]):
        corun = corun_fit(cal.idle_factor, (cal.light[1], cal.light[2]), (cal.saturated[1], cal.saturated[2]))
        own, scale = (corun["alone"]["light"], corun["alone"]["saturated"]), corun["multiplier"]
        between /= corun["multiplier"]["saturated"]     # measured with the others computing too
    factor = slowdown((cal.light[0], own[0]), (cal.saturated[0], own[1]))
    pools = step_noise(profile["encoder"], factor, tokens, (cal.light[0], cal.light_raw),
                       (cal.saturated[0], cal.sat_raw), limits.max_rows, scale=scale)
    slowed = profile.slowed({"encoder": factor})
    outside_s = max(0.0, cal.idle_s - slowed["encoder"].encoder_step_s(1, tokens) - between)
    lim = replace(limits, overhead_s=outside_s, step_overhead_s=between, step_noise_s=pools if noise else (),
                  corun_slowdown=1.0 if corun is None else corun["corun_slowdown"])
    info = {"name": kind, "overhead_s": round(outside_s, 5), "step_overhead_s": round(between, 5),
            "corun": None if corun is None else {
                "corun_slowdown": round(corun["corun_slowdown"], 4),
                "alone_factor": {"light": round(own[0], 4), "saturated": round(own[1], 4)}}}
    return slowed, lim, info


def capacity_of(profile, cal: Calibration, tokens: int, max_rows: int) -> float:
    """A replica's capacity (rows/s; the unit of --rates): full steps back to back with every replica busy, as
    measured."""
    busy = profile.slowed({"encoder": slowdown(cal.light[:2], cal.saturated[:2])})["encoder"]
    return max_rows / (busy.encoder_step_s(max_rows, tokens) + cal.between_s)


def compare(profile, cal: Calibration, limits: EngineLimits, args, tenants, seq, real_row: dict) -> dict:
    """args.model's simulation of one arrival sequence against the real run's numbers (sim,
    slo_attainment_error_points, p99_relative_error), and the other model's beside it (sim_alternative)."""
    out = {}
    slo_s = tenants[0].slo_s
    for kind in [args.model] + [m for m in MODELS if m != args.model]:
        prof, lim, info = build_model(profile, cal, args.tokens, limits, kind, args.noise)
        # with noise the simulated tail depends on which residuals fell where: the median p99 over --sim-seeds
        runs = sorted((simulate(prof, ["encoder"] * cal.units, tenants, seq, replace(lim, seed=k))
                       for k in range(args.sim_seeds if args.noise else 1)), key=lambda x: x.p99_s or 0.0)
        sim = runs[len(runs) // 2]
        res = {"num_requests": sim.num_requests, "slo_attainment": round(sim.slo_attainment, 4),
               "p50_s": rnd(sim.p50_s), "p99_s": rnd(sim.p99_s),
               "dropped": sim.dropped, "p99_s_over_seeds": [rnd(x.p99_s) for x in runs],
               "utilization": [round(u, 3) for u in sim.utilization],
               "attainment_by_slo_scale": {str(k): round(attainment(sim.latencies, k * slo_s), 4) for k in SLO_SCALES},
               "model": info,
               "step_noise_s": {"used": bool(args.noise), "pools": [
                   {"up_to_rows": bound, "steps": len(r), "p1": r[len(r) // 100], "p50": r[len(r) // 2],
                    "p99": r[99 * len(r) // 100], "stdev": round(statistics.pstdev(r), 5)}
                   for bound, r in lim.step_noise_s]}}
        errors = {"slo_attainment_error_points": round(100 * abs(sim.slo_attainment - real_row["slo_attainment"]), 2),
                  "p99_relative_error": p99_error(sim, real_row["p99_s"])}
        if kind == args.model:
            out.update(sim=res, **errors)
        else:
            out["sim_alternative"] = {**res, **errors}
    return out


def run_replicas(args, num_replicas: int, profile, texts: list[str], loads: list[tuple[float, float]], bar) -> list:
    """One server with `num_replicas` replicas; every (rate, cv) load in turn; real and simulated results."""
    from dispatcher.config import ServerConfig

    tmp = tempfile.TemporaryDirectory(prefix="simval-")
    # the tenants' concurrency limit off (the simulator has none): a burst's calls all wait in the engine
    server = OwnServer(args, tmp.name, backbones="encoder", replicas=num_replicas, replica_threads=1,
                       max_concurrent_rpcs_per_tenant=10 ** 5)
    try:
        log = StepLog(server.app.engine)
        names = [f"sv-t{i:02d}" for i in range(args.tenants)]
        keys = server.add_tenants(names, make_artifacts(server.app.model.spec.shape, args.tenants, args.seed, args.rank))
        defaults = ServerConfig()
        slo_s = args.slo_ms / 1000
        rng = random.Random(args.seed)

        def client(calls):
            return SubprocessClient({"address": server.address, "keys": keys, "adapter": ADAPTER, "texts": texts,
                                     "calls": calls, "rpc_timeout_s": args.rpc_timeout_s, "texts_per_call": 1},
                                    script=ROOT / "benchmarks" / "grpc_load.py")

        units = max(1, num_replicas)         # 0 replicas: the single-process server, one engine
        # warm-up: every tenant's adapter onto the replicas, the engine's step sizing trained
        warm = client([(i % args.tenants, rng.randrange(len(texts))) for i in range(max(600, args.saturate_calls))])
        warm.run({"op": "closed", "label": "warm-up", "num": 600, "concurrency": 32, "max_seconds": 120,
                  "quiet": True})
        log.take(profile["encoder"], args.tokens)
        # The server's steps take longer than the profile's (measured alone: here the compute thread shares the CPU
        # and the GIL with the edge, Ray and the client), small steps relatively more, and a busy engine spends
        # time between steps (answering, scheduling, handing over). Measured here, on other calls than the runs':
        # light: a few calls in flight per engine (small steps); saturated: three full steps' worth per engine
        # (steps back to back: the time between them is the wall time not spent computing)
        light = warm.run({"op": "closed", "label": "light", "num": args.saturate_calls // 4,
                          "concurrency": 4 * units, "max_seconds": 300, "quiet": True})
        light_steps = log.take(profile["encoder"], args.tokens)
        light_raw = log.last_steps
        light_wall = wall_of(light["records"])
        sat = warm.run({"op": "closed", "label": "saturated", "num": args.saturate_calls,
                        "concurrency": 3 * defaults.max_rows_per_step * units, "max_seconds": 300, "quiet": True})
        sat_steps = log.take(profile["encoder"], args.tokens)
        sat_raw = log.last_steps
        sat_wall = wall_of(sat["records"])
        step_overhead_s = max(0.0, (sat_wall * units - sat_steps["compute_s"]) / sat_steps["steps"])
        sat_steps.update(wall_s=round(sat_wall, 3), step_overhead_s=round(step_overhead_s, 4))
        light_steps.update(wall_s=round(light_wall, 3))
        del light
        # the idle overhead: sequential calls, minus the one-row step
        idle = warm.run({"op": "closed", "label": "idle", "num": args.idle_calls, "concurrency": 1,
                         "max_seconds": 120, "quiet": True})
        warm.close()
        idle_steps = log.take(profile["encoder"], args.tokens)
        idle_s = percentile([end - start for start, end, code in idle["records"] if code == "OK"], 50)
        cal = Calibration(
            units=units, light=(light_steps["rows_per_step"], light_steps["compute_over_profile"],
                                round(min(1.0, light_steps["compute_s"] / (light_wall * units)), 4)),
            saturated=(sat_steps["rows_per_step"], sat_steps["compute_over_profile"],
                       round(min(1.0, sat_steps["compute_s"] / (sat_wall * units)), 4)),
            between_s=step_overhead_s, idle_s=idle_s, idle_factor=idle_steps.get("compute_over_profile"),
            light_raw=tuple(light_raw), sat_raw=tuple(sat_raw))
        capacity = capacity_of(profile, cal, args.tokens, defaults.max_rows_per_step)
        limits = EngineLimits(max_rows=defaults.max_rows_per_step, max_tokens=defaults.max_tokens_per_step,
                              step_target_s=defaults.engine_config().step_target_s,
                              recent_window_s=defaults.engine_config().recent_window_s,
                              drop_after_slo=args.rpc_timeout_s / slo_s)
        out = []
        for rate_frac, cv in loads:
            total = rate_frac * capacity * units
            tenants = [TenantLoad(n, "encoder", r, slo_s, cv=cv, tokens=args.tokens)
                       for n, r in zip(names, zipf_rates(total, args.tenants, args.zipf))]
            seed = args.seed * 1000 + num_replicas * 100 + int(rate_frac * 50) + int(cv * 7)
            seq = arrivals(tenants, args.seconds, seed=seed)
            calls = [(k, rng.randrange(len(texts))) for _, k in seq]
            c = client(calls)
            t0 = time.perf_counter()
            got = c.run({"op": "scheduled", "label": f"{num_replicas} replicas {rate_frac} x cap cv {cv}",
                         "num": len(seq), "times": [t for t, _ in seq], "quiet": True})
            wall = time.perf_counter() - t0
            c.close()
            real = [end - at if code == "OK" else None for at, end, code in got["records"]]
            ok = [x for x in real if x is not None]
            row = {"replicas": num_replicas, "rate_fraction": rate_frac, "cv": cv, "rate_rps": round(total, 2),
                   "rate_rps_exact": total, "num_requests": len(seq), "wall_s": round(wall, 1),
                   "calibration": cal.to_json(),
                   "compute_factor": {"light": [light_steps["rows_per_step"], light_steps["compute_over_profile"]],
                                      "saturated": [sat_steps["rows_per_step"], sat_steps["compute_over_profile"]]},
                   "calibration_steps": {"light": [[r, round(c, 5)] for r, c in light_raw],
                                         "saturated": [[r, round(c, 5)] for r, c in sat_raw]},
                   "idle_latency_s": round(idle_s, 4), "idle_steps": idle_steps, "light_steps": light_steps,
                   "saturated_steps": sat_steps, "real_steps": log.take(profile["encoder"], args.tokens),
                   "real": {"slo_attainment": round(attainment(real, slo_s), 4), "p50_s": rnd(percentile(ok, 50)),
                            "p99_s": rnd(percentile(ok, 99)), "errors": len(real) - len(ok),
                            "attainment_by_slo_scale": {str(s): round(attainment(real, s * slo_s), 4)
                                                        for s in SLO_SCALES}}}
            row.update(compare(profile, cal, limits, args, tenants, seq, row["real"]))
            out.append(row)
            bar.update()
        return out
    finally:
        server.close()
        tmp.cleanup()


def p99_error(sim, real_p99: float | None) -> float | None:
    return round(abs(sim.p99_s - real_p99) / real_p99, 4) if sim.p99_s is not None and real_p99 else None


def rnd(x):
    return None if x is None else round(x, 4)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.resimulate is not None:
        return write(args, *resimulate(args))
    os.environ.pop("RAY_ADDRESS", None)
    from transformers import AutoTokenizer

    from dispatcher.config import ServerConfig
    from dispatcher.logs import configure

    configure(args.log_level)
    bar = tqdm(total=1 + len(args.replicas) * len(args.rates) * len(args.cvs), desc="sim validation",
               disable=args.quiet)
    profile = measure_profile(args)
    bar.update()
    from vbert.device import reserve_cpu_for_steps

    reserve_cpu_for_steps(1)            # the single-process server's compute: one thread, as each replica's
    tokenizer = AutoTokenizer.from_pretrained(ServerConfig(backbone=args.backbone).model_config().backbone.resolved_path,
                                              local_files_only=True)
    texts = texts_of_length(load_texts(args.data_dir), tokenizer, args.tokens)
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 << 20,
             configure_logging=False, log_to_driver=False)
    rows = []
    loads = [(r, cv) for r in args.rates for cv in args.cvs]
    try:
        for n in args.replicas:
            rows += run_replicas(args, n, profile, texts, loads, bar)
    finally:
        ray.shutdown()
        bar.close()
    workload = {"tenants": args.tenants, "zipf": args.zipf, "tokens": args.tokens, "slo_ms": args.slo_ms,
                "seconds": args.seconds, "seed": args.seed, "rpc_timeout_s": args.rpc_timeout_s,
                "texts": f"sci-cite train sentences of exactly {args.tokens} tokens",
                "client": "grpc_load's client in a child process, open loop at the simulator's arrival times",
                "replica_threads": 1}
    return write(args, {"ray": ray.__version__, "workload": workload, "profile": profile.to_json()}, rows)


def resimulate(args) -> tuple[dict, list]:
    """An earlier run's configurations simulated again with today's models: the same arrival sequences (from its
    workload's seeds), its recorded calibration, its real results."""
    from dispatcher.config import ServerConfig
    from scheduler.latency_profile import LatencyProfile

    old = json.loads(args.resimulate.read_text())
    w = old["workload"]
    args.tokens = w["tokens"]
    seed, timeout_s = w.get("seed", 0), w.get("rpc_timeout_s", 30.0)
    profile = LatencyProfile.from_json(old["profile"])
    defaults, slo_s = ServerConfig(), w["slo_ms"] / 1000
    limits = EngineLimits(max_rows=defaults.max_rows_per_step, max_tokens=defaults.max_tokens_per_step,
                          step_target_s=defaults.engine_config().step_target_s,
                          recent_window_s=defaults.engine_config().recent_window_s, drop_after_slo=timeout_s / slo_s)
    rows = []
    for r in tqdm(old["runs"], desc="resimulate", disable=args.quiet):
        tenants = [TenantLoad(f"sv-t{i:02d}", "encoder", x, slo_s, cv=r["cv"], tokens=w["tokens"])
                   for i, x in enumerate(zipf_rates(r.get("rate_rps_exact", r["rate_rps"]), w["tenants"], w["zipf"]))]
        seq = arrivals(tenants, w["seconds"],
                       seed=seed * 1000 + r["replicas"] * 100 + int(r["rate_fraction"] * 50) + int(r["cv"] * 7))
        kept = {k: v for k, v in r.items() if k not in ("sim", "sim_alternative", "sim_one_slowdown", "corun",
                                                        "slo_attainment_error_points", "p99_relative_error",
                                                        "step_noise_s", "overhead_s")}
        rows.append({**kept, **compare(profile, Calibration.from_row(r), limits, args, tenants, seq, r["real"])})
    return {"resimulated_from": {"path": str(args.resimulate), "date": old["date"],
                                 "git_revision": old.get("git_revision")},
            "ray": old.get("ray"), "workload": w, "profile": old["profile"]}, rows


def write(args, head: dict, rows: list) -> int:
    """The JSON (with each model's largest errors) and its PNG."""
    from multitenant import git_revision, host_cpu

    def largest(get) -> float | None:
        values = [get(r) for r in rows if get(r) is not None]
        return max(values) if values else None

    alt = "sim_alternative"
    out = {"benchmark": "sim_validation", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": sys.argv,
           "git_revision": git_revision(), "host_cpu": host_cpu(), "cpu_count": os.cpu_count(), **head,
           "model": args.model,
           "max_slo_attainment_error": largest(lambda r: r["slo_attainment_error_points"]),
           "max_p99_relative_error": largest(lambda r: r["p99_relative_error"]),
           "targets": {"max_slo_attainment_error": 10.0, "max_p99_relative_error": 0.10},
           # the same runs simulated with the other model
           "alternative_model": {"name": next(m for m in MODELS if m != args.model),
                                 "max_slo_attainment_error": largest(lambda r: r[alt]["slo_attainment_error_points"]),
                                 "max_p99_relative_error": largest(lambda r: r[alt]["p99_relative_error"])},
           "runs": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    write_plot(out, args.json.with_suffix(".png"))
    print(json.dumps({k: out[k] for k in ("model", "max_slo_attainment_error", "max_p99_relative_error",
                                          "alternative_model")}))
    return 0


def write_plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = out["runs"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.6))
    colors = {0: "#888", 1: "#27a", 2: "#e72"}
    names = {0: "in-process", 1: "1 replica", 2: "2 replicas"}
    for r in runs:
        c = colors.get(r["replicas"], "#000")
        marker = "o" if r["cv"] <= 1 else "^"
        real, sim = r["real"]["attainment_by_slo_scale"], r["sim"]["attainment_by_slo_scale"]
        a.scatter([real[k] for k in real], [sim[k] for k in real], color=c, marker=marker, s=18)
        b.scatter([r["real"]["p99_s"] * 1000], [r["sim"]["p99_s"] * 1000], color=c, marker=marker, s=30)
    a.plot([0.6, 1], [0.6, 1], color="#bbb", lw=1)
    a.fill_between([0.6, 1], [0.5, 0.9], [0.7, 1.1], color="#eee", zorder=0, label="within 10 points")
    a.set_xlim(0.6, 1.01)
    a.set_ylim(0.6, 1.01)
    a.set_xlabel("real SLO attainment")
    a.set_ylabel("simulated SLO attainment")
    a.set_title(f"attainment at SLO x {', '.join(runs[0]['real']['attainment_by_slo_scale'])}: "
                f"max error {out['max_slo_attainment_error']} points at x1", fontsize=9)
    top = max(max(r["real"]["p99_s"], r["sim"]["p99_s"]) for r in runs) * 1100
    b.plot([0, top], [0, top], color="#bbb", lw=1)
    b.fill_between([0, top], [0, 0.9 * top], [0, 1.1 * top], color="#eee", zorder=0)
    b.set_xlim(0, top)
    b.set_ylim(0, top)
    b.set_xlabel("real p99 (ms)")
    b.set_ylabel("simulated p99 (ms)")
    b.set_title(f"p99: max relative error {out['max_p99_relative_error']:.0%} (band: 10 %)", fontsize=9)
    for k, name in names.items():
        b.scatter([], [], color=colors[k], label=name)
    b.scatter([], [], color="#000", marker="o", label="CV 1")
    b.scatter([], [], color="#000", marker="^", label="CV 3")
    b.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"Simulator vs the real server on the same arrivals ({out['workload']['slo_ms']:.0f} ms SLO, "
                 f"{out['date'][:10]}, {out['cpu_count']} CPUs)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
