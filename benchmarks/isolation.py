#!/usr/bin/env python
"""Latency isolation between tenants (issue 17): how much a small, steady tenant B suffers while
others flood the server, hold idle streams, or hammer it with bad keys, measured in one run.

    .venv/bin/python benchmarks/isolation.py --json benchmarks/out/isolation.json
    .venv/bin/python benchmarks/isolation.py --quick                      # 5 s phases, a smoke run
    .venv/bin/python benchmarks/isolation.py --server-env VBERT_LATENCY_TARGET_MS=200

It starts the real server as a subprocess (`.venv/bin/vbert serve`) on 127.0.0.1 with a free port,
a temporary data dir, the default backbone (all-MiniLM-L6-v2), metrics on a free loopback port (scraped
for the tokens the engine computed in each measured window: `server_tokens_per_s`), a random admin token
and log level WARNING; `--server-env KEY=VALUE` (repeatable) adds or overrides `VBERT_*` settings
(VBERT_* variables of this shell are not passed on). A server that does not come up (e.g. it rejects
a setting) is reported in the JSON (`error`, `server_log_tail`), not as a traceback. Tenants A and B
are registered with the default quotas through the admin API, each with a LoRA adapter (rank 8) and
a classify head (the three sci-cite labels). The server is SIGTERMed at the end (killed if it has
not exited 30 s later), also on error; it and every child get SIGTERM if this script dies.

Tenant B, in its own child process: a unary Classify of one short sci-cite train sentence (8 to 25
words, read in place from ../shared/data) every --b-interval s, open loop (each call is sent at its
scheduled time, whether or not earlier ones were answered; latency counts from the scheduled time).
Phases (each --warmup s unmeasured, then --phase-seconds measured, B running throughout):
  alone         B only.
  flood_quota   tenant A (another child process) floods at its default quota: --a-concurrency
                workers, each sending Classify calls of --a-texts texts of 128-256 tokens (sci-cite
                sentences joined up); on RESOURCE_EXHAUSTED a worker waits the `retry-after-ms`
                trailer (at least 10 ms) and sends again, on other errors it waits 10 ms.
  flood_10x     the same after A's requests_per_s and burst are raised tenfold (admin UpdateQuotas;
                they stay raised for the later phases).
  idle_streams  a child opens --idle-health-streams grpc.health.v1 Watch streams and
                --idle-tenant-streams ClassifyStream calls with A's key whose request iterator never
                yields, over --idle-channels connections, and holds them through the phase.
  failed_auth   a child sends Classify calls with random bearer keys ("vb_" + random) as fast as it
                can (--auth-concurrency calls in flight).
Per phase: B's p50/p90/p99/mean/max latency of the answered calls, its calls and errors by status
code, the load's calls answered OK / refused by code inside the measured window, and the server's
RSS (VmRSS polled every 0.2 s: max per phase and overall; VmHWM at the end).

All clients reach the server over 127.0.0.1, so limits kept per client address see B and the others
as one peer (as behind one NAT); `--separate-peers` has the server listen on localhost (IPv4 and
IPv6) and B connect over [::1], everyone else over 127.0.0.1.

Top-level JSON keys: b_p99_alone_ms, b_p99_flood_ms (the worst p99 of the non-alone phases, over
B's answered calls), latency_target_ms (a *latency_target* field of admin GetStatus, at any depth,
when the server reports one; else VBERT_LATENCY_TARGET_MS as passed
with --server-env; else null; `latency_target_source` says which), b_errors (over all phases),
rss_max_bytes, rss_hwm_bytes, target_met (b_p99_flood_ms <= 2 * b_p99_alone_ms + latency_target_ms,
b_errors == 0 and every phase ran; null without a target), phases (each with the server's GetStatus
after it), machine, command, server_env, git (HEAD and the uncommitted changes under the server's
packages: the server runs from the working tree). A PNG next to the JSON: B's latency per phase
(box 1-99 %, p99 marked, log scale) and the server's RSS over time. With ~100 calls per phase (20 s
at 0.2 s) the p99 is close to the worst call; the clients share the machine's CPUs with the server.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import random
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from grpc_load import LABELS, load_texts, percentile  # noqa: E402

DATA_DIR = ROOT.parent / "shared" / "data"
ADAPTER = "cls"
TENANT_A, TENANT_B = "iso-a", "iso-b"
PHASES = ("alone", "flood_quota", "flood_10x", "idle_streams", "failed_auth")
LOAD_OF = {"alone": None, "flood_quota": "flood", "flood_10x": "flood", "idle_streams": "streams",
           "failed_auth": "auth"}
TARGET_ENVS = ("VBERT_LATENCY_TARGET_MS",)
SERVER_PACKAGES = ("dispatcher", "manager", "scheduler", "vbert", "protos")


# -- the parent: server process, children, RSS --------------------------------------------------------
class Child:
    """isolation_clients.py with --role; a reader thread turns its stdout lines into a queue."""

    def __init__(self, role: str, init: dict, ready_timeout: float = 60.0):
        self.role = role
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve().with_name("isolation_clients.py")),
                                      "--role", role],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True, name=f"child-{role}").start()
        try:
            self.send({**init, "parent_pid": os.getpid()})
            self.receive(ready_timeout)
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def send(self, msg: dict) -> None:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()

    def receive(self, timeout: float) -> dict:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"the {self.role} child sent nothing for {timeout:.0f} s") from None
        if line is None:
            raise RuntimeError(f"the {self.role} child ended (exit code {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send({"op": "exit"})
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (/proc/<pid>/stat), None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def proc_status(pid: int, key: str) -> int | None:
    """A kB field of /proc/<pid>/status in bytes (VmRSS, VmHWM); None when gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


