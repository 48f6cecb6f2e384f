"""The tenant registry on real SQLite files: tenants, keys, adapter versions, audit, migrations,
durability across reopen and SIGKILL, and many threads at once. No mocks, no timed asserts."""
from __future__ import annotations

import hashlib
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from manager.config import RegistryConfig
from manager.errors import (AlreadyExistsError, FailedPreconditionError, InvalidArgumentError, NotFoundError,
                            UnauthenticatedError)
from manager.keys import parse_prefix
from manager.registry import (_AUTHENTICATE_SQL, SCHEMA_VERSION, Quotas, Registry, SqliteRegistry, migrate,
                              open_registry, schema_version)

ROOT = Path(__file__).resolve().parents[2]
NAME_RULE = "1-64 characters"


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def config(tmp_path) -> RegistryConfig:
    return RegistryConfig(data_dir=str(tmp_path / "var"))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def reg(config, clock):
    registry = SqliteRegistry(config, clock=clock)
    yield registry
    registry.close()


def sha(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def add(reg, tenant_id, name="sentiment", i=0, activate=True, actor="ops"):
    head = {"kind": "classify", "labels": ["a", "b"]}
    return reg.add_adapter_version(tenant_id, name, "lora", {"rank": 8}, head, sha(i), 1000 + i, actor=actor,
                                   activate=activate)


def count(reg, table: str, tenant_id: int) -> int:
    sql = f"SELECT COUNT(*) FROM {table} WHERE tenant_id = ?"
    return reg._conn().execute(sql, (tenant_id,)).fetchone()[0]


def db_bytes(config: RegistryConfig) -> bytes:
    """Everything on disk: the main file, the WAL and the shared-memory index."""
    return b"".join(p.read_bytes() for p in config.path.parent.glob(config.filename + "*"))


# -- config ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, words", [
    ({"scrypt_n": 1000}, "power of two"), ({"scrypt_r": 0}, "scrypt_r"), ({"scrypt_p": -1}, "scrypt_p"),
    ({"busy_timeout_ms": -5}, "busy_timeout_ms"), ({"filename": "a/b.db"}, "bare file name"),
    ({"data_dir": ""}, "data_dir"), ({"scrypt_n": 2**24}, "1 GiB")])
def test_config_is_validated(kw, words):
    with pytest.raises(ValueError, match=words):
        RegistryConfig(**kw)


def test_open_registry_creates_the_directory_and_uses_wal(tmp_path):
    config = RegistryConfig(data_dir=str(tmp_path / "a" / "b"))
    registry = open_registry(config)
    try:
        assert isinstance(registry, SqliteRegistry) and isinstance(registry, Registry)
        assert config.path.is_file() and config.path.name == "registry.sqlite3"
        conn = registry._conn()
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert schema_version(conn) == SCHEMA_VERSION
    finally:
        registry.close()


# -- tenants -----------------------------------------------------------------------------------------

def test_tenant_lifecycle(reg, clock):
    tenant, key = reg.create_tenant("acme", actor="alice")
    assert (tenant.name, tenant.status, tenant.created) == ("acme", "active", clock.now)
    assert tenant.quotas == Quotas() == Quotas(50.0, 100, 512, 1.0)
    assert tenant.is_active and reg.get_tenant("acme") == tenant == reg.get_tenant_by_id(tenant.id)
    assert reg.authenticate(key) == tenant

    quotas = Quotas(requests_per_s=5, burst=7, max_tokens_per_request=64, weight=2.5)
    assert reg.update_quotas("acme", quotas, actor="bob").quotas == quotas
    assert reg.get_tenant("acme").quotas == quotas

    suspended = reg.set_status("acme", "suspended", actor="bob")
    assert suspended.status == "suspended" and not suspended.is_active
    assert reg.authenticate(key).status == "suspended"  # authenticated; the caller checks is_active
    assert reg.set_status("acme", "active", actor="bob").is_active
    with pytest.raises(InvalidArgumentError, match="status"):
        reg.set_status("acme", "deleted", actor="bob")

    assert reg.delete_tenant("acme", actor="carol") == []
    for call in (lambda: reg.get_tenant("acme"), lambda: reg.get_tenant_by_id(tenant.id),
                 lambda: reg.update_quotas("acme", quotas, "x"), lambda: reg.delete_tenant("acme", "x")):
        with pytest.raises(NotFoundError, match="acme|tenant id"):
            call()
    with pytest.raises(UnauthenticatedError):
        reg.authenticate(key)
    assert reg.count_tenants() == 0


