"""Generation on Ray Serve decoder replicas (decoder_replicas = 2), on a real local Ray cluster: the gRPC edge and the
OpenAI-compatible API in front, a tiny random decoder with a PEFT LoRA adapter. Greedy tokens equal the single-process
server's on the same checkpoint and adapter, through gRPC and the OpenAI API; a replica's full queue refuses a
stream before its first token; a client leaving a stream frees the request's KV blocks on the replica; a repeated prompt
goes to the replica that cached its prefix; a replica killed with SIGKILL costs only the requests it held
(UNAVAILABLE), later ones are served by the others.

One Ray cluster for the module (RAY_ADDRESS cleared, dashboard off), shut down by the server's drain."""
from __future__ import annotations

import os
import re
import signal
import threading
import time

import grpc
import pytest

pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

from dispatcher.gen.vbert.v1 import admin_pb2  # noqa: E402
from dispatcher.gen.vbert.v1 import tenant_pb2 as T  # noqa: E402
from tests.decoder_models import write_tiny_decoder_lora  # noqa: E402
from tests.dispatcher.conftest import ADMIN_TOKEN, RunningServer, bearer, tiny_server_config  # noqa: E402
from vbert.artifact import load_artifact  # noqa: E402

pytestmark = pytest.mark.slow
PROMPTS = ["the patient was treated", "gene expression in the liver"]


def _config(checkpoint, var, **kw):
    return tiny_server_config(checkpoint, var, backbones="decoder", decoder_kv_cache_mb=1, decoder_block_size=4,
                              **kw)


def _setup(s, lora):
    s.key = s.register("acme")
    s.app.manager.upload_adapter("acme", "writer", load_artifact(lora))
    return s


@pytest.fixture(scope="module")
def lora(decoder_dir, tmp_path_factory):
    return write_tiny_decoder_lora(tmp_path_factory.mktemp("lora") / "writer", decoder_dir, seed=3)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, decoder_dir, lora, tmp_path_factory):
    """Greedy tokens of the single-process server: {(adapter, prompt): token ids}."""
    s = _setup(RunningServer(_config(tiny_checkpoint, tmp_path_factory.mktemp("var"), decoder=str(decoder_dir))), lora)
    try:
        return {(a, p): tokens(s, a, p) for a in ("default", "writer") for p in PROMPTS}
    finally:
        s.stop()


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint, decoder_dir, lora, tmp_path_factory):
    os.environ.pop("RAY_ADDRESS", None)
    from tests.dispatcher.test_http_api import free_port

    s = RunningServer(_config(tiny_checkpoint, tmp_path_factory.mktemp("var"), decoder=str(decoder_dir),
                              decoder_replicas=2, replica_cpus=0.5, ray_object_store_mb=128, http_port=free_port(),
                              generation_max_running=2, max_waiting_per_tenant=2))    # per replica
    _setup(s, lora)
    yield s
    s.stop()


def stream(s, adapter, prompt, n=8, timeout=60, **kw):
    req = T.GenerateRequest(adapter=adapter, prompt=prompt, max_new_tokens=n, temperature=0, ignore_eos=True, **kw)
    return s.tenant.Generate(req, metadata=bearer(s.key), timeout=timeout)


def tokens(s, adapter, prompt, n=8):
    msgs = list(stream(s, adapter, prompt, n))
    assert msgs[-1].is_final and msgs[-1].finish_reason == T.LENGTH
    return [t for m in msgs for t in m.token_ids]


