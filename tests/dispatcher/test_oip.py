"""The Open Inference Protocol (KServe v2) over real gRPC on loopback.

A stock client (tritonclient.grpc) runs in a child process: its generated `inference` protobuf
module and ours cannot be loaded into one process (both define `inference.*` in protobuf's default
descriptor pool). The child runs a list of calls and prints their results as JSON; the edge cases
below use our own stubs in this process."""
from __future__ import annotations

import json
import subprocess
import sys

import grpc
import numpy as np
import pytest

from dispatcher.gen.inference import grpc_service_pb2 as pb
from dispatcher.gen.inference import grpc_service_pb2_grpc
from dispatcher.gen.vbert.v1 import tenant_pb2
from dispatcher.oip_service import decode_bytes_tensor, encode_bytes_tensor
from tests.conftest import classify, embed_head, make_artifact
from tests.dispatcher.conftest import bearer
from vbert import HeadKind, HeadSpec

TEXTS = ["the patient with cancer was treated", "gene expression was increased in the tumor",
         "we show results of this study"]

# The child: reads {"address", "calls": [...]} on stdin, prints one result per call.
CLIENT = r'''
import json, sys
import numpy as np
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

plan = json.load(sys.stdin)
client = tc.InferenceServerClient(url=plan["address"])

def headers(call):
    return {"authorization": "Bearer " + call["key"]} if call.get("key") else None

def value(arr):
    arr = np.asarray(arr)
    if arr.dtype == object:
        return [[y.decode() for y in x] if isinstance(x, np.ndarray) else x.decode() for x in arr]
    return arr.tolist()

def run(call):
    op, h = call["op"], headers(call)
    if op == "live":
        return client.is_server_live(headers=h)
    if op == "ready":
        return client.is_server_ready(headers=h)
    if op == "server_metadata":
        return client.get_server_metadata(headers=h, as_json=True)
    if op == "model_ready":
        return client.is_model_ready(call["model"], call.get("version", ""), headers=h)
    if op == "model_metadata":
        return client.get_model_metadata(call["model"], call.get("version", ""), headers=h, as_json=True)
    if op == "infer":
        dtype = call.get("datatype", "BYTES")
        inp = tc.InferInput("text", [len(call["texts"])], dtype)
        if dtype == "BYTES":
            inp.set_data_from_numpy(np.array([t.encode() for t in call["texts"]], dtype=object))
        else:
            inp.set_data_from_numpy(np.arange(len(call["texts"]), dtype=np.float32))
        outs = [tc.InferRequestedOutput(n, class_count=call.get("class_count", {}).get(n, 0))
                for n in call.get("outputs", [])] or None
        r = client.infer(call["model"], [inp], outputs=outs, request_id=call.get("id", ""), headers=h,
                         parameters=call.get("params"))
        resp = r.get_response()
        return {"model_name": resp.model_name, "model_version": resp.model_version, "id": resp.id,
                "outputs": {o.name: {"datatype": o.datatype, "shape": list(o.shape), "data": value(r.as_numpy(o.name)),
                                     "parameters": {k: v.string_param for k, v in o.parameters.items()}}
                            for o in resp.outputs}}
    raise ValueError(op)

results = []
for call in plan["calls"]:
    try:
        results.append({"ok": True, "value": run(call)})
    except InferenceServerException as e:
        results.append({"ok": False, "status": e.status(), "message": e.message()})
print(json.dumps(results))
'''


def run_client(address: str, calls: list[dict]) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", CLIENT], input=json.dumps({"address": address, "calls": calls}),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def tenants(server):
    shape = server.app.model.spec.shape
    keys = {name: server.register(name) for name in ("alpha", "beta")}
    m = server.app.manager
    m.upload_adapter("alpha", "cls", make_artifact(shape, "lora", classify(3), 11, rank=4))
    m.upload_adapter("alpha", "ner", make_artifact(shape, "bottleneck",
                                                   HeadSpec(HeadKind.TAG, ("B-Disease", "I-Disease", "O")), 12, size=8))
    m.upload_adapter("alpha", "emb", make_artifact(shape, "lora", embed_head("mean", True), 13, rank=2))
    m.upload_adapter("beta", "cls", make_artifact(shape, "bottleneck", classify(2), 14, size=4))
    return keys