def test_duplicate_name_is_refused_and_leaves_no_trace(reg):
    reg.create_tenant("acme")
    num_audit = len(reg.list_audit())
    with pytest.raises(AlreadyExistsError, match="acme"):
        reg.create_tenant("acme")
    assert reg.count_tenants() == 1 and len(reg.list_audit()) == num_audit


@pytest.mark.parametrize("name", ["", "Acme", "-acme", ".acme", "_a", "a" * 65, "a b", "a/b", "caf\u00e9",
                                  "a\n", 7, None])
def test_bad_tenant_names_name_the_rule(reg, name):
    with pytest.raises(InvalidArgumentError, match=NAME_RULE):
        reg.create_tenant(name)
    assert reg.count_tenants() == 0


def test_good_names_at_the_edges(reg):
    for name in ("a", "0", "a" * 64, "a.b_c-d9"):
        assert reg.create_tenant(name)[0].name == name


@pytest.mark.parametrize("kw, field", [({"requests_per_s": 0}, "requests_per_s"),
                                       ({"requests_per_s": float("inf")}, "requests_per_s"),
                                       ({"burst": 0}, "burst"), ({"burst": 1.5}, "burst"),
                                       ({"max_tokens_per_request": -1}, "max_tokens_per_request"),
                                       ({"weight": 0.0}, "weight"), ({"weight": True}, "weight"),
                                       ({"weight": float("nan")}, "weight")])
def test_bad_quotas_name_the_field(kw, field):
    with pytest.raises(InvalidArgumentError, match=field):
        Quotas(**kw)


def test_quotas_must_be_quotas(reg):
    with pytest.raises(InvalidArgumentError, match="Quotas"):
        reg.create_tenant("acme", quotas={"burst": 3})


def test_list_tenants_pages_by_id(reg):
    names = [f"t{i:02d}" for i in range(23)]
    for name in names:
        reg.create_tenant(name)
    seen, token, pages = [], None, 0
    while True:
        page, token = reg.list_tenants(page_size=5, page_token=token)
        seen += [t.name for t in page]
        pages += 1
        if token is None:
            break
    assert seen == names and pages == 5 and reg.count_tenants() == 23
    assert reg.list_tenants(page_size=23) == (reg.list_tenants(page_size=1000)[0], None)
    for size in (0, 1001, "5", True):
        with pytest.raises(InvalidArgumentError, match="page_size"):
            reg.list_tenants(page_size=size)
    with pytest.raises(InvalidArgumentError, match="page_token"):
        reg.list_tenants(page_token="abc")


# -- API keys ----------------------------------------------------------------------------------------

def test_key_is_shown_once_and_never_stored(reg, config):
    _, key = reg.create_tenant("acme")
    new_key = reg.rotate_key("acme", grace_s=60)
    secrets = [k.split("_", 2)[2] for k in (key, new_key)]
    assert all(len(s) == 43 for s in secrets) and parse_prefix(key) and parse_prefix(new_key)
    reg._conn().execute("PRAGMA wal_checkpoint(FULL)")
    data = db_bytes(config)
    for k, secret in zip((key, new_key), secrets, strict=True):
        assert secret.encode() not in data and k.encode() not in data
    assert parse_prefix(key).encode() in data  # the prefix is stored in clear (and indexed)


