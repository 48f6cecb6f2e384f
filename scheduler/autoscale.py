"""How many replicas to run, interval by interval: a predictive policy (a forecast of the daily load trend with
statsmodels, a robust harmonic regression or Holt-Winters, plus a reactive floor for bursts the forecast misses,
scaling out ahead by the measured replica start time) and the policies it is compared with. Python + statsmodels,
no torch.

The load is in capacity units: one replica serves `replica_capacity` units (measured: a replica's throughput at
its latency objective). Each policy sees the loads observed so far and answers how many replicas it wants; a
replica asked for becomes ready `start_intervals` later (the profile's start time); one let go stops at once.
`evaluate` replays a load series through a policy and reports efficiency (needed capacity / provisioned
capacity, needed = the replicas the interval's load needs) and the share of intervals overloaded (load above the
ready replicas' capacity), the seed study's two measures.
"""
from __future__ import annotations

import bisect
import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence


class Policy(Protocol):
    name: str

    def decide(self, observed: Sequence[float], current: int) -> int: ...   # replicas wanted for what comes next


def replicas_for(load: float, capacity: float) -> int:
    return max(1, math.ceil(load / capacity - 1e-9))


@dataclass
class Static:
    replicas: int
    name: str = "static"

    def decide(self, observed, current) -> int:
        return self.replicas


@dataclass
class Reactive:
    """Ray Serve's default autoscaling, per interval: the wanted count is the last interval's load over a replica's
    capacity (Ray: ongoing requests over target_ongoing_requests, averaged over look_back_period_s = 30 s); it
    scales up once that held for upscale_delay_s (30 s) and down once it held for downscale_delay_s (600 s)."""

    capacity: float
    interval_s: float
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    name: str = "reactive"
    _up: int = 0
    _down: int = 0

    def decide(self, observed, current) -> int:
        if not observed:
            return current
        want = replicas_for(observed[-1], self.capacity)
        self._up = self._up + 1 if want > current else 0
        self._down = self._down + 1 if want < current else 0
        if want > current and self._up * self.interval_s >= self.upscale_delay_s:
            return want
        if want < current and self._down * self.interval_s >= self.downscale_delay_s:
            return want
        return current


FORECASTERS = ("harmonic", "holt-winters")


