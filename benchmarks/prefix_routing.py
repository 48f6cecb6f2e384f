#!/usr/bin/env python
"""Prefix-aware routing of the decoder replicas against Ray's default choice, side by side in one run.

    .venv/bin/python benchmarks/prefix_routing.py --json benchmarks/results/cpu-DATE/prefix_routing/prefix_routing.json

Each configuration is a real decoder-only server (dispatcher.server.Server on 127.0.0.1, port 0, the default decoder
SmolLM2-135M-Instruct) with --replicas decoder replicas on a local Ray cluster (one compute thread each, the default
256 MiB KV cache each), differing only in `decoder_routing`:

- prefix (the default): a prompt goes to the replica that was sent its longest block-aligned prefix, within
  `decoder_routing_slack` requests in flight of the least loaded replica (dispatcher/prefix_router.py);
- adapter: Ray's multiplexed routing, what the decoder replicas did before; for the bare model every replica is a
  candidate and Ray takes the less loaded of two at random.

The load (fixed by --seed): --tenants tenants, each with its own system prompt of about --system-tokens tokens (an
instruction and labelled examples made of real sci-cite sentences, read in place from ../shared/data), chatting with
the bare model over the OpenAI-compatible API from a child process: --concurrency conversations in flight (closed
loop), each two turns (a real sentence; then the first turn, the model's answer and a follow-up question), greedy,
--new-tokens tokens per answer (EOS ignored), streamed. Tenants are drawn uniformly. Measured for --seconds after
--warmup conversations; the configurations run in turn, --rounds times, the order alternating.

Reported per configuration and round: requests/s, the share of prompt tokens the replicas took from their prefix
caches (all requests; first and second turns apart), time to first token p50 / p99, end-to-end p50 / p99, requests
per replica; ratios prefix / adapter (the median over rounds). The client targets loopback only and stops by itself.
Writes the JSON (after every run) and a PNG beside it.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

ROUTINGS = ("prefix", "adapter")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, help="where to write the results (a PNG goes next to it)")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--tenants", type=int, default=24)
    p.add_argument("--system-tokens", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=8, help="conversations in flight (closed loop)")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--seconds", type=float, default=300.0, help="measured seconds per configuration and round")
    p.add_argument("--warmup", type=int, default=24, help="untimed conversations per run first")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decoder", default=None, help="decoder checkpoint directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--client", default=None, help=argparse.SUPPRESS)   # URL: run as the load client
    p.add_argument("--workload", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- the client (a child process) -------------------------------------------------------------------------
async def client_main(a) -> dict:
    import openai

    work = json.loads(Path(a.workload).read_text())
    keys, systems, questions, follow = work["keys"], work["systems"], work["questions"], work["follow_ups"]
    clients = [openai.AsyncOpenAI(base_url=a.client, api_key=k, max_retries=0, timeout=600) for k in keys]
    rng = random.Random(a.seed)
    records: list[dict] = []

    async def turn(tenant: int, messages: list, measured: bool, number: int) -> str:
        t0, first, text, usage = time.perf_counter(), None, [], None
        out = await clients[tenant].chat.completions.create(
            model="default", messages=messages, max_tokens=a.new_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in out:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                text.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                usage = chunk.usage
        if measured:
            details = usage.prompt_tokens_details
            records.append({"turn": number, "ttft": (first or time.perf_counter()) - t0,
                            "total": time.perf_counter() - t0, "prompt": usage.prompt_tokens,
                            "cached": details.cached_tokens if details else 0})
        return "".join(text)

    async def conversation(measured: bool) -> None:
        tenant = rng.randrange(len(keys))
        msgs = [{"role": "system", "content": systems[tenant]}, {"role": "user", "content": rng.choice(questions)}]
        answer = await turn(tenant, msgs, measured, 1)
        msgs += [{"role": "assistant", "content": answer},
                 {"role": "user", "content": "And this one? " + rng.choice(follow)}]
        await turn(tenant, msgs, measured, 2)

    sem = asyncio.Semaphore(a.concurrency)

    async def bounded():
        async with sem:
            await conversation(False)
    await asyncio.gather(*[bounded() for _ in range(a.warmup)])
    t0 = time.perf_counter()
    stop = t0 + a.seconds

    async def worker():
        while time.perf_counter() < stop:
            await conversation(True)
    await asyncio.gather(*[worker() for _ in range(a.concurrency)])
    return {"wall_s": time.perf_counter() - t0, "records": records}


def summarize(out: dict) -> dict:
    recs, wall = out["records"], out["wall_s"]

    def pct(values, q):
        values = sorted(values)
        return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))] * 1e3 if values else None

    def share(rs):
        prompt = sum(r["prompt"] for r in rs)
        return sum(r["cached"] for r in rs) / prompt if prompt else None
    firsts, seconds = [r for r in recs if r["turn"] == 1], [r for r in recs if r["turn"] == 2]
    return {"requests": len(recs), "wall_s": round(wall, 2), "requests_per_s": len(recs) / wall,
            "cached_share": share(recs), "cached_share_first_turn": share(firsts),
            "cached_share_second_turn": share(seconds),
            "prompt_tokens_mean": statistics.mean(r["prompt"] for r in recs) if recs else None,
            "ttft_ms": {"p50": pct([r["ttft"] for r in recs], 50), "p99": pct([r["ttft"] for r in recs], 99)},
            "latency_ms": {"p50": pct([r["total"] for r in recs], 50), "p99": pct([r["total"] for r in recs], 99)}}


# -- the servers ------------------------------------------------------------------------------------------
def make_workload(a, decoder_dir: str, path: Path, keys: list[str]) -> None:
    from transformers import AutoTokenizer

    from generation_workload import load_sentences
    from prefix_cache import system_prompt

    rng = random.Random(a.seed)
    tokenizer = AutoTokenizer.from_pretrained(decoder_dir)
    sentences = [s for s in load_sentences() if 40 <= len(s) <= 400]
    short = [s for s in sentences if len(s) <= 120]
    systems = [system_prompt(sentences, tokenizer, a.system_tokens, rng) for _ in range(a.tenants)]
    path.write_text(json.dumps({"keys": keys, "systems": systems, "questions": sentences, "follow_ups": short}))


def run_config(a, routing: str, decoder_dir: str, tmp: Path, label: str) -> dict:
    from manager.records import Quotas
    from scaleout_generation import OwnServer

    s = OwnServer(str(tmp / label), decoder=decoder_dir, decoder_replicas=a.replicas, replica_threads=1,
                  replica_cpus=0.5, decoder_routing=routing, http_port=free_port(), max_waiting_per_tenant=10000)
    try:
        keys = []
        for i in range(a.tenants):
            _, key = s.app.manager.create_tenant(f"t{i}", Quotas(requests_per_s=1e6, burst=10 ** 6,
                                                                 max_tokens_per_request=4096))
            keys.append(key)
        work = tmp / f"{label}-workload.json"
        make_workload(a, decoder_dir, work, keys)
        url = f"http://127.0.0.1:{s.server.http_port}/v1"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--client", url, "--workload", str(work),
               "--concurrency", str(a.concurrency), "--new-tokens", str(a.new_tokens), "--seconds", str(a.seconds),
               "--warmup", str(a.warmup), "--seed", str(a.seed)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=a.seconds + 1800)
        if out.returncode:
            raise SystemExit(f"the client failed:\n{out.stderr[-3000:]}")
        result = summarize(json.loads(out.stdout.strip().splitlines()[-1]))
        result["requests_per_replica"] = {str(k): v for k, v in s.app.generation.stats.rows_per_replica.items()}
        return result
    finally:
        s.stop()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ratio(x, y):
    return x / y if x is not None and y else None


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.client:
        print(json.dumps(asyncio.run(client_main(a))))
        return 0
    if a.json is None:
        raise SystemExit("--json is required")
    os.environ.pop("RAY_ADDRESS", None)
    from tqdm import tqdm

    from generation import git_state
    from scaleout_generation import _default_decoder_dir

    results: dict = {"args": {k: v for k, v in vars(a).items() if k not in ("json", "client", "workload")},
                     "machine": {"cpus": os.cpu_count()}, "date": time.strftime("%Y-%m-%d"), **git_state(),
                     "rounds": []}
    decoder_dir = a.decoder or _default_decoder_dir()
    a.json.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(r, routing) for r in range(a.rounds)
                for routing in (ROUTINGS if r % 2 == 0 else ROUTINGS[::-1])]
        for r, routing in tqdm(runs, desc="runs"):
            if len(results["rounds"]) <= r:
                results["rounds"].append({})
            results["rounds"][r][routing] = run_config(a, routing, decoder_dir, Path(tmp), f"{routing}-{r}")
            tqdm.write(f"round {r} {routing}: {json.dumps(results['rounds'][r][routing])}")
            a.json.write_text(json.dumps(results, indent=2) + "\n")
    done = [x for x in results["rounds"] if all(k in x for k in ROUTINGS)]

    def median_ratio(get):
        values = [v for v in (ratio(get(x["prefix"]), get(x["adapter"])) for x in done) if v is not None]
        return statistics.median(values) if values else None
    results["prefix_over_adapter"] = {
        "requests_per_s": median_ratio(lambda c: c["requests_per_s"]),
        "cached_share": median_ratio(lambda c: c["cached_share"]),
        "ttft_p50": median_ratio(lambda c: c["ttft_ms"]["p50"]),
        "ttft_p99": median_ratio(lambda c: c["ttft_ms"]["p99"]),
        "latency_p50": median_ratio(lambda c: c["latency_ms"]["p50"]),
    }
    a.json.write_text(json.dumps(results, indent=2) + "\n")
    write_plot(results, a.json.with_suffix(".png"))
    print(json.dumps(results["prefix_over_adapter"], indent=2))
    return 0


def write_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last = results["rounds"][-1]
    names = [r for r in ROUTINGS if r in last]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    panels = [("prompt tokens from the prefix caches", lambda c: [c["cached_share_first_turn"] or 0,
                                                                   c["cached_share_second_turn"] or 0],
               ["turn 1", "turn 2"]),
              ("time to first token (ms)", lambda c: [c["ttft_ms"]["p50"], c["ttft_ms"]["p99"]], ["p50", "p99"]),
              ("requests/s", lambda c: [c["requests_per_s"]], ["all"])]
    for ax, (title, get, ticks) in zip(axes, panels):
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            values = get(last[name])
            ax.bar([j + i * width for j in range(len(values))], values, width, label=f"decoder_routing = {name}")
        ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(ticks))], ticks)
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    a = results["args"]
    fig.suptitle(f"{a['replicas']} decoder replicas, {a['tenants']} tenants with ~{a['system_tokens']}-token system "
                 f"prompts, two-turn chats, {a['concurrency']} in flight ({results['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