def test_authenticate_refuses_all_bad_keys_alike(reg):
    tenant, key = reg.create_tenant("acme")
    assert reg.authenticate(key).id == tenant.id
    prefix, secret = key.split("_", 2)[1:]
    wrong_secret = f"vb_{prefix}_{'A' if secret[0] != 'A' else 'B'}{secret[1:]}"
    unknown_prefix = f"vb_{'Z' if prefix[0] != 'Z' else 'Y'}{prefix[1:]}_{secret}"
    malformed = ["", "vb_", key + "x", key[:-1], key.replace("vb_", "xx_"), "Bearer " + key, None, 42,
                 f"vb_{prefix}_{secret[:-1]}!"]
    messages = set()
    for bad in [wrong_secret, unknown_prefix, *malformed]:
        with pytest.raises(UnauthenticatedError) as info:
            reg.authenticate(bad)
        messages.add(str(info.value))
    assert len(messages) == 1  # no oracle: the same answer whatever was wrong


def test_prefix_lookup_uses_the_index(reg):
    plan = " ".join(str(tuple(row)) for row in reg._conn().execute("EXPLAIN QUERY PLAN " + _AUTHENTICATE_SQL,
                                                                    ("abcdefgh",)))
    assert "api_keys_by_prefix" in plan and "SCAN" not in plan.replace("SCAN CONSTANT", "")


def test_rotation_with_grace(reg, clock):
    tenant, old = reg.create_tenant("acme")
    new = reg.rotate_key("acme", grace_s=30)
    assert new != old and reg.authenticate(new) == tenant
    clock.now += 29.9
    assert reg.authenticate(old) == tenant
    clock.now += 0.1
    with pytest.raises(UnauthenticatedError):
        reg.authenticate(old)
    assert reg.authenticate(new) == tenant
    # a second rotation never extends the first grace, and purges expired keys
    newer = reg.rotate_key("acme", grace_s=1000)
    with pytest.raises(UnauthenticatedError):
        reg.authenticate(old)
    assert reg.authenticate(new) == reg.authenticate(newer) == tenant
    assert reg._conn().execute("SELECT COUNT(*) FROM api_keys").fetchone()[0] == 2


def test_rotation_without_grace_and_revocation(reg):
    tenant, old = reg.create_tenant("acme")
    new = reg.rotate_key("acme")
    with pytest.raises(UnauthenticatedError):
        reg.authenticate(old)
    assert reg.authenticate(new) == tenant
    newer = reg.rotate_key("acme", grace_s=100)
    assert reg.revoke_keys("acme", actor="sec") == 2
    for key in (old, new, newer):
        with pytest.raises(UnauthenticatedError):
            reg.authenticate(key)
    assert reg.authenticate(reg.rotate_key("acme")) == tenant  # a revoked tenant can get a new key
    for grace in (-1, float("inf"), "5"):
        with pytest.raises(InvalidArgumentError, match="grace_s"):
            reg.rotate_key("acme", grace_s=grace)
    with pytest.raises(NotFoundError, match="nobody"):
        reg.rotate_key("nobody")


# -- adapters ----------------------------------------------------------------------------------------

