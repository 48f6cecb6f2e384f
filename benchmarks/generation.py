#!/usr/bin/env python
"""The generation engine (Orca iteration-level scheduling) against request-level static batching and
against Hugging Face generate + PEFT, and the cost of per-row LoRA in decode.

    python benchmarks/generation.py --json benchmarks/results/cpu-DATE/generation.json     # --quick: tiny model

Workload (the same for every contender, fixed by --seed): --num-requests requests, prompts of 1-3 real
sentences from ../shared/data (read in place; 20-80 tokens), output lengths exponential (mean 40) capped
at 128, EOS ignored (greedy); 100 tenants, each with its own random LoRA (rank 8 on q,k,v,o,gate,up,down),
drawn with Zipf popularity (s=1.1); Poisson arrivals (a unit-rate exponential gap per request, scaled by
the rate, so every rate and mode sees the same sequence). Same backbone, max batch (--max-running),
token budget per step and KV budget for every contender. All adapters are loaded into the LoRA pool up
front (through the manager's TieredCache, slots = tenants, warmed before timing; --adapter-residency
preloaded: a static slot map): this measures scheduling and compute, not adapter loading.

1. calibration: --calibration-requests requests alone (their prompts, --mean-output new tokens), one at a
   time; the latency objective is --slo-multiple x their median per-token latency (end-to-end / tokens)
   unless --slo-s-per-token is given.
2. ours_over_hf: our engine (iteration mode, every request submitted at t=0: offline throughput) on the
   first --hf-requests requests against transformers generate with PEFT holding all adapters
   (load_adapter), static batches of --max-running in request order, left padding, greedy, min = max new
   tokens = the batch's longest, counting only each request's own tokens. Also our offline throughput on
   the whole workload (its requests/s sets the sweep's rate grid).
3. lora_over_base: decode tokens/s of full batches (--max-running rows) whose rows use distinct adapters
   (cycling through all of them) over the same steps with no adapter; interleaved rounds.
4. iteration_over_request: per mode, open-loop runs at a geometric grid of rates (--rate-fractions x our
   offline requests/s), from the highest down to the first that meets the objective (lower ones are not
   run), extended down (halving) if none does or up (doubling) if all do, then refined by bisection
   (geometric midpoint between the best passing and the lowest failing rate); a point runs the first min(N, max(--min-point-requests, rate x --max-arrival-s)) requests.
   Per point: generated tokens/s, p50/p99 of end-to-end latency, normalized latency (end-to-end / output
   tokens, Orca's metric), TTFT, TPOT, preemptions. The figure: the highest rate at which p99 normalized
   latency stays under the objective (every tested rate up to it passes), iteration mode over request mode.

Writes the JSON (after every section, `partial` until the end), a PNG of both modes' curves next to it,
and a Markdown table (iteration mode at every rate it ran) as <stem>.md.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from tqdm import tqdm  # noqa: E402

from generation_workload import (PreloadedAdapters, add_engine_args, add_sized_args, fill_sized_args,  # noqa: E402
                                 hf_generate, in_step_thread, load_average, load_hf, lora_over_base, make_workload,
                                 machine, random_lora, run_engine, tiered_adapters, utc_now)
from vbert.decoder_backbone import DecoderBackbone, DecoderBackboneConfig  # noqa: E402
from vbert.device import DeviceContext, reserve_cpu_for_steps  # noqa: E402

TARGETS = {"iteration_over_request": 3.0, "ours_over_hf": 3.0, "lora_over_base": 0.85}
FULL = dict(num_requests=300, tenants=100, mean_output=40.0, max_output=128, rate_fractions="0.1,0.2,0.4,0.7,1.0,1.4",
            refine=2, extend=1, min_point_requests=30, max_arrival_s=120.0, hf_requests=64, calibration_requests=5,
            decode_rounds=5, decode_steps=32)
QUICK = dict(num_requests=24, tenants=10, mean_output=12.0, max_output=32, rate_fractions="0.2,1.0", refine=1,
             extend=1, min_point_requests=12, max_arrival_s=3.0, hf_requests=8, calibration_requests=2,
             decode_rounds=2, decode_steps=8)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", default="benchmarks/results/cpu-2026-12-06/generation.json")
    p.add_argument("--quick", action="store_true", help="a tiny random decoder, few requests (< 1 min)")
    add_engine_args(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--zipf-s", type=float, default=1.1)
    p.add_argument("--slo-s-per-token", type=float, default=None, help="default: --slo-multiple x calibration")
    p.add_argument("--slo-multiple", type=float, default=5.0)
    p.add_argument("--adapter-residency", choices=("tiered", "preloaded"), default="tiered",
                   help="the runner's adapters: the manager's TieredCache (all resident), or a static slot map")
    p.add_argument("--hf-adapters", choices=("all", "used"), default="all",
                   help="PEFT load_adapter for every tenant's adapter, or only those of the HF subset (PEFT's "
                        "mixed batch loops over the batch's adapters only; loading 100 takes minutes)")
    add_sized_args(p, FULL, QUICK)
    a = p.parse_args(argv)
    fill_sized_args(a, FULL, QUICK)
    return a


def git_state() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    try:
        return {"head": git("rev-parse", "HEAD"),
                "dirty": git("status", "--porcelain", "vbert", "manager", "scheduler", "benchmarks").splitlines()}
    except (OSError, subprocess.CalledProcessError):
        return {"head": None, "dirty": None}


# -- the rate sweep ---------------------------------------------------------------------------------
def sweep(mode: str, run_point, base_rps: float, a, slo: float) -> dict:
    points: dict[float, dict] = {}

    def point(rate: float, kind: str) -> dict:
        rate = round(rate, 4)
        if rate not in points:
            p = run_point(mode, rate)
            p["kind"], p["passes"] = kind, p["normalized_s_per_token_p99"] <= slo
            points[rate] = p
            tqdm.write(f"{mode:9s} rate {rate:7.3f}/s n={p['num_requests']:3d}: {p['throughput_tokens_per_s']:7.1f} tok/s  "
                       f"p99 normalized {p['normalized_s_per_token_p99'] * 1e3:8.1f} ms/token "
                       f"({'pass' if p['passes'] else 'FAIL'}), p99 e2e {p['e2e_s_p99']:.2f} s")
        return points[rate]

    for f in sorted((float(x) for x in a.rate_fractions.split(",")), reverse=True):
        if point(f * base_rps, "grid")["passes"]:
            break        # lower rates would pass too: not run (they are the slowest points)
    for _ in range(a.extend):
        if not any(p["passes"] for p in points.values()):
            point(min(points) / 2, "extend")
        elif all(p["passes"] for p in points.values()):
            point(max(points) * 2, "extend")
    for _ in range(a.refine):
        best = best_rate(points)
        above = [r for r in points if best is not None and r > best]
        if best is None or not above:
            break
        point(math.sqrt(best * min(above)), "refine")
    best = best_rate(points)
    return {"points": [points[r] for r in sorted(points)], "best_rate": best,
            "best_rate_any": max((r for r, p in points.items() if p["passes"]), default=None),
            "lowest_rate_tested": min(points)}


def best_rate(points: dict[float, dict]) -> float | None:
    """The highest rate such that it and every lower tested rate pass."""
    best = None
    for r in sorted(points):
        if not points[r]["passes"]:
            break
        best = r
    return best


def write_plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 - matplotlib.ticker.NullFormatter below

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    slo = result["slo_s_per_token"] * 1e3
    for mode, color in (("iteration", "tab:blue"), ("request", "tab:orange")):
        sw = result["iteration_over_request"]["sweeps"].get(mode)
        if not sw:
            continue
        pts = sw["points"]
        y = [p["normalized_s_per_token_p99"] * 1e3 for p in pts]
        label = f"{mode} ({'Orca' if mode == 'iteration' else 'static batching'})"
        axes[0].plot([p["throughput_tokens_per_s"] for p in pts], y, "o-", color=color, label=label)
        axes[1].plot([p["rate"] for p in pts], y, "o-", color=color, label=label)
        if sw["best_rate"] is not None:
            axes[1].axvline(sw["best_rate"], color=color, ls=":", lw=1)
    for ax, xlabel in zip(axes, ("throughput (generated tokens/s)", "arrival rate (requests/s)")):
        ax.axhline(slo, color="red", ls="--", lw=1, label=f"objective {slo:.0f} ms/token")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("p99 normalized latency (ms / output token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_xscale("log")
    axes[1].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())   # no overlapping minor labels
    ior = result["iteration_over_request"]
    ratio, bound = ior.get("value"), ior.get("bound")
    fig.suptitle(f"{result['model']} on {result['device']}: max rate under the objective, iteration / request "
                 + ("n/a" if ratio is None else (">= " if bound else "= ") + f"{ratio:.2f}"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table_md(points: list[dict]) -> str:
    lines = ["| rate (req/s) | tokens/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | end-to-end p50 / p99 (s) | "
             "normalized p99 (ms/token) |", "|---|---|---|---|---|---|"]
    ms = lambda v: f"{v * 1e3:.0f}" if v is not None else "-"  # noqa: E731
    for p in points:
        lines.append(f"| {p['rate']:.2f} | {p['throughput_tokens_per_s']:.0f} | {ms(p['ttft_s_p50'])} / {ms(p['ttft_s_p99'])} "
                     f"| {ms(p['tpot_s_p50'])} / {ms(p['tpot_s_p99'])} | {p['e2e_s_p50']:.2f} / {p['e2e_s_p99']:.2f} "
                     f"| {ms(p['normalized_s_per_token_p99'])} |")
    return "\n".join(lines) + "\n"


def target(value, goal: float) -> dict:
    return {"value": value, "target": goal, "met": None if value is None else value >= goal}


# -- main ------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    a = parse_args(argv)
    threads = reserve_cpu_for_steps(a.threads)   # as `vbert serve`: compute only on step threads (vbert/device.py)
    out_path = Path(a.json)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    device = DeviceContext.create(a.device, a.dtype)
    tmp = tempfile.TemporaryDirectory(prefix="generation-bench-")
    model_path = a.model
    if a.quick and model_path is None:
        from tests.decoder_models import write_tiny_decoder_checkpoint
        model_path = str(write_tiny_decoder_checkpoint(Path(tmp.name) / "tiny-decoder", seed=a.seed))
    t_setup = time.perf_counter()
    backbone = DecoderBackbone.load(DecoderBackboneConfig(path=model_path, cache_dir=a.cache_dir,
                                                          kv_cache_bytes=a.kv_cache_mb * 1024 ** 2, block_size=16,
                                                          num_lora_slots=a.tenants, max_lora_rank=a.lora_rank), device)
    items = make_workload(backbone.tokenizer, a.num_requests, a.tenants, a.seed, a.zipf_s,
                          mean_output=a.mean_output, max_output=a.max_output)
    loras = {t + 1: random_lora(backbone.spec, a.lora_rank, a.seed * 100_003 + t)
             for t in tqdm(range(a.tenants), desc="random adapters", unit="adapter", leave=False)}
    if a.adapter_residency == "tiered":
        adapters, slot_of = tiered_adapters(backbone.lora, loras)
        residency = (f"tiered: manager.cache.TieredCache over the decoder LoRA pool, {a.tenants} slots (one per "
                     f"tenant), every adapter made resident before timing")
    else:
        slot_of = {aid: backbone.lora.load(ad) for aid, ad in loras.items()}
        adapters, residency = PreloadedAdapters(backbone.lora, slot_of), "preloaded"
    result = {
        "benchmark": "generation", "partial": True, "model": backbone.name, "model_path": str(backbone.path),
        "device": device.describe(), "dtype": device.dtype_name, "torch_threads": threads,
        "machine": machine(),
        "date": utc_now(), "git": git_state(),
        "parameters": vars(a), "adapter_residency": residency, "kv_cache_blocks": backbone.kv.num_blocks,
        "workload": {"num_requests": len(items), "prompt_tokens_mean": statistics.fmean(len(i.prompt_ids) for i in items),
                     "prompt_tokens_min_max": [min(len(i.prompt_ids) for i in items), max(len(i.prompt_ids) for i in items)],
                     "output_tokens_mean": statistics.fmean(i.max_new_tokens for i in items),
                     "output_tokens_min_max": [min(i.max_new_tokens for i in items), max(i.max_new_tokens for i in items)],
                     "distinct_tenants": len({i.tenant for i in items}),
                     "top_tenant_share": max(sum(i.tenant == t for i in items) for t in range(a.tenants)) / len(items)},
        "setup_s": None, "targets": {},
    }

    def save() -> None:
        out_path.write_text(json.dumps(result, indent=2, default=str))

    def run(mode, its, rate, desc=""):
        return run_engine(backbone, adapters, its, mode, a.max_running, a.max_tokens_per_step, rate, desc)

    # 1. calibration: requests alone
    run("iteration", [replace(items[0], max_new_tokens=4)], None, "warm-up")
    alone = [run("iteration", [replace(it, max_new_tokens=round(a.mean_output))], None, "alone")[0]
             for it in items[:a.calibration_requests]]
    alone_per_token = statistics.median(p["normalized_s_per_token_p50"] for p in alone)
    slo = a.slo_s_per_token or a.slo_multiple * alone_per_token
    result.update(setup_s=time.perf_counter() - t_setup, slo_s_per_token=slo, calibration={
        "alone_s_per_token": alone_per_token, "alone_tpot_s": statistics.median(p["tpot_s_p50"] for p in alone),
        "alone_ttft_s": statistics.median(p["ttft_s_p50"] for p in alone), "new_tokens": round(a.mean_output),
        "slo_source": "given" if a.slo_s_per_token else f"{a.slo_multiple} x alone_s_per_token"})
    tqdm.write(f"alone: {alone_per_token * 1e3:.1f} ms/token -> objective {slo * 1e3:.1f} ms/token")

    # 2. offline throughput, ours vs HF + PEFT
    offline, _ = run("iteration", items, None, "offline (all at t=0)")
    result["offline"] = offline
    tqdm.write(f"offline: {offline['throughput_tokens_per_s']:.1f} tok/s, {offline['throughput_rps']:.2f} req/s")
    save()

    # 3. (run before HF) LoRA vs base in steady-state decode
    slots = sorted(slot_of.values())
    lob = in_step_thread(lora_over_base, backbone, slots, a.max_running, 48, a.decode_steps, a.decode_rounds)
    result["lora_over_base"] = lob
    result["targets"]["lora_over_base"] = target(lob["ratio_of_medians"], TARGETS["lora_over_base"])
    tqdm.write(f"decode: lora {lob['lora_tokens_per_s']:.1f} tok/s, base {lob['base_tokens_per_s']:.1f} -> "
               f"{lob['ratio_of_medians']:.3f}")
    save()

    sub = items[:a.hf_requests]
    ours_sub, ours_out = run("iteration", sub, None, "ours on the HF subset")
    hf_ids = sorted(loras) if a.hf_adapters == "all" else sorted({it.tenant + 1 for it in sub})
    hf_model, load_s = load_hf(backbone.path, {i: loras[i] for i in hf_ids}, device, Path(tmp.name))
    pad = backbone.tokenizer.pad_token_id if backbone.tokenizer.pad_token_id is not None else backbone.eos_token_ids[0]
    in_step_thread(hf_generate, hf_model, [replace(sub[0], max_new_tokens=2)], 1, pad, device)   # warm-up
    hf, hf_out = in_step_thread(hf_generate, hf_model, sub, a.max_running, pad, device)
    del hf_model
    gc.collect()
    agree = [list(r.token_ids[:8]) == o[:8] for r, o in zip(ours_out, hf_out)]
    ratio = ours_sub["throughput_tokens_per_s"] / hf["throughput_tokens_per_s"]
    result["ours_over_hf"] = {"value": ratio, "ours": ours_sub, "hf": hf, "hf_adapter_load_s": load_s,
                              "hf_adapters_loaded": len(hf_ids), "subset": f"the first {len(sub)} of {len(items)} requests",
                              "first_8_tokens_agree_fraction": sum(agree) / len(agree),
                              "note": "ours: iteration mode, all submitted at t=0; HF: transformers generate + PEFT "
                                      "mixed-adapter batches (adapter_names), static batches of max_running, left "
                                      "padding, min=max new tokens = the batch's longest, own tokens counted"}
    result["targets"]["ours_over_hf"] = target(ratio, TARGETS["ours_over_hf"])
    tqdm.write(f"HF subset: ours "
               f"{ours_sub['throughput_tokens_per_s']:.1f}, HF {hf['throughput_tokens_per_s']:.1f} -> {ratio:.2f}x "
               f"(first tokens agree {sum(agree)}/{len(agree)})")
    save()

    # 4. the sweep
    base_rps = offline["throughput_rps"]

    def run_point(mode, rate):
        n = min(len(items), max(a.min_point_requests, math.ceil(rate * a.max_arrival_s)))
        load = load_average()
        p, _ = run(mode, items[:n], rate, f"{mode} @ {rate:.2f}/s")
        p["loadavg_before_after"] = [load, load_average()]
        return p

    sweeps = {}
    result["iteration_over_request"] = {"sweeps": sweeps, "slo_s_per_token": slo}
    for mode in ("iteration", "request"):
        sweeps[mode] = sweep(mode, run_point, base_rps, a, slo)
        save()
    it_best, rq_best = sweeps["iteration"]["best_rate"], sweeps["request"]["best_rate"]
    ior = result["iteration_over_request"]
    if it_best is not None and rq_best is not None:
        ior.update(value=it_best / rq_best, bound=None)
    elif it_best is not None:   # request mode failed even at its lowest tested rate
        ior.update(value=it_best / sweeps["request"]["lowest_rate_tested"], bound="lower bound: request mode "
                   "failed the objective at every tested rate; divided by its lowest tested rate")
    else:
        ior.update(value=None, bound="iteration mode failed the objective at every tested rate")
    result["targets"]["iteration_over_request"] = target(ior["value"], TARGETS["iteration_over_request"])
    grid = sweeps["iteration"]["points"]
    result["table"] = [{k: p[k] for k in ("rate", "throughput_tokens_per_s", "ttft_s_p50", "ttft_s_p99", "tpot_s_p50",
                                          "tpot_s_p99", "e2e_s_p50", "e2e_s_p99", "normalized_s_per_token_p99")}
                       for p in grid]
    result["table_md"] = table_md(grid)
    result["partial"] = False
    save()
    out_path.with_suffix(".md").write_text(result["table_md"])
    write_plot(result, out_path.with_suffix(".png"))
    tmp.cleanup()
    tqdm.write(f"iteration best {it_best}/s, request best {rq_best}/s -> {ior['value']}")
    for name, t in result["targets"].items():
        tqdm.write(f"{name}: {t['value']} (target {t['target']}, met: {t['met']})")
    tqdm.write(f"wrote {out_path}, {out_path.with_suffix('.png')}, {out_path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
