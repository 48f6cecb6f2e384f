"""Training: loss goes down, runs are reproducible, and what training evaluated is what is served
(in-process through vbert.MultiTenantModel, through a real server, and in PEFT for LoRA)."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_WORDS
from tests.dispatcher.conftest import ADMIN_TOKEN, RunningServer, tiny_server_config
from training.data import read_classification
from training.evaluate import (TASKS, EvaluateConfig, evaluate, model_logits, score, served_predictor,
                               server_predictions, torch_predictor)
from training.model import AdapterConfig, is_full_finetune_dir
from training.train import TrainConfig, train
from vbert import (AdapterArtifact, BackboneConfig, BottleneckAdapter, EncodeRow, ModelConfig, MultiTenantModel,
                   PoolConfig, load_artifact)

ROOT = Path(__file__).resolve().parents[2]
_SCRIPT = Path(sys.executable).with_name("vbert")
VBERT = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "dispatcher.cli"]
SCI_CITE = Path("/work/shared/data/cls/sci-cite/train.txt")
DISEASE, OTHER = TINY_WORDS[8:10] + TINY_WORDS[22:24], TINY_WORDS[10:14]   # patient disease cancer tumor / gene ...
FILLER = TINY_WORDS[:8]
ATOL = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint) -> Path:
    """The shared tiny random checkpoint (its tokenizer knows the tiny vocabulary)."""
    return tiny_checkpoint


# -- tiny data sets built from the tiny checkpoint's vocabulary -------------------------------------
def write_classification(path: Path, n: int = 64, seed: int = 0, labels=("clinical", "molecular", "other")) -> Path:
    rng = random.Random(seed)
    words_of = {labels[0]: DISEASE, labels[1]: OTHER, labels[2]: [f"w{i}" for i in range(8)]}
    with path.open("w") as f:
        for _ in range(n):
            label = rng.choice(labels)
            words = [rng.choice(words_of[label]) for _ in range(3)]
            words += [rng.choice(FILLER) for _ in range(rng.randint(1, 5))]
            rng.shuffle(words)
            f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    return path


def write_conll(path: Path, n: int = 48, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        f.write("-DOCSTART- X X O\n\n")
        for _ in range(n):
            for _ in range(rng.randint(3, 9)):
                if rng.random() < 0.3:
                    f.write(f"{rng.choice(DISEASE)} NN O B-Disease\n")
                    if rng.random() < 0.5:
                        f.write(f"{rng.choice(DISEASE)} NN O I-Disease\n")
                else:
                    f.write(f"{rng.choice(OTHER + FILLER)} NN O O\n")
            f.write("\n")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("data")
    return {"classification": write_classification(d / "train.jsonl"),
            "classification_test": write_classification(d / "test.jsonl", n=24, seed=1),
            "ner": write_conll(d / "train.conll"), "ner_test": write_conll(d / "test.conll", n=16, seed=1)}


def _config(checkpoint, data, out, task, kind, **kw) -> TrainConfig:
    """Small explicit settings (the tasks' default recipes train for longer, with other placements)."""
    base = dict(task=task, train_path=str(data[task]), out=str(out), backbone=str(checkpoint), epochs=6,
                batch_size=8, lr=2e-2, dropout=0.0, threads=1, show_progress=False,
                adapter=AdapterConfig(kind=kind, rank=4, bottleneck_size=16, bottleneck_placement="attn_out",
                                      targets=("query", "key", "value", "attn_out")))
    base.update(kw)
    return TrainConfig(**base)


RUNS = [("classification", "lora"), ("classification", "bottleneck"), ("ner", "lora"), ("ner", "bottleneck")]


@pytest.fixture(scope="module")
def runs(checkpoint, data, tmp_path_factory):
    """One trained adapter per (task, adapter kind), trained once for the module."""
    out = {}
    for task, kind in RUNS:
        path = tmp_path_factory.mktemp("runs") / f"{task}-{kind}"
        out[task, kind] = train(_config(checkpoint, data, path, task, kind), echo=lambda _: None)
    return out


def _served_model(checkpoint, **pool) -> MultiTenantModel:
    base = dict(num_lora_slots=2, num_bottleneck_slots=2, max_lora_rank=8, max_bottleneck_size=16, max_labels=8)
    base.update(pool)
    return MultiTenantModel(ModelConfig(backbone=BackboneConfig(path=str(checkpoint), device="cpu"),
                                        pool=PoolConfig(**base)))


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {f"{f.name}:{k}": v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


# -- training ------------------------------------------------------------------------------------
@pytest.mark.parametrize("task,kind", RUNS)
def test_loss_decreases_and_summary(runs, task, kind):
    result = runs[task, kind]
    s = json.loads((result.path / "training.json").read_text())
    losses = [e["loss"] for e in s["epochs"]]
    assert losses[-1] < 0.9 * losses[0], losses
    assert s["labels"] == sorted(s["labels"]) and s["best_epoch"] in range(1, 7)
    assert s["dev_metric"] == TASKS[task].metric and all(s["dev_metric"] in e["dev"] for e in s["epochs"])
    assert s["trainable_parameters"] > s["adapter_parameters"] > 0 and s["artifact_bytes"] > 0
    assert s["args"]["adapter"]["kind"] == kind and s["train_seconds"] > 0 and s["num_dev_examples"] >= 1
    art = load_artifact(result.path)
    assert art.kind == kind and list(art.head.spec.labels) == s["labels"]


def test_same_seed_same_artifact(checkpoint, data, runs, tmp_path):
    first = runs["classification", "lora"].path
    train(_config(checkpoint, data, tmp_path / "again", "classification", "lora"), echo=lambda _: None)
    a, b = _tensors(first), _tensors(tmp_path / "again")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    train(_config(checkpoint, data, tmp_path / "seed1", "classification", "lora", seed=1, epochs=1),
          echo=lambda _: None)
    c = _tensors(tmp_path / "seed1")
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_patience_stops_early(checkpoint, data, tmp_path):
    lines = []
    cfg = _config(checkpoint, data, tmp_path / "o", "ner", "bottleneck", epochs=5, lr=1e-7, patience=1)
    result = train(cfg, echo=lines.append)
    assert [e["epoch"] for e in result.summary["epochs"]] == [1, 2] and result.summary["best_epoch"] == 1
    assert any(line.startswith("early stop") for line in lines)


def test_top_layers_and_targets(checkpoint, data, tmp_path):
    cfg = _config(checkpoint, data, tmp_path / "o", "classification", "lora", epochs=1, pooling="cls",
                  adapter=AdapterConfig(kind="lora", rank=2, targets=("value", "ffn_out"), num_top_layers=1))
    result = train(cfg, echo=lambda _: None)
    art = load_artifact(result.path)
    assert set(art.adapter.modules) == {(2, "value"), (2, "ffn_out")} and art.head.spec.pooling == "cls"


# -- what training evaluated is what is served ------------------------------------------------------
@pytest.mark.parametrize("task,kind", RUNS)
def test_served_logits_equal_training_time(runs, checkpoint, task, kind):
    result = runs[task, kind]
    model = _served_model(checkpoint, lora_targets=("query", "key", "value", "attn_out"))
    slot = model.load_adapter(load_artifact(result.path))
    rows = [e["input_ids"] for e in result.dev_encoded]
    trained = model_logits(result.model, rows, batch_size=3)
    for row, exp, out in zip(rows, trained, model.forward([EncodeRow(r, slot) for r in rows])):
        torch.testing.assert_close(out.logits, exp, atol=ATOL, rtol=0)
    # the same metrics through the serving path as at training time
    t = TASKS[task]
    assert score(t, served_predictor(model, slot), result.dev_encoded, result.dev_examples) == \
        score(t, torch_predictor(result.model), result.dev_encoded, result.dev_examples)


def test_ffn_out_bottleneck_serves_as_trained(checkpoint, data, tmp_path):
    """A bottleneck trained on the feed-forward output is exported with that placement and served
    there: the same logits as at training time, and not those of the same weights on the attention
    output."""
    adapter = AdapterConfig(kind="bottleneck", bottleneck_size=16, bottleneck_placement="ffn_out")
    result = train(_config(checkpoint, data, tmp_path / "o", "ner", "bottleneck", epochs=2, adapter=adapter),
                   echo=lambda _: None)
    art = load_artifact(result.path)
    assert art.adapter.placement == "ffn_out"
    assert json.loads((result.path / "training.json").read_text())["args"]["adapter"]["bottleneck_placement"] == \
        "ffn_out"
    model = _served_model(checkpoint)
    slot = model.load_adapter(art)
    art.adapter.placement = "attn_out"
    elsewhere = model.load_adapter(art)
    rows = [e["input_ids"] for e in result.dev_encoded]
    trained = model_logits(result.model, rows, batch_size=3)
    served = model.forward([EncodeRow(r, slot) for r in rows])
    misplaced = model.forward([EncodeRow(r, elsewhere) for r in rows])
    for exp, out, wrong in zip(trained, served, misplaced):
        torch.testing.assert_close(out.logits, exp, atol=ATOL, rtol=0)
        assert not torch.allclose(wrong.logits, exp, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="bottleneck placement 'mlp' is not one of"):
        AdapterConfig(kind="bottleneck", bottleneck_placement="mlp")


def test_houlsby_bottleneck_serves_as_trained(checkpoint, data, tmp_path):
    """--bottleneck-placement both trains an adapter at each position of each layer (twice the
    parameters of one placement); exported, it serves the training-time logits, and neither of its
    two halves alone does."""
    adapter = AdapterConfig(kind="bottleneck", bottleneck_size=8, bottleneck_placement="both", num_top_layers=2)
    result = train(_config(checkpoint, data, tmp_path / "o", "ner", "bottleneck", epochs=2, adapter=adapter),
                   echo=lambda _: None)
    art = load_artifact(result.path)
    a = art.adapter
    assert a.placement == "both" and a.layers == (1, 2) and sorted(a.ffn_weights) == [1, 2]
    h = art.head.weight.shape[1]
    assert a.num_parameters() == 2 * 2 * (2 * h * 8 + 8 + h)      # 2 layers x 2 positions x (down + up)
    assert result.model.num_trainable_parameters() == a.num_parameters() + art.head.num_parameters()
    assert all(not torch.equal(w.up_w, torch.zeros_like(w.up_w)) for ws in a.positions().values()
               for w in ws.values())   # both halves trained
    model = _served_model(checkpoint, num_bottleneck_slots=4)
    slot = model.load_adapter(art)
    halves = [model.load_adapter(AdapterArtifact(BottleneckAdapter(a.size, ws, position), art.head))
              for position, ws in a.positions().items()]
    rows = [e["input_ids"] for e in result.dev_encoded]
    trained = model_logits(result.model, rows, batch_size=3)
    served = model.forward([EncodeRow(r, slot) for r in rows])
    for exp, out in zip(trained, served):
        torch.testing.assert_close(out.logits, exp, atol=ATOL, rtol=0)
    for half in halves:
        outs = model.forward([EncodeRow(r, half) for r in rows])
        assert not all(torch.allclose(o.logits, exp, atol=ATOL, rtol=0) for o, exp in zip(outs, trained))
    # `vbert evaluate` sizes its one-adapter pool for the two bank entries: the training-time dev scores
    dev = tmp_path / "dev.conll"
    dev.write_text("".join("".join(f"{w} {t}\n" for w, t in zip(ex.words, ex.tags)) + "\n"
                           for ex in result.dev_examples))
    assert evaluate(EvaluateConfig(adapter_dir=str(result.path), test_path=str(dev), device="cpu")) == \
        result.summary["best_dev"]


def test_dropout_is_seeded_and_never_served(checkpoint, data, tmp_path):
    """--dropout trains with dropout (other weights than without), reproducibly for a seed, and the
    exported adapter serves exactly what training evaluated (dropout off at evaluation)."""
    def run(name, **kw):
        return train(_config(checkpoint, data, tmp_path / name, "ner", "bottleneck", epochs=2, **kw),
                     echo=lambda _: None)

    first, again, plain = run("a", dropout=0.3), run("b", dropout=0.3), run("c")
    a, b, c = (_tensors(r.path) for r in (first, again, plain))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert json.loads((first.path / "training.json").read_text())["args"]["dropout"] == 0.3
    model = _served_model(checkpoint)
    slot = model.load_adapter(load_artifact(first.path))
    rows = [e["input_ids"] for e in first.dev_encoded]
    for exp, out in zip(model_logits(first.model, rows, batch_size=3),
                        model.forward([EncodeRow(r, slot) for r in rows])):
        torch.testing.assert_close(out.logits, exp, atol=ATOL, rtol=0)
    assert not first.model.training
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.0"):
        _config(checkpoint, data, tmp_path / "d", "ner", "bottleneck", dropout=1.0)


def test_lora_artifact_loads_in_peft(runs, checkpoint):
    from peft import PeftModel
    from transformers import BertModel

    result = runs["ner", "lora"]
    base = BertModel.from_pretrained(str(checkpoint), local_files_only=True).eval()
    pm = PeftModel.from_pretrained(base, str(result.path)).eval()
    head = load_artifact(result.path).head
    rows = [e["input_ids"] for e in result.dev_encoded]
    for row, exp in zip(rows, model_logits(result.model, rows)):
        with torch.no_grad():
            hidden = pm(input_ids=torch.tensor([row])).last_hidden_state[0]
        torch.testing.assert_close(hidden @ head.weight.T + head.bias, exp, atol=ATOL, rtol=0)


def test_evaluate_in_process(runs, data):
    for task, kind in RUNS:
        m = evaluate(EvaluateConfig(adapter_dir=str(runs[task, kind].path), test_path=str(data[f"{task}_test"]),
                                    device="cpu"))
        keys = {"accuracy", "macro_f1"} if task == "classification" else {"precision", "recall", "f1"}
        assert keys | {"num_examples"} == set(m) and all(0 <= m[k] <= 1 for k in keys)
        assert m["num_examples"] == (24 if task == "classification" else 16)


def test_full_finetune_reference(checkpoint, data, tmp_path):
    cfg = _config(checkpoint, data, tmp_path / "full", "classification", "none", epochs=1, lr=1e-3)
    result = train(cfg, echo=lambda _: None)
    assert is_full_finetune_dir(result.path) and (result.path / "config.json").is_file()
    s = result.summary
    assert s["adapter_parameters"] == 0 and s["trainable_parameters"] > 10_000
    # evaluate loads it with transformers: the same scores as at training time on the dev slice
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps({"text": ex.text, "label": ex.label}) + "\n" for ex in result.dev_examples))
    m = evaluate(EvaluateConfig(adapter_dir=str(result.path), test_path=str(dev), device="cpu"))
    assert m == s["best_dev"]


