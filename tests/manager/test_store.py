"""The adapter store on real files: canonical encoding, validation before anything is written,
atomic and idempotent puts, corruption detection, crash recovery, concurrent puts."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from manager.config import StoreConfig
from manager.errors import CorruptAdapterError, FailedPreconditionError, InvalidArgumentError, NotFoundError
from manager.codec import METADATA_KEY, decode_artifact, encode_artifact
from manager.store import AdapterStore, RecoveryReport, StoredAdapter
from tests.conftest import classify, embed_head, make_artifact, tag, tiny_pool_config
from vbert import AdapterArtifact, BackboneShape, EncodeRow, Head, HeadKind, HeadSpec
from vbert.adapters import LoraWeights
from vbert.backbone import BackboneSpec

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shape(tiny_checkpoint) -> BackboneShape:
    return BackboneSpec.from_checkpoint(tiny_checkpoint).shape


@pytest.fixture
def pool_config():
    return tiny_pool_config()


@pytest.fixture
def store(tmp_path) -> AdapterStore:
    return AdapterStore(StoreConfig(data_dir=str(tmp_path / "var")))


def mixed_lora(shape, head=None, seed=9) -> AdapterArtifact:
    """LoRA with per-module ranks and scales and the rsLoRA flag (PEFT rank_pattern / alpha_pattern)."""
    art = make_artifact(shape, "lora", head or tag(3), seed, rank=6, targets=("query", "value", "ffn_in"))
    g = torch.Generator().manual_seed(seed + 100)
    h = shape.hidden_size
    art.adapter.modules[(0, "query")] = LoraWeights(torch.randn(3, h, generator=g) * 0.2,
                                                    torch.randn(h, 3, generator=g) * 0.2, 0.7)
    art.adapter.use_rslora = True
    return art


ARTIFACTS = {
    "lora-classify": lambda s: make_artifact(s, "lora", classify(3), 1, rank=2),
    "lora-mixed-ranks-tag": lambda s: mixed_lora(s),
    "lora-embed-top-layers": lambda s: make_artifact(s, "lora", embed_head("cls", True), 3, rank=4,
                                                     targets=("query", "value"), layers=(1, 2)),
    "lora-classify-pooler": lambda s: make_artifact(s, "lora", classify(2, "pooler"), 4, rank=1),
    "bottleneck-classify": lambda s: make_artifact(s, "bottleneck", classify(7, "cls"), 5, size=4),
    "bottleneck-tag-top2": lambda s: make_artifact(s, "bottleneck", tag(2), 6, size=16, top_layers=2),
    "bottleneck-embed": lambda s: make_artifact(s, "bottleneck", embed_head("mean", False), 7, size=8,
                                                top_layers=1),
    "bottleneck-ffn-out": lambda s: make_artifact(s, "bottleneck", classify(3), 12, size=8, placement="ffn_out"),
    "bottleneck-both": lambda s: make_artifact(s, "bottleneck", tag(3), 13, size=4, top_layers=2, placement="both"),
    "none-classify": lambda s: make_artifact(s, "none", classify(4), 8),
    "none-tag": lambda s: make_artifact(s, "none", tag(5), 10),
    "none-embed": lambda s: make_artifact(s, "none", embed_head("cls", True), 11),
}


def assert_same_artifact(a: AdapterArtifact, b: AdapterArtifact) -> None:
    assert a.kind == b.kind
    assert a.head.spec == b.head.spec
    for x, y in ((a.head.weight, b.head.weight), (a.head.bias, b.head.bias)):
        assert (x is None) == (y is None)
        if x is not None:
            assert y.dtype == torch.float32 and torch.equal(x, y)
    if a.kind == "lora":
        assert (a.adapter.rank, a.adapter.alpha, a.adapter.use_rslora) == \
               (b.adapter.rank, b.adapter.alpha, b.adapter.use_rslora)
        assert set(a.adapter.modules) == set(b.adapter.modules)
        for key, w in a.adapter.modules.items():
            v = b.adapter.modules[key]
            assert torch.equal(w.A, v.A) and torch.equal(w.B, v.B) and w.scale == v.scale, key
    elif a.kind == "bottleneck":
        assert a.adapter.size == b.adapter.size and a.adapter.placement == b.adapter.placement
        pa, pb = a.adapter.positions(), b.adapter.positions()
        assert {p: set(ws) for p, ws in pa.items()} == {p: set(ws) for p, ws in pb.items()}
        for position, ws in pa.items():
            for layer, w in ws.items():
                v = pb[position][layer]
                for x, y in ((w.down_w, v.down_w), (w.down_b, v.down_b), (w.up_w, v.up_w), (w.up_b, v.up_b)):
                    assert torch.equal(x, y), (position, layer)
    else:
        assert b.adapter is None


def tree(root: Path) -> list[str]:
    """Every path under root (files and directories), relative."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# -- encoding ------------------------------------------------------------------------------------------