@dataclass
class Predictive:
    """A forecast of the load `lead` intervals ahead (the replica start time), raised to cover the forecast's own
    recent errors, and never below a reactive floor: what the last observed load needs (a burst the forecast missed
    is served once the replicas asked for after it are ready). While a burst lasts (the last interval's load above
    the forecast by more than its usual errors reach, `burst_excess`) the policy also plans on the burst's own level,
    the forecast raised by the burst's mean excess, with the same overload cost over the errors' spread (widened for
    a level seen over few intervals), so the burst's noise does not overload the floor's bare count.

    forecaster "harmonic" (the default): a robust regression (statsmodels RLM, Huber's norm, so bursts weigh little)
    of the load of the last `history_days` days on a daily level plus `harmonics` sine/cosine pairs of the day;
    "holt-winters": statsmodels' exponential smoothing with an additive daily season, fitted on `buckets` means per
    day and interpolated between them. Either is refitted every bucket (1/`buckets` of a day). Before two days of
    history the policy is the reactive floor with a 10 % margin.

    How high above the forecast: with `overload_cost` (the default, 10), the replica count that minimizes replicas +
    overload_cost x P(overloaded), P read from the recent relative errors: an extra replica is bought when it removes
    more than 1/overload_cost of the chance of an overloaded interval, so the overload the policy accepts goes where
    a replica would be least used. With overload_cost None: the forecast x (1 + the errors' `quantile`)."""

    capacity: float
    intervals_per_day: int
    lead: int = 1
    quantile: float = 0.95
    buckets: int = 24
    history_days: int = 3
    # replicas an overloaded interval is worth (None: the quantile margin); chosen on loads 100-119 of the seed study
    # (benchmarks/autoscale.py --first-seed 100 --seeds 20): the cheapest whose overloaded share there, plus two
    # standard errors of a five-load mean, stays within 0.02
    overload_cost: float | None = 10.0
    forecaster: str = "harmonic"
    harmonics: int = 3
    burst_window: int = 5                         # intervals whose mean sets a burst's level
    name: str = "predictive"
    _ahead: list = field(default_factory=list)   # holt-winters: the last fit's forecast of the next buckets
    _coef: tuple = ()                            # harmonic: the last fit's coefficients
    _fit_at: int = -1
    _errors: deque = field(default_factory=lambda: deque(maxlen=2000))
    _pending: dict = field(default_factory=dict)     # interval -> what was forecast for it

    def __post_init__(self) -> None:
        if self.forecaster not in FORECASTERS:
            raise ValueError(f"forecaster {self.forecaster!r} is not one of {FORECASTERS}")
        if not (self.capacity > 0 and self.intervals_per_day >= 2 and self.lead >= 1 and self.buckets >= 1
                and self.history_days >= 2 and self.harmonics >= 1 and 0 < self.quantile < 1
                and self.burst_window >= 1):
            raise ValueError("need capacity > 0, intervals_per_day >= 2, lead >= 1, buckets >= 1, history_days >= 2, "
                             "harmonics >= 1, 0 < quantile < 1 and burst_window >= 1")
        if self.overload_cost is not None and not self.overload_cost > 0:
            raise ValueError(f"overload_cost must be > 0 (or None), got {self.overload_cost}")

    @property
    def bucket(self) -> int:
        return max(1, self.intervals_per_day // self.buckets)

    def _forecast_at(self, observed: Sequence[float], interval: int) -> float | None:
        b = self.bucket
        done = len(observed) // b                      # complete buckets
        if done * b < 2 * self.intervals_per_day:
            return None
        if self.forecaster == "harmonic":
            return self._harmonic_at(observed, done * b, interval)
        return self._holt_winters_at(observed, done, interval)

    def _day_terms(self, t):
        import numpy as np

        cols = [np.ones(len(t))]
        for k in range(1, self.harmonics + 1):
            w = 2 * math.pi * k * np.asarray(t, dtype=float) / self.intervals_per_day
            cols += [np.cos(w), np.sin(w)]
        return np.column_stack(cols)

    def _harmonic_at(self, observed: Sequence[float], upto: int, interval: int) -> float:
        if self._fit_at != upto:
            import numpy as np
            import statsmodels.api as sm

            start = max(0, upto - self.history_days * self.intervals_per_day)
            t = np.arange(start, upto)
            fit = sm.RLM(np.asarray(observed[start:upto], dtype=float), self._day_terms(t),
                         M=sm.robust.norms.HuberT()).fit()
            self._coef, self._fit_at = tuple(float(c) for c in fit.params), upto
        return float(sum(c * x for c, x in zip(self._coef, self._day_terms([interval])[0])))

    def _holt_winters_at(self, observed: Sequence[float], done: int, interval: int) -> float:
        import warnings

        from statsmodels.tsa.holtwinters import ExponentialSmoothing

        b = self.bucket
        if self._fit_at != done:
            start = max(0, done - self.history_days * self.buckets)
            means = [sum(observed[k * b:(k + 1) * b]) / b for k in range(start, done)]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")        # statsmodels' convergence chatter; the margin covers misfits
                fit = ExponentialSmoothing(means, trend=None, seasonal="add", seasonal_periods=self.buckets,
                                           initialization_method="estimated").fit()
            self._ahead = [float(x) for x in fit.forecast(self.buckets)]   # once per fit, read every interval
            self._fit_at = done
        pos = interval / b - 0.5 - done               # bucket centres; 0 = the first bucket after the fit
        ahead = self._ahead
        lo = min(max(0, int(math.floor(pos))), len(ahead) - 2)
        frac = pos - math.floor(pos) if pos >= 0 else 0.0
        return float(ahead[lo] + frac * (ahead[lo + 1] - ahead[lo]))

    def margin(self) -> float:
        """The relative error the forecast made at `quantile` of the recent intervals (10 % before any)."""
        if len(self._errors) < 20:
            return 0.1
        errs = sorted(self._errors)
        return max(0.0, errs[min(len(errs) - 1, int(self.quantile * len(errs)))])

    def decide(self, observed, current) -> int:
        n = len(observed)
        if n and (n - 1) in self._pending:              # how wrong was the forecast for the interval just seen
            f = self._pending.pop(n - 1)
            if f > 0:
                self._errors.append(observed[-1] / f - 1)
        if not observed:
            return current
        floor = replicas_for(observed[-1], self.capacity)
        ahead = [self._forecast_at(observed, n - 1 + k) for k in range(1, self.lead + 2)]
        if ahead[0] is None:
            return replicas_for(observed[-1] * 1.1, self.capacity)
        self._pending[n - 1 + self.lead] = ahead[self.lead - 1]
        if self.overload_cost is None or len(self._errors) < 20:
            return max(floor, replicas_for(max(ahead) * (1 + self.margin()), self.capacity))
        want = max(floor, self._cheapest(max(ahead)))
        burst = self.burst_excess(observed)
        if burst is not None:                           # a burst the forecast does not know: plan on its level
            excess, seen = burst
            want = max(want, self._cheapest(max(ahead) * (1 + excess), spread=math.sqrt(1 + 1 / seen)))
        return want

    def burst_excess(self, observed: Sequence[float]) -> tuple[float, int] | None:
        """(how far above the forecast, relative, the load of the current burst stands; over how many intervals)
        or None when the last interval was not in a burst. An interval is in a burst when its load exceeds the
        forecast for it by more than the median error + 2 x (the errors' 95th percentile - median): beyond what
        the forecast's usual noise reaches. The level is the mean excess of up to `burst_window` intervals of the
        burst, the latest first."""
        if len(self._errors) < 20:
            return None
        errs = sorted(self._errors)
        med = errs[len(errs) // 2]
        threshold = med + 2 * (errs[int(0.95 * (len(errs) - 1))] - med)
        excess = []
        for t in range(len(observed) - 1, max(-1, len(observed) - 1 - self.burst_window), -1):
            f = self._forecast_at(observed, t)
            if f is None or f <= 0 or observed[t] / f - 1 <= threshold:
                break
            excess.append(observed[t] / f - 1)
        return (sum(excess) / len(excess), len(excess)) if excess else None

    def _cheapest(self, forecast: float, spread: float = 1.0) -> int:
        """The replica count minimizing replicas + overload_cost x P(overloaded), over the recent errors' spread
        (times `spread`: a level estimated from few intervals is less sure than the forecast)."""
        if forecast <= 0:
            return 1
        errs = sorted(e * spread for e in self._errors)

        def p_over(k: int) -> float:                  # share of recent errors that would overload k replicas
            return (len(errs) - bisect.bisect_right(errs, k * self.capacity / forecast - 1)) / len(errs)

        return cheapest_replicas(replicas_for(forecast * (1 + errs[0]), self.capacity),
                                 replicas_for(forecast * (1 + errs[-1]), self.capacity), self.overload_cost, p_over)


def cheapest_replicas(lo: int, hi: int, overload_cost: float, p_over: Callable[[int], float]) -> int:
    """The replica count k in [lo, hi] minimizing k + overload_cost x p_over(k) (the probability that k replicas
    are overloaded); ties go to fewer replicas."""
    if lo > hi:
        raise ValueError(f"empty replica range [{lo}, {hi}]")
    return min(range(lo, hi + 1), key=lambda k: (k + overload_cost * p_over(k), k))


@dataclass(frozen=True)
class Outcome:
    efficiency: float
    overloaded_share: float
    replica_intervals: int
    provisioned: list = field(default_factory=list, repr=False)    # ready replicas per interval

    def to_json(self, with_series: bool = False) -> dict:
        out = {"efficiency": round(self.efficiency, 4), "overloaded_share": round(self.overloaded_share, 4),
               "replica_intervals": self.replica_intervals}
        if with_series:
            out["replicas"] = self.provisioned
        return out


def evaluate(policy: Policy, load: Sequence[float], capacity: float, start_intervals: int, initial: int,
             skip: int = 0) -> Outcome:
    """Replay `load` (units per interval) through `policy`; replicas asked for are ready start_intervals later.
    The first `skip` intervals (a warm-up) are left out of the measures."""
    ready = initial
    starting: deque[tuple[int, int]] = deque()          # (ready at interval, count)
    provisioned, needed_sum, given_sum, over = [], 0, 0, 0
    observed: list[float] = []                          # grows by one per interval (no copies)
    for t, x in enumerate(load):
        while starting and starting[0][0] <= t:
            ready += starting.popleft()[1]
        provisioned.append(ready)
        if t >= skip:
            needed_sum += replicas_for(x, capacity)
            given_sum += ready
            over += x > ready * capacity + 1e-9
        observed.append(x)
        want = policy.decide(observed, ready + sum(c for _, c in starting))
        pending = ready + sum(c for _, c in starting)
        if want > pending:
            starting.append((t + 1 + start_intervals, want - pending))
        elif want < pending:
            drop = pending - want
            while drop and starting:                     # cancel starts first, then stop ready replicas
                at, c = starting.pop()
                k = min(c, drop)
                drop -= k
                if c > k:
                    starting.append((at, c - k))
            ready -= drop
    counted = max(1, len(load) - skip)
    return Outcome(needed_sum / given_sum if given_sum else 0.0, over / counted, given_sum, provisioned)


def seed_study_load(days: int, intervals_per_day: int, low: float = 7.0, high: float = 13.0, noise: float = 0.1,
                    bursts_per_day: float = 2.0, burst_height: tuple[float, float] = (0.3, 0.6),
                    burst_intervals: tuple[int, int] = (5, 20), seed: int = 0) -> list[float]:
    """The seed study's load: a daily sine between low and high (lowest at midnight), each interval times
    (1 + U(-noise, noise)), plus bursts (Poisson, bursts_per_day) that raise it by U(burst_height) of the trend
    for U(burst_intervals) intervals."""
    rng = random.Random(seed)
    n = days * intervals_per_day
    mid, amp = (low + high) / 2, (high - low) / 2
    trend = [mid - amp * math.cos(2 * math.pi * t / intervals_per_day) for t in range(n)]
    extra = [0.0] * n
    t = 0
    while bursts_per_day > 0:
        t += int(rng.expovariate(bursts_per_day / intervals_per_day)) + 1
        if t >= n:
            break
        h = rng.uniform(*burst_height)
        for k in range(t, min(n, t + rng.randint(*burst_intervals))):
            extra[k] = h
    return [trend[t] * (1 + rng.uniform(-noise, noise) + extra[t]) for t in range(n)]
