#!/usr/bin/env python
"""Paged attention: steady decode against context length, and prefill steps of many chunks.

    python benchmarks/paged_attention.py --json benchmarks/results/cpu-DATE/paged_attention/paged_attention.json

The default decoder (SmolLM2-135M-Instruct; --model for another).

Decode: --batch rows of random prompts of each --contexts length, decoding random next tokens (the same
tokens for every contender):
- ours: DecoderModel.forward on the paged KV cache (blocks of 16 tokens) with the decode staging (the running
  rows' K/V also kept contiguous, appended each step: kv_cache.DecodeStaging), the engine's step;
- blocks: the same step without the staging (each step reads every row's blocks, a block at a time, masked
  past each context);
- hf: transformers' LlamaForCausalLM on the same checkpoint with its DynamicCache (one contiguous tensor per
  layer, grown each step) and SDPA attention: what a user would otherwise run.
Per context every contender prefills once (untimed), then --rounds rounds of --steps decode steps each, in a
rotating order, each round continuing its own cache (the context grows by --steps a round).
Reported per context: tokens/s of each (median of rounds), ours / hf and blocks / hf (medians of the per-round
ratios with 95 % bootstrap intervals), the share of our steps spent in attention (K/V reads, staging and
SDPA), what reading K/V a block at a time saves against one index per token (one layer's gather on the same
cache, timed alone), and the largest logit difference between ours and hf on the first decode step with their
greedy agreement.

Prefill: one step that prefills C new prompts of m tokens each (--prefill-shapes CxM), three contenders in a
rotating order, --rounds rounds: ours with the chunks in one padded attention call (the default), ours with
each chunk attending alone (vbert.decoder.CHUNK_PAD_LIMIT = 0, what every step did before), and transformers'
forward of the C x m batch. Reported: step time and our attention time per contender, and the ratios.

Writes JSON and a PNG next to it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from decode_lora import bootstrap_median  # noqa: E402
from generation import git_state  # noqa: E402
from generation_workload import in_step_thread, load_average, load_default_decoder, machine, utc_now  # noqa: E402
from vbert import decoder  # noqa: E402
from vbert.decoder import StepSequence  # noqa: E402
from vbert.kv_cache import KVCacheConfig  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, required=True, help="where to write the results (a PNG goes next to it)")
    p.add_argument("--model", default=None, help="a local HF Llama-family checkpoint (default SmolLM2-135M-Instruct)")
    p.add_argument("--cache-dir", default="./var/models")
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 1024], help="prompt lengths (tokens)")
    p.add_argument("--batch", type=int, default=16, help="rows per decode step")
    p.add_argument("--steps", type=int, default=16, help="decode steps per round and contender")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--gather-reps", type=int, default=20, help="repetitions of the gather-only timing")
    p.add_argument("--prefill-shapes", nargs="*", default=["16x16", "8x32", "4x64"],
                   help="prefill steps: CxM = C new prompts of M tokens in one step")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    for name in ("batch", "steps", "rounds", "gather_reps"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(a.contexts) < 1:
        p.error("--contexts must be >= 1")
    try:
        a.prefill_shapes = [tuple(int(x) for x in shape.split("x")) for shape in a.prefill_shapes]
    except ValueError:
        p.error(f"--prefill-shapes must be CxM pairs of integers, got {a.prefill_shapes}")
    if any(len(sh) != 2 or min(sh) < 1 for sh in a.prefill_shapes):
        p.error(f"--prefill-shapes must be CxM with C, M >= 1, got {a.prefill_shapes}")
    return a


@contextlib.contextmanager
def attention_timer(model):
    """Inside: model._attention also adds its seconds to the yielded list's one item."""
    seconds, inner = [0.0], model._attention

    def timed(*args):
        t = time.perf_counter()
        out = inner(*args)
        seconds[0] += time.perf_counter() - t
        return out
    model._attention = timed
    try:
        yield seconds
    finally:
        del model._attention


