"""The generation engine on a tiny random Llama: greedy output equals Hugging Face generate for requests
that join at different times, seeds reproduce in any batch, preemption under KV pressure is exact,
cancellation frees every block, stop strings and stop tokens end a stream without being streamed."""
from __future__ import annotations

import time

import pytest
import torch

from scheduler.generation_engine import GenerationDelta, GenerationEngine, GenerationEngineConfig, GenerationResult
from scheduler.generation_policy import GenerationSchedulerConfig
from scheduler.generation_runner import GenerationRunner
from scheduler.types import Request
from tests.decoder_models import write_tiny_decoder_checkpoint
from vbert.decoder_backbone import DecoderBackbone, DecoderBackboneConfig
from vbert.detokenize import FinishReason
from vbert.device import DeviceContext
from vbert.sampling import SamplingParams

transformers = pytest.importorskip("transformers")
CPU = DeviceContext.create("cpu", "float32")
PROMPTS = ["the patient was treated", "Hello world, café déjà vu.", "What is the capital of France?",
           "the quick brown fox", "emoji 🙂 and 日本語", "STOP here", "aspirin", "the lazy dog jumps over"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_decoder_checkpoint(tmp_path_factory.mktemp("tiny-decoder") / "model")


def make_engine(checkpoint, kv_bytes=1 << 20, **sched) -> tuple[GenerationEngine, DecoderBackbone]:
    bb = DecoderBackbone.load(DecoderBackboneConfig(path=str(checkpoint), kv_cache_bytes=kv_bytes, block_size=4), CPU)
    cfg = GenerationSchedulerConfig(**{"max_tokens_per_step": 24, "max_running": 8, **sched})
    engine = GenerationEngine(GenerationEngineConfig(), cfg, GenerationRunner(bb.model, bb.kv), bb.tokenizer,
                              bb.eos_token_ids)
    return engine.start(), bb


def submit(engine, bb, prompt, tenant=1, **params):
    ids = bb.tokenize_prompt(prompt, 200, False)
    sampling = SamplingParams(**{"temperature": 0.0, "max_new_tokens": 12, **params})
    r = Request(tenant_id=tenant, adapter_id=None, deadline=time.monotonic() + 60, prompt_ids=ids,
                max_new_tokens=sampling.max_new_tokens)
    return engine.submit(r, sampling, ignore_eos=True)


def hf_greedy(checkpoint, bb, prompt, n):
    model = transformers.LlamaForCausalLM.from_pretrained(checkpoint).eval()
    ids = bb.tokenize_prompt(prompt, 200, False)
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_greedy_equals_hf_generate_for_requests_joining_at_different_steps(checkpoint):
    engine, bb = make_engine(checkpoint, max_tokens_per_step=8)   # long prompts take several steps
    lengths = [12, 5, 9, 12, 3, 7]
    try:
        streams = [submit(engine, bb, PROMPTS[0], max_new_tokens=lengths[0])]
        next(iter(streams[0]))                     # the first has its first token when the others arrive
        streams += [submit(engine, bb, p, tenant=i % 3, max_new_tokens=n)
                    for i, (p, n) in enumerate(zip(PROMPTS[1:4], lengths[1:4]))]
        time.sleep(0.05)
        streams += [submit(engine, bb, p, max_new_tokens=n) for p, n in zip(PROMPTS[4:6], lengths[4:6])]
        results = [s.result or s.final() for s in streams]
    finally:
        engine.stop()
    for prompt, n, res in zip(PROMPTS, lengths, results):
        assert list(res.token_ids) == hf_greedy(checkpoint, bb, prompt, n), prompt
        assert res.finish_reason is FinishReason.LENGTH
    assert engine.num_steps > max(lengths)         # steps were shared: not one request after another
    assert engine.num_steps < sum(lengths)


def test_deltas_join_to_the_text_and_carry_every_token(checkpoint):
    engine, bb = make_engine(checkpoint)
    try:
        events = list(submit(engine, bb, PROMPTS[1], max_new_tokens=10))
    finally:
        engine.stop()
    deltas, final = events[:-1], events[-1]
    assert all(isinstance(e, GenerationDelta) for e in deltas) and isinstance(final, GenerationResult)
    assert "".join(d.text for d in deltas) == final.text
    assert [t for d in deltas for t in d.token_ids] == list(final.token_ids)
    assert final.text == bb.tokenizer.decode(list(final.token_ids), skip_special_tokens=True)
    assert final.time_to_first_token_s > 0 and final.total_s >= final.time_to_first_token_s


def test_same_seed_same_text_alone_or_in_a_full_batch(checkpoint):
    engine, bb = make_engine(checkpoint)
    params = dict(temperature=0.9, top_k=50, top_p=0.95, seed=1234, max_new_tokens=10)
    try:
        alone = submit(engine, bb, PROMPTS[2], **params).final()
        others = [submit(engine, bb, p, tenant=i, temperature=1.3, seed=i, max_new_tokens=8)
                  for i, p in enumerate(PROMPTS)]
        crowded = submit(engine, bb, PROMPTS[2], **params).final()
        for s in others:
            s.final()
        different = submit(engine, bb, PROMPTS[2], **{**params, "seed": 99}).final()
    finally:
        engine.stop()
    assert alone.token_ids == crowded.token_ids
    assert different.token_ids != alone.token_ids


def test_preemption_under_kv_pressure_is_exact_and_frees_everything(checkpoint):
    def run(kv_bytes):
        engine, bb = make_engine(checkpoint, kv_bytes=kv_bytes, max_tokens_per_step=64)
        free0 = bb.kv.num_free_blocks
        try:
            streams = [submit(engine, bb, p, tenant=i, max_new_tokens=16) for i, p in enumerate(PROMPTS)]
            results = [s.final() for s in streams]
        finally:
            engine.stop()
        return results, engine.scheduler.counts["preempted"], free0, bb.kv.num_free_blocks, bb

    roomy, n_roomy, *_ = run(1 << 20)
    # K and V of 2 layers x 4 tokens x 2 KV heads x 8 dims x 4 bytes = 1 KiB per block: 24 blocks hold
    # about 3 requests of ~10 prompt + 16 new tokens at once, 8 are sent together
    tight, n_tight, free0, free1, bb = run(24 * 1024)
    assert bb.kv.num_blocks == 24
    assert n_roomy == 0 and n_tight > 0
    assert [r.token_ids for r in tight] == [r.token_ids for r in roomy]
    assert sum(r.num_preemptions for r in tight) == n_tight
    assert free1 == free0
    # the decode staging (on by default) followed: a preempted request, recomputed, was filled into it again
    assert bb.kv.staging.num_fills >= len(PROMPTS) + 1 and bb.kv.staging.num_fallbacks == 0


def test_cancel_ends_the_stream_and_returns_every_block(checkpoint):
    engine, bb = make_engine(checkpoint)
    free0 = bb.kv.num_free_blocks
    try:
        keep = submit(engine, bb, PROMPTS[0], max_new_tokens=150)
        gone = submit(engine, bb, PROMPTS[1], max_new_tokens=150)
        it = iter(gone)
        next(it)
        assert engine.cancel(gone.request.request_id)
        rest = list(it)
        assert isinstance(rest[-1], GenerationResult) and rest[-1].finish_reason is FinishReason.CANCELLED
        assert engine.cancel(keep.request.request_id)
        keep.final()
        deadline = time.monotonic() + 5
        while bb.kv.num_free_blocks != free0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert bb.kv.num_free_blocks == free0
        assert not engine.cancel(gone.request.request_id)
    finally:
        engine.stop()


def test_stop_strings_and_stop_tokens(checkpoint):
    engine, bb = make_engine(checkpoint)
    try:
        free_run = submit(engine, bb, PROMPTS[3], max_new_tokens=20).final()
        text = free_run.text
        stop = next(text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2].strip() == text[i:i + 2])
        cut = text[:text.index(stop)]
        events = list(submit(engine, bb, PROMPTS[3], max_new_tokens=20, stop=(stop,)))
        streamed = "".join(e.text for e in events[:-1])
        by_token = submit(engine, bb, PROMPTS[3], max_new_tokens=20,
                          stop_token_ids=(free_run.token_ids[4],)).final()
    finally:
        engine.stop()
    assert events[-1].finish_reason is FinishReason.STOP and events[-1].text == cut == streamed
    assert stop not in streamed
    first = free_run.token_ids.index(free_run.token_ids[4])
    assert by_token.finish_reason is FinishReason.STOP and by_token.token_ids == free_run.token_ids[:first + 1]
    assert by_token.text == bb.tokenizer.decode(list(free_run.token_ids[:first]), skip_special_tokens=True)


