"""The decoder core: paged KV cache, flattened steps, per-token LoRA, against Hugging Face and PEFT."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vbert.adapters import AdapterError
from vbert.decoder import DecoderLoadError, DecoderModel, DecoderSpec, StepSequence
from vbert.decoder_lora import (DecoderLoraConfig, DecoderLoraPool, DecoderLoraPoolFullError,
                                read_peft_causal_lm)
from vbert.device import DeviceContext
from vbert.generation import generate_greedy
from vbert.kv_cache import KVCacheConfig, KVCacheFullError, PagedKVCache

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 97
CPU = DeviceContext.create("cpu", "float32")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _randomize(model: torch.nn.Module, seed: int, std: float = 0.25) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(1.0 + 0.1 * noise if "norm" in name else noise)


def write_tiny_decoder(path: Path, kind: str = "llama", tied: bool = True, seed: int = 0):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=tied, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common, rope_theta=5000.0)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**common, rope_theta=20000.0, use_sliding_window=False)
        model = transformers.Qwen2ForCausalLM(cfg)
    _randomize(model, seed)
    model.eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=[("llama", True), ("llama", False), ("qwen2", True)],
                ids=["llama-tied", "llama-untied", "qwen2-bias"])
def checkpoint(request, tmp_path_factory):
    kind, tied = request.param
    path = tmp_path_factory.mktemp(f"{kind}-{tied}")
    hf = write_tiny_decoder(path, kind, tied)
    return path, hf


def _prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _hf_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, max_new_tokens=n, min_new_tokens=0, eos_token_id=None,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


# -- HF equivalence ---------------------------------------------------------------------------
def test_spec_reads_config(checkpoint):
    path, hf = checkpoint
    model = DecoderModel.from_pretrained(path, CPU)
    assert model.spec.num_kv_heads == 2 and model.spec.num_heads == 4 and model.spec.head_dim == 8
    assert model.spec.rope_theta == hf.config.rope_parameters["rope_theta"]
    assert model.spec.tie_word_embeddings == hf.config.tie_word_embeddings
    assert (model.lm_head is model.embed) == hf.config.tie_word_embeddings
    assert (model.layers[0].qkv_bias is not None) == (hf.config.model_type == "qwen2")


def test_step_logits_equal_hf_forward(checkpoint):
    """One prompt prefilled in three chunks plus a decode token: each step's logits equal HF's
    full forward logits at that position; two sequences share the steps."""
    path, hf = checkpoint
    model = DecoderModel.from_pretrained(path, CPU)
    cache = model.new_cache(KVCacheConfig(block_size=4, num_blocks=32))
    a, b = _prompts([11, 6])
    with torch.no_grad():
        ref_a = hf(torch.tensor([a])).logits[0]     # [11, V]
        ref_b = hf(torch.tensor([b])).logits[0]
    chunks = [(0, 5, 0, 6), (5, 9, None, None), (9, 11, None, None)]   # (a from, a to, b from, b to)
    for a0, a1, b0, b1 in chunks:
        seqs = [StepSequence("a", a0, a1 - a0)]
        ids, pos = a[a0:a1], list(range(a0, a1))
        cache.allocate("a", a1)
        if b0 is not None:
            seqs.append(StepSequence("b", b0, b1 - b0))
            ids, pos = ids + b[b0:b1], pos + list(range(b0, b1))
            cache.allocate("b", b1)
        logits = model.forward(torch.tensor(ids), torch.tensor(pos), seqs, cache)
        torch.testing.assert_close(logits[0], ref_a[a1 - 1], atol=1e-4, rtol=1e-4)
        if b0 is not None:
            torch.testing.assert_close(logits[1], ref_b[b1 - 1], atol=1e-4, rtol=1e-4)


def test_chunks_of_several_sequences_attend_in_one_padded_call_with_the_same_logits(checkpoint):
    """Prefill chunks of four sequences in one step (two continuing earlier chunks, lengths that leave their last
    blocks partly filled) beside a decode token share one padded attention call; where padding would cost more
    than CHUNK_PAD_LIMIT times their work they attend one by one. Either way each last token's logits equal HF's."""
    from vbert.decoder import CHUNK_PAD_LIMIT

    path, hf = checkpoint
    model = DecoderModel.from_pretrained(path, CPU)
    cache = model.new_cache(KVCacheConfig(block_size=4, num_blocks=64))
    prompts = _prompts([9, 7, 6, 5, 30, 3], seed=3)
    with torch.no_grad():
        refs = [hf(torch.tensor([p])).logits[0] for p in prompts]

    def step(parts):   # (sequence index, from, to)
        seqs = [StepSequence(i, a, b - a) for i, a, b in parts]
        for i, _, b in parts:
            cache.allocate(i, b)
        ids = torch.tensor([t for i, a, b in parts for t in prompts[i][a:b]])
        plan = model._plan(seqs, len(ids), cache)
        logits = model.forward(ids, None, seqs, cache)
        for row, (i, _, b) in enumerate(parts):
            torch.testing.assert_close(logits[row], refs[i][b - 1], atol=1e-4, rtol=1e-4)
        return plan

    assert step([(0, 0, 4), (1, 0, 3), (4, 0, 29)]).chunks is None    # 3 x 29 x 8 blocks > 2 x the work
    plan = step([(0, 4, 9), (1, 3, 7), (2, 0, 6), (3, 0, 5), (4, 29, 30)])   # 4 chunks and a decode token
    assert plan.chunks is not None and plan.spans == []
    assert plan.chunks.mask.shape == (4, 1, 6, 12)                   # 4 chunks x 6 rows x 3 blocks of 4
    assert 4 * 6 * 3 <= CHUNK_PAD_LIMIT * (5 * 3 + 4 * 2 + 6 * 2 + 5 * 2)
    assert step([(5, 0, 3)]).chunks is None                           # a single chunk attends alone


# decode staging budgets: off; room for every row (rows leave and join: a kept row moves down); 20,000 bytes (at 2
# layers x 2 KV heads x 8 x fp32, 156 row-tokens: some steps do not fit, read the blocks and empty the staging, the
# next ones refill it, growing it in place)
STAGING = {"off": 0, "roomy": 1 << 20, "tight": 20_000}


@pytest.mark.parametrize("staging", list(STAGING))
def test_greedy_equals_hf_generate_with_joins_and_chunks(checkpoint, staging):
    path, hf = checkpoint
    model = DecoderModel.from_pretrained(path, CPU)
    cache = model.new_cache(KVCacheConfig(block_size=4, num_blocks=64, staging_bytes=STAGING[staging]))
    start_free = cache.num_free_blocks
    prompts = _prompts([3, 17, 9, 1, 12])
    max_new = [12, 5, 9, 7, 10]
    log = []
    out = generate_greedy(model, prompts, cache, max_new_tokens=max_new, chunk_size=5, token_budget=12,
                          arrival_steps=[0, 0, 2, 5, 6], step_log=log)
    for p, n, got in zip(prompts, max_new, out):
        assert got == _hf_greedy(hf, p, n)
    assert cache.num_free_blocks == start_free
    # the schedule really mixed prefill chunks and decode tokens, and the batch changed over time
    assert any(len(s) > 1 and any(k > 1 for _, k in s) and any(k == 1 for _, k in s) for s in log)
    assert len({tuple(i for i, _ in s) for s in log}) > 3
    st = cache.staging
    if staging == "off":
        assert st is None
    elif staging == "roomy":   # the 4 prompts longer than a token filled once each; rows that stayed were moved
        assert (st.num_fills, st.num_fallbacks) == (4, 0) and st.num_moves >= 1 and st.nbytes <= STAGING[staging]
    else:
        assert st.num_fallbacks >= 1 and st.num_fills > 4 and st.nbytes <= STAGING[staging]


def test_decode_staging_follows_the_blocks_through_a_bfloat16_cache_and_a_freed_sequence(checkpoint):
    """Step by step the staged decode equals reading the blocks (a bfloat16 pool under float32 compute: the staged
    new tokens are rounded as the blocks round them); a sequence freed and started again under the same id is filled
    again from its new blocks, not served its old staged K/V."""
    path, hf = checkpoint
    model = DecoderModel.from_pretrained(path, CPU)
    caches = [model.new_cache(KVCacheConfig(block_size=4, num_blocks=64, dtype="bfloat16", staging_bytes=s))
              for s in (0, 1 << 20)]
    prompts = _prompts([6, 9, 5], seed=5)

    def run(cache, plan):
        out = []
        for step in plan:   # (seq, tokens, num_computed)
            seqs = [StepSequence(i, c, len(t)) for i, t, c in step]
            for i, t, c in step:
                cache.allocate(i, c + len(t))
            out.append(model.forward(torch.tensor([x for _, t, _ in step for x in t]), None, seqs, cache))
        return out

    a, b, c = prompts
    decode = [[(0, a, 0), (1, b, 0)]] + [[(0, [t], 6 + k), (1, [t + 1], 9 + k)] for k, t in enumerate((3, 7, 11))]
    # id 0 again, freed while staged, with a prompt as long as its staged row (6 + 3) prefilled alone (no decode
    # rows: the staging is not asked): only the free tells it; then 0 leaves and 2 joins
    again = [[(0, b, 0)], [(0, [4], 9), (1, [5], 12)], [(1, [6], 13), (2, c, 0)], [(1, [7], 14), (2, [8], 5)]]
    for cache in caches:
        got = run(cache, decode)
        cache.free(0)
        got += run(cache, again)
        if cache.staging is None:
            ref = got
        else:
            for x, y in zip(got, ref):
                torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
            assert cache.staging.num_fills == 4                              # 0, 1, 0 again, 2
    with torch.no_grad():   # the restarted id 0 decodes from its new prompt
        full = hf(torch.tensor([b + [4]])).logits[0, -1]
    torch.testing.assert_close(got[5][0], full, atol=0.05, rtol=0.05)


# -- LoRA -------------------------------------------------------------------------------------
def _write_lora(hf_model_path: Path, path: Path, r: int, seed: int, alpha: int):
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_model_path)
    cfg = peft.LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=alpha, target_modules=TARGETS,
                          lora_dropout=0.0)
    pm = peft.get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(pm.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(path)


def _round_lora_to(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The PEFT model with its LoRA weights rounded to `dtype` (what bfloat16 banks hold; exact here, as the
    adapters' scales are powers of two: rounding B then scaling equals rounding scale * B)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(p.to(dtype).float())
    return model


@pytest.mark.parametrize("bank_dtype", ["float32", "bfloat16"])
def test_lora_mixed_batch_equals_peft_generate(checkpoint, tmp_path, bank_dtype):
    """Greedy generation of a mixed batch equals PEFT's, per adapter; with bfloat16 banks it equals PEFT on the
    adapter's weights rounded to bfloat16."""
    path, _ = checkpoint
    specs = [(2, 1, 4), (8, 2, 16), (4, 3, 4)]   # (r, seed, alpha)
    dirs = []
    for r, seed, alpha in specs:
        d = tmp_path / f"lora{seed}"
        _write_lora(path, d, r, seed, alpha)
        dirs.append(d)
    model = DecoderModel.from_pretrained(path, CPU)
    pool = DecoderLoraPool(DecoderLoraConfig(num_slots=4, max_rank=8, bank_dtype=bank_dtype), model.spec, CPU)
    assert pool.a["qkv"].dtype == getattr(torch, bank_dtype)
    slots = [pool.load(read_peft_causal_lm(d)) for d in dirs]
    cache = model.new_cache(KVCacheConfig(block_size=4, num_blocks=64))
    prompts = _prompts([5, 9, 2, 13, 7], seed=3)
    rows = [slots[0], 0, slots[1], slots[2], slots[0]]
    max_new = [8, 6, 10, 5, 7]
    out = generate_greedy(model, prompts, cache, adapter_slots=rows, max_new_tokens=max_new, lora=pool,
                          chunk_size=4, token_budget=10, arrival_steps=[0, 1, 0, 3, 4])
    refs = {0: transformers.AutoModelForCausalLM.from_pretrained(path).eval()}
    for slot, d in zip(slots, dirs):
        base = transformers.AutoModelForCausalLM.from_pretrained(path)
        refs[slot] = _round_lora_to(peft.PeftModel.from_pretrained(base, d), getattr(torch, bank_dtype)).eval()
    num_changed = 0
    for p, n, slot, got in zip(prompts, max_new, rows, out):
        assert got == _hf_greedy(refs[slot], p, n), f"slot {slot}"
        num_changed += slot != 0 and got != _hf_greedy(refs[0], p, n)
    assert num_changed >= 2   # the adapters matter
    # unload frees the slot for another adapter
    pool.unload(slots[0])
    assert pool.num_free_slots == 2