# exec the server with PR_SET_PDEATHSIG (kept across exec), so it gets SIGTERM if this script dies
_EXEC_WITH_PARENT = ("import ctypes, os, signal, sys\n"
                     "try:\n    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"
                     "except (OSError, AttributeError):\n    pass\n"
                     "if os.getppid() != int(sys.argv[1]):\n    sys.exit(1)\n"
                     "os.execv(sys.argv[2], sys.argv[2:])\n")


class ServerProcess:
    """`vbert serve` on 127.0.0.1, its log in a file, VmRSS polled by a thread."""

    def __init__(self, env: dict, log_path: Path, rss_interval: float):
        exe = Path(sys.executable).parent / "vbert"
        cmd = [str(exe), "serve"] if exe.is_file() else \
            [sys.executable, "-c", "import sys; from dispatcher.cli import main; sys.exit(main())", "serve"]
        if sys.platform.startswith("linux"):
            cmd = [sys.executable, "-c", _EXEC_WITH_PARENT, str(os.getpid()), *cmd]
        self.command = cmd
        self.address = f"127.0.0.1:{env['VBERT_PORT']}"
        # B on IPv6 loopback when the server listens on both (VBERT_HOST=localhost): another peer address
        self.b_address = f"[::1]:{env['VBERT_PORT']}" if env.get("VBERT_HOST") == "localhost" else self.address
        self.metrics_url = f"http://127.0.0.1:{env['VBERT_METRICS_PORT']}/metrics" \
            if env.get("VBERT_METRICS_PORT", "0") != "0" else None
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        self.t0 = time.perf_counter()
        self.phase = "start"
        self.samples: list[tuple[float, int, str]] = []
        self._stop = threading.Event()
        self._interval = rss_interval
        threading.Thread(target=self._poll_rss, daemon=True, name="rss").start()

    def _poll_rss(self) -> None:
        while not self._stop.is_set():
            rss = proc_status(self.proc.pid, "VmRSS")
            if rss is not None:
                self.samples.append((round(time.perf_counter() - self.t0, 3), rss, self.phase))
            self._stop.wait(self._interval)

    def now(self) -> float:
        return round(time.perf_counter() - self.t0, 3)

    def wait_ready(self, timeout: float) -> float:
        """Seconds until health says SERVING; RuntimeError if the process ends or time runs out."""
        deadline = time.perf_counter() + timeout
        with grpc.insecure_channel(self.address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.perf_counter() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited with code {self.proc.returncode} before it was ready")
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                            health_pb2.HealthCheckResponse.SERVING:
                        return self.now()
                except grpc.RpcError:
                    pass
                time.sleep(0.5)
        raise RuntimeError(f"the server was not SERVING after {timeout:.0f} s")

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, num_lines: int = 30) -> list[str]:
        self._log.flush()
        try:
            return self.log_path.read_text(errors="replace").splitlines()[-num_lines:]
        except OSError:
            return []

    def stop(self, grace_s: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after grace_s; the exit code."""
        self._stop.set()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


# -- workload ------------------------------------------------------------------------------------------
def token_counter():
    """Tokens of a text as the server counts them ([CLS] + wordpieces + [SEP]); ~1.35 per word without
    the backbone's tokenizer.json."""
    try:
        from tokenizers import Tokenizer

        from vbert.config import default_backbone_path

        tok = Tokenizer.from_file(str(Path(default_backbone_path()) / "tokenizer.json"))
        tok.no_truncation()
        tok.no_padding()
        return lambda t: len(tok.encode(t).ids), "tokenizer.json of the default backbone"
    except Exception:  # noqa: BLE001 - an estimate is good enough to size the texts
        return lambda t: int(1.35 * len(t.split())) + 2, "estimate: 1.35 tokens per word"


def make_texts(texts: list[str], seed: int, num_long: int = 256) -> tuple[list[str], list[str], dict]:
    """B's short sentences (8-25 words) and A's long texts (sentences joined up to 128-256 tokens)."""
    rng = random.Random(seed)
    count, how = token_counter()
    short = [t for t in texts if 8 <= len(t.split()) <= 25]
    short = rng.sample(short, min(200, len(short)))
    long_texts = []
    while len(long_texts) < num_long:
        goal, text = rng.randint(128, 256), ""
        for _ in range(40):
            cand = (text + " " + rng.choice(texts)).strip()
            if count(cand) > 256:
                continue
            text = cand
            if count(text) >= goal:
                break
        if count(text) >= 128:
            long_texts.append(text)
    a_tokens, b_tokens = sorted(map(count, long_texts)), sorted(map(count, short))
    stats = lambda xs: {"min": xs[0], "median": statistics.median(xs), "max": xs[-1]}  # noqa: E731
    return short, long_texts, {"token_count": how, "b_texts": len(short), "b_tokens": stats(b_tokens),
                               "a_texts": len(long_texts), "a_tokens": stats(a_tokens)}


def write_adapters(out: Path, seed: int, rank: int) -> list[Path]:
    """Two adapter directories (LoRA + classify head) for the default backbone."""
    from grpc_load import make_artifacts
    from vbert import save_artifact
    from vbert.backbone import BackboneSpec
    from vbert.config import default_backbone_path

    shape = BackboneSpec.from_checkpoint(default_backbone_path()).shape
    return [save_artifact(art, out / f"adapter-{i}", backbone_name="all-MiniLM-L6-v2", shape=shape)
            for i, art in enumerate(make_artifacts(shape, 2, seed, rank))]


def server_status(address: str, token: str) -> dict | None:
    """admin GetStatus as a dict (every field this server has), None if it does not answer."""
    from google.protobuf.json_format import MessageToDict

    from dispatcher.gen.vbert.v1 import admin_pb2, admin_pb2_grpc

    try:
        with grpc.insecure_channel(address) as ch:
            status = admin_pb2_grpc.AdminServiceStub(ch).GetStatus(
                admin_pb2.GetStatusRequest(), metadata=(("authorization", f"Bearer {token}"),), timeout=10)
    except grpc.RpcError:
        return None
    return MessageToDict(status, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def latency_target(status: dict | None, server_env: dict) -> tuple[float | None, str | None]:
    """The server's step latency target in ms: a *latency_target* field of GetStatus (at any depth;
    what the server runs with), else the value passed in the environment, else None."""
    def find(d: dict, path: str):
        for key, value in d.items():
            if isinstance(value, dict):
                if (hit := find(value, f"{path}{key}.")) is not None:
                    return hit
            elif "latency_target" in key and isinstance(value, (int, float)) and value > 0:
                scale = 1000.0 if key.endswith("_s") else 1e-3 if key.endswith("_us") else 1.0
                return float(value) * scale, f"admin GetStatus {path}{key}"
        return None

    if status and (hit := find(status, "")) is not None:
        return hit
    for key in TARGET_ENVS:
        if key in server_env:
            try:
                return float(server_env[key]), f"--server-env {key} (not reported by the server)"
            except ValueError:
                pass
    return None, None


def git_state() -> dict:
    """HEAD and the uncommitted changes under the server's packages: the server runs from the working tree."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout.rstrip()

    try:
        return {"head": git("rev-parse", "HEAD"),
                "uncommitted": git("status", "--porcelain", "--", *SERVER_PACKAGES).splitlines()}
    except (OSError, subprocess.CalledProcessError):
        return {"head": None, "uncommitted": None}


# -- the run -------------------------------------------------------------------------------------------
def summarize_b(out: dict, seconds: float) -> dict:
    ok = [lat for _, lat, code in out["records"] if code == "OK"]
    r = lambda x: None if x is None else round(x, 1)  # noqa: E731
    return {"num_calls": len(out["records"]), "num_ok": len(ok),
            "errors": dict(Counter(code for _, _, code in out["records"] if code != "OK")),
            "error_details": out["error_details"],
            "p50_ms": r(percentile(ok, 50)), "p90_ms": r(percentile(ok, 90)), "p99_ms": r(percentile(ok, 99)),
            "mean_ms": r(statistics.fmean(ok)) if ok else None, "max_ms": r(max(ok)) if ok else None,
            "ok_per_s": round(len(ok) / seconds, 2), "num_warmup_calls": out["num_warmup_calls"],
            "num_unfinished": out["num_unfinished"], "send_lag_max_ms": out["send_lag_max_ms"],
            "client_cpu_s": out["client_cpu_s"],
            "latencies_ms": [round(x, 1) for x in ok]}


def load_init(kind: str, args, address: str, key_a: str, a_texts: list[str], b_texts: list[str], phase: str) -> dict:
    base = {"address": address, "kind": kind, "adapter": ADAPTER}
    if kind == "flood":
        return {**base, "key": key_a, "texts": a_texts, "texts_per_request": args.a_texts,
                "concurrency": args.a_concurrency, "rpc_timeout": args.rpc_timeout,
                "seed": args.seed + PHASES.index(phase)}
    if kind == "streams":
        return {**base, "key": key_a, "health": args.idle_health_streams, "tenant": args.idle_tenant_streams,
                "channels": args.idle_channels}
    return {**base, "text": b_texts[0], "concurrency": args.auth_concurrency, "rpc_timeout": 5.0}


def computed_tokens(server: ServerProcess) -> float | None:
    """Tokens the server's engine has computed so far (the sum of its vbert_batch_tokens histogram)."""
    if server.metrics_url is None:
        return None
    import urllib.request
    try:
        body = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    except OSError:
        return None
    for line in body.splitlines():
        if line.startswith("vbert_batch_tokens_sum"):
            return float(line.split()[-1])
    return None


def run_phases(args, server: ServerProcess, admin, token: str, keys: dict, a_texts, b_texts, bar) -> list[dict]:
    b = Child("b", {"address": server.b_address, "key": keys[TENANT_B], "adapter": ADAPTER, "texts": b_texts})
    phases = []
    try:
        for name in args.phases:
            if not server.is_alive():
                phases.append({"name": name, "skipped": f"the server had exited (code {server.proc.returncode})"})
                bar.update()
                continue
            entry: dict = {"name": name, "warmup_s": args.warmup, "seconds": args.phase_seconds}
            if name == "flood_10x":
                q = admin.get_tenant(TENANT_A)["quotas"]
                entry["a_quotas_before"] = q
                entry["a_quotas"] = admin.update_quotas(TENANT_A, requests_per_s=10 * q["requests_per_s"],
                                                        burst=10 * q["burst"])["quotas"]
            elif name.startswith("flood"):
                entry["a_quotas"] = admin.get_tenant(TENANT_A)["quotas"]
            kind = LOAD_OF[name]
            load = None
            try:
                server.phase = name
                if kind is not None:
                    load = Child("load", load_init(kind, args, server.address, keys[TENANT_A], a_texts, b_texts, name))
                job = {"warmup": args.warmup, "seconds": args.phase_seconds}
                entry["t_start"] = server.now()
                cpu0 = cpu_seconds(server.proc.pid)
                if load is not None:
                    load.send(job)
                b.send({**job, "interval": args.b_interval, "timeout": args.rpc_timeout})
                entry["t_measure"] = round(entry["t_start"] + args.warmup, 3)
                window: dict = {}   # the engine's computed tokens at the start and the end of the measured window
                timers = [threading.Timer(delay, lambda k=k: window.__setitem__(k, (time.perf_counter(),
                                                                                     computed_tokens(server))))
                          for k, delay in (("start", args.warmup), ("end", args.warmup + args.phase_seconds))]
                for t in timers:
                    t.start()
                limit = args.warmup + args.phase_seconds + args.rpc_timeout + 30
                entry["b"] = summarize_b(b.receive(limit), args.phase_seconds)
                for t in timers:
                    t.join()
                (t0, n0), (t1, n1) = window.get("start", (0, None)), window.get("end", (0, None))
                entry["server_tokens_per_s"] = round((n1 - n0) / (t1 - t0), 1) if None not in (n0, n1) else None
                if load is not None:
                    entry["load"] = load.receive(limit)
                entry["t_end"] = server.now()
                cpu1 = cpu_seconds(server.proc.pid)
                if cpu0 is not None and cpu1 is not None:
                    entry["server_cpu_s"] = round(cpu1 - cpu0, 2)
                    entry["server_cpu_share"] = round((cpu1 - cpu0) / (entry["t_end"] - entry["t_start"]), 2)
            finally:
                if load is not None:
                    load.close()
                server.phase = "between"
            rss = [s for _, s, p in server.samples if p == name]
            entry["rss_max_bytes"] = max(rss, default=None)
            entry["server_status_after"] = server_status(server.address, token) if server.is_alive() else None
            entry["server_alive_after"] = server.is_alive()
            phases.append(entry)
            bar.update()
            eb = entry["b"]
            lw = entry.get("load", {}).get("window")
            tqdm.write(f"{name:>13}: B p50 {eb['p50_ms']} ms  p99 {eb['p99_ms']} ms  calls {eb['num_calls']}  "
                       f"errors {eb['errors'] or 0}" + (f" | load ok {lw['ok']} refused {lw['refused'] or 0}"
                                                        if lw else "") +
                       f" | RSS {entry['rss_max_bytes'] / 2**20 if entry['rss_max_bytes'] else 0:.0f} MiB"
                       f" | server CPU {entry.get('server_cpu_share')} | tokens/s {entry.get('server_tokens_per_s')}",
                       file=sys.stderr)
            time.sleep(args.settle)
    finally:
        b.close()
    return phases


def run(args) -> dict:
    from dispatcher.client import Client
    from multitenant import host_cpu

    texts = load_texts(args.data_dir)
    b_texts, a_texts, workload = make_texts(texts, args.seed)
    result: dict = {"benchmark": "isolation", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": sys.argv,
                    "git": git_state(),
                    "machine": {"cpu_count": os.cpu_count(), "cpu": host_cpu(), "platform": platform.platform(),
                                "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
                                "loadavg_before": list(os.getloadavg())}}
    token = "vbadm_" + secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="isolation-") as tmp:
        tmp = Path(tmp)
        adapters = write_adapters(tmp, args.seed, args.rank)
        env = {k: v for k, v in os.environ.items() if not k.startswith("VBERT_")}
        server_env = {"VBERT_HOST": "localhost" if args.separate_peers else "127.0.0.1", "VBERT_PORT": str(free_port()), "VBERT_HTTP_PORT": "0", "VBERT_DATA_DIR": str(tmp / "data"),
                      "VBERT_METRICS_PORT": str(free_port()), "VBERT_LOG_LEVEL": "WARNING", **args.server_env_dict}
        result["server_env"] = {**server_env, "VBERT_ADMIN_TOKEN": "<random>"}
        result["workload"] = {**workload, "b_interval_s": args.b_interval, "separate_peers": args.separate_peers, "a_texts_per_request": args.a_texts,
                              "a_concurrency": args.a_concurrency, "idle_health_streams": args.idle_health_streams,
                              "idle_tenant_streams": args.idle_tenant_streams, "idle_channels": args.idle_channels,
                              "auth_concurrency": args.auth_concurrency, "rpc_timeout_s": args.rpc_timeout,
                              "adapter": f"LoRA rank {args.rank}, classify head {list(LABELS)}"}
        server = ServerProcess({**env, **server_env, "VBERT_ADMIN_TOKEN": token}, tmp / "server.log", args.rss_interval)
        result["server_command"] = server.command
        bar = tqdm(total=len(args.phases), desc="phases", unit="phase", disable=args.quiet, file=sys.stderr)
        try:
            result["server_ready_s"] = server.wait_ready(args.start_timeout)
            with Client(server.address, admin_token=token, timeout=120) as admin:
                keys = {}
                for name, folder in zip((TENANT_A, TENANT_B), adapters):
                    keys[name] = admin.register_tenant(name)["api_key"]
                    admin.upload_adapter(name, ADAPTER, folder)
                result["server_status_before"] = status = server_status(server.address, token)
                result["latency_target_ms"], result["latency_target_source"] = \
                    latency_target(status, args.server_env_dict)
                for name in (TENANT_A, TENANT_B):   # warm-up: adapters resident, first steps done
                    with Client(server.address, api_key=keys[name], timeout=120) as c:
                        c.classify(ADAPTER, a_texts[:4] if name == TENANT_A else b_texts[:4])
                result["phases"] = run_phases(args, server, admin, token, keys, a_texts, b_texts, bar)
        except Exception as e:  # noqa: BLE001 - reported in the JSON with the server's log
            result["error"] = f"{type(e).__name__}: {e}"
            result["server_log_tail"] = server.log_tail()
        finally:
            bar.close()
            if not server.is_alive():
                result["server_died"] = True
                result.setdefault("server_log_tail", server.log_tail())
            result["rss_hwm_bytes"] = proc_status(server.proc.pid, "VmHWM")
            result["server_exit_code"] = server.stop()
        result["rss_samples"] = [[t, s, p] for t, s, p in server.samples]
    result.setdefault("phases", [])
    result.setdefault("latency_target_ms", None)
    result.setdefault("latency_target_source", None)
    result["machine"]["loadavg_after"] = list(os.getloadavg())
    return {**headline(result), **result}


def headline(result: dict) -> dict:
    measured = [p for p in result["phases"] if "b" in p]
    p99 = {p["name"]: p["b"]["p99_ms"] for p in measured}
    others = {k: v for k, v in p99.items() if k != "alone" and v is not None}
    worst = max(others, key=others.get, default=None)
    alone, flood = p99.get("alone"), (others[worst] if worst else None)
    unanswered = [k for k, v in p99.items() if v is None]   # phases where B got no answer at all
    b_errors = sum(sum(p["b"]["errors"].values()) for p in measured)
    target = result.get("latency_target_ms")
    complete = len(measured) == len(result["phases"]) and "error" not in result and bool(measured)
    met = None
    if target is not None:
        met = bool(complete and alone is not None and flood is not None and b_errors == 0 and not unanswered
                   and flood <= 2 * alone + target)
    rss = [s for _, s, _ in result.get("rss_samples", [])]
    try:
        from dispatcher.config import ServerConfig
        from dataclasses import fields

        known = [f.name for f in fields(ServerConfig) if "latency_target" in f.name] or None
    except Exception:  # noqa: BLE001
        known = None
    return {"b_p99_alone_ms": alone, "b_p99_flood_ms": flood, "b_p99_flood_phase": worst,
            "latency_target_ms": target, "b_errors": b_errors, "rss_max_bytes": max(rss, default=None),
            "rss_hwm_bytes": result.get("rss_hwm_bytes"), "target_met": met,
            "latency_target_settings_of_server": known, "b_phases_without_answers": unanswered,
            "b_p99_ms_by_phase": p99, "complete": complete}


def write_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    measured = [p for p in result["phases"] if "b" in p]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1.2, 1]})
    data = [(i, p) for i, p in enumerate(measured) if p["b"]["latencies_ms"]]
    if data:
        ax.boxplot([p["b"]["latencies_ms"] for _, p in data], positions=[i for i, _ in data], whis=(1, 99),
                   widths=0.5, flierprops={"markersize": 3})
        for i, p in data:
            ax.plot(i, p["b"]["p99_ms"], "rv", markersize=6)
    for i, p in enumerate(measured):
        err = sum(p["b"]["errors"].values())
        ax.annotate(f"p50 {p['b']['p50_ms']}\np99 {p['b']['p99_ms']}" + (f"\nerr {err}" if err else ""),
                    (i, 1.0), xycoords=("data", "axes fraction"), xytext=(0, -4), textcoords="offset points",
                    ha="center", va="top", fontsize=7, color="tab:red" if err else "black")
    ax.set_xticks(range(len(measured)), [p["name"] for p in measured], fontsize=8)
    ax.set_xlim(-0.6, max(len(measured), 1) - 0.4)
    ax.set_yscale("log")
    top = max((p["b"]["max_ms"] or 0 for p in measured), default=0)
    if top:
        ax.set_ylim(top=top * 4)
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_ylabel("B latency (ms, from scheduled send)")
    ax.grid(alpha=0.3, which="both", axis="y")
    target = result.get("latency_target_ms")
    ax.set_title(f"tenant B, 1 text every {result['workload']['b_interval_s']} s (box 1-99%, ▼ p99); "
                 f"target {'n/a' if target is None else f'{target:g} ms'}, met: {result.get('target_met')}",
                 fontsize=9)
    samples = result.get("rss_samples", [])
    if samples:
        bx.plot([t for t, _, _ in samples], [s / 2**20 for _, s, _ in samples], color="tab:blue", lw=1)
    colors = plt.get_cmap("tab10")
    for i, p in enumerate(measured):
        bx.axvspan(p["t_measure"], p["t_end"], color=colors(i), alpha=0.15, label=p["name"])
    bx.set_xlabel("seconds since the server started")
    bx.set_ylabel("server RSS (MiB)")
    bx.grid(alpha=0.3)
    if measured:
        bx.legend(fontsize=7, loc="lower right")
    hwm = result.get("rss_hwm_bytes")
    bx.set_title(f"server RSS: max {(result.get('rss_max_bytes') or 0) / 2**20:.0f} MiB, "
                 f"VmHWM {(hwm or 0) / 2**20:.0f} MiB", fontsize=9)
    m = result["machine"]
    fig.suptitle(f"{m['cpu']} ({m['cpu_count']} CPUs), {m['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "out" / "isolation.json",
                   help="where to write the results (a PNG goes next to it)")
    p.add_argument("--quick", action="store_true", help="smoke run: 5 s phases, 2 s warm-ups")
    p.add_argument("--phase-seconds", type=float, default=20.0, help="measured seconds per phase")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each phase")
    p.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset, in this order")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment of the server (repeatable), e.g. VBERT_LATENCY_TARGET_MS=200")
    p.add_argument("--b-interval", type=float, default=0.2, help="seconds between B's calls (open loop)")
    p.add_argument("--a-texts", type=int, default=16, help="texts per call of the flooding tenant A")
    p.add_argument("--a-concurrency", type=int, default=32, help="A's calls in flight")
    p.add_argument("--idle-health-streams", type=int, default=300)
    p.add_argument("--idle-tenant-streams", type=int, default=300)
    p.add_argument("--idle-channels", type=int, default=6, help="connections the idle streams are spread over")
    p.add_argument("--auth-concurrency", type=int, default=16, help="failed-auth calls in flight")
    p.add_argument("--rpc-timeout", type=float, default=30.0, help="deadline of B's and A's calls, seconds")
    p.add_argument("--separate-peers", action="store_true",
                   help="server on localhost (IPv4 and IPv6), B over [::1], everyone else over 127.0.0.1, so "
                        "per-address limits can tell B from the others (default: all on 127.0.0.1)")
    p.add_argument("--settle", type=float, default=1.0, help="pause between phases, seconds")
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds to wait for the server's health")
    p.add_argument("--rss-interval", type=float, default=0.2, help="seconds between VmRSS samples")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank of the adapters")
    p.add_argument("--data-dir", type=Path, default=DATA_DIR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.quick:
        args.phase_seconds, args.warmup = 5.0, 2.0
    args.phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    if not args.phases or any(x not in PHASES for x in args.phases):
        p.error(f"--phases takes a comma-separated subset of {', '.join(PHASES)}")
    args.phases = [x for x in PHASES if x in args.phases]
    args.server_env_dict = {}
    for item in args.server_env:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            p.error(f"--server-env {item!r}: expected KEY=VALUE")
        args.server_env_dict[key.strip()] = value
    host = args.server_env_dict.get("VBERT_HOST", "127.0.0.1")
    if host not in ("127.0.0.1", "localhost", "::1"):
        p.error("VBERT_HOST must stay a loopback address: this benchmark only runs against this machine")
    if "VBERT_PORT" in args.server_env_dict and not args.server_env_dict["VBERT_PORT"].isdigit():
        p.error("VBERT_PORT must be a port number")
    for name in ("phase_seconds", "b_interval", "rpc_timeout", "start_timeout", "rss_interval"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    for name in ("a_texts", "a_concurrency", "idle_channels", "auth_concurrency", "rank"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.settle < 0 or args.idle_health_streams < 0 or args.idle_tenant_streams < 0:
        p.error("--warmup, --settle and the stream counts must be >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    write_plot(result, args.json.with_suffix(".png"))
    keys = ("b_p99_alone_ms", "b_p99_flood_ms", "b_p99_flood_phase", "latency_target_ms", "b_errors",
            "rss_max_bytes", "target_met", "error")
    print(json.dumps({k: result.get(k) for k in keys}))
    print(f"wrote {args.json} and {args.json.with_suffix('.png')}", file=sys.stderr)
    return 0 if "error" not in result else 2


if __name__ == "__main__":
    sys.exit(main())
