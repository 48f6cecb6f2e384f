"""The durable tenant registry: tenants, their API keys, their adapter versions, an audit log.

Behind one small interface (`Registry`) so another SQL database can be plugged in later; the
implementation here is SQLite (`SqliteRegistry`): WAL mode, synchronous=FULL, one connection per
thread, every write one `BEGIN IMMEDIATE` transaction that also writes its audit entry, so a killed
process leaves either all of an action or none of it. The schema is versioned; forward migrations
are applied at start-up, one transaction each.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, astuple
from typing import Protocol, runtime_checkable

from manager.config import RegistryConfig
from manager.errors import (AlreadyExistsError, FailedPreconditionError, InvalidArgumentError, NotFoundError,
                            UnauthenticatedError)
from manager.records import (TENANT_STATUSES, ADAPTER_KINDS, MAX_PAGE_SIZE, MAX_PROBLEM_CHARS, _SHA256_RE,
                             _UNAUTHENTICATED, validate_name, _adapter, _check_int, _check_number, _check_quotas,
                             _json, _tenant, check_backbone, check_head, Quotas, Tenant, AdapterRecord, AuditEntry)
from manager.keys import (IssuedKey, ScryptParams, burn_hash, issue_key, parse_prefix, verify_key,
                          with_new_prefix)

# Forward migrations: MIGRATIONS[i] takes the schema from version i to i + 1. Append only.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 1: tenants, their API keys (salted hashes only), the audit log
        """CREATE TABLE tenants (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT NOT NULL UNIQUE,
            created REAL NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('active', 'suspended')),
            requests_per_s REAL NOT NULL, burst INTEGER NOT NULL,
            max_tokens_per_request INTEGER NOT NULL, weight REAL NOT NULL)""",
        """CREATE TABLE api_keys (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            tenant_id INTEGER NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
            prefix TEXT NOT NULL, salt BLOB NOT NULL, digest BLOB NOT NULL,
            scrypt_n INTEGER NOT NULL, scrypt_r INTEGER NOT NULL, scrypt_p INTEGER NOT NULL,
            created REAL NOT NULL, expires REAL)""",
        "CREATE UNIQUE INDEX api_keys_by_prefix ON api_keys(prefix)",
        "CREATE INDEX api_keys_by_tenant ON api_keys(tenant_id)",
        """CREATE TABLE audit (
            id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, actor TEXT NOT NULL,
            action TEXT NOT NULL, target TEXT NOT NULL, detail TEXT NOT NULL)""",
    ),
    (  # 2: the adapter catalogue, at most one active version per (tenant, name); audit by target
        """CREATE TABLE adapters (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            tenant_id INTEGER NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
            name TEXT NOT NULL, version INTEGER NOT NULL CHECK (version >= 1),
            kind TEXT NOT NULL CHECK (kind IN ('lora', 'bottleneck', 'none')),
            config TEXT NOT NULL, head TEXT NOT NULL,
            sha256 TEXT NOT NULL, size INTEGER NOT NULL CHECK (size >= 0), created REAL NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('active', 'inactive')),
            UNIQUE (tenant_id, name, version))""",
        "CREATE UNIQUE INDEX adapters_one_active ON adapters(tenant_id, name) WHERE state = 'active'",
        "CREATE INDEX adapters_by_sha256 ON adapters(sha256)",
        "CREATE INDEX audit_by_target ON audit(target, id)",
    ),
    (  # 3: quarantine: a version an older server let in that fails today's checks keeps its row, inactive,
       # with the problem in words (NULL: usable); activate_version refuses it
        "ALTER TABLE adapters ADD COLUMN problem TEXT",
    ),
    (  # 4: the backbone an adapter runs on (vbert.heads.BACKBONES); every older row is an encoder adapter
        "ALTER TABLE adapters ADD COLUMN backbone TEXT NOT NULL DEFAULT 'encoder' "
        "CHECK (backbone IN ('encoder', 'decoder'))",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

_AUTHENTICATE_SQL = """SELECT t.*, k.salt, k.digest, k.scrypt_n, k.scrypt_r, k.scrypt_p, k.expires
    FROM api_keys AS k JOIN tenants AS t ON t.id = k.tenant_id WHERE k.prefix = ?"""


def schema_version(conn: sqlite3.Connection) -> int:
    """The database's schema version (0 for an empty database)."""
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version "
                 "(id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)")
    row = conn.execute("SELECT version FROM schema_version WHERE id = 1").fetchone()
    return 0 if row is None else int(row[0])