def test_generation_through_two_decoder_replicas_equals_one_process(cluster, reference):
    s = cluster
    for (adapter, prompt), expected in reference.items():
        assert tokens(s, adapter, prompt) == expected, (adapter, prompt)
    assert reference[("default", PROMPTS[0])] != reference[("writer", PROMPTS[0])]    # the adapter is applied
    engine = s.app.generation
    assert engine.stats.calls >= 4 and sum(engine.stats.rows_per_replica.values()) >= 4
    assert engine.num_pending == 0
    metric = s.app.metrics.registry.get_sample_value                   # what Prometheus scrapes
    assert metric("vbert_replicas", {"backbone": "decoder", "state": "RUNNING"}) == 2
    assert metric("vbert_replica_calls_total", {"backbone": "decoder"}) == engine.stats.calls
    assert metric("vbert_replica_requests_in_flight", {"backbone": "decoder"}) == 0
    # each replica reports its engine's load: per-replica gauges, and the status's KV cache is the replicas'
    def idle(loads):   # both replicas (whether they served or not) reported since their last stream ended
        return len(loads) == 2 and all(r["num_running"] == 0 and r["num_free_blocks"] == r["num_blocks"]
                                       for r in loads.values())
    deadline = time.monotonic() + 30
    while not idle(engine.replica_loads()):                   # a report is up to a second old
        assert time.monotonic() < deadline, engine.replica_loads()
        time.sleep(0.2)
    pids = sorted(engine.replica_loads())
    assert {str(p) for p in engine.stats.rows_per_replica} <= set(pids)
    blocks = replica(s, int(pids[0]))["num_blocks"]
    for pid in pids:
        labels = {"backbone": "decoder", "replica": pid}
        assert metric("vbert_replica_kv_cache_blocks", labels) == blocks
        assert metric("vbert_replica_kv_cache_blocks_free", labels) == blocks      # nothing running now
        assert metric("vbert_replica_generation_running", labels) == 0
        assert metric("vbert_replica_queue_depth", labels) == 0
        # a replica that decoded holds its decode staging (kept between steps, within its budget)
        staged = metric("vbert_replica_kv_staging_bytes", labels)
        assert (staged > 0 if pid in {str(p) for p in engine.stats.rows_per_replica} else staged >= 0), staged
    status = s.admin.GetStatus(admin_pb2.GetStatusRequest(), metadata=bearer(ADMIN_TOKEN))
    (dec,) = [b for b in status.backbones if b.name == "decoder"]
    assert (dec.kv_blocks_total, dec.kv_blocks_free) == (2 * blocks, 2 * blocks)
    assert dec.kv_cache_bytes == 2 * (1 << 20)                                  # two replicas of 1 MiB
    # the OpenAI-compatible API goes through the same replicas
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{s.server.http_port}/v1", api_key=s.key, max_retries=0,
                           timeout=60)
    out = client.completions.create(model="writer", prompt=PROMPTS[1], max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 8
    assert out.choices[0].text == s.app.decoder.tokenizer.decode(reference[("writer", PROMPTS[1])],
                                                                 skip_special_tokens=True)
    # structured output: the replica compiles the request's grammar (the front door checked it) and follows it
    for seed in (1, 2):
        shaped = client.completions.create(model="writer", prompt=PROMPTS[1], max_tokens=30, temperature=1.0,
                                           seed=seed, extra_body={"guided_regex": "[0-9]{3}-[a-z]{2}"}).choices[0]
        assert re.fullmatch("[0-9]{3}-[a-z]{2}", shaped.text) and shaped.finish_reason == "stop", shaped
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="writer", prompt=PROMPTS[1], max_tokens=4,
                                  extra_body={"guided_regex": "(unclosed"})


