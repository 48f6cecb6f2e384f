"""Issue 17 item 3: the head metadata schema (vbert.heads), the response-size check, and the start-up check
that quarantines registry records an older server let in (written here straight into the SQLite file)."""
from __future__ import annotations

import json
import logging
import sqlite3
import time

import pytest

from manager.config import RegistryConfig, ResponseLimits
from manager.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from manager.manager import Manager, ManagerConfig
from manager.registry import SCHEMA_VERSION, migrate, open_registry, schema_version
from tests.conftest import classify, make_artifact, tiny_pool_config
from vbert import BackboneConfig, ModelConfig, MultiTenantModel
from vbert.adapters import AdapterError
from vbert.heads import (MAX_LABEL_BYTES, HeadKind, HeadSpec, check_head_json, check_response_size,
                         worst_case_response_bytes)

FAST = dict(scrypt_n=2**4, scrypt_r=1, scrypt_p=1)


# -- the schema ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("head, words", [
    ({"kind": "classify", "labels": [1, 2, 3]}, r"labels\[0\] must be a string, got int"),
    ({"kind": "classify", "labels": [None, "a"]}, r"labels\[0\] must be a string, got NoneType"),
    ({"kind": "classify", "labels": ["a", "\ud800"]}, r"labels\[1\] .* cannot be encoded as UTF-8"),
    ({"kind": "classify", "labels": "abc"}, "labels must be a JSON list of strings, got str"),
    ({"kind": "classify", "labels": {"a": 1}}, "labels must be a JSON list of strings, got dict"),
    ({"kind": "embed", "normalize": "no"}, "normalize must be true or false, got str"),
    ({"kind": "embed", "normalize": 0}, "normalize must be true or false, got int"),
    ({"kind": "classify", "labels": ["a", ""]}, r"labels\[1\] is empty"),
    ({"kind": "classify", "labels": ["a\tb"]}, r"labels\[0\] .* control character '\\t'"),
    ({"kind": "classify", "labels": ["a\x85"]}, "control character"),
    ({"kind": "classify", "labels": ["x" * (MAX_LABEL_BYTES + 1)]}, f"longer than {MAX_LABEL_BYTES} UTF-8 bytes"),
    ({"kind": "classify", "labels": ["\u00e9" * 65]}, f"130 UTF-8 bytes, above the limit of {MAX_LABEL_BYTES}"),
    ({"kind": "classify", "labels": ["a", "a"]}, "not unique: 'a'"),
    ({"kind": 1, "labels": ["a"]}, "kind must be a string, got int"),
    ({"kind": "regress", "labels": ["a"]}, "kind 'regress' is not one of"),
    ({"labels": ["a"]}, "kind is missing"),
    ({"kind": "classify", "labels": ["a"], "pooling": ["mean"]}, "pooling \\['mean'\\] is not one of"),
    ({"kind": "classify", "labels": ["a"], "pooling": "max"}, "pooling 'max' is not one of"),
    ({"kind": "classify", "labels": ["a"], "colour": "red"}, "unknown head fields"),
    ([], "head must be a JSON object, got list"),
])
def test_bad_head_json_is_refused_naming_the_field(head, words):
    with pytest.raises(AdapterError, match=words):
        HeadSpec.from_json(head)


def test_good_heads_pass_and_round_trip():
    for head in ({"kind": "classify", "labels": ["neg", "pos"], "pooling": "pooler", "normalize": False},
                 {"kind": "tag", "labels": ["B-Disease", "I-Disease", "O"], "pooling": "mean", "normalize": False},
                 {"kind": "embed", "labels": [], "pooling": "cls", "normalize": True},
                 {"kind": "classify", "labels": ["\u00e9" * 64, "x" * MAX_LABEL_BYTES, "\u6b63\u9762 ok"],
                  "pooling": "mean", "normalize": False}):
        assert HeadSpec.from_json(head).to_json() == head
    assert HeadSpec.from_json({"kind": "embed"}) == HeadSpec(HeadKind.EMBED)   # defaults