def test_adapter_versions_and_activation(reg, clock):
    tenant, _ = reg.create_tenant("acme")
    other, _ = reg.create_tenant("other")
    with pytest.raises(NotFoundError, match="sentiment.*tenant"):
        reg.get_active_adapter(tenant.id, "sentiment")
    records = [add(reg, tenant.id, i=i) for i in range(3)]
    assert [r.version for r in records] == [1, 2, 3]
    assert records[0].config == {"rank": 8} and records[0].head["labels"] == ["a", "b"]
    last = records[2]
    assert (last.sha256, last.size, last.created, last.kind) == (sha(2), 1002, clock.now, "lora")
    listed = reg.list_adapters(tenant.id, "sentiment")
    assert [r.is_active for r in listed] == [False, False, True]
    assert reg.get_active_adapter(tenant.id, "sentiment") == listed[2] == reg.get_adapter(records[2].id)

    staged = add(reg, tenant.id, i=3, activate=False)  # uploaded, not yet serving
    assert staged.version == 4 and not staged.is_active
    assert reg.get_active_adapter(tenant.id, "sentiment").version == 3
    assert reg.activate_version(tenant.id, "sentiment", 1, actor="ops").is_active
    actives = [r for r in reg.list_adapters(tenant.id) if r.is_active]
    assert [r.version for r in actives] == [1]
    with pytest.raises(NotFoundError, match="version 9"):
        reg.activate_version(tenant.id, "sentiment", 9, actor="ops")
    assert reg.get_active_adapter(tenant.id, "sentiment").version == 1  # a failed switch changes nothing

    # versions are numbered per (tenant, name); other tenants and names are independent
    assert add(reg, tenant.id, "ner", i=10).version == 1
    assert add(reg, other.id, "sentiment", i=11).version == 1
    assert len(reg.list_adapters(tenant.id)) == 5 and reg.list_adapters(other.id, "ner") == []

    # the partial unique index holds even against a direct write
    with pytest.raises(sqlite3.IntegrityError):
        reg._conn().execute("UPDATE adapters SET state = 'active' WHERE tenant_id = ? AND name = 'sentiment'",
                            (tenant.id,))


def test_adapter_arguments_are_validated(reg):
    tenant, _ = reg.create_tenant("acme")
    cases = [({"name": "Bad Name"}, NAME_RULE), ({"kind": "prefix"}, "kind"), ({"config": [1]}, "config"),
             ({"head": {"x": object()}}, "head"), ({"sha256": "ABC"}, "sha256"), ({"size": -1}, "size"),
             ({"actor": ""}, "actor"), ({"config": {"x": float("nan")}}, "config")]
    for change, words in cases:
        kw = dict(tenant_id=tenant.id, name="a", kind="lora", config={}, head={}, sha256=sha(0), size=1,
                  actor="ops")
        kw.update(change)
        with pytest.raises(InvalidArgumentError, match=words):
            reg.add_adapter_version(**kw)
    with pytest.raises(NotFoundError, match="tenant id 999"):
        add(reg, 999)
    assert reg.list_adapters(tenant.id) == []


def test_delete_adapter_and_referenced_shas(reg):
    tenant, _ = reg.create_tenant("acme")
    for i in range(3):
        add(reg, tenant.id, "a", i=i)
    b = add(reg, tenant.id, "b", i=1)  # shares a blob with a's version 2
    a = reg.list_adapters(tenant.id, "a")
    assert reg.referenced_shas() == {sha(0), sha(1), sha(2)}
    assert reg.delete_adapter(tenant.id, "a", actor="ops") == a
    assert reg.referenced_shas() == {sha(1)}
    with pytest.raises(NotFoundError, match="'a'.*acme"):
        reg.delete_adapter(tenant.id, "a", actor="ops")
    with pytest.raises(NotFoundError):
        reg.get_adapter(a[0].id)
    assert reg.list_adapters(tenant.id) == [b]
    c = add(reg, tenant.id, "a", i=5)
    assert c.version == 1 and c.id > a[-1].id  # ids are never reused (cache keys stay unambiguous)


def test_delete_tenant_returns_its_adapters(reg):
    tenant, _ = reg.create_tenant("acme")
    other, _ = reg.create_tenant("other")
    for name, i in (("a", 0), ("a", 1), ("b", 2)):
        add(reg, tenant.id, name, i=i)
    mine = reg.list_adapters(tenant.id)
    theirs = add(reg, other.id, "a", i=3)
    assert reg.delete_tenant("acme", actor="ops") == mine
    assert reg.referenced_shas() == {sha(3)} and reg.list_adapters(other.id) == [theirs]
    assert count(reg, "adapters", tenant.id) == 0
    assert reg.list_audit(target="acme")[0].action == "delete_tenant"  # the audit log outlives the tenant


