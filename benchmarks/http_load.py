#!/usr/bin/env python
"""Streamed generation over the OpenAI-compatible HTTP API against the same calls over gRPC Generate and
straight to the generation engine, in one run (issue 20's benchmark).

    python benchmarks/http_load.py --json benchmarks/results/cpu-2026-12-06/http_load.json
    python benchmarks/http_load.py --quick --json /tmp/http_load.json     # a tiny random decoder, seconds

Loopback only, bounded (requests per round x rounds), stops by itself. It starts its own server in this
process: dispatcher.server.Server on an App with `backbones = "decoder"` (the default decoder
SmolLM2-135M-Instruct, dequantized once into --cache-dir and reused by later runs; `--quick`: a tiny random
Llama), the gRPC port and an HTTP port on 127.0.0.1, a few tenants registered through app.manager with
quotas high enough that the rate limiter never refuses, and prefix caching off (the three paths send the same
prompts in turn: with it on, the later ones would reuse the earlier ones' K/V).

Every request is a chat of real sentences (read in place from ../shared/data), temperature 0, a fixed
--max-tokens with `ignore_eos`, so every request generates exactly --max-tokens tokens; the tenants take
the requests in turn; every call is on the bare decoder (model/adapter "default"). Three paths, the same
requests with the same number in flight (--concurrency workers, each sends its next request when the
previous stream has ended):
- http: the stock `openai` package (AsyncOpenAI, one client per tenant), POST /v1/chat/completions with
  stream=true and stream_options.include_usage, read until `data: [DONE]`;
- grpc: dispatcher.client.AsyncClient.generate (the streamed Generate RPC), one client per tenant;
- inprocess: the engine alone, on the server's event loop: the Request and SamplingParams the edges build
  (prompt rendered through the chat template and tokenized once before timing, sampling from
  dispatcher.generation_call.sampling_of), app.generation.submit_async, its stream read to the end. No
  authentication, rate limiting, tokenization or serialization: this is the edges' ceiling.

The http and grpc clients run in a child process by default (`--client subprocess`: this script
re-invoked with --client-only, talking JSON lines on stdin/stdout), so their Python work does not share
the server's GIL; `--client same` runs them on their own event loop in the server's process instead.

Rounds: every round runs the three paths, one after the other, the order rotated every round, each on
the round's own --requests requests. Per path per round: generated tokens/s (completion tokens of the
answered requests / seconds from the first send to the last stream's end), requests/s, time to first
token p50/p99 (send -> first chunk with non-empty text), end-to-end p50/p99, errors by code, CPU seconds
of the client process and of this process. http_over_grpc = median over rounds of (http tokens/s) /
(grpc tokens/s); grpc_over_inprocess and http_over_inprocess likewise. The texts of the same request over
http and grpc (and in-process) are compared (greedy: they should be equal). Writes JSON, a PNG and a
Markdown table next to the JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from grpc_load import SameProcessClient as SameThreadClient, SubprocessClient as PipeClient, percentile  # noqa: E402,E501

DATA_DIR = ROOT.parent / "shared" / "data"
PATHS = ("http", "grpc", "inprocess")
TARGETS = {"http_over_grpc": 0.9}
SYSTEM = "You are a helpful assistant. Answer briefly."
ASKS = ("Summarize this in one sentence:", "What is the main finding here?", "Explain this to a student:",
        "Rewrite this more simply:")
DEFAULT_JSON = "benchmarks/results/cpu-2026-12-06/http_load.json"


# -- the load (runs in the client, whichever process that is) ----------------------------------------
async def closed_loop(send, indices: list[int], concurrency: int, bar) -> list[dict]:
    """C workers over the given request indices; one record per call, times relative to the first send."""
    records: list[dict] = []
    todo = list(indices)
    t0 = time.perf_counter()

    async def worker():
        while todo:
            i = todo.pop(0)
            start = time.perf_counter()
            rec = await send(i, start)
            rec.update(index=i, start=start - t0, end=time.perf_counter() - t0)
            if rec.get("first") is not None:
                rec["first"] -= t0
            records.append(rec)
            bar.update()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records


async def run_job(send, job: dict) -> dict:
    cpu = time.process_time()
    with tqdm(total=len(job["indices"]), desc=job["label"], unit="req", leave=False, file=sys.stderr,
              disable=job.get("quiet", False)) as bar:
        records = await closed_loop(send, job["indices"], job["concurrency"], bar)
    return {"records": records, "client_cpu_s": time.process_time() - cpu}


class Clients:
    """The two network peers users run: the stock openai package (HTTP) and dispatcher.client (gRPC)."""

    def __init__(self, init: dict):
        self.init = init

    async def start(self) -> None:
        import openai

        from dispatcher.client import AsyncClient

        init = self.init
        self.http = [openai.AsyncOpenAI(base_url=init["http_url"], api_key=k, max_retries=0,
                                        timeout=init["timeout_s"]) for k in init["keys"]]
        self.grpc = [AsyncClient(init["address"], api_key=k, timeout=init["timeout_s"], max_retries=0)
                     for k in init["keys"]]
        self.openai = openai

    def _request(self, i: int):
        r = self.init["requests"][i]
        return r["tenant"], r["messages"]

    async def send_http(self, i: int, start: float) -> dict:
        tenant, messages = self._request(i)
        text, first, tokens = [], None, 0
        try:
            stream = await self.http[tenant].chat.completions.create(
                model="default", messages=messages, max_tokens=self.init["max_tokens"], temperature=0,
                stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            async for chunk in stream:      # the package reads the SSE stream until `data: [DONE]`
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    if choice.delta.content:
                        if first is None:
                            first = time.perf_counter()
                        text.append(choice.delta.content)
            return {"code": "OK", "first": first, "tokens": tokens, "text": "".join(text)}
        except self.openai.APIStatusError as e:
            return {"code": f"HTTP {e.status_code}", "first": first, "tokens": 0, "text": None}
        except self.openai.APIError as e:
            return {"code": type(e).__name__, "first": first, "tokens": 0, "text": None}

    async def send_grpc(self, i: int, start: float) -> dict:
        from dispatcher.client import VbertError

        tenant, messages = self._request(i)
        text, first, tokens = [], None, 0
        try:
            async for ev in self.grpc[tenant].generate(messages=messages, max_new_tokens=self.init["max_tokens"],
                                                       temperature=0, ignore_eos=True):
                if ev["text"]:
                    if first is None:
                        first = time.perf_counter()
                    text.append(ev["text"])
                if "usage" in ev:
                    tokens = ev["usage"]["completion_tokens"]
            return {"code": "OK", "first": first, "tokens": tokens, "text": "".join(text)}
        except VbertError as e:
            return {"code": e.code.name, "first": first, "tokens": 0, "text": None}

    async def run(self, job: dict) -> dict:
        return await run_job(self.send_http if job["path"] == "http" else self.send_grpc, job)

    async def close(self) -> None:
        for c in self.http:
            await c.close()
        for c in self.grpc:
            await c.close()


def client_main() -> int:
    """--client-only: a JSON 'init' line on stdin, then one job per line; one result line per job."""
    async def serve():
        loop = asyncio.get_running_loop()
        readline = lambda: loop.run_in_executor(None, sys.stdin.readline)  # noqa: E731
        clients = Clients(json.loads(await readline()))
        await clients.start()
        print(json.dumps({"ready": True}), flush=True)
        while line := await readline():
            job = json.loads(line)
            if job["op"] == "exit":
                break
            print(json.dumps(await clients.run(job)), flush=True)
        await clients.close()

    asyncio.run(serve())
    return 0


def SubprocessClient(init: dict):   # noqa: N802 - stands for the class it makes
    """The clients in a child process (this script with --client-only): grpc_load's JSON-lines pipe."""
    return PipeClient(init, script=Path(__file__).resolve())


