"""A batch mixing many tenants equals, row by row, the same inputs run one at a time through the
per-request reference (and, for LoRA, through the PEFT model built from the exported files)."""
from __future__ import annotations

import copy
import random

import pytest
import torch

from tests.conftest import classify, embed_head, make_artifact, tag
from tests.reference import head_output, hf_model, reference_row
from vbert import EncodeRow, HeadKind, LoraAdapter, save_artifact
from vbert.adapters import LoraWeights

ATOL = 1e-4


def tenant_artifacts(shape):
    """Twelve tenants: both adapter kinds, several ranks / bottleneck sizes / layer sets, every
    bottleneck placement, every head kind and pooling, several label counts, a head-only tenant."""
    arts = {
        "lora-r2-cls3": make_artifact(shape, "lora", classify(3), 1, rank=2),
        "lora-r8-ffn-tag5": make_artifact(shape, "lora", tag(5), 2, rank=8,
                                          targets=("query", "key", "value", "attn_out", "ffn_in", "ffn_out")),
        "lora-r4-qv-top2-embed": make_artifact(shape, "lora", embed_head("cls", True), 3, rank=4,
                                               targets=("query", "value"), layers=(1, 2)),
        "lora-r1-cls2-pooler": make_artifact(shape, "lora", classify(2, "pooler"), 4, rank=1),
        "bn-m4-cls7-cls": make_artifact(shape, "bottleneck", classify(7, "cls"), 5, size=4),
        "bn-m16-top2-tag2": make_artifact(shape, "bottleneck", tag(2), 6, size=16, top_layers=2),
        "bn-m8-top1-embed": make_artifact(shape, "bottleneck", embed_head("mean", False), 7, size=8, top_layers=1),
        "head-only-cls4": make_artifact(shape, "none", classify(4), 8),
        # on the feed-forward output instead: the same bank, gathered per placement
        "bn-ffn-m8-cls3": make_artifact(shape, "bottleneck", classify(3), 11, size=8, placement="ffn_out"),
        "bn-ffn-m16-top1-tag4": make_artifact(shape, "bottleneck", tag(4), 12, size=16, top_layers=1,
                                              placement="ffn_out"),
        # Houlsby: one at each position (two bank entries), next to rows with one at either
        "bn-both-m8-top2-cls5": make_artifact(shape, "bottleneck", classify(5), 13, size=8, top_layers=2,
                                              placement="both"),
    }
    # per-module ranks and scales (PEFT rank_pattern / alpha_pattern / rsLoRA)
    mixed = make_artifact(shape, "lora", tag(3), 9, rank=6)
    g = torch.Generator().manual_seed(10)
    mixed.adapter.modules[(0, "query")] = LoraWeights(torch.randn(3, shape.hidden_size, generator=g) * 0.2,
                                                      torch.randn(shape.hidden_size, 3, generator=g) * 0.2, 0.7)
    arts["lora-mixed-ranks-tag3"] = mixed
    return arts


def random_ids(rng, n, vocab):
    return [2] + [rng.randrange(5, vocab) for _ in range(n - 2)] + [3]


@pytest.fixture
def loaded(tiny_model):
    arts = tenant_artifacts(tiny_model.spec.shape)
    slots = {name: tiny_model.load_adapter(a) for name, a in arts.items()}
    return arts, slots


def test_mixed_batch_equals_per_request_reference(tiny_model, tiny_checkpoint, loaded):
    arts, slots = loaded
    ref = hf_model(tiny_checkpoint)
    rng = random.Random(0)
    rows, expected = [], []
    names = list(arts) * 2 + ["<bare>"] * 3
    rng.shuffle(names)
    for name in names:
        ids = random_ids(rng, rng.randrange(3, 40), tiny_model.spec.vocab_size)
        if name == "<bare>":
            rows.append(EncodeRow(ids, 0))
            expected.append(None)
        else:
            rows.append(EncodeRow(ids, slots[name]))
            expected.append(reference_row(ref, arts[name], ids))
    outs = tiny_model.forward(rows)
    assert len({len(r.input_ids) for r in rows}) > 5, "lengths must differ"
    bare = hf_model(tiny_checkpoint)
    kinds = set()
    for name, row, out, exp in zip(names, rows, outs, expected):
        kinds.add(out.kind)
        if exp is None:  # bare backbone: default head = mean pooling, no normalization (tiny ckpt)
            with torch.no_grad():
                h = bare(input_ids=torch.tensor([list(row.input_ids)])).last_hidden_state[0]
            torch.testing.assert_close(out.embedding, h.mean(0), atol=ATOL, rtol=0)
            continue
        got = out.embedding if out.kind is HeadKind.EMBED else out.logits
        assert got.shape == exp.shape, name
        torch.testing.assert_close(got, exp, atol=ATOL, rtol=0, msg=lambda m: f"{name}: {m}")
    assert kinds == set(HeadKind) - {HeadKind.GENERATE}   # every encoder head kind