# -- audit -------------------------------------------------------------------------------------------

def test_every_admin_action_is_audited_without_secrets(reg, clock, config):
    tenant, key = reg.create_tenant("acme", actor="alice")
    reg.update_quotas("acme", Quotas(burst=3), actor="bob")
    reg.set_status("acme", "suspended", actor="bob")
    new_key = reg.rotate_key("acme", grace_s=5, actor="sec")
    reg.revoke_keys("acme", actor="sec")
    add(reg, tenant.id, "a", i=0, actor="dev")
    add(reg, tenant.id, "a", i=1, actor="dev")
    reg.activate_version(tenant.id, "a", 1, actor="dev")
    reg.delete_adapter(tenant.id, "a", actor="dev")
    reg.delete_tenant("acme", actor="root")
    entries = reg.list_audit()
    assert [(e.action, e.actor, e.target) for e in reversed(entries)] == [
        ("create_tenant", "alice", "acme"), ("update_quotas", "bob", "acme"), ("set_status", "bob", "acme"),
        ("rotate_key", "sec", "acme"), ("revoke_keys", "sec", "acme"),
        ("add_adapter_version", "dev", "acme/a"), ("add_adapter_version", "dev", "acme/a"),
        ("activate_version", "dev", "acme/a"),
        ("delete_adapter", "dev", "acme/a"), ("delete_tenant", "root", "acme")]
    assert all(e.time == clock.now for e in entries)
    assert entries[-3].detail == {"before": "active", "after": "suspended"}
    assert entries[2].detail == {"version": 1} and entries[1].detail == {"versions": [1, 2]}
    assert [e.action for e in reg.list_audit(limit=2)] == ["delete_tenant", "delete_adapter"]
    assert [e.action for e in reg.list_audit(target="acme/a")][-1] == "add_adapter_version"
    text = " ".join(repr(e) for e in entries)
    for k in (key, new_key):
        assert k.split("_", 2)[2] not in text and parse_prefix(k) not in text
    digests = [bytes(r[0]).hex() for r in reg._conn().execute("SELECT digest FROM api_keys")]
    assert all(d not in text for d in digests)
    with pytest.raises(InvalidArgumentError, match="limit"):
        reg.list_audit(limit=0)


# -- schema, durability --------------------------------------------------------------------------------

