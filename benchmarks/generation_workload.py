"""Helpers of benchmarks/generation.py: the workload (prompts from real sentences, Poisson arrivals,
exponential output lengths, Zipf tenants), random decoder LoRA adapters, one run of the generation
engine, Hugging Face + PEFT static-batch generate, and steady-state decode timing."""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import random
import statistics
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from scheduler.generation_engine import GenerationEngine, GenerationEngineConfig
from scheduler.generation_policy import GenerationSchedulerConfig
from scheduler.generation_runner import GenerationRunner
from scheduler.types import Request
from vbert.adapters import LoraAdapter, LoraWeights
from vbert.decoder import StepSequence
from vbert.decoder_lora import DECODER_LORA_TARGETS
from vbert.device import enter_step_thread
from vbert.sampling import SamplingParams

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
SETS = ("sci-cite", "rct-20k", "chemprot")


# -- command line ------------------------------------------------------------------------------------
def add_engine_args(p) -> None:
    """The decoder and engine flags the generation benchmarks share (argparse parser `p`)."""
    p.add_argument("--model", default=None, help="a local HF Llama-family checkpoint (default SmolLM2-135M-Instruct)")
    p.add_argument("--cache-dir", default="./var/models")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-running", type=int, default=16)
    p.add_argument("--max-tokens-per-step", type=int, default=256)
    p.add_argument("--kv-cache-mb", type=int, default=256)
    p.add_argument("--lora-rank", type=int, default=8)


def add_sized_args(p, full: dict, quick: dict) -> None:
    """Flags whose default depends on --quick: `full` and `quick` map each name to its two defaults."""
    for k, v in full.items():
        p.add_argument("--" + k.replace("_", "-"), type=type(v), default=None, help=f"default {v} (--quick: {quick[k]})")


def fill_sized_args(a, full: dict, quick: dict) -> None:
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)


# -- workload ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    index: int
    tenant: int                 # 0..num_tenants-1; its adapter id is tenant + 1
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    gap: float                  # inter-arrival time at rate 1/s (unit exponential): arrival at rate r = cumsum / r


def load_sentences(data_dir: Path = DATA_DIR) -> list[str]:
    """The "text" fields of the classification sets' train splits, read in place (never copied)."""
    out = []
    for name in SETS:
        path = data_dir / "cls" / name / "train.txt"
        if not path.is_file():
            raise SystemExit(f"missing {path}: the benchmark reads ../shared/data (see its README)")
        with path.open() as f:
            out += [t.strip() for t in (json.loads(line).get("text", "") for line in f if line.strip()) if t.strip()]
    return out


def zipf_weights(n: int, s: float, rng: random.Random) -> list[float]:
    """Popularity 1/rank^s over a random order of the tenants, normalized."""
    ranks = list(range(1, n + 1))
    rng.shuffle(ranks)
    w = [1.0 / r ** s for r in ranks]
    return [x / sum(w) for x in w]


def make_workload(tokenizer, num: int, num_tenants: int, seed: int, zipf_s: float = 1.1, min_prompt: int = 20,
                  max_prompt: int = 80, mean_output: float = 40.0, max_output: int = 128,
                  data_dir: Path = DATA_DIR) -> list[Item]:
    """num requests: 1-3 real sentences (min_prompt..max_prompt tokens; longer ones cut to their first
    max_prompt tokens), output length ~ exponential(mean_output) rounded, in [1, max_output]."""
    rng = random.Random(seed)
    sentences = load_sentences(data_dir)
    probs = zipf_weights(num_tenants, zipf_s, rng)
    items = []
    while len(items) < num:
        text = " ".join(rng.choice(sentences) for _ in range(rng.randint(1, 3)))
        ids = tokenizer(text)["input_ids"]
        if len(ids) < min_prompt:
            continue
        n = min(max_output, max(1, round(rng.expovariate(1.0 / mean_output))))
        tenant = rng.choices(range(num_tenants), probs)[0]
        items.append(Item(len(items), tenant, tuple(ids[:max_prompt]), n, rng.expovariate(1.0)))
    return items


