"""The OpenAI-compatible HTTP API over real HTTP on loopback, called with the stock `openai` package:
completions equal gRPC Generate, streamed chat (SSE, usage chunk, [DONE]), embeddings equal gRPC Embed,
models listing (own adapters only), errors in OpenAI's shape with the right status (wrong key, another
tenant's adapter, n > 1, wrong backbone, rate limit with Retry-After), and a drain that lets a stream
finish while new requests get 503."""
from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

from dispatcher.gen.vbert.v1 import tenant_pb2
from tests.conftest import classify, embed_head, make_artifact
from tests.decoder_models import write_tiny_decoder_checkpoint, write_tiny_decoder_lora
from tests.dispatcher.conftest import RunningServer, bearer, tiny_server_config

openai = pytest.importorskip("openai")
T = tenant_pb2


def post(url: str, key: str, body, timeout: float = 30):
    """(status, headers, JSON body) of a POST; body: a dict (sent as JSON) or raw bytes."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def http_server(tiny_checkpoint, decoder_dir, tmp_path_factory):
    s = RunningServer(tiny_server_config(tiny_checkpoint, tmp_path_factory.mktemp("var"), decoder=str(decoder_dir),
                                         decoder_kv_cache_mb=1, decoder_block_size=4, http_port=free_port()))
    s.keys = {"acme": s.register("acme"), "other": s.register("other"),
              "slow": s.register("slow", requests_per_s=0.01, burst=1)}
    shape = s.app.model.spec.shape
    s.app.manager.upload_adapter("acme", "cls", make_artifact(shape, "lora", classify(2), 1, rank=2))
    s.app.manager.upload_adapter("acme", "emb", make_artifact(shape, "lora", embed_head(), 2, rank=2))
    lora_dir = write_tiny_decoder_lora(tmp_path_factory.mktemp("lora") / "writer", decoder_dir, seed=3)
    from vbert.artifact import load_artifact
    s.app.manager.upload_adapter("acme", "writer", load_artifact(lora_dir))
    s.base_url = f"http://127.0.0.1:{s.server.http_port}/v1"
    yield s
    s.stop()


def client(s, tenant="acme", **kw):
    return openai.OpenAI(base_url=s.base_url, api_key=s.keys.get(tenant, tenant), max_retries=0, timeout=30, **kw)


def grpc_tokens(s, **fields):
    msgs = list(s.tenant.Generate(T.GenerateRequest(**fields), metadata=bearer(s.keys["acme"]), timeout=30))
    return "".join(m.text for m in msgs), msgs[-1]


def test_completion_equals_grpc_generate(http_server):
    s = http_server
    c = client(s)
    for model in ("default", "writer"):
        out = c.completions.create(model=model, prompt="the patient was treated", max_tokens=8, temperature=0,
                                   extra_body={"ignore_eos": True})
        text, final = grpc_tokens(s, adapter=model, prompt="the patient was treated", max_new_tokens=8,
                                  temperature=0, ignore_eos=True)
        assert out.object == "text_completion" and out.model == model
        assert out.choices[0].text == text and out.choices[0].finish_reason == "length"
        assert out.usage.completion_tokens == 8 and out.usage.prompt_tokens == final.usage.prompt_tokens
    samples = s.app.metrics.registry.get_sample_value("vbert_rpc_duration_seconds_count",
                                                      {"method": "/v1/completions", "code": "OK"})
    assert samples >= 2                          # one histogram sample per HTTP call, labelled by route
    default_len = c.completions.create(model="default", prompt="hi", temperature=0,
                                       extra_body={"ignore_eos": True}).usage.completion_tokens
    assert default_len == 16                     # OpenAI's default max_tokens for completions
    lp = c.completions.create(model="default", prompt="hi", max_tokens=3, temperature=0, logprobs=2,
                              extra_body={"ignore_eos": True}).choices[0].logprobs
    assert len(lp.tokens) == 3 and all(v <= 0 for v in lp.token_logprobs) and all(len(t) == 2 for t in lp.top_logprobs)


def test_streamed_chat_with_usage_and_logprobs(http_server):
    s = http_server
    c = client(s)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    whole = c.chat.completions.create(model="writer", messages=messages, max_tokens=10, temperature=0,
                                      extra_body={"ignore_eos": True})
    chunks = list(c.chat.completions.create(model="writer", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content and whole.choices[0].message.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens
    grpc_text, _ = grpc_tokens(s, adapter="writer", messages=[T.ChatMessage(role=r, content=t) for r, t in
                                                               (("system", "be brief"), ("user", "hello"))],
                               max_new_tokens=10, temperature=0, ignore_eos=True)
    assert text == grpc_text
    lp = c.chat.completions.create(model="default", messages=messages, max_tokens=4, temperature=0.7, seed=3,
                                   logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = lp.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    again = c.chat.completions.create(model="default", messages=messages, max_tokens=4, temperature=0.7, seed=3,
                                      extra_body={"ignore_eos": True})
    assert again.choices[0].message.content == lp.choices[0].message.content     # seeded


def test_penalties_steer_away_from_repeats_the_same_over_http_and_grpc(http_server):
    """OpenAI's presence and frequency penalties and logit_bias, vLLM's repetition_penalty, min_p and stop_token_ids
    reach the sampler from both protocols: greedy, the same tokens over HTTP and gRPC; with strong penalties no token
    repeats where the bare greedy output repeats them; a bias of -100 bans a token; out of range (a token id
    outside the vocabulary too) refused with the field named, nothing generated."""
    s = http_server
    c = client(s)
    prompt = "the patient was treated"
    plain = c.completions.create(model="default", prompt=prompt, max_tokens=24, temperature=0, logprobs=1,
                                 extra_body={"ignore_eos": True}).choices[0]
    plain_ids = [t for t in plain.logprobs.tokens]
    assert len(set(plain_ids)) < len(plain_ids)                       # this tiny model repeats itself
    for fields in ({"frequency_penalty": 2.0, "presence_penalty": 2.0}, {"repetition_penalty": 50.0}):
        out = c.completions.create(model="default", prompt=prompt, max_tokens=24, temperature=0,
                                   extra_body={"ignore_eos": True, **fields})
        text, final = grpc_tokens(s, prompt=prompt, max_new_tokens=24, temperature=0, ignore_eos=True, **fields)
        assert out.choices[0].text == text and final.usage.completion_tokens == 24
        assert out.choices[0].text != plain.text, fields
    ids = [t for m in s.tenant.Generate(T.GenerateRequest(prompt=prompt, max_new_tokens=24, temperature=0,
                                                          ignore_eos=True, presence_penalty=2.0),
                                        metadata=bearer(s.keys["acme"]), timeout=30) for t in m.token_ids]
    assert len(ids) == 24 and len(set(ids)) > len(set(plain_ids))
    from dispatcher.client import Client

    with Client(s.address, api_key=s.keys["acme"]) as cl:                # the Python client and the CLI pass them
        assert [t for e in cl.generate(prompt, max_new_tokens=24, temperature=0, ignore_eos=True,
                                       presence_penalty=2.0) for t in e["token_ids"]] == ids
        assert [t for e in cl.generate(prompt, max_new_tokens=3, temperature=0, ignore_eos=True,
                                       logit_bias={ids[0]: -100}) for t in e["token_ids"]][0] != ids[0]
    vbert = str(Path(sys.executable).parent / "vbert")
    out = subprocess.run([vbert, "generate", "--server", s.address, "--api-key", s.keys["acme"], "--max-new-tokens",
                          "24", "--temperature", "0", "--ignore-eos", "--presence-penalty", "2", prompt],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == s.app.decoder.tokenizer.decode(ids, skip_special_tokens=True) + "\n"
    for name, value in (("presence_penalty", 2.5), ("frequency_penalty", -3), ("repetition_penalty", 0),
                        ("logit_bias", {"5": 101}), ("logit_bias", {str(s.app.decoder.spec.vocab_size): 1.0}), ("logit_bias", {"x": 1.0}),
                        ("stop_token_ids", [-1]), ("stop_token_ids", list(range(65))), ("min_p", 1.5)):
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="default", prompt=prompt, max_tokens=2, extra_body={name: value})
        assert name in e.value.body["message"], (name, value, e.value.body)
    # logit_bias (OpenAI's) bans greedy's first token, the same over both protocols; stop_token_ids (vLLM's) stop
    greedy = [t for m in s.tenant.Generate(T.GenerateRequest(prompt=prompt, max_new_tokens=8, temperature=0,
                                                             ignore_eos=True), metadata=bearer(s.keys["acme"]),
                                           timeout=30) for t in m.token_ids]
    banned = c.completions.create(model="default", prompt=prompt, max_tokens=8, temperature=0,
                                  logit_bias={str(greedy[0]): -100}, extra_body={"ignore_eos": True}).choices[0].text
    text, _ = grpc_tokens(s, prompt=prompt, max_new_tokens=8, temperature=0, ignore_eos=True,
                          logit_bias={greedy[0]: -100.0})
    assert banned == text and banned != s.app.decoder.tokenizer.decode(greedy, skip_special_tokens=True)
    # min_p (vLLM's) = 1 keeps only the most likely token: sampling at temperature 1 is then greedy, on every path
    greedy_text = s.app.decoder.tokenizer.decode(greedy, skip_special_tokens=True)
    assert c.completions.create(model="default", prompt=prompt, max_tokens=8, temperature=1.0, seed=3,
                                extra_body={"ignore_eos": True, "min_p": 1.0}).choices[0].text == greedy_text
    assert grpc_tokens(s, prompt=prompt, max_new_tokens=8, temperature=1.0, ignore_eos=True, min_p=1.0)[0] == greedy_text
    with Client(s.address, api_key=s.keys["acme"]) as cl:
        assert [t for e in cl.generate(prompt, max_new_tokens=8, ignore_eos=True, min_p=1.0)
                for t in e["token_ids"]] == greedy
    stopped = c.completions.create(model="default", prompt=prompt, max_tokens=8, temperature=0,
                                   extra_body={"stop_token_ids": [greedy[2]]}).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == s.app.decoder.tokenizer.decode(greedy[:greedy.index(greedy[2])], skip_special_tokens=True)
    # min_tokens (vLLM's): that stop token may not end the first 4 tokens, over HTTP, gRPC, the client and the CLI
    held = c.completions.create(model="default", prompt=prompt, max_tokens=8, temperature=0, logprobs=1,
                                extra_body={"stop_token_ids": [greedy[2]], "min_tokens": 4}).choices[0]
    text, final = grpc_tokens(s, prompt=prompt, max_new_tokens=8, temperature=0, stop_token_ids=[greedy[2]],
                              min_tokens=4)
    assert held.text == text and final.usage.completion_tokens == len(held.logprobs.tokens) >= 5
    with Client(s.address, api_key=s.keys["acme"]) as cl:
        ids = [t for e in cl.generate(prompt, max_new_tokens=8, temperature=0, stop_token_ids=[greedy[2]], min_tokens=4)
               for t in e["token_ids"]]
    assert greedy[2] not in ids[:4] and s.app.decoder.tokenizer.decode(ids, skip_special_tokens=True) == text
    out = subprocess.run([vbert, "generate", "--server", s.address, "--api-key", s.keys["acme"], "--max-new-tokens",
                          "8", "--temperature", "0", "--ignore-eos", "--min-tokens", "8", "--stop", greedy_text[:2],
                          prompt], capture_output=True, text=True, timeout=120)     # the stop string is at its start
    assert out.returncode == 0 and out.stdout == greedy_text + "\n", (out.stdout, greedy_text)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="default", prompt=prompt, max_tokens=4, extra_body={"min_tokens": 5})
    assert "min_tokens" in e.value.body["message"]
    # include_stop_str_in_output (vLLM's): the stop string ends the text, over HTTP, gRPC and the CLI
    stop = greedy_text[2:4]
    cut = greedy_text[:greedy_text.index(stop)]
    kept = c.completions.create(model="default", prompt=prompt, max_tokens=8, temperature=0, stop=[stop],
                                extra_body={"ignore_eos": True, "include_stop_str_in_output": True}).choices[0]
    assert kept.text == cut + stop and kept.finish_reason == "stop"
    assert grpc_tokens(s, prompt=prompt, max_new_tokens=8, temperature=0, ignore_eos=True, stop=[stop],
                       include_stop_str_in_output=True)[0] == cut + stop
    out = subprocess.run([vbert, "generate", "--server", s.address, "--api-key", s.keys["acme"], "--max-new-tokens",
                          "8", "--temperature", "0", "--ignore-eos", "--stop", stop, "--include-stop", prompt],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout == cut + stop + "\n", (out.stdout, cut + stop)


def test_structured_output_over_http_grpc_the_client_and_the_cli(http_server):
    """OpenAI's response_format (json_schema, json_object), vLLM's structured_outputs and guided_* reach the engine:
    the random tiny decoder's sampled answers follow the grammar, the same over HTTP and gRPC (seeded); bad grammars
    and ambiguous requests are refused with the field named, nothing generated."""
    import re

    import grpc

    s = http_server
    c = client(s)
    metric = s.app.metrics.registry.get_sample_value
    before = {k: metric("vbert_generation_structured_requests_total", {"kind": k}) or 0
              for k in ("json", "regex", "choice", "json_object")}
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "tag": {"enum": ["a", "bc"]}},
              "required": ["ok", "tag"], "additionalProperties": False}
    messages = [{"role": "user", "content": "a visit"}]      # on default: the n-choices test counts writer's hits
    for seed in (1, 2, 3):          # max_tokens: up to 16 whitespace characters a gap, ~170 tokens at worst
        answer = c.chat.completions.create(
            model="default", messages=messages, temperature=1.0, seed=seed, max_tokens=220,
            response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}).choices[0]
        value = json.loads(answer.message.content)
        assert answer.finish_reason == "stop" and set(value) == {"ok", "tag"} and value["tag"] in ("a", "bc")
        text, final = grpc_tokens(s, messages=[T.ChatMessage(role="user", content="a visit")],
                                  temperature=1.0, seed=seed, max_new_tokens=220,
                                  structured_output=T.StructuredOutput(json=json.dumps(schema)))
        assert text == answer.message.content and final.finish_reason == T.STOP
    for extra in ({"guided_regex": "[0-9]{3}-[a-z]{2}"}, {"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}}):
        out = c.completions.create(model="default", prompt="x", max_tokens=20, temperature=1.0, seed=4,
                                   extra_body=extra).choices[0]
        assert re.fullmatch("[0-9]{3}-[a-z]{2}", out.text) and out.finish_reason == "stop", (extra, out.text)
    for extra in ({"guided_choice": ["yes", "no"]}, {"structured_outputs": {"choice": ["yes", "no"]}}):
        assert c.completions.create(model="default", prompt="x", max_tokens=8, extra_body=extra).choices[0].text \
            in ("yes", "no")
    start = c.chat.completions.create(model="default", messages=messages, max_tokens=6,
                                      response_format={"type": "json_object"}).choices[0].message.content
    assert start.startswith("{")
    from dispatcher.client import Client

    with Client(s.address, api_key=s.keys["acme"]) as cl:
        events = list(cl.generate("x", max_new_tokens=8, structured_output={"choice": ["alpha", "beta"]}))
    assert "".join(e["text"] for e in events) in ("alpha", "beta") and events[-1]["finish_reason"] == "stop"
    vbert = str(Path(sys.executable).parent / "vbert")
    out = subprocess.run([vbert, "generate", "--server", s.address, "--api-key", s.keys["acme"], "--max-new-tokens",
                          "8", "--choice", "left", "--choice", "right", "x"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() in ("left", "right"), out
    for extra, param, fragment in (
            ({"guided_regex": "(unclosed"}, None, "structured output regex"),
            ({"response_format": {"type": "json_schema", "json_schema": {"name": "t"}}}, "response_format", "schema"),
            ({"response_format": {"type": "xml"}}, "response_format", "json_object"),
            ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
            ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs", "structural_tag"),
            ({"guided_choice": []}, "guided_choice", "non-empty"),
            ({"guided_json": {"type": "nonsense"}}, None, "structured output json"),
            ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "give one of")):
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="default", prompt="x", max_tokens=4, extra_body=extra)
        assert fragment in e.value.body["message"] and (param is None or e.value.body["param"] == param), \
            (extra, e.value.body)
    with pytest.raises(grpc.RpcError) as e:
        grpc_tokens(s, prompt="x", max_new_tokens=4, structured_output=T.StructuredOutput(regex="(unclosed"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "structured output regex" in e.value.details()
    # what Prometheus scrapes: the accepted requests by kind (the refused ones are not counted), compile times
    assert {k: metric("vbert_generation_structured_requests_total", {"kind": k}) - v for k, v in before.items()} == \
        {"json": 6, "regex": 2, "choice": 4, "json_object": 1}
    assert metric("vbert_structured_compile_seconds_count") >= 13


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}},
                                           "required": ["zone"], "additionalProperties": False}}}]


def _valid_call(call) -> bool:
    args = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        return args["city"] in ("Paris", "Oslo") and args["unit"] in ("c", "f") and len(args) == 2
    return call.function.name == "get_time" and args == {"zone": args["zone"]} and args["zone"] in ("utc", "cet")


@pytest.fixture(scope="module")
def tools_server(tiny_checkpoint, tmp_path_factory):
    """A server whose tiny decoder has a context of 1,024 tokens: the tools' system message alone takes 441 of the
    tiny tokenizer's tokens."""
    decoder = write_tiny_decoder_checkpoint(tmp_path_factory.mktemp("long-decoder") / "model", max_positions=1024)
    s = RunningServer(tiny_server_config(tiny_checkpoint, tmp_path_factory.mktemp("var"), decoder=str(decoder),
                                         decoder_kv_cache_mb=1, decoder_block_size=4, http_port=free_port()))
    s.keys = {"acme": s.register("acme", max_tokens_per_request=1024)}
    s.base_url = f"http://127.0.0.1:{s.server.http_port}/v1"
    yield s
    s.stop()


