#!/usr/bin/env python
"""Pipelined vs serial engine on the same cold-adapter workload, timed alternately in one run.

    python benchmarks/pipeline.py --json benchmarks/results/cpu-DATE/pipeline.json

One Manager (real SQLite registry, real on-disk store under a temporary data dir) on the default
backbone holds N tenants, each with its own LoRA adapter, served through a pool with fewer LoRA slots
than tenants and a small host budget, so most adapter loads go to the disk tier (file read, sha256,
safetensors parse, finiteness checks, copy into a pool slot). Each run submits a closed batch of R
requests (real sentences from ../shared/data/cls, each from a random tenant; the same batch every
run) to a fresh Engine(EngineConfig(is_pipelined=X)) sharing the model and the manager, and measures
requests/s = R / (last completion - first submit). Every run starts cold: every adapter id is
invalidated (device and host tiers) first. Runs alternate serial / pipelined, the order rotated each
round, so load from other processes hits both alike.

Besides the times, each run records the cache's tier statistics (disk loads, device loads and
evictions), rows per computed step, time spent in the runner's tokenize / prepare / execute, and the
CPU seconds of every thread (engine threads, adapter loaders, torch's intra-op threads), which says
who competes for the cores. Writes JSON + a PNG (bars of requests/s per mode with per-run dots).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from manager.cache import CacheConfig
from manager.manager import Manager, ManagerConfig
from scheduler.config import SchedulerConfig
from scheduler.engine import Engine, EngineConfig
from scheduler.runner import ModelRunner
from scheduler.types import Request
from vbert import (AdapterArtifact, BackboneConfig, Head, HeadKind, HeadSpec, LoraAdapter, ModelConfig,
                   MultiTenantModel, PoolConfig)

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
MODES = ("serial", "pipelined")


# -- shared helpers (benchmarks/engine.py imports these) ------------------------------------------
def load_texts(data_dir: Path = DATA_DIR, sets: tuple[str, ...] = ("sci-cite", "rct-20k", "chemprot")
               ) -> list[str]:
    """The "text" fields of the classification sets' train splits (JSON lines), read in place."""
    texts = []
    for name in sets:
        path = data_dir / "cls" / name / "train.txt"
        if not path.is_file():
            raise SystemExit(f"missing {path}: the benchmarks read ../shared/data (see its README)")
        with path.open() as f:
            texts += [t for t in (json.loads(line).get("text", "") for line in f if line.strip()) if t.strip()]
    if not texts:
        raise SystemExit(f"no texts under {data_dir}/cls")
    return texts


def thread_cpu_seconds() -> dict[int, float]:
    """CPU seconds (user + system) of every thread of this process, by native thread id."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def thread_names() -> dict[int, str]:
    names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    names[threading.main_thread().native_id] = "main (submitter)"
    return names


def group_thread_cpu(before: dict[int, float], after: dict[int, float], names: dict[int, str]) -> dict[str, float]:
    """CPU seconds per thread group between two snapshots; unnamed native threads are torch's intra-op
    (OpenMP) workers."""
    out: dict[str, float] = {}
    for tid, cpu in after.items():
        name = names.get(tid, "torch intra-op / other native")
        group = "adapter-loader" if name.startswith("adapter-loader") else name
        out[group] = out.get(group, 0.0) + cpu - before.get(tid, 0.0)
    return {k: round(v, 3) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v > 0}


class LoadTracker:
    """Counts disk loads whose adapter no step used before it was loaded again (or the run ended):
    loads evicted unused. Wraps the cache's `loader` (the disk tier) for the duration of a run."""

    def __init__(self, cache):
        self.cache, self.inner = cache, cache.loader
        self._lock = threading.Lock()
        self._unused: set[int] = set()
        self.num_loads = self.num_unused = 0

    def __enter__(self) -> "LoadTracker":
        self.cache.loader = self._load
        return self

    def __exit__(self, *exc) -> None:
        self.cache.loader = self.inner
        self.num_unused += len(self._unused)
        self._unused.clear()

    def _load(self, adapter_id: int):
        art = self.inner(adapter_id)
        with self._lock:
            self.num_loads += 1
            if adapter_id in self._unused:
                self.num_unused += 1
            self._unused.add(adapter_id)
        return art

    def used(self, adapter_ids) -> None:
        with self._lock:
            self._unused.difference_update(adapter_ids)