@pytest.fixture(scope="module")
def stock(server, tenants):
    """Every tritonclient call of this module, run once in one child process."""
    a, b = tenants["alpha"], tenants["beta"]
    calls = {
        "live": dict(op="live"), "ready": dict(op="ready"), "server_metadata": dict(op="server_metadata"),
        "model_ready": dict(op="model_ready", model="alpha/cls", key=a),
        "model_ready_v1": dict(op="model_ready", model="alpha/cls", version="1", key=a),
        "model_ready_v7": dict(op="model_ready", model="alpha/cls", version="7", key=a),
        "model_ready_unknown": dict(op="model_ready", model="alpha/nope", key=a),
        "metadata_cls": dict(op="model_metadata", model="alpha/cls", key=a),
        "metadata_ner": dict(op="model_metadata", model="alpha/ner", key=a),
        "metadata_default": dict(op="model_metadata", model="alpha/default", key=a),
        "classify": dict(op="infer", model="alpha/cls", key=a, texts=TEXTS, outputs=["label", "scores"], id="req-1"),
        "classify_top2": dict(op="infer", model="alpha/cls", key=a, texts=TEXTS[:1], outputs=["scores"],
                              class_count={"scores": 2}),
        "embed_default": dict(op="infer", model="alpha/default", key=a, texts=TEXTS[:2]),
        "embed_raw": dict(op="infer", model="alpha/emb", key=a, texts=TEXTS[:1], params={"normalize": False}),
        "tag": dict(op="infer", model="alpha/ner", key=a, texts=TEXTS[:2], outputs=["tags", "entities"]),
        "other_tenant": dict(op="infer", model="beta/cls", key=a, texts=TEXTS[:1]),
        "other_tenant_ready": dict(op="model_ready", model="beta/cls", key=a),
        "beta_own": dict(op="infer", model="beta/cls", key=b, texts=TEXTS[:1]),
        "no_key_infer": dict(op="infer", model="alpha/cls", texts=TEXTS[:1]),
        "no_key_ready": dict(op="model_ready", model="alpha/cls"),
        "bad_key": dict(op="infer", model="alpha/cls", key="vb_not_a_key", texts=TEXTS[:1]),
        "bad_datatype": dict(op="infer", model="alpha/cls", key=a, texts=TEXTS[:2], datatype="FP32"),
        "unknown_adapter": dict(op="infer", model="alpha/nope", key=a, texts=TEXTS[:1]),
        "unknown_metadata": dict(op="model_metadata", model="alpha/nope", key=a),
        "unknown_output": dict(op="infer", model="alpha/cls", key=a, texts=TEXTS[:1], outputs=["embedding"]),
    }
    names = list(calls)
    results = run_client(server.address, [calls[n] for n in names])
    return dict(zip(names, results))


def ok(result):
    assert result["ok"], result
    return result["value"]


def status(result):
    assert not result["ok"], result
    return result["status"]


def tenant_call(server, method, request, key):
    return getattr(server.tenant, method)(request, metadata=bearer(key), timeout=30)


def test_server_level_calls_need_no_key(stock):
    assert ok(stock["live"]) is True and ok(stock["ready"]) is True
    meta = ok(stock["server_metadata"])
    assert meta["name"] == "vbert" and meta["version"] and meta.get("extensions", []) == []


def test_model_ready_and_metadata(stock):
    assert ok(stock["model_ready"]) is True and ok(stock["model_ready_v1"]) is True
    assert ok(stock["model_ready_v7"]) is False and ok(stock["model_ready_unknown"]) is False
    cls = ok(stock["metadata_cls"])
    assert cls["name"] == "alpha/cls" and cls["platform"] == "vbert" and cls["versions"] == ["1"]
    assert cls["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": ["-1"]}]
    assert cls["outputs"] == [{"name": "label", "datatype": "BYTES", "shape": ["-1"]},
                              {"name": "scores", "datatype": "FP32", "shape": ["-1", "3"]}]
    assert [o["name"] for o in ok(stock["metadata_ner"])["outputs"]] == ["tags", "entities"]
    default = ok(stock["metadata_default"])
    assert default["versions"] == ["0"] and default["outputs"][0]["name"] == "embedding"


def test_classify_equals_the_tenant_api(server, tenants, stock):
    got = ok(stock["classify"])
    assert (got["model_name"], got["model_version"], got["id"]) == ("alpha/cls", "1", "req-1")
    label, scores = got["outputs"]["label"], got["outputs"]["scores"]
    assert (label["datatype"], label["shape"]) == ("BYTES", [3])
    assert (scores["datatype"], scores["shape"]) == ("FP32", [3, 3])
    names = json.loads(scores["parameters"]["labels"])
    assert names == ["L0", "L1", "L2"]
    ref = tenant_call(server, "Classify", tenant_pb2.ClassifyRequest(
        adapter="cls", inputs=[tenant_pb2.Input(text=t) for t in TEXTS]), tenants["alpha"])
    for row, lab, res in zip(scores["data"], label["data"], ref.results):
        assert lab == res.label
        expected = {s.label: s.score for s in res.scores}
        assert np.allclose(row, [expected[n] for n in names], atol=1e-5, rtol=0)
        assert abs(sum(row) - 1) < 1e-5

    top2 = ok(stock["classify_top2"])["outputs"]["scores"]     # Triton's classification extension
    assert top2["datatype"] == "BYTES" and top2["shape"] == [1, 2]
    (first, second), best = top2["data"][0], ref.results[0].scores
    score, index, name = first.split(":")
    assert name == best[0].label == names[int(index)] and abs(float(score) - best[0].score) < 1e-5
    assert second.split(":")[2] == best[1].label


