"""`vbert train --task generation` and `vbert evaluate` of a decoder adapter, on a tiny random Llama: the
loss is on the completion only, dev loss goes down, bad lines are named, the chat template is applied, and
the exported PEFT directory gives the same greedy tokens in Hugging Face PEFT, in our decoder and through a
real server."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tests.decoder_models import write_tiny_decoder_checkpoint
from training.cli import evaluate_command, train_command
from training.data import IGNORE_INDEX, DataError
from training.generation_data import (build_shared_sets, collate, encode_generation, entity_spans, read_generation)
from training.generation_eval import generation_metrics, token_f1

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# prompt words of a pattern -> the fixed answer (all in the tiny tokenizer's corpus)
PATTERNS = {"fox": ["quick", "brown", "jumps", "lazy", "over"], "Paris": ["capital", "France", "What", "is"],
            "aspirin": ["patient", "treated", "with", "recovered"]}
SHARED_DATA = Path("/work/shared/data")


def write_pairs(path: Path, n: int, seed: int, chat: bool = False) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            answer = rng.choice(sorted(PATTERNS))
            prompt = " ".join(rng.choice(PATTERNS[answer]) for _ in range(rng.randint(2, 5))) + " ->"
            if chat:
                record = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
            else:
                record = {"prompt": prompt, "completion": " " + answer}
            f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="module")
def decoder(tmp_path_factory) -> Path:
    return write_tiny_decoder_checkpoint(tmp_path_factory.mktemp("gen-decoder") / "model", num_layers=2, hidden=64)


@pytest.fixture(scope="module")
def tokenizer(decoder):
    return transformers.AutoTokenizer.from_pretrained(str(decoder), local_files_only=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("gen-data")
    return {"train": write_pairs(d / "train.jsonl", 96, 0), "dev": write_pairs(d / "dev.jsonl", 24, 1),
            "test": write_pairs(d / "test.jsonl", 12, 2)}


@pytest.fixture(scope="module")
def trained(decoder, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen-run") / "adapter"
    result = CliRunner().invoke(train_command, [
        "--task", "generation", "--train", str(data["train"]), "--dev", str(data["dev"]), "--out", str(out),
        "--backbone", str(decoder), "--epochs", "6", "--lr", "1e-2", "--rank", "8", "--batch-size", "8",
        "--no-progress", "--threads", "2"])
    assert result.exit_code == 0, result.output
    return out


# -- data ---------------------------------------------------------------------------------------------
def test_collator_masks_exactly_the_prompt_and_the_padding(tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "the quick brown fox", "completion": " jumps"}) + "\n"
                    + json.dumps({"prompt": "What is the capital of France?", "completion": " Paris is the capital"})
                    + "\n")
    eos = tokenizer.eos_token_id
    rows = encode_generation(tokenizer, read_generation(path), 64, eos)
    ids, mask, labels = collate(rows, tokenizer.pad_token_id)
    for b, (row, ex) in enumerate(zip(rows, read_generation(path))):
        prompt = tokenizer(ex.prompt)["input_ids"]
        completion = tokenizer(ex.completion, add_special_tokens=False)["input_ids"] + [eos]
        n = len(prompt) + len(completion)
        assert ids[b, :n].tolist() == prompt + completion and mask[b, :n].tolist() == [1] * n
        assert labels[b, :len(prompt)].tolist() == [IGNORE_INDEX] * len(prompt)
        assert labels[b, len(prompt):n].tolist() == completion
        assert labels[b, n:].tolist() == [IGNORE_INDEX] * (ids.shape[1] - n) and mask[b, n:].sum() == 0
    # too long: the completion stays, the prompt keeps its last tokens
    completion = tokenizer(" Paris is the capital", add_special_tokens=False)["input_ids"] + [eos]
    long = encode_generation(tokenizer, read_generation(path)[1:], len(completion) + 2, eos)[0]
    assert long["truncated"] and long["num_prompt"] == 2 and len(long["input_ids"]) == len(completion) + 2 and long["input_ids"][-len(completion):] == completion
    assert long["input_ids"][:long["num_prompt"]] == tokenizer("What is the capital of France?")["input_ids"][
        -long["num_prompt"]:]


def test_messages_go_through_the_chat_template(tokenizer, tmp_path):
    path = write_pairs(tmp_path / "chat.jsonl", 3, 5, chat=True)
    examples = read_generation(path)
    rows = encode_generation(tokenizer, examples, 128, tokenizer.eos_token_id)
    for ex, row in zip(examples, rows):
        assert ex.is_chat and ex.messages[-1][0] == "user"
        rendered = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in ex.messages],
                                                 add_generation_prompt=True, tokenize=False)
        assert rendered.endswith("<|im_start|>assistant\n")
        prompt = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        assert row["input_ids"][:row["num_prompt"]] == prompt
        assert row["labels"][row["num_prompt"]:] == tokenizer(ex.completion, add_special_tokens=False)[
            "input_ids"] + [tokenizer.eos_token_id]


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: malformed JSON"),
    (json.dumps({"prompt": "hi"}), "line 2: missing \"completion\""),
    (json.dumps({"prompt": "hi", "completion": 3}), "line 2: \"completion\" must be a string"),
    (json.dumps({"text": "hi"}), "line 2: expected \"prompt\" and \"completion\", or \"messages\""),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "line 2: the last message must be the assistant"),
    (json.dumps({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}),
     "line 2: messages\\[0\\].role 'bot'"),
    (json.dumps({"prompt": "a", "completion": "b", "messages": []}), "line 2: give either"),
])
def test_bad_lines_are_named(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "completion": "fine"}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=f"bad.jsonl {message}"):
        read_generation(path)


def test_bad_line_exits_1_naming_file_and_line(decoder, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n\n" + json.dumps({"prompt": "a"}) + "\n")
    result = CliRunner().invoke(train_command, ["--task", "generation", "--train", str(path), "--backbone",
                                                str(decoder), "--out", str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 1
    assert f"{path} line 3: missing \"completion\"" in result.output
    result = CliRunner().invoke(train_command, ["--task", "generation", "--train", str(path), "--backbone",
                                                str(decoder), "--out", str(tmp_path / "o2"), "--bottleneck-size", "8"])
    assert result.exit_code == 2 and "--bottleneck-size: not for --task generation" in result.output


# -- training and export ------------------------------------------------------------------------------
def test_dev_loss_goes_down_and_the_run_is_recorded(trained):
    summary = json.loads((trained / "training.json").read_text())
    assert summary["task"] == "generation" and summary["dev_metric"] == "loss"
    assert summary["args"]["rank"] == 8 and summary["args"]["targets"] == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    losses = [e["dev"]["loss"] for e in summary["epochs"]]
    assert summary["best_dev"]["loss"] == min(losses) < 0.1 * summary["initial_dev_loss"]
    assert summary["epochs"][-1]["loss"] < summary["epochs"][0]["loss"]
    config = json.loads((trained / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["r"] == 8
    assert (trained / "adapter_model.safetensors").is_file()


def _ours(decoder, adapter_dir, prompts, max_new_tokens):
    from vbert import load_artifact
    from vbert.decoder_backbone import DecoderBackbone, DecoderBackboneConfig
    from vbert.device import DeviceContext
    from vbert.generation import generate_greedy

    backbone = DecoderBackbone.load(DecoderBackboneConfig(path=str(decoder), kv_cache_bytes=1 << 20, num_lora_slots=2,
                                                          max_lora_rank=8), DeviceContext.create("cpu", "float32"))
    slot = backbone.lora.load(load_artifact(adapter_dir))
    return generate_greedy(backbone.model, prompts, backbone.kv, adapter_slots=[slot] * len(prompts),
                           max_new_tokens=max_new_tokens, lora=backbone.lora)


def test_export_loads_in_peft_with_the_same_greedy_tokens_as_ours(trained, decoder, tokenizer):
    base = transformers.LlamaForCausalLM.from_pretrained(str(decoder))
    model = peft.PeftModel.from_pretrained(base, str(trained)).eval()
    prompts = [tokenizer(p)["input_ids"] for p in ["quick brown lazy ->", "capital France ->", "patient with ->",
                                                    "the dog"]]
    ours = _ours(decoder, trained, prompts, 8)
    for p, o in zip(prompts, ours):
        with torch.no_grad():
            hf = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=None)[0, len(p):].tolist()
        assert o == hf
    # it learned the patterns: the answer, then end-of-sequence
    answers = [tokenizer.decode(o[:o.index(tokenizer.eos_token_id)]) for o in ours[:3]]
    assert answers == [" fox", " Paris", " aspirin"]


def test_evaluate_prints_exact_match_and_rouge(trained, data, tmp_path):
    out, preds = tmp_path / "m.json", tmp_path / "p.jsonl"
    result = CliRunner().invoke(evaluate_command, ["--adapter", str(trained), "--test", str(data["test"]), "--json",
                                                   str(out), "--predictions", str(preds), "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text())
    assert printed["task"] == "generation" and printed["num_examples"] == 12 and printed["mode"] == "in-process"
    assert printed["exact_match"] >= 0.9 and printed["rougeL_f"] >= 0.9 and printed["token_f1"] >= 0.9
    rows = [json.loads(x) for x in preds.read_text().splitlines()]
    assert len(rows) == 12 and all(r["prediction"].strip() in PATTERNS for r in rows)


def test_evaluate_against_a_server_gives_the_same_predictions(trained, decoder, data, tiny_checkpoint,
                                                               tmp_path):
    from dispatcher.client import Client
    from tests.dispatcher.conftest import ADMIN_TOKEN, RunningServer, tiny_server_config

    s = RunningServer(tiny_server_config(tiny_checkpoint, tmp_path / "var", decoder=str(decoder),
                                         decoder_kv_cache_mb=1, decoder_block_size=4))
    try:
        key = s.register("acme")
        with Client(s.address, admin_token=ADMIN_TOKEN) as admin:      # what `vbert adapter upload` does
            info = admin.upload_adapter("acme", "patterns", trained)
        assert info["backbone"] == "decoder"
        args = ["--adapter", str(trained), "--test", str(data["test"]), "--max-new-tokens", "8"]
        local = CliRunner().invoke(evaluate_command, args + ["--json", str(tmp_path / "a.json"), "--predictions",
                                                             str(tmp_path / "a.jsonl")])
        remote = CliRunner().invoke(evaluate_command, args + [
            "--json", str(tmp_path / "b.json"), "--predictions", str(tmp_path / "b.jsonl"), "--server", s.address,
            "--api-key", key, "--tenant-adapter", "patterns"])
        assert local.exit_code == 0 and remote.exit_code == 0, local.output + remote.output
        assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
        assert json.loads(remote.output.strip().splitlines()[-1])["mode"].startswith("server")
    finally:
        s.stop()


# -- metrics and the shared-data converters ------------------------------------------------------------
def test_generation_metrics():
    m = generation_metrics(["Paris", "the red fox", "none"], [" Paris ", "the fox", "aspirin"])
    assert m["exact_match"] == pytest.approx(1 / 3) and m["num_examples"] == 3
    assert m["token_f1"] == pytest.approx((1 + 0.8 + 0) / 3)
    assert m["rougeL_f"] == pytest.approx((1 + 0.8 + 0) / 3)
    assert token_f1("", "") == 1.0 and token_f1("a", "") == 0.0
    items = generation_metrics(["cancer ; A - T", "none", "tumour"], ["cancer", "none", "tumour ; fever"])["items"]
    assert items["precision"] == pytest.approx(2 / 3) and items["recall"] == pytest.approx(2 / 3)
    labels = generation_metrics(["method", "result", "method", "background"], ["method", "method", "method", "x"])
    # method: tp 2, fp 1, fn 0 -> 0.8; result: 0; background: 0
    assert labels["label_macro_f1"] == pytest.approx(0.8 / 3)


def test_entity_spans():
    words = "the BRCA1 breast cancer and ovarian cancer risk".split()
    tags = ["O", "O", "B-Disease", "I-Disease", "O", "B-Disease", "I-Disease", "O"]
    assert entity_spans(words, tags) == ["breast cancer", "ovarian cancer"]
    assert entity_spans(["a", "b"], ["I-X", "B-X"]) == ["a", "b"]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not here")
def test_build_shared_sets_from_shared_data(tmp_path):
    paths = build_shared_sets(SHARED_DATA, tmp_path, max_examples=5)
    assert sorted(paths) == ["ncbi-disease", "sci-cite"]
    for splits in paths.values():
        for path in splits.values():
            examples = read_generation(path)
            assert len(examples) == 5 and all(ex.is_chat for ex in examples)
    labels = {ex.completion for ex in read_generation(paths["sci-cite"]["train"])}
    assert labels <= {"background", "method", "result"}


# -- the real default decoder (slow: SmolLM2-135M, a few steps) ------------------------------------------
@pytest.mark.slow
def test_smollm2_trains_and_evaluates_a_few_steps(tmp_path, smollm2):
    from tests.conftest import data_dir_with_models

    var = data_dir_with_models(tmp_path / "var", smollm2[0])      # the conversion other SmolLM2 tests share
    train_path = write_pairs(tmp_path / "train.jsonl", 8, 0, chat=True)
    test_path = write_pairs(tmp_path / "test.jsonl", 2, 2, chat=True)
    out = tmp_path / "adapter"
    result = CliRunner().invoke(train_command, [
        "--task", "generation", "--train", str(train_path), "--dev", str(test_path), "--out", str(out),
        "--data-dir", str(var), "--epochs", "1", "--batch-size", "4", "--max-length", "64", "--lr", "1e-3",
        "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "training.json").read_text())
    assert summary["backbone_name"] == "SmolLM2-135M-Instruct" and summary["best_dev"]["loss"] < summary[
        "initial_dev_loss"]
    result = CliRunner().invoke(evaluate_command, ["--adapter", str(out), "--test", str(test_path), "--json",
                                                   str(tmp_path / "m.json"), "--max-new-tokens", "4",
                                                   "--data-dir", str(var)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["num_examples"] == 2
