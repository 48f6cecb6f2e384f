"""Scale-out on a real local Ray cluster: the gRPC edge in front of two Ray Serve replicas of the encoder.

One cluster for the module (starting Ray Serve takes 10-30 s on 2 cores): RAY_ADDRESS is cleared so a stale
value cannot point the test at another cluster, the dashboard is off, the object store is 128 MiB, and Ray is
shut down once, by the server's drain (the fixture's only teardown)."""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch

pytest.importorskip("ray.serve")

from dispatcher.gen.vbert.v1 import tenant_pb2 as T  # noqa: E402
from tests.conftest import classify, make_artifact  # noqa: E402
from tests.dispatcher.conftest import RunningServer, bearer, tiny_server_config  # noqa: E402
from vbert import EncodeRow, HeadKind, HeadSpec  # noqa: E402

pytestmark = pytest.mark.slow
TEXTS = ["the patient with cancer was treated", "gene expression in the liver", "a mild rash"]


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint, tmp_path_factory):
    os.environ.pop("RAY_ADDRESS", None)
    config = tiny_server_config(tiny_checkpoint, tmp_path_factory.mktemp("var"), replicas=2, replica_adapters=2,
                                replica_cpus=0.5, ray_object_store_mb=128, host_cache_mb=64)
    s = RunningServer(config)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tenant(cluster):
    shape = cluster.app.model.spec.shape
    key = cluster.register("alpha")
    arts = {f"cls{i}": make_artifact(shape, "lora", classify(3), 10 + i, rank=4) for i in range(4)}
    for name, art in arts.items():
        cluster.app.manager.upload_adapter("alpha", name, art)
    return key, arts


def classify_call(cluster, key, adapter, texts=TEXTS, timeout=60):
    req = T.ClassifyRequest(adapter=adapter, inputs=[T.Input(text=t) for t in texts])
    return cluster.tenant.Classify.with_call(req, metadata=bearer(key), timeout=timeout)


def expected(cluster, art, text):
    """The single-process result: the same backbone and adapter computed here."""
    model = cluster.app.model
    fresh = type(model)(model.config)
    (ids,) = fresh.tokenize([text])
    out = fresh.forward([EncodeRow(ids, fresh.load_adapter(art))])[0]
    return dict(zip(out.labels, torch.softmax(out.logits, -1).tolist())), out.predicted()


def replica_of(cluster) -> dict[int, int]:
    return dict(cluster.app.engine.stats.rows_per_replica)


def test_classify_through_two_replicas_equals_the_single_process_result(cluster, tenant):
    key, arts = tenant
    for name in ("cls0", "cls1"):
        resp, call = classify_call(cluster, key, name)
        assert dict(call.trailing_metadata())["x-request-id"]
        for text, result in zip(TEXTS, resp.results, strict=True):
            probs, label = expected(cluster, arts[name], text)
            assert result.label == label
            assert {s.label: s.score for s in result.scores} == pytest.approx(probs, abs=1e-5)
    assert len(replica_of(cluster)) >= 1 and cluster.app.engine.stats.calls >= 2
    metric = cluster.app.metrics.registry.get_sample_value           # what Prometheus scrapes
    assert metric("vbert_replicas", {"backbone": "encoder", "state": "RUNNING"}) == 2
    assert metric("vbert_replica_calls_total", {"backbone": "encoder"}) == cluster.app.engine.stats.calls
    deadline = time.monotonic() + 30        # each replica reports its engine's queue (every second: wait for the idle)
    while len(loads := cluster.app.engine.replica_loads()) < 2 or any(r["num_waiting"] for r in loads.values()):
        assert time.monotonic() < deadline, loads
        time.sleep(0.2)
    assert {str(p) for p in replica_of(cluster)} <= set(cluster.app.engine.replica_loads())
    for pid in cluster.app.engine.replica_loads():
        assert metric("vbert_replica_queue_depth", {"backbone": "encoder", "replica": pid}) == 0


