"""`vbert plan`: a placement for a described cluster and workload (a TOML file), from a measured latency profile.
Pure Python, no torch.

    [[devices]]                      # one entry per kind of device; count copies it
    name = "gpu"
    memory_gb = 16
    count = 2

    [[tenants]]                      # one tenant
    name = "acme"
    backbone = "encoder"
    rate = 20.0                      # requests per second
    slo_ms = 200
    cv = 2.0                         # optional (1: Poisson)
    tokens = 64                      # optional: tokens per input (decoder: prompt tokens)
    output_tokens = 0                # optional: decoder output tokens

    [[tenant_groups]]                # many tenants: total_rate split by Zipf popularity
    backbone = "encoder"
    count = 100
    total_rate = 300.0
    zipf = 1.0
    slo_ms = 300

    [simulation]                     # optional
    duration_s = 60
    seed = 0
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from .latency_profile import LatencyProfile
from .placement import Device, greedy, one_per_backbone, selective_replication
from .simulator import TenantLoad, arrivals, simulate, zipf_rates

_TENANT_KEYS = {"name", "backbone", "rate", "slo_ms", "cv", "tokens", "output_tokens"}
_GROUP_KEYS = {"backbone", "count", "total_rate", "zipf", "slo_ms", "cv", "tokens", "output_tokens", "name"}


@dataclass(frozen=True)
class Workload:
    devices: tuple[Device, ...]
    tenants: tuple[TenantLoad, ...]
    duration_s: float = 60.0
    seed: int = 0


def _unknown(where: str, entry: dict, known: set) -> None:
    extra = sorted(set(entry) - known)
    if extra:
        raise ValueError(f"{where}: unknown keys {extra} (known: {sorted(known)})")


def load_workload(path: str | Path) -> Workload:
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"workload {path}: {e}") from None
    devices = []
    for i, d in enumerate(data.get("devices", [])):
        _unknown(f"devices[{i}]", d, {"name", "memory_gb", "count"})
        for k in range(int(d.get("count", 1))):
            devices.append(Device(f"{d.get('name', 'device')}{k}", int(float(d["memory_gb"]) * (1 << 30))))
    if not devices:
        raise ValueError(f"workload {path}: no [[devices]]")
    tenants = []
    for i, t in enumerate(data.get("tenants", [])):
        _unknown(f"tenants[{i}]", t, _TENANT_KEYS)
        tenants.append(TenantLoad(t["name"], t["backbone"], float(t["rate"]), float(t["slo_ms"]) / 1000,
                                  float(t.get("cv", 1.0)), int(t.get("tokens", 64)), int(t.get("output_tokens", 0))))
    for i, g in enumerate(data.get("tenant_groups", [])):
        _unknown(f"tenant_groups[{i}]", g, _GROUP_KEYS)
        prefix = g.get("name", f"{g['backbone']}-group{i}")
        for k, rate in enumerate(zipf_rates(float(g["total_rate"]), int(g["count"]), float(g.get("zipf", 1.0)))):
            tenants.append(TenantLoad(f"{prefix}-{k}", g["backbone"], rate, float(g["slo_ms"]) / 1000,
                                      float(g.get("cv", 1.0)), int(g.get("tokens", 64)), int(g.get("output_tokens", 0))))
    if not tenants:
        raise ValueError(f"workload {path}: no [[tenants]] or [[tenant_groups]]")
    sim = data.get("simulation", {})
    _unknown("simulation", sim, {"duration_s", "seed"})
    return Workload(tuple(devices), tuple(tenants), float(sim.get("duration_s", 60.0)), int(sim.get("seed", 0)))


def plan(profile: LatencyProfile, workload: Workload) -> dict:
    """The greedy placement and the two baselines, each with its simulated outcome on the same arrivals."""
    for t in workload.tenants:
        profile[t.backbone]           # a KeyError naming a backbone the profile lacks
    arr = arrivals(workload.tenants, workload.duration_s, workload.seed)
    found = greedy(profile, workload.devices, workload.tenants, arr)
    out = {"greedy": (found.placement, found.result)}
    for name, make in (("one_per_backbone", one_per_backbone), ("selective_replication", selective_replication)):
        placement = make(profile, workload.devices, workload.tenants)
        out[name] = (placement, simulate(profile, placement.replicas, workload.tenants, arr))
    return {name: {"placement": placement.describe(workload.devices), **result.to_json()}
            for name, (placement, result) in out.items()}