def test_an_older_database_is_migrated_forward(config):
    config.path.parent.mkdir(parents=True)
    conn = sqlite3.connect(config.path, isolation_level=None)
    assert migrate(conn, target=1) == 1
    conn.execute("INSERT INTO tenants (name, created, status, requests_per_s, burst, max_tokens_per_request, "
                 "weight) VALUES ('old', 1.0, 'active', 5, 10, 128, 1.0)")
    assert "adapters" not in {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    conn.close()
    with SqliteRegistry(config) as reg:
        assert schema_version(reg._conn()) == SCHEMA_VERSION
        old = reg.get_tenant("old")
        assert old.quotas == Quotas(5, 10, 128, 1.0)
        assert add(reg, old.id).version == 1  # the version-2 tables work
        assert reg.authenticate(reg.rotate_key("old")) == old


def test_a_schema_3_database_gets_the_backbone_column(config):
    """Migration 4: adapters registered before decoders existed are encoder adapters; new versions
    can be decoder ones; a backbone outside BACKBONES is refused by the code and by the CHECK."""
    config.path.parent.mkdir(parents=True)
    conn = sqlite3.connect(config.path, isolation_level=None)
    assert migrate(conn, target=3) == 3
    conn.execute("INSERT INTO tenants (name, created, status, requests_per_s, burst, max_tokens_per_request, "
                 "weight) VALUES ('old', 1.0, 'active', 5, 10, 128, 1.0)")
    conn.execute("INSERT INTO adapters (tenant_id, name, version, kind, config, head, sha256, size, created, state) "
                 "VALUES (1, 'tickets', 1, 'lora', '{}', '{\"kind\": \"embed\"}', ?, 10, 1.0, 'active')", (sha(1),))
    assert "backbone" not in {r[1] for r in conn.execute("PRAGMA table_info(adapters)")}
    conn.close()
    with SqliteRegistry(config) as reg:
        assert schema_version(reg._conn()) == SCHEMA_VERSION == 4
        old = reg.get_tenant("old")
        assert reg.get_active_adapter(old.id, "tickets").backbone == "encoder"
        chat = reg.add_adapter_version(old.id, "chat", "lora", {}, {"kind": "generate"}, sha(2), 20, actor="ops",
                                       backbone="decoder")
        assert chat.backbone == "decoder" and reg.get_adapter(chat.id).backbone == "decoder"
        assert [r.backbone for r in reg.list_adapters(old.id)] == ["decoder", "encoder"]
        assert reg.list_audit(1)[0].detail["backbone"] == "decoder"
        with pytest.raises(InvalidArgumentError, match="backbone 'gpu' is not one of"):
            reg.add_adapter_version(old.id, "x", "lora", {}, {"kind": "embed"}, sha(3), 1, actor="ops", backbone="gpu")
        with pytest.raises(InvalidArgumentError, match="a generate head belongs on the decoder backbone"):
            reg.add_adapter_version(old.id, "x", "lora", {}, {"kind": "generate"}, sha(3), 1, actor="ops")
        with pytest.raises(InvalidArgumentError, match="a classify head belongs on the encoder backbone"):
            reg.add_adapter_version(old.id, "x", "lora", {}, {"kind": "classify", "labels": ["a"]}, sha(3), 1,
                                    actor="ops", backbone="decoder")
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            reg._conn().execute("UPDATE adapters SET backbone = 'gpu' WHERE id = ?", (chat.id,))
        assert [r.name for r in reg.list_adapters(old.id)] == ["chat", "tickets"]


def test_a_newer_database_is_refused_clearly(config):
    SqliteRegistry(config).close()
    conn = sqlite3.connect(config.path)
    conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()
    with pytest.raises(FailedPreconditionError, match=f"schema version {SCHEMA_VERSION + 1}.*newer"):
        SqliteRegistry(config)


def test_everything_survives_close_and_reopen(config, clock):
    reg = SqliteRegistry(config, clock=clock)
    tenant, key = reg.create_tenant("acme", Quotas(burst=9))
    rec = add(reg, tenant.id)
    reg.close()
    with pytest.raises(FailedPreconditionError, match="closed"):
        reg.get_tenant("acme")
    with SqliteRegistry(config, clock=clock) as again:
        assert again.authenticate(key) == tenant and again.get_tenant("acme").quotas.burst == 9
        assert again.get_active_adapter(tenant.id, "sentiment") == rec
        assert [e.action for e in again.list_audit()] == ["add_adapter_version", "create_tenant"]


def test_connections_of_ended_threads_are_closed(reg):
    for _ in range(3):
        t = threading.Thread(target=reg.count_tenants)
        t.start()
        t.join()
    reg.count_tenants()
    t = threading.Thread(target=reg.count_tenants)  # a new connection prunes those of ended threads
    t.start()
    t.join()
    assert len(reg._conns) == 2


_KILLED_WORKER = """
import sys
from manager.config import RegistryConfig
from manager.registry import SqliteRegistry
reg = SqliteRegistry(RegistryConfig(data_dir=sys.argv[1]))
tenant, _ = reg.create_tenant("base")
print("ready", flush=True)
i = 0
while True:
    t, key = reg.create_tenant(f"k{i}")
    reg.add_adapter_version(t.id, "a", "none", {}, {"kind": "embed"}, "0" * 64, 1, actor="w")
    reg.add_adapter_version(tenant.id, "a", "none", {}, {"kind": "embed"}, "0" * 64, 1, actor="w")
    print(key, flush=True)
    i += 1
"""


def test_sigkill_mid_registration_leaves_a_consistent_database(config):
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WORKER, config.data_dir], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    keys = [proc.stdout.readline().strip() for _ in range(5 + random.Random(0).randrange(10))]
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    keys += [line.strip() for line in proc.stdout.read().splitlines() if line.strip()]
    with SqliteRegistry(config) as reg:
        assert reg._conn().execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        for key in keys:  # every registration that returned is intact
            assert reg.authenticate(key).name.startswith("k")
        base = reg.get_tenant("base")
        versions = [r.version for r in reg.list_adapters(base.id)]
        assert versions == list(range(1, len(versions) + 1)) and len(versions) >= len(keys)
        assert sum(r.is_active for r in reg.list_adapters(base.id)) == 1
        for tenant in reg.list_tenants(page_size=1000)[0]:  # no tenant without its key
            assert count(reg, "api_keys", tenant.id) == 1


