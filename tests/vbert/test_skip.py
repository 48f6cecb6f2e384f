"""Skip mode: the n-gram table serves exactly what the shallow layers compute, misses are computed
(exact) or looked up as fallbacks (approximate), several tables share one batch of the upper layers,
and tables built for other weights or damaged on disk are refused."""
from __future__ import annotations

import dataclasses
import logging
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.conftest import TINY_WORDS, classify, make_artifact, tag, tiny_pool_config, write_tiny_checkpoint
from training.table import TableConfig, build_table
from vbert import BackboneConfig, EncodeRow, ModelConfig, MultiTenantModel
from vbert.adapters import AdapterError
from vbert.backbone import Encoder
from vbert.config import SkipConfig, SkipTableConfig
from vbert.device import fast_bfloat16
from vbert.ngram import TableError, key_bits, load_table, pack, trigram_ids
from vbert.shallow import (ShallowModel, SkipError, compute_entries, export_shallow, load_shallow, read_shallow_meta,
                           save_shallow, teacher_upper_hash)
from vbert.skip import SkipCosts, SkipRuntime

SKIP = 2                                     # of the tiny checkpoint's 3 layers


def sentences(n: int, seed: int, words=TINY_WORDS) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) for _ in range(n)]


def write_shallow(teacher: Encoder, path: Path, perturb: int | None = None) -> Path:
    """Shallow layers initialized from the teacher; `perturb` seeds a change of every weight (a
    second, different set of shallow layers, as distillation on another domain would give)."""
    model = ShallowModel.from_teacher(teacher, SKIP, teacher.spec.pad_token_id)
    with torch.no_grad():
        g = torch.Generator().manual_seed(perturb if perturb is not None else 0)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))   # merge pos/type embeddings start at 0 otherwise
    save_shallow(model, path, "tiny", teacher_upper_hash(teacher, SKIP))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("skip")
    ckpt = write_tiny_checkpoint(root / "ckpt")
    teacher = Encoder.from_checkpoint(ckpt)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(sentences(60, 1)) + "\n")
    shallow_a = write_shallow(teacher, root / "shallow-a", perturb=1)
    shallow_b = write_shallow(teacher, root / "shallow-b", perturb=2)
    tables = {}
    for name, shallow in (("a", shallow_a), ("b", shallow_b)):
        tables[name] = root / f"table-{name}.safetensors"
        build_table(TableConfig(shallow=str(shallow), corpus=(str(corpus),), out=str(tables[name]), budget_mb=64,
                                dtype="float32", compute_dtype="float32", backbone=str(ckpt), show_progress=False),
                    echo=lambda s: None)
    return {"root": root, "ckpt": ckpt, "teacher": teacher, "corpus": corpus, "shallow": {"a": shallow_a,
            "b": shallow_b}, "tables": tables}


def skip_model(setup, names=("a",), tables=True, mode="exact", cache=4096, route="table", warm=0.0,
               cache_dir=None) -> MultiTenantModel:
    cfg = SkipConfig(tuple(SkipTableConfig(n, str(setup["shallow"][n]), str(setup["tables"][n]) if tables else None)
                           for n in names), mode=mode, miss_cache_entries=cache, route=route, warm_budget=warm,
                     cache_dir=None if cache_dir is None else str(cache_dir))
    return MultiTenantModel(ModelConfig(backbone=BackboneConfig(path=str(setup["ckpt"]), device="cpu"),
                                        pool=tiny_pool_config(), skip=cfg))


def top_layers_artifact(model, kind, head, seed, skip_table=None):
    art = make_artifact(model.spec.shape, kind, head, seed, **({"rank": 4} if kind == "lora" else {"size": 8}))
    a = art.adapter
    if kind == "lora":
        a.modules = {k: w for k, w in a.modules.items() if k[0] >= SKIP}
    else:
        a.layer_weights = {k: w for k, w in a.layer_weights.items() if k >= SKIP}
    art.skip_table = skip_table
    return art


def rows_of(model, texts, slot=0):
    return [EncodeRow(ids, slot) for ids in model.tokenize(texts)]


def test_table_entries_equal_the_shallow_layers_computed_on_the_fly(setup):
    shallow, meta = load_shallow(setup["shallow"]["a"], setup["teacher"])
    table = load_table(setup["tables"]["a"], weights_hash=meta.weights_hash)
    assert len(table.keys) > 100
    bits = key_bits(shallow.spec.vocab_size)
    perm = torch.randperm(len(table.keys), generator=torch.Generator().manual_seed(0))[:333]   # other batching
    again = compute_entries(shallow, table.keys[perm], bits, torch.float32, chunk=64)
    assert torch.equal(again, table.values[perm])
    one = compute_entries(shallow, table.keys[perm[:1]], bits, torch.float32, chunk=64)
    assert torch.equal(one, table.values[perm[:1]])