def test_bottleneck_placement_is_encoded_only_when_not_the_original(shape):
    """attn_out (the original placement) leaves the encoding as it was, so older blobs keep their
    bytes and sha; ffn_out is recorded and survives the round trip."""
    plain = make_artifact(shape, "bottleneck", classify(2), 1, size=4)
    _, config = encode_artifact(plain)
    assert "placement" not in config["bottleneck"]
    placed = make_artifact(shape, "bottleneck", classify(2), 1, size=4, placement="ffn_out")
    data, config = encode_artifact(placed)
    assert config["bottleneck"]["placement"] == "ffn_out"
    assert decode_artifact(data, config).adapter.placement == "ffn_out"
    assert encode_artifact(plain)[0] != data   # same tensors, other placement: other bytes, other sha


@pytest.mark.parametrize("name", list(ARTIFACTS))
def test_encode_decode_round_trip(shape, name):
    art = ARTIFACTS[name](shape)
    data, config = encode_artifact(art)
    assert config["kind"] == art.kind and config["num_bytes"] == len(data)
    assert config["head"] == art.head.spec.to_json()
    assert_same_artifact(art, decode_artifact(data, json.loads(json.dumps(config))))


def test_encoding_records_per_module_rank_scale_and_names(shape):
    art = mixed_lora(shape)
    data, config = encode_artifact(art)
    lora = config["lora"]
    assert lora["rank"] == 6 and lora["use_rslora"] is True and lora["alpha"] == 12.0
    q0 = [m for m in lora["modules"] if (m["layer"], m["target"]) == (0, "query")]
    assert q0 == [{"layer": 0, "target": "query", "rank": 3, "scale": 0.7}]
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    names = sorted(k for k in header if k != "__metadata__")
    assert "lora.0.query.A" in names and "lora.2.ffn_in.B" in names and "head.weight" in names
    assert header["lora.0.query.A"]["shape"] == [3, shape.hidden_size]
    assert all(header[k]["dtype"] == "F32" for k in names)
    assert config["num_tensors"] == len(names) == 2 * 3 * 3 + 2


def test_sha_is_deterministic_and_covers_all_content(shape):
    art = mixed_lora(shape)
    sha = encode_artifact(art)[1]["sha256"]
    assert encode_artifact(copy.deepcopy(art))[1]["sha256"] == sha
    # dict insertion order and non-contiguous / half inputs do not matter
    shuffled = copy.deepcopy(art)
    shuffled.adapter.modules = dict(reversed(list(shuffled.adapter.modules.items())))
    assert encode_artifact(shuffled)[1]["sha256"] == sha
    half = make_artifact(shape, "none", classify(3), 1)
    half.head.weight = half.head.weight.half()
    as_float = AdapterArtifact(None, Head(half.head.spec, half.head.weight.float(), half.head.bias))
    assert encode_artifact(half)[1]["sha256"] == encode_artifact(as_float)[1]["sha256"]

    def variant(edit):
        a = copy.deepcopy(art)
        edit(a)
        return encode_artifact(a)[1]["sha256"]

    w = art.adapter.modules[(0, "query")]
    shas = {
        sha,
        variant(lambda a: a.adapter.modules.__setitem__((0, "query"), LoraWeights(w.A, w.B, 0.71))),
        variant(lambda a: a.adapter.modules[(1, "value")].A.add_(1e-6)),
        variant(lambda a: setattr(a.adapter, "use_rslora", False)),
        variant(lambda a: setattr(a.adapter, "alpha", 13.0)),
        variant(lambda a: setattr(a.head, "spec", HeadSpec(HeadKind.TAG, ("X0", "X1", "X2")))),
    }
    assert len(shas) == 6


