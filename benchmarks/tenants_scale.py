"""Scale of the manager: N tenants, each with its own adapter, served through the tiered cache
with fewer device slots than tenants.

    python benchmarks/tenants_scale.py --tenants 10000 --json benchmarks/results/cpu-DATE/tenants_scale.json

Phase 1 registers N tenants (registry + key hash) and uploads one adapter each (validate, store,
register). Phase 2 serves random single-row requests; each resolves (tenant, adapter) to the active
version, makes it resident (cold: from disk or host memory into a pool slot) and runs the forward.
Writes JSON + a PNG of the latency distributions next to it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from manager.cache import CacheConfig
from manager.manager import Manager, ManagerConfig
from vbert import (AdapterArtifact, BackboneConfig, EncodeRow, Head, HeadKind, HeadSpec, LoraAdapter, ModelConfig,
                   MultiTenantModel, PoolConfig)


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def pct(values, q) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def register(manager: Manager, shape, n: int, rank: int, seed: int) -> tuple[list[str], int]:
    g = torch.Generator().manual_seed(seed)
    names, errors = [], 0
    for i in tqdm(range(n), desc="registering tenants", unit="tenant"):
        name = f"tenant-{i:05d}"
        try:
            manager.create_tenant(name)
            head = HeadSpec(HeadKind.CLASSIFY, tuple(f"c{j}" for j in range(2 + i % 5)))
            art = AdapterArtifact(LoraAdapter.random(shape, rank=rank, generator=g),
                                  Head.random(head, shape.hidden_size, generator=g))
            manager.upload_adapter(name, "main", art)
            names.append(name)
        except Exception as e:  # noqa: BLE001 - counted, reported in the JSON
            errors += 1
            tqdm.write(f"registration {name} failed: {e}")
    return names, errors


def serve(manager: Manager, model: MultiTenantModel, names: list[str], requests: int, seed: int) -> dict:
    rng = random.Random(seed)
    ids = model.tokenize(["The patient responded well to the treatment."])[0]
    cold, warm, errors = [], [], 0
    for _ in tqdm(range(requests), desc="serving requests", unit="req"):
        name = rng.choice(names)
        try:
            tenant = manager.get_tenant(name)
            ref = manager.resolve(tenant, "main")
            was_resident = manager.cache.is_resident(ref.adapter_id)
            t0 = time.perf_counter()
            manager.cache.prefetch([ref.adapter_id]).result(60)
            (slot,) = manager.cache.resolve([ref.adapter_id])
            dt = (time.perf_counter() - t0) * 1000
            try:
                (out,) = model.forward([EncodeRow(ids, slot)])
            finally:
                manager.cache.release([ref.adapter_id])
            if out.logits.shape[0] != len(ref.head.labels):
                raise RuntimeError(f"{name}: {out.logits.shape[0]} logits for {len(ref.head.labels)} labels")
            (warm if was_resident else cold).append(dt)
            # the same tenant again right away: a warm resolve (registry lookup + cache hit)
            t0 = time.perf_counter()
            ref = manager.resolve(manager.get_tenant(name), "main")
            manager.cache.prefetch([ref.adapter_id]).result(60)
            manager.cache.resolve([ref.adapter_id])
            warm.append((time.perf_counter() - t0) * 1000)
            manager.cache.release([ref.adapter_id])
        except Exception as e:  # noqa: BLE001 - counted, reported in the JSON
            errors += 1
            tqdm.write(f"request for {name} failed: {e}")
    return {"cold": cold, "warm": warm, "errors": errors}


def plot(path: Path, cold, warm) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for values, label in ((cold, "cold load (disk/host -> device slot)"), (warm, "warm resolve")):
        if values:
            xs = np.sort(values)
            ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=label)
    ax.set_xscale("log")
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of requests")
    ax.set_title("adapter residency latency (CDF)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tenants", type=int, required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--device-slots", type=int, default=None, help="LoRA pool slots (default: tenants // 10)")
    p.add_argument("--host-budget-mb", type=int, default=512)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--data-dir", default=None, help="default: a fresh temporary directory")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    slots = a.device_slots or max(1, a.tenants // 10)
    if slots >= a.tenants:
        raise SystemExit("--device-slots must be below --tenants (the point is a cache smaller than the tenants)")
    data_dir = a.data_dir or tempfile.mkdtemp(prefix="vbert-scale-")
    model = MultiTenantModel(ModelConfig(BackboneConfig(device="auto"),
                                         PoolConfig(num_lora_slots=slots, num_bottleneck_slots=0, max_lora_rank=a.rank,
                                                    max_labels=8)))
    manager = Manager(ManagerConfig.under(data_dir, cache=CacheConfig(host_budget_bytes=a.host_budget_mb << 20)), model)
    t0 = time.perf_counter()
    names, reg_errors = register(manager, model.spec.shape, a.tenants, a.rank, a.seed)
    registration_s = time.perf_counter() - t0
    res = serve(manager, model, names, a.requests, a.seed)
    stats = manager.cache.stats()
    host = stats["host"]
    out = {
        "num_tenants": len(names), "requests": a.requests, "device_slots": slots,
        "host_budget_bytes": a.host_budget_mb << 20, "adapter": f"lora r={a.rank} q,k,v,o all layers",
        "registration_s": registration_s, "registration_per_tenant_ms": registration_s * 1000 / max(1, a.tenants),
        "cold_loads": len(res["cold"]), "cold_load_p50_ms": pct(res["cold"], 50), "cold_load_p99_ms": pct(res["cold"], 99),
        "warm_resolve_p50_ms": pct(res["warm"], 50), "warm_resolve_p99_ms": pct(res["warm"], 99),
        "bytes_per_adapter_device": model.pool.bytes_per_slot("lora"),
        "bytes_per_adapter_host": host["bytes"] / host["resident"] if host["resident"] else None,
        "bytes_per_adapter_disk": sum(f.stat().st_size for f in Path(manager.store.root).rglob("*") if f.is_file())
        / max(1, len(names)),
        "rss_bytes": rss_bytes(), "errors": reg_errors + res["errors"], "cache": stats,
        "device": model.device.describe(), "torch_version": torch.__version__, "host": platform.node(),
        "cpu_count": os.cpu_count(), "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/tenants_scale.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if v is not None),
    }
    manager.close()
    path = Path(a.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    plot(path.with_suffix(".png"), res["cold"], res["warm"])
    print(json.dumps({k: v for k, v in out.items() if k != "cache"}, indent=2))


if __name__ == "__main__":
    main()
