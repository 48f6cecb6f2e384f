#!/usr/bin/env python
"""gRPC load generator for the tenant API: closed and open loop over N tenants, and the gRPC edge's
cost against the engine alone, measured in the same run.

    python benchmarks/grpc_load.py --json benchmarks/results/cpu-DATE/grpc_load.json

Loopback only (a non-loopback --target is refused), bounded in requests and seconds per level.
By default it starts its own server in this process: dispatcher.server.Server on an App (port 0,
the default backbone, a temporary data dir), N tenants (default 20) each with a LoRA adapter and a
classify head (the three sci-cite labels), registered through app.manager with quotas high enough
that the rate limiter never refuses. `--target 127.0.0.1:PORT --admin-token T` uses a running server
instead (tenants are registered and adapters uploaded through the admin API, and deleted at the end;
there is no in-process comparison then).

Every call is a unary Classify of one text (sci-cite train sentences, read in place from
../shared/data) for a uniformly random tenant; the sequence of (tenant, text) is fixed by --seed, and
every level uses a prefix of the same sequence.
- closed loop: C workers, each sends its next call when the previous one is answered.
- open loop: Poisson arrivals at R calls/s (latency counted from the scheduled arrival, so a slow
  server is not hidden by a slow client); default rates are fractions of the closed-loop throughput
  at the batch-friendly concurrency.
- gRPC / in-process: at the batch-friendly concurrency (--batch-concurrency, default 64 = the
  engine's max_rows_per_step), rounds alternate (order rotated every round) between the gRPC client
  and the same calls submitted straight to app.engine (app.new_request + engine.submit, same texts,
  same tenants, same number of requests in flight). grpc_over_inprocess = median over rounds of
  (gRPC requests/s) / (in-process requests/s).

The gRPC client runs in a child process by default (`--client subprocess`: this script re-invoked
with --client-only, talking JSON lines on stdin/stdout), so its Python work does not share the
server's GIL; `--client same` runs it on its own event loop in the server's process instead.
Per level: throughput_rps (answered-OK calls / seconds from the first send to the last answer),
p50/p90/p99/mean latency, errors by status code, engine steps and rows per step (own server),
CPU seconds of this process (server + in-process submitter) and of the client process. Writes JSON + a PNG next to it.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import dispatcher  # noqa: E402,F401  (before grpc: it turns gRPC's fork handlers off, see dispatcher/__init__.py)
import grpc  # noqa: E402
from dispatcher.gen.vbert.v1 import tenant_pb2, tenant_pb2_grpc  # noqa: E402  (light: no torch in the child)
from scheduler.simulator import percentile  # noqa: E402,F401  (no torch; http_load and isolation import it from here)

DATA_DIR = ROOT.parent / "shared" / "data"
LABELS = ("background", "method", "result")
ADAPTER = "cls"
OPEN_FRACTIONS = (0.25, 0.5, 0.75, 0.9)


# -- the load itself (runs in the client, whichever process that is) ----------------------------------
async def closed_loop(send, num: int, concurrency: int, max_seconds: float, bar) -> dict:
    """C workers over calls 0..num-1 until done or max_seconds; per call (start, end, code)."""
    records: list[tuple[float, float, str]] = []
    next_call = 0
    t0 = time.perf_counter()
    stop = t0 + max_seconds

    async def worker():
        nonlocal next_call
        while next_call < num and time.perf_counter() < stop:
            i, next_call = next_call, next_call + 1
            start = time.perf_counter()
            code = await send(i)
            records.append((start - t0, time.perf_counter() - t0, code))
            bar.update()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"records": records}


async def open_loop(send, num: int, rate: float, max_seconds: float, seed: int, bar) -> dict:
    """Poisson arrivals at `rate` calls/s for up to num calls or max_seconds of arrivals; per call
    (scheduled arrival, end, code), latency counted from the scheduled arrival."""
    rng = random.Random(seed)
    times, at = [], 0.0
    for _ in range(num):
        at += rng.expovariate(rate)
        if at > max_seconds:
            break
        times.append(at)
    return await scheduled(send, times, bar)


async def scheduled(send, times: list[float], bar) -> dict:
    """Call i at times[i] seconds from now (open loop: a slow answer delays no later call); per call
    (scheduled arrival, end, code) in call order, latency counted from the scheduled arrival."""
    records: list = [None] * len(times)
    t0 = time.perf_counter()

    async def one(i: int, at: float):
        code = await send(i)
        records[i] = (at, time.perf_counter() - t0, code)
        bar.update()

    tasks = []
    for i, at in enumerate(times):
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(i, at)))
    await asyncio.gather(*tasks)
    return {"records": records}


async def run_job(send, job: dict) -> dict:
    cpu = time.process_time()
    with tqdm(total=job["num"], desc=job["label"], unit="call", leave=False, file=sys.stderr,
              disable=job.get("quiet", False)) as bar:
        if job["op"] == "closed":
            out = await closed_loop(send, job["num"], job["concurrency"], job["max_seconds"], bar)
        elif job["op"] == "scheduled":      # benchmarks/sim_validation.py: call i at job["times"][i]
            out = await scheduled(send, job["times"], bar)
        else:
            out = await open_loop(send, job["num"], job["rate"], job["max_seconds"], job["seed"], bar)
    out["client_cpu_s"] = time.process_time() - cpu
    return out


class GrpcClient:
    """The tenant API's Classify over one channel, one prebuilt request per call."""

    def __init__(self, init: dict):
        self.init = init
        self.channel = None

    async def start(self) -> None:
        init = self.init
        self.channel = grpc.aio.insecure_channel(init["address"])
        await asyncio.wait_for(self.channel.channel_ready(), 30)
        self.stub = tenant_pb2_grpc.TenantServiceStub(self.channel)
        texts, k = init["texts"], init.get("texts_per_call", 1)
        self.requests = [tenant_pb2.ClassifyRequest(adapter=init["adapter"], inputs=[
            tenant_pb2.Input(text=texts[(x + j) % len(texts)]) for j in range(k)]) for _, x in init["calls"]]
        self.metadata = [(("authorization", f"Bearer {k}"),) for k in init["keys"]]
        self.tenant_of = [t for t, _ in init["calls"]]
        self.timeout = init["rpc_timeout_s"]

    async def send(self, i: int) -> str:
        try:
            await self.stub.Classify(self.requests[i], metadata=self.metadata[self.tenant_of[i]], timeout=self.timeout)
            return "OK"
        except grpc.aio.AioRpcError as e:
            return e.code().name

    async def run(self, job: dict) -> dict:
        return await run_job(self.send, job)

    async def close(self) -> None:
        await self.channel.close()


