"""`vbert serve` as a real process: health, reflection, metrics, SIGTERM drain, restart."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from dispatcher.gen.vbert.v1 import admin_pb2, admin_pb2_grpc, tenant_pb2, tenant_pb2_grpc
from tests.conftest import classify, make_artifact
from tests.dispatcher.conftest import bearer

VBERT = str(Path(sys.executable).parent / "vbert")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    def __init__(self, data_dir, backbone=None, extra_env=None, log_path=None, channel_options=()):
        self.port, self.metrics_port, self.http_port = free_port(), free_port(), free_port()
        env = dict(os.environ, VBERT_ADMIN_TOKEN="proc-admin", VBERT_DEVICE="cpu", VBERT_LORA_SLOTS="4",
                   VBERT_BOTTLENECK_SLOTS="4", VBERT_MAX_LORA_RANK="8", VBERT_MAX_BOTTLENECK_SIZE="16",
                   VBERT_MAX_LABELS="8", VBERT_BACKBONES="encoder", VBERT_HTTP_PORT=str(self.http_port))
        env.update(extra_env or {})
        args = [VBERT, "serve", "--port", str(self.port), "--data-dir", str(data_dir),
                "--metrics-port", str(self.metrics_port)] + (["--backbone", str(backbone)] if backbone else [])
        self.log_path = log_path              # the JSON logs to a file (a pipe nobody reads would fill up)
        stderr = open(log_path, "w") if log_path else subprocess.PIPE
        self.proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
        if log_path:
            stderr.close()
        self.address = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.address, options=list(channel_options))
        health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.time() + 180
        while True:
            if self.proc.poll() is not None:
                logs = Path(log_path).read_text() if log_path else self.proc.stderr.read()
                raise AssertionError(f"server exited: {logs[-3000:]}")
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            if time.time() > deadline:
                self.proc.kill()
                raise AssertionError("server never became healthy")
            time.sleep(0.2)
        self.health = health
        self.tenant = tenant_pb2_grpc.TenantServiceStub(self.channel)

    def terminate(self, timeout=60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.channel.close()
        return code


def drain_line(logs: str) -> dict:
    """The shutdown log line: {"msg": "drained N calls in flight (M inputs queued; ...) in X ms", "inputs": M,
    "duration_ms": X}, plus num_calls = N."""
    lines = [json.loads(x) for x in logs.splitlines() if x.startswith("{")]
    (line,) = [x for x in lines if x["msg"].startswith("drained ")]
    m = re.match(r"drained (\d+) calls in flight \((\d+) inputs queued; (\d+) finished after the listeners stopped\) "
                 r"in (\d+) ms$", line["msg"])
    assert m, line
    assert line["method"] == "shutdown" and line["inputs"] == int(m[2])
    return {**line, "num_calls": int(m[1])}


def prepare_data_dir(checkpoint, data_dir, quotas=None):
    """A tenant and an adapter registered through the manager before the server starts."""
    from manager.manager import Manager, ManagerConfig
    from tests.conftest import tiny_pool_config
    from vbert import BackboneConfig, ModelConfig, MultiTenantModel

    model = MultiTenantModel(ModelConfig(BackboneConfig(path=str(checkpoint), device="cpu"), tiny_pool_config()))
    m = Manager(ManagerConfig.under(str(data_dir)), model)
    _, key = m.create_tenant("acme", quotas)
    m.upload_adapter("acme", "cls", make_artifact(model.spec.shape, "lora", classify(3), 1, rank=4))
    m.close()
    return key


def classify_call(stub, key, text="the patient", timeout=30):
    return stub.Classify(tenant_pb2.ClassifyRequest(adapter="cls", inputs=[tenant_pb2.Input(text=text)]),
                         metadata=bearer(key), timeout=timeout)


def test_health_reflection_metrics_restart(tiny_checkpoint, tmp_path):
    key = prepare_data_dir(tiny_checkpoint, tmp_path / "var")
    s = ServeProcess(tmp_path / "var", tiny_checkpoint)
    try:
        first = classify_call(s.tenant, key)
        refl = reflection_pb2_grpc.ServerReflectionStub(s.channel)
        (resp,) = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 timeout=10))
        names = {svc.name for svc in resp.list_services_response.service}
        assert {"vbert.v1.TenantService", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
        assert "vbert.v1.AdminService" not in names   # callers without a key do not learn of the admin API
        body = urllib.request.urlopen(f"http://127.0.0.1:{s.metrics_port}/metrics", timeout=10).read().decode()
        assert 'vbert_rpc_duration_seconds_count{code="OK",method="Classify"}' in body
        assert "vbert_adapter_cache_misses" in body and "vbert_queue_depth" in body and "tenant" not in body
        assert 'vbert_gc_pause_seconds_count{generation="0"}' in body     # the collector's pauses are timed
        assert (tmp_path / "var" / "admin_token").exists() is False   # token came from VBERT_ADMIN_TOKEN
    finally:
        assert s.terminate() == 0
    s2 = ServeProcess(tmp_path / "var", tiny_checkpoint)              # restart: everything is still there
    try:
        again = classify_call(s2.tenant, key)
        assert [x.score for x in again.results[0].scores] == pytest.approx([x.score for x in first.results[0].scores],
                                                                          abs=1e-6)
    finally:
        assert s2.terminate() == 0


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_then_exits_0(tmp_path):
    """On the real backbone, so requests take long enough to be in flight when SIGTERM lands."""
    from manager.manager import Manager, ManagerConfig
    from vbert import BackboneConfig, ModelConfig, MultiTenantModel, PoolConfig

    model = MultiTenantModel(ModelConfig(BackboneConfig(device="cpu"), PoolConfig(num_lora_slots=4, num_bottleneck_slots=4,
                                                                                  max_lora_rank=8, max_bottleneck_size=16,
                                                                                  max_labels=8)))
    m = Manager(ManagerConfig.under(str(tmp_path / "var")), model)
    _, key = m.create_tenant("acme")
    m.upload_adapter("acme", "cls", make_artifact(model.spec.shape, "lora", classify(3), 1, rank=8))
    m.close()
    s = ServeProcess(tmp_path / "var", log_path=tmp_path / "serve.log")
    long_text = "The patient was treated with cisplatin and showed a partial response. " * 8
    results, errors = [], []

    def worker():
        try:
            stub = tenant_pb2_grpc.TenantServiceStub(grpc.insecure_channel(s.address))
            r = stub.Classify(tenant_pb2.ClassifyRequest(adapter="cls", inputs=[tenant_pb2.Input(text=long_text)] * 8),
                              metadata=bearer(key), timeout=120)
            results.append(r)
        except grpc.RpcError as e:
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(12)]
    for t in threads:
        t.start()
    time.sleep(1.0)                              # requests are queued / computing now
    s.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    try:
        status = s.health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    except grpc.RpcError as e:                   # or the listener is already closed to new calls
        assert e.code() is grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.RpcError) as late:
        classify_call(s.tenant, key, timeout=5)
    assert late.value.code() is grpc.StatusCode.UNAVAILABLE
    for t in threads:
        t.join(120)
    assert s.proc.wait(120) == 0
    assert not errors, [e.code() for e in errors]
    assert len(results) == 12 and all(len(r.results) == 8 for r in results)
    line = drain_line((tmp_path / "serve.log").read_text())
    assert line["num_calls"] > 0 and line["inputs"] > 0 and line["duration_ms"] > 0


class BusyCallers:
    """Callers that keep a server busy with Classify calls of `texts` until one is refused (after SIGTERM)."""

    def __init__(self, address: str, key: str, texts, num: int = 4):
        self.address, self.key, self.texts = address, key, texts
        self.num_ok, self.codes, self.is_running = 0, [], threading.Event()
        self.in_flight, self._lock = 0, threading.Lock()     # calls sent and not yet answered
        self.threads = [threading.Thread(target=self._worker) for _ in range(num)]
        for t in self.threads:
            t.start()

    def _worker(self):
        stub = tenant_pb2_grpc.TenantServiceStub(grpc.insecure_channel(self.address))
        while True:
            with self._lock:
                self.in_flight += 1
            try:
                stub.Classify(tenant_pb2.ClassifyRequest(adapter="cls", inputs=self.texts), metadata=bearer(self.key),
                              timeout=60)
                self.num_ok += 1
                self.is_running.set()
            except grpc.RpcError as e:          # after SIGTERM: refused (UNAVAILABLE)
                self.codes.append(e.code())
                return
            finally:
                with self._lock:
                    self.in_flight -= 1

    def wait_in_flight(self, num: int, timeout: float) -> bool:
        """Until at least `num` calls are out at once (on a loaded machine the callers can all sit between calls)."""
        deadline = time.monotonic() + timeout
        while self.in_flight < num:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    def join(self, timeout: float) -> None:
        for t in self.threads:
            t.join(timeout)


def server_has_calls(s: ServeProcess, num: int, timeout: float) -> bool:
    """Until the server itself counts at least `num` tenant calls in flight (the callers' own count includes
    calls still on their way, which a SIGTERM refuses instead of draining)."""
    admin = admin_pb2_grpc.AdminServiceStub(s.channel)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = admin.GetStatus(admin_pb2.GetStatusRequest(), metadata=bearer("proc-admin"), timeout=10)
        if status.limits.num_rpcs_in_flight >= num:
            return True
        time.sleep(0.005)
    return False


def test_sigterm_logs_what_it_drained(tiny_checkpoint, tmp_path):
    """A real `vbert serve` SIGTERMed while callers keep it busy: one log line says how many calls were
    in flight, how many inputs were queued, and how long the drain took; the calls already running finish."""
    from manager.records import Quotas

    key = prepare_data_dir(tiny_checkpoint, tmp_path / "var", Quotas(requests_per_s=1e6, burst=1_000_000))
    s = ServeProcess(tmp_path / "var", tiny_checkpoint, log_path=tmp_path / "serve.log")
    texts = [tenant_pb2.Input(text=" ".join(["the patient gene cell"] * 6))] * 32
    callers = BusyCallers(s.address, key, texts)
    assert callers.is_running.wait(60)
    time.sleep(0.5)
    num_before = callers.num_ok
    assert s.terminate(60) == 0
    callers.join(60)
    assert set(callers.codes) == {grpc.StatusCode.UNAVAILABLE}, callers.codes   # in flight finished, new refused
    logs = (tmp_path / "serve.log").read_text()
    line = drain_line(logs)
    assert 0 < line["num_calls"] <= 4 and line["inputs"] <= 4 * len(texts) and line["duration_ms"] > 0
    assert callers.num_ok >= num_before
    # once up, the server froze its start-up heap (full collections skip it: dispatcher/heap.py)
    (frozen,) = [json.loads(x)["msg"] for x in logs.splitlines() if "start-up heap frozen" in x]
    assert int(frozen.rsplit(" ", 2)[-2]) > 10_000, frozen


def test_bad_config_is_refused_at_start(tmp_path):
    out = subprocess.run([VBERT, "serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "admin API binds to loopback" in out.stderr
    out = subprocess.run([VBERT, "serve", "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, VBERT_MAX_WAITING="many"))
    assert out.returncode == 2 and "max_waiting: 'many' is not a valid int" in out.stderr


def test_sigterm_lets_an_http_stream_finish(tiny_checkpoint, decoder_dir, tmp_path):
    """A real `vbert serve` with both backbones: SIGTERM lands while a streamed chat completion runs over
    the OpenAI-compatible HTTP API; the stream still ends with [DONE], a new HTTP request is refused
    (503) or finds the listener closed, and the process exits 0."""
    import urllib.error
    import urllib.request

    key = prepare_data_dir(tiny_checkpoint, tmp_path)
    s = ServeProcess(tmp_path, backbone=tiny_checkpoint, log_path=tmp_path / "serve.log",
                     extra_env={"VBERT_BACKBONES": "encoder,decoder", "VBERT_DECODER": str(decoder_dir),
                                "VBERT_DECODER_KV_CACHE_MB": "1", "VBERT_DECODER_BLOCK_SIZE": "4"})
    url = f"http://127.0.0.1:{s.http_port}/v1"
    body = {"model": "default", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 200,
            "temperature": 0, "ignore_eos": True}
    req = urllib.request.Request(f"{url}/chat/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
    events, signalled = [], None
    with urllib.request.urlopen(req, timeout=60) as r:
        for raw in r:
            line = raw.decode().strip()
            if line:
                events.append(line)
            if signalled is None and line.startswith("data: {"):
                s.proc.send_signal(signal.SIGTERM)
                signalled = len(events)
                late = urllib.request.Request(f"{url}/models", headers={"authorization": f"Bearer {key}"})
                try:
                    urllib.request.urlopen(late, timeout=10)
                    raise AssertionError("a request during the drain was served")
                except urllib.error.HTTPError as e:
                    assert e.code == 503
                except urllib.error.URLError:
                    pass                                   # the listener already closed
    assert events[-1] == "data: [DONE]" and len(events) - signalled > 10     # most of it streamed after SIGTERM
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert s.proc.wait(60) == 0
    s.channel.close()


@pytest.mark.slow
def test_sigterm_drains_the_ray_serve_replicas_too(tiny_checkpoint, tmp_path):
    """`vbert serve` with one Ray Serve replica (its own local Ray cluster), SIGTERMed while callers keep it busy:
    calls already running finish, new ones are refused, the process exits 0 and leaves no replica running."""
    pytest.importorskip("ray.serve")
    import psutil

    from manager.records import Quotas

    key = prepare_data_dir(tiny_checkpoint, tmp_path / "var", Quotas(requests_per_s=1e6, burst=1_000_000))
    env = {"VBERT_REPLICAS": "1", "VBERT_REPLICA_CPUS": "0.5", "VBERT_RAY_OBJECT_STORE_MB": "128", "RAY_ADDRESS": ""}
    s = ServeProcess(tmp_path / "var", tiny_checkpoint, extra_env=env, log_path=tmp_path / "serve.log")
    callers = BusyCallers(s.address, key, [tenant_pb2.Input(text=" ".join(["the patient gene cell"] * 6))] * 16)
    assert callers.is_running.wait(120)
    server_pid = s.proc.pid
    replicas = [p for p in psutil.Process(server_pid).children(recursive=True)
                if " ".join(p.cmdline()).startswith("ray::ServeReplica")]
    assert len(replicas) == 1
    assert callers.wait_in_flight(3, 30)               # SIGTERM while calls are out, so the drain has some to finish
    busy = server_has_calls(s, 2, 30)                   # ... and the server holds them (not still on their way)
    assert s.terminate(90) == 0                         # (before asserting: the callers stop only when refused)
    assert busy
    callers.join(60)
    assert set(callers.codes) == {grpc.StatusCode.UNAVAILABLE}, callers.codes
    line = drain_line((tmp_path / "serve.log").read_text())
    assert 0 < line["num_calls"] <= 4
    deadline = time.time() + 30
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in replicas) and time.time() < deadline:
        time.sleep(0.5)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in replicas)


def skip_metrics(port: int) -> dict[str, float]:
    """The skip counters and gauges of table "tiny", by metric name."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {m[1]: float(m[2]) for m in re.finditer(r'^(vbert_skip_\w+?)(?:_total)?\{table="tiny"\} (\S+)$', body, re.M)}