def migrate(conn: sqlite3.Connection, target: int | None = None) -> int:
    """Apply the missing migrations up to `target` (default: all), one transaction each; returns the
    version reached. A database newer than this code is refused (FailedPreconditionError)."""
    target = SCHEMA_VERSION if target is None else target
    if not 0 <= target <= SCHEMA_VERSION:
        raise ValueError(f"target schema version must be in 0..{SCHEMA_VERSION}, got {target}")
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = schema_version(conn)
            if version > SCHEMA_VERSION:
                raise FailedPreconditionError(
                    f"registry database has schema version {version}, newer than version {SCHEMA_VERSION} "
                    f"known to this code; run a newer server or restore a matching backup")
            if version >= target:
                conn.execute("COMMIT")
                return version
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version (id, version) VALUES (1, ?) "
                         "ON CONFLICT (id) DO UPDATE SET version = excluded.version", (version + 1,))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


@runtime_checkable
class Registry(Protocol):
    """What the rest of the server needs from the registry; any SQL database can implement it."""

    def create_tenant(self, name: str, quotas: Quotas | None = None, actor: str = "admin"
                      ) -> tuple[Tenant, str]: ...
    def get_tenant(self, name: str) -> Tenant: ...
    def get_tenant_by_id(self, tenant_id: int) -> Tenant: ...
    def list_tenants(self, page_size: int = 100, page_token: str | None = None
                     ) -> tuple[list[Tenant], str | None]: ...
    def count_tenants(self) -> int: ...
    def update_quotas(self, name: str, quotas: Quotas, actor: str) -> Tenant: ...
    def set_status(self, name: str, status: str, actor: str) -> Tenant: ...
    def delete_tenant(self, name: str, actor: str) -> list[AdapterRecord]: ...
    def rotate_key(self, name: str, grace_s: float = 0, actor: str = "admin") -> str: ...
    def revoke_keys(self, name: str, actor: str = "admin") -> int: ...
    def authenticate(self, key: str) -> Tenant: ...
    def authenticate_valid_for(self, key: str) -> tuple[Tenant, float | None]: ...
    def add_adapter_version(self, tenant_id: int, name: str, kind: str, config: dict, head: dict, sha256: str,
                            size: int, actor: str, activate: bool = True, backbone: str = "encoder"
                            ) -> AdapterRecord: ...
    def activate_version(self, tenant_id: int, name: str, version: int, actor: str) -> AdapterRecord: ...
    def get_active_adapter(self, tenant_id: int, name: str) -> AdapterRecord: ...
    def get_adapter(self, adapter_id: int) -> AdapterRecord: ...
    def list_adapters(self, tenant_id: int, name: str | None = None) -> list[AdapterRecord]: ...
    def delete_adapter(self, tenant_id: int, name: str, actor: str) -> list[AdapterRecord]: ...
    def list_usable_adapters(self) -> list[AdapterRecord]: ...
    def quarantine_version(self, adapter_id: int, problem: str, actor: str) -> AdapterRecord: ...
    def referenced_shas(self) -> set[str]: ...
    def list_audit(self, limit: int = 100, target: str | None = None) -> list[AuditEntry]: ...
    def close(self) -> None: ...


def _one(conn: sqlite3.Connection, sql: str, args: tuple, what: str) -> sqlite3.Row:
    row = conn.execute(sql, args).fetchone()
    if row is None:
        raise NotFoundError(f"{what} not found")
    return row


def _check_actor(actor: object) -> str:
    if not isinstance(actor, str) or not actor or len(actor) > 256:
        raise InvalidArgumentError(f"actor must be a non-empty string of <= 256 characters, got {actor!r}")
    return actor


def _make_private(path) -> None:
    """The database (key hashes, audit log) is mode 0600 like the admin token: an empty file is created
    so (sqlite would make it 0644), an existing one and its -wal/-shm files are tightened; sqlite gives
    the -wal/-shm files it creates the main file's mode."""
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT, 0o600))
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if p.exists() and p.stat().st_mode & 0o077:
            p.chmod(0o600)