def test_tool_calls_named_required_and_auto_whole_and_streamed_then_the_result_turn(tools_server):
    """OpenAI tool calling, its calls kept valid by a grammar: a named function's arguments follow its schema
    (finish "stop"), "required" gives calls of the given tools (finish "tool_calls"), the same calls streamed
    (seeded); the call and its result go back as turns; "auto" text streams as content; unknown names, a schema
    that does not compile, tools beside a response_format and tools on /v1/completions are refused naming the
    field."""
    s = tools_server
    c = client(s)
    messages = [{"role": "user", "content": "weather in Paris?"}]
    choice = {"type": "function", "function": {"name": "get_weather"}}
    named_answer = c.chat.completions.create(model="default", messages=messages, tools=TOOLS, temperature=1.0, seed=3,
                                             max_tokens=200, tool_choice=choice)
    named = named_answer.choices[0]
    _, _, counted = post(f"{s.base_url.removesuffix('/v1')}/tokenize", s.keys["acme"],      # the tools' system text
                         {"model": "default", "messages": messages, "tools": TOOLS, "tool_choice": choice})
    assert counted["count"] == named_answer.usage.prompt_tokens
    assert named.finish_reason == "stop" and named.message.content is None
    (call,) = named.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and _valid_call(call)
    assert call.id.startswith("call_")
    for seed in (1, 2):
        kw = dict(model="default", messages=messages, tools=TOOLS, tool_choice="required", temperature=1.0,
                  seed=seed, max_tokens=400, parallel_tool_calls=False)     # whitespace of a random model
        required = c.chat.completions.create(**kw).choices[0]
        assert required.finish_reason == "tool_calls" and len(required.message.tool_calls) == 1, required
        assert all(_valid_call(t) for t in required.message.tool_calls)
        chunks = list(c.chat.completions.create(stream=True, **kw))
        deltas = [t for ch in chunks for t in (ch.choices[0].delta.tool_calls or [])]
        assert [(d.index, d.function.name, d.function.arguments) for d in deltas] == \
            [(0, t.function.name, t.function.arguments) for t in required.message.tool_calls]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        assert not any(ch.choices[0].delta.content for ch in chunks)
    # the call and its result as earlier turns, then a text answer
    follow = messages + [{"role": "assistant", "content": None,
                          "tool_calls": [{"id": call.id, "type": "function",
                                          "function": {"name": call.function.name,
                                                       "arguments": call.function.arguments}}]},
                         {"role": "tool", "tool_call_id": call.id, "content": "18 degrees"}]
    text = c.chat.completions.create(model="default", messages=follow, tools=TOOLS, tool_choice="none",
                                     max_tokens=5, temperature=0).choices[0]
    assert isinstance(text.message.content, str) and not text.message.tool_calls
    # "auto" (the default with tools): the random model writes text, never the call tag; streamed, the same text
    # arrives as content deltas (held back only where it might begin the tag), whole or cut by max_tokens
    for seed, max_tokens in ((1, 30), (2, 30), (3, 4)):
        kw = dict(model="default", messages=messages, tools=TOOLS, temperature=1.0, seed=seed, max_tokens=max_tokens)
        auto = c.chat.completions.create(**kw).choices[0]
        assert auto.message.content and auto.message.tool_calls is None and "<tool_call>" not in auto.message.content
        chunks = list(c.chat.completions.create(stream=True, **kw))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == auto.message.content
        assert chunks[-1].choices[0].finish_reason == auto.finish_reason
    assert auto.finish_reason == "length"
    bad_schema = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "strng"}}}}}]
    for kw, param in ((dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
                       "tool_choice"),
                      (dict(tools=bad_schema), "tools[0].function.parameters"),
                      (dict(tools=TOOLS, parallel_tool_calls="yes"), "parallel_tool_calls"),
                      (dict(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}), "tools"),
                      (dict(tools=[{"type": "function", "function": {"name": "bad name!"}}], tool_choice="required"),
                       "tools[0]"),
                      (dict(tool_choice="required"), "tool_choice")):
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="default", messages=messages, max_tokens=4, **kw)
        assert e.value.body["param"] == param, (kw, e.value.body)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="default", prompt="x", max_tokens=4,
                             extra_body={"tools": TOOLS, "tool_choice": "required"})
    assert e.value.body["param"] == "tools"