class Ours:
    """The batch's sequences on our paged cache, continued round after round."""

    def __init__(self, backbone, kv, prompt: torch.Tensor, total: int):
        self.model, self.kv = backbone.model, kv
        self.seqs = [f"ctx-{i}" for i in range(prompt.shape[0])]
        self.length = prompt.shape[1]
        for s in self.seqs:
            self.kv.allocate(s, total)
        self.model.forward(prompt.reshape(-1), None, [StepSequence(s, 0, self.length) for s in self.seqs], self.kv)

    def decode(self, ids: torch.Tensor) -> tuple[float, torch.Tensor, float]:
        """ids [batch, steps] -> (seconds, logits of the first step, seconds in attention)."""
        model = self.model
        with attention_timer(model) as attention:
            t0 = time.perf_counter()
            for t in range(ids.shape[1]):
                seqs = [StepSequence(s, self.length + t, 1) for s in self.seqs]
                logits = model.forward(ids[:, t].contiguous(), None, seqs, self.kv)
                if t == 0:
                    first = logits
                logits.argmax(-1).tolist()
            model.device.synchronize()
            seconds = time.perf_counter() - t0
        self.length += ids.shape[1]
        return seconds, first, attention[0]

    def gather_ms(self, reps: int) -> dict[str, float]:
        """One layer's K and V of the whole batch: one index per token against one per block of 16."""
        kv, dev = self.kv, self.model.device
        slots = torch.from_numpy(np.concatenate([kv.slots(s, 0, self.length) for s in self.seqs]))
        blocks = torch.from_numpy(np.concatenate([kv.blocks(s, self.length) for s in self.seqs]))
        slots, blocks = dev.to_device(slots), dev.to_device(blocks)
        kvh, d = kv.k.shape[-2:]

        def per_token():
            return (kv.k[0].view(-1, kvh, d).index_select(0, slots), kv.v[0].view(-1, kvh, d).index_select(0, slots))

        out = {}
        for name, fn in (("per_token", per_token), ("per_block", lambda: kv.read_blocks(0, blocks))):
            fn()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            dev.synchronize()
            out[name] = (time.perf_counter() - t0) / reps * 1e3
        return out

    def close(self) -> None:
        for s in self.seqs:
            if self.kv.has_sequence(s):
                self.kv.free(s)


