"""Decoder adapters as artifacts: the generate head, PEFT CAUSAL_LM directories in and out (Hugging Face
PEFT loads our export and gives the logits of our DecoderModel with the same adapter), refusals."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.vbert.test_decoder import CPU, VOCAB, _write_lora, write_tiny_decoder
from vbert.adapters import AdapterError, BackboneShape, BottleneckAdapter, LoraAdapter, LoraWeights
from vbert.artifact import AdapterArtifact, load_artifact, save_artifact
from vbert.config import PoolConfig
from vbert.decoder import DecoderModel, StepSequence
from vbert.decoder_lora import (DECODER_LORA_TARGETS, DecoderLoraConfig, DecoderLoraPool, read_peft_causal_lm,
                                validate_decoder_artifact, write_peft_causal_lm)
from vbert.heads import Head, HeadKind, HeadSpec
from vbert.kv_cache import KVCacheConfig
from vbert.pool import validate_artifact

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

GENERATE = HeadSpec(HeadKind.GENERATE)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    write_tiny_decoder(path, "llama", tied=False, seed=3)
    return path


def random_decoder_lora(spec, modules, alpha=8.0, use_rslora=False, seed=0) -> LoraAdapter:
    """modules: {(layer, target): (rank, alpha_of_module)}; per-module ranks and alphas exercise PEFT's
    rank_pattern / alpha_pattern."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for (layer, target), (r, a) in modules.items():
        fin, fout = spec.target_dims(target)
        out[(layer, target)] = LoraWeights(torch.randn(r, fin, generator=g) * 0.3, torch.randn(fout, r, generator=g) * 0.3,
                                           LoraAdapter.scale_for(r, a, use_rslora))
    return LoraAdapter(rank=4, alpha=alpha, modules=out, use_rslora=use_rslora)


def assert_same_lora(a: LoraAdapter, b: LoraAdapter) -> None:
    assert set(a.modules) == set(b.modules)
    for k, w in a.modules.items():
        torch.testing.assert_close(b.modules[k].A, w.A, rtol=0, atol=0)
        torch.testing.assert_close(b.modules[k].B, w.B, rtol=0, atol=0)
        assert b.modules[k].scale == pytest.approx(w.scale, rel=1e-12)


# -- the generate head -----------------------------------------------------------------------------
def test_generate_head_schema_and_backbone():
    spec = HeadSpec.from_json({"kind": "generate"})
    assert spec.kind is HeadKind.GENERATE and spec.backbone == "decoder" and not spec.has_weights
    assert HeadSpec(HeadKind.EMBED).backbone == "encoder" and HeadSpec(HeadKind.TAG, ("O",)).has_weights
    assert HeadSpec.from_json(spec.to_json()) == spec
    with pytest.raises(AdapterError, match="a generate head takes no labels"):
        HeadSpec(HeadKind.GENERATE, ("a",))
    with pytest.raises(AdapterError, match="a generate head takes no pooling or normalization"):
        HeadSpec.from_json({"kind": "generate", "normalize": True})
    with pytest.raises(AdapterError, match="a generate head has no weights"):
        Head(spec, torch.zeros(1, 4), torch.zeros(1)).validate(4)
    with pytest.raises(AdapterError, match="an embed head takes no labels"):   # the old message is kept
        HeadSpec(HeadKind.EMBED, ("a",))