class TimedRunner(ModelRunner):
    """The real runner, with the wall time of each stage summed (for the where-does-time-go breakdown)."""

    def __init__(self, model, cache, tracker: LoadTracker | None = None):
        super().__init__(model, cache)
        self.seconds = {"tokenize": 0.0, "prepare": 0.0, "execute": 0.0}
        self.num_rows: list[int] = []
        self.tracker = tracker

    def _timed(self, stage, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds[stage] += time.perf_counter() - t0

    def tokenize(self, requests):
        return self._timed("tokenize", super().tokenize, requests)

    def prepare(self, batch):
        self.num_rows.append(batch.num_rows)
        step = self._timed("prepare", super().prepare, batch)
        if self.tracker is not None:
            self.tracker.used(batch.adapter_ids)
        return step

    def execute(self, step):
        return self._timed("execute", super().execute, step)


def noise_checks(values: dict[str, list[float]], a: str, b: str) -> dict[str, float]:
    """Cross-checks of median(values[a]) / median(values[b]) (values are rates, higher is better):
    the median of the per-round ratios (runs of the same round are neighbours in time), the ratio of
    the best runs, and the spread of each mode (max/min)."""
    return {"paired_median": statistics.median(x / y for x, y in zip(values[a], values[b])),
            "ratio_of_max": max(values[a]) / max(values[b]),
            f"{a}_max_over_min": max(values[a]) / min(values[a]),
            f"{b}_max_over_min": max(values[b]) / min(values[b])}


def git_state() -> dict:
    """HEAD and the uncommitted changes of the code measured (vbert, manager, scheduler): results taken on a
    dirty tree say so."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent.parent, capture_output=True,
                              text=True, check=True).stdout.strip()

    try:
        return {"head": git("rev-parse", "HEAD"),
                "dirty": git("status", "--porcelain", "vbert", "manager", "scheduler").splitlines()}
    except (OSError, subprocess.CalledProcessError):
        return {"head": None, "dirty": None}


def date_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# -- setup ----------------------------------------------------------------------------------------
def register(manager: Manager, shape, n: int, rank: int, seed: int) -> list[int]:
    """N tenants, each with one LoRA adapter named "main" and a classify head; returns adapter ids."""
    g = torch.Generator().manual_seed(seed)
    ids = []
    for i in tqdm(range(n), desc="registering tenants", unit="tenant"):
        name = f"tenant-{i:05d}"
        tenant, _ = manager.create_tenant(name)
        head = HeadSpec(HeadKind.CLASSIFY, tuple(f"c{j}" for j in range(2 + i % 5)))
        art = AdapterArtifact(LoraAdapter.random(shape, rank=rank, generator=g),
                              Head.random(head, shape.hidden_size, generator=g))
        manager.upload_adapter(name, "main", art)
        ids.append(manager.resolve(tenant, "main").adapter_id)
    return ids


def make_workload(adapter_ids: list[int], texts: list[str], num: int, seed: int) -> list[tuple[int, int, str]]:
    """(tenant index, adapter id, text) for each request of the closed batch."""
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        t = rng.randrange(len(adapter_ids))
        out.append((t, adapter_ids[t], rng.choice(texts)))
    return out


def make_cold(manager: Manager, adapter_ids: list[int]) -> None:
    for a in adapter_ids:
        manager.cache.invalidate(a)
    st = manager.cache.stats()
    if st["device"]["resident"] or st["host"]["resident"]:
        raise RuntimeError(f"the cache is not cold after invalidating every adapter: {st}")


def settle(cache, quiet_s: float = 0.3, timeout_s: float = 30) -> dict:
    """Wait until the loader threads are idle (residency requests still queued when the last request
    completed keep loading) and no adapter is held (a failed step's holds are given back once its other
    loads finish); returns the cache stats then."""
    end, last, since = time.monotonic() + timeout_s, None, time.monotonic()
    while time.monotonic() < end:
        st = cache.stats()
        key = (st["disk"]["loads"], st["disk"]["errors"], st["host"]["hits"], st["device"]["loads"],
               st["device"]["held"])
        if key != last:
            last, since = key, time.monotonic()
        elif not st["device"]["held"] and time.monotonic() - since >= quiet_s:
            return st
        time.sleep(0.05)
    raise RuntimeError(f"the cache did not settle in {timeout_s} s: {cache.stats()}")


def cache_delta(before: dict, after: dict) -> dict:
    out = {}
    for tier in ("device", "host", "disk"):
        out[tier] = {k: round(after[tier][k] - before[tier][k], 4)
                     for k in ("hits", "misses", "evictions", "loads", "load_seconds", "errors")}
    return out


# -- one run ----------------------------------------------------------------------------------------
def run_once(model: MultiTenantModel, manager: Manager, adapter_ids: list[int], workload, is_pipelined: bool,
             sched: SchedulerConfig, timeout_s: float) -> dict:
    make_cold(manager, adapter_ids)
    with LoadTracker(manager.cache) as tracker:
        out = _run_once(model, manager, tracker, workload, is_pipelined, sched, timeout_s)
    out["disk_loads_evicted_unused"] = tracker.num_unused
    return out


def _run_once(model, manager, tracker, workload, is_pipelined, sched, timeout_s) -> dict:
    runner = TimedRunner(model, manager.cache, tracker)
    engine = Engine(EngineConfig(is_pipelined=is_pipelined), sched, runner, manager.cache).start()
    stats0, cpu0 = manager.cache.stats(), thread_cpu_seconds()
    done_at: list[float] = []
    lock = threading.Lock()

    def on_done(_f) -> None:
        with lock:
            done_at.append(time.perf_counter())

    deadline = time.monotonic() + timeout_s
    t0 = time.perf_counter()
    futures = []
    for tenant, adapter_id, text in workload:
        f = engine.submit(Request(tenant_id=tenant, adapter_id=adapter_id, deadline=deadline, text=text))
        f.add_done_callback(on_done)
        futures.append(f)
    errors = []
    for f in futures:
        try:
            f.result(timeout_s)
        except Exception as e:  # noqa: BLE001 - counted and reported
            errors.append(f"{type(e).__name__}: {e}")
    wall = max(done_at) - t0
    names = thread_names()
    cpu1, stats1 = thread_cpu_seconds(), manager.cache.stats()
    engine.stop(drain=True, timeout=30)
    stats2 = settle(manager.cache)
    num_steps = len(runner.num_rows)
    return {
        "seconds": wall, "requests_per_s": len(workload) / wall, "num_failed": len(errors),
        "errors": sorted(set(errors))[:5], "num_steps": num_steps,
        "mean_rows_per_step": sum(runner.num_rows) / max(1, num_steps),
        "distinct_adapters": len({a for _, a, _ in workload}),
        "cache": cache_delta(stats0, stats1),
        "cache_incl_loads_after_last_completion": cache_delta(stats0, stats2),
        "runner_seconds": {k: round(v, 4) for k, v in runner.seconds.items()},
        "compute_busy_fraction": runner.seconds["execute"] / wall,
        "thread_cpu_seconds": group_thread_cpu(cpu0, cpu1, names),
    }


def summarize_mode(runs: list[dict]) -> dict:
    med = lambda key: statistics.median(r[key] for r in runs)   # noqa: E731
    return {"requests_per_s": med("requests_per_s"), "seconds": med("seconds"),
            "mean_rows_per_step": med("mean_rows_per_step"), "num_steps": med("num_steps"),
            "disk_loads": statistics.median(r["cache"]["disk"]["loads"] for r in runs),
            "device_loads": statistics.median(r["cache"]["device"]["loads"] for r in runs),
            "disk_loads_evicted_unused": statistics.median(r["disk_loads_evicted_unused"] for r in runs),
            "execute_s": statistics.median(r["runner_seconds"]["execute"] for r in runs),
            "compute_busy_fraction": med("compute_busy_fraction"),
            "num_failed": sum(r["num_failed"] for r in runs)}


# -- output ---------------------------------------------------------------------------------------
def write_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    colors = {"serial": "#999999", "pipelined": "#1f77b4"}
    for i, mode in enumerate(MODES):
        rps = [r["requests_per_s"] for r in result["runs"][mode]]
        med = result[f"{mode}_rps"]
        ax.bar(i, med, color=colors[mode], alpha=0.8, width=0.6)
        ax.scatter([i + (j - (len(rps) - 1) / 2) * 0.06 for j in range(len(rps))], rps, color="k", s=14, zorder=3)
        ax.text(i, med / 2, f"median\n{med:.1f}", ha="center", va="center", fontsize=9, color="white")
    ax.set_xticks(range(len(MODES)), MODES)
    ax.set_ylabel("requests / s (closed batch, cold adapters)")
    ax.set_title(f"{result['num_tenants']} tenants, {result['device_slots']} LoRA slots, R={result['requests']}; "
                 f"pipelined/serial {result['pipelined_over_serial']:.2f}\n{result['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True, help="result path; the PNG goes next to it")
    p.add_argument("--tenants", type=int, default=300)
    p.add_argument("--slots", type=int, default=32, help="LoRA slots of the device pool (< tenants)")
    p.add_argument("--requests", type=int, default=256, help="requests of the closed batch (R)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each mode (alternated)")
    p.add_argument("--host-budget-mb", type=float, default=0.0, help="host tier budget (0: every load from disk)")
    p.add_argument("--max-rows-per-step", type=int, default=None,
                   help="default: min(64, slots); above slots the serial engine fails steps (see the README)")
    p.add_argument("--max-tokens-per-step", type=int, default=8192)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--warmup-requests", type=int, default=32, help="untimed requests through each mode first")
    p.add_argument("--timeout", type=float, default=300, help="seconds a run may take before it counts as failed")
    p.add_argument("--data", default=str(DATA_DIR), help="the shared data folder")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.slots >= a.tenants:
        p.error("--slots must be below --tenants (the point is adapters that are not resident)")
    if min(a.rounds, a.requests, a.slots) < 1:
        p.error("--rounds, --requests and --slots must be >= 1")
    return a


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    rows = a.max_rows_per_step or min(64, a.slots)
    sched = SchedulerConfig(max_tokens_per_step=a.max_tokens_per_step, max_rows_per_step=rows)
    texts = load_texts(Path(a.data))
    model = MultiTenantModel(ModelConfig(BackboneConfig(device="auto"),
                                         PoolConfig(num_lora_slots=a.slots, num_bottleneck_slots=0,
                                                    max_lora_rank=a.rank, max_labels=8)))
    with tempfile.TemporaryDirectory(prefix="vbert-pipeline-") as data_dir:
        cache = CacheConfig(host_budget_bytes=int(a.host_budget_mb * 2**20))
        manager = Manager(ManagerConfig.under(data_dir, cache=cache), model)
        try:
            adapter_ids = register(manager, model.spec.shape, a.tenants, a.rank, a.seed)
            workload = make_workload(adapter_ids, texts, a.requests, a.seed)
            warm = make_workload(adapter_ids, texts, a.warmup_requests, a.seed + 1)
            for mode in MODES if a.warmup_requests else ():
                run_once(model, manager, adapter_ids, warm, mode == "pipelined", sched, a.timeout)
            runs: dict[str, list[dict]] = {m: [] for m in MODES}
            order = []
            for i in tqdm(range(a.rounds), desc="rounds (serial + pipelined each)", unit="round"):
                for mode in (MODES if i % 2 == 0 else MODES[::-1]):
                    r = run_once(model, manager, adapter_ids, workload, mode == "pipelined", sched, a.timeout)
                    r["round"] = i
                    runs[mode].append(r)
                    order.append(mode)
                    tqdm.write(f"round {i} {mode:9s} {r['requests_per_s']:7.2f} req/s  {r['seconds']:.2f} s  "
                               f"disk loads {r['cache']['disk']['loads']:.0f}  device loads "
                               f"{r['cache']['device']['loads']:.0f} ({r['disk_loads_evicted_unused']} unused)  "
                               f"rows/step {r['mean_rows_per_step']:.1f}  "
                               f"failed {r['num_failed']}")
            store_bytes = sum(f.stat().st_size for f in Path(manager.store.root).rglob("*.safetensors"))
        finally:
            manager.close()
    rps = {m: [r["requests_per_s"] for r in runs[m]] for m in MODES}
    summary = {m: summarize_mode(runs[m]) for m in MODES}
    result = {
        "pipelined_rps": summary["pipelined"]["requests_per_s"], "serial_rps": summary["serial"]["requests_per_s"],
        "pipelined_over_serial": summary["pipelined"]["requests_per_s"] / summary["serial"]["requests_per_s"],
        "timing": f"requests/s = R / (last completion - first submit), median of {a.rounds} runs per mode, "
                  "modes alternated (order rotated each round), every run starts with a cold cache",
        "noise_checks": noise_checks(rps, "pipelined", "serial"),
        "summary": summary, "run_order": order, "runs": runs,
        "device": model.device.describe(), "num_tenants": a.tenants, "device_slots": a.slots,
        "requests": a.requests, "distinct_adapters_per_run": len({x[1] for x in workload}),
        "host_budget_bytes": int(a.host_budget_mb * 2**20), "adapter": f"lora r={a.rank} q,k,v,o all layers",
        "bytes_per_adapter_disk": store_bytes / a.tenants, "scheduler": asdict(sched),
        "backbone": model.name, "torch_version": torch.__version__, "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "date": date_utc(), "git": git_state(),
        "command": [sys.executable, sys.argv[0], *argv],
    }
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    write_plot(result, out.with_suffix(".png"))
    print(json.dumps({k: result[k] for k in ("pipelined_rps", "serial_rps", "pipelined_over_serial", "noise_checks",
                                             "summary", "device")}, indent=2))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
