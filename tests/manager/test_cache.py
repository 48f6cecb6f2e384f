"""The tiered cache over a real adapter pool (tiny model); the disk tier is a loader function."""
from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from manager.cache import CacheConfig, CacheFullError, NotResidentError, TieredCache
from tests.conftest import classify, make_artifact, tiny_pool_config
from vbert import BackboneConfig, EncodeRow, ModelConfig, MultiTenantModel

IDS = [2, 7, 8, 9, 10, 3]


@pytest.fixture
def setup(tiny_checkpoint):
    model = MultiTenantModel(ModelConfig(BackboneConfig(path=str(tiny_checkpoint), device="cpu"),
                                         tiny_pool_config(num_lora_slots=3, num_bottleneck_slots=2)))
    shape = model.spec.shape
    arts = {i: make_artifact(shape, "lora" if i % 2 else "bottleneck", classify(3), i,
                             **({"rank": 4} if i % 2 else {"size": 8})) for i in range(1, 11)}
    disk_reads = []

    def loader(adapter_id):
        disk_reads.append(adapter_id)
        if adapter_id not in arts:
            raise KeyError(f"adapter {adapter_id} is not in the store")
        return arts[adapter_id]

    cache = TieredCache(CacheConfig(host_budget_bytes=10 ** 9), model.pool, loader)
    yield model, arts, cache, disk_reads
    cache.close()


def expected(model, art):
    fresh = MultiTenantModel(model.config)
    return fresh.forward([EncodeRow(IDS, fresh.load_adapter(art))])[0].logits


def test_prefetch_resolve_release_serves_the_right_adapter(setup):
    model, arts, cache, _ = setup
    with pytest.raises(NotResidentError, match=r"adapters \[1\] are not resident"):
        cache.resolve([1])
    with cache.use([1, 2], timeout=30) as (s1, s2):
        o1, o2 = model.forward([EncodeRow(IDS, s1), EncodeRow(IDS, s2)])
    torch.testing.assert_close(o1.logits, expected(model, arts[1]), atol=1e-6, rtol=0)
    torch.testing.assert_close(o2.logits, expected(model, arts[2]), atol=1e-6, rtol=0)
    s = cache.stats()
    assert s["device"]["misses"] == 2 and s["device"]["loads"] == 2 and s["disk"]["loads"] == 2
    assert s["device"]["held"] == 0


def test_lru_eviction_and_host_tier_hits(setup):
    model, arts, cache, disk_reads = setup
    lora = [1, 3, 5, 7]      # 4 LoRA adapters, 3 LoRA slots
    for a in lora:
        with cache.use([a], timeout=30):
            pass
    assert not cache.is_resident(1) and all(cache.is_resident(a) for a in (3, 5, 7))
    assert cache.stats()["device"]["evictions"] == 1
    with cache.use([1], timeout=30) as (slot,):   # back from host memory, not from disk
        (out,) = model.forward([EncodeRow(IDS, slot)])
    assert disk_reads.count(1) == 1 and cache.stats()["host"]["hits"] == 1
    torch.testing.assert_close(out.logits, expected(model, arts[1]), atol=1e-6, rtol=0)
    assert not cache.is_resident(3), "3 was the least recently used"
    with cache.use([5], timeout=30):
        pass
    assert cache.stats()["device"]["hits"] == 1


def test_houlsby_adapter_evicts_until_two_bank_entries_are_free(setup):
    """Both bottleneck slots hold single-placement adapters; a Houlsby one (both positions) needs
    the two entries, so the cache evicts both and then serves it correctly."""
    model, arts, cache, _ = setup
    arts[20] = make_artifact(model.spec.shape, "bottleneck", classify(3), 20, size=8, placement="both")
    for a in (2, 4):
        with cache.use([a], timeout=30):
            pass
    assert cache.is_resident(2) and cache.is_resident(4) and model.pool.num_free("bottleneck") == 0
    with cache.use([20], timeout=30) as (s,):
        out = model.forward([EncodeRow(IDS, s)])[0]
    torch.testing.assert_close(out.logits, expected(model, arts[20]), atol=1e-6, rtol=0)
    assert not cache.is_resident(2) and not cache.is_resident(4) and cache.is_resident(20)
    assert cache.stats()["device"]["evictions"] == 2