def test_tag_and_embed_through_the_replicas_equal_the_model(cluster, tenant):
    """Tag needs the replica's tokenization back (character offsets); Embed on the bare backbone has no adapter."""
    key, _ = tenant
    model = cluster.app.model
    art = make_artifact(model.spec.shape, "bottleneck", HeadSpec(HeadKind.TAG, ("B-Disease", "I-Disease", "O")), 7,
                        size=8)
    cluster.app.manager.upload_adapter("alpha", "ner", art)
    text = TEXTS[0]
    tagged = cluster.tenant.Tag(T.TagRequest(adapter="ner", inputs=[T.Input(text=text)]), metadata=bearer(key),
                                timeout=60).results[0]
    fresh = type(model)(model.config)
    (ids,) = fresh.tokenize([text])
    exp = fresh.forward([EncodeRow(ids, fresh.load_adapter(art))])[0]
    assert [t.label for t in tagged.tokens] == exp.predicted() and tagged.tokens[0].token == "[CLS]"
    assert [(t.start_char, t.end_char) for t in tagged.tokens[1:3]] == [(0, 3), (4, 11)]   # "the patient"
    emb = cluster.tenant.Embed(T.EmbedRequest(adapter="default", inputs=[T.Input(text=text)]), metadata=bearer(key),
                               timeout=60)
    want = fresh.forward([EncodeRow(ids, 0)])[0].embedding
    assert torch.allclose(torch.tensor(list(emb.results[0].values)), want, atol=1e-5)


def test_pinning_an_encoder_adapter_is_refused_with_replicas(cluster, tenant):
    import grpc

    from dispatcher.gen.vbert.v1 import admin_pb2
    from tests.dispatcher.conftest import ADMIN_TOKEN

    with pytest.raises(grpc.RpcError) as e:
        cluster.admin.PinAdapter(admin_pb2.AdapterRef(tenant="alpha", name="cls0"), metadata=bearer(ADMIN_TOKEN),
                                 timeout=30)
    assert e.value.code() is grpc.StatusCode.FAILED_PRECONDITION and "Ray Serve replicas" in e.value.details()


def served_by(cluster, key, adapter) -> int:
    before = replica_of(cluster)
    classify_call(cluster, key, adapter, texts=TEXTS[:1])
    after = replica_of(cluster)
    (pid,) = [p for p in after if after[p] != before.get(p, 0)]
    return pid


def test_one_adapters_requests_land_on_the_replica_that_loaded_it(cluster, tenant):
    """Once a replica has loaded an adapter (and Ray's routers heard of it: well under a second when the machine is
    idle, but the full suite on 2 cores once took longer than 1 s, and once longer than 3 s), the adapter's requests
    go there. Adapters no earlier test used, so exactly one replica holds each."""
    key, _ = tenant
    stats = cluster.app.engine.stats
    for i, name in enumerate(("routed0", "routed1")):
        cluster.app.manager.upload_adapter("alpha", name, make_artifact(cluster.app.model.spec.shape, "lora",
                                                                        classify(3), 40 + i, rank=4))
        first = served_by(cluster, key, name)
        time.sleep(8.0)
        loads = stats.adapter_loads
        assert {served_by(cluster, key, name) for _ in range(4)} == {first}, name
        assert stats.adapter_loads == loads       # every one of them found the adapter loaded


def test_an_adapter_uploaded_after_the_replicas_started_is_served(cluster, tenant):
    key, _ = tenant
    art = make_artifact(cluster.app.model.spec.shape, "lora", classify(3), 99, rank=2)
    cluster.app.manager.upload_adapter("alpha", "late", art)
    resp, _ = classify_call(cluster, key, "late", texts=TEXTS[:1])
    probs, label = expected(cluster, art, TEXTS[0])
    assert resp.results[0].label == label
    assert {s.label: s.score for s in resp.results[0].scores} == pytest.approx(probs, abs=1e-5)


def test_a_killed_replica_is_replaced_and_the_next_request_succeeds(cluster, tenant):
    key, _ = tenant
    classify_call(cluster, key, "cls0", texts=TEXTS[:1])
    before = set(replica_of(cluster))
    victim = next(iter(before))
    os.kill(victim, signal.SIGKILL)
    # the next requests succeed: a call that meets the dead replica is sent once more
    for name in ("cls0", "cls1", "cls2", "cls3"):
        resp, _ = classify_call(cluster, key, name, texts=TEXTS[:1])
        assert len(resp.results) == 1
    # Ray starts a replacement (a new process) within its health-check period
    deadline = time.monotonic() + 120
    new = set()
    while time.monotonic() < deadline and not new:
        for name in ("cls0", "cls1", "cls2", "cls3", "cls0", "cls1"):
            classify_call(cluster, key, name, texts=TEXTS[:1])
        new = set(replica_of(cluster)) - before
        time.sleep(1)
    assert new, f"no new replica served a request within 120 s (replicas seen: {replica_of(cluster)})"