class HF:
    """The same batch on transformers' model with its DynamicCache."""

    def __init__(self, model, prompt: torch.Tensor):
        self.model = model
        out = model(input_ids=prompt, use_cache=True)
        self.cache = out.past_key_values

    def decode(self, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
        t0 = time.perf_counter()
        for t in range(ids.shape[1]):
            out = self.model(input_ids=ids[:, t:t + 1], past_key_values=self.cache, use_cache=True)
            self.cache = out.past_key_values
            logits = out.logits[:, -1].float()
            if t == 0:
                first = logits
            logits.argmax(-1).tolist()
        return time.perf_counter() - t0, first


DECODE_CONTENDERS = ("ours", "blocks", "hf")


def run_context(backbone, caches: dict, hf_model, ctx: int, a) -> dict:
    """caches: the paged cache of "ours" (with staging) and of "blocks" (without)."""
    g = torch.Generator().manual_seed(a.seed * 7919 + ctx)
    vocab = backbone.spec.vocab_size
    prompt = torch.randint(0, vocab, (a.batch, ctx), generator=g)
    total = ctx + a.rounds * a.steps
    contenders = {name: Ours(backbone, caches[name], prompt, total) for name in ("ours", "blocks")}
    rates = {n: [] for n in DECODE_CONTENDERS}
    attention_share = {n: [] for n in contenders}
    try:
        with torch.no_grad():
            contenders["hf"] = HF(hf_model, prompt)
            first, diff, agree = {}, None, None
            for k in tqdm(range(a.rounds), desc=f"context {ctx}", unit="round", leave=False):
                ids = torch.randint(0, vocab, (a.batch, a.steps), generator=g)
                for name in DECODE_CONTENDERS[k % 3:] + DECODE_CONTENDERS[:k % 3]:
                    if name == "hf":
                        seconds, first[name] = contenders[name].decode(ids)
                    else:
                        seconds, first[name], attn = contenders[name].decode(ids)
                        attention_share[name].append(attn / seconds)
                    rates[name].append(a.batch * a.steps / seconds)
                if k == 0:
                    diff = float((first["ours"] - first["hf"]).abs().max())
                    agree = float((first["ours"].argmax(-1) == first["hf"].argmax(-1)).float().mean())
            gather = contenders["blocks"].gather_ms(a.gather_reps)
    finally:
        for name in ("ours", "blocks"):
            contenders[name].close()
    ratios = {f"{n}_over_hf": [o / h for o, h in zip(rates[n], rates["hf"])] for n in ("ours", "blocks")}
    ratios["ours_over_blocks"] = [o / b for o, b in zip(rates["ours"], rates["blocks"])]
    out = {"context": ctx, "tokens_per_s": {n: statistics.median(r) for n, r in rates.items()},
           "rounds_tokens_per_s": rates}
    for name, per_round in ratios.items():
        out[name] = statistics.median(per_round)
        out[f"{name}_ci95"] = bootstrap_median(per_round, a.seed)
        out[f"{name}_per_round"] = per_round
    out.update({"attention_share_of_our_step": statistics.median(attention_share["ours"]),
                "attention_share_of_blocks_step": statistics.median(attention_share["blocks"]),
                "gather_ms_one_layer": gather, "gather_per_block_speedup": gather["per_token"] / gather["per_block"],
                "first_step_max_abs_logit_diff": diff, "first_step_greedy_agreement": agree})
    return out


PREFILL_CONTENDERS = ("one_call", "one_by_one", "hf")


def prefill_step(backbone, prompts: torch.Tensor, pad_limit: float) -> tuple[float, float]:
    """One step prefilling every row of prompts [C, M] as a new sequence, CHUNK_PAD_LIMIT = pad_limit ->
    (seconds, seconds in attention)."""
    model, kv = backbone.model, backbone.kv
    seqs = [StepSequence(f"prefill-{i}", 0, prompts.shape[1]) for i in range(prompts.shape[0])]
    kept, decoder.CHUNK_PAD_LIMIT = decoder.CHUNK_PAD_LIMIT, pad_limit
    try:
        for s in seqs:
            kv.allocate(s.seq_id, prompts.shape[1])
        with attention_timer(model) as attention:
            t0 = time.perf_counter()
            model.forward(prompts.reshape(-1), None, seqs, kv).argmax(-1).tolist()
            model.device.synchronize()
            return time.perf_counter() - t0, attention[0]
    finally:
        decoder.CHUNK_PAD_LIMIT = kept
        for s in seqs:
            if kv.has_sequence(s.seq_id):
                kv.free(s.seq_id)


def run_prefill(backbone, hf_model, shape: tuple[int, int], a) -> dict:
    c, m = shape
    g = torch.Generator().manual_seed(a.seed * 7919 + c * 1000 + m)
    seconds = {n: [] for n in PREFILL_CONTENDERS}
    attention = {n: [] for n in PREFILL_CONTENDERS[:2]}
    with torch.no_grad():
        for k in tqdm(range(a.rounds), desc=f"prefill {c}x{m}", unit="round", leave=False):
            prompts = torch.randint(0, backbone.spec.vocab_size, (c, m), generator=g)
            for name in PREFILL_CONTENDERS[k % 3:] + PREFILL_CONTENDERS[:k % 3]:
                if name == "hf":
                    t0 = time.perf_counter()
                    hf_model(input_ids=prompts, use_cache=True).logits[:, -1].argmax(-1).tolist()
                    seconds[name].append(time.perf_counter() - t0)
                else:
                    step, attn = prefill_step(backbone, prompts, decoder.CHUNK_PAD_LIMIT if name == "one_call" else 0.0)
                    seconds[name].append(step)
                    attention[name].append(attn)
    med = {n: statistics.median(v) for n, v in seconds.items()}
    return {"chunks": c, "tokens_per_chunk": m, "step_ms": {n: v * 1e3 for n, v in med.items()},
            "attention_ms": {n: statistics.median(v) * 1e3 for n, v in attention.items()},
            "rounds_s": seconds,
            "one_call_over_one_by_one_speed": statistics.median(
                [b / o for o, b in zip(seconds["one_call"], seconds["one_by_one"])]),
            "one_call_over_hf_speed": statistics.median([h / o for o, h in zip(seconds["one_call"], seconds["hf"])])}


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["contexts"]
    ctx = [r["context"] for r in rows]
    fig, (left, right, third) = plt.subplots(1, 3, figsize=(15, 4))
    for name, label in (("ours", "ours (paged cache + decode staging)"), ("blocks", "ours, reading the blocks"),
                        ("hf", "transformers (DynamicCache, SDPA)")):
        left.plot(ctx, [r["tokens_per_s"][name] for r in rows], marker="o", label=label)
    left.set_xscale("log", base=2)
    left.set_xticks(ctx, [str(c) for c in ctx])
    left.set_xlabel("context (tokens)")
    left.set_ylabel("decode tokens/s")
    left.set_title(f"{result['parameters']['batch']} rows, steady decode")
    left.legend()
    x = range(len(ctx))
    right.bar([i - 0.27 for i in x], [r["attention_share_of_our_step"] for r in rows], width=0.27,
              label="attention share of our step")
    right.bar(list(x), [r["attention_share_of_blocks_step"] for r in rows], width=0.27,
              label="the same, reading the blocks")
    right.bar([i + 0.27 for i in x], [r["gather_ms_one_layer"]["per_block"] / r["gather_ms_one_layer"]["per_token"]
                                      for r in rows], width=0.27, label="K/V read per block / per token (time)")
    right.set_xticks(list(x), [str(c) for c in ctx])
    right.set_xlabel("context (tokens)")
    right.set_ylim(0, 1)
    right.legend()
    pre = result["prefill"]
    x = range(len(pre))
    for i, (name, label) in enumerate((("one_call", "chunks in one call"), ("one_by_one", "each chunk alone"))):
        third.bar([j + (i - 0.5) * 0.4 for j in x], [r["attention_ms"][name] for r in pre], width=0.4, label=label)
    third.set_xticks(list(x), [f"{r['chunks']} x {r['tokens_per_chunk']}" for r in pre])
    third.set_xlabel("prefill step: new prompts x tokens")
    third.set_ylabel("attention ms in the step")
    third.set_title("our prefill attention")
    third.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    a = parse_args(argv)
    from transformers import AutoModelForCausalLM

    threads, device, backbone = load_default_decoder(a)
    bs = backbone.kv.block_size      # a cache that holds the longest context's rows over all rounds, or a prefill
    blocks = max([a.batch * -(-(max(a.contexts) + a.rounds * a.steps) // bs)]
                 + [c * -(-m // bs) for c, m in a.prefill_shapes])
    backbone.kv = backbone.model.new_cache(KVCacheConfig(block_size=bs, num_blocks=blocks))
    spec = backbone.spec                 # staging for the longest context's rows (what --decoder-staging-mb sizes)
    staging = 2 * spec.num_layers * a.batch * spec.num_kv_heads * spec.head_dim * device.dtype.itemsize * (
        max(a.contexts) + a.rounds * a.steps + 256)
    caches = {"ours": backbone.model.new_cache(KVCacheConfig(block_size=bs, num_blocks=a.batch * -(-(
        max(a.contexts) + a.rounds * a.steps) // bs), staging_bytes=staging)), "blocks": backbone.kv}
    hf_model = AutoModelForCausalLM.from_pretrained(str(backbone.path), dtype=device.dtype,
                                                    attn_implementation="sdpa").to(device.device).eval()
    started = time.perf_counter()
    rows = [in_step_thread(run_context, backbone, caches, hf_model, ctx, a) for ctx in a.contexts]
    prefill = [in_step_thread(run_prefill, backbone, hf_model, shape, a) for shape in a.prefill_shapes]
    result = {
        "benchmark": "paged_attention", "model": backbone.name, "device": device.describe(), "torch_threads": threads,
        "machine": machine(),
        "date": utc_now(), "git": git_state(),
        "load_average_after": load_average(), "parameters": {k: str(v) if isinstance(v, Path) else v
                                                              for k, v in vars(a).items()},
        "kv_cache_bytes": backbone.kv.total_bytes(), "staging_budget_bytes": staging, "block_size": bs,
        "contexts": rows, "prefill": prefill,
        "chunk_pad_limit": decoder.CHUNK_PAD_LIMIT,
        "timed_s": time.perf_counter() - started,
    }
    a.json.write_text(json.dumps(result, indent=2))
    plot(result, a.json.with_suffix(".png"))
    for r in rows:
        lo, hi = r["ours_over_hf_ci95"]
        tqdm.write(f"context {r['context']:5d}: ours {r['tokens_per_s']['ours']:.1f} tokens/s, blocks "
                   f"{r['tokens_per_s']['blocks']:.1f}, hf {r['tokens_per_s']['hf']:.1f}: ours {r['ours_over_hf']:.2f}x "
                   f"hf (95% CI {lo:.2f}-{hi:.2f}), blocks {r['blocks_over_hf']:.2f}x; attention "
                   f"{r['attention_share_of_our_step']:.0%} of our step ({r['attention_share_of_blocks_step']:.0%} "
                   f"without staging); K/V read per block "
                   f"{r['gather_per_block_speedup']:.1f}x faster than per token; first-step logits differ by "
                   f"{r['first_step_max_abs_logit_diff']:.2e}, greedy agreement {r['first_step_greedy_agreement']:.2f}")
    for r in prefill:
        tqdm.write(f"prefill {r['chunks']:3d} x {r['tokens_per_chunk']:4d}: step ms one call "
                   f"{r['step_ms']['one_call']:.0f}, one by one {r['step_ms']['one_by_one']:.0f}, transformers "
                   f"{r['step_ms']['hf']:.0f}; attention ms {r['attention_ms']['one_call']:.0f} vs "
                   f"{r['attention_ms']['one_by_one']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
