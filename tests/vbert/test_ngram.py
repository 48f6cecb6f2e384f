from __future__ import annotations

import json
import struct
from collections import Counter

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vbert import ngram
from vbert.ngram import (KeyIndex, MissCache, TableError, TableMeta, count_kinds, count_ngrams, fallback_keys,
                         key_bits, load_table, pack, save_table, trigram_ids, unpack, weights_hash)

E = 0   # edge id (pad)


# ---------------------------------------------------------------------------------------------- keys

def test_key_bits():
    assert [key_bits(v) for v in (1, 2, 3, 4, 5, 30522, 1 << 20)] == [1, 1, 2, 2, 3, 15, 20]
    for bad in (0, (1 << 20) + 1, 1 << 30):
        with pytest.raises(ValueError):
            key_bits(bad)


@pytest.mark.parametrize("vocab", [2, 30522, 1 << 20])
def test_pack_unpack_round_trip_with_edge_and_max_ids(vocab):
    bits = key_bits(vocab)
    top = vocab - 1
    ids = torch.tensor([[E, E, E], [top, top, top], [E, 5 % vocab, top], [top, E, 1], [1, 1, E]])
    ids = torch.cat([ids, torch.randint(0, vocab, (197, 3))]).view(2, 101, 3)
    keys = pack(ids, bits)
    assert keys.shape == (2, 101) and keys.dtype == torch.int64
    assert bool((keys >= 0).all()) and int(keys.max()) < 1 << 62
    assert torch.equal(unpack(keys, bits), ids)
    assert int(pack(torch.tensor([top, top, top]), bits)) == (top << 2 * bits) | (top << bits) | top
    # distinct id triples -> distinct keys
    flat = ids.view(-1, 3)
    assert torch.unique(flat, dim=0).shape[0] == torch.unique(keys).numel()


def test_pack_rejects_wrong_last_dim():
    with pytest.raises(ValueError, match="last dimension"):
        pack(torch.zeros(4, 2, dtype=torch.long), 8)


def test_fallback_keys_match_packed_ids():
    bits, edge = 10, 3
    ids = torch.tensor([[7, 8, 9], [edge, 8, 9], [7, 8, edge], [1023, 1022, 1021]])
    left, right, uni = fallback_keys(pack(ids, bits), bits, edge)
    a, b, c = ids.unbind(-1)
    e = torch.full_like(a, edge)
    assert torch.equal(left, pack(torch.stack([a, b, e], -1), bits))
    assert torch.equal(right, pack(torch.stack([e, b, c], -1), bits))
    assert torch.equal(uni, pack(torch.stack([e, b, e], -1), bits))


def test_count_kinds():
    bits = 8
    keys = pack(torch.tensor([[1, 2, 3], [E, 2, 3], [1, 2, E], [E, 2, E], [E, 5, E]]), bits)
    assert count_kinds(keys, bits, E) == {"trigram": 1, "bigram": 2, "unigram": 2}


def test_trigram_ids_on_a_padded_batch():
    ids = torch.tensor([[101, 5, 6, 102, 0],
                        [101, 7, 102, 0, 0],
                        [101, 8, 9, 10, 102]])
    mask = ids != 0
    out = trigram_ids(ids, mask, E)
    expected = torch.tensor([
        [[E, 101, 5], [101, 5, 6], [5, 6, 102], [6, 102, E], [E, E, E]],
        [[E, 101, 7], [101, 7, 102], [7, 102, E], [E, E, E], [E, E, E]],
        [[E, 101, 8], [101, 8, 9], [8, 9, 10], [9, 10, 102], [10, 102, E]],
    ])
    assert out.dtype == torch.long
    assert torch.equal(out, expected)


def test_trigram_ids_masked_position_inside_a_row_is_an_edge_and_edge_id_is_used():
    ids = torch.tensor([[11, 12, 13, 14]])
    mask = torch.tensor([[True, False, True, True]])
    out = trigram_ids(ids, mask, edge_id=99)
    assert out.tolist() == [[[99, 11, 99], [99, 99, 99], [99, 13, 14], [13, 14, 99]]]
    empty = torch.zeros(2, 0, dtype=torch.long)
    assert trigram_ids(empty, empty.bool(), E).shape == (2, 0, 3)
    with pytest.raises(ValueError):
        trigram_ids(ids, mask[:, :3], E)