def test_grpc_generate_calls_tools_as_the_http_api_does(tools_server):
    """gRPC Generate with tools (the Python client): the same seeded calls as the OpenAI API, the text streamed as
    the model wrote it with the calls parsed in the final message; the calls and a result sent back as turns give
    the same answer as over HTTP; "auto" text has no calls; bad tools are INVALID_ARGUMENT naming the field."""
    from dispatcher.client import Client, VbertError

    s = tools_server
    messages = [{"role": "user", "content": "weather in Paris?"}]
    http = client(s).chat.completions.create(model="default", messages=messages, tools=TOOLS, tool_choice="required",
                                             temperature=1.0, seed=1, max_tokens=400,
                                             parallel_tool_calls=False).choices[0]
    expected = [(t.function.name, json.loads(t.function.arguments)) for t in http.message.tool_calls]
    with Client(s.address, api_key=s.keys["acme"]) as g:
        events = list(g.generate(messages=messages, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                                 temperature=1.0, seed=1, max_new_tokens=400))
        final = events[-1]
        assert [(c["name"], c["arguments"]) for c in final["tool_calls"]] == expected
        assert final["finish_reason"] == "stop" and final["tool_calls"][0]["id"].startswith("call_")
        text = "".join(e["text"] for e in events)
        assert text.startswith("<tool_call>") and text.endswith("</tool_call>")
        named = list(g.generate(messages=messages, tools=[t["function"] for t in TOOLS], tool_choice="get_time",
                                temperature=1.0, seed=2, max_new_tokens=400))[-1]
        assert [c["name"] for c in named["tool_calls"]] == ["get_time"] and _valid_call(SimpleNamespace(
            function=SimpleNamespace(name="get_time", arguments=json.dumps(named["tool_calls"][0]["arguments"]))))
        follow = messages + [{"role": "assistant", "tool_calls": final["tool_calls"]},
                             {"role": "tool", "tool_call_id": final["tool_calls"][0]["id"], "content": "18 degrees"}]
        answer = "".join(e["text"] for e in g.generate(messages=follow, tools=TOOLS, tool_choice="none",
                                                       max_new_tokens=8, temperature=0))
        openai_calls = [{"id": c["id"], "type": "function",
                         "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}}
                        for c in final["tool_calls"]]
        http_follow = messages + [{"role": "assistant", "content": None, "tool_calls": openai_calls},
                                  {"role": "tool", "tool_call_id": final["tool_calls"][0]["id"],
                                   "content": "18 degrees"}]
        assert answer == client(s).chat.completions.create(model="default", messages=http_follow, tools=TOOLS,
                                                          tool_choice="none", max_tokens=8,
                                                          temperature=0).choices[0].message.content
        vbert = [str(Path(sys.executable).parent / "vbert"), "generate", "--server", s.address, "--api-key",
                 s.keys["acme"], "--max-new-tokens", "400", "--temperature", "1", "--seed", "2"]
        tools = [arg for t in TOOLS for arg in ("--tool", json.dumps(t["function"]))]   # the request above's tools
        out = subprocess.run(vbert + ["--chat", *tools, "--tool-choice", "get_time", "weather in Paris?"],
                             capture_output=True, text=True, timeout=120)
        (line,) = [ln for ln in out.stderr.splitlines() if ln.startswith("{")]
        assert out.returncode == 0 and out.stdout.startswith("<tool_call>")
        assert (json.loads(line)["name"], json.loads(line)["arguments"]) == \
            ("get_time", named["tool_calls"][0]["arguments"])
        out = subprocess.run(vbert + [*tools, "x"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and "need --chat" in out.stderr
        auto = list(g.generate(messages=messages, tools=TOOLS, temperature=1.0, seed=1, max_new_tokens=20))
        assert "tool_calls" not in auto[-1] and "<tool_call>" not in "".join(e["text"] for e in auto)
        bad_json = [{"name": "f", "parameters": "{not json"}]
        bad_schema = [{"name": "f", "parameters": {"type": "strng"}}]
        for kw, fragment in ((dict(tools=bad_json), "tools[0].parameters: not JSON"),
                             (dict(tools=bad_schema), "tools[0].parameters: "),
                             (dict(tools=TOOLS, tool_choice="nope"), "tool_choice"),
                             (dict(tool_choice="required"), "tool_choice: needs tools"),
                             (dict(tools=TOOLS, structured_output={"regex": "a+"}), "tools: give tools or"),
                             (dict(tools=TOOLS, prompt="x", messages=None), "tools need a chat")):
            with pytest.raises(VbertError) as e:
                list(g.generate(**{"messages": messages, "max_new_tokens": 4, **kw}))
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and fragment in e.value.details, (kw, e.value)


def test_n_choices_are_generations_of_their_own_seeds_merged_in_one_answer_or_stream(http_server):
    """n = 3 sampled choices: choice i is what gRPC Generate gives with seed + i, the later choices take the
    prompt's blocks from the prefix cache, usage counts the prompt once and the completions summed; streamed, every choice's deltas carry its index, each ends with its own finish reason,
    and each equals the non-streamed choice; greedy choices are equal; best_of other than n is refused."""
    s = http_server
    c = client(s)
    messages = [{"role": "user", "content": "the patient"}]
    kw = dict(model="writer", messages=messages, max_tokens=6, temperature=1.0, seed=11, n=3,
              extra_body={"ignore_eos": True})
    hits = s.app.metrics.registry.get_sample_value
    before = hits("vbert_prefix_cache_hit_tokens_total") or 0
    whole = c.chat.completions.create(**kw)
    hit = hits("vbert_prefix_cache_hit_tokens_total") - before
    assert [ch.index for ch in whole.choices] == [0, 1, 2]
    texts = [ch.message.content for ch in whole.choices]
    for i, text in enumerate(texts):
        ref, final = grpc_tokens(s, adapter="writer", messages=[T.ChatMessage(role="user", content="the patient")],
                                 max_new_tokens=6, temperature=1.0, seed=11 + i, ignore_eos=True)
        assert text == ref
    assert len(set(texts)) > 1                                          # three seeds, not one answer thrice
    assert whole.usage.prompt_tokens == final.usage.prompt_tokens and whole.usage.completion_tokens == 18
    # choices 1 and 2 started once choice 0 had computed the prompt: they took its full blocks (of 4) from the cache
    assert hit == 2 * ((whole.usage.prompt_tokens - 1) // 4 * 4) > 0
    chunks = list(c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    streamed, finished = ["", "", ""], {}
    for ch in chunks:
        for choice in ch.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert streamed == texts and finished == {0: "length", 1: "length", 2: "length"}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 18
    greedy = c.completions.create(model="default", prompt="the patient", max_tokens=5, temperature=0, n=2)
    assert greedy.choices[0].text == greedy.choices[1].text and greedy.usage.completion_tokens <= 10
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="default", prompt="x", max_tokens=2, n=2, extra_body={"best_of": 3})
    assert e.value.body["param"] == "best_of"


def test_embeddings_equal_grpc_embed(http_server):
    s = http_server
    c = client(s)
    texts = ["aspirin reduces fever", "the cat sat"]
    for model in ("default", "emb"):
        got = c.embeddings.create(model=model, input=texts)                     # the client asks for base64
        floats = c.embeddings.create(model=model, input=texts, encoding_format="float")
        ref = s.tenant.Embed(T.EmbedRequest(adapter=model, inputs=[T.Input(text=t) for t in texts]),
                             metadata=bearer(s.keys["acme"]), timeout=30)
        for a, b, r in zip(got.data, floats.data, ref.results):
            assert a.embedding == pytest.approx(list(r.values), abs=1e-6)
            assert b.embedding == pytest.approx(list(r.values), abs=1e-6)
        assert got.usage.prompt_tokens > 0
    with pytest.raises(openai.BadRequestError) as e:        # a classify head is not an embedding model
        c.embeddings.create(model="cls", input="x")
    assert "embed head" in str(e.value)


def test_models_list_only_the_callers_adapters(http_server):
    s = http_server
    mine = {m.id for m in client(s).models.list()}
    assert mine == {"default", "cls", "emb", "writer"}
    assert {m.id for m in client(s, "other").models.list()} == {"default"}
    assert client(s).models.retrieve("writer").owned_by == "acme"
    with pytest.raises(openai.NotFoundError):
        client(s, "other").models.retrieve("writer")


def test_tokenize_and_detokenize_count_what_the_routes_send(http_server):
    """vLLM's /tokenize and /detokenize: the decoder's count of a prompt or a chat is the prompt_tokens a
    completion or chat reports, the ids decode back to the text; 'default' with backbone "encoder" or an encoder
    adapter uses the encoder's tokenizer ([CLS] ... [SEP]); bad requests are refused naming the field."""
    s = http_server
    root, key = s.base_url.removesuffix("/v1"), s.keys["acme"]

    def call(path, body, key=key):
        status, _, answer = post(f"{root}{path}", key, body)
        return status, answer
    text = "a visit to the zoo"
    status, r = call("/tokenize", {"model": "default", "prompt": text})
    completion = client(s).completions.create(model="default", prompt=text, max_tokens=1)
    assert status == 200 and r["count"] == len(r["tokens"]) == completion.usage.prompt_tokens
    assert r["max_model_len"] == s.app.decoder.spec.max_position_embeddings and "token_strs" not in r
    assert call("/detokenize", {"model": "writer", "tokens": r["tokens"]}) == (200, {"prompt": text})
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    status, r = call("/tokenize", {"model": "writer", "messages": chat})
    assert status == 200 and r["count"] == client(s).chat.completions.create(
        model="writer", messages=chat, max_tokens=1).usage.prompt_tokens
    for body in ({"model": "default", "backbone": "encoder", "prompt": "the gene w7", "return_token_strs": True},
                 {"model": "emb", "prompt": "the gene w7", "return_token_strs": True}):
        status, r = call("/tokenize", body)
        assert status == 200 and r["token_strs"][0] == "[CLS]" and r["token_strs"][-1] == "[SEP]", r
        assert r["max_model_len"] == s.app.model.max_length and r["count"] == len(r["tokens"]) == 5
        assert call("/detokenize", {**body, "tokens": r["tokens"][1:-1]})[1] == {"prompt": "the gene w7"}
    for body, param in (({"model": "default", "prompt": text, "messages": chat}, "prompt"),
                        ({"model": "default"}, "prompt"),
                        ({"model": "default", "prompt": 5}, "prompt"),
                        ({"model": "emb", "messages": chat}, "messages"),
                        ({"model": "default", "prompt": text, "backbone": "gpu"}, "backbone"),
                        ({"model": "default", "prompt": text, "add_special_tokens": "yes"}, "add_special_tokens"),
                        ({"prompt": text}, "model")):
        status, r = call("/tokenize", body)
        assert status == 400 and r["error"]["param"] == param, (body, r)
    for tokens in ([-1], [10 ** 9], "1 2", [1.5], [True]):
        status, r = call("/detokenize", {"model": "default", "tokens": tokens})
        assert status == 400 and r["error"]["param"] == "tokens", (tokens, r)
    assert call("/tokenize", {"model": "writer", "prompt": text}, key=s.keys["other"])[0] == 404
    assert call("/tokenize", {"model": "default", "prompt": text}, key="not-a-key")[0] == 401


def test_errors_in_openai_shape(http_server):
    s = http_server
    with pytest.raises(openai.AuthenticationError) as e:
        client(s, "not-a-key").completions.create(model="default", prompt="x", max_tokens=2)
    assert e.value.status_code == 401
    with pytest.raises(openai.NotFoundError) as e:                 # another tenant's adapter name
        client(s, "other").completions.create(model="writer", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "not_found"
    for n in (0, 17):
        with pytest.raises(openai.BadRequestError) as e:
            client(s).completions.create(model="default", prompt="x", max_tokens=2, n=n)
        assert e.value.body["param"] == "n" and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:               # an encoder adapter in chat
        client(s).chat.completions.create(model="cls", messages=[{"role": "user", "content": "x"}])
    assert "encoder backbone" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client(s).chat.completions.create(model="default", messages=[{"role": "robot", "content": "x"}])
    assert "role" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client(s).completions.create(model="default", prompt="x", temperature=-1)
    status, _, body = post(f"{s.base_url}/completions", s.keys["acme"], b"{not json")
    assert status == 400 and "not JSON" in body["error"]["message"]
    # fields that would change the answer's kind are refused by name, not ignored; their neutral values pass
    for name, value in (("functions", [{"name": "f"}]), ("suffix", "end"), ("modalities", ["text", "audio"])):
        with pytest.raises(openai.BadRequestError) as e:
            client(s).chat.completions.create(model="default", messages=[{"role": "user", "content": "x"}],
                                              max_tokens=1, extra_body={name: value})
        assert e.value.body["param"] == name and "not supported" in e.value.body["message"], name
    neutral = client(s).chat.completions.create(model="default", messages=[{"role": "user", "content": "x"}],
                                                max_tokens=1, response_format={"type": "text"}, tool_choice="none",
                                                extra_body={"tools": [], "modalities": ["text"]})
    assert neutral.usage.completion_tokens == 1
    status, _, _ = post(f"{s.base_url}/completions", s.keys["slow"],
                        {"model": "default", "prompt": "x", "max_tokens": 1, "whatever": {"unknown": 1}})
    assert status == 200                                            # unknown fields ignored
    status, headers, body = post(f"{s.base_url}/completions", s.keys["slow"],
                                 {"model": "default", "prompt": "x", "max_tokens": 1})
    assert status == 429 and int(headers["retry-after"]) >= 1 and body["error"]["type"] == "rate_limit_error"


def test_drain_finishes_a_stream_and_refuses_new_requests(tiny_checkpoint, decoder_dir, tmp_path):
    s = RunningServer(tiny_server_config(tiny_checkpoint, tmp_path, decoder=str(decoder_dir), decoder_kv_cache_mb=1,
                                         decoder_block_size=4, http_port=free_port(), grace_s=20))
    key = s.register("acme")
    url = f"http://127.0.0.1:{s.server.http_port}/v1"
    body = {"model": "default", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 40,
            "temperature": 0, "ignore_eos": True}
    req = urllib.request.Request(f"{url}/chat/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
    try:
        events, drained = [], None
        with urllib.request.urlopen(req, timeout=60) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line:
                    continue
                events.append(line)
                if drained is None and line.startswith("data: {"):
                    drained = asyncio.run_coroutine_threadsafe(s.server.drain_and_stop(), s.loop)
                    status, _, refused = post(f"{url}/completions", key, {"model": "default", "prompt": "x",
                                                                         "max_tokens": 1})
                    assert status == 503 and refused["error"]["type"] == "service_unavailable"
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[6:]) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        drained.result(60)
    finally:
        s.channel.close()
        s.loop.call_soon_threadsafe(s.loop.stop)
        s.thread.join(10)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{s.server.http_port}/health", timeout=5)


def test_client_leaving_a_stream_frees_its_blocks_and_slot(http_server):
    import time

    s = http_server
    kv, free0 = s.app.decoder.kv, s.app.decoder.kv.num_free_blocks
    body = {"model": "default", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 150,
            "temperature": 0, "ignore_eos": True}
    req = urllib.request.Request(f"{s.base_url}/chat/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"authorization": f"Bearer {s.keys['acme']}",
                                          "content-type": "application/json"})
    r = urllib.request.urlopen(req, timeout=30)
    assert r.readline().startswith(b"data: {")          # the role chunk: sent before the prefill is scheduled
    held = time.monotonic() + 5
    while time.monotonic() < held and kv.num_free_blocks == free0:
        time.sleep(0.002)
    assert kv.num_free_blocks < free0                   # the request holds blocks while it streams
    r.close()                                           # the client goes away mid-stream
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (kv.num_free_blocks != free0
                                           or s.app.admission.stats()["num_keyed_in_flight"]):
        time.sleep(0.02)
    assert kv.num_free_blocks == free0 and s.app.admission.stats()["num_keyed_in_flight"] == 0
    cancelled = s.app.metrics.registry.get_sample_value("vbert_generation_requests_total",
                                                        {"finish_reason": "cancelled"})
    assert cancelled >= 1


def test_client_leaving_a_whole_completion_cancels_it(http_server):
    """A non-streamed completion whose client hangs up is cancelled (the tiny model finishes 240 tokens in
    about half a second, so up to three attempts for one that is caught in flight)."""
    import http.client
    import time

    s = http_server

    def cancelled() -> float:
        return s.app.metrics.registry.get_sample_value("vbert_generation_requests_total",
                                                       {"finish_reason": "cancelled"}) or 0

    before = cancelled()
    for _ in range(3):
        conn = http.client.HTTPConnection("127.0.0.1", s.server.http_port, timeout=10)
        conn.request("POST", "/v1/completions", body=json.dumps({"model": "default", "prompt": "hi", "max_tokens": 240,
                                                                 "temperature": 0, "ignore_eos": True}),
                     headers={"authorization": f"Bearer {s.keys['acme']}", "content-type": "application/json"})
        time.sleep(0.05)
        conn.close()                                    # gone before the answer
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and s.app.admission.stats()["num_keyed_in_flight"]:
            time.sleep(0.02)
        assert s.app.admission.stats()["num_keyed_in_flight"] == 0     # the slot is back either way
        time.sleep(0.1)                                 # the engine counts the finish after answering it
        if cancelled() > before:
            break
    assert cancelled() >= before + 1


def test_a_burst_of_first_http_calls_with_a_new_key_all_succeed(http_server):
    """More concurrent first calls with a key nobody has verified yet than the address's failed-authentication
    burst (20 by default): they share one verification, none is refused as a failed authentication."""
    from concurrent.futures import ThreadPoolExecutor

    import time

    s = http_server
    key = s.register("newcomer-http")
    body = {"model": "default", "input": "aspirin reduces fever"}
    hashed, original = [], s.app.auth.tenant

    def slow(k):          # a slow hash (a loaded machine): the burst arrives while it runs
        hashed.append(k)
        time.sleep(0.5)
        return original(k)
    s.app.auth.tenant = slow
    try:
        with ThreadPoolExecutor(30) as pool:
            answers = list(pool.map(lambda _: post(f"{s.base_url}/embeddings", key, body), range(30)))
    finally:
        s.app.auth.tenant = original
    assert len(hashed) == 1
    assert [status for status, _, _ in answers] == [200] * 30, [b for _, _, b in answers if "error" in b][:1]
    assert all(len(b["data"][0]["embedding"]) > 0 for _, _, b in answers)