# -- through a real server ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    s = RunningServer(tiny_server_config(checkpoint, tmp_path_factory.mktemp("var")))
    yield s
    s.stop()


def test_register_then_evaluate_through_server(server, checkpoint, data, runs, tmp_path):
    from click.testing import CliRunner

    from dispatcher.cli import main
    from dispatcher.client import Client

    key = server.register("acme")
    # `vbert train --register` uploads the new adapter
    out = tmp_path / "cls"
    res = CliRunner().invoke(main, [
        "train", "--task", "classification", "--train", str(data["classification"]), "--adapter-kind", "bottleneck",
        "--bottleneck-size", "16", "--bottleneck-placement", "ffn_out", "--out", str(out),
        "--backbone", str(checkpoint), "--epochs", "6", "--lr", "0.02", "--batch-size", "8", "--threads", "1",
        "--no-progress",
        "--register", "--server", server.address, "--tenant", "acme", "--adapter", "cls", "--admin-token", ADMIN_TOKEN])
    assert res.exit_code == 0, res.output
    assert "registered acme/cls version 1" in res.output
    assert load_artifact(out).adapter.placement == "ffn_out"     # served there too: remote == local below
    with Client(server.address, admin_token=ADMIN_TOKEN) as admin:
        admin.upload_adapter("acme", "ner", runs["ner", "lora"].path)
    for task, name, path in (("classification", "cls", out), ("ner", "ner", runs["ner", "lora"].path)):
        t = TASKS[task]
        test_path = data[f"{task}_test"]
        examples = t.read(test_path)
        model = _served_model(checkpoint)
        art = load_artifact(path)
        local = served_predictor(model, model.load_adapter(art))
        encoded = t.encode(model.tokenizer, examples, {x: i for i, x in enumerate(art.head.spec.labels)},
                           model.max_length)
        with Client(server.address, api_key=key) as client:
            remote = server_predictions(t, client, name, examples, encoded, request_size=8)
        assert remote == local([e["input_ids"] for e in encoded])
        assert len({str(p) for p in remote}) > 1          # a trained adapter, not a constant
        # the CLI: --server gives the same JSON as in-process
        js_local, js_remote = tmp_path / f"{task}-local.json", tmp_path / f"{task}-remote.json"
        r1 = CliRunner().invoke(main, ["evaluate", "--adapter", str(path), "--test", str(test_path),
                                       "--json", str(js_local), "--device", "cpu"])
        r2 = CliRunner().invoke(main, ["evaluate", "--adapter", str(path), "--test", str(test_path), "--json",
                                       str(js_remote), "--server", server.address, "--api-key", key,
                                       "--tenant-adapter", name, "--request-size", "8"])
        assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
        assert json.loads(js_local.read_text()) == json.loads(js_remote.read_text())