def test_sha_is_the_same_in_another_process(shape):
    code = ("from tests.manager.test_store import mixed_lora; from manager.codec import encode_artifact;"
            "from vbert import BackboneShape;"
            f"print(encode_artifact(mixed_lora(BackboneShape({shape.hidden_size}, {shape.intermediate_size}, "
            f"{shape.num_layers})))[1]['sha256'])")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == encode_artifact(mixed_lora(shape))[1]["sha256"]


# -- put / get -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(ARTIFACTS))
def test_put_get_round_trip(store, shape, pool_config, name):
    art = ARTIFACTS[name](shape)
    stored = store.put(art, shape, pool_config)
    assert isinstance(stored, StoredAdapter) and stored.kind == art.kind
    assert store.exists(stored.sha256) and store.list_shas() == {stored.sha256}
    assert_same_artifact(art, store.get(stored.sha256))
    store.verify(stored.sha256)


def test_files_are_in_place_without_temp_leftovers(store, shape, pool_config):
    stored = store.put(mixed_lora(shape), shape, pool_config)
    sha = stored.sha256
    d = store.root / sha[:2]
    assert store.root == Path(store.config.data_dir) / "adapters"
    assert tree(store.root) == sorted([sha[:2], f"{sha[:2]}/{sha}.json", f"{sha[:2]}/{sha}.safetensors"])
    data = (d / f"{sha}.safetensors").read_bytes()
    assert hashlib.sha256(data).hexdigest() == sha
    config = json.loads((d / f"{sha}.json").read_text())
    assert config == stored.config and config["sha256"] == sha and config["num_bytes"] == len(data)
    assert store.size(sha) == stored.size == len(data)


def test_put_is_idempotent_and_does_not_rewrite(store, shape, pool_config):
    art = make_artifact(shape, "bottleneck", classify(3), 2, size=4)
    first = store.put(art, shape, pool_config)
    paths = store.paths(first.sha256)
    before = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in paths]
    again = store.put(copy.deepcopy(art), shape, pool_config)
    assert again == first
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in paths] == before
    other = store.put(make_artifact(shape, "bottleneck", classify(3), 3, size=4), shape, pool_config)
    assert other.sha256 != first.sha256 and store.list_shas() == {first.sha256, other.sha256}


def invalid_artifact(s: BackboneShape, name: str) -> AdapterArtifact:
    """An artifact with one defect, for the tiny backbone shape s and tiny_pool_config() limits."""
    wider = BackboneShape(s.hidden_size + 16, s.intermediate_size, s.num_layers)
    deeper = BackboneShape(s.hidden_size, s.intermediate_size, s.num_layers + 1)
    if name == "wrong hidden size":
        return make_artifact(wider, "lora", classify(2), 1, rank=2)
    if name == "head hidden size":
        return make_artifact(wider, "none", classify(2), 1)
    if name == "too many layers":
        return make_artifact(deeper, "bottleneck", classify(2), 1, size=4)
    if name == "rank above limit":
        return make_artifact(s, "lora", classify(2), 1, rank=9)
    if name == "bottleneck above limit":
        return make_artifact(s, "bottleneck", classify(2), 1, size=17)
    if name == "too many labels":
        return make_artifact(s, "none", classify(9), 1)
    if name == "nan":
        art = make_artifact(s, "lora", classify(2), 1, rank=2)
        art.adapter.modules[(1, "key")].B[0, 0] = float("nan")
    elif name == "inf":
        art = make_artifact(s, "bottleneck", tag(2), 1, size=4)
        art.adapter.layer_weights[2].up_b[3] = float("inf")
    elif name == "float64":
        art = make_artifact(s, "none", classify(2), 1)
        art.head.bias = art.head.bias.double()
    elif name == "embed head with weights":
        art = make_artifact(s, "none", embed_head(), 1)
        art.head.weight = torch.zeros(1, s.hidden_size)
    return art


INVALID = {
    "wrong hidden size": "lora layer 0 query lora_A: shape (2, 48) does not match expected (2, 32)",
    "head hidden size": "head weight: shape (2, 48) does not match expected (2, 32)",
    "too many layers": "bottleneck layer 3: layer out of range, backbone has 3 layers",
    "rank above limit": "rank 9 exceeds the pool's max_lora_rank 8",
    "bottleneck above limit": "bottleneck size 17 exceeds the pool's max_bottleneck_size 16",
    "too many labels": "head has 9 labels, above the limit of 8",
    "nan": "lora layer 1 key lora_B: contains NaN",
    "inf": "bottleneck layer 2 up.bias: contains NaN or Inf",
    "float64": "head bias: dtype torch.float64 is not stored",
    "embed head with weights": "an embed head has no weights",
}


