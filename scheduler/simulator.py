"""A discrete-event simulator of the serving system, fed by measured latency profiles. Pure Python, no torch.

What it models (each as the real server does it, with latencies from `vbert profile`):
- arrivals: per tenant a Gamma renewal process (rate, coefficient of variation: CV 1 is Poisson, larger is
  burstier), optionally scaled over time by a trend (a daily sine) through thinning; tenants' rates may follow a
  Zipf popularity (`zipf_rates`);
- replicas: each runs one backbone's engine. Encoder replicas compute steps of up to `max_rows` rows and
  `max_tokens` tokens taken fairly across tenants (round-robin over the tenants waiting, as the VTC policy does
  for equal weights), every row finished in its step; with a latency target, the engine's own step sizing
  (scheduler.sizing: StepSizer learning from the steps' times, Demand deciding when a light tenant is waiting)
  bounds a step's tokens, run on simulated time; decoder replicas run Orca's iteration-level loop: every
  step decodes one token of each running sequence and admits waiting ones (their prompt as a prefill chunk)
  while `max_running`, the token budget and the KV cache (the profile's `kv_tokens`) allow; when the cache
  cannot hold every running sequence's next token the newest is preempted and later recomputed (prompt and
  output so far as one prefill), as the generation policy does; a request that could never fit is refused;
- devices: replicas placed on one device share it (one step at a time, replicas taking turns); devices are
  independent (GPUs) unless `corun_slowdown` says they share one host's CPU: then a step computes more slowly
  while steps run on other devices (processor sharing: its speed changes whenever another device starts or ends
  a step);
- routing: a request goes to the replica of its backbone with the least outstanding work;
- requests expire (are dropped, and count as missed) when they waited longer than `drop_after_slo` x their SLO.

An encoder step takes its profiled time (plus a residual drawn from `step_noise_s`, the measured variation of
real steps' times, when given) plus `step_overhead_s` (what a busy engine spends between two steps:
answering, scheduling, handing over). A request's latency is its time in the engine plus `overhead_s` (the edge and, with replicas, Ray's hop: what a
request costs outside the engine's steps, measured by benchmarks/sim_validation.py on an idle server).

It reports SLO attainment (the share of requests finished within their latency objective), latency
percentiles and each replica's utilization (busy time / simulated time).
"""
from __future__ import annotations

import heapq
import math
import random
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .latency_profile import BackboneProfile, LatencyProfile
from .sizing import Demand, StepSizer


@dataclass(frozen=True)
class TenantLoad:
    """One tenant's traffic: rate (requests/s), burstiness (cv), latency objective (slo_s), request size
    (encoder: tokens per input; decoder: prompt tokens and output tokens)."""

    name: str
    backbone: str
    rate: float
    slo_s: float
    cv: float = 1.0
    tokens: int = 64
    output_tokens: int = 0

    def __post_init__(self) -> None:
        if not self.rate >= 0 or not self.slo_s > 0 or not self.cv > 0 or self.tokens < 1 or self.output_tokens < 0:
            raise ValueError(f"tenant {self.name!r}: need rate >= 0, slo_s > 0, cv > 0, tokens >= 1, output_tokens >= 0")


def zipf_rates(total_rate: float, num_tenants: int, exponent: float = 1.0) -> list[float]:
    """Per-tenant rates summing to total_rate, tenant i's share proportional to 1 / (i + 1) ** exponent."""
    weights = [1 / (i + 1) ** exponent for i in range(num_tenants)]
    s = sum(weights)
    return [total_rate * w / s for w in weights]


def daily_sine(low: float, high: float, period_s: float, phase_s: float = 0.0) -> Callable[[float], float]:
    """A load multiplier between low and high over a period (the seed study's daily trend), its minimum at t=phase."""
    mid, amp = (low + high) / 2, (high - low) / 2
    return lambda t: mid - amp * math.cos(2 * math.pi * (t - phase_s) / period_s)


