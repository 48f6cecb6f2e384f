"""Who may hold a call slot: concurrency limits per tenant, a small separate budget for calls that
carry no key (health, reflection, OIP server calls), and a per-address limit on failed
authentications. Plain Python, used by the interceptor on the event loop (thread-safe anyway).

Why not grpc's own `maximum_concurrent_rpcs`: it is one global pool, so idle health `Watch`
streams or one tenant's idle streams take every slot and lock every other caller out, and its
refusal carries no retry hint. Here each kind of caller has its own budget:
- a tenant holds at most `per_tenant` calls at once (unary calls and open streams alike);
- all callers without a key hold at most `public` calls, at most `public_per_peer` from one address;
- all keyed calls together are capped by `total` (memory), far above what one tenant may hold;
- an address that failed authentication more than `failed_auth_burst` times recently is refused
  at once (refilling at `failed_auth_per_s`), before any key is hashed, so a flood of random keys
  does not spend the CPU on scrypt, and answered only after `failed_auth_delay_s` (a tarpit: a
  client that waits for answers can then send only as many bad keys per second as it has calls
  open, so a flood does not occupy the event loop that every tenant's calls go through). Keys that
  verified before are never refused by it.
A refusal is a `SlotLimitError` (RESOURCE_EXHAUSTED with a retry-after hint at the edge)."""
from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass


class SlotLimitError(RuntimeError):
    """A concurrency or failed-authentication limit refused the call; retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class AdmissionConfig:
    total: int = 4096               # keyed calls in flight, all tenants together
    per_tenant: int = 32            # calls in flight of one tenant
    public: int = 32                # calls in flight without a key (health, reflection, OIP server calls)
    public_per_peer: int = 8        # of which from one address
    failed_auth_per_s: float = 5.0  # failed authentications one address may make per second ...
    failed_auth_burst: int = 20     # ... after a burst of this many
    retry_after_s: float = 0.5      # the hint sent with a concurrency refusal
    failed_auth_delay_s: float = 1.0   # a refusal for failed authentications is answered this late

    def __post_init__(self) -> None:
        for name in ("total", "per_tenant", "public", "public_per_peer", "failed_auth_burst"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("failed_auth_per_s", "retry_after_s", "failed_auth_delay_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        if self.per_tenant > self.total:
            raise ValueError(f"per_tenant ({self.per_tenant}) must not exceed total ({self.total})")
        if self.public_per_peer > self.public:
            raise ValueError(f"public_per_peer ({self.public_per_peer}) must not exceed public ({self.public})")


def peer_host(peer: str | None) -> str:
    """The address part of a gRPC peer string: 'ipv4:127.0.0.1:5000' -> '127.0.0.1',
    'ipv6:[::1]:5000' -> '::1'; anything else (unix sockets) as given."""
    if not peer:
        return "unknown"
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    if kind == "ipv6":
        host = rest.rpartition(":")[0] or rest
        return host.strip("[]")
    return peer


class Admission:
    def __init__(self, config: AdmissionConfig | None = None, clock=time.monotonic):
        self.config = config or AdmissionConfig()
        self._clock = clock
        self._lock = threading.Lock()
        self._tenant: Counter = Counter()       # tenant id -> calls in flight
        self._public: Counter = Counter()       # peer host -> calls without a key in flight
        self._num_keyed = 0
        self._num_public = 0
        self._failures: dict[str, tuple[float, float]] = {}   # peer host -> (tokens, last refill)
        self._num_refused: Counter = Counter()

    # -- keyed calls -----------------------------------------------------------------------------
    def enter_tenant(self, tenant_id: int, tenant_name: str) -> None:
        c = self.config
        with self._lock:
            if self._tenant[tenant_id] >= c.per_tenant:
                self._num_refused["tenant"] += 1
                raise SlotLimitError(f"tenant {tenant_name!r} already has {c.per_tenant} calls in flight (streams "
                                     f"count while open), the per-tenant limit; retry when one has finished",
                                     c.retry_after_s)
            if self._num_keyed >= c.total:
                self._num_refused["total"] += 1
                raise SlotLimitError(f"the server has {c.total} calls in flight, its limit; retry later",
                                     c.retry_after_s)
            self._tenant[tenant_id] += 1
            self._num_keyed += 1

    def leave_tenant(self, tenant_id: int) -> None:
        with self._lock:
            self._num_keyed -= 1
            self._tenant[tenant_id] -= 1
            if self._tenant[tenant_id] <= 0:
                del self._tenant[tenant_id]

    # -- calls without a key -----------------------------------------------------------------------
    def enter_public(self, peer: str) -> None:
        c, host = self.config, peer_host(peer)
        with self._lock:
            if self._public[host] >= c.public_per_peer:
                self._num_refused["public_peer"] += 1
                raise SlotLimitError(f"{c.public_per_peer} calls without an API key (health, reflection) are "
                                     f"already open from {host}, the per-address limit; close some first",
                                     c.retry_after_s)
            if self._num_public >= c.public:
                self._num_refused["public"] += 1
                raise SlotLimitError(f"{c.public} calls without an API key (health, reflection) are already open, "
                                     f"the server's limit; retry later", c.retry_after_s)
            self._public[host] += 1
            self._num_public += 1

    def leave_public(self, peer: str) -> None:
        host = peer_host(peer)
        with self._lock:
            self._num_public -= 1
            self._public[host] -= 1
            if self._public[host] <= 0:
                del self._public[host]

    # -- failed authentication -------------------------------------------------------------------
    def _bucket(self, host: str, now: float) -> float:
        c = self.config
        tokens, last = self._failures.get(host, (float(c.failed_auth_burst), now))
        return min(float(c.failed_auth_burst), tokens + (now - last) * c.failed_auth_per_s)

    def begin_auth(self, peer: str) -> None:
        """Before hashing a key not verified before: take one attempt from the address's budget, or
        refuse at once (no hashing) when it is used up. Taken up front, so concurrent bad keys from one
        address cannot all be hashed before the first of them fails; end_auth gives it back on success."""
        host, now = peer_host(peer), self._clock()
        with self._lock:
            tokens = self._bucket(host, now)
            if tokens >= 1:
                self._failures[host] = (tokens - 1, now)
                if len(self._failures) > 100_000:     # bounded memory: forget the addresses with full buckets
                    full = float(self.config.failed_auth_burst)
                    self._failures = {h: v for h, v in self._failures.items() if self._bucket(h, now) < full}
                return
            self._num_refused["failed_auth"] += 1
            wait = (1 - tokens) / self.config.failed_auth_per_s
        raise SlotLimitError(f"too many failed authentications from {host}; retry in {wait:.2f} s", wait)

    def end_auth(self, peer: str, is_ok: bool) -> None:
        if not is_ok:
            return
        host, now = peer_host(peer), self._clock()
        with self._lock:
            if host in self._failures:
                self._failures[host] = (min(float(self.config.failed_auth_burst), self._bucket(host, now) + 1), now)

    # -- introspection ----------------------------------------------------------------------------
    def stats(self) -> dict:
        with self._lock:
            return {"num_keyed_in_flight": self._num_keyed, "num_public_in_flight": self._num_public,
                    "num_tenants_in_flight": len(self._tenant),
                    "num_refused": dict(self._num_refused)}
