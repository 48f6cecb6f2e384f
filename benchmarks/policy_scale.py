#!/usr/bin/env python
"""The scheduling policies' own cost per step against the number of backlogged tenants.

    python benchmarks/policy_scale.py --json benchmarks/results/cpu-DATE/policy_scale/policy_scale.json

For each tenant count N: N tenants with two waiting requests each (and a far deadline), then --steps steps of
schedule() + update() with a runner that computes nothing (each row's result made up at once), timed around
schedule() only. Encoder policy (scheduler.policy.Scheduler): 16-token requests, 512 tokens / 64 rows per step.
Generation policy (scheduler.generation_policy.GenerationScheduler): 16-token prompts, 8 new tokens,
32 running, 512 tokens per step, a KV cache that never runs out. Pure Python: what the engine's step loop
pays on the CPU before the device computes anything. Writes JSON (median and max per N) and a PNG next to it.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scheduler.config import SchedulerConfig  # noqa: E402
from scheduler.generation_policy import GenerationScheduler, GenerationSchedulerConfig  # noqa: E402
from scheduler.policy import Scheduler  # noqa: E402
from scheduler.types import Request, RowResult, StepOutput  # noqa: E402


class Blocks:
    """A KV cache that always has room (the policy's block accounting only; prefix caching finds nothing, its
    hashing is the KV cache's cost, measured in benchmarks/prefix_cache.py)."""

    num_blocks, num_free_blocks, num_cached_blocks, num_evicted_blocks, block_size = 1 << 30, 1 << 30, 0, 0, 16

    def __init__(self):
        self.seqs = set()

    def blocks_for(self, num_tokens: int) -> int:
        return 1

    def num_blocks_needed(self, seq_id, num_tokens: int) -> int:
        return 0 if seq_id in self.seqs else 1

    def allocate(self, seq_id, num_tokens: int) -> None:
        self.seqs.add(seq_id)

    def free(self, seq_id) -> int:
        self.seqs.discard(seq_id)
        return 1

    def has_sequence(self, seq_id) -> bool:
        return seq_id in self.seqs

    def match_prefix(self, seq_id, tokens, salt: bytes) -> int:
        return 0

    def commit(self, seq_id, tokens, num_computed: int) -> int:
        return 0


def encoder_times(n: int, steps: int) -> list[float]:
    s = Scheduler(SchedulerConfig(max_tokens_per_step=512, max_rows_per_step=64, max_waiting=4 * n + 64,
                                  max_waiting_per_tenant=8))
    for t in range(n):
        for _ in range(2):
            s.add(Request(tenant_id=t, adapter_id=None, deadline=1e18, prompt_ids=[1] * 16))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = s.schedule()
        times.append(time.perf_counter() - t0)
        s.update(StepOutput(batch.step, tuple(RowResult(r.request.request_id, output=0) for r in batch.rows)))
        for r in batch.rows:                       # keep the backlog at N tenants
            s.add(Request(tenant_id=r.request.tenant_id, adapter_id=None, deadline=1e18, prompt_ids=[1] * 16))
    return times


def generation_times(n: int, steps: int) -> list[float]:
    s = GenerationScheduler(GenerationSchedulerConfig(max_tokens_per_step=512, max_running=32,
                                                      max_waiting=4 * n + 64, max_waiting_per_tenant=8), Blocks())
    for t in range(n):
        for _ in range(2):
            s.add(Request(tenant_id=t, adapter_id=None, deadline=1e18, prompt_ids=[1] * 16, max_new_tokens=8))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = s.schedule()
        times.append(time.perf_counter() - t0)
        results = tuple(RowResult(r.request.request_id, None, 7 if r.request.num_computed_tokens + r.num_tokens
                                  == r.request.num_tokens else None) for r in batch.rows)
        for r in s.update(batch, StepOutput(batch.step, results), lambda q, tok: False):
            s.add(Request(tenant_id=r.tenant_id, adapter_id=None, deadline=1e18, prompt_ids=[1] * 16,
                          max_new_tokens=8))
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--tenants", default="10,100,1000,10000,30000")
    p.add_argument("--steps", type=int, default=100)
    args = p.parse_args(argv)
    counts = [int(x) for x in args.tenants.split(",")]
    out = {"benchmark": "policy_scale", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": sys.argv,
           "machine": platform.platform(), "steps": args.steps, "policies": {}}
    for name, fn in (("encoder", encoder_times), ("generation", generation_times)):
        rows = []
        for n in tqdm(counts, desc=name, unit="size"):
            times = fn(n, args.steps)[5:]          # the first steps fill the running set
            rows.append({"tenants": n, "median_ms": round(statistics.median(times) * 1e3, 4),
                         "p99_ms": round(sorted(times)[int(0.99 * (len(times) - 1))] * 1e3, 4),
                         "max_ms": round(max(times) * 1e3, 4)})
        out["policies"][name] = rows
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    plot(out, args.json.with_suffix(".png"))
    print(json.dumps(out["policies"]))
    return 0


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, color in (("encoder", "#27a"), ("generation", "#d62")):
        rows = out["policies"][name]
        xs = [r["tenants"] for r in rows]
        ax.plot(xs, [r["median_ms"] for r in rows], "o-", color=color, label=f"{name}: median")
        ax.plot(xs, [r["max_ms"] for r in rows], "x--", color=color, alpha=0.6, label=f"{name}: max")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("backlogged tenants")
    ax.set_ylabel("schedule() per step (ms)")
    ax.set_title("Policy cost per step against tenants")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