def test_min_tokens_keeps_stop_tokens_and_stop_strings_from_ending_the_first_tokens(checkpoint):
    """vLLM's min_tokens: the stop tokens are kept out of the first min_tokens draws (greedy takes the next best),
    and stop strings are looked for only from the min_tokens-th token's text on."""
    engine, bb = make_engine(checkpoint)
    try:
        free_run = submit(engine, bb, PROMPTS[3], max_new_tokens=20).final()
        banned = free_run.token_ids[1]
        early = submit(engine, bb, PROMPTS[3], max_new_tokens=20, stop_token_ids=(banned,)).final()
        held = submit(engine, bb, PROMPTS[3], max_new_tokens=20, stop_token_ids=(banned,), min_tokens=4).final()
        text = free_run.text
        stop = next(text[i:i + 2] for i in range(1, len(text) - 2) if text[i:i + 2].strip() == text[i:i + 2])
        unchecked = submit(engine, bb, PROMPTS[3], max_new_tokens=20, stop=(stop,), min_tokens=20).final()
    finally:
        engine.stop()
    assert early.finish_reason is FinishReason.STOP and len(early.token_ids) <= 2
    assert banned not in held.token_ids[:4] and len(held.token_ids) >= 5
    assert held.token_ids[0] == free_run.token_ids[0] or free_run.token_ids[0] == banned
    assert held.finish_reason is FinishReason.LENGTH or held.token_ids[-1] == banned
    # the stop string appears in the first tokens' text, which is not searched: the whole free run comes back
    assert stop in unchecked.text and unchecked.text == free_run.text and unchecked.token_ids == free_run.token_ids