def test_embed_default_and_normalize_equal_the_tenant_api(server, tenants, stock):
    got = ok(stock["embed_default"])
    emb = got["outputs"]["embedding"]
    hidden = server.app.model.spec.hidden_size
    assert (emb["datatype"], emb["shape"], got["model_version"]) == ("FP32", [2, hidden], "0")
    ref = tenant_call(server, "Embed", tenant_pb2.EmbedRequest(
        adapter="default", inputs=[tenant_pb2.Input(text=t) for t in TEXTS[:2]]), tenants["alpha"])
    assert np.allclose(emb["data"], [list(r.values) for r in ref.results], atol=1e-5, rtol=0)

    raw = ok(stock["embed_raw"])["outputs"]["embedding"]["data"][0]
    ref = tenant_call(server, "Embed", tenant_pb2.EmbedRequest(
        adapter="emb", inputs=[tenant_pb2.Input(text=TEXTS[0])], normalize=False), tenants["alpha"])
    assert np.allclose(raw, list(ref.results[0].values), atol=1e-5, rtol=0)
    assert abs(np.linalg.norm(raw) - 1) > 1e-3


def test_tag_equals_the_tenant_api(server, tenants, stock):
    got = ok(stock["tag"])["outputs"]
    assert got["tags"]["shape"] == [2] and got["entities"]["shape"] == [2]
    ref = tenant_call(server, "Tag", tenant_pb2.TagRequest(
        adapter="ner", inputs=[tenant_pb2.Input(text=t) for t in TEXTS[:2]]), tenants["alpha"])
    for tags, entities, res in zip(got["tags"]["data"], got["entities"]["data"], ref.results):
        tags, entities = json.loads(tags), json.loads(entities)
        assert [(t["token"], t["label"], t["start_char"], t["end_char"]) for t in tags] == \
               [(t.token, t.label, t.start_char, t.end_char) for t in res.tokens]
        assert tags[0]["start_char"] == -1 and tags[1]["start_char"] >= 0      # [CLS], then a word
        assert np.allclose([t["score"] for t in tags], [t.score for t in res.tokens], atol=1e-5)
        assert [(e["label"], e["text"], e["start_token"], e["end_token"], e["start_char"], e["end_char"])
                for e in entities] == \
               [(e.label, e.text, e.start_token, e.end_token, e.start_char, e.end_char) for e in res.entities]


def test_tenant_isolation_and_auth(stock):
    assert status(stock["other_tenant"]) == "StatusCode.PERMISSION_DENIED"
    assert status(stock["other_tenant_ready"]) == "StatusCode.PERMISSION_DENIED"
    assert ok(stock["beta_own"])["outputs"]["scores"]["shape"] == [1, 2]
    assert status(stock["no_key_infer"]) == "StatusCode.UNAUTHENTICATED"
    assert status(stock["no_key_ready"]) == "StatusCode.UNAUTHENTICATED"
    assert status(stock["bad_key"]) == "StatusCode.UNAUTHENTICATED"


def test_errors_name_the_problem(stock):
    assert status(stock["bad_datatype"]) == "StatusCode.INVALID_ARGUMENT"
    assert "FP32" in stock["bad_datatype"]["message"] and "BYTES" in stock["bad_datatype"]["message"]
    assert status(stock["unknown_adapter"]) == "StatusCode.NOT_FOUND"
    assert status(stock["unknown_metadata"]) == "StatusCode.NOT_FOUND"
    assert status(stock["unknown_output"]) == "StatusCode.INVALID_ARGUMENT"
    assert "'embedding'" in stock["unknown_output"]["message"]


# -- edge cases with our own stubs, in this process ------------------------------------------------
@pytest.fixture(scope="module")
def oip(server):
    return grpc_service_pb2_grpc.GRPCInferenceServiceStub(server.channel)


def infer_request(model, texts, *, raw=True, shape=None, datatype="BYTES", name="text", **kw):
    items = [t.encode() for t in texts]
    tensor = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype,
                                                   shape=shape if shape is not None else [len(items)])
    request = pb.ModelInferRequest(model_name=model, inputs=[tensor], **kw)
    if raw:
        request.raw_input_contents.append(encode_bytes_tensor(items))
    else:
        tensor = request.inputs[0]
        tensor.contents.bytes_contents.extend(items)
    return request