def test_lora_pool_refuses(checkpoint, tmp_path):
    path, _ = checkpoint
    model = DecoderModel.from_pretrained(path, CPU)
    _write_lora(path, tmp_path / "big", r=8, seed=5, alpha=8)
    adapter = read_peft_causal_lm(tmp_path / "big")
    small = DecoderLoraPool(DecoderLoraConfig(num_slots=1, max_rank=4), model.spec, CPU)
    with pytest.raises(AdapterError, match="rank 8"):
        small.load(adapter)
    pool = DecoderLoraPool(DecoderLoraConfig(num_slots=1, max_rank=8), model.spec, CPU)
    pool.load(adapter)
    with pytest.raises(DecoderLoraPoolFullError):
        pool.load(adapter)
    with pytest.raises(ValueError, match="no LoRA pool"):
        cache = model.new_cache(KVCacheConfig(num_blocks=4))
        cache.allocate(0, 2)
        model.forward(torch.tensor([1, 2]), torch.tensor([0, 1]), [StepSequence(0, 0, 2, 1)], cache)


@pytest.mark.parametrize("bank_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_bgmv_semantics_per_token_loop(checkpoint, tmp_path, backend, bank_dtype):
    """DecoderLoraPool.apply equals its Semantics line computed token by token, on both kernels and both bank
    dtypes (the numba one skips rank padding and takes rank rows eight, four, then one at a time: ranks 3, 8
    and 13 take every path; bfloat16 banks hold A and scale * B rounded to bfloat16, computed in float32)."""
    path, _ = checkpoint
    model = DecoderModel.from_pretrained(path, CPU)
    for d, r, seed in (("a", 3, 7), ("b", 8, 8), ("c", 13, 9)):
        _write_lora(path, tmp_path / d, r=r, seed=seed, alpha=2 * r)
    pool = DecoderLoraPool(DecoderLoraConfig(num_slots=4, max_rank=16, backend=backend, bank_dtype=bank_dtype),
                           model.spec, CPU)
    assert pool.backend == backend and pool.a["down"].dtype == pool.b["down"].dtype == getattr(torch, bank_dtype)
    rounded = getattr(torch, bank_dtype)
    adapters = {pool.load(read_peft_causal_lm(tmp_path / d)): read_peft_causal_lm(tmp_path / d) for d in "abc"}
    idx = torch.tensor([0, *adapters, 0, *reversed(list(adapters))])
    spec = model.spec
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    for group, fin, targets in (("down", spec.intermediate_size, [("down_proj", 0, spec.hidden_size)]),
                                ("qkv", spec.hidden_size, [("q_proj", 0, q), ("k_proj", q, kv),
                                                           ("v_proj", q + kv, kv)])):
        x = torch.randn(len(idx), fin)
        base = torch.randn(len(idx), sum(n for _, _, n in targets))
        got = pool.apply(1, group, x, base.clone(), idx, tuple(off for _, off, _ in targets))
        for i, slot in enumerate(idx.tolist()):
            want = base[i].clone()
            for target, off, n in targets:
                if slot:
                    w = adapters[slot].modules[(1, target)]
                    a, b = w.A.to(rounded).float(), (w.B * w.scale).to(rounded).float()
                    want[off:off + n] += b @ (a @ x[i])
            torch.testing.assert_close(got[i], want, msg=f"{group} token {i} slot {slot}")


def test_lora_backend_validation():
    with pytest.raises(ValueError, match="backend"):
        DecoderLoraConfig(backend="cuda-graph")
    spec = DecoderSpec(VOCAB, 32, 48, 2, 4, 2, 8, 1e-6, 1e4, 64, True)
    with pytest.raises(ValueError, match="float32 CPU"):
        DecoderLoraPool(DecoderLoraConfig(backend="numba"), spec, DeviceContext(torch.device("cpu"), torch.float16))
    with pytest.raises(ValueError, match="bank_dtype.*'float16'"):
        DecoderLoraConfig(bank_dtype="float16")
    # auto: the model's dtype; bfloat16 halves the pool, with either kernel
    auto = DecoderLoraPool(DecoderLoraConfig(num_slots=1, max_rank=2), spec, CPU)
    assert auto.bank_dtype == auto.a["o"].dtype == torch.float32
    for backend in ("numba", "torch"):
        half = DecoderLoraPool(DecoderLoraConfig(num_slots=1, max_rank=2, backend=backend, bank_dtype="bfloat16"),
                               spec, CPU)
        assert half.a["o"].dtype == half.b["down"].dtype == torch.bfloat16
        assert half.total_bytes() * 2 == auto.total_bytes()
    half_model = DeviceContext(torch.device("cpu"), torch.float16)
    assert DecoderLoraPool(DecoderLoraConfig(num_slots=1, max_rank=2), spec, half_model).a["o"].dtype == torch.float16


def test_peft_reader_refuses(checkpoint, tmp_path):
    path, _ = checkpoint
    base = transformers.AutoModelForCausalLM.from_pretrained(path)
    cfg = peft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj", "lm_head"])
    pm = peft.get_peft_model(base, cfg)
    pm.save_pretrained(tmp_path / "head")
    with pytest.raises(AdapterError, match="not LoRA on a supported module"):
        read_peft_causal_lm(tmp_path / "head")
    with pytest.raises(AdapterError, match="cannot read"):
        read_peft_causal_lm(tmp_path / "missing")


def test_forward_checks_positions(checkpoint):
    path, _ = checkpoint
    model = DecoderModel.from_pretrained(path, CPU)
    cache = model.new_cache(KVCacheConfig(block_size=4, num_blocks=4))
    cache.allocate(0, 3)
    with pytest.raises(ValueError, match="positions"):
        model.forward(torch.tensor([1, 2, 3]), torch.tensor([0, 1, 1]), [StepSequence(0, 0, 3)], cache)
    with pytest.raises(ValueError, match="outside"):
        cache2 = model.new_cache(KVCacheConfig(block_size=4, num_blocks=4))
        cache2.allocate(0, 2)
        model.forward(torch.tensor([1, 2, 3, 4, 5]), None, [StepSequence(0, 0, 5)], cache2)   # 1 block of 4


# -- KV cache ---------------------------------------------------------------------------------
def test_kv_cache_config_validation():
    with pytest.raises(ValueError, match="exactly one"):
        KVCacheConfig()
    with pytest.raises(ValueError, match="exactly one"):
        KVCacheConfig(num_blocks=4, budget_bytes=1024)
    with pytest.raises(ValueError, match="block_size"):
        KVCacheConfig(block_size=0, num_blocks=4)
    with pytest.raises(ValueError, match="dtype"):
        KVCacheConfig(num_blocks=4, dtype="int8")
    with pytest.raises(ValueError, match="staging_bytes"):
        KVCacheConfig(num_blocks=4, staging_bytes=-1)
    cache = PagedKVCache(KVCacheConfig(block_size=4, budget_bytes=10_000), 2, 2, 8, CPU)
    assert cache.bytes_per_block == 2 * 2 * 4 * 2 * 8 * 4
    assert cache.num_blocks == 10_000 // cache.bytes_per_block and cache.total_bytes() <= 10_000
    with pytest.raises(ValueError, match="below one block"):
        PagedKVCache(KVCacheConfig(block_size=4, budget_bytes=100), 2, 2, 8, CPU)


def test_decode_staging_holds_the_blocks_contents_and_grows_within_its_budget():
    """DecodeStaging alone on a pool of random K/V: a sequence's row equals its blocks once filled; rows grow by a
    quarter at a time up to the most the budget allows (not reallocated every step near it); past it a step gets
    None and the memory is given back, without trying to allocate again each step; when a row leaves the others fit
    again and are filled again."""
    layers, heads, d, bs = 2, 2, 4, 4
    cache = PagedKVCache(KVCacheConfig(block_size=bs, num_blocks=64, staging_bytes=2 * layers * 2 * heads * 100 * d * 4),
                         layers, heads, d, CPU)                        # 2 rows of 100 tokens (fp32)
    st = cache.staging
    torch.manual_seed(0)
    cache.k.copy_(torch.randn_like(cache.k))
    cache.v.copy_(torch.randn_like(cache.v))

    def row_equals_blocks(seq, row, n):
        blocks = torch.from_numpy(cache.blocks(seq, n))
        for layer in range(layers):
            k, v = cache.read_blocks(layer, blocks)
            if not (torch.equal(st.k[layer, row, :, :n], k[:n].transpose(0, 1))
                    and torch.equal(st.v[layer, row, :, :n], v[:n].transpose(0, 1))):
                return False
        return True

    for seq in ("a", "b"):
        cache.allocate(seq, 120)
    rows = st.prepare(cache, [("a", 30), ("b", 10)])
    assert rows.tolist() == [0, 1] and st.num_fills == 2
    assert row_equals_blocks("a", 0, 30) and row_equals_blocks("b", 1, 10)
    assert st.k.shape[1:4:2] == (2, 64)                              # 31 tokens, rounded up to 64
    shapes = set()
    for n in range(31, 100):                                          # a decodes: 1 token a step
        assert st.prepare(cache, [("a", n), ("b", n - 20)]) is not None
        shapes.add(st.k.shape[3])
    # 64, then a quarter more rounded up to 64 (128) is over the budget: the most it allows, 100, once
    assert shapes == {64, 100} and st.num_fallbacks == 0
    assert st.nbytes <= cache.config.staging_bytes and st.num_fills == 2
    assert row_equals_blocks("a", 0, 30) and row_equals_blocks("b", 1, 10)   # kept through the reallocation
    assert st.prepare(cache, [("a", 100), ("b", 80)]) is None        # 101 tokens: more than 2 rows can have
    assert st.k is None and st.nbytes == 0 and st.num_fallbacks == 1
    assert st.prepare(cache, [("a", 101), ("b", 81)]) is None and st.k is None
    rows = st.prepare(cache, [("a", 102)])                            # b left: one row may have 200 tokens
    assert rows.tolist() == [0] and st.num_fills == 3 and row_equals_blocks("a", 0, 102)
    cache.free("a")
    assert st.prepare(cache, [("b", 82)]).tolist() == [0] and st.num_fills == 4


def test_decode_staging_beyond_the_machines_memory_reads_the_blocks_and_lowers_its_budget():
    """A budget larger than the machine: the allocation that fails (a real one, 1 TB) is a fallback to reading the
    blocks with the budget halved below it, not a failed step; a staging that fits still works afterwards."""
    from pathlib import Path

    overcommit = Path("/proc/sys/vm/overcommit_memory")
    if not overcommit.exists() or overcommit.read_text().strip() == "1":
        pytest.skip("needs Linux refusing allocations beyond its memory (vm.overcommit_memory 0 or 2)")
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    machine = sum(int(info[k].split()[0]) << 10 for k in ("MemTotal", "SwapTotal"))
    layers, heads, d = 2, 2, 8
    per_token = 2 * layers * heads * d * 4                            # one row's K and V of a token, fp32
    tokens = (1 << 40) // per_token                                   # 1 TB
    if per_token * tokens < 4 * machine:
        pytest.skip("a machine with more than 256 GB")
    cache = PagedKVCache(KVCacheConfig(block_size=4, num_blocks=8, staging_bytes=1 << 50), layers, heads, d, CPU)
    st = cache.staging
    assert st.prepare(cache, [("huge", tokens)]) is None              # a step that reads the blocks
    assert st.num_alloc_failures == 1 and st.num_fallbacks == 1 and st.k is None
    assert st.budget_bytes < per_token * tokens
    cache.allocate("a", 8)
    assert st.prepare(cache, [("a", 7)]).tolist() == [0] and st.num_fills == 1


def test_kv_cache_allocation_and_round_trip():
    cache = PagedKVCache(KVCacheConfig(block_size=4, num_blocks=6), 2, 2, 3, CPU)
    cache.allocate("x", 3)
    cache.allocate("y", 10)          # 3 blocks
    assert cache.num_free_blocks == 2
    before = (cache.num_free_blocks, cache.block_table("x"), cache.block_table("y"))
    with pytest.raises(KVCacheFullError, match="needs 3 more"):
        cache.allocate("y", 21)
    with pytest.raises(KVCacheFullError):
        cache.allocate("z", 9)
    assert (cache.num_free_blocks, cache.block_table("x"), cache.block_table("y")) == before
    assert not cache.has_sequence("z")
    cache.allocate("x", 9)           # x grows to 3 blocks, interleaved with y's in the pool
    assert cache.num_free_blocks == 0 and len(cache.block_table("x")) == 3
    k = torch.randn(9, 2, 3)
    v = torch.randn(9, 2, 3)
    slots = torch.from_numpy(cache.slots("x", 0, 9))
    cache.write(1, slots[:4], k[:4], v[:4])       # written in two steps
    cache.write(1, slots[4:], k[4:], v[4:])
    blocks = cache.blocks("x", 9)                 # x's 3 blocks, read a whole block at a time
    assert blocks.tolist() == list(cache.block_table("x"))
    rk, rv = cache.read_blocks(1, torch.from_numpy(blocks))
    assert rk.shape == (12, 2, 3)
    assert torch.equal(rk[:9], k) and torch.equal(rv[:9], v)
    assert not rk[9:].any()                       # the last block's unwritten positions
    rk, _ = cache.read_blocks(1, torch.from_numpy(blocks[[1, 0]]))
    assert torch.equal(rk, torch.cat([k[4:8], k[:4]]))   # in the order asked
    assert not cache.k[0].any()                   # other layers untouched
    assert cache.blocks("x", 4).tolist() == list(cache.block_table("x"))[:1]
    with pytest.raises(ValueError, match="outside"):
        cache.slots("x", 0, 13)
    with pytest.raises(ValueError, match="outside"):
        cache.blocks("x", 13)
    assert cache.free("x") == 3 and cache.free("y") == 3
    assert cache.num_free_blocks == 6
    with pytest.raises(KeyError):
        cache.free("x")


def test_load_refuses_scaled_rope(tmp_path):
    cfg = dict(model_type="llama", hidden_act="silu", num_attention_heads=4, num_key_value_heads=2,
               vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
               rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0})
    with pytest.raises(DecoderLoadError, match="llama3"):
        DecoderSpec.from_hf_config(cfg)
    with pytest.raises(DecoderLoadError, match="model_type"):
        DecoderSpec.from_hf_config({**cfg, "model_type": "gpt2"})
