"""The Manager facade: registry + store + cache kept consistent, on real files and a real pool."""
from __future__ import annotations

import random
import threading

import pytest
import torch

from manager.errors import FailedPreconditionError, NotFoundError
from manager.manager import DEFAULT_ADAPTER, Manager, ManagerConfig
from tests.conftest import classify, make_artifact, tag, tiny_pool_config
from vbert import BackboneConfig, EncodeRow, HeadKind, ModelConfig, MultiTenantModel, PoolConfig

IDS = [2, 7, 8, 9, 10, 3]


@pytest.fixture
def mgr(tiny_checkpoint, tmp_path):
    model = MultiTenantModel(ModelConfig(BackboneConfig(path=str(tiny_checkpoint), device="cpu"),
                                         tiny_pool_config(num_lora_slots=4, num_bottleneck_slots=4)))
    m = Manager(ManagerConfig.under(str(tmp_path / "var")), model)
    yield m
    m.close()


def run(m: Manager, ref):
    with m.cache.use([ref.adapter_id], timeout=30) as (slot,):
        (out,) = m.model.forward([EncodeRow(IDS, slot)])
    return out


def test_new_version_switches_new_requests_while_scheduled_ones_finish_on_theirs(mgr):
    shape = mgr.model.spec.shape
    v1, v2 = (make_artifact(shape, "lora", classify(3), s, rank=4) for s in (1, 2))
    tenant, _ = mgr.create_tenant("acme")
    mgr.upload_adapter("acme", "tickets", v1)
    ref1 = mgr.resolve(tenant, "tickets")
    mgr.cache.prefetch([ref1.adapter_id]).result(30)       # a request scheduled on v1, in flight
    rec2 = mgr.upload_adapter("acme", "tickets", v2)
    ref2 = mgr.resolve(tenant, "tickets")
    assert (ref1.version, ref2.version) == (1, 2) and ref2.adapter_id == rec2.id != ref1.adapter_id
    (slot1,) = mgr.cache.resolve([ref1.adapter_id])
    (old,) = mgr.model.forward([EncodeRow(IDS, slot1)])
    mgr.cache.release([ref1.adapter_id])
    new = run(mgr, ref2)
    fresh = MultiTenantModel(mgr.model.config)
    exp1, exp2 = fresh.forward([EncodeRow(IDS, fresh.load_adapter(v1)), EncodeRow(IDS, fresh.load_adapter(v2))])
    torch.testing.assert_close(old.logits, exp1.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(new.logits, exp2.logits, atol=1e-6, rtol=0)
    mgr.activate("acme", "tickets", 1)                       # and back
    assert mgr.resolve(tenant, "tickets").adapter_id == ref1.adapter_id


def test_delete_adapter_and_tenant_remove_every_tier(mgr):
    shape = mgr.model.spec.shape
    tenant, key = mgr.create_tenant("acme")
    recs = [mgr.upload_adapter("acme", "ner", make_artifact(shape, "bottleneck", tag(3), s, size=8)) for s in (1, 2)]
    ref = mgr.resolve(tenant, "ner")
    run(mgr, ref)
    assert mgr.cache.is_resident(ref.adapter_id) and mgr.cache.stats()["host"]["resident"] == 1
    removed = mgr.delete_adapter("acme", "ner")
    assert {r.id for r in removed} == {r.id for r in recs}
    assert not mgr.cache.is_resident(ref.adapter_id) and mgr.cache.stats()["host"]["resident"] == 0
    assert mgr.store.list_shas() == set()
    with pytest.raises(NotFoundError):
        mgr.resolve(tenant, "ner")
    rec = mgr.upload_adapter("acme", "cls", make_artifact(shape, "lora", classify(2), 3, rank=2))
    run(mgr, mgr.resolve(tenant, "cls"))
    mgr.delete_tenant("acme")
    assert not mgr.cache.is_resident(rec.id) and mgr.store.list_shas() == set()
    with pytest.raises(Exception, match="invalid or expired API key"):
        mgr.authenticate(key)


def test_shared_content_survives_deleting_one_owner(mgr):
    art = make_artifact(mgr.model.spec.shape, "lora", classify(2), 5, rank=2)
    for name in ("a", "b"):
        mgr.create_tenant(name)
        mgr.upload_adapter(name, "same", art)
    (sha,) = mgr.store.list_shas()
    mgr.delete_tenant("a")
    assert mgr.store.list_shas() == {sha}
    run(mgr, mgr.resolve(mgr.get_tenant("b"), "same"))


def test_invalid_upload_stores_and_registers_nothing(mgr):
    mgr.create_tenant("acme")
    too_big = make_artifact(mgr.model.spec.shape, "lora", classify(2), 1, rank=8)
    from vbert.adapters import LoraWeights

    w = too_big.adapter.modules[(0, "query")]
    too_big.adapter.modules[(0, "query")] = LoraWeights(w.A, w.B * float("nan"), w.scale)
    with pytest.raises(FailedPreconditionError, match="lora layer 0 query lora_B: contains NaN or Inf"):
        mgr.upload_adapter("acme", "bad", too_big)
    with pytest.raises(FailedPreconditionError, match="reserved for the bare backbone"):
        mgr.upload_adapter("acme", DEFAULT_ADAPTER, make_artifact(mgr.model.spec.shape, "none", classify(2), 1))
    with pytest.raises(NotFoundError):
        mgr.upload_adapter("nobody", "x", make_artifact(mgr.model.spec.shape, "none", classify(2), 1))
    assert mgr.list_adapters("acme") == [] and mgr.store.list_shas() == set()
    assert not [p for p in mgr.store.root.rglob("*") if p.is_file()]


def test_default_adapter_is_the_bare_backbone(mgr):
    tenant, _ = mgr.create_tenant("acme")
    ref = mgr.resolve(tenant, DEFAULT_ADAPTER)
    assert ref.adapter_id is None and ref.head.kind is HeadKind.EMBED


def test_restart_keeps_everything(tiny_checkpoint, tmp_path):
    model = MultiTenantModel(ModelConfig(BackboneConfig(path=str(tiny_checkpoint), device="cpu"), tiny_pool_config()))
    m = Manager(ManagerConfig.under(str(tmp_path / "var")), model)
    _, key = m.create_tenant("acme")
    art = make_artifact(model.spec.shape, "lora", classify(3), 1, rank=4)
    m.upload_adapter("acme", "x", art)
    before = run(m, m.resolve(m.get_tenant("acme"), "x")).logits
    m.close()
    m2 = Manager(ManagerConfig.under(str(tmp_path / "var")), MultiTenantModel(model.config))
    tenant = m2.authenticate(key)
    assert torch.equal(run(m2, m2.resolve(tenant, "x")).logits, before)
    assert m2.recovery.num_removed == 0
    m2.close()


def test_admin_writes_and_inference_reads_concurrently(mgr):
    """Admin threads upload/activate/delete while inference threads resolve and serve; nothing
    deadlocks, nothing but NotFound (a deleted adapter) escapes, invariants hold at the end."""
    shape = mgr.model.spec.shape
    tenants = [mgr.create_tenant(f"t{i}")[0] for i in range(4)]
    for t in tenants:
        mgr.upload_adapter(t.name, "a", make_artifact(shape, "lora", classify(2), t.id, rank=2))
    stop, errors = threading.Event(), []

    def admin(seed):
        rng = random.Random(seed)
        try:
            for i in range(12):
                t = rng.choice(tenants)
                name = rng.choice(["a", "b"])
                op = rng.random()
                if op < 0.6:
                    kind, kw = ("lora", {"rank": 2}) if op < 0.3 else ("bottleneck", {"size": 4})
                    mgr.upload_adapter(t.name, name, make_artifact(shape, kind, classify(2), seed * 100 + i, **kw))
                elif op < 0.8:
                    versions = [r.version for r in mgr.list_adapters(t.name) if r.name == name]
                    if versions:
                        mgr.activate(t.name, name, rng.choice(versions))
                elif name == "b":
                    mgr.delete_adapter(t.name, name)
        except NotFoundError:
            pass
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    def reader(seed):
        rng = random.Random(seed)
        while not stop.is_set():
            t = rng.choice(tenants)
            try:
                out = run(mgr, mgr.resolve(t, rng.choice(["a", "b"])))
                assert out.logits.shape == (2,)
            except NotFoundError:
                pass
            except Exception as e:  # noqa: BLE001
                errors.append(e)
                return

    readers = [threading.Thread(target=reader, args=(i,)) for i in range(3)]
    admins = [threading.Thread(target=admin, args=(i,)) for i in range(3)]
    for t in readers + admins:
        t.start()
    for t in admins:
        t.join(120)
    stop.set()
    for t in readers:
        t.join(60)
    assert not any(t.is_alive() for t in readers + admins), "deadlock"
    assert not errors, errors
    referenced = mgr.registry.referenced_shas()
    assert mgr.store.list_shas() == referenced
    for t in tenants:
        for name in ("a", "b"):
            active = [r for r in mgr.list_adapters(t.name) if r.name == name and r.is_active]
            assert len(active) <= 1
    assert mgr.cache.stats()["device"]["held"] == 0


def test_real_backbone_upload_resolve_serve(tmp_path):
    model = MultiTenantModel(ModelConfig(BackboneConfig(device="cpu"), PoolConfig(num_lora_slots=2, num_bottleneck_slots=1)))
    m = Manager(ManagerConfig.under(str(tmp_path / "var")), model)
    tenant, key = m.create_tenant("clinic")
    art = make_artifact(model.spec.shape, "lora", tag(3), 1, rank=8)
    m.upload_adapter("clinic", "ner", art)
    ids = model.tokenize(["Mutations in BRCA1 cause breast cancer."])[0]
    ref = m.resolve(m.authenticate(key), "ner")
    with m.cache.use([ref.adapter_id], timeout=30) as (slot,):
        (out,) = model.forward([EncodeRow(ids, slot)])
    (exp,) = model.forward([EncodeRow(ids, model.load_adapter(art))])
    assert out.logits.shape == (len(ids), 3)
    torch.testing.assert_close(out.logits, exp.logits, atol=1e-6, rtol=0)
    m.close()