def test_the_constructor_applies_the_same_schema():
    with pytest.raises(AdapterError, match="labels must be a list of strings, got str"):
        HeadSpec(HeadKind.CLASSIFY, "abc")
    with pytest.raises(AdapterError, match="normalize must be true or false"):
        HeadSpec(HeadKind.EMBED, normalize="no")
    with pytest.raises(AdapterError, match=r"labels\[0\] must be a string"):
        HeadSpec(HeadKind.TAG, (1,))


def test_messages_stay_short_for_huge_input():
    with pytest.raises(AdapterError) as e:
        HeadSpec.from_json({"kind": "classify", "labels": ["x" * (4 << 20)] * 3})
    assert "labels[0]" in str(e.value) and len(str(e.value)) < 300


def test_label_count_against_the_pool_limit():
    head = {"kind": "classify", "labels": [f"c{i}" for i in range(9)]}
    assert check_head_json(head).num_labels == 9
    with pytest.raises(AdapterError, match="9 labels, above the limit of 8"):
        check_head_json(head, max_labels=8)


# -- the response size ---------------------------------------------------------------------------------
def test_worst_case_response_grows_with_label_bytes_texts_and_tokens():
    short, long = HeadSpec(HeadKind.TAG, ("a", "b")), HeadSpec(HeadKind.TAG, ("a", "b" * 100))
    assert worst_case_response_bytes(long, 8, 64) - worst_case_response_bytes(short, 8, 64) == 8 * 64 * 2 * 99
    assert worst_case_response_bytes(short, 16, 64) > worst_case_response_bytes(short, 8, 64)
    assert worst_case_response_bytes(short, 8, 128) > worst_case_response_bytes(short, 8, 64)
    c = HeadSpec(HeadKind.CLASSIFY, ("a", "bb", "ccc"))
    # per text: the best label (<= 3 bytes) and each label with its score, each with framing
    assert worst_case_response_bytes(c, 2, 512) - worst_case_response_bytes(c, 1, 512) == 3 + 6 + 4 * 16
    e = HeadSpec(HeadKind.EMBED)
    assert worst_case_response_bytes(e, 64, 512) == worst_case_response_bytes(e, 1, 1)


def test_response_size_check_refuses_what_cannot_be_sent():
    spec = HeadSpec(HeadKind.TAG, tuple(f"{i}" + "x" * 120 for i in range(3)))
    need = worst_case_response_bytes(spec, 8, 64)
    check_response_size(spec, 8, 64, need)                   # exactly fits
    with pytest.raises(AdapterError, match=f"above the server's max_message_bytes={need - 1}"):
        check_response_size(spec, 8, 64, need - 1)


def test_server_defaults_accept_every_head_the_schema_accepts():
    """With the default limits (64 texts x 512 tokens, 16 MiB) no schema-valid head is refused for size."""
    d = ResponseLimits()
    labels = tuple(f"{i:03d}" + "x" * (MAX_LABEL_BYTES - 3) for i in range(64))
    for kind in (HeadKind.CLASSIFY, HeadKind.TAG):
        check_response_size(HeadSpec(kind, labels), d.max_texts_per_request, d.max_tokens_per_text,
                            d.max_message_bytes)


@pytest.mark.parametrize("field", ["max_texts_per_request", "max_tokens_per_text", "max_message_bytes"])
def test_response_limits_are_validated(field):
    for bad in (0, -1, 1.5, True, "8"):
        with pytest.raises(ValueError, match=field):
            ResponseLimits(**{field: bad})


# -- the write path -------------------------------------------------------------------------------------
@pytest.fixture
def model(tiny_checkpoint):
    return MultiTenantModel(ModelConfig(BackboneConfig(path=str(tiny_checkpoint), device="cpu"),
                                        tiny_pool_config(num_lora_slots=4, num_bottleneck_slots=4)))


def _files(m: Manager) -> set:
    return {p for p in m.store.root.rglob("*") if p.is_file()}


def test_upload_beyond_the_response_limit_stores_nothing(model, tmp_path):
    m = Manager(ManagerConfig.under(str(tmp_path / "var"), registry=FAST), model)
    try:
        m.create_tenant("acme")
        shape = model.spec.shape
        long = make_artifact(shape, "lora", HeadSpec(HeadKind.TAG, ("a" * 100, "b")), 1, rank=4)
        tight = ResponseLimits(max_texts_per_request=8, max_tokens_per_text=64, max_message_bytes=64 << 10)
        with pytest.raises(FailedPreconditionError, match="max_message_bytes=65536"):
            m.upload_adapter("acme", "ner", long, response_limits=tight)
        assert _files(m) == set() and m.list_adapters("acme") == []
        assert m.upload_adapter("acme", "ner", long).version == 1        # no limits given: not checked
    finally:
        m.close()


