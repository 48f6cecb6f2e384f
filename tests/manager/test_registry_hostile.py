"""Issue 17: the registry database is private (mode 0600, like the admin token), and authentication
says how long a key stays valid so a cache of verified keys never outlives a grace period."""
from __future__ import annotations

import os
import sqlite3
import stat

import pytest

from manager.config import RegistryConfig
from manager.errors import UnauthenticatedError
from manager.registry import open_registry

FAST = dict(scrypt_n=2**4, scrypt_r=1, scrypt_p=1)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_database_and_its_wal_and_shm_are_0600(tmp_path, umask_022):
    config = RegistryConfig(data_dir=str(tmp_path / "var"), **FAST)
    reg = open_registry(config)
    try:
        reg.create_tenant("acme")                       # a write: the -wal and -shm files exist now
        files = [config.path, config.path.with_name(config.path.name + "-wal"),
                 config.path.with_name(config.path.name + "-shm")]
        assert all(p.exists() for p in files)
        assert {p.name: mode(p) for p in files} == {p.name: 0o600 for p in files}
    finally:
        reg.close()


def test_existing_world_readable_database_is_tightened_at_open(tmp_path, umask_022):
    config = RegistryConfig(data_dir=str(tmp_path), **FAST)
    reg = open_registry(config)
    _, key = reg.create_tenant("acme")
    reg.close()
    db = sqlite3.connect(config.path)                   # an older server's files: 0644, with a -wal
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("CREATE TABLE IF NOT EXISTS scratch (x)")
    wal = config.path.with_name(config.path.name + "-wal")
    for p in (config.path, wal):
        if p.exists():
            os.chmod(p, 0o644)
    reg = open_registry(config)
    try:
        assert reg.authenticate(key).name == "acme"     # the data is intact
        assert mode(config.path) == 0o600
        if wal.exists():
            assert mode(wal) == 0o600
    finally:
        reg.close()
        db.close()


def test_authenticate_valid_for_counts_down_to_the_grace_periods_end(tmp_path):
    now = [1000.0]
    reg = open_registry(RegistryConfig(data_dir=str(tmp_path), **FAST), clock=lambda: now[0])
    try:
        tenant, old = reg.create_tenant("acme")
        assert reg.authenticate_valid_for(old) == (tenant, None)        # no expiry until rotated
        new = reg.rotate_key("acme", grace_s=2.0)
        now[0] += 0.5
        got, valid_for = reg.authenticate_valid_for(old)
        assert got == tenant and valid_for == pytest.approx(1.5)
        assert reg.authenticate_valid_for(new) == (tenant, None)
        now[0] += 1.5
        with pytest.raises(UnauthenticatedError):
            reg.authenticate_valid_for(old)
        with pytest.raises(UnauthenticatedError):
            reg.authenticate(old)
    finally:
        reg.close()
