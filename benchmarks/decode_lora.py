#!/usr/bin/env python
"""Per-row LoRA in decode: float32 against bfloat16 adapter banks, each against the bare decoder.

    python benchmarks/decode_lora.py --json benchmarks/results/cpu-DATE/decode_lora/decode_lora.json

The default decoder (SmolLM2-135M-Instruct; --model for another), --adapters random LoRA adapters (rank
--rank on q, k, v, o, gate, up, down of every layer, as benchmarks/generation.py makes them) loaded into two
LoRA pools of the same slots, one with float32 banks and one with bfloat16 banks (`DecoderLoraConfig.
bank_dtype`). Steady-state decode of --batch rows (prompts of --prompt-tokens, prefill untimed), each
row's adapter cycling through all of them, so every step has --batch distinct adapters
(generation_workload.decode_rate, the measurement of generation.py's lora_over_base). Per round, three
contenders in a rotating order: no adapter, float32 banks, bfloat16 banks; --rounds rounds of --steps
steps. Reported: each LoRA contender's tokens/s over the bare decoder's (ratio of medians, and the median
of the per-round ratios with a 95 % bootstrap interval), and what bfloat16 changes in the output: the
largest logit difference against float32 banks over --check-steps decode steps of --batch rows (next to
the LoRA's own effect on the logits), and the share of greedy tokens that agree.

Writes JSON and a PNG next to it.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from generation import git_state  # noqa: E402
from generation_workload import (decode_rate, in_step_thread, load_average, machine, random_lora,  # noqa: E402
                                 utc_now)
from vbert.decoder import StepSequence  # noqa: E402
from vbert.decoder_backbone import DecoderBackbone, DecoderBackboneConfig  # noqa: E402
from vbert.decoder_lora import DECODER_LORA_GROUPS, DecoderLoraConfig, DecoderLoraPool  # noqa: E402
from vbert.device import DeviceContext, reserve_cpu_for_steps  # noqa: E402

CONTENDERS = ("base", "float32", "bfloat16")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, required=True, help="where to write the results (a PNG goes next to it)")
    p.add_argument("--model", default=None, help="a local HF Llama-family checkpoint (default SmolLM2-135M-Instruct)")
    p.add_argument("--cache-dir", default="./var/models")
    p.add_argument("--adapters", type=int, default=100)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=16, help="rows per decode step (each its own adapter)")
    p.add_argument("--prompt-tokens", type=int, default=48)
    p.add_argument("--steps", type=int, default=32, help="decode steps per round and contender")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--check-steps", type=int, default=16, help="decode steps compared for the output check")
    p.add_argument("--kernel-reps", type=int, default=40, help="repetitions of the kernel-only timing")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    for name in ("adapters", "rank", "batch", "prompt_tokens", "steps", "rounds", "check_steps", "kernel_reps"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return a


class _WithPool:
    """The backbone as decode_rate reads it, with another LoRA pool."""

    def __init__(self, backbone, lora):
        self.model, self.kv, self.lora = backbone.model, backbone.kv, lora


def bootstrap_median(values: list[float], seed: int, n: int = 2000) -> list[float]:
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(n))
    return [meds[int(0.025 * n)], meds[int(0.975 * n) - 1]]


def timed_rounds(backbone, pools: dict, slots: list[int], a) -> dict[str, list[float]]:
    rates = {c: [] for c in CONTENDERS}
    for k in tqdm(range(a.rounds), desc="decode rounds", unit="round"):
        order = CONTENDERS[k % 3:] + CONTENDERS[:k % 3]
        for c in order:
            view = _WithPool(backbone, pools["float32" if c == "base" else c])
            rates[c].append(decode_rate(view, [] if c == "base" else slots, a.batch, a.prompt_tokens, a.steps,
                                        k * a.steps))
    return rates


def kernel_times(spec, pools: dict, slots: list[int], a) -> dict:
    """The BGMV calls of one decode step alone (every layer, every input group, --batch rows), median ms per
    step over --kernel-reps repetitions, dtypes alternating: every row on one adapter (its rows stay in
    cache) and every row its own adapter (cycling through all, as the decode rounds)."""
    groups = {}
    for g, targets in DECODER_LORA_GROUPS.items():
        outs = [spec.target_dims(t)[1] for t in targets]
        groups[g] = (torch.randn(a.batch, spec.target_dims(targets[0])[0]), torch.zeros(a.batch, sum(outs)),
                     tuple(sum(outs[:j]) for j in range(len(outs))))
    result = {}
    for case in ("one_adapter", "distinct_adapters"):
        times = {dt: [] for dt in pools}
        for rep in range(a.kernel_reps + 1):
            if case == "one_adapter":
                idx = torch.full((a.batch,), slots[0], dtype=torch.long)
            else:
                idx = torch.tensor([slots[(rep * a.batch + i) % len(slots)] for i in range(a.batch)])
            for dt in (list(pools) if rep % 2 == 0 else list(reversed(pools))):
                t0 = time.perf_counter()
                for layer in range(spec.num_layers):
                    for g, (x, out, offsets) in groups.items():
                        pools[dt].apply(layer, g, x, out, idx, offsets)
                if rep:                                # the first repetition warms up
                    times[dt].append((time.perf_counter() - t0) * 1e3)
        result[case] = {dt: statistics.median(v) for dt, v in times.items()}
    return result


def output_check(backbone, pools: dict, slots: list[int], a) -> dict:
    """Decode the same rows with each pool (teacher-forced on the float32 pool's greedy tokens, so the
    positions compare) and with no adapter; logit differences and greedy agreement."""
    model, kv = backbone.model, backbone.kv
    g = torch.Generator().manual_seed(a.seed + 1)
    prompt = torch.randint(0, model.spec.vocab_size, (a.batch * a.prompt_tokens,), generator=g)
    rows = [slots[i % len(slots)] for i in range(a.batch)]
    logits: dict[str, list[torch.Tensor]] = {}
    forced: list[torch.Tensor] = []
    for c in ("float32", "bfloat16", "base"):
        ids = [f"check-{c}-{i}" for i in range(a.batch)]
        pool = pools["float32" if c == "base" else c]
        slot = (lambda i: 0) if c == "base" else (lambda i: rows[i])
        out = []
        try:
            for s in ids:
                kv.allocate(s, a.prompt_tokens + a.check_steps + 1)
            with torch.no_grad():
                step = model.forward(prompt, None, [StepSequence(s, 0, a.prompt_tokens, slot(i))
                                                    for i, s in enumerate(ids)], kv, pool)
                for t in range(a.check_steps):
                    out.append(step.float().cpu())
                    if c == "float32":
                        forced.append(step.argmax(-1))
                    step = model.forward(forced[t], None, [StepSequence(s, a.prompt_tokens + t, 1, slot(i))
                                                           for i, s in enumerate(ids)], kv, pool)
        finally:
            for s in ids:
                if kv.has_sequence(s):
                    kv.free(s)
        logits[c] = out
    f32, bf16, base = (torch.stack(logits[c]) for c in ("float32", "bfloat16", "base"))   # [steps, batch, V]
    return {"positions": f32.shape[0] * f32.shape[1],
            "max_abs_logit_diff_bfloat16_vs_float32": float((bf16 - f32).abs().max()),
            "max_abs_logit_diff_lora_vs_base": float((f32 - base).abs().max()),
            "mean_abs_logit_diff_bfloat16_vs_float32": float((bf16 - f32).abs().mean()),
            "mean_abs_logit_diff_lora_vs_base": float((f32 - base).abs().mean()),
            "greedy_agreement_bfloat16_vs_float32": float((bf16.argmax(-1) == f32.argmax(-1)).float().mean()),
            "greedy_agreement_base_vs_float32": float((base.argmax(-1) == f32.argmax(-1)).float().mean())}


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = result["rounds_tokens_per_s"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for c in CONTENDERS:
        left.plot(range(1, len(rounds[c]) + 1), rounds[c], marker="o", label=c if c != "base" else "no adapter")
    left.set_xlabel("round")
    left.set_ylabel("decode tokens/s")
    left.set_title(f"{result['parameters']['batch']} rows, each its own adapter")
    left.legend()
    names = ["float32", "bfloat16"]
    vals = [result["ratios"][n]["median_of_round_ratios"] for n in names]
    errs = [[v - result["ratios"][n]["ci95"][0] for n, v in zip(names, vals)],
            [result["ratios"][n]["ci95"][1] - v for n, v in zip(names, vals)]]
    right.bar(names, vals, yerr=errs, capsize=6, color=["tab:orange", "tab:green"])
    right.axhline(result["target"], color="gray", linestyle="--", label=f"target {result['target']}")
    right.set_ylim(min(0.6, min(vals) - 0.05), 1.02)
    right.set_ylabel("LoRA / no adapter (decode tokens/s)")
    right.set_title("banks")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    a = parse_args(argv)
    threads = reserve_cpu_for_steps(a.threads)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    device = DeviceContext.create("auto", "auto")
    backbone = DecoderBackbone.load(DecoderBackboneConfig(path=a.model, cache_dir=a.cache_dir, num_lora_slots=a.adapters,
                                                          max_lora_rank=a.rank), device)
    pools = {dt: DecoderLoraPool(DecoderLoraConfig(num_slots=a.adapters, max_rank=a.rank, bank_dtype=dt),
                                 backbone.spec, device) for dt in ("float32", "bfloat16")}
    slots = []
    for t in tqdm(range(a.adapters), desc="random adapters", unit="adapter"):
        lora = random_lora(backbone.spec, a.rank, a.seed * 100_003 + t)
        got = {dt: pool.load(lora) for dt, pool in pools.items()}
        assert got["float32"] == got["bfloat16"], got
        slots.append(got["float32"])
    started = time.perf_counter()
    rates = in_step_thread(timed_rounds, backbone, pools, slots, a)
    check = in_step_thread(output_check, backbone, pools, slots, a)
    kernel = in_step_thread(kernel_times, backbone.spec, pools, slots, a)
    ratios = {}
    for dt in ("float32", "bfloat16"):
        per_round = [x / b for x, b in zip(rates[dt], rates["base"])]
        ratios[dt] = {"ratio_of_medians": statistics.median(rates[dt]) / statistics.median(rates["base"]),
                      "median_of_round_ratios": statistics.median(per_round),
                      "ci95": bootstrap_median(per_round, a.seed), "per_round": per_round}
    result = {
        "benchmark": "decode_lora", "model": backbone.name, "device": device.describe(), "torch_threads": threads,
        "machine": machine(),
        "date": utc_now(), "git": git_state(),
        "load_average_after": load_average(), "parameters": {k: str(v) if isinstance(v, Path) else v
                                                              for k, v in vars(a).items()},
        "pool_bytes": {dt: pool.total_bytes() for dt, pool in pools.items()},
        "tokens_per_s_median": {c: statistics.median(r) for c, r in rates.items()},
        "rounds_tokens_per_s": rates, "ratios": ratios, "target": 0.85, "output_check": check,
        "kernel_ms_per_step": kernel,
        "timed_s": time.perf_counter() - started,
    }
    a.json.write_text(json.dumps(result, indent=2))
    plot(result, a.json.with_suffix(".png"))
    for dt in ("float32", "bfloat16"):
        r = ratios[dt]
        tqdm.write(f"{dt:9s} banks: LoRA / no adapter {r['median_of_round_ratios']:.3f} "
                   f"(95% CI {r['ci95'][0]:.3f}-{r['ci95'][1]:.3f}), ratio of medians {r['ratio_of_medians']:.3f}")
    for case, t in kernel.items():
        tqdm.write(f"kernel alone, {case}: " + ", ".join(f"{dt} {v:.2f} ms/step" for dt, v in t.items()))
    tqdm.write(f"bfloat16 vs float32 banks: max |logit diff| {check['max_abs_logit_diff_bfloat16_vs_float32']:.4f} "
               f"(the LoRA's own effect: {check['max_abs_logit_diff_lora_vs_base']:.3f}), greedy agreement "
               f"{check['greedy_agreement_bfloat16_vs_float32']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