# ------------------------------------------------------------------------------------------ counting

def naive_counts(corpus, edge, bits):
    """One count per position for each distinct key among its trigram, left/right bigram and unigram."""
    counter = Counter()
    for sent in corpus:
        for i, b in enumerate(sent):
            a = sent[i - 1] if i > 0 else edge
            c = sent[i + 1] if i + 1 < len(sent) else edge
            keys = {(a, b, c), (a, b, edge), (edge, b, c), (edge, b, edge)}
            for t in keys:
                counter[(t[0] << 2 * bits) | (t[1] << bits) | t[2]] += 1
    return counter


CORPUS = [[101, 5, 6, 102], [101, 5, 6, 7, 102], [101, 7, 102], [], [4], [101, 5, 6, 102]]


def test_count_ngrams_matches_a_naive_counter_and_is_sorted():
    bits = key_bits(128)
    keys, counts = count_ngrams(CORPUS, E, bits)
    assert keys.dtype == np.int64 and counts.dtype == np.int64
    expected = naive_counts(CORPUS, E, bits)
    assert dict(zip(keys.tolist(), counts.tolist())) == dict(expected)
    assert len(set(keys.tolist())) == len(keys)

    def k(a, b, c):
        return int(pack(torch.tensor([a, b, c]), bits))
    got = dict(zip(keys.tolist(), counts.tolist()))
    assert got[k(101, 5, 6)] == 3                          # trigram in 3 sentences
    assert got[k(E, 101, 5)] == 3                          # first token: trigram == right bigram, once
    assert got[k(E, 5, E)] == 3                            # unigram of 5 (never at an edge)
    assert got[k(E, 102, E)] == 4                          # last tokens: unigram == right bigram, once
    assert got[k(E, 4, E)] == 1                            # one-token sentence: all four keys coincide
    assert got[k(E, 6, 102)] == 2 and got[k(5, 6, E)] == 3
    # by count descending, then key ascending
    order = sorted(zip(keys.tolist(), counts.tolist()), key=lambda kc: (-kc[1], kc[0]))
    assert list(zip(keys.tolist(), counts.tolist())) == order
    assert counts[0] == max(expected.values())


def test_count_ngrams_chunked_merge_equals_one_chunk(monkeypatch):
    rng = np.random.default_rng(0)
    corpus = [rng.integers(1, 40, size=rng.integers(0, 12)) for _ in range(300)]
    bits = key_bits(40)
    one = count_ngrams(corpus, E, bits)
    monkeypatch.setattr(ngram, "_COUNT_CHUNK_TOKENS", 7)           # many chunks and merges
    many = count_ngrams((s.tolist() for s in corpus), E, bits, show_progress=True)
    assert np.array_equal(one[0], many[0]) and np.array_equal(one[1], many[1])
    expected = naive_counts([s.tolist() for s in corpus], E, bits)
    assert dict(zip(one[0].tolist(), one[1].tolist())) == dict(expected)


def test_count_ngrams_edge_cases():
    keys, counts = count_ngrams([], E, 4)
    assert keys.shape == (0,) and counts.shape == (0,)
    with pytest.raises(ValueError, match="token ids"):
        count_ngrams([[1, 16]], E, 4)
    with pytest.raises(ValueError, match="edge_id"):
        count_ngrams([[1]], 16, 4)


# ------------------------------------------------------------------------------------------- indexes

@pytest.fixture(scope="module")
def random_keys():
    g = torch.Generator().manual_seed(0)
    keys = torch.unique(torch.randint(0, 1 << 62, (50_000,), generator=g))
    keys = keys[torch.randperm(keys.numel(), generator=g)]
    present = keys[torch.randint(0, keys.numel(), (50_000,), generator=g)]
    absent = torch.randint(0, 1 << 62, (50_000,), generator=g)
    queries = torch.cat([present, absent, torch.tensor([-1, 0, (1 << 63) - 1])])
    queries = queries[torch.randperm(queries.numel(), generator=g)]
    return keys, queries


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_key_index_agrees_with_a_dict(random_keys, backend):
    keys, queries = random_keys
    ref = {k: i for i, k in enumerate(keys.tolist())}
    index = KeyIndex.build(keys, backend)
    assert index.backend == backend and index.device == torch.device("cpu") and len(index) == keys.numel()
    got = index.find(queries)
    assert got.dtype == torch.int64 and got.shape == queries.shape
    assert got.tolist() == [ref.get(q, -1) for q in queries.tolist()]
    hits = int((got >= 0).sum())
    assert 45_000 < hits < 55_000
    # any shape
    q2 = queries[:60_000].view(3, 4, 5000)
    assert torch.equal(index.find(q2), got[:60_000].view(3, 4, 5000))
    assert index.find(queries[:0]).shape == (0,)
    assert index.nbytes() >= 2 * 8 * keys.numel()


