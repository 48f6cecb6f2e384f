"""Distillation of the shallow layers (loss goes down, seeded, resumable after a real SIGKILL), the
table builder's CLI, and adapters trained in skip mode that serve exactly what training saw."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dispatcher.cli import main
from tests.conftest import TINY_WORDS, write_tiny_checkpoint
from tests.training.test_train import VBERT, write_classification
from tests.vbert.test_skip import sentences
from training.distill import DistillConfig, Distiller, distill
from training.evaluate import model_logits
from training.model import AdapterConfig
from training.train import TrainConfig, train
from vbert import BackboneConfig, EncodeRow, ModelConfig, MultiTenantModel, load_artifact
from vbert.backbone import Encoder
from vbert.config import SkipConfig, SkipTableConfig
from vbert.ngram import load_table
from vbert.shallow import ShallowModel, load_shallow, read_shallow_meta

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(sentences(300, 11, TINY_WORDS)) + "\n")
    return path


def distill_config(checkpoint, corpus, out, **kw) -> DistillConfig:
    base = dict(corpus=(str(corpus),), out=str(out), backbone=str(checkpoint), skip_layers=2, epochs=2,
                batch_size=8, lr=3e-3, seed=0, threads=1, show_progress=False)
    base.update(kw)
    return DistillConfig(**base)


@pytest.fixture(scope="module")
def shallow(tiny_checkpoint, corpus, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shallow") / "s"
    summary = distill(distill_config(tiny_checkpoint, corpus, out), echo=lambda _: None)
    return out, summary


def test_distillation_lowers_the_hidden_state_error(shallow, tiny_checkpoint):
    out, summary = shallow
    dev = [h["dev_mse"] for h in summary["history"]]
    assert dev[-1] < 0.7 * dev[0]                                  # epoch 0 = the teacher-initialized layers
    model, meta = load_shallow(out, Encoder.from_checkpoint(tiny_checkpoint))
    assert meta.skip_layers == 2 and model.weights_hash() == meta.weights_hash
    assert meta.distill["train_sentences"] + meta.distill["dev_sentences"] == 300


def test_attention_distillation_lowers_the_attention_divergence(shallow, tiny_checkpoint, corpus, tmp_path):
    """--attention-weight adds the KL divergence of the first upper layer's attention (on the merged
    states vs on the teacher's): it goes down from the teacher-initialized layers and ends below the
    run without the term, which still reports it."""
    plain = [h["dev_attn_kl"] for h in shallow[1]["history"]]
    # the tiny random model attends almost uniformly (KL ~5e-5), so the term needs a large weight to count
    summary = distill(distill_config(tiny_checkpoint, corpus, tmp_path / "att", attention_weight=1000.0),
                      echo=lambda _: None)
    kl = [h["dev_attn_kl"] for h in summary["history"]]
    assert kl[0] == pytest.approx(plain[0]) and kl[0] > 0          # the same start, measured the same way
    assert kl[-1] < 0.7 * kl[0] and kl[-1] < 0.95 * plain[-1]
    assert read_shallow_meta(tmp_path / "att").weights_hash != read_shallow_meta(shallow[0]).weights_hash
    # --attention-layers upper (k = 1: two upper layers): the KL averaged over them goes down
    every = distill(distill_config(tiny_checkpoint, corpus, tmp_path / "upper", skip_layers=1, attention_weight=1000.0,
                                   attention_layers="upper"), echo=lambda _: None)
    upper = [h["dev_upper_attn_kl"] for h in every["history"]]
    assert upper[-1] < 0.7 * upper[0] and every["args"]["attention_layers"] == "upper"
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="attention_weight must be a finite number >= 0"):
            distill_config(tiny_checkpoint, corpus, tmp_path / "bad", attention_weight=bad)


def test_the_loss_is_the_weighted_sum_of_its_measured_terms(shallow, tiny_checkpoint, corpus, tmp_path):
    """Distiller.loss = layer-k MSE + final_weight * final-layer MSE + attention_weight * attention KL,
    each term measured independently here (the teacher's upper layers on the merged states); every
    run reports the final layer's MSE per epoch, whatever its weight."""
    teacher = Encoder.from_checkpoint(tiny_checkpoint).eval().requires_grad_(False)
    student, _ = load_shallow(shallow[0], teacher)
    distiller = Distiller(teacher, student, final_weight=2.0, attention_weight=3.0)
    ids, types, mask = distiller.batch_tensors([[2, 5, 9, 7, 3], [2, 11, 3]], "cpu")
    total, terms = distiller.loss(ids, types, mask)
    with torch.no_grad():
        target = teacher.run_layers(teacher.embed(ids, types), mask, stop=2)
        merged = student(ids, types, mask)
        final_mse = ((teacher.run_layers(merged, mask, start=2) - teacher.run_layers(target, mask, start=2)) ** 2
                     )[mask].mean()
    assert terms["mse"] == pytest.approx(float(((merged - target) ** 2)[mask].mean()), rel=1e-5)
    assert terms["final_mse"] == pytest.approx(float(final_mse), rel=1e-5) and terms["final_mse"] > 0
    assert terms["attn_kl"] > 0
    expected = terms["mse"] + 2 * terms["final_mse"] + 3 * terms["attn_kl"]
    assert float(total.detach()) == pytest.approx(expected, rel=1e-5)
    _, unweighted = Distiller(teacher, student, 0.0).loss(ids, types, mask)
    assert unweighted["final_mse"] == 0 and unweighted["attn_kl"] == 0       # not computed unless asked
    # attention_layers="upper": the KL averaged over every upper layer, each on its input along either path
    # (k = 1 here, so the tiny 3-layer teacher has two upper layers)
    low = ShallowModel.from_teacher(teacher, 1, student.edge_id)
    upper = Distiller(teacher, low, final_weight=2.0, attention_weight=3.0, attention_layers="upper")
    total, terms = upper.loss(ids, types, mask)
    with torch.no_grad():
        target = teacher.run_layers(teacher.embed(ids, types), mask, stop=1)
        merged = low(ids, types, mask)
        kls = []
        for layer in range(1, teacher.spec.num_layers):
            t = teacher.layers[layer].attention_log_probs(target, mask)
            s = teacher.layers[layer].attention_log_probs(merged, mask)
            kls.append(float((t.exp() * (t - s)).sum(-1).mean(1)[mask].mean()))
            target, merged = (teacher.run_layers(x, mask, start=layer, stop=layer + 1) for x in (target, merged))
    assert len(kls) == 2 and kls[0] == pytest.approx(terms["attn_kl"], rel=1e-5) and kls[1] > 0
    assert terms["upper_attn_kl"] == pytest.approx(sum(kls) / len(kls), rel=1e-5)
    assert float(total.detach()) == pytest.approx(terms["mse"] + 2 * terms["final_mse"] + 3 * terms["upper_attn_kl"],
                                         rel=1e-5)
    with pytest.raises(ValueError, match="attention_layers must be one of"):
        Distiller(teacher, student, 0.0, 1.0, attention_layers="all")
    plain = [h["dev_final_mse"] for h in shallow[1]["history"]]
    assert plain[-1] < plain[0]
    with pytest.raises(ValueError, match="final_weight must be a finite number >= 0"):
        distill_config(tiny_checkpoint, corpus, tmp_path / "bad", final_weight=-1.0)


def test_distillation_is_seeded(shallow, tiny_checkpoint, corpus, tmp_path):
    distill(distill_config(tiny_checkpoint, corpus, tmp_path / "again"), echo=lambda _: None)
    assert read_shallow_meta(tmp_path / "again").weights_hash == read_shallow_meta(shallow[0]).weights_hash
    distill(distill_config(tiny_checkpoint, corpus, tmp_path / "other", seed=1), echo=lambda _: None)
    assert read_shallow_meta(tmp_path / "other").weights_hash != read_shallow_meta(shallow[0]).weights_hash


def test_distillation_continues_from_an_earlier_run(shallow, tiny_checkpoint, corpus, tmp_path):
    first, summary = shallow
    out = tmp_path / "longer"
    more = distill(distill_config(tiny_checkpoint, corpus, out, epochs=1, init=str(first)), echo=lambda _: None)
    # same corpus and seed -> same dev split: the new run starts where the first one ended, and improves
    assert more["history"][0]["dev_mse"] == pytest.approx(summary["history"][-1]["dev_mse"], rel=1e-5)
    assert more["history"][-1]["dev_mse"] < more["history"][0]["dev_mse"]
    meta = read_shallow_meta(out)
    assert meta.distill["init"]["weights_hash"] == read_shallow_meta(first).weights_hash
    assert meta.weights_hash != read_shallow_meta(first).weights_hash
    with pytest.raises(ValueError, match="--skip-layers 1"):
        distill(distill_config(tiny_checkpoint, corpus, tmp_path / "k1", skip_layers=1, init=str(first)),
                echo=lambda _: None)
    other_teacher = write_tiny_checkpoint(tmp_path / "other-teacher", seed=1)
    with pytest.raises(ValueError, match="--init: .*other upper-layer weights"):
        distill(distill_config(other_teacher, corpus, tmp_path / "t", init=str(first)), echo=lambda _: None)
    assert not (tmp_path / "t" / "shallow.json").exists()


def test_distillation_resumes_after_sigkill_to_the_same_weights(tiny_checkpoint, corpus, tmp_path):
    args = ["distill", "--corpus", str(corpus), "--backbone", str(tiny_checkpoint), "--skip-layers", "2",
            "--epochs", "3", "--batch-size", "2", "--lr", "3e-3", "--threads", "1", "--checkpoint-every", "5",
            "--no-progress"]
    ref = tmp_path / "uninterrupted"
    subprocess.run(VBERT + args + ["--out", str(ref)], cwd=ROOT, check=True, capture_output=True)
    run = tmp_path / "killed"
    proc = subprocess.Popen(VBERT + args + ["--out", str(run)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = run / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpt.is_file() and torch.load(ckpt, weights_only=False)["epoch"] >= 2:   # mid-run, past an epoch
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "shallow.json").exists()
    state = torch.load(ckpt, weights_only=False)
    assert (state["epoch"], state["step_in_epoch"]) != (4, 0)
    done = subprocess.run(VBERT + args + ["--out", str(run), "--resume"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming at epoch" in done.stdout
    assert read_shallow_meta(run).weights_hash == read_shallow_meta(ref).weights_hash
    bad = CliRunner().invoke(main, args + ["--out", str(run), "--resume", "--seed", "7"])
    assert bad.exit_code != 0 and "other settings" in bad.output


def test_build_table_cli(shallow, tiny_checkpoint, corpus, tmp_path):
    out = tmp_path / "t.safetensors"
    cmd = VBERT + ["build-table", "--shallow", str(shallow[0]), "--corpus", str(corpus), "--out", str(out),
                   "--budget-mb", "1", "--backbone", str(tiny_checkpoint), "--no-progress"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    table = load_table(out, weights_hash=read_shallow_meta(shallow[0]).weights_hash)
    assert table.nbytes() <= 1.1 * 2**20 and table.meta.kinds["unigram"] > 0 and table.meta.kinds["trigram"] > 0
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 2 and "exists" in again.stderr


def test_adapter_trained_in_skip_mode_serves_what_training_saw(shallow, tiny_checkpoint, corpus, tmp_path):
    data = write_classification(tmp_path / "train.jsonl", n=64)
    result = train(TrainConfig(task="classification", train_path=str(data), out=str(tmp_path / "a"),
                               backbone=str(tiny_checkpoint), adapter=AdapterConfig(kind="bottleneck",
                                                                                   bottleneck_size=8),
                               epochs=2, lr=3e-3, skip_shallow=str(shallow[0]), skip_table="bio",
                               skip_dtype="float16", show_progress=False), echo=lambda _: None)
    art = load_artifact(result.path)
    assert art.skip_table == "bio" and set(art.adapter.layers) == {2}     # only above the 2 skipped layers
    losses = [e["loss"] for e in result.summary["epochs"]]
    assert losses[-1] < losses[0]
    table = tmp_path / "t.safetensors"
    subprocess.run(VBERT + ["build-table", "--shallow", str(shallow[0]), "--corpus", str(corpus), "--out",
                            str(table), "--budget-mb", "1", "--backbone", str(tiny_checkpoint), "--no-progress"],
                   cwd=ROOT, check=True, capture_output=True)
    model = MultiTenantModel(ModelConfig(backbone=BackboneConfig(path=str(tiny_checkpoint), device="cpu"),
                                         skip=SkipConfig((SkipTableConfig("bio", str(shallow[0]), str(table)),),
                                                         route="table")))
    slot = model.load_adapter(art)
    rows = [e["input_ids"] for e in result.dev_encoded]
    served = model.forward([EncodeRow(r, slot) for r in rows])
    for exp, out in zip(model_logits(result.model, rows, batch_size=3), served):
        torch.testing.assert_close(out.logits, exp, atol=1e-4, rtol=0)
    stats = model.skip.stats()["bio"]
    assert stats["table_hits"] > 0 and stats["computed"] > 0      # both paths took part, same results
    with_table = train(TrainConfig(task="classification", train_path=str(data), out=str(tmp_path / "c"),
                                   backbone=str(tiny_checkpoint), adapter=AdapterConfig(kind="bottleneck",
                                                                                       bottleneck_size=8),
                                   epochs=2, lr=3e-3, skip_shallow=str(shallow[0]), skip_table="bio",
                                   skip_table_file=str(table), show_progress=False), echo=lambda _: None)
    assert load_artifact(with_table.path).tensors()[0].equal(art.tensors()[0])   # table = computed, bit for bit
    with pytest.raises(ValueError, match="adapters must sit above"):
        train(TrainConfig(task="classification", train_path=str(data), out=str(tmp_path / "b"),
                          backbone=str(tiny_checkpoint), adapter=AdapterConfig(kind="lora", num_top_layers=3),
                          skip_shallow=str(shallow[0]), show_progress=False), echo=lambda _: None)


def test_evaluate_cli_in_skip_mode(shallow, tiny_checkpoint, tmp_path):
    data = write_classification(tmp_path / "train.jsonl", n=48)
    test = write_classification(tmp_path / "test.jsonl", n=16, seed=3)
    train(TrainConfig(task="classification", train_path=str(data), out=str(tmp_path / "a"),
                      backbone=str(tiny_checkpoint), adapter=AdapterConfig(kind="lora", rank=4, num_top_layers=1),
                      epochs=1, show_progress=False), echo=lambda _: None)
    out = tmp_path / "m.json"
    done = subprocess.run(VBERT + ["evaluate", "--adapter", str(tmp_path / "a"), "--test", str(test), "--json",
                                   str(out), "--skip-shallow", str(shallow[0]), "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    metrics = json.loads(out.read_text())
    assert metrics["num_examples"] == 16 and 0 <= metrics["accuracy"] <= 1
    assert metrics["skip"]["default"]["tokens"] > 0 and metrics["skip"]["default"]["computed"] > 0
    runs = {}
    for route in ("layers", None):                   # the real lower layers: exactly the full model's scores
        runs[route] = tmp_path / f"{route}.json"     # (in-process from here: the command line was run above)
        flags = ["--skip-shallow", str(shallow[0]), "--skip-route", route] if route else []
        done = CliRunner().invoke(main, ["evaluate", "--adapter", str(tmp_path / "a"), "--test", str(test), "--json",
                                         str(runs[route]), "--device", "cpu", *flags])
        assert done.exit_code == 0, done.output
    on_layers, full = (json.loads(runs[r].read_text()) for r in ("layers", None))
    assert on_layers["accuracy"] == full["accuracy"] and on_layers["macro_f1"] == full["macro_f1"]
    assert on_layers["skip"]["default"]["rows_layers"] == 16 and on_layers["skip"]["default"]["tokens"] == 0
    train(TrainConfig(task="classification", train_path=str(data), out=str(tmp_path / "all-layers"),
                      backbone=str(tiny_checkpoint), adapter=AdapterConfig(kind="lora", rank=4), epochs=1,
                      show_progress=False), echo=lambda _: None)
    low = CliRunner().invoke(main, ["evaluate", "--adapter", str(tmp_path / "all-layers"), "--test", str(test),
                                    "--json", str(tmp_path / "x.json"), "--skip-shallow", str(shallow[0]),
                                    "--device", "cpu"])
    assert low.exit_code == 1 and "skip mode replaces" in low.output and not (tmp_path / "x.json").exists()


def test_table_selection_unigrams_then_bigram_share_then_frequent_trigrams():
    from collections import Counter

    from training.table import select_keys, trigram_counts
    from vbert.ngram import unpack

    rows = [[1, 5, 6, 7, 2], [1, 5, 6, 8, 2], [1, 5, 6, 7, 2], [1, 9, 2]]
    edge, bits = 0, 4
    keys, counts = trigram_counts(rows, edge, bits)
    naive = Counter((r[i - 1] if i else edge, r[i], r[i + 1] if i + 1 < len(r) else edge)
                    for r in rows for i in range(len(r)))
    got = {tuple(unpack(torch.tensor([k]), bits)[0].tolist()): int(c) for k, c in zip(keys, counts)}
    assert got == dict(naive) and list(counts) == sorted(counts, reverse=True)
    chosen = unpack(torch.from_numpy(select_keys(rows, edge, bits, max_entries=12, fallback_share=0.25)), bits)
    kinds = [(int(a == edge) + int(c == edge)) for a, _, c in chosen.tolist()]
    unigrams = {(edge, t, edge) for r in rows for t in r}
    assert kinds[:len(unigrams)] == [2] * len(unigrams)           # every token's unigram first
    assert {tuple(x) for x in chosen.tolist()[:len(unigrams)]} == unigrams
    rest = chosen.tolist()[len(unigrams):]
    assert len(chosen) == 12 and (5, 6, 7) in [tuple(x) for x in rest]   # the most frequent inner trigram