def test_a_repeated_prompt_goes_to_the_replica_that_cached_its_prefix(cluster):
    """decoder_routing = "prefix" (the default): one prompt sent five times, one after another, runs on one replica,
    and from the second time on its prompt's full blocks come from that replica's prefix cache. (Ray's default choice
    between two idle replicas would put all five on one with probability 1/16.)"""
    s = cluster
    prompt = " ".join(["the liver biopsy showed"] * 6)
    metric = s.app.metrics.registry.get_sample_value                   # what Prometheus scrapes
    routed = [metric(f"vbert_prefix_{k}_total", {"backbone": "decoder"}) for k in ("routed", "to_cached_prefix")]
    before = s.app.generation.stats.rows_per_replica.copy()
    finals = [list(stream(s, "default", prompt, n=4))[-1] for _ in range(5)]
    after = s.app.generation.stats.rows_per_replica
    # the router's own account: 5 routed by prompt, the last 4 to the replica that held the prefix
    assert [metric(f"vbert_prefix_{k}_total", {"backbone": "decoder"}) - b
            for k, b in zip(("routed", "to_cached_prefix"), routed)] == [5, 4]
    assert sorted(after[p] - before.get(p, 0) for p in after if after[p] > before.get(p, 0)) == [5], (before, after)
    n = finals[0].usage.prompt_tokens
    assert n > 12 and finals[0].usage.cached_prompt_tokens == 0
    assert [f.usage.cached_prompt_tokens for f in finals[1:]] == [(n - 1) // 4 * 4] * 4   # blocks of 4 tokens


def test_pinning_a_decoder_adapter_is_refused_with_decoder_replicas(cluster):
    from dispatcher.gen.vbert.v1 import admin_pb2
    from tests.dispatcher.conftest import ADMIN_TOKEN

    with pytest.raises(grpc.RpcError) as e:
        cluster.admin.PinAdapter(admin_pb2.AdapterRef(tenant="acme", name="writer"), metadata=bearer(ADMIN_TOKEN),
                                 timeout=30)
    assert e.value.code() is grpc.StatusCode.FAILED_PRECONDITION and "decoder runs on 2 Ray Serve" in e.value.details()
    assert cluster.app.manager.decoder_cache.stats()["device"]["pinned"] == 0      # nothing pinned here either


def test_a_replicas_full_queue_refuses_before_the_stream_starts(cluster):
    """Each replica runs 2 sequences and lets a tenant queue 2 more: of 12 streams at once at most 8 are taken, the
    others answer RESOURCE_EXHAUSTED before any token, as one process would."""
    s = cluster
    calls = [stream(s, "default", PROMPTS[0], n=200, timeout=60) for _ in range(12)]
    firsts, refused = [], []
    for call in calls:
        try:
            firsts.append(next(call))
        except grpc.RpcError as e:
            refused.append(e)
    for call in calls:
        call.cancel()
    assert len(firsts) <= 8 and len(refused) >= 4, (len(firsts), [e.details() for e in refused])
    assert all(f.token_ids for f in firsts)
    assert {e.code() for e in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}, [e.details() for e in refused]
    assert all("waiting" in e.details() for e in refused), [e.details() for e in refused]
    deadline = time.monotonic() + 60                                       # the taken ones were cancelled
    while s.app.generation.num_pending and time.monotonic() < deadline:
        time.sleep(0.1)
    assert s.app.generation.num_pending == 0


def test_running_streams_show_on_their_replicas_load_reports(cluster):
    """Streams kept running (each a fraction of a second: a report is up to a second old) show as running sequences
    and taken KV blocks in some replica's report, on the front door's metrics."""
    s = cluster
    stop, seen = threading.Event(), []

    def keep_streaming():
        while not stop.is_set():
            list(stream(s, "writer", PROMPTS[0], n=200))
    threads = [threading.Thread(target=keep_streaming) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        metric = s.app.metrics.registry.get_sample_value
        deadline = time.monotonic() + 30
        while not seen:
            seen = [pid for pid in s.app.generation.replica_loads()
                    if (metric("vbert_replica_generation_running", {"backbone": "decoder", "replica": pid}) or 0) >= 1
                    and metric("vbert_replica_kv_cache_blocks_free", {"backbone": "decoder", "replica": pid})
                    < metric("vbert_replica_kv_cache_blocks", {"backbone": "decoder", "replica": pid})]
            assert seen or time.monotonic() < deadline, s.app.generation.replica_loads()
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(60)


def test_a_client_leaving_frees_its_blocks_on_the_replica(cluster):
    s = cluster
    call, pid = stream_on_a_replica(s, "writer")                           # it runs on a replica ...
    call.cancel()                                                          # ... and the client goes away
    deadline = time.monotonic() + 30
    while True:
        r = replica(s, pid)
        if s.app.generation.num_pending == 0 and r["num_cancelled"] >= 1 and r["num_running"] == 0 and \
                r["num_free_blocks"] == r["num_blocks"]:
            break
        assert time.monotonic() < deadline, r
        time.sleep(0.2)


def stream_on_a_replica(s, adapter, prompt=PROMPTS[0]):
    """A long stream that has begun (its first message read) and the pid of the replica that accepted it."""
    before = s.app.generation.stats.rows_per_replica.copy()
    call = stream(s, adapter, prompt, n=200, timeout=60)
    assert next(call).token_ids
    (pid,) = [p for p, n in s.app.generation.stats.rows_per_replica.items() if n > before[p]]
    return call, pid


def replica(s, pid: int, timeout: float = 30.0) -> dict:
    """engine_stats of the replica with that pid. Ray picks the replica of each call (the one with fewer calls in
    flight: after a burst of cancelled streams it may avoid the other for a while), so it asks until that one answers."""
    deadline = time.monotonic() + timeout
    while True:
        r = s.app.generation.replica_stats()
        if r["replica"] == pid:
            return r
        assert time.monotonic() < deadline, f"replica {pid} never answered"
        time.sleep(0.05)


def test_a_killed_replica_costs_only_its_streams(cluster, reference):
    s = cluster
    call, victim = stream_on_a_replica(s, "default", PROMPTS[1])           # streaming from a replica ...
    os.kill(victim, signal.SIGKILL)                                        # ... that dies
    with pytest.raises(grpc.RpcError) as e:
        list(call)
    assert e.value.code() is grpc.StatusCode.UNAVAILABLE, e.value.details()
    assert s.app.generation.stats.unavailable >= 1
    assert s.app.metrics.registry.get_sample_value("vbert_replica_unavailable_total", {"backbone": "decoder"}) >= 1
    deadline = time.monotonic() + 60                                       # the other replica (and Ray's
    while True:                                                            # replacement) serve the next ones
        try:
            assert tokens(s, "default", PROMPTS[0]) == reference[("default", PROMPTS[0])]
            break
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