def client_main(make=None) -> int:
    """--client-only: a JSON 'init' line on stdin, then one job per line; one result line per job. make(init): the
    client (start / run(job) / close coroutines; default the gRPC Classify client)."""
    async def serve():
        loop = asyncio.get_running_loop()
        readline = lambda: loop.run_in_executor(None, sys.stdin.readline)  # noqa: E731
        client = (make or GrpcClient)(json.loads(await readline()))
        await client.start()
        print(json.dumps({"ready": True}), flush=True)
        while line := await readline():
            job = json.loads(line)
            if job["op"] == "exit":
                break
            print(json.dumps(await client.run(job)), flush=True)
        await client.close()

    asyncio.run(serve())
    return 0


class SubprocessClient:
    """A benchmark's client in a child process: `script --client-only`, JSON lines on stdin/stdout (the first
    message configures it, then one job per line; benchmarks/http_load.py uses it too)."""

    def __init__(self, init: dict, script: Path | None = None):
        self.proc = subprocess.Popen([sys.executable, str(script or Path(__file__).resolve()), "--client-only"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._send(init)
        self._receive()

    def _send(self, msg: dict) -> None:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()

    def _receive(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the client process ended (exit code {self.proc.wait()})")
        return json.loads(line)

    def run(self, job: dict) -> dict:
        self._send(job)
        return self._receive()

    def close(self) -> None:
        try:
            self._send({"op": "exit"})
            self.proc.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


class SameProcessClient:
    """The load client (`make(init)`: start / run(job) / close coroutines; default the gRPC client) on its
    own event loop thread in this process (it shares the GIL with the server)."""

    def __init__(self, init: dict, make=None):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True, name="load-client").start()
        self.client = (make or GrpcClient)(init)
        self._call(self.client.start())

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def run(self, job: dict) -> dict:
        return self._call(self.client.run(job))

    def close(self) -> None:
        self._call(self.client.close())
        self.loop.call_soon_threadsafe(self.loop.stop)


# -- statistics ----------------------------------------------------------------------------------------
def summarize(records: list, *, is_open: bool) -> dict:
    """throughput = OK answers / (last answer - first send; for open loop: - time 0)."""
    ok = [(end - start) * 1000 for start, end, code in records if code == "OK"]
    errors = Counter(code for _, _, code in records if code != "OK")
    first = 0.0 if is_open else min((s for s, _, _ in records), default=0.0)
    seconds = max((e for _, e, _ in records), default=0.0) - first
    r = lambda x: None if x is None else round(x, 3)  # noqa: E731
    return {"num_calls": len(records), "num_ok": len(ok), "seconds": round(seconds, 3),
            "throughput_rps": round(len(ok) / seconds, 2) if seconds > 0 else 0.0,
            "p50_ms": r(percentile(ok, 50)), "p90_ms": r(percentile(ok, 90)), "p99_ms": r(percentile(ok, 99)),
            "mean_ms": r(statistics.fmean(ok)) if ok else None, "errors": dict(errors)}


# -- the server side (this process) --------------------------------------------------------------------
class OwnServer:
    """Server + App on a background event loop; tenants and adapters through app.manager. overrides: more
    ServerConfig settings (benchmarks/scaleout.py: replicas)."""

    def __init__(self, args, data_dir: str, **overrides):
        from dispatcher.app import App
        from dispatcher.config import ServerConfig
        from dispatcher.server import Server

        config = ServerConfig(host="127.0.0.1", port=0, metrics_port=0, http_port=0, data_dir=data_dir, backbone=args.backbone,
                              admin_token="grpc-load-admin", max_concurrent_rpcs=max(256, 4 * args.max_in_flight),
                              max_waiting=max(10000, 4 * args.requests), log_level=args.log_level,
                              **({} if args.latency_target_ms is None else {"latency_target_ms": args.latency_target_ms}),
                              **overrides)
        from vbert.device import keep_host_heap

        keep_host_heap(config.host_heap_keep_mb)          # as `vbert serve` does at start (vbert/device.py)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True, name="server-loop").start()
        self.app = App.create(config)

        async def start():   # grpc.aio servers belong to the loop they are created on
            server = Server(self.app)
            await server.start()
            return server

        self.server = self._call(start())
        self.address = f"127.0.0.1:{self.server.port}"
        from dispatcher.heap import GcPauses, freeze_startup_heap
        # as `vbert serve` does once it is up (dispatcher/heap.py); --no-freeze: to see what it changes
        self.frozen_objects = 0 if getattr(args, "no_freeze", False) else freeze_startup_heap()
        self.gc_pauses: dict[int, list[float]] = {}      # generation -> every pause while serving (seconds)
        GcPauses(lambda generation, seconds: self.gc_pauses.setdefault(generation, []).append(seconds)).install()

    def _call(self, coro, timeout=None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def add_tenants(self, names: list[str], artifacts) -> list[str]:
        from manager.records import Quotas

        m, keys = self.app.manager, []
        for name, art in zip(names, artifacts):
            _, key = m.create_tenant(name, Quotas(requests_per_s=1e6, burst=10 ** 6))
            m.upload_adapter(name, ADAPTER, art)
            keys.append(key)
        self.tenants = [m.get_tenant(n) for n in names]
        self.refs = [m.resolve(t, ADAPTER) for t in self.tenants]
        return keys

    def inprocess_job(self, init: dict, job: dict) -> dict:
        """The same calls straight to the engine, same number in flight, on the server's loop."""
        from dispatcher.errors import status_of

        app, texts, calls, deadline_s = self.app, init["texts"], init["calls"], init["rpc_timeout_s"]

        async def send(i: int) -> str:
            t, x = calls[i]
            req = app.new_request(self.tenants[t], self.refs[t], time.monotonic() + deadline_s, text=texts[x])
            try:
                await asyncio.wrap_future(app.engine.submit(req))
                return "OK"
            except Exception as e:  # noqa: BLE001 - counted by its status code, as the server would answer
                return status_of(e)[0].name

        return self._call(run_job(send, job))

    def close(self) -> None:
        self._call(self.server.drain_and_stop(), 120)
        self.loop.call_soon_threadsafe(self.loop.stop)


class RemoteServer:
    """A running server on loopback: tenants through the admin API (deleted by close())."""

    def __init__(self, args):
        from dispatcher.gen.vbert.v1 import admin_pb2_grpc

        self.address, self.token = args.target, args.admin_token
        self.channel = grpc.insecure_channel(self.address)
        self.admin = admin_pb2_grpc.AdminServiceStub(self.channel)
        self.md = (("authorization", f"Bearer {self.token}"),)
        self.names: list[str] = []
        self.app = None

    def add_tenants(self, names: list[str], artifacts) -> list[str]:
        import hashlib
        import io
        import tarfile
        import tempfile

        from dispatcher.gen.vbert.v1 import admin_pb2
        from vbert import save_artifact

        keys = []
        for name, art in zip(names, artifacts):
            resp = self.admin.RegisterTenant(admin_pb2.RegisterTenantRequest(
                name=name, quotas=admin_pb2.Quotas(requests_per_s=1e6, burst=10 ** 6)), metadata=self.md, timeout=60)
            self.names.append(name)
            keys.append(resp.api_key)
            with tempfile.TemporaryDirectory() as tmp:
                folder = save_artifact(art, Path(tmp) / "adapter")
                buf = io.BytesIO()
                with tarfile.open(fileobj=buf, mode="w") as tar:
                    for f in sorted(folder.iterdir()):
                        tar.add(f, arcname=f.name)
                payload = buf.getvalue()
            header = admin_pb2.UploadAdapterHeader(tenant=name, name=ADAPTER, sha256=hashlib.sha256(payload).hexdigest(),
                                                   size=len(payload), activate=True)
            chunks = [admin_pb2.UploadAdapterChunk(header=header)] + [
                admin_pb2.UploadAdapterChunk(data=payload[i:i + (1 << 20)]) for i in range(0, len(payload), 1 << 20)]
            self.admin.UploadAdapter(iter(chunks), metadata=self.md, timeout=120)
        return keys

    def close(self) -> None:
        from dispatcher.gen.vbert.v1 import admin_pb2

        for name in self.names:
            try:
                self.admin.DeleteTenant(admin_pb2.TenantRef(name=name), metadata=self.md, timeout=60)
            except grpc.RpcError as e:
                print(f"could not delete tenant {name}: {e.code().name} {e.details()}", file=sys.stderr)
        self.channel.close()


# -- the run -------------------------------------------------------------------------------------------
def load_texts(data_dir: Path) -> list[str]:
    path = data_dir / "cls" / "sci-cite" / "train.txt"
    if not path.is_file():
        raise SystemExit(f"missing {path}: the benchmarks read ../shared/data (see its README)")
    with path.open() as f:
        texts = [t for t in (json.loads(line).get("text", "") for line in f if line.strip()) if t.strip()]
    if not texts:
        raise SystemExit(f"no texts in {path}")
    return texts


def make_artifacts(shape, num: int, seed: int, rank: int):
    import torch

    from vbert import AdapterArtifact, Head, HeadKind, HeadSpec, LoraAdapter

    spec = HeadSpec(HeadKind.CLASSIFY, LABELS)
    out = []
    for i in range(num):
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        out.append(AdapterArtifact(LoraAdapter.random(shape, rank=rank, generator=g, std=0.05),
                                   Head.random(spec, shape.hidden_size, generator=g)))
    return out


def check_target(target: str) -> None:
    from dispatcher.config import is_loopback

    host, sep, port = target.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit():
        raise SystemExit(f"--target {target!r} must be HOST:PORT")
    if not is_loopback(host):
        raise SystemExit(f"--target {target!r} is not a loopback address: this load generator only runs "
                         f"against this machine (127.0.0.1, ::1 or localhost)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, help="where to write the results (a PNG goes next to it)")
    p.add_argument("--tenants", type=int, default=20)
    p.add_argument("--concurrency", default="1,8,32,64", help="closed-loop levels (comma-separated)")
    p.add_argument("--rates", default=None, help="open-loop calls/s (comma-separated); default: "
                   f"{', '.join(map(str, OPEN_FRACTIONS))} x the gRPC throughput at --batch-concurrency")
    p.add_argument("--batch-concurrency", type=int, default=64, help="the batch-friendly level: top-level "
                   "numbers and the gRPC / in-process rounds")
    p.add_argument("--rounds", type=int, default=4, help="gRPC / in-process rounds (each runs both)")
    p.add_argument("--requests", type=int, default=1500, help="at most this many calls per level")
    p.add_argument("--max-seconds", type=float, default=20.0, help="at most this long per level")
    p.add_argument("--warmup", type=int, default=200, help="untimed calls of each path first")
    p.add_argument("--max-in-flight", type=int, default=256, help="sizes the server's max_concurrent_rpcs")
    p.add_argument("--rpc-timeout", type=float, default=30.0, help="per-call deadline, seconds")
    p.add_argument("--client", choices=("subprocess", "same"), default="subprocess",
                   help="where the gRPC client runs: a child process (default) or this process")
    p.add_argument("--target", default=None, help="HOST:PORT of a running server on loopback")
    p.add_argument("--admin-token", default=None, help="with --target: the admin token")
    p.add_argument("--backbone", default=None, help="checkpoint directory (default: all-MiniLM-L6-v2)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank of the tenants' adapters")
    p.add_argument("--latency-target-ms", type=float, default=None,
                   help="the server's latency_target_ms (default: the server's default)")
    p.add_argument("--log-level", default="WARNING", help="server log level (INFO = one JSON line per RPC)")
    p.add_argument("--no-freeze", action="store_true", help="do not freeze the server's start-up heap (as `vbert "
                   "serve` does: dispatcher/heap.py); the JSON's `gc` shows the collections' pauses either way")
    p.add_argument("--data-dir", type=Path, default=DATA_DIR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--client-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.client_only:
        if args.json is None:
            p.error("--json PATH is required")
        if args.target is not None:
            check_target(args.target)
            if not args.admin_token:
                p.error("--target needs --admin-token (tenants and adapters are registered through the admin API)")
        for name in ("tenants", "batch_concurrency", "rounds", "requests", "max_in_flight"):
            if getattr(args, name) < 1:
                p.error(f"--{name.replace('_', '-')} must be >= 1")
        if args.max_seconds <= 0 or args.rpc_timeout <= 0:
            p.error("--max-seconds and --rpc-timeout must be > 0")
        try:
            args.concurrency_levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
            args.rate_levels = None if args.rates is None else [float(r) for r in args.rates.split(",") if r.strip()]
        except ValueError:
            p.error("--concurrency takes integers and --rates numbers, comma-separated")
        if not args.concurrency_levels or min(args.concurrency_levels) < 1 or \
                (args.rate_levels is not None and (not args.rate_levels or min(args.rate_levels) <= 0)):
            p.error("--concurrency levels must be >= 1 and --rates > 0")
    return args


def run(args) -> dict:
    import tempfile

    import torch

    from multitenant import git_revision, host_cpu

    from dispatcher.logs import configure

    configure(args.log_level)
    texts_all = load_texts(args.data_dir)
    rng = random.Random(args.seed)
    num_calls = max(args.requests, args.warmup)
    text_ids = rng.sample(range(len(texts_all)), min(num_calls, len(texts_all)))
    texts = [texts_all[i] for i in text_ids]
    calls = [(rng.randrange(args.tenants), i % len(texts)) for i in range(num_calls)]
    names = [f"load{args.seed}-t{i:03d}" for i in range(args.tenants)]

    tmp = tempfile.TemporaryDirectory(prefix="grpc-load-")
    if args.target is None:
        server = OwnServer(args, tmp.name)
        shape = server.app.model.spec.shape
    else:
        from vbert.backbone import BackboneSpec
        from vbert.config import default_backbone_path

        server = RemoteServer(args)
        shape = BackboneSpec.from_checkpoint(args.backbone or default_backbone_path()).shape
    results: dict = {}
    client = None
    try:
        keys = server.add_tenants(names, make_artifacts(shape, args.tenants, args.seed, args.rank))
        init = {"address": server.address, "keys": keys, "adapter": ADAPTER, "texts": texts, "calls": calls,
                "rpc_timeout_s": args.rpc_timeout}
        client = (SubprocessClient if args.client == "subprocess" else SameProcessClient)(init)
        results = measure(args, server, client, init)
    finally:
        if client is not None:
            client.close()
        server.close()
        tmp.cleanup()
    engine = None if args.target else {"device": str(getattr(server.app.model.device, "device", server.app.model.device)),
                                       "torch_threads": torch.get_num_threads()}
    return {"benchmark": "grpc_load", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": sys.argv,
            "git_revision": git_revision(), "host_cpu": host_cpu(), "server": "target " + args.target if args.target
            else "in-process (dispatcher.server.Server on 127.0.0.1, port 0)", "engine": engine,
            "client_process": args.client, "log_level": args.log_level,
            "gc": None if args.target else {"frozen_objects": server.frozen_objects,
                                            "pauses_while_serving": {
                                                str(g): {"count": len(v), "total_ms": round(1e3 * sum(v), 1),
                                                         "max_ms": round(1e3 * max(v), 2)}
                                                for g, v in sorted(server.gc_pauses.items())}},
            "workload": {"tenants": args.tenants, "adapter": f"LoRA rank {args.rank}, classify head {list(LABELS)}",
                         "texts": f"{len(texts)} sci-cite train sentences", "call": "unary Classify, 1 text",
                         "requests_per_level": args.requests, "max_seconds_per_level": args.max_seconds,
                         "warmup_calls": args.warmup, "seed": args.seed},
            **results}


def measure(args, server, client, init) -> dict:
    own = isinstance(server, OwnServer)
    c_batch = args.batch_concurrency
    num_levels = len(args.concurrency_levels) + (2 * args.rounds if own else args.rounds) + \
        (len(args.rate_levels) if args.rate_levels else len(OPEN_FRACTIONS))
    overall = tqdm(total=num_levels, desc="levels", unit="level", disable=args.quiet, position=0)

    def job(op: str, label: str, **kw) -> dict:
        return {"op": op, "label": label, "num": args.requests, "max_seconds": args.max_seconds,
                "quiet": args.quiet, **kw}

    def steps_and_rows() -> tuple[float, float]:
        """Computed steps and their rows so far, from the server's histogram (observed before a
        step's answers are sent, unlike engine.num_steps)."""
        samples = {s.name: s.value for m in server.app.metrics.batch_rows.collect() for s in m.samples}
        return samples["vbert_batch_rows_count"], samples["vbert_batch_rows_sum"]

    def timed(path: str, j: dict) -> dict:
        steps = steps_and_rows() if own else None
        cpu = time.process_time()
        out = client.run(j) if path == "grpc" else server.inprocess_job(init, j)
        s = summarize(out["records"], is_open=j["op"] == "open")
        if own:   # this process: the server, plus the in-process submitter or a same-process client
            s["this_process_cpu_s"] = round(time.process_time() - cpu, 3)
            (n0, r0), (n1, r1) = steps, steps_and_rows()
            s["engine_steps"] = int(n1 - n0)
            s["rows_per_step"] = round((r1 - r0) / (n1 - n0), 2) if n1 > n0 else None
        if path == "grpc" and args.client == "subprocess":
            s["client_process_cpu_s"] = round(out["client_cpu_s"], 3)
        overall.update()
        tqdm.write(f"{j['label']:>28}: {s['throughput_rps']:8.1f} calls/s  p50 {s['p50_ms']} ms  "
                   f"p99 {s['p99_ms']} ms  errors {s['errors'] or 0}", file=sys.stderr)
        return s

    warm = dict(job("closed", "warm-up", concurrency=c_batch), num=args.warmup)
    client.run(warm)
    if own:
        server.inprocess_job(init, dict(warm, label="warm-up in-process"))

    closed = [dict(concurrency=c, **timed("grpc", job("closed", f"closed c={c}", concurrency=c)))
              for c in args.concurrency_levels]

    rounds = []
    for k in range(args.rounds):
        order = ("grpc", "inprocess") if k % 2 == 0 else ("inprocess", "grpc")
        if not own:
            order = ("grpc",)
        r = {"round": k, "order": list(order)}
        for path in order:
            r[path] = timed(path, job("closed", f"round {k} {path} c={c_batch}", concurrency=c_batch))
        if own and r["inprocess"]["throughput_rps"]:
            r["grpc_over_inprocess"] = round(r["grpc"]["throughput_rps"] / r["inprocess"]["throughput_rps"], 4)
        rounds.append(r)
    grpc_rps = [r["grpc"]["throughput_rps"] for r in rounds]

    rates = args.rate_levels or [round(f * statistics.median(grpc_rps), 1) for f in OPEN_FRACTIONS]
    open_ = [dict(rate_rps=rate, **timed("grpc", job("open", f"open {rate:g}/s", rate=rate, seed=args.seed + i)))
             for i, rate in enumerate(rates)]
    overall.close()

    # the batch-friendly level's numbers: medians over the gRPC rounds
    top = {"batch_concurrency": c_batch, "throughput_rps": round(statistics.median(grpc_rps), 2),
           "p50_ms": statistics.median(r["grpc"]["p50_ms"] for r in rounds),
           "p99_ms": statistics.median(r["grpc"]["p99_ms"] for r in rounds),
           "top_level_note": f"gRPC closed loop at concurrency {c_batch}: median over the {args.rounds} "
                             f"rounds of throughput, p50 and p99"}
    if own:
        ratios = [r["grpc_over_inprocess"] for r in rounds if "grpc_over_inprocess" in r]
        inproc = [r["inprocess"]["throughput_rps"] for r in rounds]
        top.update(inprocess_throughput_rps=round(statistics.median(inproc), 2),
                   grpc_over_inprocess=round(statistics.median(ratios), 4) if ratios else None,
                   grpc_over_inprocess_rounds=ratios,
                   grpc_over_inprocess_of_medians=round(statistics.median(grpc_rps) / statistics.median(inproc), 4))
    else:
        top.update(inprocess_throughput_rps=None, grpc_over_inprocess=None,
                   grpc_over_inprocess_note="not measured against a --target server (no engine in this process)")
    return {**top, "closed": closed, "open": open_, "rounds": rounds}


def write_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    for rows, key, fmt, color, name in ((result["closed"], "concurrency", "c={:g}", "tab:blue", "closed"),
                                        (result["open"], "rate_rps", "{:g}/s", "tab:orange", "open")):
        rows = [r for r in rows if r["p50_ms"] is not None]
        x = [r["throughput_rps"] for r in rows]
        ax.plot(x, [r["p50_ms"] for r in rows], "o-", color=color, label=f"{name} loop p50")
        ax.plot(x, [r["p99_ms"] for r in rows], "s--", color=color, alpha=0.6, label=f"{name} loop p99")
        for r, xi in zip(rows, x):
            ax.annotate(fmt.format(r[key]), (xi, r["p50_ms"]), textcoords="offset points", xytext=(4, -10),
                        fontsize=7, color=color)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("throughput (answered calls / s)")
    ax.set_ylabel("latency (ms)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(f"gRPC Classify, 1 text per call, {result['workload']['tenants']} tenants", fontsize=10)
    rounds = result["rounds"]
    xs = range(len(rounds))
    bx.bar([x - 0.2 for x in xs], [r["grpc"]["throughput_rps"] for r in rounds], 0.4, label="gRPC", color="tab:blue")
    if all("inprocess" in r for r in rounds):
        bx.bar([x + 0.2 for x in xs], [r["inprocess"]["throughput_rps"] for r in rounds], 0.4,
               label="engine in-process", color="tab:gray")
    bx.set_xticks(list(xs), [f"round {r['round']}" for r in rounds])
    bx.set_ylabel("calls / s")
    ratio = result.get("grpc_over_inprocess")
    bx.set_title(f"c={result['batch_concurrency']}: gRPC / in-process = "
                 f"{'n/a' if ratio is None else f'{ratio:.3f}'}", fontsize=10)
    top = max([r["grpc"]["throughput_rps"] for r in rounds] + [r.get("inprocess", {}).get("throughput_rps", 0)
                                                                for r in rounds])
    bx.set_ylim(0, 1.3 * top if top else 1)
    bx.legend(fontsize=8, loc="upper center", ncol=2)
    fig.suptitle(f"{result['host_cpu']} ({result['engine']['torch_threads'] if result['engine'] else '?'} torch "
                 f"threads), client: {result['client_process']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.client_only:
        return client_main()
    result = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    write_plot(result, args.json.with_suffix(".png"))
    keys = ("throughput_rps", "p50_ms", "p99_ms", "inprocess_throughput_rps", "grpc_over_inprocess")
    print(json.dumps({k: result.get(k) for k in keys}))
    print(f"wrote {args.json} and {args.json.with_suffix('.png')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
