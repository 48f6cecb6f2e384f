"""The admin API against a real server over loopback: every RPC, its auth, and the upload checks."""
from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from pathlib import Path

import grpc
import pytest
import torch

from dispatcher.admin_service import extract_adapter_tar
from dispatcher.client import tar_directory, upload_chunks
from dispatcher.gen.vbert.v1 import admin_pb2, tenant_pb2
from manager.errors import InvalidArgumentError
from tests.conftest import classify, make_artifact
from tests.dispatcher.conftest import ADMIN_TOKEN, RunningServer, bearer, tiny_server_config
from vbert import BackboneShape, EncodeRow, MultiTenantModel, load_artifact, save_artifact

ADMIN = bearer(ADMIN_TOKEN)
TEXTS = ["the patient with cancer", "gene expression was reduced in this study"]


def fails(call, *args, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call(*args, **kw)
    return e.value


def register(server, name: str, **quotas) -> str:
    r = server.admin.RegisterTenant(admin_pb2.RegisterTenantRequest(name=name, quotas=admin_pb2.Quotas(**quotas)),
                                    metadata=ADMIN)
    return r.api_key


def embed(server, key: str, adapter: str = "default"):
    return server.tenant.Embed(tenant_pb2.EmbedRequest(adapter=adapter, inputs=[tenant_pb2.Input(text="the gene")]),
                               metadata=bearer(key))


def classify_call(server, key: str, adapter: str, texts=TEXTS):
    return server.tenant.Classify(tenant_pb2.ClassifyRequest(
        adapter=adapter, inputs=[tenant_pb2.Input(text=t) for t in texts]), metadata=bearer(key))


def save(server, path: Path, seed: int, num_labels: int = 3, shape=None, **kw) -> Path:
    kw.setdefault("rank", 4)
    art = make_artifact(shape or server.app.model.spec.shape, "lora", classify(num_labels), seed, **kw)
    return save_artifact(art, path)


def upload_payload(server, tenant: str, name: str, payload: bytes, activate: bool = True, **header):
    chunks = upload_chunks(tenant, name, payload, activate, chunk_bytes=4096)
    for k, v in header.items():
        setattr(chunks[0].header, k, v)
    return server.admin.UploadAdapter(iter(chunks), metadata=ADMIN)


def upload_dir(server, tenant: str, name: str, path: Path, activate: bool = True):
    return upload_payload(server, tenant, name, tar_directory(path), activate)


def stored_files(server) -> set[Path]:
    return {p for p in server.app.manager.store.root.rglob("*") if p.is_file()}


def tar_of(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def member(name: str, kind=tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


# -- auth ------------------------------------------------------------------------------------------
def test_admin_token_is_required(server):
    key = server.register("auth-probe")
    req = admin_pb2.GetStatusRequest()
    assert fails(server.admin.GetStatus, req).code() == grpc.StatusCode.UNAUTHENTICATED
    assert fails(server.admin.GetStatus, req, metadata=bearer("wrong")).code() == grpc.StatusCode.PERMISSION_DENIED
    assert fails(server.admin.GetStatus, req, metadata=bearer(key)).code() == grpc.StatusCode.PERMISSION_DENIED
    assert server.admin.GetStatus(req, metadata=ADMIN).version == "0.1.0"
    chunks = upload_chunks(key, "x", b"payload")
    assert fails(server.admin.UploadAdapter, iter(chunks)).code() == grpc.StatusCode.UNAUTHENTICATED
    assert fails(server.admin.UploadAdapter, iter(chunks),
                 metadata=bearer(key)).code() == grpc.StatusCode.PERMISSION_DENIED


# -- tenants ---------------------------------------------------------------------------------------
def test_register_returns_a_working_key_that_is_not_stored(server):
    r = server.admin.RegisterTenant(admin_pb2.RegisterTenantRequest(name="acme", quotas=admin_pb2.Quotas(burst=7)),
                                    metadata=ADMIN)
    assert r.tenant.name == "acme" and r.tenant.status == "active" and r.tenant.id > 0
    assert r.tenant.quotas.burst == 7 and r.tenant.quotas.requests_per_s == 50 and r.tenant.quotas.weight == 1
    assert len(embed(server, r.api_key).results[0].values) == server.app.model.spec.hidden_size
    db = server.app.manager.registry.config.path
    stored = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))
    assert r.api_key.encode() not in stored
    e = fails(server.admin.RegisterTenant, admin_pb2.RegisterTenantRequest(name="acme"), metadata=ADMIN)
    assert e.code() == grpc.StatusCode.ALREADY_EXISTS
    for bad in (admin_pb2.RegisterTenantRequest(name="Not Valid"),
                admin_pb2.RegisterTenantRequest(name="neg", quotas=admin_pb2.Quotas(requests_per_s=-1))):
        assert fails(server.admin.RegisterTenant, bad, metadata=ADMIN).code() == grpc.StatusCode.INVALID_ARGUMENT


def test_get_and_update_quotas(server):
    register(server, "quota-co")
    t = server.admin.GetTenant(admin_pb2.TenantRef(name="quota-co"), metadata=ADMIN)
    assert t.name == "quota-co" and t.quotas.burst == 100
    t = server.admin.UpdateQuotas(admin_pb2.UpdateQuotasRequest(name="quota-co", quotas=admin_pb2.Quotas(weight=2.5)),
                                  metadata=ADMIN)
    assert t.quotas.weight == 2.5 and t.quotas.burst == 100 and t.quotas.requests_per_s == 50
    for req, code in ((admin_pb2.UpdateQuotasRequest(name="quota-co", quotas=admin_pb2.Quotas(requests_per_s=-3)),
                       grpc.StatusCode.INVALID_ARGUMENT),
                      (admin_pb2.UpdateQuotasRequest(name="quota-co", quotas=admin_pb2.Quotas(weight=float("nan"))),
                       grpc.StatusCode.INVALID_ARGUMENT),
                      (admin_pb2.UpdateQuotasRequest(name="quota-co"), grpc.StatusCode.INVALID_ARGUMENT),
                      (admin_pb2.UpdateQuotasRequest(name="nobody", quotas=admin_pb2.Quotas(burst=3)),
                       grpc.StatusCode.NOT_FOUND)):
        assert fails(server.admin.UpdateQuotas, req, metadata=ADMIN).code() == code
    assert fails(server.admin.GetTenant, admin_pb2.TenantRef(name="nobody"),
                 metadata=ADMIN).code() == grpc.StatusCode.NOT_FOUND


def test_list_tenants_pages(server):
    for i in range(5):
        server.register(f"page-{i}")
    seen, token, num_pages = [], "", 0
    while True:
        r = server.admin.ListTenants(admin_pb2.ListTenantsRequest(page_size=2, page_token=token), metadata=ADMIN)
        assert len(r.tenants) <= 2
        seen += [t.id for t in r.tenants]
        num_pages += 1
        token = r.next_page_token
        if not token:
            break
    everyone = server.admin.ListTenants(admin_pb2.ListTenantsRequest(), metadata=ADMIN)   # page_size 0 = 100
    assert seen == [t.id for t in everyone.tenants] == sorted(set(seen)) and everyone.next_page_token == ""
    assert num_pages == -(-len(seen) // 2) >= 3
    assert {f"page-{i}" for i in range(5)} <= {t.name for t in everyone.tenants}
    for bad in (admin_pb2.ListTenantsRequest(page_token="not-a-token"), admin_pb2.ListTenantsRequest(page_size=5000)):
        assert fails(server.admin.ListTenants, bad, metadata=ADMIN).code() == grpc.StatusCode.INVALID_ARGUMENT


def test_suspend_and_resume_take_effect_at_once(server):
    key = server.register("flaky")
    embed(server, key)   # the key is now in the authenticator's cache
    t = server.admin.SuspendTenant(admin_pb2.TenantRef(name="flaky"), metadata=ADMIN)
    assert t.status == "suspended"
    assert fails(embed, server, key).code() == grpc.StatusCode.PERMISSION_DENIED
    assert server.admin.ResumeTenant(admin_pb2.TenantRef(name="flaky"), metadata=ADMIN).status == "active"
    embed(server, key)
    assert fails(server.admin.SuspendTenant, admin_pb2.TenantRef(name="ghost"),
                 metadata=ADMIN).code() == grpc.StatusCode.NOT_FOUND


def test_rotate_key(server):
    old = server.register("rotor")
    embed(server, old)
    new = server.admin.RotateKey(admin_pb2.RotateKeyRequest(name="rotor"), metadata=ADMIN).api_key
    assert fails(embed, server, old).code() == grpc.StatusCode.UNAUTHENTICATED
    embed(server, new)
    newer = server.admin.RotateKey(admin_pb2.RotateKeyRequest(name="rotor", grace_seconds=60), metadata=ADMIN).api_key
    embed(server, new)    # still valid during the grace period
    embed(server, newer)
    e = fails(server.admin.RotateKey, admin_pb2.RotateKeyRequest(name="rotor", grace_seconds=-1), metadata=ADMIN)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- adapters --------------------------------------------------------------------------------------
def test_upload_round_trip_classifies_like_the_local_model(server, tmp_path):
    key = register(server, "uploader")
    d = save(server, tmp_path / "a", seed=11, num_labels=3)
    a = upload_dir(server, "uploader", "tickets", d)
    assert (a.tenant, a.name, a.version, a.kind, a.head_kind) == ("uploader", "tickets", 1, "lora", "classify")
    assert list(a.labels) == ["L0", "L1", "L2"] and len(a.sha256) == 64 and a.size > 0
    assert a.is_active and not a.is_pinned and a.created > 0
    got = classify_call(server, key, "tickets")
    assert got.metadata.adapter_version == 1
    local = MultiTenantModel(server.app.config.model_config())
    slot = local.load_adapter(load_artifact(d))
    outs = local.forward([EncodeRow(ids, slot) for ids in local.tokenize(TEXTS)])
    for out, res in zip(outs, got.results):
        probs = torch.softmax(out.logits.float(), -1)
        assert res.label == out.predicted()
        assert {s.label: s.score for s in res.scores} == pytest.approx(
            {lab: float(p) for lab, p in zip(out.labels, probs)}, abs=1e-4)


def test_bottleneck_placements_upload_and_serve_side_by_side(server, tmp_path):
    """Bottleneck adapters at each placement (attn_out, ffn_out, and both = Houlsby, which takes two
    bank entries), uploaded over gRPC and classified in one batch each, answer as the local model
    does with the same files; the same weights at another placement answer differently."""
    key = register(server, "placements")
    shape = server.app.model.spec.shape
    local = MultiTenantModel(server.app.config.model_config())
    answers = {}
    for placement in ("attn_out", "ffn_out", "both"):
        d = save_artifact(make_artifact(shape, "bottleneck", classify(3), 21, size=8, placement=placement),
                          tmp_path / placement)
        assert upload_dir(server, "placements", placement, d).kind == "bottleneck"
        got = classify_call(server, key, placement)
        slot = local.load_adapter(load_artifact(d))
        outs = local.forward([EncodeRow(ids, slot) for ids in local.tokenize(TEXTS)])
        answers[placement] = [{s.label: s.score for s in res.scores} for res in got.results]
        for out, res, scores in zip(outs, got.results, answers[placement]):
            assert res.label == out.predicted()
            assert scores == pytest.approx(
                {lab: float(p) for lab, p in zip(out.labels, torch.softmax(out.logits.float(), -1))}, abs=1e-4)
    def gap(a, b):
        return max(abs(x[k] - y[k]) for x, y in zip(answers[a], answers[b]) for k in x)

    assert gap("attn_out", "ffn_out") > 1e-3 and gap("both", "attn_out") > 1e-3   # same seed, same first weights


def test_upload_of_a_plain_peft_directory(server, tmp_path):
    register(server, "peft-co")
    d = save(server, tmp_path / "p", seed=3)
    for extra in ("vbert_adapter.json", "head.safetensors"):
        (d / extra).unlink()
    a = upload_dir(server, "peft-co", "emb", d)
    assert a.kind == "lora" and a.head_kind == "embed" and a.version == 1


def test_upload_is_checked_and_nothing_is_stored_on_failure(server, tmp_path):
    register(server, "careful")
    payload = tar_directory(save(server, tmp_path / "a", seed=5))
    before = stored_files(server)
    wrong = hashlib.sha256(b"something else").hexdigest()
    e = fails(upload_payload, server, "careful", "x", payload, sha256=wrong)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert wrong in e.details() and hashlib.sha256(payload).hexdigest() in e.details()
    # no header first
    chunks = [admin_pb2.UploadAdapterChunk(data=payload)]
    e = fails(server.admin.UploadAdapter, iter(chunks), metadata=ADMIN)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "header" in e.details()
    assert fails(server.admin.UploadAdapter, iter([]), metadata=ADMIN).code() == grpc.StatusCode.INVALID_ARGUMENT
    # declared size above the limit, more data than declared, less data than declared
    e = fails(upload_payload, server, "careful", "x", payload, size=(64 << 20) + 1)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit" in e.details()
    for size in (len(payload) - 1, len(payload) + 1):
        assert fails(upload_payload, server, "careful", "x", payload,
                     size=size).code() == grpc.StatusCode.INVALID_ARGUMENT
    # unsafe or malformed archives
    evil = [tar_of([(member("adapter_config.json"), b"{}"), (member("../evil.txt"), b"boom")]),
            tar_of([(member("/etc/evil"), b"boom")]),
            tar_of([(member("link", tarfile.SYMTYPE, "/etc/passwd"), None)]),
            tar_of([(member("hard", tarfile.LNKTYPE, "adapter_config.json"), None)]),
            tar_of([(member("fifo", tarfile.FIFOTYPE), None)]),
            b"this is not a tar archive" * 40]
    evil.append(gzip.compress(payload))
    for bad in evil:
        e = fails(upload_payload, server, "careful", "x", bad)
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details()
    assert not (tmp_path.parent / "evil.txt").exists()
    e = fails(upload_payload, server, "nobody", "x", payload)
    assert e.code() == grpc.StatusCode.NOT_FOUND
    # a tar that holds no adapter
    e = fails(upload_payload, server, "careful", "x", tar_of([(member("notes.txt"), b"hello")]))
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert server.admin.ListAdapters(admin_pb2.ListAdaptersRequest(tenant="careful"), metadata=ADMIN).adapters == []
    assert stored_files(server) == before


def test_incompatible_adapters_are_failed_precondition(server, tmp_path):
    register(server, "mismatch")
    before = stored_files(server)
    shape = server.app.model.spec.shape
    other = BackboneShape(hidden_size=shape.hidden_size + 16, intermediate_size=shape.intermediate_size,
                          num_layers=shape.num_layers)
    e = fails(upload_dir, server, "mismatch", "wide", save(server, tmp_path / "wide", 1, shape=other))
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "does not match" in e.details()
    e = fails(upload_dir, server, "mismatch", "big", save(server, tmp_path / "big", 1, rank=12))
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "max_lora_rank" in e.details()
    assert server.admin.ListAdapters(admin_pb2.ListAdaptersRequest(tenant="mismatch"), metadata=ADMIN).adapters == []
    assert stored_files(server) == before


def test_versions_and_activation(server, tmp_path):
    key = register(server, "versioned")
    upload_dir(server, "versioned", "clf", save(server, tmp_path / "v1", 1, num_labels=2))
    v2 = upload_dir(server, "versioned", "clf", save(server, tmp_path / "v2", 2, num_labels=4))
    assert v2.version == 2 and v2.is_active
    r = classify_call(server, key, "clf")
    assert r.metadata.adapter_version == 2 and len(r.results[0].scores) == 4
    v3 = upload_dir(server, "versioned", "clf", save(server, tmp_path / "v3", 3, num_labels=3), activate=False)
    assert v3.version == 3 and not v3.is_active
    a = server.admin.ActivateAdapter(admin_pb2.ActivateAdapterRequest(tenant="versioned", name="clf", version=1),
                                     metadata=ADMIN)
    assert a.version == 1 and a.is_active
    r = classify_call(server, key, "clf")
    assert r.metadata.adapter_version == 1 and len(r.results[0].scores) == 2
    listed = server.admin.ListAdapters(admin_pb2.ListAdaptersRequest(tenant="versioned"), metadata=ADMIN).adapters
    assert [(x.version, x.is_active) for x in listed] == [(1, True), (2, False), (3, False)]
    for version, code in ((9, grpc.StatusCode.NOT_FOUND), (0, grpc.StatusCode.INVALID_ARGUMENT)):
        req = admin_pb2.ActivateAdapterRequest(tenant="versioned", name="clf", version=version)
        assert fails(server.admin.ActivateAdapter, req, metadata=ADMIN).code() == code


def test_pin_unpin_and_status(server, tmp_path):
    register(server, "pinner")
    upload_dir(server, "pinner", "hot", save(server, tmp_path / "a", 7))
    ref = admin_pb2.AdapterRef(tenant="pinner", name="hot")
    a = server.admin.PinAdapter(ref, metadata=ADMIN)
    assert a.is_pinned and a.is_resident and a.version == 1
    s = server.admin.GetStatus(admin_pb2.GetStatusRequest(), metadata=ADMIN)
    assert s.num_resident_adapters >= 1 and s.num_tenants >= 1 and s.backbone and s.dtype == "float32"
    assert s.device.startswith("cpu") and s.lora_slots == 8 and s.bottleneck_slots == 8 and not s.is_draining
    assert s.queue_depth == 0 and s.version == "0.1.0"
    listed = server.admin.ListAdapters(admin_pb2.ListAdaptersRequest(tenant="pinner"), metadata=ADMIN).adapters
    assert listed[0].is_pinned and listed[0].is_resident
    a = server.admin.UnpinAdapter(ref, metadata=ADMIN)
    assert not a.is_pinned
    missing = admin_pb2.AdapterRef(tenant="pinner", name="cold")
    assert fails(server.admin.PinAdapter, missing, metadata=ADMIN).code() == grpc.StatusCode.NOT_FOUND


def test_delete_adapter_then_tenant(server, tmp_path):
    key = register(server, "leaver")
    upload_dir(server, "leaver", "one", save(server, tmp_path / "1", 21))
    upload_dir(server, "leaver", "one", save(server, tmp_path / "1b", 22))
    upload_dir(server, "leaver", "two", save(server, tmp_path / "2", 23))
    upload_dir(server, "leaver", "three", save(server, tmp_path / "3", 24))
    classify_call(server, key, "one")
    ref = admin_pb2.AdapterRef(tenant="leaver", name="one")
    assert server.admin.DeleteAdapter(ref, metadata=ADMIN).num_versions_deleted == 2
    assert fails(classify_call, server, key, "one").code() == grpc.StatusCode.NOT_FOUND
    assert fails(server.admin.DeleteAdapter, ref, metadata=ADMIN).code() == grpc.StatusCode.NOT_FOUND
    tenant_id = server.app.manager.get_tenant("leaver").id
    r = server.admin.DeleteTenant(admin_pb2.TenantRef(name="leaver"), metadata=ADMIN)
    assert r.num_adapters_deleted == 2
    assert fails(embed, server, key).code() == grpc.StatusCode.UNAUTHENTICATED
    assert fails(server.admin.GetTenant, admin_pb2.TenantRef(name="leaver"),
                 metadata=ADMIN).code() == grpc.StatusCode.NOT_FOUND
    assert tenant_id not in server.app.limiter._buckets
    assert fails(server.admin.DeleteTenant, admin_pb2.TenantRef(name="leaver"),
                 metadata=ADMIN).code() == grpc.StatusCode.NOT_FOUND


# -- the archive extraction itself -----------------------------------------------------------------
def test_extract_accepts_flat_dot_and_one_folder_layouts(tmp_path):
    flat = tar_of([(member("a.json"), b"1"), (member("b.bin"), b"22")])
    for i, payload in enumerate([flat, tar_of([(member("./", tarfile.DIRTYPE), None), (member("./a.json"), b"1")]),
                                 tar_of([(member("ad", tarfile.DIRTYPE), None), (member("ad/a.json"), b"1")])]):
        dest = tmp_path / f"d{i}"
        dest.mkdir()
        out = extract_adapter_tar(payload, dest)
        assert (out / "a.json").read_bytes() == b"1"
        assert out == (dest / "ad" if i == 2 else dest)


@pytest.mark.parametrize("members", [
    [(member("a.json"), b"1"), (member("ad/b.json"), b"2")],          # mixed layout
    [(member("ad/sub/a.json"), b"1")],                                 # nested
    [(member("a.json"), b"1"), (member("./a.json"), b"2")],            # duplicate
    [(member("x/../../a.json"), b"1")],                                # '..'
    [(member(f"f{i}"), b"1") for i in range(5)],                       # too many files
    [],                                                                # empty
])
def test_extract_refuses(tmp_path, members):
    with pytest.raises(InvalidArgumentError):
        extract_adapter_tar(tar_of(members), tmp_path, max_files=4)


def test_lora_targets_setting_enables_feed_forward_lora(tiny_checkpoint, tmp_path):
    """LoRA on the feed-forward layers (the NER recipe) is refused by a server with the default
    targets, naming the setting, and served by one whose lora_targets include them."""
    targets = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")
    for enabled in (False, True):
        kw = {"lora_targets": ",".join(targets)} if enabled else {}
        server = RunningServer(tiny_server_config(tiny_checkpoint, tmp_path / f"var-{enabled}", **kw))
        try:
            key = register(server, "ner")
            path = save(server, tmp_path / f"all-{enabled}", 1, targets=targets)
            if not enabled:
                e = fails(upload_dir, server, "ner", "all", path)
                assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "ffn_in: target not enabled" in e.details() and "lora_targets" in e.details()
                continue
            upload_dir(server, "ner", "all", path)
            got = classify_call(server, key, "all")
            local = MultiTenantModel(server.app.config.model_config())
            slot = local.load_adapter(load_artifact(path))
            outs = local.forward([EncodeRow(ids, slot) for ids in local.tokenize(TEXTS)])
            for out, res in zip(outs, got.results):
                assert res.label == out.predicted()
                assert {s.label: s.score for s in res.scores} == pytest.approx(
                    {lab: float(p) for lab, p in zip(out.labels, torch.softmax(out.logits.float(), -1))}, abs=1e-4)
        finally:
            server.stop()