def test_skip_modes_miss_cache_survives_a_sigterm_restart(tiny_checkpoint, tmp_path):
    """Skip mode's computed misses are saved when the server stops and served from the cache after the restart."""
    from manager.manager import Manager, ManagerConfig
    from tests.conftest import tiny_pool_config
    from tests.vbert.test_skip import TINY_WORDS, sentences, top_layers_artifact, write_shallow
    from training.table import TableConfig, build_table
    from vbert import BackboneConfig, ModelConfig, MultiTenantModel
    from vbert.backbone import Encoder

    shallow = write_shallow(Encoder.from_checkpoint(tiny_checkpoint), tmp_path / "shallow", perturb=1)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(sentences(30, 1)) + "\n")
    table = tmp_path / "table.safetensors"
    build_table(TableConfig(shallow=str(shallow), corpus=(str(corpus),), out=str(table), budget_mb=64, dtype="float32",
                            backbone=str(tiny_checkpoint), show_progress=False), echo=lambda s: None)
    data = tmp_path / "var"
    model = MultiTenantModel(ModelConfig(BackboneConfig(path=str(tiny_checkpoint), device="cpu"), tiny_pool_config()))
    m = Manager(ManagerConfig.under(str(data)), model)
    _, key = m.create_tenant("acme")
    m.upload_adapter("acme", "cls", top_layers_artifact(model, "lora", classify(3), 1))
    m.close()
    env = {"VBERT_SKIP": "true", "VBERT_SKIP_TABLES": f"tiny={shallow}:{table}", "VBERT_SKIP_ROUTE": "table"}
    unseen = " ".join(sentences(3, 99, TINY_WORDS[::-1]))

    s = ServeProcess(data, tiny_checkpoint, env)
    try:
        first = classify_call(s.tenant, key, unseen)
        before = skip_metrics(s.metrics_port)
        assert before["vbert_skip_computed"] > 0
        assert before["vbert_skip_miss_cache_entries"] == before["vbert_skip_computed"]
    finally:
        assert s.terminate() == 0
    assert (data / "skip" / "misses" / "tiny.misses.safetensors").is_file()
    s2 = ServeProcess(data, tiny_checkpoint, env)
    try:
        restored = skip_metrics(s2.metrics_port)
        assert restored["vbert_skip_miss_cache_entries"] == before["vbert_skip_computed"]
        again = classify_call(s2.tenant, key, unseen)
        after = skip_metrics(s2.metrics_port)
        assert after["vbert_skip_computed"] == 0 and after["vbert_skip_cache_hits"] == before["vbert_skip_computed"]
        assert [x.score for x in again.results[0].scores] == pytest.approx(
            [x.score for x in first.results[0].scores], abs=1e-6)
    finally:
        assert s2.terminate() == 0


