"""Per-tenant token-bucket rate limits from the tenant's quotas (requests_per_s, burst).
One input text counts as one request."""
from __future__ import annotations

import threading
import time

from manager.records import Tenant

from .errors import MIN_RETRY_AFTER_MS, RateLimitedError


class RateLimiter:
    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._buckets: dict[int, tuple[float, float]] = {}   # tenant id -> (tokens, last refill)
        self._lock = threading.Lock()

    def acquire(self, tenant: Tenant, n: int = 1) -> None:
        """Take n tokens or raise RateLimitedError with the wait until they would be there."""
        rate, burst = tenant.quotas.requests_per_s, tenant.quotas.burst
        if n > burst:
            raise RateLimitedError(f"{n} inputs in one call exceed tenant {tenant.name!r}'s burst of {burst}; "
                                   f"split the call", retry_after_s=n / rate)
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.get(tenant.id, (float(burst), now))
            tokens = min(float(burst), tokens + (now - last) * rate)
            if tokens < n:
                self._buckets[tenant.id] = (tokens, now)
                wait = max(MIN_RETRY_AFTER_MS / 1000, (n - tokens) / rate)   # a nearly full bucket: not 0
                raise RateLimitedError(f"tenant {tenant.name!r} is over its rate limit of {rate:g} requests/s "
                                       f"(burst {burst}); retry in {wait:.2f} s", retry_after_s=wait)
            self._buckets[tenant.id] = (tokens - n, now)

    def forget(self, tenant_id: int) -> None:
        with self._lock:
            self._buckets.pop(tenant_id, None)