def test_structured_output_follows_its_grammar_whatever_the_random_model_prefers(checkpoint):
    """A random tiny decoder writes byte soup; with a JSON Schema, a regex or a list of choices every sampled answer
    (five seeds each, in one batch with an unconstrained request) is valid and ends (STOP) when the grammar is
    complete, also with ignore_eos; the unconstrained batch-mate is the same as alone."""
    import json
    import re

    from vbert.structured import StructuredOutput

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "tag": {"enum": ["a", "bc"]}},
              "required": ["ok", "tag"], "additionalProperties": False}
    kinds = [StructuredOutput("json", schema), StructuredOutput("regex", "[0-9]{3}-[a-z]{2}"),
             StructuredOutput("choice", ("yes", "no", "maybe")), StructuredOutput("json_object")]
    engine, bb = make_engine(checkpoint)
    try:
        alone = submit(engine, bb, PROMPTS[0], max_new_tokens=30, temperature=1.0, seed=9).final()
        free = submit(engine, bb, PROMPTS[0], max_new_tokens=30, temperature=1.0, seed=9)
        streams = [(k, submit(engine, bb, PROMPTS[i % 3], max_new_tokens=200, temperature=1.0, seed=i, structured=k))
                   for k in kinds for i in range(5)]
        results = [(k, s.final()) for k, s in streams]
        with pytest.raises(ValueError, match="structured output regex"):
            submit(engine, bb, PROMPTS[0], structured=StructuredOutput("regex", "(unclosed"))
    finally:
        engine.stop()
    assert free.final().token_ids == alone.token_ids
    for k, res in results:
        if k.kind == "json_object":          # any object: its strings are unbounded, byte soup fills them to the end
            assert res.text.startswith("{") and (res.finish_reason is FinishReason.LENGTH
                                                  or isinstance(json.loads(res.text), dict)), res.text
            continue
        assert res.finish_reason is FinishReason.STOP, (k.kind, res.text)
        if k.kind == "json":
            value = json.loads(res.text)
            assert set(value) == {"ok", "tag"} and isinstance(value["ok"], bool) and value["tag"] in ("a", "bc")
        elif k.kind == "regex":
            assert re.fullmatch("[0-9]{3}-[a-z]{2}", res.text), res.text
        else:
            assert res.text in ("yes", "no", "maybe")
    assert len({res.text for k, res in results if k.kind == "json"}) > 1          # sampled, not one forced answer