@pytest.mark.slow
def test_decoder_replicas_serve_the_default_decoder_and_drain(tmp_path, smollm2):
    """`vbert serve --decoder-replicas 1` on the real default decoder (SmolLM2-135M-Instruct) and a shipped decoder
    LoRA: greedy answers as the single-process server gives them (test_generate's), a stream running on the replica
    when SIGTERM comes finishes, the process exits 0 and leaves no replica running."""
    pytest.importorskip("ray.serve")
    pytest.importorskip("gguf")
    import psutil

    from dispatcher.client import Client

    env = {"VBERT_BACKBONES": "decoder", "VBERT_DECODER_REPLICAS": "1", "VBERT_REPLICA_CPUS": "0.5",
           "VBERT_RAY_OBJECT_STORE_MB": "128", "VBERT_DECODER_KV_CACHE_MB": "32", "RAY_ADDRESS": ""}
    from tests.conftest import data_dir_with_models

    var = data_dir_with_models(tmp_path / "var", smollm2[0])      # the run's conversion of the default decoder
    s = ServeProcess(var, extra_env=env, log_path=tmp_path / "serve.log")
    replicas = [p for p in psutil.Process(s.proc.pid).children(recursive=True)
                if " ".join(p.cmdline()).startswith("ray::ServeReplica")]
    assert len(replicas) == 1
    root = Path(__file__).resolve().parents[2] / "examples" / "adapters-trained" / "ncbi-disease-gen"
    res = json.loads((root / "RESULT.json").read_text())
    with Client(s.address, admin_token="proc-admin") as admin:
        key = admin.register_tenant("acme")["api_key"]
        admin.upload_adapter("acme", "disease-mentions", root)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    with Client(s.address, api_key=key) as c:
        events = list(c.generate(messages=question, max_new_tokens=20, temperature=0))
        assert "".join(e["text"] for e in events) == "The capital of France is Paris."
        ex = res["examples"][1]
        events = list(c.generate(adapter="disease-mentions", max_new_tokens=32, temperature=0,
                                 messages=[{"role": "user", "content": f"{res['instruction']}\n{ex['text']}"}]))
        assert "".join(e["text"] for e in events) == ex["mentions"]
        streamed, first = [], threading.Event()

        def long_stream():
            for e in c.generate(prompt="Once upon a time", max_new_tokens=48, temperature=0, ignore_eos=True):
                streamed.append(e)
                first.set()
        t = threading.Thread(target=long_stream)
        t.start()
        assert first.wait(60)
        assert s.terminate(120) == 0                   # SIGTERM while the stream runs on the replica ...
        t.join(30)
    assert streamed[-1]["finish_reason"] == "length"   # ... which finished it
    assert streamed[-1]["usage"]["completion_tokens"] == 48
    deadline = time.time() + 30
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in replicas) and time.time() < deadline:
        time.sleep(0.5)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in replicas)
