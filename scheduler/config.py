"""Configs of the scheduler. Frozen, validated at construction with clear ValueErrors."""
from __future__ import annotations

from dataclasses import dataclass


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class SchedulerConfig:
    """The batching policy's budgets and limits.

    max_tokens_per_step: the most tokens one step computes (sum of its rows' num_tokens); a request
        whose prompt is longer is rejected when it is added.
    max_rows_per_step: the most rows (requests) one step computes.
    max_waiting: the most queued requests over all tenants; beyond it add() raises QueueFullError.
    max_waiting_per_tenant: the most queued requests of one tenant; beyond it add() raises QueueFullError.
    residency_retry_s: how soon the policy asks again for an adapter that is still not resident.
    max_skips_per_step: how many tenants one step may pass over because their head request does not fit
        the budget left, before it closes; bounds the cost of a step when the budget is nearly spent.
    max_adapters_per_step: the most distinct adapters one step may use (None = no limit); the engine
        sets it from the adapter pool so a step's adapters always fit on the device.
    """

    max_tokens_per_step: int = 8192
    max_rows_per_step: int = 64
    max_waiting: int = 10_000
    max_waiting_per_tenant: int = 1000
    residency_retry_s: float = 0.05
    max_skips_per_step: int = 128
    max_adapters_per_step: int | None = None

    def __post_init__(self) -> None:
        _check_int("max_tokens_per_step", self.max_tokens_per_step, 1)
        _check_int("max_rows_per_step", self.max_rows_per_step, 1)
        _check_int("max_waiting", self.max_waiting, 1)
        _check_int("max_waiting_per_tenant", self.max_waiting_per_tenant, 1)
        _check_int("max_skips_per_step", self.max_skips_per_step, 1)
        if self.max_adapters_per_step is not None:
            _check_int("max_adapters_per_step", self.max_adapters_per_step, 1)
        if self.max_waiting_per_tenant > self.max_waiting:
            raise ValueError(f"max_waiting_per_tenant ({self.max_waiting_per_tenant}) must not exceed "
                             f"max_waiting ({self.max_waiting})")
        retry = self.residency_retry_s
        if isinstance(retry, bool) or not isinstance(retry, (int, float)) or not 0 <= retry < float("inf"):
            raise ValueError(f"residency_retry_s must be a finite number >= 0, got {retry!r}")
