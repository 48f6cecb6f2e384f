"""Crash safety with real processes: SIGKILL a worker in the middle of adapter uploads and tenant
registrations, many times at random points; after each restart the registry and the store are
consistent and everything committed before the kill is intact."""
from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from manager.manager import Manager, ManagerConfig
from vbert import BackboneConfig, EncodeRow, ModelConfig, MultiTenantModel, PoolConfig

ROOT = Path(__file__).resolve().parents[2]
KILLS_PER_MODE = 4


def run_and_kill(backbone, data_dir, log, mode, seed, rng) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "tests.manager.crash_worker", "--backbone", str(backbone),
                             "--data-dir", str(data_dir), "--log", str(log), "--mode", mode, "--seed", str(seed)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while f'"ready": {seed}' not in (log.read_text() if log.exists() else ""):
        if proc.poll() is not None:
            raise AssertionError(f"worker died before ready: {proc.stderr.read().decode()[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("worker never became ready")
        time.sleep(0.02)
    time.sleep(rng.uniform(0.05, 1.5))     # a random point in the loop of writes
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL


def check_consistent(backbone, data_dir, log) -> int:
    model = MultiTenantModel(ModelConfig(BackboneConfig(path=str(backbone), device="cpu"),
                                         PoolConfig(num_lora_slots=2, num_bottleneck_slots=2, max_lora_rank=8,
                                                    max_bottleneck_size=16, max_labels=8)))
    manager = Manager(ManagerConfig.under(str(data_dir)), model)   # start-up recovery runs here
    try:
        db = sqlite3.connect(manager.config.registry.path)
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        db.close()
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        latest = {}
        for r in records:
            if "key" in r:      # every committed tenant and key survives
                assert manager.authenticate(r["key"]).name == r["tenant"]
            if "adapter" in r:
                latest[(r["tenant"], r["adapter"])] = r
        referenced = manager.registry.referenced_shas()
        for (tenant, adapter), r in latest.items():
            versions = {rec.version: rec for rec in manager.list_adapters(tenant) if rec.name == adapter}
            assert versions[r["version"]].sha256 == r["sha256"]
        # no orphan or half-written file remains; every referenced blob verifies
        assert manager.store.list_shas() == referenced
        assert not [p for p in Path(manager.store.root).rglob("*") if p.name.startswith(".tmp")]
        for sha in referenced:
            manager.store.verify(sha)
        # and the newest adapter still serves through the cache
        if latest:
            (tenant, adapter), _ = max(latest.items(), key=lambda kv: kv[1]["version"])
            ref = manager.resolve(manager.get_tenant(tenant), adapter)
            with manager.cache.use([ref.adapter_id], timeout=30) as (slot,):
                (out,) = model.forward([EncodeRow([2, 7, 8, 3], slot)])
            assert out.kind.value == ref.head.kind.value
        return len(records)
    finally:
        manager.close()


@pytest.mark.slow
def test_sigkill_during_uploads_and_registrations_leaves_consistent_state(tiny_checkpoint, tmp_path):
    rng = random.Random(int(os.environ.get("VBERT_CRASH_SEED", "7")))
    data_dir, log = tmp_path / "var", tmp_path / "committed.jsonl"
    committed = 0
    for k in range(2 * KILLS_PER_MODE):
        run_and_kill(tiny_checkpoint, data_dir, log, ("upload", "register")[k % 2], k, rng)
        n = check_consistent(tiny_checkpoint, data_dir, log)
        assert n >= committed
        committed = n
    assert committed > 2 * KILLS_PER_MODE, "the workers committed work between kills"
