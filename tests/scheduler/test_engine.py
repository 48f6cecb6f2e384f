"""The engine with the real model on CPU: real threads, a real adapter cache, real tokenizer."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from manager.cache import CacheConfig, TieredCache
from scheduler.config import SchedulerConfig
from scheduler.engine import (DeadlineExceededError, Engine, EngineConfig, EngineStoppedError, RequestCancelledError,
                              RequestFailedError)
from scheduler.policy import QueueFullError
from scheduler.runner import ModelRunner
from scheduler.types import Request
from tests.conftest import classify, embed_head, make_artifact, tag, tiny_pool_config
from vbert import BackboneConfig, EncodeRow, HeadKind, InputError, ModelConfig, MultiTenantModel, PoolConfig

TEXTS = ["the patient was treated", "gene expression of this protein was reduced in tumor cells",
         "we show results", "a study of cancer", "high level of the gene"]


def far() -> float:
    return time.monotonic() + 60


class World:
    """A model, a cache whose disk tier can be held back, and the artifacts it serves."""

    def __init__(self, checkpoint, slots=4):
        self.model = MultiTenantModel(ModelConfig(BackboneConfig(path=str(checkpoint), device="cpu"),
                                                  tiny_pool_config(num_lora_slots=slots, num_bottleneck_slots=slots)))
        shape = self.model.spec.shape
        self.arts = {i: make_artifact(shape, "lora" if i % 2 else "bottleneck",
                                      [classify(3), tag(4), embed_head()][i % 3], i,
                                      **({"rank": 4} if i % 2 else {"size": 8})) for i in range(1, 9)}
        self.gates: dict[int, threading.Event] = {}
        self.broken: set[int] = set()
        self.cache = TieredCache(CacheConfig(), self.model.pool, self.load)

    def load(self, adapter_id):
        gate = self.gates.get(adapter_id)
        if gate is not None:
            gate.wait(30)
        if adapter_id in self.broken:
            raise OSError(f"adapter {adapter_id}: checksum mismatch")
        return self.arts[adapter_id]

    def engine(self, pipelined=True, **sched) -> Engine:
        return Engine(EngineConfig(is_pipelined=pipelined), SchedulerConfig(**sched),
                      ModelRunner(self.model, self.cache), self.cache)

    def expected(self, adapter_id, ids):
        fresh = MultiTenantModel(self.model.config)
        slot = fresh.load_adapter(self.arts[adapter_id]) if adapter_id else 0
        return fresh.forward([EncodeRow(ids, slot)])[0]


def value(out):
    return out.embedding if out.kind is HeadKind.EMBED else out.logits


@pytest.fixture
def world(tiny_checkpoint):
    w = World(tiny_checkpoint)
    yield w
    w.cache.close()


@pytest.mark.parametrize("pipelined", [True, False])
def test_mixed_requests_complete_with_the_right_outputs(world, pipelined):
    with world.engine(pipelined) as engine:
        reqs = [Request(tenant_id=a, adapter_id=a, deadline=far(), text=TEXTS[i % len(TEXTS)])
                for i, a in enumerate([1, 2, 3, 4, 5, 6, 7, 8, 1, 2, None, 3] * 2)]
        futures = [engine.submit(r) for r in reqs]
        done = [f.result(60) for f in futures]
    for req, c in zip(reqs, done):
        exp = world.expected(req.adapter_id, req.prompt_ids)
        torch.testing.assert_close(value(c.output), value(exp), atol=1e-5, rtol=0)
        assert c.num_tokens == len(req.prompt_ids) and c.queue_s >= 0 and c.inference_s > 0
    assert engine.num_steps >= 1 and engine.num_pending == 0
    assert world.cache.stats()["device"]["held"] == 0


def test_expired_requests_are_dropped_before_compute(world):
    with world.engine() as engine:
        late = engine.submit(Request(tenant_id=1, adapter_id=None, deadline=time.monotonic() - 1, prompt_ids=[2, 7, 3]))
        ok = engine.submit(Request(tenant_id=1, adapter_id=None, deadline=far(), prompt_ids=[2, 7, 3]))
        with pytest.raises(DeadlineExceededError, match="passed its deadline"):
            late.result(30)
        assert ok.result(30).output.embedding is not None


def test_cold_adapter_waits_without_blocking_other_tenants(world):
    world.gates[3] = threading.Event()             # the disk read of adapter 3 is slow
    with world.engine() as engine:
        cold = engine.submit(Request(tenant_id=3, adapter_id=3, deadline=far(), text=TEXTS[0]))
        warm = [engine.submit(Request(tenant_id=t, adapter_id=t, deadline=far(), text=TEXTS[1])) for t in (1, 2)]
        for f in warm:
            f.result(30)                            # served while adapter 3 is still loading
        assert not cold.done()
        world.gates[3].set()
        assert value(cold.result(30).output) is not None


def test_queue_full_is_backpressure_and_changes_nothing(world):
    world.gates[5] = threading.Event()
    with world.engine(max_waiting=4, max_waiting_per_tenant=4) as engine:
        stuck = [engine.submit(Request(tenant_id=5, adapter_id=5, deadline=far(), prompt_ids=[2, 9, 3])) for _ in range(4)]
        with pytest.raises(QueueFullError, match="full"):
            engine.submit(Request(tenant_id=5, adapter_id=5, deadline=far(), prompt_ids=[2, 9, 3]))
        world.gates[5].set()
        assert all(f.result(30) for f in stuck)


def test_cancellation_removes_a_waiting_request(world):
    world.gates[7] = threading.Event()
    with world.engine() as engine:
        req = Request(tenant_id=7, adapter_id=7, deadline=far(), prompt_ids=[2, 9, 3])
        fut = engine.submit(req)
        other = engine.submit(Request(tenant_id=7, adapter_id=7, deadline=far(), prompt_ids=[2, 10, 3]))
        assert engine.cancel(req.request_id)
        with pytest.raises(RequestCancelledError):
            fut.result(5)
        world.gates[7].set()
        other.result(30)
        assert not engine.cancel(req.request_id)


def test_broken_adapter_fails_its_requests_only(world):
    world.broken.add(6)
    with world.engine() as engine:
        bad = engine.submit(Request(tenant_id=6, adapter_id=6, deadline=far(), text=TEXTS[0]))
        good = engine.submit(Request(tenant_id=1, adapter_id=1, deadline=far(), text=TEXTS[0]))
        with pytest.raises(RequestFailedError, match="adapter 6: checksum mismatch"):
            bad.result(30)
        good.result(30)


def test_bad_input_fails_that_request(world):
    with world.engine() as engine:
        long = engine.submit(Request(tenant_id=1, adapter_id=None, deadline=far(), text="gene " * 100, truncate=False))
        empty = engine.submit(Request(tenant_id=1, adapter_id=None, deadline=far(), text="   "))
        fine = engine.submit(Request(tenant_id=1, adapter_id=None, deadline=far(), text="gene " * 100))
        with pytest.raises(InputError, match="tokens, above the limit of 64"):
            long.result(30)
        with pytest.raises(InputError, match="text is empty"):
            empty.result(30)
        assert fine.result(30).num_tokens == 64


def test_asyncio_submit_and_stop_drains(world):
    engine = world.engine().start()

    async def main():
        return await asyncio.gather(*[engine.submit_async(Request(tenant_id=t, adapter_id=t, deadline=far(),
                                                                  text=TEXTS[t % 5])) for t in (1, 2, 3, 4)])
    results = asyncio.run(main())
    assert len(results) == 4
    pending = [engine.submit(Request(tenant_id=1, adapter_id=1, deadline=far(), text=TEXTS[0])) for _ in range(5)]
    engine.stop(drain=True)
    assert all(f.result(0) for f in pending)
    with pytest.raises(EngineStoppedError):
        engine.submit(Request(tenant_id=1, adapter_id=1, deadline=far(), text=TEXTS[0]))


def test_engine_on_the_real_backbone(tmp_path):
    model = MultiTenantModel(ModelConfig(BackboneConfig(device="cpu"), PoolConfig(num_lora_slots=3, num_bottleneck_slots=1)))
    art = make_artifact(model.spec.shape, "lora", classify(3), 1, rank=8)
    cache = TieredCache(CacheConfig(), model.pool, lambda a: art)
    texts = ["Aspirin reduces the risk of myocardial infarction.", "We follow the method of Smith et al."]
    with Engine(EngineConfig(), SchedulerConfig(), ModelRunner(model, cache), cache) as engine:
        futs = [engine.submit(Request(tenant_id=1, adapter_id=a, deadline=far(), text=t)) for t in texts for a in (1, None)]
        outs = [f.result(60).output for f in futs]
    mine = model.load_adapter(art)
    direct = model.forward([EncodeRow(ids, slot) for ids in model.tokenize(texts) for slot in (mine, 0)])
    for a, b in zip(outs, direct):
        torch.testing.assert_close(value(a), value(b), atol=1e-5, rtol=0)
    cache.close()


def test_serial_step_with_more_tenants_than_slots(tiny_checkpoint):
    """More distinct adapters waiting than device slots: steps are capped to what fits."""
    w = World(tiny_checkpoint, slots=2)
    try:
        with w.engine(pipelined=False) as engine:
            futs = [engine.submit(Request(tenant_id=a, adapter_id=a, deadline=far(), prompt_ids=[2, 7 + a, 3]))
                    for a in range(1, 9) for _ in range(2)]
            assert all(f.result(60).output is not None for f in futs)
        assert engine.scheduler.config.max_adapters_per_step == 2
    finally:
        w.cache.close()


def test_pipelined_more_tenants_than_slots_loads_each_adapter_about_once(tiny_checkpoint):
    w = World(tiny_checkpoint, slots=4)
    try:
        with w.engine(pipelined=True) as engine:
            futs = [engine.submit(Request(tenant_id=a, adapter_id=a, deadline=far(), text=TEXTS[a % 5]))
                    for a in range(1, 9) for _ in range(3)]
            assert all(f.result(60).output is not None for f in futs)
        stats = w.cache.stats()
        assert stats["disk"]["loads"] == 8                 # every adapter read from disk once
        assert stats["device"]["loads"] <= 12
        assert stats["device"]["held"] == 0
    finally:
        w.cache.close()


def test_per_tenant_limit_is_refused_at_submit(world):
    world.gates[5] = threading.Event()
    with world.engine(max_waiting=100, max_waiting_per_tenant=3) as engine:
        futs = [engine.submit(Request(tenant_id=5, adapter_id=5, deadline=far(), text="gene")) for _ in range(3)]
        with pytest.raises(QueueFullError, match="tenant 5 has 3 requests waiting"):
            engine.submit(Request(tenant_id=5, adapter_id=5, deadline=far(), text="gene"))
        other = engine.submit(Request(tenant_id=1, adapter_id=1, deadline=far(), text="gene"))
        other.result(30)
        world.gates[5].set()
        assert all(f.result(30) for f in futs)


def test_residency_bounds_loads_and_holds_until_claimed(world):
    """The policy's prefetch: at most max_outstanding adapters loading or loaded-unclaimed; a loaded
    adapter stays held (not evictable) until a step claims it or its hold expires."""
    from scheduler.residency import CacheResidency

    changes = []
    res = CacheResidency(world.cache, lambda: changes.append(1), max_outstanding=2, hold_s=60)
    res.request([1, 3, 5, 7])                        # four LoRA adapters asked for, two allowed
    deadline = time.monotonic() + 10
    while len(changes) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [a for a in (1, 3, 5, 7) if world.cache.is_resident(a)] == [1, 3]
    assert world.cache.stats()["device"]["held"] == 2
    res.request([5, 7])                              # still at the bound: nothing new starts
    time.sleep(0.1)
    assert not world.cache.is_resident(5)
    res.claimed([1])                                 # a step took adapter 1: its prefetch hold goes
    assert world.cache.stats()["device"]["held"] == 1
    res.hold_s = 0.0
    res.expire()                                     # an unclaimed hold does not last forever
    assert world.cache.stats()["device"]["held"] == 0