def test_key_index_backends_auto_empty_duplicates_and_bad_queries():
    keys = torch.tensor([5, -3, 1 << 40])
    assert KeyIndex.build(keys).backend == "numba"
    for backend in ("numba", "torch"):
        index = KeyIndex.build(torch.zeros(0, dtype=torch.int64), backend)
        assert len(index) == 0
        assert index.find(torch.tensor([[0, 1], [2, 3]])).tolist() == [[-1, -1], [-1, -1]]
        assert KeyIndex.build(keys, backend).find(torch.tensor([1 << 40, -3, 5, 6])).tolist() == [2, 1, 0, -1]
        with pytest.raises(ValueError, match="duplicate key 7"):
            KeyIndex.build(torch.tensor([1, 7, 3, 7]), backend)
        with pytest.raises(ValueError, match="int64"):
            KeyIndex.build(keys.int(), backend)
        with pytest.raises(ValueError, match="int64"):
            KeyIndex.build(keys, backend).find(torch.tensor([5], dtype=torch.int32))
    with pytest.raises(ValueError, match="backend"):
        KeyIndex.build(keys, "python")


# ---------------------------------------------------------------------------------------- miss cache

@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_miss_cache_fifo(backend):
    cache = MissCache(4, (3, 2), torch.float32, "cpu", backend)
    assert cache.values.shape == (4, 3, 2)

    def vals(keys):
        return torch.tensor(keys, dtype=torch.float32).view(-1, 1, 1).expand(-1, 3, 2)

    assert cache.insert(torch.tensor([10, 11, 12]), vals([10, 11, 12])).tolist() == [0, 1, 2]
    slots = cache.find(torch.tensor([12, 10, 99]))
    assert slots.tolist() == [2, 0, -1]
    assert torch.equal(cache.values[slots[:2]], vals([12, 10]))
    assert cache.stats() == {"size": 3, "capacity": 4, "inserts": 3, "evictions": 0}
    # 13 fills slot 3, 14 evicts the oldest (10 in slot 0)
    assert cache.insert(torch.tensor([13, 14]), vals([13, 14])).tolist() == [3, 0]
    assert cache.find(torch.tensor([10, 11, 12, 13, 14])).tolist() == [-1, 1, 2, 3, 0]
    assert cache.stats() == {"size": 4, "capacity": 4, "inserts": 5, "evictions": 1}
    # then 11 and 12 go, in that order
    assert cache.insert(torch.tensor([15]), vals([15])).tolist() == [1]
    assert cache.find(torch.tensor([11, 12, 15])).tolist() == [-1, 2, 1]
    # n > capacity: only the last 4 are kept, in slots continuing the ring
    got = cache.insert(torch.tensor([20, 21, 22, 23, 24, 25]), vals([20, 21, 22, 23, 24, 25]))
    assert got.tolist() == [-1, -1, 2, 3, 0, 1]
    got = cache.find(torch.tensor([20, 21, 22, 23, 24, 25, 13, 14, 15]))
    assert got.tolist() == [-1, -1, 2, 3, 0, 1, -1, -1, -1]
    assert torch.equal(cache.values[torch.tensor([2, 3, 0, 1])], vals([22, 23, 24, 25]))
    assert cache.stats() == {"size": 4, "capacity": 4, "inserts": 10, "evictions": 6}
    with pytest.raises(ValueError, match="already cached"):
        cache.insert(torch.tensor([24]), vals([24]))
    with pytest.raises(ValueError, match="unique"):
        cache.insert(torch.tensor([30, 30]), vals([30, 30]))
    with pytest.raises(ValueError):
        cache.insert(torch.tensor([31]), torch.zeros(1, 2, 2))
    assert cache.find(torch.tensor([30, 31])).tolist() == [-1, -1]
    assert cache.insert(torch.tensor([], dtype=torch.long), vals([])).tolist() == []
    cache.clear()
    assert cache.find(torch.tensor([22, 23, 24, 25])).tolist() == [-1, -1, -1, -1]
    assert cache.stats()["size"] == 0
    assert cache.insert(torch.tensor([24]), vals([24])).tolist() == [0]
    with pytest.raises(ValueError):
        MissCache(0, (3, 2), torch.float32, "cpu")


