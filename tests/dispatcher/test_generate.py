"""Generate over real gRPC on loopback, on a tiny random decoder: streaming deltas, the final message,
stop strings, chat messages, log-probabilities, cancellation by the client (blocks freed), quotas, every
bad parameter answered INVALID_ARGUMENT naming it, adapters of the wrong backbone FAILED_PRECONDITION."""
from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest
import torch

from dispatcher.gen.vbert.v1 import tenant_pb2
from tests.conftest import classify, make_artifact
from tests.dispatcher.conftest import RunningServer, bearer, tiny_server_config

T = tenant_pb2
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gen_server(tiny_checkpoint, decoder_dir, tmp_path_factory):
    s = RunningServer(tiny_server_config(tiny_checkpoint, tmp_path_factory.mktemp("var"), decoder=str(decoder_dir),
                                         decoder_kv_cache_mb=1, decoder_block_size=4))
    s.keys = {"acme": s.register("acme"), "small": s.register("small", max_tokens_per_request=20)}
    s.app.manager.upload_adapter("acme", "cls", make_artifact(s.app.model.spec.shape, "lora", classify(2), 1, rank=2))
    yield s
    s.stop()


def generate(s, tenant="acme", timeout=20, **fields):
    return list(s.tenant.Generate(T.GenerateRequest(**fields), metadata=bearer(s.keys[tenant]), timeout=timeout))


def hf_greedy(decoder_dir, ids, n):
    model = transformers.LlamaForCausalLM.from_pretrained(decoder_dir).eval()
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_stream_of_deltas_then_a_final_message(gen_server, decoder_dir):
    s = gen_server
    msgs = generate(s, prompt="the patient was treated", max_new_tokens=10, temperature=0, ignore_eos=True)
    deltas, final = msgs[:-1], msgs[-1]
    assert len(deltas) >= 2 and not any(m.is_final for m in deltas)
    assert final.is_final and final.finish_reason == T.LENGTH
    ids = [t for m in msgs for t in m.token_ids]
    prompt_ids = s.app.decoder.tokenizer("the patient was treated")["input_ids"]
    assert ids == hf_greedy(decoder_dir, prompt_ids, 10)
    assert "".join(m.text for m in msgs) == s.app.decoder.tokenizer.decode(ids, skip_special_tokens=True)
    assert final.usage.prompt_tokens == len(prompt_ids) and final.usage.completion_tokens == 10
    md = final.metadata
    assert 0 < md.time_to_first_token_ms <= md.total_ms and md.time_per_output_token_ms > 0
    assert md.adapter_version == 0 and md.num_preemptions == 0
    tokens = s.app.metrics.registry.get_sample_value("vbert_generation_tokens_total", {"kind": "generated"})
    assert tokens >= 10


def test_stop_string_chat_and_logprobs(gen_server):
    s = gen_server
    free = "".join(m.text for m in generate(s, prompt="Hello world", max_new_tokens=16, temperature=0,
                                              ignore_eos=True))
    stop = next(free[i:i + 2] for i in range(2, len(free) - 2) if free[i:i + 2].strip() == free[i:i + 2])
    msgs = generate(s, prompt="Hello world", max_new_tokens=16, temperature=0, ignore_eos=True, stop=[stop])
    assert msgs[-1].finish_reason == T.STOP and "".join(m.text for m in msgs) == free[:free.index(stop)]
    chat = [T.ChatMessage(role="system", content="be brief"), T.ChatMessage(role="user", content="hi")]
    final = generate(s, messages=chat, max_new_tokens=3, temperature=0, ignore_eos=True)[-1]
    rendered = s.app.decoder.tokenizer.apply_chat_template([{"role": "system", "content": "be brief"},
                                                            {"role": "user", "content": "hi"}],
                                                           add_generation_prompt=True, tokenize=True)
    rendered = rendered["input_ids"] if hasattr(rendered, "keys") else rendered
    assert final.usage.prompt_tokens == len(rendered)
    msgs = generate(s, prompt="aspirin", max_new_tokens=4, temperature=0.8, seed=5, logprobs=3, ignore_eos=True)
    lps = [lp for m in msgs for lp in m.logprobs]
    assert [lp.token_id for lp in lps] == [t for m in msgs for t in m.token_ids]
    assert all(len(lp.top_ids) == 3 and lp.logprob <= 0 for lp in lps)
    again = generate(s, prompt="aspirin", max_new_tokens=4, temperature=0.8, seed=5, ignore_eos=True)
    assert [t for m in again for t in m.token_ids] == [lp.token_id for lp in lps]   # seeded