def test_full_table_equals_force_computed_path_and_counts_hits(setup):
    model = skip_model(setup)
    texts = setup["corpus"].read_text().splitlines()[:20]            # every trigram is in the table
    out = model.forward(rows_of(model, texts))
    stats = model.skip.stats()["a"]
    assert stats["hit_rate"] == 1.0 and stats["computed"] == 0 and stats["tokens"] > 100
    model.skip.force = True
    forced = model.forward(rows_of(model, texts))
    for x, y in zip(out, forced):
        assert torch.equal(x.embedding, y.embedding)
    full = MultiTenantModel(ModelConfig(backbone=BackboneConfig(path=str(setup["ckpt"]), device="cpu"),
                                        pool=tiny_pool_config()))
    ref = full.forward(rows_of(full, texts))
    assert not torch.allclose(ref[0].embedding, out[0].embedding, atol=1e-3)   # skip mode is not the full model


def test_exact_mode_computes_misses_once_and_equals_the_shallow_layers(setup):
    model = skip_model(setup, cache=4096)
    unseen = sentences(12, 99, TINY_WORDS[::-1])
    out = model.forward(rows_of(model, unseen))
    first = dict(model.skip.stats()["a"])
    assert first["computed"] > 0 and first["hit_rate"] < 1.0
    again = model.forward(rows_of(model, unseen))                  # now from the miss cache
    second = model.skip.stats()["a"]
    assert second["computed"] == first["computed"] and second["cache_hits"] > first["cache_hits"]
    model.skip.force = True
    forced = model.forward(rows_of(model, unseen))
    for x, y, z in zip(out, again, forced):
        assert torch.equal(x.embedding, z.embedding) and torch.equal(y.embedding, z.embedding)


def test_tiny_miss_cache_evicts_and_stays_exact(setup):
    model = skip_model(setup, tables=False, cache=8)                # no table: everything computed
    texts = sentences(10, 5)
    model.forward(rows_of(model, sentences(10, 6)))
    out = model.forward(rows_of(model, texts))                     # evicts the first batch's entries
    stats = model.skip.stats()["a"]
    assert stats["cache"]["size"] == 8 and stats["cache"]["evictions"] > 0
    model.skip.force = True
    for x, y in zip(out, model.forward(rows_of(model, texts))):
        assert torch.equal(x.embedding, y.embedding)


def test_miss_caches_survive_a_restart_and_are_not_used_with_other_weights(setup, tmp_path):
    keep = tmp_path / "misses"
    model = skip_model(setup, cache_dir=keep)
    assert model.skip_cache_restored == {"a": "no saved cache"}
    unseen = sentences(12, 77, TINY_WORDS[::-1])
    out = model.forward(rows_of(model, unseen))
    computed = model.skip.stats()["a"]["computed"]
    assert computed > 0
    assert model.save_skip_caches() == {"a": computed}
    again = skip_model(setup, cache_dir=keep)                      # the restart
    assert again.skip_cache_restored == {"a": computed}
    warm = again.forward(rows_of(again, unseen))
    stats = again.skip.stats()["a"]
    assert stats["computed"] == 0 and stats["cache_hits"] == computed
    for x, y in zip(out, warm):
        assert torch.equal(x.embedding, y.embedding)
    # table "a" now names other shallow layers: the saved entries are not theirs, so none is used
    other = MultiTenantModel(ModelConfig(backbone=BackboneConfig(path=str(setup["ckpt"]), device="cpu"),
                                         pool=tiny_pool_config(), skip=SkipConfig(
        (SkipTableConfig("a", str(setup["shallow"]["b"]), str(setup["tables"]["b"])),), route="table",
        cache_dir=str(keep))))
    assert "weights_hash" in other.skip_cache_restored["a"] and other.skip.stats()["a"]["cache"]["size"] == 0
    assert skip_model(setup).save_skip_caches() == {}              # no cache_dir: nothing kept
    with pytest.raises(ValueError, match="not a directory"):
        SkipConfig(cache_dir=str(setup["corpus"]))