# -- PEFT directories in and out -------------------------------------------------------------------
def test_peft_causal_lm_directory_loads_as_a_decoder_artifact_and_round_trips(checkpoint, tmp_path):
    _write_lora(checkpoint, tmp_path / "peft", r=4, seed=1, alpha=8)
    art = load_artifact(tmp_path / "peft")
    assert art.backbone == "decoder" and art.kind == "lora" and art.head.spec == GENERATE
    assert {t for _, t in art.adapter.modules} == set(DECODER_LORA_TARGETS)
    assert_same_lora(read_peft_causal_lm(tmp_path / "peft"), art.adapter)

    saved = save_artifact(art, tmp_path / "ours", backbone_name="tiny-llama")
    cfg = json.loads((saved / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["base_model_name_or_path"] == "tiny-llama"
    names = set(load_file(str(saved / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in names
    assert "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight" in names
    assert not (saved / "head.safetensors").exists()
    meta = json.loads((saved / "vbert_adapter.json").read_text())
    assert meta["head"]["kind"] == "generate" and meta["kind"] == "lora"
    back = load_artifact(saved)
    assert back.backbone == "decoder" and back.head.spec == GENERATE
    assert_same_lora(art.adapter, back.adapter)


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_exported_peft_directory_gives_our_logits_in_peft(checkpoint, tmp_path, use_rslora):
    """write_peft_causal_lm -> PeftModel.from_pretrained(LlamaForCausalLM) gives, position by position,
    the logits of our DecoderModel with the adapter in a DecoderLoraPool slot (per-module ranks and alphas,
    some layers and targets only)."""
    model = DecoderModel.from_pretrained(checkpoint, CPU)
    modules = {(0, "q_proj"): (4, 8.0), (0, "v_proj"): (2, 8.0), (1, "o_proj"): (4, 3.0),
               (1, "gate_proj"): (3, 8.0), (0, "down_proj"): (4, 12.0), (1, "up_proj"): (1, 8.0)}
    adapter = random_decoder_lora(model.spec, modules, use_rslora=use_rslora, seed=5)
    out = write_peft_causal_lm(adapter, tmp_path / "export", base_model_name_or_path=str(checkpoint))
    assert_same_lora(adapter, read_peft_causal_lm(out))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] and cfg["alpha_pattern"] and cfg["use_rslora"] is use_rslora

    base = transformers.LlamaForCausalLM.from_pretrained(checkpoint).eval()
    prompt = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = base(prompt).logits[0]                                        # [9, V]
        pm = peft.PeftModel.from_pretrained(base, str(out)).eval()
        want = pm(prompt).logits[0]                                           # [9, V]
    # float32 banks: this checks the format's meaning to 1e-4 (bfloat16 banks: test_decoder.py)
    pool = DecoderLoraPool(DecoderLoraConfig(num_slots=2, max_rank=4, bank_dtype="float32"), model.spec, CPU)
    slot = pool.load(adapter)
    cache = model.new_cache(KVCacheConfig(block_size=4, num_blocks=16))
    ids = prompt[0].tolist()
    for n in range(1, len(ids) + 1):          # one token per step: the logits at every position
        cache.allocate("s", n)
        got = model.forward(torch.tensor(ids[n - 1:n]), None, [StepSequence("s", n - 1, 1, slot)], cache, lora=pool)
        torch.testing.assert_close(got[0], want[n - 1], atol=1e-4, rtol=1e-4)
    assert (want - plain).abs().max() > 0.1     # the adapter matters


# -- refusals --------------------------------------------------------------------------------------
def test_decoder_artifacts_must_be_decoder_lora(checkpoint, tmp_path):
    spec = DecoderModel.from_pretrained(checkpoint, CPU).spec
    lora = random_decoder_lora(spec, {(0, "q_proj"): (2, 4.0)})
    shape = BackboneShape(spec.hidden_size, spec.intermediate_size, spec.num_layers)
    bottleneck = BottleneckAdapter.random(shape, size=4, generator=torch.Generator().manual_seed(0))
    cases = [(AdapterArtifact(bottleneck, Head(GENERATE)), "must be LoRA .* got adapter kind 'bottleneck'"),
             (AdapterArtifact(None, Head(GENERATE)), "must be LoRA .* got adapter kind 'none'"),
             (AdapterArtifact(LoraAdapter.random(shape, 2), Head(GENERATE)), "lora layer 0 attn_out: not a target of "
                                                                             "a decoder"),
             (AdapterArtifact(lora, Head(HeadSpec(HeadKind.EMBED))), "lora layer 0 q_proj: not a target of an "
                                                                     "encoder"),
             (AdapterArtifact(lora, Head(GENERATE), skip_table="t"), "no skip table")]
    for i, (art, words) in enumerate(cases):
        with pytest.raises(AdapterError, match=words):
            save_artifact(art, tmp_path / f"bad{i}")
        assert not (tmp_path / f"bad{i}").exists()
    with pytest.raises(AdapterError, match="lora layer 5 q_proj: layer out of range, the decoder has 2 layers"):
        validate_decoder_artifact(AdapterArtifact(LoraAdapter(2, 4.0, {(5, "q_proj"): lora.modules[(0, "q_proj")]}),
                                                  Head(GENERATE)), spec, 8)
    with pytest.raises(AdapterError, match="the encoder's pool cannot load it"):
        validate_artifact(AdapterArtifact(lora, Head(GENERATE)), shape, PoolConfig())
    pool = DecoderLoraPool(DecoderLoraConfig(num_slots=1, max_rank=1), spec, CPU)
    with pytest.raises(AdapterError, match="rank 2 is not in \\[1, max_rank=1\\]"):
        pool.load(AdapterArtifact(lora, Head(GENERATE)))
    assert pool.num_free_slots == 1