def test_request_mode_gives_the_same_greedy_tokens(checkpoint):
    outs = {}
    for mode in ("iteration", "request"):
        engine, bb = make_engine(checkpoint, mode=mode, max_running=3)
        try:
            streams = [submit(engine, bb, p, max_new_tokens=4 + i) for i, p in enumerate(PROMPTS)]
            outs[mode] = [s.final().token_ids for s in streams]
        finally:
            engine.stop()
    assert outs["iteration"] == outs["request"]


def test_too_long_and_stopped_engine_are_refused(checkpoint):
    engine, bb = make_engine(checkpoint)
    engine.stop()
    with pytest.raises(Exception, match="not accepting"):
        submit(engine, bb, PROMPTS[0])
    engine, bb = make_engine(checkpoint)
    try:
        with pytest.raises(ValueError, match="exceeds the decoder's context of 256"):
            submit(engine, bb, PROMPTS[0], max_new_tokens=250)
    finally:
        engine.stop()


def test_prefix_cached_requests_equal_hf_generate_and_report_their_cached_tokens(checkpoint):
    system = "You are a careful assistant for clinical notes. Answer in one short sentence. "
    prompts = [system + p for p in PROMPTS[:5]]
    engine, bb = make_engine(checkpoint, max_tokens_per_step=32)
    try:
        first = submit(engine, bb, prompts[0], max_new_tokens=6).final()
        together = [submit(engine, bb, p, max_new_tokens=6) for p in prompts[1:]]   # share the first one's blocks
        results = [first] + [s.final() for s in together]
        again = submit(engine, bb, prompts[0], max_new_tokens=6).final()            # its own prompt and more
        other = submit(engine, bb, prompts[1], tenant=9, max_new_tokens=6).final()  # another tenant: nothing
    finally:
        engine.stop()
    shared = len(bb.tokenize_prompt(system, 200, False)) // 4 * 4
    assert first.num_cached_tokens == 0 and other.num_cached_tokens == 0
    assert all(r.num_cached_tokens >= shared - 4 for r in results[1:]) and shared >= 12
    assert again.num_cached_tokens == (first.num_prompt_tokens - 1) // 4 * 4
    for prompt, res in zip(prompts, results):
        assert list(res.token_ids) == hf_greedy(checkpoint, bb, prompt, 6), prompt
    assert again.token_ids == first.token_ids and other.token_ids == results[1].token_ids
    assert bb.kv.num_free_blocks == bb.kv.num_blocks and bb.kv.num_cached_blocks > 0


def test_preemption_with_prefix_caching_gives_the_tokens_of_a_roomy_cache(checkpoint):
    system = "the patient was treated with aspirin and "
    outs = {}
    for name, kv_bytes, caching in (("roomy-off", 1 << 20, False), ("tight-on", 24 * 1024, True)):
        engine, bb = make_engine(checkpoint, kv_bytes=kv_bytes, max_tokens_per_step=64, prefix_caching=caching)
        try:
            streams = [submit(engine, bb, system + p, tenant=i % 2, max_new_tokens=16) for i, p in enumerate(PROMPTS)]
            outs[name] = [s.final() for s in streams]
        finally:
            engine.stop()
        assert bb.kv.num_free_blocks == bb.kv.num_blocks
    assert sum(r.num_preemptions for r in outs["tight-on"]) > 0
    assert sum(r.num_cached_tokens for r in outs["tight-on"]) > 0
    assert [r.token_ids for r in outs["tight-on"]] == [r.token_ids for r in outs["roomy-off"]]
