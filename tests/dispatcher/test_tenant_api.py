"""The tenant API over real gRPC on loopback: results, every status code, isolation, streams."""
from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch

from dispatcher.errors import RETRY_AFTER_KEY
from dispatcher.gen.vbert.v1 import tenant_pb2
from tests.conftest import classify, embed_head, make_artifact
from tests.dispatcher.conftest import bearer
from vbert import EncodeRow, HeadSpec, HeadKind

T = tenant_pb2


def texts(*xs):
    return [T.Input(text=x) for x in xs]


@pytest.fixture(scope="module")
def tenants(server):
    shape = server.app.model.spec.shape
    keys = {name: server.register(name) for name in ("alpha", "beta")}
    m = server.app.manager
    arts = {"cls": make_artifact(shape, "lora", classify(3), 1, rank=4),
            "ner": make_artifact(shape, "bottleneck", HeadSpec(HeadKind.TAG, ("B-Disease", "I-Disease", "O")), 2, size=8),
            "emb": make_artifact(shape, "lora", embed_head("mean", True), 3, rank=2)}
    for name, art in arts.items():
        m.upload_adapter("alpha", name, art)
    m.upload_adapter("beta", "cls", make_artifact(shape, "bottleneck", classify(2), 4, size=4))
    return keys, arts


def call(server, method, request, key, **kw):
    return getattr(server.tenant, method).with_call(request, metadata=bearer(key) if key else None, timeout=30, **kw)


def code_of(fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value


def local(server, art, text):
    model = server.app.model
    fresh = type(model)(model.config)
    (ids,) = fresh.tokenize([text])
    return fresh.forward([EncodeRow(ids, fresh.load_adapter(art))])[0], ids


def test_classify_tag_embed_results_equal_the_model(server, tenants):
    keys, arts = tenants
    text = "the patient with cancer was treated"
    resp, c = call(server, "Classify", T.ClassifyRequest(adapter="cls", inputs=texts(text, "gene expression")), keys["alpha"])
    exp, ids = local(server, arts["cls"], text)
    probs = torch.softmax(exp.logits, -1)
    got = {s.label: s.score for s in resp.results[0].scores}
    assert resp.results[0].label == exp.predicted() and len(resp.results) == 2
    assert all(abs(got[lab] - float(p)) < 1e-5 for lab, p in zip(exp.labels, probs))
    assert resp.metadata.num_tokens > len(ids) and resp.metadata.adapter_version == 1 and resp.metadata.total_ms > 0
    assert dict(c.trailing_metadata())["x-request-id"]
    top = call(server, "Classify", T.ClassifyRequest(adapter="cls", inputs=texts(text), top_k=1), keys["alpha"])[0]
    assert len(top.results[0].scores) == 1

    tagged = call(server, "Tag", T.TagRequest(adapter="ner", inputs=texts(text)), keys["alpha"])[0].results[0]
    exp, ids = local(server, arts["ner"], text)
    assert [t.label for t in tagged.tokens] == exp.predicted() and tagged.tokens[0].token == "[CLS]"
    for ent in tagged.entities:
        assert ent.label == "Disease" and ent.end_token > ent.start_token
        assert ent.text == text[ent.start_char:ent.end_char] and ent.start_char == tagged.tokens[ent.start_token].start_char
    assert [(t.start_char, t.end_char) for t in tagged.tokens[1:3]] == [(0, 3), (4, 11)]   # "the patient"

    emb = call(server, "Embed", T.EmbedRequest(adapter="emb", inputs=texts(text)), keys["alpha"])[0].results[0]
    exp, _ = local(server, arts["emb"], text)
    torch.testing.assert_close(torch.tensor(list(emb.values)), exp.embedding, atol=1e-5, rtol=0)
    raw = call(server, "Embed", T.EmbedRequest(adapter="emb", inputs=texts(text), normalize=False), keys["alpha"])[0]
    assert abs(torch.tensor(list(raw.results[0].values)).norm() - 1) > 1e-3


def test_token_id_inputs_and_default_adapter(server, tenants):
    keys, _ = tenants
    ids = T.Input(token_ids=T.TokenIds(ids=[2, 10, 11, 12, 3]))
    a = call(server, "Embed", T.EmbedRequest(inputs=[ids]), keys["beta"])[0]
    b = call(server, "Embed", T.EmbedRequest(adapter="default", inputs=[ids]), keys["beta"])[0]
    assert list(a.results[0].values) == list(b.results[0].values) and a.metadata.adapter_version == 0


@pytest.mark.parametrize("request_,message", [
    (T.ClassifyRequest(adapter="cls"), "no inputs"),
    (T.ClassifyRequest(adapter="cls", inputs=texts("  ")), "input 0: text is empty"),
    (T.ClassifyRequest(adapter="cls", inputs=[T.Input()]), "input 0: set either text or token_ids"),
    (T.ClassifyRequest(adapter="cls", inputs=texts(*["x"] * 9)), "9 inputs, above the limit of 8"),
    (T.ClassifyRequest(adapter="cls", inputs=texts("gene " * 200), truncation=T.REJECT), "above the limit of 64"),
    (T.ClassifyRequest(adapter="cls", inputs=[T.Input(token_ids=T.TokenIds(ids=[2, 10 ** 6, 3]))]),
     "outside the vocabulary"),
])
def test_invalid_argument_names_the_problem(server, tenants, request_, message):
    keys, _ = tenants
    err = code_of(lambda: call(server, "Classify", request_, keys["alpha"]))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT and message in err.details()
    assert dict(err.trailing_metadata())["x-request-id"]


def test_truncation_keeps_long_inputs_by_default(server, tenants):
    keys, _ = tenants
    resp = call(server, "Classify", T.ClassifyRequest(adapter="cls", inputs=texts("gene " * 200)), keys["alpha"])[0]
    assert resp.metadata.num_tokens == 64


def test_not_found_wrong_head_and_generate(server, tenants):
    keys, _ = tenants
    err = code_of(lambda: call(server, "Classify", T.ClassifyRequest(adapter="nope", inputs=texts("x")), keys["alpha"]))
    assert err.code() is grpc.StatusCode.NOT_FOUND and "tenant 'alpha' has no active adapter 'nope'" in err.details()
    err = code_of(lambda: call(server, "Tag", T.TagRequest(adapter="cls", inputs=texts("x")), keys["alpha"]))
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION and "call Classify instead" in err.details()
    err = code_of(lambda: list(server.tenant.Generate(T.GenerateRequest(adapter="cls", prompt="x"),
                                                      metadata=bearer(keys["alpha"]), timeout=10)))
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION and "no decoder backbone" in err.details()


def test_authentication_and_tenant_isolation(server, tenants):
    keys, _ = tenants
    req = T.ClassifyRequest(adapter="ner", inputs=texts("x"))
    assert code_of(lambda: call(server, "Classify", req, None)).code() is grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: call(server, "Classify", req, "vb_nope_nope")).code() is grpc.StatusCode.UNAUTHENTICATED
    # beta's key never reaches alpha's adapters: beta has no 'ner' -> NOT_FOUND, and its own 'cls' is its own
    err = code_of(lambda: call(server, "Tag", T.TagRequest(adapter="ner", inputs=texts("x")), keys["beta"]))
    assert err.code() is grpc.StatusCode.NOT_FOUND
    mine = call(server, "Classify", T.ClassifyRequest(adapter="cls", inputs=texts("x")), keys["beta"])[0]
    assert {s.label for s in mine.results[0].scores} == {"L0", "L1"}     # beta's 2-label head, not alpha's 3