def test_a_bfloat16_table_computes_its_misses_in_bfloat16_and_keeps_its_own_miss_cache(setup, tmp_path, caplog):
    """A table built with --compute-dtype bfloat16 records it; the server computes that table's misses (and
    the force path) in bfloat16 too, so lookups and computed misses stay bit-identical; its entries differ from
    float32's only by bfloat16 rounding; a miss cache saved for one compute dtype is not restored into the other.
    On a CPU that emulates bfloat16 (AVX2 only) the server warns at start that such a table's misses are slow."""
    bf16_table = tmp_path / "table-bf16.safetensors"
    said = []
    build_table(TableConfig(shallow=str(setup["shallow"]["a"]), corpus=(str(setup["corpus"]),), out=str(bf16_table),
                            budget_mb=64, dtype="float32", compute_dtype="bfloat16", backbone=str(setup["ckpt"]),
                            show_progress=False), echo=said.append)
    assert any("emulates bfloat16" in line for line in said) == (not fast_bfloat16("cpu")), said
    shallow, meta = load_shallow(setup["shallow"]["a"], setup["teacher"])
    table = load_table(bf16_table, weights_hash=meta.weights_hash)
    f32 = load_table(setup["tables"]["a"], weights_hash=meta.weights_hash)
    assert table.meta.compute_dtype == "bfloat16" and f32.meta.compute_dtype == "float32"
    assert torch.equal(table.keys, f32.keys) and not torch.equal(table.values, f32.values)
    rel = (table.values - f32.values).norm() / f32.values.norm()
    assert 0 < rel < 0.03, rel                                     # bfloat16 rounding, not other weights
    bits = key_bits(shallow.spec.vocab_size)
    perm = torch.randperm(len(table.keys), generator=torch.Generator().manual_seed(1))[:300]
    assert torch.equal(compute_entries(shallow.for_compute("bfloat16"), table.keys[perm], bits, torch.float32),
                       table.values[perm])
    with pytest.raises(SkipError, match="compute dtype"):
        shallow.for_compute("int8")
    with pytest.raises(ValueError, match="compute_dtype 'float16'"):
        dataclasses.replace(table.meta, compute_dtype="float16")

    def served(cache_dir):
        cfg = SkipConfig((SkipTableConfig("a", str(setup["shallow"]["a"]), str(bf16_table)),), route="table",
                         cache_dir=str(cache_dir))
        return MultiTenantModel(ModelConfig(backbone=BackboneConfig(path=str(setup["ckpt"]), device="cpu"),
                                            pool=tiny_pool_config(), skip=cfg))

    with caplog.at_level(logging.WARNING, logger="vbert.skip"):
        model = served(tmp_path / "misses")
    slow = [r.getMessage() for r in caplog.records if "emulates" in r.getMessage()]
    assert len(slow) == (0 if fast_bfloat16("cpu") else 1), slow        # this machine's CPU decides
    if slow:
        assert "'a' was computed in bfloat16" in slow[0] and "--compute-dtype auto" in slow[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vbert.skip"):
        skip_model(setup)                                                # a float32 table: never a warning
    assert not [r for r in caplog.records if "emulates" in r.getMessage()]
    unseen = sentences(12, 99, TINY_WORDS[::-1])
    out = model.forward(rows_of(model, unseen))
    computed = model.skip.stats()["a"]["computed"]
    assert computed > 0 and model.skip.stats()["a"]["compute_dtype"] == "bfloat16"
    model.skip.force = True
    for x, y in zip(out, model.forward(rows_of(model, unseen))):
        assert torch.equal(x.embedding, y.embedding)
    model.skip.force = False
    assert model.save_skip_caches() == {"a": computed}
    assert served(tmp_path / "misses").skip_cache_restored == {"a": computed}
    fp32 = skip_model(setup, cache_dir=tmp_path / "misses")       # the float32 table: not its entries
    assert "compute_dtype 'bfloat16'" in fp32.skip_cache_restored["a"]
    fp32.forward(rows_of(fp32, unseen))
    fp32.save_skip_caches()                                        # written as float32's ...
    assert served(tmp_path / "misses").skip_cache_restored["a"].endswith("this cache is for 'bfloat16'")
    f32_file = SkipRuntime.cache_file(tmp_path / "misses", "a")   # ... and a file from before compute dtypes
    with safe_open(str(f32_file), framework="pt") as f:            # (no compute_dtype field) counts as float32
        old = {k: f.get_tensor(k) for k in f.keys()}
        md = {k: v for k, v in f.metadata().items() if k != "compute_dtype"}
    save_file(old, str(f32_file), metadata=md)
    assert skip_model(setup, cache_dir=tmp_path / "misses").skip_cache_restored == {"a": old["keys"].numel()}
    with pytest.raises(ValueError, match="compute_dtype"):
        TableConfig(shallow=str(setup["shallow"]["a"]), corpus=(str(setup["corpus"]),), out=str(tmp_path / "x"),
                    compute_dtype="float64")


def test_fallback_mode_is_approximate_and_counted(setup):
    exact, approx = skip_model(setup), skip_model(setup, mode="fallback")
    unseen = sentences(8, 123, TINY_WORDS[::-1])
    e = exact.forward(rows_of(exact, unseen))
    a = approx.forward(rows_of(approx, unseen))
    stats = approx.skip.stats()["a"]
    assert stats["fallback"] > 0 and stats["computed"] == 0        # every unigram of the vocabulary is in the table
    assert any(not torch.allclose(x.embedding, y.embedding) for x, y in zip(e, a))
    sims = [float(torch.cosine_similarity(x.embedding, y.embedding, dim=0)) for x, y in zip(e, a)]
    assert min(sims) > 0.5


def test_rows_of_two_tables_share_one_batch(setup):
    both = skip_model(setup, names=("a", "b"))
    heads = (classify(3), tag(4))
    arts = [top_layers_artifact(both, kind, heads[i % 2], seed=i, skip_table=("a", "b", None)[i % 3])
            for i, kind in enumerate(["lora", "bottleneck", "lora", "bottleneck", "lora", "bottleneck"])]
    slots = [both.load_adapter(a) for a in arts]
    texts = sentences(6, 7)
    ids = both.tokenize(texts)
    mixed = both.forward([EncodeRow(ids[i], slots[i]) for i in range(6)])
    for name in ("a", "b"):                                         # each table alone, in its own model
        single = skip_model(setup, names=(name,))
        for i, art in enumerate(arts):
            if (art.skip_table or "a") != name:
                continue
            art_single = top_layers_artifact(single, ["lora", "bottleneck"][i % 2], heads[i % 2], seed=i)
            out = single.forward([EncodeRow(ids[i], single.load_adapter(art_single))])[0]
            torch.testing.assert_close(out.logits, mixed[i].logits, atol=1e-5, rtol=1e-5)
    tables_used = both.skip.stats()
    assert tables_used["a"]["tokens"] > 0 and tables_used["b"]["tokens"] > 0


def full_model(setup) -> MultiTenantModel:
    return MultiTenantModel(ModelConfig(backbone=BackboneConfig(path=str(setup["ckpt"]), device="cpu"),
                                        pool=tiny_pool_config()))


def test_choose_layers_takes_the_cheaper_way_per_row():
    costs = SkipCosts(chunk_s=0.010, edge_chunk_s=0.012, token_s={8: 1e-5, 128: 2e-5})
    assert costs.layer_token_s(68) == pytest.approx(1.5e-5)            # interpolated between measured lengths
    tokens = np.full(4, 128.0)
    none = np.zeros(4)
    assert not costs.choose_layers(none, none, tokens, 128).any()      # all in the table: the table
    # 2,000 misses per row: 8 chunks (80 ms) against 128 tokens x 20 us (2.6 ms) on the real layers
    many = np.full(4, 2000.0)
    assert costs.choose_layers(many, none, tokens, 128).all()
    # a few misses in each row share one chunk (10 ms) < 4 rows on the real layers (10.2 ms): the table
    few = np.full(4, 5.0)
    assert not costs.choose_layers(few, none, tokens, 128).any()
    # mixed: the row with the misses goes to the real layers, the others stay
    mixed = np.array([0.0, 3000.0, 0.0, 0.0])
    assert costs.choose_layers(mixed, none, tokens, 128).tolist() == [False, True, False, False]
    # a warm budget lets the table be dearer (it caches what it computes)
    one_row = np.array([300.0])
    assert costs.choose_layers(one_row, np.zeros(1), np.array([128.0]), 128).all()          # 20 ms vs 2.6 ms
    assert not costs.choose_layers(one_row, np.zeros(1), np.array([128.0]), 128, warm_budget=10).any()
    costs.observe("layers", seconds=128 * 4e-5, count=128, length=128, weight=1.0)
    assert costs.token_s[128] == pytest.approx(4e-5) and costs.token_s[8] == 1e-5
    costs.observe("chunk", seconds=0.04, count=2, weight=0.5)
    assert costs.chunk_s == pytest.approx(0.015)
    with pytest.raises(SkipError):
        SkipCosts(0.1, 0.1, {})


def test_costs_keep_each_compute_dtypes_miss_chunks_apart():
    costs = SkipCosts(chunk_s=0.001, edge_chunk_s=0.001, token_s={128: 2e-5}, compute_dtype="bfloat16",
                      other_chunks={"float32": [0.050, 0.060], "bfloat16": [9.0, 9.0]})
    assert costs.other_chunks == {"float32": [0.050, 0.060]}          # the measured dtype's own entry is chunk_s
    assert costs.chunks_s("bfloat16") == costs.chunks_s(None) == costs.chunks_s("float16") == (0.001, 0.001)
    assert costs.chunks_s("float32") == (0.050, 0.060)
    tokens, none = np.full(2, 128.0), np.zeros(2)
    misses = np.full(2, 200.0)             # one chunk a row: 1 ms in bfloat16, 50 ms in float32; the layers 2.6 ms
    assert not costs.choose_layers(misses, none, tokens, 128, dtype="bfloat16").any()
    assert costs.choose_layers(misses, none, tokens, 128, dtype="float32").all()
    costs.observe("chunk", seconds=0.02, count=1, weight=1.0, dtype="float32")
    costs.observe("edge_chunk", seconds=0.03, count=1, weight=1.0, dtype="float32")
    assert costs.chunks_s("float32") == (pytest.approx(0.02), pytest.approx(0.03)) and costs.chunk_s == 0.001
    costs.observe("chunk", seconds=0.004, count=2, weight=1.0, dtype="bfloat16")
    assert costs.chunk_s == pytest.approx(0.002) and costs.other_chunks["float32"][0] == pytest.approx(0.02)
    d = costs.to_dict()
    assert d["compute_dtype"] == "bfloat16" and d["other_chunks"] == {"float32": [pytest.approx(0.02),
                                                                                  pytest.approx(0.03)]}


def test_router_measures_and_refines_each_tables_compute_dtype_apart(setup, tmp_path):
    """A default float32 table and a bfloat16 one: start-up measures a chunk in each; a skip-trained adapter's rows
    on the bfloat16 table refine its entry, not the default table's chunk cost (which decides the routing)."""
    bf16 = tmp_path / "table-b-bf16.safetensors"
    build_table(TableConfig(shallow=str(setup["shallow"]["b"]), corpus=(str(setup["corpus"]),), out=str(bf16),
                            budget_mb=64, dtype="float32", compute_dtype="bfloat16", backbone=str(setup["ckpt"]),
                            show_progress=False), echo=lambda s: None)
    cfg = SkipConfig((SkipTableConfig("a", str(setup["shallow"]["a"]), str(setup["tables"]["a"])),
                      SkipTableConfig("b", str(setup["shallow"]["b"]), str(bf16))), miss_cache_entries=4096)
    model = MultiTenantModel(ModelConfig(backbone=BackboneConfig(path=str(setup["ckpt"]), device="cpu"),
                                         pool=tiny_pool_config(), skip=cfg))
    costs = model.skip.costs
    assert costs.compute_dtype == "float32" and set(costs.other_chunks) == {"bfloat16"}
    assert all(v > 0 for v in costs.other_chunks["bfloat16"]) and costs.chunk_s > 0
    assert model.info()["skip"]["costs"]["other_chunks"]["bfloat16"] == costs.other_chunks["bfloat16"]
    model.skip.costs = SkipCosts(chunk_s=1e-9, edge_chunk_s=1e-9, token_s={8: 1.0, 512: 1.0},
                                 other_chunks={"bfloat16": [5.0, 5.0]})
    slot = model.load_adapter(top_layers_artifact(model, "lora", classify(3), 8, skip_table="b"))
    model.forward(rows_of(model, sentences(8, 91, TINY_WORDS[::-1]), slot))       # unseen: table b computes misses
    assert model.skip.stats()["b"]["computed"] > 0 and model.skip.stats()["a"]["computed"] == 0
    assert model.skip.costs.other_chunks["bfloat16"][0] < 5.0 or model.skip.costs.other_chunks["bfloat16"][1] < 5.0
    assert model.skip.costs.chunk_s == 1e-9 and model.skip.costs.edge_chunk_s == 1e-9   # the default's untouched


def test_cost_route_sends_unseen_rows_to_the_real_lower_layers(setup):
    model = skip_model(setup, route="cost")
    costs = model.skip.costs                                         # calibrated at start-up
    assert costs.chunk_s > 0 and costs.edge_chunk_s > 0 and all(v > 0 for v in costs.token_s.values())
    assert max(costs.token_s) == model.max_length and model.info()["skip"]["costs"]["chunk_s"] == costs.chunk_s
    model.skip.timed = False
    model.skip.costs = SkipCosts(chunk_s=1.0, edge_chunk_s=1.0, token_s={8: 1e-6})   # misses: very dear
    full, table_only = full_model(setup), skip_model(setup, route="table")
    art = top_layers_artifact(model, "lora", classify(3), 5)
    slots = [m.load_adapter(art) for m in (model, full, table_only)]
    seen = setup["corpus"].read_text().splitlines()[:4]              # every trigram in the table
    unseen = sentences(4, 77, TINY_WORDS[::-1])
    texts = [t for pair in zip(seen, unseen) for t in pair]           # interleaved in one batch
    out = model.forward(rows_of(model, texts, slots[0]))
    want_full = full.forward(rows_of(full, texts, slots[1]))
    want_table = table_only.forward(rows_of(table_only, texts, slots[2]))
    for i, o in enumerate(out):
        want = want_table[i] if i % 2 == 0 else want_full[i]          # seen: the table; unseen: the full model
        torch.testing.assert_close(o.logits, want.logits, atol=1e-5, rtol=1e-5)
    stats = model.skip.stats()["a"]
    assert stats["rows_table"] == 4 and stats["rows_layers"] == 4 and stats["computed"] == 0
    assert stats["layer_tokens"] == sum(len(ids) for ids in model.tokenize(unseen))
    assert 0 < stats["coverage"] < 1 and stats["hit_rate"] == 1.0


def test_cost_route_keeps_adapters_trained_in_skip_mode_on_the_table(setup):
    model = skip_model(setup, route="cost")
    model.skip.timed = False
    model.skip.costs = SkipCosts(chunk_s=1.0, edge_chunk_s=1.0, token_s={8: 1e-6})   # misses: very dear
    table_only = skip_model(setup, route="table")
    trained = top_layers_artifact(model, "lora", classify(3), 6, skip_table="a")
    full_trained = top_layers_artifact(model, "lora", classify(3), 7)
    slots = [model.load_adapter(trained), model.load_adapter(full_trained)]
    ref = table_only.load_adapter(trained)
    unseen = sentences(4, 78, TINY_WORDS[::-1])
    ids = model.tokenize(unseen)
    out = model.forward([EncodeRow(ids[i], slots[i % 2]) for i in range(4)])
    want = table_only.forward([EncodeRow(ids[i], ref) for i in (0, 2)])
    for o, w in zip((out[0], out[2]), want):                         # the skip-trained rows: the table's output
        torch.testing.assert_close(o.logits, w.logits, atol=1e-5, rtol=1e-5)
    stats = model.skip.stats()["a"]
    assert stats["rows_table"] == 2 and stats["rows_layers"] == 2 and stats["computed"] > 0


def test_cost_route_learns_from_the_steps_it_times(setup):
    model = skip_model(setup, route="cost")
    model.skip.costs = SkipCosts(chunk_s=1e-9, edge_chunk_s=1e-9, token_s={8: 1.0, 512: 1.0})   # wrong: layers dear
    unseen = sentences(8, 55, TINY_WORDS[::-1])
    model.forward(rows_of(model, unseen))                            # misses computed (predicted free) and timed
    assert model.skip.costs.chunk_s > 1e-6                           # the measured chunk time replaced the guess
    assert model.skip.stats()["a"]["computed"] > 0


def test_layers_route_is_the_full_model(setup):
    model, full = skip_model(setup, route="layers"), full_model(setup)
    art = top_layers_artifact(model, "bottleneck", tag(4), 9)
    texts = sentences(5, 31)
    out = model.forward(rows_of(model, texts, model.load_adapter(art)))
    ref = full.forward(rows_of(full, texts, full.load_adapter(art)))
    for o, r in zip(out, ref):
        torch.testing.assert_close(o.logits, r.logits, atol=1e-5, rtol=1e-5)
    assert model.skip.stats()["a"]["rows_table"] == 0 and model.skip.costs is None


def test_route_settings_are_validated(setup):
    with pytest.raises(ValueError, match="skip route 'fast'"):
        SkipConfig((SkipTableConfig("a", str(setup["shallow"]["a"])),), route="fast")
    with pytest.raises(ValueError, match="warm_budget"):
        SkipConfig((SkipTableConfig("a", str(setup["shallow"]["a"])),), warm_budget=-1)


def test_a_float16_export_loads_checks_its_sha256_and_builds_its_own_table(setup, tmp_path):
    src = setup["shallow"]["a"]
    meta = export_shallow(src, tmp_path / "ship")
    assert meta.dtype == "float16" and len(meta.file_sha256) == 64
    assert (tmp_path / "ship" / "shallow.safetensors").stat().st_size < 0.6 * (src / "shallow.safetensors").stat().st_size
    model, loaded = load_shallow(tmp_path / "ship", setup["teacher"])   # same teacher check as the source
    original, _ = load_shallow(src)
    assert loaded == read_shallow_meta(tmp_path / "ship") and loaded.weights_hash != original.weights_hash()
    for (name, a), b in zip(model.state_dict().items(), original.state_dict().values()):
        assert torch.equal(a, b.half().float()), name                    # exactly the rounded weights
    with pytest.raises(SkipError, match="not empty"):
        export_shallow(src, tmp_path / "ship")
    table = tmp_path / "ship-table.safetensors"                          # a table from the export, served
    build_table(TableConfig(shallow=str(tmp_path / "ship"), corpus=(str(setup["corpus"]),), out=str(table),
                            budget_mb=64, dtype="float32", backbone=str(setup["ckpt"]), show_progress=False),
                echo=lambda s: None)
    served = MultiTenantModel(ModelConfig(backbone=BackboneConfig(path=str(setup["ckpt"]), device="cpu"),
                                          pool=tiny_pool_config(), skip=SkipConfig(
                                              (SkipTableConfig("a", str(tmp_path / "ship"), str(table)),),
                                              route="table")))
    texts = setup["corpus"].read_text().splitlines()[:5]
    served.forward(rows_of(served, texts))
    assert served.skip.stats()["a"]["hit_rate"] == 1.0
    with pytest.raises(TableError):                                      # the source's table does not fit it
        MultiTenantModel(ModelConfig(backbone=BackboneConfig(path=str(setup["ckpt"]), device="cpu"),
                                     pool=tiny_pool_config(), skip=SkipConfig(
                                         (SkipTableConfig("a", str(tmp_path / "ship"), str(setup["tables"]["a"])),))))
    weights = tmp_path / "ship" / "shallow.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(SkipError, match="sha256"):
        load_shallow(tmp_path / "ship")


def test_adapters_that_cannot_run_in_this_mode_are_refused(setup):
    model = skip_model(setup)
    full_model_adapter = make_artifact(model.spec.shape, "bottleneck", classify(2), 1, size=8)   # all layers
    with pytest.raises(AdapterError, match="layers \\[0, 1\\]"):
        model.load_adapter(full_model_adapter)
    with pytest.raises(AdapterError, match="skip table 'zzz'"):
        model.load_adapter(top_layers_artifact(model, "lora", classify(2), 2, skip_table="zzz"))
    full = MultiTenantModel(ModelConfig(backbone=BackboneConfig(path=str(setup["ckpt"]), device="cpu"),
                                        pool=tiny_pool_config()))
    with pytest.raises(AdapterError, match="trained in skip mode"):
        full.load_adapter(top_layers_artifact(full, "lora", classify(2), 3, skip_table="a"))


def test_mismatched_and_corrupt_tables_are_refused(setup, tmp_path):
    cfg = SkipConfig((SkipTableConfig("a", str(setup["shallow"]["b"]), str(setup["tables"]["a"])),))
    with pytest.raises(TableError, match="rebuild it"):            # table of a, shallow layers of b
        MultiTenantModel(ModelConfig(backbone=BackboneConfig(path=str(setup["ckpt"]), device="cpu"),
                                     pool=tiny_pool_config(), skip=cfg))
    damaged = tmp_path / "damaged.safetensors"
    data = bytearray(setup["tables"]["a"].read_bytes())
    data[-100] ^= 0xFF
    damaged.write_bytes(bytes(data))
    cfg = SkipConfig((SkipTableConfig("a", str(setup["shallow"]["a"]), str(damaged)),))
    with pytest.raises(TableError, match="corrupt"):
        MultiTenantModel(ModelConfig(backbone=BackboneConfig(path=str(setup["ckpt"]), device="cpu"),
                                     pool=tiny_pool_config(), skip=cfg))
    other = write_tiny_checkpoint(tmp_path / "other", seed=5)      # shallow layers of another teacher
    cfg = SkipConfig((SkipTableConfig("a", str(setup["shallow"]["a"]), str(setup["tables"]["a"])),))
    with pytest.raises(SkipError, match="other upper-layer weights"):
        MultiTenantModel(ModelConfig(backbone=BackboneConfig(path=str(other), device="cpu"),
                                     pool=tiny_pool_config(), skip=cfg))


def test_merge_uses_each_tokens_three_windows(setup):
    """A token's state comes from the trigrams centred on it and its two neighbours, so changing
    token 3 changes tokens 1..5 (each such trigram's slots all see the whole trigram), no others."""
    shallow, _ = load_shallow(setup["shallow"]["a"])
    ids = torch.tensor([[2, 10, 11, 12, 13, 14, 3]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    types = torch.zeros_like(ids)
    base = shallow(ids, types, mask)
    changed = ids.clone()
    changed[0, 3] = 20
    diff = (shallow(changed, types, mask) - base).abs().amax(-1)[0]
    assert (diff[1:6] > 1e-4).all()
    assert (diff[[0, 6]] == 0).all()
    keys = pack(trigram_ids(ids, mask, shallow.edge_id), key_bits(shallow.spec.vocab_size))
    assert keys.shape == ids.shape


def test_real_backbone_skip_mode_table_equals_computed(default_checkpoint, tmp_path):
    teacher = Encoder.from_checkpoint(default_checkpoint)
    shallow = ShallowModel.from_teacher(teacher, 3, teacher.spec.pad_token_id)
    save_shallow(shallow, tmp_path / "shallow", "all-MiniLM-L6-v2", teacher_upper_hash(teacher, 3))
    corpus = tmp_path / "c.txt"
    texts = ["The patient was treated for breast cancer.", "Gene expression increased in tumor cells.",
             "We show results of a new method."]
    corpus.write_text("\n".join(texts))
    build_table(TableConfig(shallow=str(tmp_path / "shallow"), corpus=(str(corpus),), out=str(tmp_path / "t.st"),
                            budget_mb=16, dtype="float16", show_progress=False), echo=lambda s: None)
    cfg = SkipConfig((SkipTableConfig("bio", str(tmp_path / "shallow"), str(tmp_path / "t.st")),))
    model = MultiTenantModel(ModelConfig(backbone=BackboneConfig(device="cpu"), skip=cfg))
    out = model.forward(rows_of(model, texts))
    assert model.skip.stats()["bio"]["hit_rate"] == 1.0
    model.skip.force = True
    for x, y in zip(out, model.forward(rows_of(model, texts))):
        assert torch.equal(x.embedding, y.embedding)


def test_the_shipped_shallow_layers_load_for_the_default_backbone_and_beat_their_undistilled_start(
        default_checkpoint, tmp_path):
    """The layers the project ships (vbert/assets): their sha256, weights hash and teacher hash check out against
    the default backbone, and in exact skip mode (every trigram computed, no table, every row on the table path)
    they reproduce the full model's sentence embeddings far better than the teacher's own lower layers run on
    trigrams (where distillation starts): proof that what is shipped is the distilled result."""
    from vbert.config import default_shallow_path

    teacher = Encoder.from_checkpoint(default_checkpoint)
    shipped, meta = load_shallow(default_shallow_path(), teacher)
    assert meta.dtype == "float16" and meta.skip_layers == 3 and meta.backbone == "all-MiniLM-L6-v2"
    start = ShallowModel.from_teacher(teacher, 3, teacher.spec.pad_token_id)
    save_shallow(start, tmp_path / "start", "all-MiniLM-L6-v2", teacher_upper_hash(teacher, 3))
    texts = ["Mutations in the BRCA1 gene increase the risk of breast and ovarian cancer.",
             "Patients were randomly assigned to receive either placebo or the study drug for twelve weeks.",
             "The kinase inhibitor reduced phosphorylation of the receptor in a dose-dependent manner.",
             "We propose a new method for citation intent classification in scientific papers.",
             "Hereditary deficiency of the enzyme leads to progressive neurological symptoms in children."]
    full = MultiTenantModel(ModelConfig(backbone=BackboneConfig(device="cpu")))
    want = torch.stack([o.embedding for o in full.forward(rows_of(full, texts))])

    def similarity(shallow_dir) -> float:
        cfg = SkipConfig((SkipTableConfig("d", str(shallow_dir), None),), route="table")
        model = MultiTenantModel(ModelConfig(backbone=BackboneConfig(device="cpu"), skip=cfg))
        got = torch.stack([o.embedding for o in model.forward(rows_of(model, texts))])
        return torch.nn.functional.cosine_similarity(got, want, dim=-1).mean().item()

    distilled, undistilled = similarity(default_shallow_path()), similarity(tmp_path / "start")
    assert distilled > 0.95 and distilled > undistilled + 0.3, (distilled, undistilled)   # measured: 0.98 vs 0.47


def _broadcast_attention(qkv, key_mask, num_heads):
    """The trigram attention as one broadcast [B, L, L, nh, d] product (how tables were computed before
    2026-12-07 08:00)."""
    bsz, seq, three_h = qkv.shape
    d = three_h // (3 * num_heads)
    parts = qkv.float().view(bsz, seq, 3, num_heads, d)
    q, k, v = parts[:, :, 0], parts[:, :, 1], parts[:, :, 2]
    scores = (q.unsqueeze(2) * k.unsqueeze(1)).sum(-1) / math.sqrt(d)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.reshape(bsz, 1, seq, 1), float("-inf"))
    ctx = (scores.softmax(dim=2).unsqueeze(-1) * v.unsqueeze(1)).sum(2)
    return ctx.reshape(bsz, seq, three_h // 3).to(qkv.dtype)


def test_short_attention_keeps_the_bits_of_the_broadcast_form(setup):
    """The key-by-key short attention gives bit for bit what the broadcast product gave, in float32 and bfloat16,
    with and without edge masks: entries of tables built before it and misses computed now stay identical."""
    layer = setup["teacher"].layers[0]
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(300, 3, 3 * setup["teacher"].spec.hidden_size, generator=g) * 3
    mask = torch.ones(300, 1, 1, 3, dtype=torch.bool)
    mask[::3, ..., 0] = False
    mask[1::4, ..., 2] = False
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            for m in (None, mask):
                got = layer._short_attention(qkv.to(dtype), m)
                assert torch.equal(got, _broadcast_attention(qkv.to(dtype), m, layer.num_heads)), (dtype, m is None)


def test_short_attention_equals_the_sdpa_kernel(setup):
    """The trigram path's broadcast attention (EncoderLayer short=True) computes what the SDPA kernel does, with
    and without a key mask (edge slots masked out), to float32 rounding."""
    layer = setup["teacher"].layers[0]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 3, setup["teacher"].spec.hidden_size, generator=g)
    mask = torch.ones(40, 1, 1, 3, dtype=torch.bool)
    mask[::3, ..., 0] = False
    mask[1::4, ..., 2] = False
    with torch.inference_mode():
        for m in (None, mask):
            torch.testing.assert_close(layer(x, m, None, short=True), layer(x, m, None), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(layer(x, mask, None, short=True), layer(x, None, None, short=True), atol=1e-3)
