"""Which replicas of which backbone go on which device, chosen for SLO attainment with the simulator (AlpaServe's
simulator-guided greedy placement), and the two baselines it is compared with. Pure Python, no torch.

A replica runs one backbone on one device and needs the profile's `replica_bytes` of the device's memory;
replicas on one device share its compute (scheduler/simulator.py). AlpaServe also splits a model over devices
(model parallelism); our backbones fit one device, so only replication and placement are searched here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from .latency_profile import LatencyProfile
from .simulator import EngineLimits, SimResult, TenantLoad, simulate


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: int

    def __post_init__(self) -> None:
        if self.memory_bytes <= 0:
            raise ValueError(f"device {self.name!r}: memory_bytes must be > 0, got {self.memory_bytes}")


@dataclass(frozen=True)
class Placement:
    replicas: tuple[tuple[str, int], ...] = ()      # (backbone, device index)

    def add(self, backbone: str, device: int) -> "Placement":
        return Placement(self.replicas + ((backbone, device),))

    def free_bytes(self, profile: LatencyProfile, devices: Sequence[Device]) -> list[int]:
        free = [d.memory_bytes for d in devices]
        for backbone, dev in self.replicas:
            free[dev] -= profile[backbone].replica_bytes
        return free

    def count(self, backbone: str) -> int:
        return sum(1 for b, _ in self.replicas if b == backbone)

    def describe(self, devices: Sequence[Device]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {d.name: [] for d in devices}
        for backbone, dev in self.replicas:
            out[devices[dev].name].append(backbone)
        return out


@dataclass
class Search:
    """A placement and how it was found: the attainment after each replica added (the greedy's trace)."""

    placement: Placement
    result: SimResult
    trace: list = field(default_factory=list)


def backbones_in(tenants: Sequence[TenantLoad]) -> list[str]:
    return sorted({t.backbone for t in tenants if t.rate > 0})


def _roomiest(profile: LatencyProfile, devices: Sequence[Device], placement: Placement, backbone: str) -> int | None:
    free = placement.free_bytes(profile, devices)
    need = profile[backbone].replica_bytes
    fitting = [i for i, f in enumerate(free) if f >= need]
    return max(fitting, key=lambda i: free[i]) if fitting else None


def one_per_backbone(profile: LatencyProfile, devices: Sequence[Device], tenants: Sequence[TenantLoad]) -> Placement:
    """Baseline: one replica of each backbone with traffic, each on the device with the most free memory."""
    placement = Placement()
    for backbone in backbones_in(tenants):
        dev = _roomiest(profile, devices, placement, backbone)
        if dev is None:
            raise ValueError(f"no device has room for a {backbone} replica "
                             f"({profile[backbone].replica_bytes >> 20} MiB) next to the others")
        placement = placement.add(backbone, dev)
    return placement


def work_per_second(profile: LatencyProfile, tenants: Sequence[TenantLoad]) -> dict[str, float]:
    """Device-seconds of compute per second each backbone's traffic asks for, one request at a time (from the
    profile): the load selective replication divides replicas by."""
    out: dict[str, float] = {}
    for t in tenants:
        b = profile[t.backbone]
        cost = (b.encoder_step_s(1, t.tokens) if b.kind == "encoder"
                else b.prefill_s(t.tokens) + max(0, t.output_tokens - 1) * b.decode_step_s(1, t.tokens + t.output_tokens / 2))
        out[t.backbone] = out.get(t.backbone, 0.0) + t.rate * cost
    return out


def selective_replication(profile: LatencyProfile, devices: Sequence[Device],
                          tenants: Sequence[TenantLoad]) -> Placement:
    """Baseline (AlpaServe's "selective replication"): one replica per backbone, then more while memory lasts,
    each to the backbone with the most load per replica, on the device with the most free memory."""
    placement = one_per_backbone(profile, devices, tenants)
    load = work_per_second(profile, tenants)
    while True:
        ranked = sorted(load, key=lambda b: load[b] / placement.count(b), reverse=True)
        for backbone in ranked:
            dev = _roomiest(profile, devices, placement, backbone)
            if dev is not None:
                placement = placement.add(backbone, dev)
                break
        else:
            return placement


def greedy(profile: LatencyProfile, devices: Sequence[Device], tenants: Sequence[TenantLoad],
           arrival_list: Sequence[tuple[float, int]], limits: EngineLimits = EngineLimits(),
           max_replicas: int | None = None) -> Search:
    """AlpaServe's simulator-guided greedy: from one replica per backbone, add the (backbone, device) whose replica
    raises the simulated SLO attainment most (then lowers p99 most), while one fits and the attainment is below 1.
    When no single replica raises it, look one replica further: every addition that does not lower the attainment,
    each followed by its best next one; the pair is taken if it raises the attainment (a replica that pays only
    with the next: a large backbone's second replica fits beside a small one only once that one has a replica on
    an idler device), else the search ends."""
    placement = one_per_backbone(profile, devices, tenants)
    best = simulate(profile, placement.replicas, tenants, arrival_list, limits)
    search = Search(placement, best, [(list(placement.replicas), best.slo_attainment)])

    def rank(x):
        return x[0].slo_attainment, -(x[0].p99_s or 0)

    def additions(base: Placement) -> list:
        free = base.free_bytes(profile, devices)
        return [(simulate(profile, base.add(b, d).replicas, tenants, arrival_list, limits), base.add(b, d))
                for b in backbones_in(tenants) for d in range(len(devices)) if free[d] >= profile[b].replica_bytes]

    while best.slo_attainment < 1.0 and (max_replicas is None or len(placement.replicas) < max_replicas):
        scored = additions(placement)
        if not scored:
            break
        result, step = max(scored, key=rank)
        if result.slo_attainment <= best.slo_attainment:
            if max_replicas is not None and len(placement.replicas) + 2 > max_replicas:
                break
            pairs = [(*max(nexts, key=rank), r) for r, first in scored if r.slo_attainment >= best.slo_attainment
                     for nexts in [additions(first)] if nexts]
            if not pairs:
                break
            result, step, alone = max(pairs, key=rank)
            if result.slo_attainment <= best.slo_attainment:
                break
            search.trace.append((list(step.replicas[:-1]), alone.slo_attainment))     # the pair's first replica
        placement, best = step, result
        search.trace.append((list(placement.replicas), best.slo_attainment))
    search.placement, search.result = placement, best
    return search