def random_lora(spec, rank: int, seed: int, b_std: float = 0.02) -> LoraAdapter:
    """LoRA on every decoder target of every layer: A ~ N(0, 1/in), B ~ N(0, b_std^2), alpha = 2 rank."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for layer in range(spec.num_layers):
        for t in DECODER_LORA_TARGETS:
            fin, fout = spec.target_dims(t)
            modules[(layer, t)] = LoraWeights(torch.randn(rank, fin, generator=g) / math.sqrt(fin),
                                              torch.randn(fout, rank, generator=g) * b_std, 2.0)
    return LoraAdapter(rank=rank, alpha=2.0 * rank, modules=modules)


class PreloadedAdapters:
    """Every adapter loaded into the pool up front (adapter_residency "preloaded"): the runner's view of
    an adapter cache where prefetch is a done Future and release does nothing."""

    def __init__(self, pool, slots: dict[int, int]):
        self.pool, self.slots = pool, slots

    def resolve(self, ids):
        return [self.slots[i] for i in ids]

    def prefetch(self, ids) -> Future:
        fut: Future = Future()
        fut.set_result([self.slots[i] for i in ids])
        return fut

    def release(self, ids) -> None:
        pass


def tiered_adapters(pool, loras: dict[int, LoraAdapter]) -> tuple[object, dict[int, int]]:
    """The manager's TieredCache over the decoder LoRA pool, its loader returning each tenant's artifact
    (a generate head); every adapter made resident once before timing (slots = tenants: none is evicted).
    Returns (cache, adapter id -> slot)."""
    from manager.cache import CacheConfig, TieredCache
    from vbert import AdapterArtifact, Head, HeadKind, HeadSpec

    artifacts = {aid: AdapterArtifact(lora, Head(HeadSpec(HeadKind.GENERATE))) for aid, lora in loras.items()}
    cache = TieredCache(CacheConfig(), pool, artifacts.__getitem__)
    ids = sorted(artifacts)
    cache.prefetch(ids).result(600)
    slots = dict(zip(ids, cache.resolve(ids)))
    cache.release(ids)
    return cache, slots


def in_step_thread(fn, *args):
    """fn(*args) on a fresh thread that takes the CPU threads reserved for steps, as the engine's step
    thread does (vbert.device.enter_step_thread): HF and steady-state decode timings run under the same
    OpenMP conditions as the engine, and the thread's pool goes away with it."""
    out: dict = {}

    def target():
        enter_step_thread()
        try:
            out["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            out["error"] = e

    t = threading.Thread(target=target, name="bench-step")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


# -- statistics -----------------------------------------------------------------------------------
def pct(values, q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def summarize(results: list, arrivals: list[float], mode: str, rate: float | None, stats: dict,
              rows: list[int]) -> dict:
    """arrivals: seconds from the run's start; the run ends with the last completion."""
    n_out = [len(r.token_ids) for r in results]
    e2e = [r.total_s for r in results]
    norm = [r.total_s / max(1, n) for r, n in zip(results, n_out)]
    ttft = [r.time_to_first_token_s for r in results]
    tpot = [r.time_per_output_token_s for r, n in zip(results, n_out) if n > 1]
    wall = max(r.total_s + a for r, a in zip(results, arrivals))
    out = {"mode": mode, "rate": rate, "num_requests": len(results), "generated_tokens": sum(n_out),
           "seconds": wall, "throughput_tokens_per_s": sum(n_out) / wall, "throughput_rps": len(results) / wall}
    for name, vals in (("e2e_s", e2e), ("normalized_s_per_token", norm), ("ttft_s", ttft), ("tpot_s", tpot)):
        out[f"{name}_p50"], out[f"{name}_p99"] = pct(vals, 50), pct(vals, 99)
    out["normalized_s_per_token_mean"] = statistics.fmean(norm)
    out["preemptions"] = sum(r.num_preemptions for r in results)
    out["prompt_tokens"] = sum(r.num_prompt_tokens for r in results)
    out["cached_prompt_tokens"] = sum(r.num_cached_tokens for r in results)
    out["prefill_tokens_computed"] = stats.get("num_prefill_tokens", 0)
    out["scheduler_num_preempted"] = stats.get("num_preempted", 0)
    out["steps"], out["mean_rows_per_step"] = len(rows), (statistics.fmean(rows) if rows else 0.0)
    return out


# -- our engine -------------------------------------------------------------------------------------
def run_engine(backbone, adapters, items: list[Item], mode: str, max_running: int, max_tokens_per_step: int,
               rate: float | None, desc: str = "", use_adapters: bool = True,
               prefix_caching: bool = True, cold: bool = True) -> tuple[dict, list]:
    """Submit items (Poisson arrivals at `rate`/s scaled from their unit gaps; None = all at t=0) to a fresh
    engine on a cold prefix cache (cold=False: keeping the blocks earlier runs registered); latency counts from
    the scheduled arrival. Returns (summary, results in item order)."""
    rows: list[int] = []
    if cold:
        backbone.kv.clear_prefix_cache()           # no blocks registered by an earlier run
    engine = GenerationEngine(
        GenerationEngineConfig(),
        GenerationSchedulerConfig(max_tokens_per_step=max_tokens_per_step, max_running=max_running, mode=mode,
                                  prefix_caching=prefix_caching),
        GenerationRunner(backbone.model, backbone.kv, adapters), backbone.tokenizer, backbone.eos_token_ids,
        adapters=adapters, residency=None, on_step=lambda batch, out: rows.append(batch.num_rows)).start()
    streams, arrivals = [], []
    bar = tqdm(total=len(items), desc=desc or f"{mode} rate={rate}", unit="req", leave=False)
    try:
        t0 = time.monotonic()
        offset = 0.0
        for it in items:
            if rate is not None:
                offset += it.gap / rate
                delay = t0 + offset - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            arrival = t0 + offset
            req = Request(tenant_id=it.tenant, adapter_id=(it.tenant + 1) if use_adapters else None,
                          deadline=arrival + 3600, prompt_ids=list(it.prompt_ids),
                          max_new_tokens=it.max_new_tokens, arrival=arrival)
            streams.append(engine.submit(req, SamplingParams(temperature=0, max_new_tokens=it.max_new_tokens),
                                         ignore_eos=True))
            arrivals.append(arrival)
        results = []
        for s in streams:
            results.append(s.final())
            bar.update(1)
        stats = engine.scheduler.stats()
    finally:
        bar.close()
        engine.stop(drain=False, timeout=10)
    return summarize(results, [a - t0 for a in arrivals], mode, rate, stats, rows), results


# -- Hugging Face + PEFT --------------------------------------------------------------------------------
def load_hf(path: Path, adapters: dict[int, LoraAdapter], device, workdir: Path) -> tuple[object, float]:
    """transformers model + PEFT holding every adapter (named t<adapter id>, each written as a PEFT dir and
    loaded with load_adapter). Returns (model, seconds to load the adapters)."""
    import peft
    import transformers
    from vbert.decoder_lora import write_peft_causal_lm

    base = transformers.AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=device.dtype)
    base = base.to(device.device).eval()
    t = time.perf_counter()
    model = None
    for aid, adapter in tqdm(sorted(adapters.items()), desc="PEFT load_adapter", unit="adapter", leave=False):
        d = write_peft_causal_lm(adapter, workdir / f"t{aid}")
        if model is None:
            model = peft.PeftModel.from_pretrained(base, str(d), adapter_name=f"t{aid}")
        else:
            model.load_adapter(str(d), adapter_name=f"t{aid}")
    model = model.to(device.device).eval()
    return model, time.perf_counter() - t


def hf_generate(model, items: list[Item], batch_size: int, pad_id: int, device) -> tuple[dict, list[list[int]]]:
    """Static batches in item order: left padding, greedy, min = max new tokens = the batch's longest, each
    row with its own adapter (adapter_names). Counts only each request's own tokens."""
    outputs, own, t0 = [], 0, time.perf_counter()
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    for batch in tqdm(batches, desc="HF generate", unit="batch", leave=False):
        width, n = max(len(it.prompt_ids) for it in batch), max(it.max_new_tokens for it in batch)
        ids = torch.tensor([[pad_id] * (width - len(it.prompt_ids)) + list(it.prompt_ids) for it in batch])
        mask = torch.tensor([[0] * (width - len(it.prompt_ids)) + [1] * len(it.prompt_ids) for it in batch])
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device.device), attention_mask=mask.to(device.device),
                                 adapter_names=[f"t{it.tenant + 1}" for it in batch], do_sample=False,
                                 max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=pad_id)
        for row, it in zip(out[:, width:].tolist(), batch):
            outputs.append(row[:it.max_new_tokens])
            own += it.max_new_tokens
    seconds = time.perf_counter() - t0
    return {"num_requests": len(items), "generated_tokens": own, "seconds": seconds,
            "throughput_tokens_per_s": own / seconds, "num_batches": len(batches)}, outputs