@pytest.mark.parametrize("name", list(INVALID))
def test_invalid_adapter_is_refused_and_nothing_is_written(store, shape, pool_config, name):
    art = invalid_artifact(shape, name)
    store.put(make_artifact(shape, "none", classify(2), 99), shape, pool_config)  # some prior content
    before = tree(store.root)
    with pytest.raises(FailedPreconditionError) as e:
        store.put(art, shape, pool_config)
    assert INVALID[name] in str(e.value)
    assert tree(store.root) == before


def test_lora_target_not_enabled_in_pool_is_refused(store, shape):
    art = make_artifact(shape, "lora", classify(2), 1, rank=2, targets=("query", "ffn_in"))
    with pytest.raises(FailedPreconditionError, match="ffn_in: target not enabled"):
        store.put(art, shape, tiny_pool_config(lora_targets=("query", "value")))
    assert tree(store.root) == []


def test_bad_arguments(store, shape, pool_config):
    for bad in ("", "ABC", "a" * 63, "A" * 64, "g" * 64, "../" + "a" * 61, None):
        with pytest.raises(InvalidArgumentError, match="not a sha256"):
            store.get(bad)
        with pytest.raises(InvalidArgumentError):
            store.recover({bad})
    with pytest.raises(InvalidArgumentError):
        store.put("not an artifact", shape, pool_config)
    with pytest.raises(NotFoundError, match="not in the store"):
        store.get("a" * 64)
    with pytest.raises(NotFoundError):
        store.size("a" * 64)
    assert not store.exists("a" * 64) and store.delete("a" * 64) is False
    for kw in ({"data_dir": ""}, {"subdir": ""}, {"subdir": "/abs"}, {"subdir": "../up"}, {"subdir": "."}):
        with pytest.raises(ValueError):
            StoreConfig(**kw)


def test_delete(store, shape, pool_config):
    a = store.put(make_artifact(shape, "none", classify(2), 1), shape, pool_config).sha256
    b = store.put(make_artifact(shape, "none", classify(2), 2), shape, pool_config).sha256
    assert store.delete(a) is True and store.delete(a) is False
    assert not store.exists(a) and store.list_shas() == {b}
    assert not any(p.exists() for p in store.paths(a))
    with pytest.raises(NotFoundError):
        store.get(a)


# -- corruption ----------------------------------------------------------------------------------------