def test_store_and_registry_refuse_a_head_that_bypassed_the_constructor(model, tmp_path):
    m = Manager(ManagerConfig.under(str(tmp_path / "var"), registry=FAST), model)
    try:
        tenant, _ = m.create_tenant("acme")
        art = make_artifact(model.spec.shape, "lora", classify(3), 1, rank=4)
        object.__setattr__(art.head.spec, "labels", (1, 2, 3))        # what HeadSpec.__post_init__ refuses
        with pytest.raises(FailedPreconditionError, match=r"head spec: head labels\[0\] must be a string"):
            m.upload_adapter("acme", "clf", art)
        assert _files(m) == set() and m.list_adapters("acme") == []
        with pytest.raises(InvalidArgumentError, match="head spec: head labels must be a JSON list"):
            m.registry.add_adapter_version(tenant.id, "clf", "lora", {}, {"kind": "classify", "labels": "abc"},
                                           "0" * 64, 1, actor="ops")
        assert m.list_adapters("acme") == []
    finally:
        m.close()


# -- the start-up check -----------------------------------------------------------------------------
GOOD = {"kind": "classify", "labels": ["L0", "L1", "L2"], "normalize": False, "pooling": "mean"}
BAD_HEADS = {   # adapter name -> the head an older server stored
    "ints": {"kind": "classify", "labels": [1, 2, 3], "normalize": False, "pooling": "mean"},
    "surrogate": {"kind": "classify", "labels": ["\ud800"], "normalize": False, "pooling": "mean"},
    "string": {"kind": "classify", "labels": "abc", "normalize": False, "pooling": "mean"},
    "normalize": {"kind": "embed", "labels": [], "normalize": "no", "pooling": "mean"},
    "huge": {"kind": "classify", "labels": [c * (4 << 20) for c in "xyz"], "normalize": False, "pooling": "mean"},
}


def _old_database(data_dir, adapters: list[tuple[str, int, dict, str]]) -> None:
    """A registry at schema version 2 (before quarantine existed) with rows as that version wrote them:
    (name, version, head, state) for tenant 'acme'; json.dumps as it did (ASCII, "\\ud800" escaped)."""
    path = RegistryConfig(data_dir=str(data_dir)).path
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), isolation_level=None)
    assert migrate(conn, target=2) == 2
    now = time.time()
    tenant_id = conn.execute("INSERT INTO tenants (name, created, status, requests_per_s, burst, "
                             "max_tokens_per_request, weight) VALUES ('acme', ?, 'active', 50, 100, 512, 1)",
                             (now,)).lastrowid
    for i, (name, version, head, state) in enumerate(adapters):
        conn.execute("INSERT INTO adapters (tenant_id, name, version, kind, config, head, sha256, size, created, "
                     "state) VALUES (?, ?, ?, 'none', ?, ?, ?, 10, ?, ?)",
                     (tenant_id, name, version, json.dumps({"kind": "none", "head": head}), json.dumps(head),
                      f"{i:064x}", now, state))
    conn.close()