# -- steady-state decode: LoRA rows vs the bare backbone ---------------------------------------------
def decode_rate(backbone, slots: list[int], batch: int, prompt_len: int, steps: int, step0: int) -> float:
    """Decode tokens/s of `steps` steps of `batch` rows (prefill untimed), row i at step t using adapter
    slot slots[(step0 + t) * batch + i mod len] (an empty `slots` = no adapter)."""
    model, kv, lora = backbone.model, backbone.kv, backbone.lora
    dev = model.device
    seq_ids = [f"decode-{i}" for i in range(batch)]
    slot_of = (lambda t, i: slots[((step0 + t) * batch + i) % len(slots)]) if slots else (lambda t, i: 0)
    g = torch.Generator().manual_seed(step0)
    try:
        for s in seq_ids:
            kv.allocate(s, prompt_len + steps)
        with torch.no_grad():
            ids = torch.randint(0, model.spec.vocab_size, (batch * prompt_len,), generator=g)
            model.forward(ids, None, [StepSequence(s, 0, prompt_len, slot_of(0, i)) for i, s in enumerate(seq_ids)],
                          kv, lora)
            dev.synchronize()
            t0 = time.perf_counter()
            for t in range(steps):
                ids = torch.randint(0, model.spec.vocab_size, (batch,), generator=g)
                seqs = [StepSequence(s, prompt_len + t, 1, slot_of(t, i)) for i, s in enumerate(seq_ids)]
                model.forward(ids, None, seqs, kv, lora).argmax(-1).tolist()
            dev.synchronize()
            return batch * steps / (time.perf_counter() - t0)
    finally:
        for s in seq_ids:
            if kv.has_sequence(s):
                kv.free(s)