def test_client_cancel_frees_every_kv_block(gen_server):
    s = gen_server
    kv = s.app.decoder.kv
    free0 = kv.num_free_blocks
    call = s.tenant.Generate(T.GenerateRequest(prompt="the quick brown fox", max_new_tokens=200, ignore_eos=True),
                             metadata=bearer(s.keys["acme"]), timeout=30)
    next(call)
    next(call)
    assert kv.num_free_blocks < free0
    call.cancel()
    deadline = time.monotonic() + 5
    while (kv.num_free_blocks != free0 or s.app.generation.num_pending) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert kv.num_free_blocks == free0 and s.app.generation.num_pending == 0
    reasons = s.app.metrics.registry.get_sample_value("vbert_generation_requests_total",
                                                      {"finish_reason": "cancelled"})
    assert reasons >= 1


@pytest.mark.parametrize("fields, fragment", [
    (dict(prompt="x", temperature=-1), "temperature"),
    (dict(prompt="x", top_p=1.5), "top_p"),
    (dict(prompt="x", logprobs=50), "logprobs"),
    (dict(prompt="x", stop=[""]), "stop"),
    (dict(prompt="x", max_new_tokens=4, min_tokens=5), "min_tokens"),
    (dict(prompt="x", structured_output=T.StructuredOutput()), "set one of json"),
    (dict(prompt="x", structured_output=T.StructuredOutput(json_object=False)), "json_object must be true"),
    (dict(prompt="x", structured_output=T.StructuredOutput(json="{nope")), "not valid JSON"),
    (dict(prompt="x", structured_output=T.StructuredOutput(choice=T.Choices())), "non-empty list"),
    (dict(prompt="x", structured_output=T.StructuredOutput(grammar="start: (")), "structured output grammar"),
    (dict(), "exactly one of prompt and messages"),
    (dict(prompt="x", messages=[T.ChatMessage(role="user", content="y")]), "exactly one of prompt and messages"),
    (dict(messages=[T.ChatMessage(role="robot", content="y")]), "role 'robot'"),
    (dict(prompt="the " * 300, max_new_tokens=4), "more than 252"),
    (dict(prompt="x", max_new_tokens=256), "max_new_tokens 256 leaves no room"),
])
def test_bad_parameters_are_invalid_argument_naming_them(gen_server, fields, fragment):
    with pytest.raises(grpc.RpcError) as e:
        generate(gen_server, **fields)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in e.value.details()


def test_long_prompt_truncated_on_request_and_quota_counts_new_tokens(gen_server):
    s = gen_server
    final = generate(s, prompt="the " * 300, max_new_tokens=6, truncate_prompt=True, temperature=0)[-1]
    assert final.usage.prompt_tokens == 256 - 6
    with pytest.raises(grpc.RpcError) as e:             # quota 20 tokens: prompt + max_new_tokens
        generate(s, "small", prompt="the patient was treated with aspirin", max_new_tokens=15)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "more than 5" in e.value.details()
    final = generate(s, "small", prompt="aspirin", temperature=0, ignore_eos=True)[-1]
    assert final.usage.prompt_tokens + final.usage.completion_tokens == 20   # 0 = up to the quota
    assert final.finish_reason == T.LENGTH


