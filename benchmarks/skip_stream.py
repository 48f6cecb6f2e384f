"""The warm stream of benchmarks/skip.py: held-out text served in order, twice, by the full model and
by skip-mode models side by side, to show how the miss cache and the routing behave on real traffic.

Each batch of `batch` sentences (the test sets in order; every sentence a request, cut as the server
cuts it) is run once by every contender, in a seeded random order, and timed. Per window of `window` requests
the JSON keeps each skip contender's time over the full model's (as skip / full speed), its coverage
(share of unique trigrams the table or the miss cache held), the rows it sent to the real lower
layers and the misses it computed.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

from tqdm import tqdm


def _delta(now: dict, then: dict, keys) -> dict:
    return {k: now[k] - then.get(k, 0) for k in keys}


COUNTERS = ("tokens", "lookups", "table_hits", "cache_hits", "computed", "rows_table", "rows_layers",
            "layer_tokens", "probed", "probed_known")


def run_stream(full, skips: dict, rows: list[list[int]], batch: int, passes: int, window: int,
               table_name: str, restart=None) -> dict:
    """full: the full MultiTenantModel; skips: name -> skip-mode MultiTenantModel; rows: token ids of
    the stream's requests in order. restart(name, model) -> model: between passes, a skip contender is
    replaced by what it returns (a server restart: the caches saved, a new model that restores them);
    the restart's seconds and restored entries go to the next pass's record.
    Returns {"windows": [...], "per_pass": {...}, "contenders": [...], ...}."""
    from vbert import EncodeRow

    skips = dict(skips)
    names = ["full", *skips]
    models = {"full": full, **skips}
    restarts: dict = {}
    batches = [rows[i:i + batch] for i in range(0, len(rows), batch)]
    windows, acc = [], None
    served = 0
    per_pass = {n: [] for n in skips}

    def fresh():
        return {"requests": 0, "tokens": 0, "seconds": {n: 0.0 for n in names},
                "counters": {n: dict(skips[n].skip.stats()[table_name]) for n in skips}}

    def close(a, pass_no):
        w = {"end_request": served, "pass": pass_no, "requests": a["requests"], "tokens": a["tokens"],
             "seconds": a["seconds"], "contenders": {}}
        for n in skips:
            d = _delta(skips[n].skip.stats()[table_name], a["counters"][n], COUNTERS)
            w["contenders"][n] = {
                "skip_over_full": a["seconds"]["full"] / a["seconds"][n] if a["seconds"][n] else 0.0,
                "coverage": d["probed_known"] / d["probed"] if d["probed"] else
                (d["table_hits"] + d["cache_hits"]) / d["lookups"] if d["lookups"] else 0.0,
                **d}
        return w

    rng = random.Random(0)
    bar = tqdm(total=passes * len(batches), desc="stream batches", unit="batch")
    for p in range(passes):
        start_counters = {n: dict(skips[n].skip.stats()[table_name]) for n in skips}
        pass_seconds = {n: 0.0 for n in names}
        acc = fresh()
        for b in batches:
            order = rng.sample(names, len(names))  # seeded random order: no contender always follows another
            for n in order:
                t0 = time.perf_counter()
                models[n].forward([EncodeRow(r) for r in b])
                dt = time.perf_counter() - t0
                acc["seconds"][n] += dt
                pass_seconds[n] += dt
            acc["requests"] += len(b)
            acc["tokens"] += sum(len(r) for r in b)
            served += len(b)
            if acc["requests"] >= window:
                windows.append(close(acc, p + 1))
                acc = fresh()
            bar.update(1)
        if acc["requests"]:
            windows.append(close(acc, p + 1))
        for n in skips:
            d = _delta(skips[n].skip.stats()[table_name], start_counters[n], COUNTERS)
            per_pass[n].append({"pass": p + 1, "skip_over_full": pass_seconds["full"] / pass_seconds[n],
                                "coverage": d["probed_known"] / d["probed"] if d["probed"] else
                                (d["table_hits"] + d["cache_hits"]) / d["lookups"] if d["lookups"] else 0.0,
                                "full_seconds": pass_seconds["full"], "skip_seconds": pass_seconds[n],
                                **restarts.get(n, {}), **d})
        if restart is not None and p + 1 < passes:
            restarts = {}
            for n in list(skips):
                t0 = time.perf_counter()
                skips[n] = models[n] = restart(n, skips[n])
                restarts[n] = {"restart_seconds": time.perf_counter() - t0,
                               "restored_entries": skips[n].skip.stats()[table_name]["cache"]["size"]}
    bar.close()
    return {"requests_per_pass": len(rows), "batch": batch, "passes": passes, "window": window,
            "tokens_per_pass": sum(len(r) for r in rows), "windows": windows, "per_pass": per_pass,
            "contenders": list(skips)}


def plot_stream(stream: dict, labels: dict, path: Path) -> None:
    """Coverage and skip / full speed against requests served, a line per skip contender."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for n in stream["contenders"]:
        xs = [w["end_request"] for w in stream["windows"]]
        ax1.plot(xs, [w["contenders"][n]["coverage"] for w in stream["windows"]], label=labels.get(n, n))
        ax2.plot(xs, [w["contenders"][n]["skip_over_full"] for w in stream["windows"]], label=labels.get(n, n))
    for ax in (ax1, ax2):
        for p in range(1, stream["passes"]):
            ax.axvline(p * stream["requests_per_pass"], color="#999", ls="--", lw=0.8)
        ax.grid(alpha=0.3)
    ax2.axhline(1.0, color="k", lw=0.8)
    ax1.set_ylabel("trigrams held (table + cache)")
    ax2.set_ylabel("skip / full speed")
    ax2.set_xlabel("requests served (held-out test sentences in order; dashed: the second pass begins)")
    ax1.legend(fontsize=8)
    ax1.set_title(f"warm stream: {stream['requests_per_pass']:,} held-out sentences x {stream['passes']}, "
                  f"batches of {stream['batch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
