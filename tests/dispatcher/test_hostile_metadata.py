"""Hostile head metadata in an uploaded adapter (issue 17 item 3), against a real server over loopback:
each upload is refused with INVALID_ARGUMENT or FAILED_PRECONDITION (never INTERNAL), nothing is stored
or registered, the active version stays active, and the tenant's adapters keep listing and classifying."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import grpc
import pytest

from dispatcher.client import tar_directory, upload_chunks
from dispatcher.gen.vbert.v1 import admin_pb2, tenant_pb2
from tests.conftest import classify, embed_head, make_artifact, tag
from tests.dispatcher.conftest import ADMIN_TOKEN, RunningServer, bearer, tiny_server_config
from vbert import save_artifact
from vbert.artifact import META_FILE

ADMIN = bearer(ADMIN_TOKEN)
REFUSED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
BIG_LABEL = 4 << 20   # the probe's 4 MB labels


def _upload(server, tenant: str, name: str, directory: Path, chunk_bytes: int = 1 << 20):
    payload = tar_directory(directory)
    chunks = upload_chunks(tenant, name, payload, chunk_bytes=chunk_bytes)
    return server.admin.UploadAdapter(iter(chunks), metadata=ADMIN)


def _adapter_dir(server, path: Path, head, seed: int, **head_json) -> Path:
    """A valid artifact directory whose vbert_adapter.json "head" then gets `head_json` written over it."""
    save_artifact(make_artifact(server.app.model.spec.shape, "lora", head, seed, rank=4), path)
    meta = json.loads((path / META_FILE).read_text())
    meta["head"].update(head_json)
    (path / META_FILE).write_text(json.dumps(meta))   # ensure_ascii: "\ud800" stays a JSON escape
    return path


def _list(server, tenant: str):
    return server.admin.ListAdapters(admin_pb2.ListAdaptersRequest(tenant=tenant), metadata=ADMIN).adapters


def _classify(server, key: str, adapter: str):
    return server.tenant.Classify(tenant_pb2.ClassifyRequest(
        adapter=adapter, inputs=[tenant_pb2.Input(text="the patient with cancer")]), metadata=bearer(key))


def _num_rows(server) -> int:
    return server.app.manager.registry._conn().execute("SELECT COUNT(*) FROM adapters").fetchone()[0]


def _blobs(server) -> set[Path]:
    return {p for p in server.app.manager.store.root.rglob("*") if p.is_file()}


# (name, head spec of the valid artifact, what the upload's JSON says instead)
HOSTILE = [
    ("ints", classify(3), {"labels": [1, 2, 3]}),
    ("null", classify(2), {"labels": [None, "a"]}),
    ("surrogate", classify(1), {"labels": ["\ud800"]}),
    ("string", classify(3), {"labels": "abc"}),
    ("normalize-string", embed_head(normalize=False), {"normalize": "no"}),
    ("huge", classify(3), {"labels": [c * BIG_LABEL for c in "xyz"]}),
    ("control", classify(2), {"labels": ["ok", "bad\nlabel"]}),
    ("empty", classify(2), {"labels": ["ok", ""]}),
    ("pooling-type", classify(2), {"pooling": 1}),
    ("extra-field", classify(2), {"colour": "red"}),
]


@pytest.mark.parametrize("case, head, head_json", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_head_is_refused_and_nothing_is_stored(server, tmp_path, case, head, head_json):
    tenant = f"hostile-{case}"
    _, key = server.app.manager.create_tenant(tenant)
    good = _upload(server, tenant, "clf", _adapter_dir(server, tmp_path / "good", classify(3), 1))
    assert good.version == 1 and good.is_active
    before_blobs, before_rows = _blobs(server), _num_rows(server)
    bad = _adapter_dir(server, tmp_path / "bad", head, 2, **head_json)
    for name in ("clf", "other"):   # a new version of the good adapter, and a new adapter
        with pytest.raises(grpc.RpcError) as e:
            _upload(server, tenant, name, bad)
        assert e.value.code() in REFUSED, (e.value.code(), e.value.details())
        assert "head" in e.value.details() and len(e.value.details()) < 2000
    assert _blobs(server) == before_blobs
    assert _num_rows(server) == before_rows
    listed = _list(server, tenant)
    assert [(a.name, a.version, a.is_active, list(a.labels)) for a in listed] == [("clf", 1, True, ["L0", "L1", "L2"])]
    r = _classify(server, key, "clf")
    assert r.metadata.adapter_version == 1 and r.results[0].label in ("L0", "L1", "L2")
    with pytest.raises(grpc.RpcError) as e:
        _classify(server, key, "other")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_response_size_beyond_the_message_limit_is_refused(tiny_checkpoint, tmp_path):
    """A tag head whose worst-case response (8 texts x 64 tokens, a TokenTag and an Entity per token, each
    with a label) exceeds max_message_bytes is refused at upload; the same head with short labels is accepted."""
    s = RunningServer(tiny_server_config(tiny_checkpoint, tmp_path / "var", max_message_bytes=128 << 10,
                                         max_tokens_per_text=64))
    try:
        _, key = s.app.manager.create_tenant("sizer")
        long_labels = [f"{i}" + "x" * 120 for i in range(3)]   # 121 bytes each, within the per-label limit
        with pytest.raises(grpc.RpcError) as e:
            _upload(s, "sizer", "ner", _adapter_dir(s, tmp_path / "long", tag(3), 1, labels=long_labels), 1 << 16)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value.details()
        assert "max_message_bytes" in e.value.details()
        assert _blobs(s) == set() and _num_rows(s) == 0
        ok = _upload(s, "sizer", "ner", _adapter_dir(s, tmp_path / "short", tag(3), 2), 1 << 16)
        assert ok.version == 1 and list(ok.labels) == ["T0", "T1", "T2"]
        r = s.tenant.Tag(tenant_pb2.TagRequest(adapter="ner", inputs=[tenant_pb2.Input(text="the gene")]),
                         metadata=bearer(key))
        assert r.results[0].tokens[0].label in ("T0", "T1", "T2")
    finally:
        s.stop()


def test_a_record_an_older_server_let_in_is_quarantined_at_start_up(tiny_checkpoint, tmp_path):
    """The probe's aftermath: a stored head with labels [1, 2, 3] used to make ListAdapters answer INTERNAL
    for the whole tenant. After a restart it is quarantined: listed as such, Classify on it is a clear
    FAILED_PRECONDITION, and the tenant's other adapter lists and classifies as before."""
    config = tiny_server_config(tiny_checkpoint, tmp_path / "var")
    s = RunningServer(config)
    try:
        _, key = s.app.manager.create_tenant("legacy")
        for name, seed in (("clf", 1), ("victim", 2)):
            _upload(s, "legacy", name, _adapter_dir(s, tmp_path / name, classify(3), seed))
        db = s.app.manager.registry.config.path
    finally:
        s.stop()
    conn = sqlite3.connect(str(db))   # what an older server stored (it checked no label types)
    with conn:
        conn.execute("UPDATE adapters SET head = ? WHERE name = 'victim'",
                     (json.dumps({"kind": "classify", "labels": [1, 2, 3], "pooling": "mean", "normalize": False}),))
    conn.close()
    s = RunningServer(config)
    try:
        listed = {a.name: a for a in _list(s, "legacy")}
        assert (listed["clf"].head_kind, listed["clf"].is_active, list(listed["clf"].labels)) == \
            ("classify", True, ["L0", "L1", "L2"])
        assert (listed["victim"].head_kind, listed["victim"].is_active, list(listed["victim"].labels)) == \
            ("quarantined", False, [])
        assert _classify(s, key, "clf").metadata.adapter_version == 1
        with pytest.raises(grpc.RpcError) as e:
            _classify(s, key, "victim")
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "quarantined" in e.value.details() and "labels[0] must be a string" in e.value.details()
    finally:
        s.stop()
