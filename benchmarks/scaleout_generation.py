#!/usr/bin/env python
"""Generation on Ray Serve decoder replicas against the in-process server, side by side in one run on this machine.

    python benchmarks/scaleout_generation.py --json benchmarks/results/cpu-DATE/scaleout_generation/run.json

Each configuration is a real decoder-only server (dispatcher.server.Server on 127.0.0.1, port 0, the default
decoder SmolLM2-135M-Instruct) with --tenants tenants, each with its own LoRA adapter (random, rank --rank), loaded by
a gRPC client in a child process: --concurrency Generate streams in flight (closed loop), each a greedy completion
of --new-tokens tokens (ignore_eos) of a sci-cite sentence for a random tenant, for --seconds after --warmup streams.

- in-process: generation in the server's process, one compute thread (as each replica's);
- 1 replica: the front door + one decoder replica (one thread); 2 replicas: two (one thread each).

Reported per configuration: generated tokens/s, streams/s, time to first token and per-stream latency (p50, p99);
ratios `replica_over_inprocess` (1 replica / in-process) and `scaling_efficiency` (2 replicas / 1 replica / 2).
On a 2-core machine two replicas share the cores with the front door and the client: read the efficiency as a
floor. The client targets loopback only and stops by itself. Writes JSON and a PNG next to it.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data" / "cls" / "sci-cite" / "test.txt"
ADMIN = "scaleout-generation-admin"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, help="where to write the results (a PNG goes next to it)")
    p.add_argument("--configs", default="inprocess,1,2", help="in-process and/or replica counts, comma-separated")
    p.add_argument("--tenants", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=16, help="streams in flight (closed loop)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--seconds", type=float, default=60.0, help="measured seconds per configuration")
    p.add_argument("--warmup", type=int, default=16, help="untimed streams per configuration first")
    p.add_argument("--decoder", default=None, help="decoder checkpoint directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--client", default=None, help=argparse.SUPPRESS)   # ADDRESS: run as the load client
    p.add_argument("--keys", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- the client (a child process) -------------------------------------------------------------------------
def load_prompts(n: int = 200) -> list[str]:
    lines = [json.loads(x)["text"] if x.startswith("{") else x.split("\t")[-1] for x in DATA.read_text().splitlines()]
    return [t.strip() for t in lines if t.strip()][:n]


async def client_main(a) -> dict:
    import grpc

    from dispatcher.gen.vbert.v1 import tenant_pb2 as T, tenant_pb2_grpc

    keys, prompts, rng = a.keys.split(","), load_prompts(), random.Random(0)
    records: list[tuple[float, float, int]] = []   # (ttft, total, tokens) of measured streams
    async with grpc.aio.insecure_channel(a.client) as ch:
        stub = tenant_pb2_grpc.TenantServiceStub(ch)

        async def one(measured: bool) -> None:
            key = rng.randrange(len(keys))
            req = T.GenerateRequest(adapter="writer", prompt=rng.choice(prompts), max_new_tokens=a.new_tokens,
                                    temperature=0, ignore_eos=True)
            t0, first, n = time.perf_counter(), None, 0
            async for msg in stub.Generate(req, metadata=(("authorization", f"Bearer {keys[key]}"),), timeout=300):
                if msg.token_ids and first is None:
                    first = time.perf_counter()
                n += len(msg.token_ids)
            if measured:
                records.append((first - t0, time.perf_counter() - t0, n))

        sem = asyncio.Semaphore(a.concurrency)
        await asyncio.gather(*[_bounded(sem, one(False)) for _ in range(a.warmup)])
        t0 = time.perf_counter()
        stop = t0 + a.seconds

        async def worker():
            while time.perf_counter() < stop:
                await one(True)
        await asyncio.gather(*[worker() for _ in range(a.concurrency)])
        wall = time.perf_counter() - t0
    ttft, total, toks = (np.array(x) for x in zip(*records))
    return {"streams": len(records), "wall_s": wall, "tokens_per_s": float(toks.sum() / wall),
            "streams_per_s": len(records) / wall,
            "ttft_ms": {"p50": float(np.percentile(ttft, 50) * 1e3), "p99": float(np.percentile(ttft, 99) * 1e3)},
            "latency_ms": {"p50": float(np.percentile(total, 50) * 1e3), "p99": float(np.percentile(total, 99) * 1e3)}}


async def _bounded(sem, coro):
    async with sem:
        await coro


# -- the servers ------------------------------------------------------------------------------------------
class OwnServer:
    def __init__(self, data_dir: str, **overrides):
        from dispatcher.app import App
        from dispatcher.config import ServerConfig
        from dispatcher.heap import freeze_startup_heap
        from dispatcher.server import Server

        config = ServerConfig(**{**dict(host="127.0.0.1", port=0, metrics_port=0, http_port=0, data_dir=data_dir,
                                        backbones="decoder", admin_token=ADMIN, max_concurrent_rpcs=1024,
                                        log_level="WARNING"), **overrides})
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.app = App.create(config)

        async def start():
            server = Server(self.app)
            await server.start()
            return server
        self.server = asyncio.run_coroutine_threadsafe(start(), self.loop).result()
        self.address = f"127.0.0.1:{self.server.port}"
        freeze_startup_heap()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.drain_and_stop(), self.loop).result(120)
        self.loop.call_soon_threadsafe(self.loop.stop)


def make_adapter(directory: Path, decoder_dir: str, seed: int, rank: int):
    """A PEFT LoRA of the decoder with random A and B on every projection (the format `vbert train --task
    generation` writes)."""
    from tests.decoder_models import write_tiny_decoder_lora
    from vbert.artifact import load_artifact

    return load_artifact(write_tiny_decoder_lora(directory, Path(decoder_dir), seed=seed, rank=rank))


def run_config(a, label: str, replicas: int, decoder_dir: str, adapters: list, tmp: Path) -> dict:
    from manager.records import Quotas

    overrides = {"decoder": decoder_dir}
    if replicas:
        overrides.update(decoder_replicas=replicas, replica_threads=1, replica_cpus=0.5)
    s = OwnServer(str(tmp / label), **overrides)
    try:
        keys = []
        for i in range(a.tenants):
            _, key = s.app.manager.create_tenant(f"t{i}", Quotas(requests_per_s=1e6, burst=10 ** 6))
            s.app.manager.upload_adapter(f"t{i}", "writer", adapters[i])
            keys.append(key)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--client", s.address, "--keys", ",".join(keys),
               "--concurrency", str(a.concurrency), "--new-tokens", str(a.new_tokens), "--seconds", str(a.seconds),
               "--warmup", str(a.warmup)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=a.seconds + 900)
        if out.returncode:
            raise SystemExit(f"the client failed:\n{out.stderr[-3000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        if replicas:
            result["streams_per_replica"] = {str(k): v for k, v in s.app.generation.stats.rows_per_replica.items()}
        return result
    finally:
        s.stop()


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.client:
        print(json.dumps(asyncio.run(client_main(a))))
        return 0
    if a.json is None:
        raise SystemExit("--json is required")
    os.environ.pop("RAY_ADDRESS", None)
    from vbert.device import reserve_cpu_for_steps

    reserve_cpu_for_steps(1)          # the in-process server's compute: one thread, as each replica's
    configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    results: dict = {"args": {k: v for k, v in vars(a).items() if k not in ("json", "client", "keys")},
                     "machine": {"cpus": os.cpu_count()}, "date": time.strftime("%Y-%m-%d"), "configs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        decoder_dir = a.decoder or _default_decoder_dir()
        adapters = [make_adapter(tmp / f"lora{i}", decoder_dir, seed=i, rank=a.rank) for i in range(a.tenants)]
        for c in tqdm(configs, desc="configurations"):
            label = "inprocess" if c == "inprocess" else f"replicas_{int(c)}"
            results["configs"][label] = run_config(a, label, 0 if c == "inprocess" else int(c), decoder_dir, adapters,
                                                   tmp)
            tqdm.write(f"{label}: {json.dumps(results['configs'][label])}")
    c = results["configs"]
    if "inprocess" in c and "replicas_1" in c:
        results["replica_over_inprocess"] = c["replicas_1"]["tokens_per_s"] / c["inprocess"]["tokens_per_s"]
    if "replicas_1" in c and "replicas_2" in c:
        results["scaling_efficiency"] = c["replicas_2"]["tokens_per_s"] / c["replicas_1"]["tokens_per_s"] / 2
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(results, indent=2) + "\n")
    write_plot(results, a.json.with_suffix(".png"))
    print(json.dumps({k: v for k, v in results.items() if k not in ("args",)}, indent=2))
    return 0


def _default_decoder_dir() -> str:
    """The default decoder's checkpoint directory, converted once from its packaged GGUF into ./var/models (as
    `make serve` does): every configuration and the adapters use it."""
    from vbert.decoder_backbone import DecoderBackbone, DecoderBackboneConfig
    from vbert.device import DeviceContext

    config = DecoderBackboneConfig(cache_dir=str(ROOT / "var" / "models"), kv_cache_bytes=1 << 20)
    return str(DecoderBackbone.load(config, DeviceContext.create("cpu", "float32")).path)


def write_plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results["configs"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    a1.bar(labels, [results["configs"][k]["tokens_per_s"] for k in labels], color="tab:blue")
    a1.set_ylabel("generated tokens / s")
    a2.bar(labels, [results["configs"][k]["ttft_ms"]["p50"] for k in labels], color="tab:orange", label="p50")
    a2.set_ylabel("time to first token, p50 (ms)")
    fig.suptitle(f"generation: in-process vs Ray Serve decoder replicas ({results['date']}, "
                 f"{results['machine']['cpus']} CPUs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