class SqliteRegistry(Registry):
    """The registry in one SQLite file (see the module docstring). Thread-safe; `close()` when done."""

    def __init__(self, config: RegistryConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._clock = clock
        self._params = ScryptParams(config.scrypt_n, config.scrypt_r, config.scrypt_p)
        self._path = config.path
        self._path.parent.mkdir(parents=True, exist_ok=True)
        _make_private(self._path)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._closed = False
        try:
            conn = self._conn()
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise FailedPreconditionError(f"cannot enable WAL mode (got {mode})")
            migrate(conn)
        except FailedPreconditionError as e:
            self.close()
            raise FailedPreconditionError(f"registry database {self._path}: {e}") from None
        except BaseException:
            self.close()
            raise

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None and not self._closed:
            return conn
        with self._lock:
            if self._closed:
                raise FailedPreconditionError(f"registry {self._path} is closed")
            conn = sqlite3.connect(str(self._path), timeout=self.config.busy_timeout_ms / 1000,
                                   isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(self.config.busy_timeout_ms)}")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            alive = []  # close the connections of threads that have ended
            for thread, other in self._conns:
                if thread.is_alive():
                    alive.append((thread, other))
                else:
                    other.close()
            self._conns = alive + [(threading.current_thread(), conn)]
        self._local.conn = conn
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; the lock is taken up front, so concurrent writers queue, never deadlock."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Close every connection (of all threads); the registry cannot be used afterwards."""
        with self._lock:
            self._closed = True
            conns, self._conns = self._conns, []
        for _, conn in conns:
            conn.close()

    def __enter__(self) -> SqliteRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _audit(self, conn: sqlite3.Connection, actor: str, action: str, target: str, detail: dict) -> None:
        conn.execute("INSERT INTO audit (time, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)",
                     (self._clock(), actor, action, target, json.dumps(detail, sort_keys=True)))

    def _tenant_row(self, conn: sqlite3.Connection, name: str) -> sqlite3.Row:
        return _one(conn, "SELECT * FROM tenants WHERE name = ?", (validate_name(name),), f"tenant {name!r}")

    def _tenant_id_row(self, conn: sqlite3.Connection, tenant_id: int) -> sqlite3.Row:
        return _one(conn, "SELECT * FROM tenants WHERE id = ?", (_check_int("tenant id", tenant_id),),
                    f"tenant id {tenant_id}")

    def create_tenant(self, name: str, quotas: Quotas | None = None, actor: str = "admin"
                      ) -> tuple[Tenant, str]:
        """A new active tenant and its API key; the key is returned once and never stored."""
        validate_name(name)
        _check_actor(actor)
        quotas = _check_quotas(Quotas() if quotas is None else quotas)
        issued = issue_key(self._params)  # the slow hash stays outside the write lock
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM tenants WHERE name = ?", (name,)).fetchone():
                raise AlreadyExistsError(f"tenant {name!r} already exists")
            now = self._clock()
            tenant_id = conn.execute(
                "INSERT INTO tenants (name, created, status, requests_per_s, burst, max_tokens_per_request, "
                "weight) VALUES (?, ?, 'active', ?, ?, ?, ?)", (name, now, *astuple(quotas))).lastrowid
            issued = self._insert_key(conn, tenant_id, issued, now)
            self._audit(conn, actor, "create_tenant", name, {"quotas": asdict(quotas)})
            tenant = _tenant(self._tenant_id_row(conn, tenant_id))
        return tenant, issued.key

    def get_tenant(self, name: str) -> Tenant:
        return _tenant(self._tenant_row(self._conn(), name))

    def get_tenant_by_id(self, tenant_id: int) -> Tenant:
        return _tenant(self._tenant_id_row(self._conn(), tenant_id))

    def list_tenants(self, page_size: int = 100, page_token: str | None = None
                     ) -> tuple[list[Tenant], str | None]:
        """One page of tenants in id order and the token of the next page (None after the last)."""
        _check_int("page_size", page_size, 1, MAX_PAGE_SIZE)
        after = 0
        if page_token is not None:
            if not isinstance(page_token, str) or not page_token.isdigit() or len(page_token) > 18:
                raise InvalidArgumentError(f"page_token {page_token!r} was not returned by list_tenants")
            after = int(page_token)
        rows = self._conn().execute("SELECT * FROM tenants WHERE id > ? ORDER BY id LIMIT ?",
                                    (after, page_size + 1)).fetchall()
        tenants = [_tenant(row) for row in rows[:page_size]]
        return tenants, (str(tenants[-1].id) if len(rows) > page_size else None)

    def count_tenants(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM tenants").fetchone()[0]

    def update_quotas(self, name: str, quotas: Quotas, actor: str) -> Tenant:
        _check_actor(actor)
        _check_quotas(quotas)
        with self._write() as conn:
            row = self._tenant_row(conn, name)
            conn.execute("UPDATE tenants SET requests_per_s = ?, burst = ?, max_tokens_per_request = ?, "
                         "weight = ? WHERE id = ?", (*astuple(quotas), row["id"]))
            self._audit(conn, actor, "update_quotas", name,
                        {"before": asdict(_tenant(row).quotas), "after": asdict(quotas)})
            return _tenant(self._tenant_id_row(conn, row["id"]))

    def set_status(self, name: str, status: str, actor: str) -> Tenant:
        _check_actor(actor)
        if status not in TENANT_STATUSES:
            raise InvalidArgumentError(f"tenant status {status!r} is not one of {TENANT_STATUSES}")
        with self._write() as conn:
            row = self._tenant_row(conn, name)
            conn.execute("UPDATE tenants SET status = ? WHERE id = ?", (status, row["id"]))
            self._audit(conn, actor, "set_status", name, {"before": row["status"], "after": status})
            return _tenant(self._tenant_id_row(conn, row["id"]))

    def delete_tenant(self, name: str, actor: str) -> list[AdapterRecord]:
        """Remove the tenant, its keys and its adapters; returns the adapter versions removed."""
        _check_actor(actor)
        with self._write() as conn:
            row = self._tenant_row(conn, name)
            removed = [_adapter(r) for r in conn.execute(
                "SELECT * FROM adapters WHERE tenant_id = ? ORDER BY name, version", (row["id"],))]
            conn.execute("DELETE FROM tenants WHERE id = ?", (row["id"],))  # keys, adapters: by cascade
            self._audit(conn, actor, "delete_tenant", name,
                        {"tenant_id": row["id"], "num_adapters": len(removed)})
        return removed

    def _insert_key(self, conn: sqlite3.Connection, tenant_id: int, issued: IssuedKey,
                    now: float) -> IssuedKey:
        while conn.execute("SELECT 1 FROM api_keys WHERE prefix = ?", (issued.prefix,)).fetchone():
            issued = with_new_prefix(issued)  # a prefix collision: ~1 in 2**47 per existing key
        conn.execute("INSERT INTO api_keys (tenant_id, prefix, salt, digest, scrypt_n, scrypt_r, scrypt_p, "
                     "created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     (tenant_id, issued.prefix, issued.salt, issued.digest, issued.params.n, issued.params.r,
                      issued.params.p, now))
        return issued

    def rotate_key(self, name: str, grace_s: float = 0, actor: str = "admin") -> str:
        """A new key for the tenant, returned once; its older keys stay valid for grace_s seconds more
        (0: refused at once)."""
        _check_actor(actor)
        grace_s = _check_number("grace_s", grace_s, is_zero_ok=True)
        issued = issue_key(self._params)
        with self._write() as conn:
            tenant_id = self._tenant_row(conn, name)["id"]
            now = self._clock()
            conn.execute("DELETE FROM api_keys WHERE tenant_id = ? AND (? = 0 OR expires <= ?)",
                         (tenant_id, grace_s, now))
            conn.execute("UPDATE api_keys SET expires = MIN(COALESCE(expires, ?1), ?1) WHERE tenant_id = ?2",
                         (now + grace_s, tenant_id))
            issued = self._insert_key(conn, tenant_id, issued, now)
            self._audit(conn, actor, "rotate_key", name, {"grace_s": grace_s})
        return issued.key

    def revoke_keys(self, name: str, actor: str = "admin") -> int:
        """Refuse every key of the tenant from now on (rotate_key issues a new one); returns how many."""
        _check_actor(actor)
        with self._write() as conn:
            tenant_id = self._tenant_row(conn, name)["id"]
            num_keys = conn.execute("DELETE FROM api_keys WHERE tenant_id = ?", (tenant_id,)).rowcount
            self._audit(conn, actor, "revoke_keys", name, {"num_keys": num_keys})
        return num_keys

    def authenticate(self, key: str) -> Tenant:
        """The tenant owning the key, suspended or not (the caller checks `is_active`).

        Unknown, malformed, wrong, expired and revoked keys all raise the same UnauthenticatedError.
        """
        return self.authenticate_valid_for(key)[0]

    def authenticate_valid_for(self, key: str) -> tuple[Tenant, float | None]:
        """`authenticate`, and for how many more seconds the key is valid (> 0; None: until rotated or
        revoked), so a cache of verified keys never outlives a rotation's grace period."""
        prefix = parse_prefix(key)
        if prefix is None:
            raise UnauthenticatedError(_UNAUTHENTICATED)
        row = self._conn().execute(_AUTHENTICATE_SQL, (prefix,)).fetchone()
        if row is None:
            burn_hash(self._params)
            raise UnauthenticatedError(_UNAUTHENTICATED)
        params = ScryptParams(row["scrypt_n"], row["scrypt_r"], row["scrypt_p"])
        is_valid = verify_key(key, row["salt"], row["digest"], params)
        valid_for = None if row["expires"] is None else row["expires"] - self._clock()
        if not is_valid or (valid_for is not None and valid_for <= 0):
            raise UnauthenticatedError(_UNAUTHENTICATED)
        return _tenant(row), valid_for

    def add_adapter_version(self, tenant_id: int, name: str, kind: str, config: dict, head: dict, sha256: str,
                            size: int, actor: str, activate: bool = True, backbone: str = "encoder"
                            ) -> AdapterRecord:
        """Version n + 1 of the tenant's adapter `name` on `backbone`; with activate, it replaces the active
        version."""
        validate_name(name, "adapter")
        _check_actor(actor)
        if kind not in ADAPTER_KINDS:
            raise InvalidArgumentError(f"adapter kind {kind!r} is not one of {ADAPTER_KINDS}")
        config_json, head_json = _json("adapter config", config), _json("head spec", head)
        if not isinstance(sha256, str) or not _SHA256_RE.fullmatch(sha256):
            raise InvalidArgumentError(f"sha256 {sha256!r} must be 64 lowercase hex digits")
        _check_int("adapter size", size, 0)
        check_head(head, backbone)   # the head schema (vbert.heads), of the backbone's kind
        with self._write() as conn:
            tenant = self._tenant_id_row(conn, tenant_id)
            version = conn.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM adapters "
                                   "WHERE tenant_id = ? AND name = ?", (tenant_id, name)).fetchone()[0]
            if activate:
                conn.execute("UPDATE adapters SET state = 'inactive' "
                             "WHERE tenant_id = ? AND name = ? AND state = 'active'", (tenant_id, name))
            adapter_id = conn.execute(
                "INSERT INTO adapters (tenant_id, name, version, kind, config, head, sha256, size, created, "
                "state, backbone) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (tenant_id, name, version, kind, config_json, head_json, sha256, size, self._clock(),
                 "active" if activate else "inactive", backbone)).lastrowid
            detail = {"version": version, "kind": kind, "sha256": sha256, "size": size, "activate": activate,
                      "backbone": backbone}
            self._audit(conn, actor, "add_adapter_version", f"{tenant['name']}/{name}", detail)
            return self._adapter_by_id(conn, adapter_id)

    def activate_version(self, tenant_id: int, name: str, version: int, actor: str) -> AdapterRecord:
        """Make `version` the one active version, atomically (readers see the old or the new one)."""
        _check_actor(actor)
        _check_int("adapter version", version)
        with self._write() as conn:
            tenant = self._tenant_id_row(conn, tenant_id)
            row = _one(conn, "SELECT id, problem FROM adapters WHERE tenant_id = ? AND name = ? AND version = ?",
                       (tenant_id, validate_name(name, "adapter"), version),
                       f"adapter {name!r} version {version} of tenant {tenant['name']!r}")
            if row["problem"] is not None:
                raise FailedPreconditionError(f"adapter {name!r} version {version} of tenant {tenant['name']!r} "
                                              f"is quarantined: {row['problem']}")
            conn.execute("UPDATE adapters SET state = 'inactive' "
                         "WHERE tenant_id = ? AND name = ? AND state = 'active'", (tenant_id, name))
            conn.execute("UPDATE adapters SET state = 'active' WHERE id = ?", (row["id"],))
            self._audit(conn, actor, "activate_version", f"{tenant['name']}/{name}", {"version": version})
            return self._adapter_by_id(conn, row["id"])

    def get_active_adapter(self, tenant_id: int, name: str) -> AdapterRecord:
        """The version serving now (inference path: one indexed lookup)."""
        return _adapter(_one(self._conn(), "SELECT * FROM adapters WHERE tenant_id = ? AND name = ? "
                             "AND state = 'active'", (_check_int("tenant id", tenant_id), name),
                             f"active version of adapter {name!r} of tenant id {tenant_id}"))

    def _adapter_by_id(self, conn: sqlite3.Connection, adapter_id: int) -> AdapterRecord:
        adapter_id = _check_int("adapter id", adapter_id)
        row = _one(conn, "SELECT * FROM adapters WHERE id = ?", (adapter_id,), f"adapter id {adapter_id}")
        return _adapter(row)

    def get_adapter(self, adapter_id: int) -> AdapterRecord:
        return self._adapter_by_id(self._conn(), adapter_id)

    def list_adapters(self, tenant_id: int, name: str | None = None) -> list[AdapterRecord]:
        """Every version of the tenant's adapters (of `name` only, if given), by name and version."""
        sql, args = "SELECT * FROM adapters WHERE tenant_id = ?", [_check_int("tenant id", tenant_id)]
        if name is not None:
            sql, args = sql + " AND name = ?", args + [name]
        return [_adapter(row) for row in self._conn().execute(sql + " ORDER BY name, version", args)]

    def delete_adapter(self, tenant_id: int, name: str, actor: str) -> list[AdapterRecord]:
        """Remove every version of the adapter; returns them so the caller can clean store and cache."""
        _check_actor(actor)
        with self._write() as conn:
            tenant = self._tenant_id_row(conn, tenant_id)
            rows = conn.execute("SELECT * FROM adapters WHERE tenant_id = ? AND name = ? ORDER BY version",
                                (tenant_id, name))
            removed = [_adapter(row) for row in rows]
            if not removed:
                raise NotFoundError(f"adapter {name!r} of tenant {tenant['name']!r} not found")
            conn.execute("DELETE FROM adapters WHERE tenant_id = ? AND name = ?", (tenant_id, name))
            self._audit(conn, actor, "delete_adapter", f"{tenant['name']}/{name}",
                        {"versions": [r.version for r in removed]})
        return removed

    def list_usable_adapters(self) -> list[AdapterRecord]:
        """Every version not quarantined, of every tenant, by id (for the start-up check)."""
        return [_adapter(row) for row in self._conn().execute("SELECT * FROM adapters WHERE problem IS NULL "
                                                              "ORDER BY id")]

    def quarantine_version(self, adapter_id: int, problem: str, actor: str) -> AdapterRecord:
        """Make one version unusable for good: inactive, its problem recorded (listed, never activated
        again; deleting the adapter removes it), with an audit entry."""
        _check_actor(actor)
        if not isinstance(problem, str) or not problem:
            raise InvalidArgumentError(f"problem must be a non-empty string, got {problem!r}")
        problem = problem[:MAX_PROBLEM_CHARS]
        with self._write() as conn:
            rec = self._adapter_by_id(conn, adapter_id)
            tenant = self._tenant_id_row(conn, rec.tenant_id)
            conn.execute("UPDATE adapters SET state = 'inactive', problem = ? WHERE id = ?", (problem, rec.id))
            self._audit(conn, actor, "quarantine_version", f"{tenant['name']}/{rec.name}",
                        {"version": rec.version, "sha256": rec.sha256, "was_active": rec.is_active,
                         "problem": problem})
            return self._adapter_by_id(conn, rec.id)

    def referenced_shas(self) -> set[str]:
        """Every artifact sha256 some adapter version still refers to (the rest may be collected)."""
        return {row[0] for row in self._conn().execute("SELECT DISTINCT sha256 FROM adapters")}

    def list_audit(self, limit: int = 100, target: str | None = None) -> list[AuditEntry]:
        """The latest audit entries, newest first; `target` is a tenant name or "tenant/adapter"."""
        _check_int("limit", limit, 1, MAX_PAGE_SIZE)
        sql, args = "SELECT * FROM audit", []
        if target is not None:
            sql, args = sql + " WHERE target = ?", [target]
        rows = self._conn().execute(sql + " ORDER BY id DESC LIMIT ?", args + [limit])
        return [AuditEntry(r["id"], r["time"], r["actor"], r["action"], r["target"], json.loads(r["detail"]))
                for r in rows]


def open_registry(config: RegistryConfig, clock: Callable[[], float] = time.time) -> Registry:
    """The registry described by `config` (SQLite today), migrated to the current schema."""
    return SqliteRegistry(config, clock=clock)


__all__ = ["ADAPTER_KINDS", "MIGRATIONS", "SCHEMA_VERSION", "TENANT_STATUSES", "AdapterRecord", "AuditEntry",
           "Quotas", "Registry", "SqliteRegistry", "Tenant", "migrate", "open_registry", "schema_version",
           "validate_name"]