def infer(oip, key, request):
    return oip.ModelInfer(request, metadata=bearer(key), timeout=30)


def code(fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


def scores_of(response, name="scores"):
    i = [o.name for o in response.outputs].index(name)
    out = response.outputs[i]
    return np.frombuffer(response.raw_output_contents[i], dtype="<f4").reshape(list(out.shape))


def test_bytes_contents_and_n_by_1_shape_match_raw(oip, tenants):
    key = tenants["alpha"]
    a = infer(oip, key, infer_request("alpha/cls", TEXTS))
    b = infer(oip, key, infer_request("alpha/cls", TEXTS, raw=False, shape=[3, 1]))
    assert np.allclose(scores_of(a), scores_of(b), atol=1e-6)
    labels = decode_bytes_tensor(a.raw_output_contents[0], "label")
    assert len(labels) == 3 and a.outputs[0].name == "label"
    c = infer(oip, key, infer_request("alpha/cls", TEXTS[:1], name="sentence"))   # the only input, any name
    assert np.allclose(scores_of(c), scores_of(a)[:1], atol=1e-6)


def test_invalid_requests(server, oip, tenants):
    key, INVALID = tenants["alpha"], grpc.StatusCode.INVALID_ARGUMENT
    cases = {
        "shape": infer_request("alpha/cls", TEXTS[:2], shape=[1, 2]),
        "elements": infer_request("alpha/cls", TEXTS[:2], shape=[3]),
        "empty": infer_request("alpha/cls", [], shape=[0]),
        "blank": infer_request("alpha/cls", ["ok", "  "]),
        "too many": infer_request("alpha/cls", ["w"] * (server.app.config.max_texts_per_request + 1)),
        "no data": pb.ModelInferRequest(model_name="alpha/cls", inputs=[pb.ModelInferRequest.InferInputTensor(
            name="text", datatype="BYTES", shape=[1])]),
        "no input": pb.ModelInferRequest(model_name="alpha/cls"),
        "model name": infer_request("cls", TEXTS[:1]),
        "normalize on classify": infer_request("alpha/cls", TEXTS[:1]),
        "param type": infer_request("alpha/emb", TEXTS[:1]),
        "utf8": infer_request("alpha/cls", TEXTS[:1]),
    }
    cases["normalize on classify"].parameters["normalize"].bool_param = True
    cases["param type"].parameters["truncate"].string_param = "yes"
    cases["utf8"].raw_input_contents[0] = encode_bytes_tensor([b"\xff\xfe"])
    cases["raw length"] = infer_request("alpha/cls", TEXTS[:1])
    cases["raw length"].raw_input_contents[0] = (99).to_bytes(4, "little") + b"abc"   # claims 99 bytes
    cases["raw prefix"] = infer_request("alpha/cls", TEXTS[:1])
    cases["raw prefix"].raw_input_contents[0] += b"\x01\x00"                         # half a length prefix
    two = infer_request("alpha/cls", TEXTS[:1])
    two.inputs.add(name="other", datatype="BYTES", shape=[1])
    cases["two inputs"] = two
    for what, request in cases.items():
        got, message = code(lambda: infer(oip, key, request))
        assert got is INVALID, (what, got, message)
        assert message, what


def test_version_truncate_and_rate_limit(server, oip, tenants):
    key = tenants["alpha"]
    assert infer(oip, key, infer_request("alpha/cls", TEXTS[:1], model_version="1")).model_version == "1"
    got, message = code(lambda: infer(oip, key, infer_request("alpha/cls", TEXTS[:1], model_version="2")))
    assert got is grpc.StatusCode.NOT_FOUND and "active version is 1" in message

    long_text = " ".join(["gene"] * 200)   # above the tiny model's 64 positions
    assert infer(oip, key, infer_request("alpha/cls", [long_text])).outputs
    reject = infer_request("alpha/cls", [long_text])
    reject.parameters["truncate"].bool_param = False
    assert code(lambda: infer(oip, key, reject))[0] is grpc.StatusCode.INVALID_ARGUMENT

    slow = server.register("slow", requests_per_s=0.01, burst=2)
    server.app.manager.upload_adapter("slow", "cls", make_artifact(server.app.model.spec.shape, "lora",
                                                                   classify(2), 21, rank=2))
    assert infer(oip, slow, infer_request("slow/cls", TEXTS[:2]))
    got, _ = code(lambda: infer(oip, slow, infer_request("slow/cls", TEXTS[:1])))
    assert got is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_server_ready_is_false_while_draining(server, oip):
    assert oip.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
    server.app.is_draining = True
    try:
        assert not oip.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
        assert oip.ServerLive(pb.ServerLiveRequest(), timeout=10).live
    finally:
        server.app.is_draining = False