def lora_over_base(backbone, slots: list[int], batch: int, prompt_len: int, steps: int, rounds: int) -> dict:
    """Interleaved rounds (order alternating); the ratio of medians and the median of per-round ratios."""
    lora_r, base_r = [], []
    for k in tqdm(range(rounds), desc="decode lora/base", unit="round", leave=False):
        order = [("lora", slots), ("base", [])] if k % 2 == 0 else [("base", []), ("lora", slots)]
        for name, s in order:
            (lora_r if name == "lora" else base_r).append(decode_rate(backbone, s, batch, prompt_len, steps, k * steps))
    return {"lora_tokens_per_s": statistics.median(lora_r), "base_tokens_per_s": statistics.median(base_r),
            "ratio_of_medians": statistics.median(lora_r) / statistics.median(base_r),
            "median_of_round_ratios": statistics.median(a / b for a, b in zip(lora_r, base_r)),
            "rounds_lora": lora_r, "rounds_base": base_r, "batch": batch, "prompt_tokens": prompt_len,
            "steps_per_round": steps, "distinct_adapters_cycled": len(set(slots))}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def load_default_decoder(a, num_lora_slots: int = 1):
    """A decoder benchmark's start, as vbert serve starts: the CPU threads reserved for steps (a.threads), the kept
    host heap, the output folder of a.json, the device, the backbone (a.model, or the default SmolLM2 cached under
    a.cache_dir). Returns (torch threads, device, backbone)."""
    from vbert.config import HOST_HEAP_KEEP_MB
    from vbert.decoder_backbone import DecoderBackbone, DecoderBackboneConfig
    from vbert.device import DeviceContext, keep_host_heap, reserve_cpu_for_steps

    threads = reserve_cpu_for_steps(a.threads)
    keep_host_heap(HOST_HEAP_KEEP_MB)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    device = DeviceContext.create("auto", "auto")
    backbone = DecoderBackbone.load(DecoderBackboneConfig(path=a.model, cache_dir=a.cache_dir,
                                                          num_lora_slots=num_lora_slots), device)
    return threads, device, backbone


def machine() -> dict:
    """What a recorded run ran on (the results' "machine")."""
    return {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__}


def utc_now() -> str:
    """The results' "date": now, UTC, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