def test_startup_quarantines_what_an_older_version_let_in(model, tmp_path, caplog):
    data_dir = tmp_path / "var"
    rows = [("good", 1, GOOD, "active"), ("victim", 1, GOOD, "inactive"),
            ("victim", 2, BAD_HEADS["ints"], "active"), ("many", 1, dict(GOOD, labels=[f"c{i}" for i in range(9)]),
                                                           "active")]
    rows += [(name, 1, head, "active") for name, head in BAD_HEADS.items() if name != "ints"]
    _old_database(data_dir, rows)
    with caplog.at_level(logging.WARNING, logger="manager.manager"):
        m = Manager(ManagerConfig.under(str(data_dir), registry=FAST), model)
    try:
        assert schema_version(m.registry._conn()) == SCHEMA_VERSION
        bad_names = {"victim", *BAD_HEADS} - {"ints"}
        assert {(r.name, r.version) for r in m.quarantined} == {(n, 2 if n == "victim" else 1) for n in bad_names}
        listed = {(r.name, r.version): r for r in m.list_adapters("acme")}      # one bad record breaks nothing
        assert len(listed) == len(rows)
        for (name, version), r in listed.items():
            is_bad = name in bad_names and (name, version) != ("victim", 1)
            assert r.is_quarantined == is_bad and (not r.is_active if is_bad else True), (name, version)
        assert "labels[0] must be a string, got int" in listed[("victim", 2)].problem
        assert "labels must be a JSON list" in listed[("string", 1)].problem
        assert "normalize must be true or false" in listed[("normalize", 1)].problem
        assert "lone surrogate" in listed[("surrogate", 1)].problem
        assert len(listed[("huge", 1)].problem) < 300
        # a WARNING per record naming tenant, adapter, version and reason
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        quarantine_logs = [w for w in warnings if "quarantined" in w]
        assert len(quarantine_logs) == len(bad_names)
        assert any("'victim' version 2 of tenant 'acme' (it was active)" in w and "labels[0]" in w
                   for w in quarantine_logs)
        assert any("'many' version 1" in w and "above the limit of 8" in w for w in warnings)  # reported only
        # an audit entry per record
        audit = m.registry.list_audit(target="acme/victim")
        assert audit[0].action == "quarantine_version" and audit[0].actor == "startup-check"
        assert audit[0].detail["version"] == 2 and audit[0].detail["was_active"] is True
        # the tenant's other adapters resolve; the quarantined one is a clear FAILED_PRECONDITION
        tenant = m.get_tenant("acme")
        assert m.resolve(tenant, "good").head.labels == ("L0", "L1", "L2")
        for name in bad_names:
            with pytest.raises(FailedPreconditionError, match=f"adapter '{name}' of tenant 'acme' .*quarantined"):
                m.resolve(tenant, name)
        with pytest.raises(FailedPreconditionError, match=r"version 2 of tenant 'acme' is quarantined: .*labels\[0\]"):
            m.activate("acme", "victim", 2)
        assert m.activate("acme", "victim", 1).is_active                   # the admin's way out
        assert m.resolve(tenant, "victim").version == 1
        with pytest.raises(NotFoundError):
            m.resolve(tenant, "never-uploaded")
    finally:
        m.close()
    # a second start finds nothing new to quarantine and writes no new audit entries
    m = Manager(ManagerConfig.under(str(data_dir), registry=FAST), model)
    try:
        assert m.quarantined == [] and len(m.registry.list_audit(target="acme/victim")) == 2
        assert m.resolve(m.get_tenant("acme"), "victim").version == 1
    finally:
        m.close()


def test_a_damaged_head_row_is_listed_and_quarantined(model, tmp_path):
    data_dir = tmp_path / "var"
    _old_database(data_dir, [("good", 1, GOOD, "active"), ("broken", 1, GOOD, "active")])
    conn = sqlite3.connect(str(RegistryConfig(data_dir=str(data_dir)).path), isolation_level=None)
    conn.execute("UPDATE adapters SET head = '{not json' WHERE name = 'broken'")
    conn.close()
    m = Manager(ManagerConfig.under(str(data_dir), registry=FAST), model)
    try:
        assert [(r.name, r.problem is not None) for r in m.list_adapters("acme")] == [("broken", True),
                                                                                       ("good", False)]
        with pytest.raises(FailedPreconditionError, match="'broken'.*quarantined.*kind is missing"):
            m.resolve(m.get_tenant("acme"), "broken")
    finally:
        m.close()


def test_registry_opened_alone_keeps_rows_readable(tmp_path):
    """The migration adds the problem column; a usable row reads as not quarantined."""
    _old_database(tmp_path / "var", [("good", 1, GOOD, "active")])
    with open_registry(RegistryConfig(data_dir=str(tmp_path / "var"), **FAST)) as reg:
        (rec,) = reg.list_usable_adapters()
        assert rec.name == "good" and rec.problem is None and not rec.is_quarantined and rec.is_active