def test_lora_rows_equal_peft_model_from_exported_files(tiny_model, tiny_checkpoint, loaded, tmp_path):
    from peft import PeftModel

    arts, slots = loaded
    base = hf_model(tiny_checkpoint)
    rng = random.Random(1)
    lora_names = [n for n, a in arts.items() if isinstance(a.adapter, LoraAdapter)]
    assert len(lora_names) >= 4
    rows, refs = [], []
    for name in lora_names:
        d = save_artifact(arts[name], tmp_path / name)
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(d)).eval()
        for _ in range(2):
            ids = random_ids(rng, rng.randrange(4, 30), tiny_model.spec.vocab_size)
            with torch.no_grad():
                out = peft_model(input_ids=torch.tensor([ids]))
            rows.append(EncodeRow(ids, slots[name]))
            refs.append((name, head_output(arts[name], out.last_hidden_state[0], out.pooler_output[0])))
    outs = tiny_model.forward(rows)
    for (name, exp), out in zip(refs, outs):
        got = out.embedding if out.kind is HeadKind.EMBED else out.logits
        torch.testing.assert_close(got, exp, atol=ATOL, rtol=0, msg=lambda m: f"{name}: {m}")


def test_adapters_change_outputs(tiny_model, loaded):
    """Guards the tests above against vacuous equality: every adapter moves the hidden states."""
    arts, slots = loaded
    ids = list(range(2, 20)) + [3]
    for name, slot in slots.items():
        if arts[name].adapter is None:
            continue
        head = arts[name].head.spec
        no_adapter = type(arts[name])(None, arts[name].head)
        s0 = tiny_model.load_adapter(no_adapter)
        a, b = tiny_model.forward([EncodeRow(ids, slot), EncodeRow(ids, s0)])
        ta = a.embedding if head.kind is HeadKind.EMBED else a.logits
        tb = b.embedding if head.kind is HeadKind.EMBED else b.logits
        assert (ta - tb).abs().max() > 1e-3, name
        tiny_model.unload_adapter(s0)


def test_batch_result_independent_of_batch_company(tiny_model, loaded):
    """A row's output does not depend on which other rows (tenants, lengths) share its batch."""
    arts, slots = loaded
    rng = random.Random(3)
    rows = [EncodeRow(random_ids(rng, rng.randrange(3, 40), tiny_model.spec.vocab_size), s)
            for s in list(slots.values()) * 3]
    together = tiny_model.forward(rows)
    for row, out in zip(rows[:10], together[:10]):
        (alone,) = tiny_model.forward([row])
        got, exp = (out.embedding, alone.embedding) if out.kind is HeadKind.EMBED else (out.logits, alone.logits)
        torch.testing.assert_close(got, exp, atol=ATOL, rtol=0)


def test_normalize_override_and_token_types(tiny_model, tiny_checkpoint):
    ref = hf_model(tiny_checkpoint)
    from vbert.model import default_head_of
    from vbert import AdapterArtifact

    art = AdapterArtifact(None, default_head_of(tiny_checkpoint))
    ids, tt = [2, 10, 11, 3, 12, 13, 3], [0, 0, 0, 0, 1, 1, 1]
    a, b = tiny_model.forward([EncodeRow(ids, 0, tt, normalize=True), EncodeRow(ids, 0, tt, normalize=False)])
    torch.testing.assert_close(a.embedding, reference_row(ref, art, ids, tt, normalize=True), atol=ATOL, rtol=0)
    torch.testing.assert_close(b.embedding, reference_row(ref, art, ids, tt, normalize=False), atol=ATOL, rtol=0)
    assert abs(float(a.embedding.norm()) - 1.0) < 1e-5