# -- bad data: clear errors from the CLI ----------------------------------------------------------
def _run(args, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_bad_data_errors(checkpoint, data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the gene", "label": "a"}\n{"text": "the cell", "label": "b"}\n{"text": oops}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    many = tmp_path / "many.jsonl"
    many.write_text("".join(json.dumps({"text": "the gene", "label": f"L{i}"}) + "\n" for i in range(5)))
    from click.testing import CliRunner

    from dispatcher.cli import main

    common = ["--task", "classification", "--backbone", str(checkpoint), "--epochs", "1", "--no-progress"]
    p = _run([*VBERT, "train", "--train", str(bad), *common, "--out", str(tmp_path / "out0")], ROOT)   # the real CLI
    assert p.returncode != 0 and "line 3" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    cases = [(["--train", str(empty)], "no examples"),                  # the same command, in-process
             (["--train", str(many), "--max-labels", "4"], "5 labels, above the head limit of 4")]
    for i, (args, message) in enumerate(cases, 1):
        res = CliRunner().invoke(main, ["train", *args, *common, "--out", str(tmp_path / f"out{i}")])
        assert res.exit_code != 0 and message in res.output, (args, res.exit_code, res.output[-2000:])
        assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)   # no traceback
    assert not any((tmp_path / f"out{i}").exists() for i in range(3))


def test_unknown_label_at_evaluation(runs, tmp_path):
    from click.testing import CliRunner

    from dispatcher.cli import main

    test = tmp_path / "test.jsonl"
    test.write_text('{"text": "the gene", "label": "clinical"}\n{"text": "the cell", "label": "surgical"}\n')
    res = CliRunner().invoke(main, ["evaluate", "--adapter", str(runs["classification", "lora"].path),
                                    "--test", str(test), "--json", str(tmp_path / "m.json"), "--device", "cpu"])
    assert res.exit_code == 1 and "unknown label 'surgical'" in res.output and "line 2" in res.output
    assert not (tmp_path / "m.json").exists()


def test_output_dir_must_be_empty(checkpoint, data, runs):
    with pytest.raises(FileExistsError):
        train(_config(checkpoint, data, runs["ner", "lora"].path, "ner", "lora"), echo=lambda _: None)


# -- the real default backbone -----------------------------------------------------------------------
@pytest.mark.skipif(not SCI_CITE.is_file(), reason="needs ../shared/data/cls/sci-cite")
def test_real_backbone_sci_cite(tmp_path):
    lines = SCI_CITE.read_text().splitlines()[:40]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    cfg = TrainConfig(task="classification", train_path=str(tmp_path / "train.jsonl"), out=str(tmp_path / "o"),
                      adapter=AdapterConfig(kind="lora", rank=4), epochs=1, max_length=64, batch_size=16,
                      threads=2, show_progress=False)
    result = train(cfg, echo=lambda _: None)
    examples = read_classification(tmp_path / "train.jsonl")
    assert result.summary["labels"] == sorted({ex.label for ex in examples})
    model = MultiTenantModel(ModelConfig(backbone=BackboneConfig(device="cpu"),
                                         pool=PoolConfig(num_lora_slots=1, num_bottleneck_slots=0)))
    slot = model.load_adapter(load_artifact(result.path))
    rows = [e["input_ids"] for e in result.dev_encoded]
    for exp, out in zip(model_logits(result.model, rows), model.forward([EncodeRow(r, slot) for r in rows])):
        torch.testing.assert_close(out.logits, exp, atol=ATOL, rtol=0)



def test_epoch_batches_cover_every_example_once_and_group_similar_lengths():
    from training.train import epoch_batches

    lengths = [random.Random(i).randint(3, 120) for i in range(1000)]
    grouped = epoch_batches(lengths, 32, torch.Generator().manual_seed(1), group_by_length=True)
    plain = epoch_batches(lengths, 32, torch.Generator().manual_seed(1), group_by_length=False)
    for batches in (grouped, plain):
        assert sorted(i for b in batches for i in b) == list(range(1000))
        assert all(1 <= len(b) <= 32 for b in batches)

    def padded(batches):   # tokens the model computes: every row padded to its batch's longest
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    assert padded(grouped) < 0.75 * padded(plain)
    again = epoch_batches(lengths, 32, torch.Generator().manual_seed(1), group_by_length=True)
    assert again == grouped                                      # seeded: same batches, same order
    other = epoch_batches(lengths, 32, torch.Generator().manual_seed(2), group_by_length=True)
    assert other != grouped


def test_cli_choices_match_the_library():
    """training/cli.py and training/recipes.py copy these tuples (so that `vbert --help` does not import
    torch); they must stay what the library accepts."""
    from training import cli, recipes
    from training.distill import ATTENTION_LAYERS
    from vbert.adapters import BOTTLENECK_PLACEMENTS
    from vbert.config import DEFAULT_LORA_TARGETS, HOST_HEAP_KEEP_MB, LORA_TARGETS

    assert cli.BOTTLENECK_PLACEMENTS == BOTTLENECK_PLACEMENTS
    assert cli.LORA_TARGETS == LORA_TARGETS == recipes.ALL_LORA_TARGETS
    assert recipes.ATTENTION_LORA_TARGETS == DEFAULT_LORA_TARGETS
    assert cli.ATTENTION_LAYERS == ATTENTION_LAYERS
    assert cli.HOST_HEAP_KEEP_MB == HOST_HEAP_KEEP_MB