def arrivals(tenants: Sequence[TenantLoad], duration_s: float, seed: int = 0,
             trend: Callable[[float], float] | None = None) -> list[tuple[float, int]]:
    """(time, tenant index) sorted by time: Gamma inter-arrival times of mean 1 / rate and the tenant's CV; with a
    trend, arrivals are generated at the trend's peak and kept with probability trend(t) / peak (thinning)."""
    rng = random.Random(seed)
    peak = 1.0
    if trend is not None:
        peak = max(trend(duration_s * i / 1000) for i in range(1001))
    out = []
    for k, tenant in enumerate(tenants):
        if tenant.rate <= 0:
            continue
        shape = 1 / tenant.cv ** 2
        scale = 1 / (tenant.rate * peak * shape)
        t = rng.gammavariate(shape, scale)
        while t < duration_s:
            if trend is None or rng.random() * peak < trend(t):
                out.append((t, k))
            t += rng.gammavariate(shape, scale)
    out.sort()
    return out


@dataclass(frozen=True)
class EngineLimits:
    """The engine's budgets (the server's max_rows_per_step, max_tokens_per_step, generation_max_running)."""

    max_rows: int = 64
    max_tokens: int = 8192
    max_running: int = 32
    decoder_max_tokens: int = 512
    drop_after_slo: float = 10.0   # a request that waited this many SLOs is dropped (the deadline)
    step_target_s: float | None = None   # encoder steps sized to take this long (EngineConfig.step_target_s)
    recent_window_s: float = 5.0   # the engine's Demand window (when a light tenant makes sizing worth it)
    overhead_s: float = 0.0        # added to every request's latency: its time outside the engine's steps
    step_overhead_s: float = 0.0   # added to every encoder step: the engine's time between two busy steps
    # measured step-time noise: each encoder step's time is its profiled time plus a residual (seconds, may be
    # negative) drawn at random (seeded by `seed`) from the first pool whose row bound covers the step:
    # ((up_to_rows, (residual_s, ...)), ...), the last pool also for larger steps. Additive, as stalls are (a
    # descheduled thread costs the same milliseconds whatever the step's size); a step never drops below a tenth
    # of its profiled time. () : every step takes exactly its profiled time. A busy engine's queue grows with the
    # variance of its steps' times, not only with their mean, so a tail needs them.
    step_noise_s: tuple = ()
    seed: int = 0
    # devices sharing one host (replicas as CPU processes): a step runs corun_slowdown times slower while every
    # other device computes, linearly in between by the share of the others computing (1 + (c - 1) * busy / (n - 1));
    # its speed is recomputed whenever a device starts or ends a step. 1.0: devices are independent (GPUs)
    corun_slowdown: float = 1.0

    def __post_init__(self) -> None:
        for name in ("max_rows", "max_tokens", "max_running", "decoder_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.drop_after_slo > 0 or not self.overhead_s >= 0 or not self.recent_window_s > 0 \
                or not self.step_overhead_s >= 0:
            raise ValueError("need drop_after_slo > 0, overhead_s >= 0, step_overhead_s >= 0 and recent_window_s > 0")
        if not (math.isfinite(self.corun_slowdown) and self.corun_slowdown >= 1.0):
            raise ValueError(f"corun_slowdown must be a finite number >= 1.0, got {self.corun_slowdown}")
        if self.step_target_s is not None and not self.step_target_s > 0:
            raise ValueError(f"step_target_s must be > 0 (or None), got {self.step_target_s}")
        try:
            pools = tuple(sorted((int(bound), tuple(float(x) for x in res)) for bound, res in self.step_noise_s))
        except (TypeError, ValueError) as e:
            raise ValueError(f"step_noise_s: expected ((up_to_rows, (residual_s, ...)), ...): {e}") from None
        if any(bound < 1 or not res or not all(math.isfinite(x) for x in res) for bound, res in pools):
            raise ValueError("step_noise_s: every pool needs a row bound >= 1 and at least one finite residual")
        object.__setattr__(self, "step_noise_s", pools)


@dataclass(slots=True)
class _Req:
    arrival: float
    tenant: int
    tokens: int
    output_tokens: int
    slo_s: float
    done_tokens: int = 0
    finish: float | None = None


@dataclass
class _Device:
    replicas: list = field(default_factory=list)
    turn: int = 0
    step: tuple | None = None   # the step computing: (replica, requests it finishes, its time alone, its compute, tokens)
    started: float = 0.0
    left: float = 1.0           # the share of the step still to compute (as of `since`), at `speed`
    since: float = 0.0
    speed: float = 1.0
    version: int = 0            # its latest end event's: older ones (a rescheduled or an earlier step's) are stale
    planned: bool = False       # the step's end event is pushed


@dataclass
class _Replica:
    backbone: str
    profile: BackboneProfile
    device: _Device | None = None
    queues: "OrderedDict[int, deque[_Req]]" = field(default_factory=OrderedDict)   # tenant -> waiting
    running: list = field(default_factory=list)          # decoder: sequences admitted
    busy_s: float = 0.0
    outstanding: int = 0
    sizer: StepSizer | None = None
    demand: Demand | None = None
    index: int = 0
    preempted: int = 0

    def add(self, req: _Req) -> None:
        self.queues.setdefault(req.tenant, deque()).append(req)
        self.outstanding += 1

    def take_fair(self, max_rows: int, max_tokens: int) -> list[_Req]:
        """Round-robin over the waiting tenants (equal weights: what VTC converges to), FIFO within one."""
        rows, tokens = [], 0
        while self.queues and len(rows) < max_rows:
            progressed = False
            for tenant in list(self.queues):
                q = self.queues[tenant]
                if len(rows) >= max_rows or (rows and tokens + q[0].tokens > max_tokens):
                    continue
                req = q.popleft()
                rows.append(req)
                tokens += req.tokens
                progressed = True
                if q:
                    self.queues.move_to_end(tenant)     # its next row waits for every other tenant's turn
                else:
                    del self.queues[tenant]
            if not progressed:
                break
        return rows


@dataclass(frozen=True)
class SimResult:
    num_requests: int
    slo_attainment: float
    p50_s: float | None
    p99_s: float | None
    utilization: tuple[float, ...]
    dropped: int
    latencies: tuple = field(default=(), repr=False)   # per request in arrival order (None: dropped or not served)

    def to_json(self) -> dict:
        return {"num_requests": self.num_requests, "slo_attainment": round(self.slo_attainment, 4),
                "p50_s": self.p50_s, "p99_s": self.p99_s, "utilization": [round(u, 3) for u in self.utilization],
                "dropped": self.dropped}


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def simulate(profile: LatencyProfile, replicas: Sequence[str | tuple[str, int]], tenants: Sequence[TenantLoad],
             arrival_list: Sequence[tuple[float, int]], limits: EngineLimits = EngineLimits(),
             windows: Sequence[tuple[float, float]] | None = None) -> SimResult:
    """Serve `arrival_list` (from `arrivals`) on replicas and report what came out. A replica is a backbone name
    (on a device of its own) or (backbone name, device index): replicas on one device share it, one step at a
    time, taking turns. A request whose backbone has no replica counts as missed. windows (one per replica, for
    autoscaling): the [start, end) in which a replica takes new requests (it finishes its queue after end); a
    request arriving when none of its backbone's replicas is in its window goes to the least loaded one."""
    reqs, reps, dropped = _serve(profile, replicas, tenants, arrival_list, limits, windows)
    end = max((r.finish for r in reqs if r.finish is not None), default=0.0)
    horizon = max(end, arrival_list[-1][0] if arrival_list else 0.0) or 1.0
    each = [None if r.finish is None else r.finish - r.arrival + limits.overhead_s for r in reqs]
    lat = [x for x in each if x is not None]
    met = sum(1 for r, x in zip(reqs, each) if x is not None and x <= r.slo_s)
    return SimResult(len(reqs), met / len(reqs) if reqs else 1.0, percentile(lat, 50), percentile(lat, 99),
                     tuple(r.busy_s / horizon for r in reps), dropped, tuple(each))


def latencies(profile: LatencyProfile, replicas: Sequence[str | tuple[str, int]], tenants: Sequence[TenantLoad],
              arrival_list: Sequence[tuple[float, int]], limits: EngineLimits = EngineLimits(),
              windows: Sequence[tuple[float, float]] | None = None) -> list[float | None]:
    """`simulate`'s run, as each request's latency in arrival order (None: dropped or not served)."""
    return list(simulate(profile, replicas, tenants, arrival_list, limits, windows).latencies)


def _serve(profile, replicas, tenants, arrival_list, limits, windows=None) -> tuple[list[_Req], list[_Replica], int]:
    if windows is not None and len(windows) != len(replicas):
        raise ValueError(f"windows: one (start, end) per replica, got {len(windows)} for {len(replicas)}")
    placed = [(r, i) if isinstance(r, str) else (r[0], -1 - r[1]) for i, r in enumerate(replicas)]
    reps = [_Replica(name, profile[name], index=i) for i, (name, _) in enumerate(placed)]
    devices: dict[int, _Device] = {}
    for rep, (_, dev) in zip(reps, placed):
        rep.device = devices.setdefault(dev, _Device())
        rep.device.replicas.append(rep)
    by_backbone: dict[str, list[_Replica]] = {}
    for r in reps:
        by_backbone.setdefault(r.backbone, []).append(r)
        if limits.step_target_s is not None and r.profile.kind == "encoder":
            r.sizer = StepSizer(limits.step_target_s, limits.max_tokens)
            r.demand = Demand(limits.recent_window_s)
    reqs: list[_Req] = []
    for t, k in arrival_list:
        tenant = tenants[k]
        reqs.append(_Req(t, k, tenant.tokens, tenant.output_tokens, tenant.slo_s))
    incoming = sorted(reqs, key=lambda r: r.arrival)        # stable: ties keep their order in the list
    events: list[tuple[float, int, object]] = []   # step ends: (time, order, (device, version)); an arrival at the
    order = 0                                      # same time as a step end comes first
    dropped = 0
    noise = random.Random(limits.seed) if limits.step_noise_s else None

    def noisy(seconds: float, rows: int) -> float:
        pool = next((res for bound, res in limits.step_noise_s if rows <= bound), limits.step_noise_s[-1][1])
        return max(0.1 * seconds, seconds + noise.choice(pool))

    def step_of(rep: _Replica, now: float):
        """The replica's next step: (seconds, requests it finishes), or None when it has no work."""
        nonlocal dropped
        drop = limits.drop_after_slo              # deadlines: drop what waited too long (queues are never empty)
        for tenant in [t for t, q in rep.queues.items() if now - q[0].arrival > drop * q[0].slo_s]:
            q = rep.queues[tenant]
            while q and now - q[0].arrival > drop * q[0].slo_s:
                q.popleft()
                rep.outstanding -= 1
                dropped += 1
            if not q:
                del rep.queues[tenant]
        if rep.profile.kind == "encoder":
            budget = limits.max_tokens
            if rep.sizer is not None and rep.demand.has_light_tenant(now):
                budget = rep.sizer.budget()
            rows = rep.take_fair(limits.max_rows, budget)
            if not rows:
                return None
            seconds = rep.profile.encoder_step_s(len(rows), max(r.tokens for r in rows))
            if noise is not None:
                seconds = noisy(seconds, len(rows))
            return seconds + limits.step_overhead_s, rows, seconds, sum(r.tokens for r in rows)
        kv = rep.profile.kv_tokens or math.inf          # the KV cache's tokens (0 in the profile: no limit)
        used = sum(r.tokens + r.done_tokens for r in rep.running)
        while rep.running and used + len(rep.running) > kv:      # no room for every running sequence's next token:
            victim = rep.running.pop()                           # the newest is preempted (recomputed when readmitted)
            used -= victim.tokens + victim.done_tokens
            rep.queues.setdefault(victim.tenant, deque()).appendleft(victim)
            rep.queues.move_to_end(victim.tenant, last=False)
            rep.preempted += 1
        budget = limits.decoder_max_tokens - len(rep.running)
        admitted = []
        while rep.queues and len(rep.running) + len(admitted) < limits.max_running:
            (req,) = rep.take_fair(1, budget)
            context = req.tokens + req.done_tokens               # a preempted sequence recomputes its output too
            if (admitted and context > budget) or used + len(rep.running) + context + 1 > kv:
                rep.queues.setdefault(req.tenant, deque()).appendleft(req)
                rep.queues.move_to_end(req.tenant, last=False)
                break
            admitted.append(req)
            budget -= context
            used += context + 1
        if not rep.running and not admitted:
            return None
        context = (sum(r.tokens + r.done_tokens for r in rep.running) / len(rep.running)) if rep.running else 0
        seconds = rep.profile.decode_step_s(len(rep.running), max(context, 1)) if rep.running else 0.0
        seconds += sum(rep.profile.prefill_s(r.tokens + r.done_tokens) for r in admitted)
        for r in rep.running:
            r.done_tokens += 1
        for r in admitted:
            r.done_tokens += 1          # the prefill's last position samples the next token
        rep.running += admitted
        finished = [r for r in rep.running if r.done_tokens >= max(1, r.output_tokens)]
        rep.running = [r for r in rep.running if r.done_tokens < max(1, r.output_tokens)]
        return seconds, finished, seconds, 0

    all_devices = list(devices.values())
    shared_host = limits.corun_slowdown > 1.0 and len(all_devices) > 1

    def schedule_end(dev: _Device) -> None:
        nonlocal order
        dev.version += 1
        dev.planned = True
        end = dev.since + dev.left * dev.step[2] / dev.speed
        heapq.heappush(events, (end, order, (dev, dev.version)))
        order += 1

    def reshare(now: float) -> None:
        """On a shared host: every computing device's progress so far at its old speed, then its new speed (from
        how many others compute now) and end."""
        busy = [d for d in all_devices if d.step is not None]
        speed = 1 / (1 + (limits.corun_slowdown - 1) * max(0, len(busy) - 1) / (len(all_devices) - 1))
        for d in busy:
            d.left = max(0.0, d.left - (now - d.since) * d.speed / max(d.step[2], 1e-12))
            d.since = now
            if speed != d.speed or not d.planned:
                d.speed = speed
                schedule_end(d)

    def kick(dev: _Device, now: float) -> None:
        """If the device is free, its next replica with work (in turn) starts a step."""
        if dev.step is not None:
            return
        n = len(dev.replicas)
        for k in range(n):
            rep = dev.replicas[(dev.turn + k) % n]
            planned = step_of(rep, now)
            if planned is None:
                continue
            seconds, finished, compute, tokens = planned
            dev.turn = (dev.turn + k + 1) % n
            dev.step, dev.started, dev.since, dev.left, dev.speed = (rep, finished, seconds, compute, tokens), now, \
                now, 1.0, 1.0
            dev.planned = False
            if shared_host:
                reshare(now)
            else:
                schedule_end(dev)
            return

    def end_step(dev: _Device, now: float) -> None:
        rep, finished, seconds, compute, tokens = dev.step
        taken = now - dev.started
        rep.busy_s += taken
        if rep.sizer is not None and tokens:
            rep.sizer.observe(tokens, compute * taken / seconds)    # the time the engine sees its step take
        for r in finished:
            r.finish = now
            rep.outstanding -= 1
        dev.step = None
        if shared_host:
            reshare(now)

    # per tenant: its backbone's replicas, or None when its requests count as missed (no replica, or a decoder's
    # request that could never fit the KV cache: refused at add())
    served = []
    for tenant in tenants:
        candidates = by_backbone.get(tenant.backbone) or None
        kv = candidates[0].profile.kv_tokens if candidates and candidates[0].profile.kind == "decoder" else 0
        served.append(None if kv and tenant.tokens + tenant.output_tokens > kv else candidates)
    nxt, total = 0, len(incoming)
    while nxt < total or events:
        if nxt < total and (not events or incoming[nxt].arrival <= events[0][0]):
            req = incoming[nxt]
            nxt += 1
            now = req.arrival
            candidates = served[req.tenant]
            if candidates is None:
                continue
            if windows is not None:
                candidates = [r for r in candidates if windows[r.index][0] <= now < windows[r.index][1]] or candidates
            rep = candidates[0]
            for other in candidates:
                if other.outstanding < rep.outstanding:
                    rep = other                 # the least outstanding work, the first of equals
            rep.add(req)
            if rep.demand is not None:
                rep.demand.add(req.tenant, req.tokens, now)
            kick(rep.device, now)
        else:
            now, _, (dev, version) = heapq.heappop(events)
            if dev.step is None or version != dev.version:
                continue                # rescheduled: its speed changed since this end was planned
            end_step(dev, now)
            kick(dev, now)
    return reqs, reps, dropped