def SameProcessClient(init: dict):   # noqa: N802 - stands for the class it makes
    """The clients on their own event loop thread in this process: grpc_load's, with these clients."""
    return SameThreadClient(init, make=Clients)


# -- the server (this process) ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OwnServer:
    """Server + App (decoder only) on a background event loop; tenants through app.manager."""

    def __init__(self, args, data_dir: Path, decoder: str | None):
        from dispatcher.app import App
        from dispatcher.config import ServerConfig
        from dispatcher.server import Server

        # the default decoder is converted once into <data_dir>/models: point that at --cache-dir
        cache = Path(args.cache_dir).resolve()
        cache.mkdir(parents=True, exist_ok=True)
        (data_dir / "models").symlink_to(cache, target_is_directory=True)
        config = ServerConfig(host="127.0.0.1", port=0, metrics_port=0, http_host="127.0.0.1", http_port=free_port(),
                              data_dir=str(data_dir), backbones="decoder", decoder=decoder, device=args.device,
                              admin_token="http-load-admin", log_level=args.log_level,
                              decoder_kv_cache_mb=args.kv_cache_mb,
                              max_concurrent_rpcs_per_tenant=max(32, 2 * args.concurrency),
                              generation_max_running=max(32, args.concurrency),
                              generation_prefix_caching=False)   # the paths send the same prompts: each computes them
        self.config = config
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True, name="server-loop").start()
        self.app = App.create(config)

        async def start():   # grpc.aio servers belong to the loop they are created on
            server = Server(self.app)
            await server.start()
            return server

        self.server = self._call(start())
        self.address = f"127.0.0.1:{self.server.port}"
        self.http_url = f"http://127.0.0.1:{self.server.http_port}/v1"

    def _call(self, coro, timeout=None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def add_tenants(self, names: list[str]) -> list[str]:
        from manager.records import Quotas

        keys = []
        for name in names:
            _, key = self.app.manager.create_tenant(name, Quotas(requests_per_s=1e6, burst=10 ** 6))
            keys.append(key)
        self.tenants = [self.app.manager.get_tenant(n) for n in names]
        return keys

    def prompt_ids(self, messages: list[dict], limit: int) -> list[int]:
        """What start_generation does to a chat before submitting it (no truncation: InputError when
        longer than limit tokens)."""
        dec = self.app.decoder
        text = dec.render_chat([(m["role"], m["content"]) for m in messages])
        return dec.tokenize_prompt(text, limit, False, True)

    def inprocess_job(self, init: dict, ids: list[list[int]], job: dict) -> dict:
        """The same requests straight to the generation engine, same number in flight, on the server's loop."""
        from dispatcher.errors import status_of
        from dispatcher.generation_call import GenerateParams, sampling_of
        from scheduler.generation_engine import GenerationDelta
        from scheduler.types import Request

        app, n = self.app, init["max_tokens"]
        sampling = sampling_of(GenerateParams(temperature=0.0, max_new_tokens=n, ignore_eos=True), n)

        async def send(i: int, start: float) -> dict:
            tenant = self.tenants[init["requests"][i]["tenant"]]
            text, first, tokens = [], None, 0
            req = Request(tenant_id=tenant.id, adapter_id=None, deadline=time.monotonic() + init["timeout_s"],
                          prompt_ids=list(ids[i]), max_new_tokens=n, weight=tenant.quotas.weight)
            try:
                stream = await app.generation.submit_async(req, sampling, ignore_eos=True)
                async for ev in stream:
                    if isinstance(ev, GenerationDelta):
                        if ev.text:
                            if first is None:
                                first = time.perf_counter()
                            text.append(ev.text)
                    else:
                        tokens = ev.num_generated_tokens
                return {"code": "OK", "first": first, "tokens": tokens, "text": "".join(text)}
            except Exception as e:  # noqa: BLE001 - counted by its status code, as the server would answer
                return {"code": status_of(e)[0].name, "first": first, "tokens": 0, "text": None}

        return self._call(run_job(send, job))

    def close(self) -> None:
        self._call(self.server.drain_and_stop(), 120)
        self.loop.call_soon_threadsafe(self.loop.stop)


# -- workload --------------------------------------------------------------------------------------------
def make_requests(server: OwnServer, num: int, num_tenants: int, max_tokens: int, max_prompt: int, seed: int,
                  data_dir: Path) -> tuple[list[dict], list[list[int]]]:
    """num chats of 1-2 real sentences (prompts of at most max_prompt tokens after the chat template);
    tenants in turn. Returns (requests for the clients, prompt ids for the in-process path)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from generation_workload import load_sentences

    from vbert.model import InputError

    rng = random.Random(seed)
    sentences = [t for t in load_sentences(data_dir) if len(t) < 4 * max_prompt]   # no hopeless tokenizations
    context = server.app.decoder.spec.max_position_embeddings
    limit = min(max_prompt, context - max_tokens, server.tenants[0].quotas.max_tokens_per_request - max_tokens)
    requests, ids, tries = [], [], 0
    while len(requests) < num:
        tries += 1
        if tries > 100 * num + 1000:
            raise SystemExit(f"could not find {num} prompts of at most {limit} tokens")
        body = " ".join(rng.choice(sentences) for _ in range(rng.randint(1, 2)))
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"{rng.choice(ASKS)} {body}"}]
        try:
            p = server.prompt_ids(messages, limit)
        except InputError:                   # longer than limit
            continue
        requests.append({"tenant": len(requests) % num_tenants, "messages": messages})
        ids.append(p)
    return requests, ids


# -- statistics ------------------------------------------------------------------------------------------
def summarize(records: list[dict]) -> dict:
    ok = [r for r in records if r["code"] == "OK"]
    seconds = max((r["end"] for r in records), default=0.0) - min((r["start"] for r in records), default=0.0)
    tokens = sum(r["tokens"] for r in ok)
    ttft = [(r["first"] - r["start"]) * 1000 for r in ok if r["first"] is not None]
    e2e = [(r["end"] - r["start"]) * 1000 for r in ok]
    ms = lambda x: None if x is None else round(x, 2)  # noqa: E731
    return {"num_requests": len(records), "num_ok": len(ok), "seconds": round(seconds, 3),
            "completion_tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 2) if seconds > 0 else 0.0,
            "requests_per_s": round(len(ok) / seconds, 3) if seconds > 0 else 0.0,
            "ttft_ms_p50": ms(percentile(ttft, 50)), "ttft_ms_p99": ms(percentile(ttft, 99)),
            "e2e_ms_p50": ms(percentile(e2e, 50)), "e2e_ms_p99": ms(percentile(e2e, 99)),
            "errors": dict(Counter(r["code"] for r in records if r["code"] != "OK"))}


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b else None


def median_or_none(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 4) if values else None


# -- the run ---------------------------------------------------------------------------------------------
def measure(args, server: OwnServer, client, init: dict, ids: list[list[int]]) -> dict:
    n, rounds = args.requests, []
    overall = tqdm(total=args.rounds * len(PATHS), desc="runs", unit="run", disable=args.quiet, position=0)

    def job(path: str, label: str, indices: list[int]) -> dict:
        return {"op": "run", "path": path, "label": label, "indices": indices, "concurrency": args.concurrency,
                "quiet": args.quiet}

    def run_path(path: str, j: dict) -> dict:
        cpu = time.process_time()
        out = server.inprocess_job(init, ids, j) if path == "inprocess" else client.run(j)
        out["this_process_cpu_s"] = time.process_time() - cpu
        return out

    warm = list(range(args.rounds * n, args.rounds * n + args.warmup))
    for path in PATHS:
        if warm:
            run_path(path, job(path, f"warm-up {path}", warm))

    texts: dict[str, dict[int, str]] = {p: {} for p in PATHS}
    for k in range(args.rounds):
        order = PATHS[k % len(PATHS):] + PATHS[:k % len(PATHS)]
        indices = list(range(k * n, (k + 1) * n))
        r: dict = {"round": k, "order": list(order)}
        for path in order:
            out = run_path(path, job(path, f"round {k} {path}", indices))
            s = summarize(out["records"])
            s["this_process_cpu_s"] = round(out["this_process_cpu_s"], 3)
            if path != "inprocess" and args.client == "subprocess":
                s["client_process_cpu_s"] = round(out["client_cpu_s"], 3)
            r[path] = s
            for rec in out["records"]:
                if rec["code"] == "OK":
                    texts[path][rec["index"]] = rec["text"]
            overall.update()
            tqdm.write(f"round {k} {path:>9}: {s['tokens_per_s']:8.1f} tokens/s  {s['requests_per_s']:6.2f} req/s  "
                       f"TTFT p50 {s['ttft_ms_p50']} ms  p99 {s['ttft_ms_p99']} ms  errors {s['errors'] or 0}",
                       file=sys.stderr)
        tps = {p: r[p]["tokens_per_s"] for p in PATHS}
        r["http_over_grpc"] = ratio(tps["http"], tps["grpc"])
        r["grpc_over_inprocess"] = ratio(tps["grpc"], tps["inprocess"])
        r["http_over_inprocess"] = ratio(tps["http"], tps["inprocess"])
        rounds.append(r)
    overall.close()

    paths = {}
    for p in PATHS:
        rs = [r[p] for r in rounds]
        paths[p] = {"tokens_per_s": median_or_none([x["tokens_per_s"] for x in rs]),
                    "requests_per_s": median_or_none([x["requests_per_s"] for x in rs]),
                    "ttft_ms_p50": median_or_none([x["ttft_ms_p50"] for x in rs]),
                    "ttft_ms_p99": median_or_none([x["ttft_ms_p99"] for x in rs]),
                    "e2e_ms_p50": median_or_none([x["e2e_ms_p50"] for x in rs]),
                    "e2e_ms_p99": median_or_none([x["e2e_ms_p99"] for x in rs]),
                    "completion_tokens": sum(x["completion_tokens"] for x in rs),
                    "num_ok": sum(x["num_ok"] for x in rs), "num_requests": sum(x["num_requests"] for x in rs),
                    "errors": dict(sum((Counter(x["errors"]) for x in rs), Counter())),
                    "tokens_per_s_rounds": [x["tokens_per_s"] for x in rs]}
    ratios = {}
    for name in ("http_over_grpc", "grpc_over_inprocess", "http_over_inprocess"):
        a, b = name.split("_over_")
        ratios[name] = median_or_none([r[name] for r in rounds])
        ratios[f"{name}_rounds"] = [r[name] for r in rounds]
        ratios[f"{name}_of_medians"] = ratio(paths[a]["tokens_per_s"] or 0, paths[b]["tokens_per_s"] or 0)

    def agree(a: str, b: str) -> dict:
        common = sorted(set(texts[a]) & set(texts[b]))
        same = sum(texts[a][i] == texts[b][i] for i in common)
        differ = [i for i in common if texts[a][i] != texts[b][i]][:5]
        return {"compared": len(common), "equal": same, "fraction": round(same / len(common), 4) if common else None,
                "first_differing": [{"request": i, a: texts[a][i], b: texts[b][i]} for i in differ]}

    outputs = {"http_vs_grpc": agree("http", "grpc"), "inprocess_vs_grpc": agree("inprocess", "grpc")}
    return {"paths": paths, **ratios, "outputs_agree": outputs, "rounds": rounds}


def git_state() -> dict:
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    try:
        return {"head": git("rev-parse", "HEAD"),
                "dirty": git("status", "--porcelain", "dispatcher", "scheduler", "vbert", "manager",
                             "benchmarks/http_load.py").splitlines()}
    except (OSError, subprocess.CalledProcessError):
        return {"head": None, "dirty": None}


def run(args) -> dict:
    import tempfile

    import torch

    from dispatcher.logs import configure
    from vbert.device import reserve_cpu_for_steps

    threads = reserve_cpu_for_steps(args.threads)    # as `vbert serve`: compute only on step threads
    configure(args.log_level)
    tmp = tempfile.TemporaryDirectory(prefix="http-load-")
    decoder = args.model
    if args.quick and decoder is None:
        from tests.decoder_models import write_tiny_decoder_checkpoint
        decoder = str(write_tiny_decoder_checkpoint(Path(tmp.name) / "tiny-decoder", seed=args.seed,
                                                   max_positions=512))   # its tokenizer: ~0.65 tokens per character
    data_dir = Path(tmp.name) / "var"
    data_dir.mkdir()
    t_setup = time.perf_counter()
    server = OwnServer(args, data_dir, decoder)
    client = None
    try:
        keys = server.add_tenants([f"http{args.seed}-t{i:02d}" for i in range(args.tenants)])
        requests, ids = make_requests(server, args.rounds * args.requests + args.warmup, args.tenants,
                                      args.max_tokens, args.max_prompt_tokens, args.seed, args.data_dir)
        init = {"address": server.address, "http_url": server.http_url, "keys": keys, "requests": requests,
                "max_tokens": args.max_tokens, "timeout_s": args.timeout}
        client = (SubprocessClient if args.client == "subprocess" else SameProcessClient)(init)
        setup_s = time.perf_counter() - t_setup
        results = measure(args, server, client, init, ids)
    finally:
        if client is not None:
            client.close()
        server.close()
        tmp.cleanup()
    dec = server.app.decoder
    timed = ids[:args.rounds * args.requests]
    targets = {k: {"value": results[k], "target": v, "met": None if results[k] is None else results[k] >= v}
               for k, v in TARGETS.items()}
    params = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "client_only"}
    return {
        "benchmark": "http_load", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv, "git": git_state(),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
                    "host_cpu": host_cpu(), "python": platform.python_version(), "torch": torch.__version__},
        "parameters": params, "model": dec.name, "model_path": str(dec.path), "device": args.device,
        "torch_threads": threads,
        "server": "in-process dispatcher.server.Server, backbones = decoder, gRPC and HTTP on 127.0.0.1",
        "client_process": args.client, "setup_s": round(setup_s, 1),
        "workload": {"requests_per_round_per_path": args.requests, "rounds": args.rounds, "warmup": args.warmup,
                     "concurrency": args.concurrency, "tenants": args.tenants, "max_tokens": args.max_tokens,
                     "ignore_eos": True, "temperature": 0,
                     "prompt_tokens_mean": round(statistics.fmean(len(p) for p in timed), 1),
                     "prompt_tokens_min_max": [min(len(p) for p in timed), max(len(p) for p in timed)],
                     "messages": "a system line + a question over 1-2 real sentences (../shared/data cls train sets)",
                     "http_client": "openai.AsyncOpenAI, stream=true, stream_options.include_usage",
                     "grpc_client": "dispatcher.client.AsyncClient.generate",
                     "inprocess": "app.generation.submit_async (prompt pre-tokenized)"},
        "targets": targets, **results}


def host_cpu() -> str:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")),
                platform.processor() or platform.machine())


# -- output ----------------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    lines = ["| path | tokens/s | requests/s | TTFT p50 / p99 (ms) | end-to-end p50 / p99 (ms) | errors |",
             "|---|---|---|---|---|---|"]
    names = {"http": "HTTP (openai, SSE)", "grpc": "gRPC Generate", "inprocess": "engine in-process"}
    for p in PATHS:
        s = result["paths"][p]
        lines.append(f"| {names[p]} | {s['tokens_per_s']} | {s['requests_per_s']} | {s['ttft_ms_p50']} / "
                     f"{s['ttft_ms_p99']} | {s['e2e_ms_p50']} / {s['e2e_ms_p99']} | {sum(s['errors'].values())} |")
    agree, w = result["outputs_agree"]["http_vs_grpc"], result["workload"]
    lines += ["", f"Medians over {w['rounds']} rounds of {w['requests_per_round_per_path']} requests per path, "
              f"concurrency {w['concurrency']}, {w['max_tokens']} tokens each.", "",
              f"- `http_over_grpc` = {result['http_over_grpc']} (target >= {TARGETS['http_over_grpc']})",
              f"- `grpc_over_inprocess` = {result['grpc_over_inprocess']}",
              f"- `http_over_inprocess` = {result['http_over_inprocess']}",
              f"- HTTP and gRPC texts equal on {agree['equal']} of {agree['compared']} requests"]
    return "\n".join(lines) + "\n"


def write_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"http": "tab:orange", "grpc": "tab:blue", "inprocess": "tab:gray"}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4.2))
    for x, p in enumerate(PATHS):
        s = result["paths"][p]
        ax.bar(x, s["tokens_per_s"] or 0, 0.6, color=colors[p], alpha=0.8)
        pts = s["tokens_per_s_rounds"]
        ax.plot([x + (j - (len(pts) - 1) / 2) * 0.08 for j in range(len(pts))], pts, "k.", ms=6)
        bx.bar(x - 0.18, s["ttft_ms_p50"] or 0, 0.36, color=colors[p], alpha=0.8, label="p50" if x == 0 else None)
        bx.bar(x + 0.18, s["ttft_ms_p99"] or 0, 0.36, color=colors[p], alpha=0.4, hatch="//",
               label="p99" if x == 0 else None)
    for a in (ax, bx):
        a.set_xticks(range(len(PATHS)), ["HTTP (SSE)", "gRPC", "in-process"])
        a.grid(alpha=0.3, axis="y")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"http/grpc = {result['http_over_grpc']}, grpc/in-process = {result['grpc_over_inprocess']}",
                 fontsize=10)
    bx.set_ylabel("time to first token (ms)")
    bx.set_title("TTFT (median over rounds)", fontsize=10)
    bx.legend(fontsize=8)
    w = result["workload"]
    fig.suptitle(f"{result['model']}, concurrency {w['concurrency']}, {w['max_tokens']} tokens/request, "
                 f"{w['rounds']} rounds x {w['requests_per_round_per_path']} requests (dots: rounds); "
                 f"{result['machine']['host_cpu']}, client: {result['client_process']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, default=Path(DEFAULT_JSON),
                   help="where to write the results (a PNG and a .md table go next to it)")
    p.add_argument("--quick", action="store_true", help="a tiny random decoder and a few requests (a smoke test)")
    p.add_argument("--model", default=None, help="a local Llama-family checkpoint (default: SmolLM2-135M-Instruct)")
    p.add_argument("--cache-dir", default="./var/models", help="where the default decoder is converted once "
                   "(reused by later runs; the server's <data_dir>/models points here)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the step thread (default: all)")
    p.add_argument("--concurrency", type=int, default=None, help="requests in flight, every path (default 8)")
    p.add_argument("--requests", type=int, default=None, help="requests per path per round (default 32)")
    p.add_argument("--rounds", type=int, default=None, help="rounds, each runs the three paths (default 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed requests of each path first (default 8)")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens generated per request (default 32)")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt, after the chat template (default 128; --quick: 240)")
    p.add_argument("--tenants", type=int, default=4)
    p.add_argument("--kv-cache-mb", type=int, default=None, help="the decoder's KV cache (default 256; --quick: 16)")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request deadline, seconds")
    p.add_argument("--client", choices=("subprocess", "same"), default="subprocess",
                   help="where the HTTP and gRPC clients run: a child process (default) or this process")
    p.add_argument("--log-level", default="WARNING")
    p.add_argument("--data-dir", type=Path, default=DATA_DIR, help="the shared data (../shared/data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--client-only", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.client_only:
        return a
    defaults = dict(concurrency=4, requests=8, rounds=2, warmup=2, max_tokens=8, max_prompt_tokens=240,
                    kv_cache_mb=16) if a.quick else \
        dict(concurrency=8, requests=32, rounds=5, warmup=8, max_tokens=32, max_prompt_tokens=128, kv_cache_mb=256)
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    for name in ("concurrency", "requests", "rounds", "max_tokens", "tenants", "max_prompt_tokens", "kv_cache_mb"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.warmup < 0 or a.timeout <= 0:
        p.error("--warmup must be >= 0 and --timeout > 0")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.client_only:
        return client_main()
    result = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    write_plot(result, args.json.with_suffix(".png"))
    args.json.with_suffix(".md").write_text(markdown(result))
    keys = ("http_over_grpc", "grpc_over_inprocess", "http_over_inprocess")
    print(json.dumps({**{k: result[k] for k in keys},
                      **{f"{p}_tokens_per_s": result["paths"][p]["tokens_per_s"] for p in PATHS},
                      "http_grpc_texts_equal": result["outputs_agree"]["http_vs_grpc"]["fraction"]}))
    print(f"wrote {args.json}, {args.json.with_suffix('.png')} and {args.json.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
