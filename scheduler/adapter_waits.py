"""Tenants waiting for an adapter to become resident, shared by the encoder policy (scheduler/policy.py) and the
generation policy (scheduler/generation_policy.py). Pure Python, no torch.

A tenant whose head request needs an adapter that is not resident is parked on that adapter: it leaves the
fair-share competition without being charged, and the policy asks the residency (the adapter cache) to load the
adapter, once, and again only after `retry_s`. `ready()` unparks the tenants of every adapter that has become
resident, for the policy to bring back (lifted like a returning idle tenant). A residency check or request that
raises is logged (the check counts as not resident), so one broken adapter cannot stop a step loop; it is asked
again later.
Parked tenants are indexed by adapter, so a step's check costs one residency lookup per waited-for adapter, not
one per tenant.
"""
from __future__ import annotations

import logging
from typing import Protocol

log = logging.getLogger(__name__)


class Residency(Protocol):
    def is_resident(self, adapter_id: int) -> bool: ...

    def request(self, adapter_ids: list[int]) -> None: ...   # fire-and-forget prefetch


class Waiter(Protocol):
    tenant_id: int
    parked_on: int | None


class AdapterWaits:
    def __init__(self, residency: Residency | None, retry_s: float):
        self.residency, self.retry_s = residency, retry_s
        self._parked: dict[int, dict[int, Waiter]] = {}   # adapter id -> tenants whose head waits for it
        self._requested_at: dict[int, float] = {}          # adapter id -> when residency was last asked

    def __len__(self) -> int:
        """Adapters some tenant waits for."""
        return len(self._parked)

    def is_resident(self, adapter_id: int | None, now: float, wanted: list[int]) -> bool:
        """True when the adapter is resident (or there is none, or no residency to ask); otherwise False, and
        the adapter is appended to `wanted` (to ask the residency for, outside any lock) unless it was asked for
        less than retry_s ago."""
        if adapter_id is None or self.residency is None:
            return True
        try:
            is_resident = self.residency.is_resident(adapter_id)
        except Exception:  # noqa: BLE001 - treated as not resident; asked again later
            log.exception("residency check of adapter %s failed", adapter_id)
            is_resident = False
        if is_resident:
            self._requested_at.pop(adapter_id, None)
            return True
        last = self._requested_at.get(adapter_id)
        if last is None or now - last >= self.retry_s:
            self._requested_at[adapter_id] = now
            wanted.append(adapter_id)
        return False

    def request(self, wanted: list[int]) -> None:
        """Ask the residency to load `wanted` (fire and forget; a failure is logged, and the adapters are asked
        for again after retry_s). Callers holding a lock call this after releasing it."""
        if not wanted or self.residency is None:
            return
        try:
            self.residency.request(wanted)
        except Exception:  # noqa: BLE001 - fire-and-forget: asked again after retry_s
            log.exception("residency request for adapters %s failed", wanted)

    def park(self, tenant: Waiter, adapter_id: int) -> None:
        tenant.parked_on = adapter_id
        self._parked.setdefault(adapter_id, {})[tenant.tenant_id] = tenant

    def unpark(self, tenant: Waiter) -> None:
        """The tenant stops waiting (its head left or changed); an adapter nobody waits for is forgotten."""
        adapter_id, tenant.parked_on = tenant.parked_on, None
        parked = self._parked.get(adapter_id, {})
        parked.pop(tenant.tenant_id, None)
        if not parked:
            self._parked.pop(adapter_id, None)
            self._requested_at.pop(adapter_id, None)

    def ready(self, now: float, wanted: list[int]) -> list[Waiter]:
        """Unpark and return the tenants whose adapter is now resident, in the order they parked per adapter."""
        out: list[Waiter] = []
        for adapter_id in list(self._parked):
            if self.is_resident(adapter_id, now, wanted):
                for tenant in self._parked.pop(adapter_id).values():
                    tenant.parked_on = None
                    out.append(tenant)
        return out
