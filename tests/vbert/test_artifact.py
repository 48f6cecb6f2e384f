from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import classify, embed_head, make_artifact, tag
from vbert import AdapterError, EncodeRow, load_artifact, save_artifact


@pytest.mark.parametrize("kind,head,kw", [
    ("bottleneck", tag(3), {"size": 8, "top_layers": 2}),
    ("bottleneck", classify(3), {"size": 8, "placement": "ffn_out"}),
    ("bottleneck", tag(2), {"size": 4, "top_layers": 2, "placement": "both"}),
    ("lora", classify(5, "cls"), {"rank": 3}),
    ("none", classify(2), {}),
    ("lora", embed_head("cls", True), {"rank": 2}),
])
def test_saved_artifact_serves_identically(tiny_model, tmp_path, kind, head, kw):
    art = make_artifact(tiny_model.spec.shape, kind, head, 3, **kw)
    d = save_artifact(art, tmp_path / "art", backbone_name="tiny", shape=tiny_model.spec.shape)
    back = load_artifact(d)
    assert back.kind == art.kind and back.head.spec == art.head.spec
    assert back.num_parameters() == art.num_parameters()
    ids = [2, 9, 10, 11, 3]
    # one call each: the same row in the same place of the same-shaped batch computes bit for bit
    # the same (two rows of one batch may be split differently across CPU threads)
    [a] = tiny_model.forward([EncodeRow(ids, tiny_model.load_adapter(art))])
    [b] = tiny_model.forward([EncodeRow(ids, tiny_model.load_adapter(back))])
    ta, tb = (a.embedding, b.embedding) if a.embedding is not None else (a.logits, b.logits)
    assert torch.equal(ta, tb)


def test_save_refuses_non_empty_target(tiny_model, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("keep")
    with pytest.raises(FileExistsError):
        save_artifact(make_artifact(tiny_model.spec.shape, "none", classify(2), 1), tmp_path / "x")
    assert (tmp_path / "x" / "f").read_text() == "keep"


def test_damaged_artifacts_give_named_errors(tiny_model, tmp_path):
    d = save_artifact(make_artifact(tiny_model.spec.shape, "bottleneck", classify(2), 1, size=4), tmp_path / "a")
    meta = json.loads((d / "vbert_adapter.json").read_text())
    (d / "vbert_adapter.json").write_text(json.dumps({**meta, "kind": "prefix"}))
    with pytest.raises(AdapterError, match="adapter kind 'prefix' is not one of"):
        load_artifact(d)
    (d / "vbert_adapter.json").write_text(json.dumps({**meta, "head": {"kind": "regress"}}))
    with pytest.raises(AdapterError, match="head kind 'regress' is not one of"):
        load_artifact(d)
    (d / "vbert_adapter.json").write_text("{not json")
    with pytest.raises(AdapterError, match="invalid JSON"):
        load_artifact(d)
    with pytest.raises(AdapterError, match="is not an adapter directory"):
        load_artifact(tmp_path / "missing")


def test_truncated_lora_weights_are_detected(tiny_model, tmp_path):
    d = save_artifact(make_artifact(tiny_model.spec.shape, "lora", classify(2), 1, rank=2), tmp_path / "a")
    f = d / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(AdapterError, match="unreadable safetensors file"):
        load_artifact(d)


def test_bottleneck_placement_on_disk(tiny_model, tmp_path):
    """attn_out artifacts are written exactly as before placements existed (version 1, which a file
    without "placement" still loads as); ffn_out is version 2, so a reader that predates placements
    refuses it instead of serving the adapter in the wrong place; an unknown placement is named."""
    shape = tiny_model.spec.shape
    plain = save_artifact(make_artifact(shape, "bottleneck", classify(2), 1, size=4), tmp_path / "plain")
    meta = json.loads((plain / "vbert_adapter.json").read_text())
    assert meta["version"] == 1 and meta["bottleneck"]["placement"] == "attn_out"
    del meta["bottleneck"]["placement"]
    (plain / "vbert_adapter.json").write_text(json.dumps(meta))
    assert load_artifact(plain).adapter.placement == "attn_out"

    art = make_artifact(shape, "bottleneck", classify(2), 1, size=4, placement="ffn_out")
    placed = save_artifact(art, tmp_path / "placed")
    meta = json.loads((placed / "vbert_adapter.json").read_text())
    assert meta["version"] == 2 and meta["bottleneck"]["placement"] == "ffn_out"
    assert load_artifact(placed).adapter.placement == "ffn_out"
    # the same weights in the other place compute something else
    ids = [2, 9, 10, 11, 3]
    a, b = tiny_model.forward([EncodeRow(ids, tiny_model.load_adapter(load_artifact(plain))),
                               EncodeRow(ids, tiny_model.load_adapter(load_artifact(placed)))])
    assert not torch.allclose(a.logits, b.logits)

    (placed / "vbert_adapter.json").write_text(json.dumps({**meta, "bottleneck": {**meta["bottleneck"],
                                                                                  "placement": "mlp"}}))
    with pytest.raises(AdapterError, match="bottleneck placement 'mlp' is not one of"):
        load_artifact(placed)
    with pytest.raises(AdapterError, match="bottleneck placement 'mlp' is not one of"):
        tiny_model.load_adapter(make_artifact(shape, "bottleneck", classify(2), 1, size=4, placement="mlp"))


@pytest.mark.parametrize("placement", ["attn_out", "ffn_out", "both"])
def test_map_tensors_keeps_the_bottleneck_placement(tiny_model, placement):
    """The cache maps an artifact's tensors into pinned memory under CUDA: the copy must keep where
    the adapter sits (and both sets of a Houlsby adapter), so it serves as the original does."""
    art = make_artifact(tiny_model.spec.shape, "bottleneck", classify(3), 4, size=4, placement=placement)
    copy = art.map_tensors(lambda t: t.clone())
    assert copy.adapter.placement == placement and copy.num_parameters() == art.num_parameters()
    assert copy.nbytes() == art.nbytes()
    ids = [2, 9, 10, 11, 3]
    [a] = tiny_model.forward([EncodeRow(ids, tiny_model.load_adapter(art))])
    [b] = tiny_model.forward([EncodeRow(ids, tiny_model.load_adapter(copy))])
    assert torch.equal(a.logits, b.logits)
