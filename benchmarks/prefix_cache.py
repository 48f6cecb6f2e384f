#!/usr/bin/env python
"""Prefix caching in generation: the same requests with the prefix cache on and off, side by side.

    .venv/bin/python benchmarks/prefix_cache.py --json benchmarks/results/cpu-DATE/prefix_cache/prefix_cache.json
    .venv/bin/python benchmarks/prefix_cache.py --quick --json /tmp/prefix.json      # tiny random decoder, < 1 min

Workload (fixed by --seed): --tenants tenants, each with its own random LoRA adapter (rank --lora-rank on
every projection) and its own system prompt of about --system-tokens tokens (an instruction and labelled
examples made of real sentences from ../shared/data, read in place); --num-requests chat requests through
the model's chat template: one real sentence as the user message under its tenant's system prompt, tenants
drawn uniformly, --max-new-tokens tokens each (greedy, EOS ignored). Scenarios:

- offline: every request at t = 0 (requests/s, prompt tokens computed);
- open loop: Poisson arrivals at --rate-fraction x the cache-off contender's offline requests/s of the
  same round (time to first token and end-to-end latency, p50 / p99);
- control: the generation benchmark's prompts (1-3 real sentences, nothing shared beyond chance), offline:
  what looking up and registering blocks costs when nothing is reused.
- chat: every conversation's first turn (offline, cold cache), then its second turn: the first turn, the
  model's answer and a follow-up question ("And this one? " and a short real sentence) through the chat
  template, all at t = 0 on the cache the first turns left: what a conversation's history saves.

Every scenario runs both contenders in each of --rounds rounds (the control, which is short and whose ratio is
small, --control-rounds), the order alternating, each run on a fresh engine over a cold cache
(vbert.kv_cache.PagedKVCache.clear_prefix_cache). Ratios are cache-on over cache-off per round, reported as
their median; the wall time the KV cache's prefix calls (match_prefix, commit) took inside each run is timed
too (prefix_bookkeeping_share: of the run's seconds); "same tokens" is the share of requests whose greedy tokens
are identical with and without the cache (the cached K/V were computed in other steps' batches, so a
near-tie can in principle round the other way). Writes the JSON (after every scenario) and a PNG beside it.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from tqdm import tqdm  # noqa: E402

from generation import git_state  # noqa: E402
from generation_workload import (Item, add_engine_args, add_sized_args, fill_sized_args, load_average,  # noqa: E402
                                 load_sentences, machine, make_workload, random_lora, run_engine, tiered_adapters,
                                 utc_now)
from vbert.decoder_backbone import DecoderBackbone, DecoderBackboneConfig  # noqa: E402
from vbert.device import DeviceContext, reserve_cpu_for_steps  # noqa: E402

LABELS = ("background", "method", "result")
FULL = dict(num_requests=48, tenants=4, system_tokens=256, max_new_tokens=16, rounds=2, control_rounds=6,
            rate_fraction=0.7)
QUICK = dict(num_requests=16, tenants=2, system_tokens=60, max_new_tokens=4, rounds=1, control_rounds=1,
             rate_fraction=0.7)
SCENARIOS = ("offline", "open_loop", "control", "chat")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True)
    p.add_argument("--quick", action="store_true", help="a tiny random decoder, few requests")
    add_engine_args(p)
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated, of " + ", ".join(SCENARIOS)
                   + " (open_loop needs offline: its rate)")
    add_sized_args(p, FULL, QUICK)
    a = p.parse_args(argv)
    fill_sized_args(a, FULL, QUICK)
    a.scenarios = [x.strip() for x in a.scenarios.split(",") if x.strip()]
    if set(a.scenarios) - set(SCENARIOS) or ("open_loop" in a.scenarios and "offline" not in a.scenarios):
        p.error(f"--scenarios: names from {SCENARIOS}; open_loop needs offline")
    return a


class BookkeepingTimer:
    """Wall time of the KV cache's prefix calls (match_prefix at admission, commit after a step) during a
    run: what the cache costs the step loop itself, measured without the noise of whole runs."""

    def __init__(self, kv):
        self.kv, self.seconds, self.calls = kv, 0.0, 0

    def __enter__(self):
        for name in ("match_prefix", "commit"):
            setattr(self.kv, name, self._timed(getattr(type(self.kv), name).__get__(self.kv)))
        return self

    def _timed(self, fn):
        def call(*args):
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1
        return call

    def __exit__(self, *exc):
        for name in ("match_prefix", "commit"):
            delattr(self.kv, name)


def system_prompt(sentences: list[str], tokenizer, tokens: int, rng: random.Random) -> str:
    """An instruction and labelled examples (real sentences, labels drawn at random) of about `tokens` tokens."""
    text = ("You label the intent of citation sentences from scientific papers as background, method or result. "
            "Answer with the label only.\n\nExamples:\n")
    while len(tokenizer(text)["input_ids"]) < tokens:
        text += f"Sentence: {rng.choice(sentences)}\nLabel: {rng.choice(LABELS)}\n"
    return text


def shared_prefix_workload(backbone, num: int, tenants: int, system_tokens: int, max_new: int,
                           seed: int) -> tuple[list[Item], list[int], list[list[tuple[str, str]]]]:
    """(items, each tenant's system prompt length in tokens, each item's chat so far and its follow-up question)."""
    rng, follow_rng = random.Random(seed), random.Random(seed + 1)   # follow-ups do not change the first turns
    sentences = [s for s in load_sentences() if 40 <= len(s) <= 400]
    short = [s for s in sentences if len(s) <= 120]
    context = backbone.spec.max_position_embeddings
    examples = sentences if context >= 2048 else short      # a small test model: short examples and questions
    systems = [system_prompt(examples, backbone.tokenizer, system_tokens, rng) for _ in range(tenants)]
    items, chats = [], []
    limit = context - max_new
    for attempt in range(100 * num):
        if len(items) == num:
            break
        tenant = rng.randrange(tenants)
        chat = [("system", systems[tenant]), ("user", rng.choice(examples)),
                ("user", "And this one? " + follow_rng.choice(short))]
        ids = backbone.tokenize_prompt(backbone.render_chat(chat[:2]), 1 << 20, False, is_chat=True)
        follow = backbone.tokenize_prompt(backbone.render_chat(chat), 1 << 20, False, is_chat=True)
        if len(ids) <= limit and len(follow) + 2 * max_new + 16 <= limit:   # the answer, its template: a small model draws again
            items.append(Item(len(items), tenant, tuple(ids), max_new, rng.expovariate(1.0)))
            chats.append(chat)
    else:
        raise SystemExit(f"only {len(items)} of {num} conversations fit the model's context of {context} tokens: "
                         f"lower --system-tokens or --max-new-tokens")
    system_ids = [len(backbone.tokenize_prompt(backbone.render_chat([("system", s), ("user", "x")]), 4096, False,
                                               is_chat=True)) for s in systems]
    return items, system_ids, chats


def second_turns(backbone, items: list[Item], chats, answers: list[tuple[int, ...]]) -> list[Item]:
    """Each conversation's next request: the first turn, the model's answer to it, then the follow-up question."""
    out = []
    for it, chat, answer in zip(items, chats, answers):
        text = backbone.tokenizer.decode(list(answer), skip_special_tokens=True)
        msgs = chat[:2] + [("assistant", text), chat[2]]
        ids = backbone.tokenize_prompt(backbone.render_chat(msgs), 1 << 20, False, is_chat=True)
        out.append(Item(it.index, it.tenant, tuple(ids), it.max_new_tokens, it.gap))
    return out


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def write_plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sc = result["scenarios"]
    panels = [("offline", "throughput_rps", "requests / s (offline)"),
              ("open_loop", "ttft_s_p50", "open loop: time to first token p50 (s)"),
              ("open_loop", "ttft_s_p99", "open loop: time to first token p99 (s)"),
              ("control", "throughput_rps", "requests / s, nothing shared")]
    panels = [x for x in panels if x[0] in sc]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.8))
    for ax, (name, key, label) in zip(axes if len(panels) > 1 else [axes], panels):
        runs = sc[name]["runs"]
        for x, contender, color in ((0, "off", "tab:gray"), (1, "on", "tab:blue")):
            vals = [r[contender][key] for r in runs]
            ax.bar(x, statistics.median(vals), color=color, alpha=0.8)
            ax.plot([x] * len(vals), vals, "k.", ms=4)
        ax.set_xticks([0, 1], ["cache off", "cache on"])
        ax.set_title(label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"prefix caching, {result['model']} on {result['device']}: {result['workload']['tenants']} tenants, "
                 f"system prompts of ~{result['workload']['system_prompt_tokens_mean']:.0f} tokens", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    a = parse_args(argv)
    threads = reserve_cpu_for_steps(a.threads)
    out_path = Path(a.json)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    device = DeviceContext.create("auto", "auto")
    tmp = tempfile.TemporaryDirectory(prefix="prefix-bench-")
    model_path = a.model
    if a.quick and model_path is None:
        from tests.decoder_models import write_tiny_decoder_checkpoint
        model_path = str(write_tiny_decoder_checkpoint(Path(tmp.name) / "tiny-decoder", seed=a.seed, max_positions=1024))
    backbone = DecoderBackbone.load(DecoderBackboneConfig(path=model_path, cache_dir=a.cache_dir,
                                                          kv_cache_bytes=a.kv_cache_mb * 1024 ** 2, block_size=16,
                                                          num_lora_slots=a.tenants, max_lora_rank=a.lora_rank), device)
    items, system_lens, chats = shared_prefix_workload(backbone, a.num_requests, a.tenants, a.system_tokens,
                                                       a.max_new_tokens, a.seed)
    control = make_workload(backbone.tokenizer, a.num_requests, a.tenants, a.seed, mean_output=a.max_new_tokens,
                            max_output=a.max_new_tokens)
    control = [Item(it.index, it.tenant, it.prompt_ids, a.max_new_tokens, it.gap) for it in control]
    loras = {t + 1: random_lora(backbone.spec, a.lora_rank, a.seed * 100_003 + t) for t in range(a.tenants)}
    adapters, _ = tiered_adapters(backbone.lora, loras)
    result = {
        "benchmark": "prefix_cache", "partial": True, "model": backbone.name, "device": device.describe(),
        "dtype": device.dtype_name, "torch_threads": threads, "kv_cache_blocks": backbone.kv.num_blocks,
        "block_size": backbone.kv.block_size,
        "machine": machine(),
        "date": utc_now(), "git": git_state(),
        "parameters": vars(a), "load_average_start": load_average(),
        "workload": {"tenants": a.tenants, "num_requests": len(items),
                     "system_prompt_tokens_mean": statistics.fmean(system_lens),
                     "prompt_tokens_mean": statistics.fmean(len(i.prompt_ids) for i in items),
                     "control_prompt_tokens_mean": statistics.fmean(len(i.prompt_ids) for i in control),
                     "max_new_tokens": a.max_new_tokens},
        "scenarios": {},
    }

    def save() -> None:
        out_path.write_text(json.dumps(result, indent=2, default=str))

    def run(its, rate, caching, desc, cold=True):
        with BookkeepingTimer(backbone.kv) as timer:
            summary, results = run_engine(backbone, adapters, its, "iteration", a.max_running, a.max_tokens_per_step,
                                          rate, desc, prefix_caching=caching, cold=cold)
        summary.update(prefix_bookkeeping_s=timer.seconds, prefix_bookkeeping_calls=timer.calls,
                       prefix_bookkeeping_share=timer.seconds / summary["seconds"])
        return summary, results

    def chat_turns(caching, desc):
        """The first turns (all at t = 0, cold cache), then every conversation's second turn (all at t = 0, the
        cache as the first turns left it): the second turn's summary, with the first's under "turn1"."""
        first, answers = run(items, None, caching, desc + " turn 1")
        second, results = run(second_turns(backbone, items, chats, [r.token_ids for r in answers]), None, caching,
                              desc + " turn 2", cold=False)
        second["turn1"] = first
        return second, results

    run(items[:2], None, True, "warm-up")
    offline_off: list[float] = []
    for name, its in (("offline", items), ("open_loop", items), ("control", control), ("chat", items)):
        if name not in a.scenarios:
            continue
        runs = []
        for rnd in range(a.control_rounds if name == "control" else a.rounds):
            order = (False, True) if rnd % 2 == 0 else (True, False)
            rate = None
            if name == "open_loop":
                rate = a.rate_fraction * offline_off[rnd % len(offline_off)]
            got, tokens = {}, {}
            for caching in order:
                key = "on" if caching else "off"
                desc = f"{name} round {rnd + 1} cache {key}"
                summary, results = chat_turns(caching, desc) if name == "chat" else run(its, rate, caching, desc)
                got[key], tokens[key] = summary, [r.token_ids for r in results]
            if name == "offline":
                offline_off.append(got["off"]["throughput_rps"])
            same = sum(x == y for x, y in zip(tokens["on"], tokens["off"])) / len(its)
            runs.append({"round": rnd, "order": ["on" if c else "off" for c in order], "rate": rate,
                         "same_tokens_share": same, **got})
            tqdm.write(f"{name} round {rnd + 1}: req/s off {got['off']['throughput_rps']:.2f} on "
                       f"{got['on']['throughput_rps']:.2f}; TTFT p50 off {got['off']['ttft_s_p50']:.2f} s on "
                       f"{got['on']['ttft_s_p50']:.2f} s; cached {got['on']['cached_prompt_tokens']} of "
                       f"{got['on']['prompt_tokens']} prompt tokens; same tokens {same:.3f}")
        ratio = lambda key: median(r["on"][key] / r["off"][key] for r in runs if r["off"][key])  # noqa: E731
        result["scenarios"][name] = {
            "runs": runs,
            "throughput_on_over_off": ratio("throughput_rps"),
            "ttft_p50_on_over_off": ratio("ttft_s_p50"), "ttft_p99_on_over_off": ratio("ttft_s_p99"),
            "e2e_p50_on_over_off": ratio("e2e_s_p50"), "e2e_p99_on_over_off": ratio("e2e_s_p99"),
            "cached_share_of_prompt_tokens": median(r["on"]["cached_prompt_tokens"] / r["on"]["prompt_tokens"]
                                                    for r in runs),
            "prefill_tokens_on_over_off": ratio("prefill_tokens_computed"),
            "same_tokens_share": min(r["same_tokens_share"] for r in runs),
            "prefix_bookkeeping_share_on": median(r["on"]["prefix_bookkeeping_share"] for r in runs)}
        save()
    result["partial"] = False
    result["load_average_end"] = load_average()
    save()
    write_plot(result, out_path.with_suffix(".png"))
    for name, sc in result["scenarios"].items():
        tqdm.write(f"{name}: throughput on/off {sc['throughput_on_over_off']:.2f}, TTFT p50 on/off "
                   f"{sc['ttft_p50_on_over_off']:.2f}, p99 {sc['ttft_p99_on_over_off']:.2f}, cached share "
                   f"{sc['cached_share_of_prompt_tokens']:.2f}, bookkeeping {sc['prefix_bookkeeping_share_on']:.2e} of "
                   f"the run")
    print(f"wrote {out_path} and {out_path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