# --------------------------------------------------------------------------------------------- files

WHASH = "a" * 64


def make_table(dtype=torch.float32, n=500, hidden=8, bits=15):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 1 << bits, (n, 3), generator=g)
    ids[: n // 5, 0] = E
    ids[n // 10: n // 3, 2] = E
    keys = torch.unique(pack(ids, bits))
    keys = keys[torch.randperm(keys.numel(), generator=g)]
    values = torch.randn(keys.numel(), 3, hidden, generator=g).to(dtype)
    meta = TableMeta(WHASH, E, bits, hidden, str(dtype).removeprefix("torch."), keys.numel(),
                     count_kinds(keys, bits, E), {"corpus": "tiny", "backbone": "test"})
    return keys, values, meta


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_save_load_round_trip(tmp_path, dtype):
    keys, values, meta = make_table(dtype)
    assert meta.kinds["bigram"] > 0 and meta.kinds["trigram"] > 0
    path = tmp_path / "table.safetensors"
    save_table(path, keys, values, meta)
    assert [p.name for p in tmp_path.iterdir()] == ["table.safetensors"]
    for backend in ("auto", "torch"):
        table = load_table(path, weights_hash=WHASH, backend=backend)
        assert torch.equal(table.keys, keys) and torch.equal(table.values, values)
        assert table.values.dtype == dtype and table.meta == meta and table.path == path
        assert table.index.backend == ("numba" if backend == "auto" else backend)
        probe = torch.cat([keys[[3, 0, 7]], torch.tensor([1 << 50])]).view(2, 2)
        pos, hit = table.lookup(probe)
        assert pos.tolist() == [[3, 0], [7, -1]] and hit.tolist() == [[True, True], [True, False]]
        assert table.nbytes() >= keys.nbytes + values.nbytes
    assert load_table(path, weights_hash=None).meta.extra == {"corpus": "tiny", "backbone": "test"}


def data_offset(path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def test_flipped_data_byte_is_refused_as_corrupt(tmp_path):
    keys, values, meta = make_table(torch.float16)
    path = tmp_path / "t.safetensors"
    save_table(path, keys, values, meta)
    raw = bytearray(path.read_bytes())
    at = (data_offset(path) + len(raw)) // 2
    raw[at] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(TableError, match="corrupt") as e:
        load_table(path, weights_hash=WHASH)
    assert str(path) in str(e.value)
    load_table(path, weights_hash=WHASH, verify=False)          # the sha check is what catches it


def test_truncated_missing_and_foreign_files(tmp_path):
    keys, values, meta = make_table()
    path = tmp_path / "t.safetensors"
    save_table(path, keys, values, meta)
    raw = path.read_bytes()
    for cut in (len(raw) - 100, 40, 3, 0):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(raw[:cut])
        with pytest.raises(TableError, match=str(bad)):
            load_table(bad, weights_hash=None)
    with pytest.raises(TableError, match="no such file"):
        load_table(tmp_path / "absent.safetensors", weights_hash=None)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"keys": keys}, str(foreign), metadata={"format": "something-else"})
    with pytest.raises(TableError, match="format"):
        load_table(foreign, weights_hash=None)
    # right format, tensors disagreeing with the metadata
    md = {"format": ngram.FORMAT, **ngram._meta_to_strings(meta), "sha256": "0"}
    odd = tmp_path / "odd.safetensors"
    save_file({"keys": keys, "values": values[:, :2].contiguous()}, str(odd), metadata=md)
    with pytest.raises(TableError, match="values"):
        load_table(odd, weights_hash=None)
    save_file({"keys": keys}, str(odd), metadata=md)
    with pytest.raises(TableError, match="missing tensors"):
        load_table(odd, weights_hash=None)
    save_file({"keys": keys, "values": values}, str(odd), metadata={**md, "bits": json.dumps("x")})
    with pytest.raises(TableError, match="metadata"):
        load_table(odd, weights_hash=None)


def test_other_weights_hash_is_refused_naming_both(tmp_path):
    keys, values, meta = make_table()
    path = tmp_path / "t.safetensors"
    save_table(path, keys, values, meta)
    other = "b" * 64
    with pytest.raises(TableError) as e:
        load_table(path, weights_hash=other)
    msg = str(e.value)
    assert WHASH in msg and other in msg and str(path) in msg and "vbert build-table" in msg


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    keys, values, meta = make_table()
    path = tmp_path / "t.safetensors"
    bad = [
        (keys, values[:, :2], meta),                            # values shape
        (keys, values.half(), meta),                            # dtype
        (keys[:-1], values[:-1], meta),                         # num_entries
        (torch.cat([keys[:-1], keys[:1]]), values, meta),       # duplicate key
        (keys, values.index_fill(0, torch.tensor([2]), float("nan")), meta),
    ]
    for k, v, m in bad:
        with pytest.raises(ValueError):
            save_table(path, k, v, m)
    with pytest.raises(ValueError, match="kinds"):
        all_trigrams = {"trigram": meta.num_entries, "bigram": 0, "unigram": 0}
        save_table(path, keys, values, TableMeta(WHASH, E, meta.bits, meta.hidden_size, "float32",
                                                 meta.num_entries, all_trigrams))
    assert list(tmp_path.iterdir()) == []
    # a failure while writing also leaves no temporary file, and keeps a previous table intact
    save_table(path, keys, values, meta)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(ngram, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_table(path, keys, values, meta)
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"] and path.read_bytes() == before


def test_table_meta_validation():
    with pytest.raises(ValueError, match="dtype"):
        TableMeta(WHASH, E, 8, 4, "int8", 0, {"trigram": 0, "bigram": 0, "unigram": 0})
    with pytest.raises(ValueError, match="kinds"):
        TableMeta(WHASH, E, 8, 4, "float32", 2, {"trigram": 1, "bigram": 0, "unigram": 0})
    with pytest.raises(ValueError, match="edge_id"):
        TableMeta(WHASH, 256, 8, 4, "float32", 0, {"trigram": 0, "bigram": 0, "unigram": 0})


def test_weights_hash_is_stable_and_sensitive():
    g = torch.Generator().manual_seed(2)
    state = {"layer.0.weight": torch.randn(4, 3, generator=g), "layer.0.bias": torch.randn(4, generator=g),
             "emb": torch.randn(5, 2, generator=g).half()}
    h = weights_hash(state)
    assert len(h) == 64 and int(h, 16) >= 0
    assert weights_hash({k: v.clone() for k, v in reversed(list(state.items()))}) == h
    assert weights_hash({k: v.t().contiguous().t() for k, v in state.items()}) == h   # layout does not matter
    changed = {k: v.clone() for k, v in state.items()}
    changed["layer.0.bias"][2] += 1e-3
    assert weights_hash(changed) != h
    assert weights_hash({**state, "emb": state["emb"].float()}) != h                  # dtype
    assert weights_hash({**state, "layer.0.bias": state["layer.0.bias"].view(2, 2)}) != h   # shape
    assert weights_hash({"renamed" if k == "emb" else k: v for k, v in state.items()}) != h


@pytest.mark.gpu
def test_cuda_paths_match_cpu(tmp_path):
    dev = torch.device("cuda")
    ids = torch.tensor([[101, 5, 6, 102, 0], [101, 7, 102, 0, 0]])
    tri = trigram_ids(ids.to(dev), (ids != 0).to(dev), E)
    assert tri.is_cuda and torch.equal(tri.cpu(), trigram_ids(ids, ids != 0, E))
    assert torch.equal(pack(tri, 8).cpu(), pack(tri.cpu(), 8))
    keys, values, meta = make_table(torch.float16)
    path = tmp_path / "t.safetensors"
    save_table(path, keys, values, meta)
    table = load_table(path, weights_hash=WHASH, device="cuda")
    assert table.index.backend == "torch" and table.values.is_cuda
    queries = torch.cat([keys[:1000], torch.randint(0, 1 << 45, (1000,))])
    pos, hit = table.lookup(queries.to(dev))
    assert torch.equal(pos.cpu(), KeyIndex.build(keys, "numba").find(queries))
    with pytest.raises(ValueError, match="numba"):
        load_table(path, weights_hash=WHASH, device="cuda", backend="numba")
    cache = MissCache(2, (3, 4), torch.float16, "cuda")
    slots = cache.insert(torch.tensor([1, 2, 3], device=dev), torch.ones(3, 3, 4, device=dev))
    assert slots.tolist() == [-1, 0, 1]
    assert cache.find(torch.tensor([1, 2, 3], device=dev)).tolist() == [-1, 0, 1]


def test_miss_cache_saves_oldest_first_and_restores_what_fits(tmp_path):
    def vals(keys):
        return torch.tensor(keys, dtype=torch.float32).view(-1, 1, 1).expand(-1, 3, 2).contiguous()

    cache = MissCache(4, (3, 2), torch.float32, "cpu")
    cache.insert(torch.tensor([10, 11, 12]), vals([10, 11, 12]))
    cache.insert(torch.tensor([13, 14]), vals([13, 14]))            # wraps: 10 evicted, 14 in slot 0
    keys, values = cache.entries()
    assert keys.tolist() == [11, 12, 13, 14] and torch.equal(values, vals([11, 12, 13, 14]))
    path = tmp_path / "a.misses.safetensors"
    assert cache.save(path, {"weights_hash": "w1"}) == 4
    assert not list(tmp_path.glob(".*.tmp"))                         # written atomically, nothing left over
    again = MissCache(8, (3, 2), torch.float32, "cpu")
    assert again.restore(path, {"weights_hash": "w1"}) == 4
    assert torch.equal(again.values[again.find(torch.tensor([11, 12, 13, 14]))], vals([11, 12, 13, 14]))
    small = MissCache(2, (3, 2), torch.float32, "cpu")                # a smaller cache keeps the newest
    assert small.restore(path, {"weights_hash": "w1"}) == 2
    assert small.find(torch.tensor([11, 12, 13, 14])).ge(0).tolist() == [False, False, True, True]
    with pytest.raises(ValueError, match="empty cache"):
        small.restore(path, {"weights_hash": "w1"})


def test_miss_cache_refuses_a_file_for_other_weights_or_shapes_and_changes_nothing(tmp_path):
    cache = MissCache(4, (3, 2), torch.float32, "cpu")
    cache.insert(torch.tensor([1, 2]), torch.ones(2, 3, 2))
    path = tmp_path / "c.safetensors"
    cache.save(path, {"weights_hash": "w1"})
    cases = [(MissCache(4, (3, 2), torch.float32, "cpu"), {"weights_hash": "w2"}, "weights_hash"),
             (MissCache(4, (3, 4), torch.float32, "cpu"), {"weights_hash": "w1"}, "this cache keeps"),
             (MissCache(4, (3, 2), torch.float16, "cpu"), {"weights_hash": "w1"}, "this cache keeps")]
    for other, meta, message in cases:
        with pytest.raises(ValueError, match=message):
            other.restore(path, meta)
        assert other.stats()["size"] == 0
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(ValueError, match="unreadable"):
        MissCache(4, (3, 2), torch.float32, "cpu").restore(truncated, {"weights_hash": "w1"})
    table_file = tmp_path / "not-a-cache.safetensors"
    save_file({"keys": torch.tensor([1]), "values": torch.ones(1, 3, 2)}, str(table_file), metadata={"format": "x"})
    with pytest.raises(ValueError, match="not a miss cache"):
        MissCache(4, (3, 2), torch.float32, "cpu").restore(table_file, {"weights_hash": "w1"})
    dup = tmp_path / "dup.safetensors"
    save_file({"keys": torch.tensor([1, 1]), "values": torch.ones(2, 3, 2)}, str(dup),
              metadata={"format": ngram.MISS_CACHE_FORMAT, "weights_hash": "w1"})
    with pytest.raises(ValueError, match="duplicate"):
        MissCache(4, (3, 2), torch.float32, "cpu").restore(dup, {"weights_hash": "w1"})
