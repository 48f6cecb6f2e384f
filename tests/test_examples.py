"""The trained example adapters shipped under examples/adapters-trained/: intact, as described, and
right on one of their documented example sentences with the real default backbone."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from vbert import BackboneConfig, EncodeRow, HeadKind, ModelConfig, MultiTenantModel, PoolConfig, load_artifact
from vbert.artifact import META_FILE

ROOT = Path(__file__).resolve().parents[1] / "examples" / "adapters-trained"

SHIPPED = {
    # directory: (head kind, head labels, adapter kind)
    "sci-cite": (HeadKind.CLASSIFY, ("background", "method", "result"), "bottleneck"),
    "ncbi-disease": (HeadKind.TAG, ("B-Disease", "I-Disease", "O"), "bottleneck"),
}


def result_of(name: str) -> dict:
    return json.loads((ROOT / name / "RESULT.json").read_text())


DECODER_SHIPPED = ("ncbi-disease-gen",)        # decoder LoRA adapters (PEFT CAUSAL_LM), no head file


@pytest.mark.parametrize("name", sorted(SHIPPED) + list(DECODER_SHIPPED))
def test_shipped_files_match_their_sha256(name):
    files = result_of(name)["files"]
    needed = {"vbert_adapter.json", "adapter_model.safetensors"}
    needed |= {"adapter_config.json"} if name in DECODER_SHIPPED else {"head.safetensors"}
    assert needed <= set(files)
    for fname, want in files.items():
        data = (ROOT / name / fname).read_bytes()
        assert len(data) == want["bytes"], f"{name}/{fname}: size changed"
        assert hashlib.sha256(data).hexdigest() == want["sha256"], f"{name}/{fname}: sha256 changed"


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_artifact_loads_with_its_head_and_kind(name):
    head_kind, head_labels, adapter_kind = SHIPPED[name]
    art = load_artifact(ROOT / name)
    assert art.head.spec.kind is head_kind
    assert tuple(art.head.spec.labels) == head_labels
    meta = json.loads((ROOT / name / META_FILE).read_text())
    assert art.kind == meta["kind"] == adapter_kind
    assert meta["bottleneck"]["placement"] == "ffn_out" and int(meta["bottleneck"]["size"]) == 64
    res = result_of(name)
    assert res["split"] == "test" and res["test"]["num_examples"] > 0 and res["train_command"]


@pytest.fixture(scope="module")
def real_model(default_checkpoint):
    return MultiTenantModel(ModelConfig(backbone=BackboneConfig(path=str(default_checkpoint), device="cpu"),
                                        pool=PoolConfig(num_lora_slots=1, num_bottleneck_slots=2)))


def test_sci_cite_example_classified_as_documented(real_model):
    ex = result_of("sci-cite")["examples"][0]
    slot = real_model.load_adapter(load_artifact(ROOT / "sci-cite"))
    try:
        (out,) = real_model.forward([EncodeRow(real_model.tokenize([ex["text"]])[0], slot)])
        assert out.predicted() == ex["label"]
    finally:
        real_model.unload_adapter(slot)


def test_ncbi_disease_example_tags_its_diseases(real_model):
    from dispatcher.convert import tagging

    ex = result_of("ncbi-disease")["examples"][0]
    slot = real_model.load_adapter(load_artifact(ROOT / "ncbi-disease"))
    try:
        (row,) = real_model.tokenize_each([ex["text"]], [True])
        (out,) = real_model.forward([EncodeRow(row.ids, slot)])
        tok = real_model.tokenizer
        result = tagging(out, tok.convert_ids_to_tokens(row.ids), set(tok.all_special_tokens), text=ex["text"],
                         offsets=row.offsets, word_ids=row.word_ids)          # as the server tags a text
        assert [e.text for e in result.entities] == ex["entities"]
    finally:
        real_model.unload_adapter(slot)


@pytest.mark.slow
def test_ncbi_disease_generative_example_lists_its_diseases(smollm2, tmp_path):
    """The decoder LoRA, greedy on the real SmolLM2 with the serving code, answers its documented
    sentences with their gold mention lists; a stock PEFT config loads with task_type CAUSAL_LM."""
    from training.generation_eval import GenerationEvaluateConfig, evaluate_generation

    res = result_of("ncbi-disease-gen")
    assert json.loads((ROOT / "ncbi-disease-gen" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    assert res["test"]["num_examples"] == 940 and 0 < res["test"]["items"]["f1"] < 1
    test = tmp_path / "examples.jsonl"
    test.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{res['instruction']}\n{ex['text']}"},
                                                     {"role": "assistant", "content": ex["mentions"]}]}) + "\n"
                            for ex in res["examples"]))
    cache, _ = smollm2
    metrics, preds = evaluate_generation(GenerationEvaluateConfig(adapter_dir=str(ROOT / "ncbi-disease-gen"),
                                                                  test_path=str(test), cache_dir=str(cache),
                                                                  backbone=None))
    assert [p["prediction"] for p in preds] == [ex["mentions"] for ex in res["examples"]]
    assert metrics["exact_match"] == 1.0