def _flip_byte(t: Path, j: Path):
    data = bytearray(t.read_bytes())
    data[len(data) // 2] ^= 0x01
    t.write_bytes(bytes(data))


def _truncate(t: Path, j: Path):
    t.write_bytes(t.read_bytes()[: t.stat().st_size // 2])


def _tamper_json(key, value):
    def edit(t: Path, j: Path):
        config = json.loads(j.read_text())
        config[key] = value
        j.write_text(json.dumps(config))
    return edit


CORRUPTIONS = {
    "flipped byte": (_flip_byte, "checksum mismatch"),
    "truncated": (_truncate, "checksum mismatch"),
    "empty tensor file": (lambda t, j: t.write_bytes(b""), "checksum mismatch"),
    "garbage tensor file": (lambda t, j: t.write_bytes(os.urandom(4096)), "checksum mismatch"),
    "missing json": (lambda t, j: j.unlink(), "incomplete, .*json is missing"),
    "missing tensor file": (lambda t, j: t.unlink(), "tensor file .* is missing"),
    "json sha tampered": (_tamper_json("sha256", "b" * 64), "names sha256 'bbbb"),
    "json labels tampered": (_tamper_json("head", {"kind": "tag", "labels": ["X"], "pooling": "mean",
                                                   "normalize": False}),
                             "does not match the config embedded"),
    "json size tampered": (_tamper_json("num_bytes", 1), "size mismatch"),
    "json garbage": (lambda t, j: j.write_bytes(b"{not json"), "cannot be parsed"),
    "json NaN": (lambda t, j: j.write_text(j.read_text().replace('"scale": 0.7', '"scale": NaN')),
                 "NaN is not allowed"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corruption_is_detected_and_never_served(store, shape, pool_config, name):
    corrupt, message = CORRUPTIONS[name]
    art = mixed_lora(shape)
    sha = store.put(art, shape, pool_config).sha256
    corrupt(*store.paths(sha))
    for call in (store.get, store.verify):
        with pytest.raises(CorruptAdapterError, match=message) as e:
            call(sha)
        assert sha in str(e.value)
    # a put of the same content repairs the blob
    assert store.put(art, shape, pool_config).sha256 == sha
    assert_same_artifact(art, store.get(sha))


def _forge(store: AdapterStore, data: bytes, config: dict) -> str:
    """Write a blob whose name and JSON agree with its bytes (a checksum cannot catch what is inside)."""
    sha = hashlib.sha256(data).hexdigest()
    config = dict(config, sha256=sha, num_bytes=len(data))
    t, j = store.paths(sha)
    t.parent.mkdir(exist_ok=True)
    t.write_bytes(data)
    j.write_text(json.dumps(config))
    return sha


def test_self_consistent_but_invalid_blobs_are_corrupt(store, shape):
    nan = make_artifact(shape, "bottleneck", classify(2), 1, size=4)
    nan.adapter.layer_weights[1].down_w[0, 0] = float("nan")
    data, config = encode_artifact(nan)  # encoding does not validate; the store's put does
    sha = _forge(store, data, config)
    with pytest.raises(CorruptAdapterError, match=f"{sha}: tensor bottleneck.1.down.weight: contains NaN"):
        store.get(sha)

    good = make_artifact(shape, "none", classify(2), 1)
    _, config = encode_artifact(good)
    meta = {METADATA_KEY: json.dumps({k: v for k, v in config.items()
                                      if k not in ("num_tensors", "num_bytes", "sha256")})}
    missing_bias = st_save({"head.weight": good.head.weight.contiguous()}, metadata=meta)
    sha = _forge(store, missing_bias, dict(config, num_tensors=1))
    with pytest.raises(CorruptAdapterError, match="tensor head.bias: missing"):
        store.get(sha)

    wrong_labels = st_save({"head.weight": torch.zeros(3, 32), "head.bias": torch.zeros(3)}, metadata=meta)
    sha = _forge(store, wrong_labels, config)
    with pytest.raises(CorruptAdapterError, match="head.weight: shape \\(3, 32\\)"):
        store.get(sha)

    no_meta = st_save({"head.weight": good.head.weight.contiguous(), "head.bias": good.head.bias})
    sha = _forge(store, no_meta, config)
    with pytest.raises(CorruptAdapterError, match="no 'vbert_adapter' metadata"):
        store.get(sha)

    sha = _forge(store, os.urandom(1000), config)
    with pytest.raises(CorruptAdapterError, match="not safetensors|not valid JSON"):
        store.get(sha)
    placed = make_artifact(shape, "bottleneck", classify(2), 1, size=4, placement="ffn_out")
    data, config = encode_artifact(placed)
    config = dict(config, bottleneck=dict(config["bottleneck"], placement="mlp"))
    meta = {METADATA_KEY: json.dumps({k: v for k, v in config.items()
                                      if k not in ("num_tensors", "num_bytes", "sha256")})}
    sha = _forge(store, st_save(st_load(data), metadata=meta), config)
    with pytest.raises(CorruptAdapterError, match="bottleneck placement 'mlp' is not one of"):
        store.get(sha)
    assert len(store.list_shas()) == 6  # complete on disk, yet none is ever served


# -- recovery ------------------------------------------------------------------------------------------

def test_recover_removes_leftovers_and_orphans_and_keeps_the_kept(store, shape, pool_config):
    kept, kept_half, orphan, half, json_only = (
        store.put(make_artifact(shape, "lora", classify(2), seed, rank=2), shape, pool_config).sha256
        for seed in range(5))
    store.paths(kept_half)[1].unlink()  # crash between the two renames, yet registered: repaired
    store.paths(half)[1].unlink()       # crash between the two renames: removed
    store.paths(json_only)[0].unlink()  # tensor file lost: removed
    temps = [store.root / kept[:2] / ".tmp-abc123", store.root / orphan[:2] / ".tmp-xyz"]
    for t in temps:
        t.write_bytes(b"partial")
    unrelated = store.root / "README"
    unrelated.write_text("not ours")
    gone = "c" * 64

    report = store.recover({kept, kept_half, gone})
    assert isinstance(report, RecoveryReport)
    assert sorted(report.removed_temp) == sorted(str(t) for t in temps)
    assert report.removed_orphans == [orphan]
    assert sorted(report.removed_incomplete) == sorted([half, json_only])
    assert report.repaired == [kept_half] and report.missing == [gone] and report.num_kept == 2
    assert report.num_removed == 5
    assert store.list_shas() == {kept, kept_half}
    for sha in (kept, kept_half):
        store.verify(sha)
    assert unrelated.read_text() == "not ours"
    assert not list(store.root.rglob(".tmp-*"))
    assert {p.name for p in store.root.iterdir()} == {kept[:2], kept_half[:2], "README"}

    again = store.recover({kept, kept_half})
    assert again.num_removed == 0 and not again.repaired and not again.missing and again.num_kept == 2


def test_recover_never_deletes_kept_even_when_damaged(store, shape, pool_config):
    sha = store.put(make_artifact(shape, "none", classify(2), 1), shape, pool_config).sha256
    t, j = store.paths(sha)
    j.unlink()
    _flip_byte(t, j)  # a kept tensor file that fails its checksum cannot be repaired
    report = store.recover({sha})
    assert report.missing == [sha] and not report.repaired and report.num_removed == 0
    assert t.exists()
    with pytest.raises(CorruptAdapterError):
        store.get(sha)


# -- concurrency ---------------------------------------------------------------------------------------

def test_concurrent_puts(store, shape, pool_config):
    arts = [make_artifact(shape, kind, classify(3), seed, **kw)
            for seed, (kind, kw) in enumerate([("lora", {"rank": 4}), ("bottleneck", {"size": 8}),
                                                ("none", {}), ("lora", {"rank": 2})])]
    barrier = threading.Barrier(8)
    results: dict[int, str] = {}
    errors = []

    def worker(i):
        try:
            barrier.wait()
            results[i] = store.put(arts[i % 4], shape, pool_config).sha256
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(results[i] == results[i + 4] for i in range(4))
    assert store.list_shas() == set(results.values()) and len(set(results.values())) == 4
    for i in range(4):
        assert_same_artifact(arts[i], store.get(results[i]))
    assert not list(store.root.rglob(".tmp-*"))


# -- serving -------------------------------------------------------------------------------------------

def test_decoded_artifact_serves_identically(tiny_model, store, pool_config):
    shape = tiny_model.spec.shape
    rows = []
    for name, make in ARTIFACTS.items():
        art = make(shape)
        back = store.get(store.put(art, shape, pool_config).sha256)
        ids = [2, 9, 10, 11, 12, 13, 3]
        rows += [EncodeRow(ids, tiny_model.load_adapter(art)), EncodeRow(ids, tiny_model.load_adapter(back))]
    outs = tiny_model.forward(rows)
    for a, b in zip(outs[::2], outs[1::2]):
        assert a.kind == b.kind and a.labels == b.labels
        ta, tb = (a.embedding, b.embedding) if a.kind is HeadKind.EMBED else (a.logits, b.logits)
        assert torch.equal(ta, tb)


def test_a_read_racing_a_delete_and_a_rewrite_sees_the_blob_or_nothing(store, shape, pool_config):
    """get() while another thread deletes and re-puts the same blob: the blob or NotFound, never a half
    (a tensor file whose JSON was just removed, or not yet written, read as corrupt)."""
    art = make_artifact(shape, "lora", classify(3), 7, rank=2)
    sha = store.put(art, shape, pool_config).sha256
    stop, seen = threading.Event(), {"ok": 0, "gone": 0, "corrupt": []}

    def churn():
        while not stop.is_set():
            store.delete(sha)
            time.sleep(0.001)
            store.put(art, shape, pool_config)
            time.sleep(0.002)

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            try:
                store.get(sha)
                seen["ok"] += 1
            except NotFoundError:
                seen["gone"] += 1
            except CorruptAdapterError as e:
                seen["corrupt"].append(str(e))
    finally:
        stop.set()
        thread.join(30)
    assert not seen["corrupt"], seen["corrupt"][:3]
    assert seen["ok"] > 0, seen
