from __future__ import annotations

import pytest
import torch

from tests.conftest import classify, embed_head, make_artifact, tag
from vbert import AdapterArtifact, AdapterError, EncodeRow, Head, HeadSpec, HeadKind, PoolFullError
from vbert.adapters import BottleneckWeights, LoraWeights

IDS = [2, 7, 8, 9, 10, 11, 12, 3]


def test_reused_slot_carries_nothing_of_its_previous_adapter(tiny_model):
    shape = tiny_model.spec.shape
    big = make_artifact(shape, "lora", classify(8), 1, rank=8, targets=("query", "key", "value", "attn_out",
                                                                         "ffn_in", "ffn_out"))
    small = make_artifact(shape, "lora", classify(2), 2, rank=1, targets=("value",), layers=(0,))
    s1 = tiny_model.load_adapter(big)
    tiny_model.unload_adapter(s1)
    s2 = tiny_model.load_adapter(small)
    assert s2 == s1, "the freed slot is reused"
    (reused,) = tiny_model.forward([EncodeRow(IDS, s2)])
    tiny_model.unload_adapter(s2)
    # a fresh model never saw `big`
    from vbert import MultiTenantModel

    fresh = MultiTenantModel(tiny_model.config)
    (clean,) = fresh.forward([EncodeRow(IDS, fresh.load_adapter(small))])
    assert reused.logits.shape == (2,)
    torch.testing.assert_close(reused.logits, clean.logits, atol=1e-6, rtol=0)


def test_bottleneck_slot_reuse_zeroes_padding(tiny_model):
    shape = tiny_model.spec.shape
    s = tiny_model.load_adapter(make_artifact(shape, "bottleneck", tag(3), 3, size=16))
    tiny_model.unload_adapter(s)
    small = make_artifact(shape, "bottleneck", embed_head(), 4, size=2, top_layers=1)
    s = tiny_model.load_adapter(small)
    from vbert import MultiTenantModel

    fresh = MultiTenantModel(tiny_model.config)
    (a,) = tiny_model.forward([EncodeRow(IDS, s)])
    (b,) = fresh.forward([EncodeRow(IDS, fresh.load_adapter(small))])
    torch.testing.assert_close(a.embedding, b.embedding, atol=1e-6, rtol=0)


def test_pool_full_and_capacity(tiny_checkpoint):
    from tests.conftest import tiny_pool_config
    from vbert import BackboneConfig, ModelConfig, MultiTenantModel

    m = MultiTenantModel(ModelConfig(BackboneConfig(path=str(tiny_checkpoint), device="cpu"),
                                     tiny_pool_config(num_lora_slots=2, num_bottleneck_slots=1)))
    shape = m.spec.shape
    slots = [m.load_adapter(make_artifact(shape, "lora", classify(2), i, rank=2)) for i in range(2)]
    assert m.pool.num_free("lora") == 0
    with pytest.raises(PoolFullError, match="no free lora slot"):
        m.load_adapter(make_artifact(shape, "lora", classify(2), 9, rank=2))
    m.load_adapter(make_artifact(shape, "bottleneck", classify(2), 10, size=4))   # other bank still free
    m.unload_adapter(slots[0])
    assert m.pool.num_free("lora") == 1
    with pytest.raises(KeyError, match="not loaded"):
        m.unload_adapter(slots[0])
    with pytest.raises(KeyError, match=r"slots \[%d\] are not loaded" % slots[0]):
        m.forward([EncodeRow(IDS, slots[0])])


def test_houlsby_bottleneck_takes_two_bank_entries(tiny_checkpoint):
    """A bottleneck at both positions takes two entries of the bottleneck bank: it fits only where
    two are free, unloading gives both back, and a pool with one entry refuses it by name."""
    from tests.conftest import tiny_pool_config
    from vbert import BackboneConfig, ModelConfig, MultiTenantModel

    def model(banks):
        return MultiTenantModel(ModelConfig(BackboneConfig(path=str(tiny_checkpoint), device="cpu"),
                                            tiny_pool_config(num_lora_slots=1, num_bottleneck_slots=banks)))

    m = model(3)
    shape = m.spec.shape
    both = make_artifact(shape, "bottleneck", classify(2), 1, size=4, placement="both")
    one = m.load_adapter(make_artifact(shape, "bottleneck", classify(2), 2, size=4))
    assert m.pool.fits(both)
    s = m.load_adapter(both)
    assert m.pool.num_free("bottleneck") == 0 and not m.pool.fits(both)
    m.unload_adapter(one)
    assert m.pool.num_free("bottleneck") == 1 and not m.pool.fits(both)
    with pytest.raises(PoolFullError, match="no free bottleneck slot"):
        m.load_adapter(make_artifact(shape, "bottleneck", classify(2), 3, size=4, placement="both"))
    m.unload_adapter(s)
    assert m.pool.num_free("bottleneck") == 3
    with pytest.raises(AdapterError, match="placement 'both' takes 2 bottleneck slots; the pool has "
                                           "num_bottleneck_slots=1"):
        model(1).load_adapter(both)