# -- concurrency -------------------------------------------------------------------------------------

def test_many_threads_writing_and_reading(config):
    reg = SqliteRegistry(config)
    shared, _ = reg.create_tenant("shared")
    readers = [reg.create_tenant(f"r{i}") for i in range(8)]
    for tenant, _ in readers:
        add(reg, tenant.id, "a", i=tenant.id)
    add(reg, shared.id, "hot", i=0)
    stop, errors, created = threading.Event(), [], [[] for _ in range(8)]
    counts = {"reads": 0, "writes": 0}

    def writer(w: int) -> None:
        rng, i = random.Random(w), 0
        try:
            while not stop.is_set() and i < 200:
                tenant, key = reg.create_tenant(f"w{w}-{i}")
                created[w].append((tenant.name, key))
                add(reg, shared.id, "hot", i=i, activate=rng.random() < 0.5, actor=f"w{w}")
                latest = reg.list_adapters(shared.id, "hot")[-1].version
                reg.activate_version(shared.id, "hot", rng.randint(1, latest), actor=f"w{w}")
                if i % 5 == 0:
                    reg.update_quotas(f"r{w}", Quotas(burst=10 + i), actor=f"w{w}")
                i += 1
                counts["writes"] += 1
        except BaseException as e:  # noqa: BLE001 - collected and reported below
            errors.append(e)

    def reader(r: int) -> None:
        rng = random.Random(100 + r)
        try:
            while not stop.is_set():
                tenant, key = readers[rng.randrange(8)]
                assert reg.authenticate(key).id == tenant.id
                assert reg.get_active_adapter(tenant.id, "a").version == 1
                assert reg.get_active_adapter(shared.id, "hot").is_active  # never zero active versions
                counts["reads"] += 1
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
    threads += [threading.Thread(target=reader, args=(r,)) for r in range(8)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    stop.set()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a thread is stuck (deadlock?)"
    assert not errors, errors[:3]
    assert counts["reads"] > 0 and counts["writes"] > 0
    try:
        for name, key in [c for per_writer in created for c in per_writer]:
            assert reg.authenticate(key).name == name
        assert reg.count_tenants() == 9 + sum(len(c) for c in created)
        hot = reg.list_adapters(shared.id, "hot")
        assert [r.version for r in hot] == list(range(1, len(hot) + 1))
        assert sum(r.is_active for r in hot) == 1
        actives = reg._conn().execute("SELECT tenant_id, name, COUNT(*) FROM adapters WHERE state = 'active' "
                                      "GROUP BY tenant_id, name HAVING COUNT(*) > 1").fetchall()
        assert actives == []
        assert reg._conn().execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert reg._conn().execute("PRAGMA foreign_key_check").fetchall() == []
    finally:
        reg.close()