def test_held_and_pinned_adapters_are_never_evicted(setup):
    _, _, cache, _ = setup
    cache.pin(1).result(30)
    cache.prefetch([3]).result(30)                 # held until release
    with cache.use([5], timeout=30):
        with pytest.raises(CacheFullError, match="pinned or in use"):
            cache.prefetch([7]).result(30)
    assert all(cache.is_resident(a) for a in (1, 3, 5))
    cache.release([3])
    with cache.use([7], timeout=30):               # evicts 5 (unheld LRU), never 1 (pinned) or 3's slot in use
        pass
    assert cache.is_resident(1)
    cache.unpin(1)
    with cache.use([9], timeout=30):               # bottleneck bank: independent of the LoRA bank
        pass
    assert cache.stats()["device"]["pinned"] == 0


def test_host_budget_evicts_lru(setup, tiny_checkpoint):
    model, arts, _, disk_reads = setup
    size = arts[1].nbytes()
    cache = TieredCache(CacheConfig(host_budget_bytes=2 * size), model.pool, lambda a: (disk_reads.append(a), arts[a])[1])
    for a in (1, 3, 5):
        with cache.use([a], timeout=30):
            pass
    s = cache.stats()["host"]
    assert s["evictions"] == 1 and s["resident"] == 2 and s["bytes"] <= 2 * size
    cache.close()


def test_invalidate_removes_from_every_tier_even_when_held(setup):
    model, _, cache, disk_reads = setup
    cache.prefetch([1]).result(30)
    (slot,) = cache.resolve([1])
    free_before = model.pool.num_free("lora")
    cache.invalidate(1)
    assert cache.is_resident(1), "held by a batch in flight: stays until released"
    model.forward([EncodeRow(IDS, slot)])
    cache.release([1])
    assert not cache.is_resident(1) and model.pool.num_free("lora") == free_before + 1
    with cache.use([1], timeout=30):               # reloaded from disk: the host copy is gone too
        pass
    assert disk_reads.count(1) == 2


def test_loader_errors_propagate_and_leave_nothing(setup):
    model, arts, _, _ = setup
    failed = threading.Event()

    def loader(adapter_id):          # adapter 1 loads only after 99 has failed: the slow-load race
        if adapter_id == 99:
            failed.set()
            raise KeyError("adapter 99 is not in the store")
        assert failed.wait(30)
        time.sleep(0.3)
        return arts[adapter_id]

    cache = TieredCache(CacheConfig(host_budget_bytes=10 ** 9, num_loader_threads=2), model.pool, loader)
    try:
        free = model.pool.num_free("lora")
        with pytest.raises(KeyError, match="adapter 99 is not in the store"):
            cache.prefetch([1, 99]).result(30)
        # The failure is reported only once 1 has finished too, with 1's hold already given back.
        assert cache.stats()["disk"]["errors"] == 1 and cache.stats()["device"]["held"] == 0
        assert model.pool.num_free("lora") == free - 1   # 1 loaded fine and stays cached, unheld
    finally:
        cache.close()


def test_concurrent_users_get_correct_outputs(setup):
    model, arts, cache, _ = setup
    refs = {a: expected(model, art) for a, art in arts.items()}
    errors = []

    def worker(seed):
        rng = random.Random(seed)
        try:
            for _ in range(15):
                a = rng.choice(list(arts))
                with cache.use([a], timeout=60) as (slot,):
                    (out,) = model.forward([EncodeRow(IDS, slot)])
                torch.testing.assert_close(out.logits, refs[a], atol=1e-5, rtol=0)
        except Exception as e:   # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert cache.stats()["device"]["held"] == 0