def test_houlsby_bottleneck_needs_both_sets_on_the_same_layers(tiny_model):
    art = make_artifact(tiny_model.spec.shape, "bottleneck", classify(2), 1, size=4, placement="both")
    del art.adapter.ffn_weights[1]
    with pytest.raises(AdapterError, match=r"needs weights at attn_out and ffn_out on the same layers, "
                                           r"got \[0, 1, 2\] and \[0, 2\]"):
        tiny_model.load_adapter(art)
    single = make_artifact(tiny_model.spec.shape, "bottleneck", classify(2), 1, size=4)
    single.adapter.ffn_weights = dict(single.adapter.layer_weights)
    with pytest.raises(AdapterError, match="placement 'attn_out' has a second set of weights"):
        tiny_model.load_adapter(single)


def _bad_lora(shape, **change):
    art = make_artifact(shape, "lora", classify(2), 1, rank=2)
    w = art.adapter.modules[(0, "query")]
    art.adapter.modules[(0, "query")] = LoraWeights(change.get("A", w.A), change.get("B", w.B), w.scale)
    return art


@pytest.mark.parametrize("build,message", [
    (lambda s: _bad_lora(s, A=torch.zeros(2, s.hidden_size + 1)), r"lora layer 0 query lora_A: shape \(2, 33\) does not match expected \(2, 32\)"),
    (lambda s: _bad_lora(s, B=torch.full((s.hidden_size, 2), float("nan"))), "lora layer 0 query lora_B: contains NaN or Inf"),
    (lambda s: make_artifact(s, "lora", classify(2), 1, rank=9), "rank 9 exceeds the pool's max_lora_rank 8"),
    (lambda s: make_artifact(s, "lora", classify(2), 1, rank=2, layers=(3,)), "layer out of range, backbone has 3 layers"),
    (lambda s: make_artifact(s, "bottleneck", classify(2), 1, size=17), "bottleneck size 17 exceeds the pool's max_bottleneck_size 16"),
    (lambda s: make_artifact(s, "lora", classify(9), 1, rank=2), "head has 9 labels, above the limit of 8"),
    (lambda s: AdapterArtifact(None, Head(HeadSpec(HeadKind.CLASSIFY, ("a", "b")), torch.zeros(2, 31), torch.zeros(2))),
     r"head weight: shape \(2, 31\) does not match expected \(2, 32\)"),
])
def test_invalid_adapters_are_refused_and_change_nothing(tiny_model, build, message):
    free_before = (tiny_model.pool.num_free("lora"), tiny_model.pool.num_free("bottleneck"))
    with pytest.raises(AdapterError, match=message):
        tiny_model.load_adapter(build(tiny_model.spec.shape))
    assert (tiny_model.pool.num_free("lora"), tiny_model.pool.num_free("bottleneck")) == free_before


def test_bottleneck_inf_is_refused(tiny_model):
    art = make_artifact(tiny_model.spec.shape, "bottleneck", classify(2), 1, size=4)
    w = art.adapter.layer_weights[0]
    art.adapter.layer_weights[0] = BottleneckWeights(w.down_w, w.down_b, w.up_w, torch.full_like(w.up_b, float("inf")))
    with pytest.raises(AdapterError, match="bottleneck layer 0 up.bias: contains NaN or Inf"):
        tiny_model.load_adapter(art)


def test_lora_target_outside_pool_is_refused(tiny_checkpoint):
    from vbert import BackboneConfig, ModelConfig, MultiTenantModel, PoolConfig

    m = MultiTenantModel(ModelConfig(BackboneConfig(path=str(tiny_checkpoint), device="cpu"),
                                     PoolConfig(num_lora_slots=2, num_bottleneck_slots=0, max_lora_rank=4)))
    art = make_artifact(m.spec.shape, "lora", classify(2), 1, rank=2, targets=("ffn_in",))
    with pytest.raises(AdapterError, match="target not enabled in this pool"):
        m.load_adapter(art)


def test_bytes_per_slot_matches_bank_layout(tiny_model):
    p, spec = tiny_model.pool, tiny_model.spec
    nl, h, i, R, M, C = spec.num_layers, spec.hidden_size, spec.intermediate_size, 8, 16, 8
    lora = nl * (h * 3 * R + 3 * R * h + h * R + R * h + h * R + R * i + i * R + R * h)
    head = C * h + C
    assert p.bytes_per_slot("lora") == 4 * (lora + head)
    assert p.bytes_per_slot("bottleneck") == 4 * (nl * (h * M + M + M * h + h) + head)
