"""Step sizing from a latency target: how many tokens the next step may compute so that it takes
about `target_s`, learned from the steps already computed. Pure Python, no torch.

A step's compute time is modelled as `overhead_s + s_per_token * num_tokens` (padding is small: rows
are cut into length buckets), fitted by least squares over the recent steps with exponential
forgetting, so the model follows the device, the backbone and the load of the machine. The budget is
`(target_s - overhead_s) / s_per_token`, clamped to [min_tokens, max_tokens] and to twice the largest
step of the recent ones (a budget never extrapolates far past what was measured). When the recent
steps are all about one size (as they are once the budget holds), their times cannot separate the
overhead from the per-token cost: the whole time is then taken as per-token cost, which is exact at
the size measured and keeps the budget where the steps take `target_s`. Before the first step there
is nothing to go on: the budget is max_tokens, and the first measured step corrects it.

Why it bounds a light tenant's wait: the fair policy puts a tenant that was idle first in the next
step, so a request arriving behind a flood waits for the step computing now, the steps already
prepared, and then its own step. With every step near `target_s` that is at most
(1 + prepared + 1) steps; the engine divides its latency target by that number to get `target_s`.
"""
from __future__ import annotations

import math
import threading
from collections import deque

MIN_SPREAD = 0.2          # relative spread of step sizes below which the slope is not trusted
MAX_GROWTH = 2.0          # the budget stays within this factor of the largest recent step
RECENT = 32               # steps whose sizes bound the budget


class StepSizer:
    def __init__(self, target_s: float, max_tokens: int, min_tokens: int = 1, forget: float = 0.9):
        if not (isinstance(target_s, (int, float)) and 0 < target_s < math.inf):
            raise ValueError(f"target_s must be a finite number > 0, got {target_s!r}")
        if not 1 <= min_tokens <= max_tokens:
            raise ValueError(f"need 1 <= min_tokens <= max_tokens, got {min_tokens} and {max_tokens}")
        if not 0 < forget < 1:
            raise ValueError(f"forget must be in (0, 1), got {forget!r}")
        self.target_s, self.max_tokens, self.min_tokens, self.forget = float(target_s), max_tokens, min_tokens, forget
        self._lock = threading.Lock()
        self._w = self._sx = self._sxx = self._sy = self._sxy = 0.0   # decayed sums over (tokens, seconds)
        self._recent: deque[int] = deque(maxlen=RECENT)
        self.overhead_s: float | None = None
        self.s_per_token: float | None = None
        self.num_observed = 0

    def observe(self, num_tokens: int, seconds: float) -> None:
        """A computed step: its tokens and the seconds its compute took."""
        if num_tokens < 1 or not (seconds >= 0 and math.isfinite(seconds)):
            return
        with self._lock:
            f = self.forget
            x, y = float(num_tokens), float(seconds)
            self._w = f * self._w + 1
            self._sx = f * self._sx + x
            self._sxx = f * self._sxx + x * x
            self._sy = f * self._sy + y
            self._sxy = f * self._sxy + x * y
            self.num_observed += 1
            self._recent.append(num_tokens)
            self._fit()

    def _fit(self) -> None:
        w, sx, sxx, sy, sxy = self._w, self._sx, self._sxx, self._sy, self._sxy
        mean_x, mean_y = sx / w, sy / w
        var_x = sxx / w - mean_x * mean_x
        slope = (sxy / w - mean_x * mean_y) / var_x if var_x > (MIN_SPREAD * mean_x) ** 2 else None
        if slope is None or slope <= 0:     # steps of one size (or noise): all of the time is per token
            self.overhead_s, self.s_per_token = 0.0, max(mean_y / mean_x, 1e-12)
            return
        intercept = mean_y - slope * mean_x
        if intercept < 0:                   # a negative overhead would only inflate the budget
            self.overhead_s, self.s_per_token = 0.0, max(sxy / sxx, 1e-12)
        else:
            self.overhead_s, self.s_per_token = intercept, slope

    def budget(self) -> int:
        """Tokens the next step may compute to take about target_s."""
        with self._lock:
            if self.s_per_token is None:
                return self.max_tokens
            tokens = (self.target_s - self.overhead_s) / self.s_per_token
            tokens = min(tokens, MAX_GROWTH * max(self._recent))
        return int(min(self.max_tokens, max(self.min_tokens, tokens)))

    def predict_s(self, num_tokens: int) -> float | None:
        with self._lock:
            if self.s_per_token is None:
                return None
            return self.overhead_s + self.s_per_token * num_tokens

    def stats(self) -> dict:
        return {"target_s": self.target_s, "overhead_s": self.overhead_s, "s_per_token": self.s_per_token,
                "budget_tokens": self.budget(), "num_observed": self.num_observed}


class Demand:
    """Each tenant's recent demand in tokens, decayed exponentially with time constant `window_s`, and
    whether a *light* tenant is among the recent ones: one whose demand is below `light_share` of an
    equal share of all recent demand. Steps are worth sizing only then: a light tenant's request,
    arriving with nothing of its own queued, goes first in the next step and waits only for the steps
    ahead of it. When every recent tenant is about equally loaded (each queued behind its own
    requests), smaller steps would cost throughput and help no one. Thread-safe; no torch."""

    def __init__(self, window_s: float = 5.0, light_share: float = 0.25, refresh_s: float = 0.05):
        if not 0 < window_s < math.inf:
            raise ValueError(f"window_s must be a finite number > 0, got {window_s!r}")
        if not 0 < light_share < 1:
            raise ValueError(f"light_share must be in (0, 1), got {light_share!r}")
        self.window_s, self.light_share, self.refresh_s = window_s, light_share, refresh_s
        self._lock = threading.Lock()
        self._tokens: dict[int, tuple[float, float]] = {}   # tenant id -> (decayed tokens, as of when)
        self._checked_at = -math.inf
        self._has_light = False

    def add(self, tenant_id: int, num_tokens: int, now: float) -> None:
        with self._lock:
            if tenant_id not in self._tokens:
                self._checked_at = -math.inf           # a new tenant: look again at the next question
            value, at = self._tokens.get(tenant_id, (0.0, now))
            self._tokens[tenant_id] = (value * math.exp(-(now - at) / self.window_s) + num_tokens, now)

    def has_light_tenant(self, now: float) -> bool:
        """True while at least two tenants are recent and one of them is light (recomputed at most
        every refresh_s; tenants whose demand decayed below one token are forgotten)."""
        with self._lock:
            if now - self._checked_at < self.refresh_s:
                return self._has_light
            values = {}
            for tenant_id, (value, at) in list(self._tokens.items()):
                v = value * math.exp(-(now - at) / self.window_s)
                if v < 1.0:
                    del self._tokens[tenant_id]
                else:
                    values[tenant_id] = v
            fair = sum(values.values()) / len(values) if values else 0.0
            self._has_light = len(values) > 1 and min(values.values()) < self.light_share * fair
            self._checked_at = now
            return self._has_light