def test_encoder_adapter_in_generate_is_failed_precondition(gen_server):
    with pytest.raises(grpc.RpcError) as e:
        generate(gen_server, adapter="cls", prompt="hello")
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "encoder" in e.value.details()


def test_server_without_decoder_answers_failed_precondition(tiny_checkpoint, tmp_path):
    s = RunningServer(tiny_server_config(tiny_checkpoint, tmp_path / "var"))
    try:
        key = s.register("t")
        with pytest.raises(grpc.RpcError) as e:
            list(s.tenant.Generate(T.GenerateRequest(prompt="hi"), metadata=bearer(key), timeout=10))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "no decoder" in e.value.details()
    finally:
        s.stop()


def test_lora_adapter_uploaded_over_the_admin_api_equals_peft(gen_server, decoder_dir, tmp_path):
    import asyncio
    import subprocess
    import sys
    from pathlib import Path

    import peft

    from dispatcher.client import AsyncClient, Client, VbertError
    from tests.decoder_models import write_tiny_decoder_lora
    from tests.dispatcher.conftest import ADMIN_TOKEN

    s = gen_server
    lora_dir = write_tiny_decoder_lora(tmp_path / "lora", decoder_dir, seed=3)
    with Client(s.address, admin_token=ADMIN_TOKEN) as admin:
        rec = admin.upload_adapter("acme", "writer", lora_dir)
    assert rec["backbone"] == "decoder"
    base = transformers.LlamaForCausalLM.from_pretrained(decoder_dir).eval()
    ref_model = peft.PeftModel.from_pretrained(base, lora_dir).eval()
    prompt_ids = s.app.decoder.tokenizer("the patient was treated")["input_ids"]
    ref = ref_model.generate(input_ids=torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids),
                             dtype=torch.long), do_sample=False, max_new_tokens=8, min_new_tokens=8,
                             pad_token_id=0)[0, len(prompt_ids):].tolist()
    with Client(s.address, api_key=s.keys["acme"]) as c:
        events = list(c.generate("the patient was treated", adapter="writer", max_new_tokens=8, temperature=0,
                                 ignore_eos=True))
        bare = [t for e in c.generate("the patient was treated", max_new_tokens=8, temperature=0, ignore_eos=True)
                for t in e["token_ids"]]
        with pytest.raises(VbertError) as e:                  # a decoder adapter in Classify
            c.classify("writer", ["x"])
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "decoder backbone" in e.value.details
    ours = [t for e in events for t in e["token_ids"]]
    assert ours == ref and ours != bare
    assert events[-1]["finish_reason"] == "length" and events[-1]["metadata"]["adapter_version"] == 1
    with Client(s.address, api_key=s.keys["small"]) as other:   # another tenant's adapter name: not found
        with pytest.raises(VbertError) as e:
            list(other.generate("hi", adapter="writer", max_new_tokens=2))
        assert e.value.code == grpc.StatusCode.NOT_FOUND

    async def run_async():
        async with AsyncClient(s.address, api_key=s.keys["acme"]) as ac:
            return [t async for e in ac.generate("the patient was treated", adapter="writer", max_new_tokens=8,
                                                 temperature=0, ignore_eos=True) for t in e["token_ids"]]
    assert asyncio.run(run_async()) == ref
    vbert = str(Path(sys.executable).parent / "vbert")
    out = subprocess.run([vbert, "generate", "--server", s.address, "--api-key", s.keys["acme"], "--adapter", "writer",
                          "--max-new-tokens", "8", "--temperature", "0", "--ignore-eos", "the patient was treated"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == s.app.decoder.tokenizer.decode(ref, skip_special_tokens=True) + "\n"
    assert "length: " in out.stderr
    assert " cached) + 8 generated tokens" in out.stderr      # the same prompt and adapter a third time


def test_status_lists_both_backbones_with_their_memory(gen_server):
    from dispatcher.client import Client
    from tests.dispatcher.conftest import ADMIN_TOKEN

    with Client(gen_server.address, admin_token=ADMIN_TOKEN) as admin:
        b = admin.status()["backbones"]
    assert set(b) == {"encoder", "decoder"}
    d = gen_server.app.decoder
    assert b["decoder"]["kv_blocks_total"] == d.kv.num_blocks and b["decoder"]["kv_cache_bytes"] == d.kv.total_bytes()
    assert b["decoder"]["kv_blocks_free"] == d.kv.num_free_blocks and b["decoder"]["adapter_slots"] == 32
    assert b["decoder"]["weight_bytes"] > 0 and b["encoder"]["adapter_pool_bytes"] > 0


@pytest.mark.slow
def test_default_decoder_answers_the_capital_of_france(tiny_checkpoint, tmp_path, smollm2):
    """The real default decoder (SmolLM2-135M-Instruct from its packaged GGUF) behind the real server."""
    pytest.importorskip("gguf")
    from dispatcher.client import Client
    from tests.conftest import data_dir_with_models
    from tests.dispatcher.conftest import ADMIN_TOKEN

    cache = data_dir_with_models(tmp_path / "var", smollm2[0])   # the conversion other SmolLM2 tests share
    from tests.dispatcher.test_http_api import free_port

    s = RunningServer(tiny_server_config(tiny_checkpoint, cache, backbones="encoder,decoder",
                                         decoder_kv_cache_mb=32, http_port=free_port()))
    try:
        key = s.register("acme")
        with Client(s.address, api_key=key) as c:
            events = list(c.generate(messages=[{"role": "user", "content": "What is the capital of France?"}],
                                     max_new_tokens=20, temperature=0))
        assert "".join(e["text"] for e in events) == "The capital of France is Paris."
        assert events[-1]["finish_reason"] == "stop" and events[-1]["usage"]["cached_prompt_tokens"] == 0
        openai = pytest.importorskip("openai")          # the README's three lines, over HTTP
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{s.server.http_port}/v1", api_key=key, max_retries=0)
        answer = c.chat.completions.create(model="default", temperature=0,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert answer.choices[0].message.content == "The capital of France is Paris."
        assert answer.choices[0].finish_reason == "stop"
        # the same chat again: its prompt's full blocks (all but the last token) came from the prefix cache
        prompt = answer.usage.prompt_tokens
        assert answer.usage.prompt_tokens_details.cached_tokens == (prompt - 1) // 16 * 16 > 0
        metric = s.app.metrics.registry.get_sample_value
        assert metric("vbert_prefix_cache_hit_tokens_total") == (prompt - 1) // 16 * 16
        assert metric("vbert_prefix_cache_queried_tokens_total") == 2 * (prompt - 1)
        assert metric("vbert_kv_cache_blocks_cached") >= (prompt - 1) // 16
        assert metric("vbert_kv_cache_evicted_blocks_total") == 0          # 32 MB hold every block of this test
        # a frequency penalty stops the default decoder's greedy repetition (it writes "Cat," line after line)
        cats = [{"role": "user", "content": "Write the word cat ten times."}]
        plain, penalized = (c.chat.completions.create(model="default", temperature=0, max_tokens=30, messages=cats,
                                                      frequency_penalty=f).choices[0].message.content for f in (0, 1))
        assert plain.count("\nCat,") >= 5 and penalized.count("\nCat,") <= 1, (plain, penalized)
        # the four answers decoded on the staging (each filled from its blocks once), held within its default budget
        assert metric("vbert_kv_staging_fills_total") == 4 and metric("vbert_kv_staging_fallbacks_total") == 0
        assert 0 < metric("vbert_kv_staging_bytes") <= 32 << 20                 # unset: the KV cache's 32 MB
        # min_tokens (vLLM's): the end of sequence may not end the first 12 tokens, so the answer goes on past Paris
        france = [{"role": "user", "content": "What is the capital of France?"}]
        longer = c.chat.completions.create(model="default", temperature=0, max_tokens=16, messages=france,
                                           extra_body={"min_tokens": 12})
        assert longer.usage.completion_tokens >= 12 > answer.usage.completion_tokens
        assert longer.choices[0].message.content.startswith("The capital of France is Paris."), longer
        # structured output: a JSON Schema (OpenAI's response_format); the default decoder fills it in
        capital = {"type": "object", "properties": {"country": {"type": "string"}, "capital": {"type": "string"}},
                   "required": ["country", "capital"], "additionalProperties": False}
        shaped = c.chat.completions.create(
            model="default", temperature=0, max_tokens=60, messages=france,
            response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": capital}})
        value = json.loads(shaped.choices[0].message.content)            # it writes {"country": "FRANCE", ...}
        assert value["capital"] == "Paris" and value["country"].lower() == "france" and len(value) == 2, shaped
        assert shaped.choices[0].finish_reason == "stop"
        # tool calling with a named function: the call's arguments follow its schema, filled from the question
        weather = {"type": "function", "function": {
            "name": "get_weather", "description": "Get the current weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                           "additionalProperties": False}}}     # else the 135M model adds keys of its own
        called = c.chat.completions.create(
            model="default", temperature=0, max_tokens=40, tools=[weather],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            messages=[{"role": "user", "content": "What is the weather like in Paris today?"}]).choices[0]
        (call,) = called.message.tool_calls
        assert call.function.name == "get_weather" and "paris" in json.loads(call.function.arguments)["city"].lower()
        # tool_choice "auto" (the default): after one earlier call in the chat, the 135M model calls the tool for
        # another city's weather, answers a question no tool fits in text, and answers from the call's result
        chat = [{"role": "user", "content": "What is the weather in Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "4 degrees, snow"},
                {"role": "assistant", "content": "It is 4 degrees and snowing in Oslo."}]
        auto = c.chat.completions.create(
            model="default", temperature=0, max_tokens=40, tools=[weather],
            messages=chat + [{"role": "user", "content": "What is the weather like in Paris today?"}]).choices[0]
        assert auto.finish_reason == "tool_calls" and auto.message.content is None, auto
        (call,) = auto.message.tool_calls
        assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
        text = c.chat.completions.create(
            model="default", temperature=0, max_tokens=40, tools=[weather],
            messages=chat + [{"role": "user", "content": "What is the capital of France?"}]).choices[0]
        assert text.finish_reason == "stop" and text.message.content == "The capital of France is Paris.", text
        chat += [{"role": "user", "content": "What is the weather like in Paris today?"},
                 {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                 {"role": "tool", "tool_call_id": call.id, "content": "21 degrees, sunny"}]
        answer = c.chat.completions.create(model="default", temperature=0, max_tokens=40, tools=[weather],
                                           messages=chat).choices[0]
        assert answer.finish_reason == "stop" and "21 degrees" in answer.message.content, answer
        # the README's generative walkthrough: the shipped NCBI-disease decoder LoRA, over both protocols
        root = Path(__file__).resolve().parents[2] / "examples" / "adapters-trained" / "ncbi-disease-gen"
        res = json.loads((root / "RESULT.json").read_text())
        with Client(s.address, admin_token=ADMIN_TOKEN) as admin:
            admin.upload_adapter("acme", "disease-mentions", root)
        ex = res["examples"][1]
        prompt = f"{res['instruction']}\n{ex['text']}"
        answer = c.chat.completions.create(model="disease-mentions", temperature=0,
                                           messages=[{"role": "user", "content": prompt}])
        assert answer.choices[0].message.content == ex["mentions"] == "auditory anomalies ; deafness ; piebaldism"
        with Client(s.address, api_key=key) as tenant:
            events = list(tenant.generate(adapter="disease-mentions", messages=[{"role": "user", "content": prompt}],
                                          max_new_tokens=32, temperature=0))
        assert "".join(e["text"] for e in events) == ex["mentions"]
    finally:
        s.stop()
