"""Predictive autoscaling of Ray Serve replicas: scheduler/autoscale.py's policies run as a Ray Serve custom
autoscaling policy (a class-callable in the Serve controller; imported only with `autoscale` or `decoder_autoscale`
set).

Every replica reports its load (AutoscaleConfig.metric): an encoder replica the rows it received per second
(EncoderReplica.record_autoscaling_stats), a decoder replica its streams in flight (DecoderReplica's); the
controller calls the policy on every tick of its loop with those reports (averaged over Ray's look-back window). The
policy averages their sum over each `interval_s` into one load sample, appends it to the history (optionally seeded
with earlier intervals' loads, `autoscale_history` / `decoder_autoscale_history`), and asks scheduler.autoscale's
Predictive (a harmonic forecast `lead` intervals ahead, replicas bought at an overload cost, a burst's own level, a
reactive floor) or Reactive policy for a replica count, in units of one replica's capacity (`replica_capacity_rps`,
`decoder_target_streams`). Between intervals it holds its last answer. A
local cluster started by the front door has its replicas push their reports every interval / 4 (Ray's default:
every 10 s; a joined cluster keeps its own). Ray's own delays are off (0 s): the policy decides when. The lead (how
far ahead to scale) is the replica start time the policy measures itself: from each scale-up it asked for until
Ray reports the replicas running; one interval until the first is seen.

Plain values only: no torch, no protobuf.
"""
from __future__ import annotations

import logging
import math
import time

from scheduler.autoscale import Predictive, Reactive

log = logging.getLogger("vbert.autoscaling")

POLICY_PATH = "dispatcher.autoscaling:ReplicaAutoscaler"


def ray_autoscaling_config(autoscale, initial_replicas: int) -> dict:
    """Ray Serve's autoscaling_config for an AutoscaleConfig (dispatcher/config.py)."""
    return {"min_replicas": autoscale.min_replicas, "max_replicas": autoscale.max_replicas,
            "initial_replicas": initial_replicas, "upscale_delay_s": 0.0, "downscale_delay_s": 0.0,
            "look_back_period_s": max(10.5, min(30.0, autoscale.interval_s / 2)),   # > Ray's 10 s metrics interval
            "policy": {"policy_function": POLICY_PATH,
                       "policy_kwargs": {"policy": autoscale.policy, "capacity_rps": autoscale.capacity_rps,
                                         "interval_s": autoscale.interval_s, "day_s": autoscale.day_s,
                                         "min_replicas": autoscale.min_replicas,
                                         "max_replicas": autoscale.max_replicas,
                                         "history": list(autoscale.history), "metric": autoscale.metric}}}


class ReplicaAutoscaler:
    """The custom policy Ray Serve instantiates once per deployment (policy_kwargs) and calls every tick with an
    AutoscalingContext; returns (replicas wanted, state shown in Ray's status)."""

    def __init__(self, policy: str, capacity_rps: float, interval_s: float, day_s: float, min_replicas: int,
                 max_replicas: int, history: list | None = None, clock=time.monotonic, metric: str = "rows_per_s"):
        self.capacity, self.interval_s, self.clock, self.metric = float(capacity_rps), float(interval_s), clock, metric
        self.min_replicas, self.max_replicas = int(min_replicas), int(max_replicas)
        self.observed: list[float] = [float(x) / self.capacity for x in (history or ())]   # capacity units
        if policy == "predictive":
            self.policy = Predictive(1.0, max(2, round(day_s / interval_s)))
        elif policy == "reactive":
            self.policy = Reactive(1.0, interval_s)
        else:
            raise ValueError(f"unknown autoscaling policy {policy!r}")
        self.start_s: float | None = None          # measured replica start time
        self._samples: list[float] = []
        self._next: float | None = None
        self._target: int | None = None
        self._scale_up: tuple[float, int] | None = None   # (when asked, replicas asked for) until they run

    def _measure_start(self, now: float, running: int) -> None:
        if self._scale_up is not None and running >= self._scale_up[1]:
            took = now - self._scale_up[0]
            self.start_s = took if self.start_s is None else 0.5 * self.start_s + 0.5 * took
            self._scale_up = None
            if isinstance(self.policy, Predictive):
                self.policy.lead = max(1, math.ceil(self.start_s / self.interval_s))

    def __call__(self, ctx) -> tuple[int, dict]:
        now = self.clock()
        current = int(ctx.target_num_replicas)
        if self._target is None:
            self._target, self._next = current, now + self.interval_s
        self._measure_start(now, len(ctx.running_replicas))
        reports = (ctx.aggregated_metrics or {}).get(self.metric, {})
        self._samples.append(float(sum(reports.values())))
        if now >= self._next:
            self._next += self.interval_s * (math.floor((now - self._next) / self.interval_s) + 1)
            load = sum(self._samples) / len(self._samples)
            self._samples = []
            self.observed.append(load / self.capacity)
            want = min(self.max_replicas, max(self.min_replicas, self.policy.decide(self.observed, current)))
            if want > current:
                self._scale_up = (now, want)
            if want != self._target:
                log.info("autoscaling %s: load %.1f -> %d replicas (was %d)", self.metric, load, want, current)
            self._target = want
        load = round(self.observed[-1] * self.capacity, 2) if self.observed else None
        return self._target, {"metric": self.metric, "load": load, "intervals": len(self.observed),
                              "start_s": self.start_s}
