#!/usr/bin/env python
"""The client side of benchmarks/isolation.py, in child processes of their own (grpc only, no torch):
tenant B's probe and the loads (A's flood, idle streams, random keys). Started by isolation.py as
`isolation_clients.py --role b|load`; it talks JSON lines on stdin/stdout (see `child_main`)."""
from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import signal
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT,):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from dispatcher.gen.vbert.v1 import tenant_pb2, tenant_pb2_grpc  # noqa: E402  (light: no torch in children)

MIN_RETRY_S = 0.01


# -- children: B's probe and the load (grpc only, no torch) -------------------------------------------
def die_with_parent(parent_pid: int) -> None:
    """SIGTERM this process when the benchmark dies (Linux); exit at once if it already has."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        sys.exit(1)


def code_of(e: BaseException) -> str:
    return e.code().name if isinstance(e, grpc.aio.AioRpcError) else type(e).__name__


def retry_after_s(e: grpc.aio.AioRpcError) -> float | None:
    for key, value in e.trailing_metadata() or ():
        if key == "retry-after-ms":
            try:
                return int(value) / 1000
            except ValueError:
                return None
    return None


def channel(address: str, own_connection: bool = False) -> grpc.aio.Channel:
    """own_connection: a TCP connection of its own (gRPC shares one between equal channels otherwise)."""
    return grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)] if own_connection else [])


async def probe_b(stub, metadata, requests: list, job: dict) -> dict:
    """Open loop: call k is sent at k * interval; (scheduled time, latency ms from it, code) per call."""
    interval, warmup, seconds, timeout = job["interval"], job["warmup"], job["seconds"], job["timeout"]
    records, lags, details = [], [], {}
    t0 = time.perf_counter()

    async def one(k: int, at: float) -> None:
        try:
            await stub.Classify(requests[k % len(requests)], metadata=metadata, timeout=timeout)
            code = "OK"
        except grpc.aio.AioRpcError as e:
            code = code_of(e)
            details.setdefault(code, e.details())
        records.append((at, (time.perf_counter() - t0 - at) * 1000, code))

    tasks, k = [], 0
    while (at := k * interval) < warmup + seconds:
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        lags.append(time.perf_counter() - t0 - at)
        tasks.append(asyncio.ensure_future(one(k, at)))
        k += 1
    _, late = await asyncio.wait(tasks, timeout=timeout + 5)
    for t in late:
        t.cancel()
    measured = [r for r in records if r[0] >= warmup]
    return {"records": measured, "num_warmup_calls": len(records) - len(measured), "num_unfinished": len(late),
            "error_details": details,
            "send_lag_max_ms": round(max(lags, default=0.0) * 1000, 2)}


def window_counts(records: list, warmup: float, seconds: float) -> dict:
    """Calls that ended inside [warmup, warmup + seconds): OK / refused by code, and rates."""
    inside = [(code, n) for end, code, n in records if warmup <= end < warmup + seconds]
    ok = [n for code, n in inside if code == "OK"]
    refused = Counter(code for code, _ in inside if code != "OK")
    return {"ok": len(ok), "texts_ok": sum(ok), "refused": dict(refused), "ok_per_s": round(len(ok) / seconds, 2),
            "calls_per_s": round(len(inside) / seconds, 2)}


async def flood(init: dict, job: dict) -> dict:
    """Workers send Classify calls of many texts; RESOURCE_EXHAUSTED -> wait the retry-after hint."""
    ch = channel(init["address"])
    stub = tenant_pb2_grpc.TenantServiceStub(ch)
    md = (("authorization", f"Bearer {init['key']}"),)
    texts, n = init["texts"], init["texts_per_request"]
    rng = random.Random(init["seed"])
    reqs = [tenant_pb2.ClassifyRequest(adapter=init["adapter"], inputs=[tenant_pb2.Input(text=t) for t in
                                                                     rng.sample(texts, min(n, len(texts)))])
            for _ in range(64)]
    records, waits = [], []
    t0 = time.perf_counter()
    stop = t0 + job["warmup"] + job["seconds"]

    async def worker(w: int) -> None:
        k = w
        while time.perf_counter() < stop:
            req = reqs[k % len(reqs)]
            try:
                await stub.Classify(req, metadata=md, timeout=init["rpc_timeout"])
                records.append((time.perf_counter() - t0, "OK", len(req.inputs)))
                k += 1
                continue
            except grpc.aio.AioRpcError as e:
                records.append((time.perf_counter() - t0, code_of(e), 0))
                hint = retry_after_s(e) if e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED else None
            wait = max(MIN_RETRY_S, hint or 0.0)
            waits.append(wait)
            await asyncio.sleep(min(wait, max(0.0, stop - time.perf_counter())))

    tasks = [asyncio.ensure_future(worker(w)) for w in range(init["concurrency"])]
    await asyncio.wait(tasks, timeout=max(0.0, stop - time.perf_counter()))
    cancelled = sum(not t.done() for t in tasks)   # calls in flight at the end: cancelled
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await ch.close()
    return {"kind": "flood", "window": window_counts(records, job["warmup"], job["seconds"]),
            "total": window_counts(records, 0.0, job["warmup"] + job["seconds"] + 1e-9),
            "in_flight_cancelled_at_end": cancelled,
            "retry_wait_ms": {"count": len(waits), "median": round(statistics.median(waits) * 1000, 1) if waits
                              else None, "max": round(max(waits) * 1000, 1) if waits else None}}


async def idle_streams(init: dict, job: dict) -> dict:
    """Health Watch streams and tenant ClassifyStream calls that never send a request, held until the end."""
    total_s = job["warmup"] + job["seconds"]
    chans = [channel(init["address"], own_connection=True) for _ in range(init["channels"])]
    md = (("authorization", f"Bearer {init['key']}"),)
    stats = {"health": {"requested": init["health"], "opened": 0, "ended": Counter()},
             "tenant": {"requested": init["tenant"], "ended": Counter()}}
    t0 = time.perf_counter()
    never = asyncio.Event()

    async def requests():   # a request iterator that never yields
        await never.wait()
        return
        yield  # noqa: unreachable - makes this an async generator

    async def hold(kind: str, ch) -> None:
        if kind == "health":
            call = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=total_s + 30)
        else:
            call = tenant_pb2_grpc.TenantServiceStub(ch).ClassifyStream(requests(), metadata=md,
                                                                        timeout=total_s + 30)
        try:
            first = True
            async for _ in call:
                if first and kind == "health":
                    stats["health"]["opened"] += 1
                first = False
            code = "OK (ended)"
        except grpc.aio.AioRpcError as e:
            code = code_of(e)
        except asyncio.CancelledError:
            call.cancel()
            raise
        stats[kind]["ended"][code] += 1

    kinds = ["health"] * init["health"] + ["tenant"] * init["tenant"]
    tasks = [asyncio.ensure_future(hold(kind, chans[i % len(chans)])) for i, kind in enumerate(kinds)]
    await asyncio.sleep(max(0.0, t0 + job["warmup"] - time.perf_counter()))
    held_at_start = sum(not t.done() for t in tasks)
    await asyncio.sleep(max(0.0, t0 + total_s - time.perf_counter()))
    held = Counter(kind for kind, t in zip(kinds, tasks) if not t.done())
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ch in chans:
        await ch.close()
    for kind in stats:
        stats[kind]["ended"] = dict(stats[kind]["ended"])
        stats[kind]["held_at_end"] = held[kind]
    return {"kind": "streams", "channels": init["channels"], "held_at_window_start": held_at_start, **stats,
            "window": {"ok": held["health"] + held["tenant"],
                       "refused": dict(Counter(stats["health"]["ended"]) + Counter(stats["tenant"]["ended"]))},
            "window_note": "ok = streams still open at the end; refused = streams the server ended, by code"}


async def failed_auth(init: dict, job: dict) -> dict:
    """Classify calls with random bearer keys, `concurrency` in flight, as fast as they are answered."""
    ch = channel(init["address"])
    stub = tenant_pb2_grpc.TenantServiceStub(ch)
    req = tenant_pb2.ClassifyRequest(adapter=init["adapter"], inputs=[tenant_pb2.Input(text=init["text"])])
    records = []
    t0 = time.perf_counter()
    stop = t0 + job["warmup"] + job["seconds"]

    async def worker() -> None:
        while time.perf_counter() < stop:
            md = (("authorization", "Bearer vb_" + secrets.token_urlsafe(24)),)
            try:
                await stub.Classify(req, metadata=md, timeout=init["rpc_timeout"])
                code = "OK"
            except grpc.aio.AioRpcError as e:
                code = code_of(e)
            records.append((time.perf_counter() - t0, code, 1))

    tasks = [asyncio.ensure_future(worker()) for _ in range(init["concurrency"])]
    await asyncio.wait(tasks, timeout=max(0.0, stop - time.perf_counter()) + init["rpc_timeout"])
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await ch.close()
    return {"kind": "auth", "window": window_counts(records, job["warmup"], job["seconds"]),
            "total": window_counts(records, 0.0, job["warmup"] + job["seconds"] + 1e-9)}


LOADS = {"flood": flood, "streams": idle_streams, "auth": failed_auth}


def child_main(role: str) -> int:
    """A JSON init line on stdin, {"ready": true} back, then jobs (one line each, one result line back).
    role b: B's probe, one job per phase until {"op": "exit"}; role load: one job, then exits."""
    async def serve() -> None:
        loop = asyncio.get_running_loop()
        readline = lambda: loop.run_in_executor(None, sys.stdin.readline)  # noqa: E731
        init = json.loads(await readline())
        die_with_parent(init["parent_pid"])
        if role == "b":
            ch = channel(init["address"])
            await asyncio.wait_for(ch.channel_ready(), 30)
            stub = tenant_pb2_grpc.TenantServiceStub(ch)
            reqs = [tenant_pb2.ClassifyRequest(adapter=init["adapter"], inputs=[tenant_pb2.Input(text=t)])
                    for t in init["texts"]]
            md = (("authorization", f"Bearer {init['key']}"),)
        print(json.dumps({"ready": True}), flush=True)
        while line := await readline():
            job = json.loads(line)
            if job.get("op") == "exit":
                break
            cpu = time.process_time()
            result = await (probe_b(stub, md, reqs, job) if role == "b" else LOADS[init["kind"]](init, job))
            result["client_cpu_s"] = round(time.process_time() - cpu, 2)
            print(json.dumps(result), flush=True)
            if role == "load":
                break
        if role == "b":
            await ch.close()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--role" or sys.argv[2] not in ("b", "load"):
        sys.exit("usage: isolation_clients.py --role b|load (started by benchmarks/isolation.py)")
    sys.exit(child_main(sys.argv[2]))