def test_suspended_tenant_is_refused(server):
    key = server.register("gamma")
    req = T.EmbedRequest(inputs=texts("x"))
    call(server, "Embed", req, key)
    server.app.manager.registry.set_status("gamma", "suspended", actor="test")
    server.app.auth.invalidate()
    err = code_of(lambda: call(server, "Embed", req, key))
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED and "suspended" in err.details()


def test_rate_limit_is_resource_exhausted_with_retry_info(server):
    key = server.register("slow", requests_per_s=0.5, burst=2, max_tokens_per_request=64, weight=1.0)
    req = T.EmbedRequest(inputs=texts("a", "b"))
    call(server, "Embed", req, key)
    err = code_of(lambda: call(server, "Embed", req, key))
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and "rate limit" in err.details()
    assert int(dict(err.trailing_metadata())[RETRY_AFTER_KEY]) > 0


def test_client_deadline_reaches_the_scheduler(server, tenants):
    keys, _ = tenants
    gate = threading.Event()
    cache = server.app.manager.cache
    original = cache.loader
    ref = server.app.manager.resolve(server.app.manager.get_tenant("alpha"), "emb")
    cache.invalidate(ref.adapter_id)

    def slow(adapter_id):
        gate.wait(10)
        return original(adapter_id)

    cache.loader = slow
    try:
        t0 = time.monotonic()
        err = code_of(lambda: server.tenant.Embed(T.EmbedRequest(adapter="emb", inputs=texts("x")),
                                                  metadata=bearer(keys["alpha"]), timeout=0.5))
        assert err.code() is grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - t0 < 5
    finally:
        gate.set()
        cache.loader = original


def test_streams_answer_in_order(server, tenants):
    keys, arts = tenants
    words = ["cancer", "gene", "the patient", "tumor cells", "protein"] * 4
    reqs = (T.ClassifyRequest(adapter="cls", inputs=texts(w)) for w in words)
    out = list(server.tenant.ClassifyStream(reqs, metadata=bearer(keys["alpha"]), timeout=60))
    assert [r.results[0].label for r in out] == [local(server, arts["cls"], w)[0].predicted() for w in words]
    embs = list(server.tenant.EmbedStream(iter([T.EmbedRequest(inputs=texts("x"))] * 3), metadata=bearer(keys["alpha"]),
                                          timeout=60))
    assert len(embs) == 3
    bad = iter([T.TagRequest(adapter="ner", inputs=texts("x")), T.TagRequest(adapter="ner")])
    err = code_of(lambda: list(server.tenant.TagStream(bad, metadata=bearer(keys["alpha"]), timeout=60)))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
