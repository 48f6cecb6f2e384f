"""The scheduling policy: which waiting work runs in the next step. Pure Python, no torch.

Each tenant has a FIFO queue and a virtual token counter (VTC, Sheng et al., "Fairness in Serving Large
Language Models", OSDI'24). A step is filled in three moves, within `max_tokens_per_step` and
`max_rows_per_step`:
1. waiting requests whose deadline passed are dropped (status EXPIRED, in `batch.dropped`, never computed);
2. running generative requests get their next token (Orca's iteration-level scheduling), in rotation;
3. waiting requests are admitted from the backlogged tenant with the smallest counter (a heap), one head
   request at a time; admitting a request adds tokens / weight to its tenant's counter (decode tokens
   are charged the same way). A head that does not fit the budget left is passed over for this step
   (other tenants' smaller requests fill the step; order within a tenant never changes) and goes first
   in the next step, so no request starves behind a stream of small ones.

A step may get a smaller token budget than max_tokens_per_step (`schedule(max_tokens=...)`, from the
engine's latency target, scheduler.sizing); its first row is admitted even above that budget, so a long
request still runs, in a step of its own.

Idle tenants bank no credit: a tenant that becomes backlogged again has its counter lifted to the smallest
counter of the backlogged tenants (or the last served counter if there are none).

Adapter residency: a head whose adapter is not resident parks its tenant on that adapter (the request
keeps its place, the tenant is not charged) and the policy asks `residency.request([...])` once, again
only after `residency_retry_s`. Parked tenants rejoin the heap in the first step after the adapter is
resident, lifted like a returning idle tenant. Residency requests are issued after the lock is released.

Fairness bound (encoder work, tenants resident): a tenant is charged only while it holds the smallest
counter of the heap, so between backlogged tenants |c_i - c_j| <= L / w_min (L: the largest request,
<= max_tokens_per_step), as in VTC; a head passed over for budget lags at most one step's service
(S / w_min, S = max_tokens_per_step) before it goes first. tests/scheduler/test_policy.py checks
|c_i - c_j| <= (L + S) / w_min at every step under overload, and served tokens against the fair share.

Cancellation is immediate: cancel() removes a waiting request (it never appears in a batch, nor in
`dropped`, which only carries EXPIRED requests). A running request is marked CANCELLED at once; if it is in
a step in flight, that step's update() discards its result and returns it (status CANCELLED) with the
step's other finished requests. Deadlines apply to waiting requests only.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .adapter_waits import AdapterWaits, Residency
from .config import SchedulerConfig
from .deadlines import Deadlines
from .fair_queue import FairQueue
from .types import Request, RequestStatus, ScheduledBatch, ScheduledRow, StepOutput


class QueueFullError(RuntimeError):
    """Backpressure: the waiting queues are full (the edge answers RESOURCE_EXHAUSTED)."""


@dataclass(eq=False)
class _Tenant:
    tenant_id: int
    weight: float = 1.0
    counter: float = 0.0                       # the virtual token counter
    queue: deque = field(default_factory=deque)   # waiting requests, FIFO
    heap_seq: int | None = None                # seq of its live heap entry; None when not in the heap
    parked_on: int | None = None               # adapter id its head waits for
    num_served_tokens: int = 0
    num_served_requests: int = 0


class Scheduler:
    """Thread-safe: add/cancel from any thread, schedule/update/abort_step from the engine's threads."""

    def __init__(self, config: SchedulerConfig, residency: Residency | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.config, self.clock = config, clock
        self._lock = threading.Lock()
        self._tenants: dict[int, _Tenant] = {}
        self._backlog = FairQueue()                        # backlogged tenants by virtual counter
        self._last_counter = 0.0                           # counter of the last tenant served
        self._deadlines = Deadlines()                      # waiting requests by deadline
        self._requests: dict[int, Request] = {}            # waiting or running, by id
        self._decode_ready: deque[Request] = deque()       # running generative requests between steps
        self._in_flight: dict[int, tuple[ScheduledRow, ...]] = {}   # step -> its rows
        self._waits = AdapterWaits(residency, config.residency_retry_s)   # tenants parked on an adapter
        self._starved: tuple[int, int] | None = None       # (tenant, request) passed over last step
        self._next_step = 0
        self._num_waiting = 0
        self._num_running = 0
        self._counts = dict.fromkeys(("expired", "cancelled", "finished", "failed", "rejected_total",
                                      "rejected_tenant", "scheduled_rows", "scheduled_tokens"), 0)

    # -- submission ----------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queue a tokenized request. Raises QueueFullError when the total or the tenant's queue is full,
        ValueError when the request cannot be scheduled (not tokenized, not waiting, too long, duplicate)."""
        if not request.is_tokenized:
            raise ValueError(f"request {request.request_id} is not tokenized (prompt_ids is None)")
        if request.status is not RequestStatus.WAITING:
            raise ValueError(f"request {request.request_id} is {request.status.value}, not waiting")
        need = request.tokens_to_compute()
        if need > self.config.max_tokens_per_step:
            raise ValueError(f"request {request.request_id} has {need} tokens, more than one step computes "
                             f"(max_tokens_per_step={self.config.max_tokens_per_step}); truncate or split it")
        if need < 1:
            raise ValueError(f"request {request.request_id} has no tokens left to compute")
        with self._lock:
            if request.request_id in self._requests:
                raise ValueError(f"request {request.request_id} is already queued or running")
            if self._num_waiting >= self.config.max_waiting:
                self._counts["rejected_total"] += 1
                raise QueueFullError(f"the scheduler queue is full ({self.config.max_waiting} waiting "
                                     f"requests, max_waiting); retry after a short backoff")
            tenant = self._tenants.get(request.tenant_id)
            if tenant is None:
                tenant = self._tenants[request.tenant_id] = _Tenant(request.tenant_id)
            if len(tenant.queue) >= self.config.max_waiting_per_tenant:
                self._counts["rejected_tenant"] += 1
                raise QueueFullError(f"tenant {request.tenant_id} has {len(tenant.queue)} waiting requests "
                                     f"(max_waiting_per_tenant); retry after its queued requests complete")
            tenant.weight = request.weight
            was_idle = not tenant.queue
            tenant.queue.append(request)
            self._num_waiting += 1
            self._requests[request.request_id] = request
            self._deadlines.add(request)
            if was_idle:
                self._activate(tenant)

    def cancel(self, request_id: int) -> Request | None:
        """Cancel a waiting or running request: it ends with status CANCELLED and is returned (None if
        unknown or already finished). A request in a step in flight comes back once more from update()."""
        with self._lock:
            req = self._requests.pop(request_id, None)
            if req is None:
                return None
            if req.status is RequestStatus.WAITING:
                self._remove_waiting(req)
            else:
                try:
                    self._decode_ready.remove(req)   # between steps; otherwise in flight
                except ValueError:
                    pass
                self._num_running -= 1
            req.status = RequestStatus.CANCELLED
            self._counts["cancelled"] += 1
            return req

    # -- one step ----------------------------------------------------------------------------
    def schedule(self, max_tokens: int | None = None) -> ScheduledBatch:
        """Pick one step's work. Scheduled requests are RUNNING until update() or abort_step().

        max_tokens: this step's token budget when smaller than max_tokens_per_step (e.g. from a latency
        target, scheduler.sizing); the first row of a step is admitted even above it (up to
        max_tokens_per_step), so no request is too long for a small budget."""
        wanted: list[int] = []
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                       or max_tokens < 1):
            raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        budget = self.config.max_tokens_per_step if max_tokens is None else min(max_tokens,
                                                                                self.config.max_tokens_per_step)
        with self._lock:
            now = self.clock()
            step = self._next_step
            self._next_step += 1
            dropped = self._expire(now)
            self._unpark_resident(now, wanted)
            rows: list[ScheduledRow] = []
            tokens_left, rows_left = budget, self.config.max_rows_per_step
            starved = self._starved_head()
            reserve_tokens, reserve_rows = (starved[1].tokens_to_compute(), 1) if starved else (0, 0)
            for _ in range(len(self._decode_ready)):   # 1. running generative requests, in rotation
                req = self._decode_ready[0]
                need = req.tokens_to_compute()
                if need > tokens_left - reserve_tokens or rows_left - 1 < reserve_rows:
                    break
                self._decode_ready.popleft()
                if not self._waits.is_resident(req.adapter_id, now, wanted):
                    self._decode_ready.append(req)
                    continue
                rows.append(ScheduledRow(req, need))
                tokens_left, rows_left = tokens_left - need, rows_left - 1
                self._charge(self._tenants[req.tenant_id], need)
            if starved:                                 # 2. the head passed over last step goes first
                tenant = starved[0]
                self._backlog.drop(tenant)
                left = self._try_admit(tenant, tokens_left, rows_left, rows, now, wanted)
                if left is None:
                    self._backlog.push(tenant)
                else:
                    tokens_left, rows_left = left
            self._starved = None
            passed: list[_Tenant] = []
            while rows_left > 0 and tokens_left > 0:   # 3. waiting requests, smallest counter first
                tenant = self._backlog.pop()
                if tenant is None:
                    break
                left = self._try_admit(tenant, tokens_left, rows_left, rows, now, wanted)
                if left is None:                        # its head does not fit the budget left
                    passed.append(tenant)
                    if self._starved is None:
                        self._starved = (tenant.tenant_id, tenant.queue[0].request_id)
                    if len(passed) >= self.config.max_skips_per_step:
                        break
                    continue
                tokens_left, rows_left = left
            for tenant in passed:
                self._backlog.push(tenant)
            batch = ScheduledBatch(step=step, rows=tuple(rows), dropped=tuple(dropped),
                                   token_budget=budget if budget < self.config.max_tokens_per_step else None)
            if rows:
                self._in_flight[step] = batch.rows
                self._counts["scheduled_rows"] += len(rows)
                self._counts["scheduled_tokens"] += batch.num_tokens
        self._waits.request(wanted)                     # outside the lock
        return batch

    def update(self, output: StepOutput) -> list[Request]:
        """Apply a step's results; return the requests that left in this step: FINISHED, FAILED (runner
        error, missing result) or CANCELLED (cancelled while in flight; result discarded). Generative
        requests append new_token_id and stay RUNNING until they have max_new_tokens tokens."""
        with self._lock:
            rows = self._in_flight.pop(output.step, None)
            if rows is None:
                if output.results:
                    raise ValueError(f"step {output.step} is not in flight (already updated or aborted?)")
                return []
            by_id = {r.request_id: r for r in output.results}
            done: list[Request] = []
            for row in rows:
                req, result = row.request, by_id.get(row.request.request_id)
                if req.status is RequestStatus.CANCELLED:
                    done.append(req)
                elif result is None or result.error is not None:
                    self._finish(req, RequestStatus.FAILED, "the runner returned no result for this request"
                                 if result is None else result.error)
                    done.append(req)
                elif req.is_generative:
                    if result.new_token_id is None:
                        self._finish(req, RequestStatus.FAILED,
                                     "the runner returned no token for a generative row")
                        done.append(req)
                        continue
                    req.num_computed_tokens += row.num_tokens
                    req.output_ids.append(result.new_token_id)
                    if len(req.output_ids) >= req.max_new_tokens:
                        self._finish(req, RequestStatus.FINISHED)
                        done.append(req)
                    else:
                        self._decode_ready.append(req)
                else:
                    req.num_computed_tokens += row.num_tokens
                    self._finish(req, RequestStatus.FINISHED)
                    done.append(req)
            return done

    def abort_step(self, batch: ScheduledBatch, error: str) -> list[Request]:
        """The runner raised for the whole step: its requests end FAILED (cancelled ones stay CANCELLED);
        all of them are returned. A step already updated or aborted returns []."""
        with self._lock:
            rows = self._in_flight.pop(batch.step, None) or ()
            for row in rows:
                if row.request.status is RequestStatus.RUNNING:
                    self._finish(row.request, RequestStatus.FAILED, error)
            return [row.request for row in rows]

    # -- introspection ---------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    @property
    def num_running(self) -> int:
        return self._num_running

    def num_waiting_for(self, tenant_id: int) -> int:
        with self._lock:
            tenant = self._tenants.get(tenant_id)
            return len(tenant.queue) if tenant is not None else 0

    def stats(self) -> dict:
        with self._lock:
            tenants = {t.tenant_id: {"num_waiting": len(t.queue), "num_served_tokens": t.num_served_tokens,
                                     "num_served_requests": t.num_served_requests,
                                     "virtual_counter": t.counter,
                                     "weight": t.weight, "is_backlogged": t.heap_seq is not None,
                                     "is_parked": t.parked_on is not None}
                       for t in self._tenants.values()}
            out = {"num_waiting": self._num_waiting, "num_running": self._num_running,
                   "num_in_flight_steps": len(self._in_flight), "num_backlogged_tenants": len(self._backlog),
                   "num_parked_adapters": len(self._waits), "num_steps": self._next_step}
            out.update({f"num_{k}": v for k, v in self._counts.items()})
            out["tenants"] = tenants
            return out

    # -- internals (called with the lock held) -------------------------------------------------
    def _try_admit(self, tenant: _Tenant, tokens_left: int, rows_left: int, rows: list[ScheduledRow],
                   now: float, wanted: list[int]) -> tuple[int, int] | None:
        """Admit the head of a tenant taken out of the heap: returns the budget left, or None (the tenant
        must go back to the heap) if the head does not fit. A non-resident head parks the tenant."""
        req = tenant.queue[0]
        if not self._waits.is_resident(req.adapter_id, now, wanted):
            self._waits.park(tenant, req.adapter_id)
            return tokens_left, rows_left
        need = req.tokens_to_compute()
        is_first = not rows and need <= self.config.max_tokens_per_step   # a step always takes its first row
        if (need > tokens_left and not is_first) or rows_left < 1 \
                or self._is_adapter_budget_spent(req.adapter_id, rows):
            return None
        tenant.queue.popleft()
        self._num_waiting -= 1
        self._num_running += 1
        req.status = RequestStatus.RUNNING
        rows.append(ScheduledRow(req, need))
        self._charge(tenant, need)
        tenant.num_served_requests += 1
        self._last_counter = tenant.counter
        if tenant.queue:
            self._backlog.push(tenant)
        return max(0, tokens_left - need), rows_left - 1

    def _is_adapter_budget_spent(self, adapter_id: int | None, rows: list[ScheduledRow]) -> bool:
        """True if the step already uses max_adapters_per_step distinct adapters and this is a new one."""
        cap = self.config.max_adapters_per_step
        if cap is None or adapter_id is None:
            return False
        used = {r.request.adapter_id for r in rows if r.request.adapter_id is not None}
        return adapter_id not in used and len(used) >= cap

    def _starved_head(self) -> tuple[_Tenant, Request] | None:
        if self._starved is None:
            return None
        tenant = self._tenants.get(self._starved[0])
        if tenant is None or tenant.heap_seq is None or not tenant.queue \
                or tenant.queue[0].request_id != self._starved[1]:
            return None
        return tenant, tenant.queue[0]

    def _charge(self, tenant: _Tenant, num_tokens: int) -> None:
        tenant.counter += num_tokens / tenant.weight
        tenant.num_served_tokens += num_tokens
        if tenant.heap_seq is not None:
            self._backlog.push(tenant)   # re-key; the old entry goes stale

    def _activate(self, tenant: _Tenant) -> None:
        """The tenant (re)joins the backlogged set: lift its counter so idle time banks no credit."""
        floor = self._backlog.min_counter()
        tenant.counter = max(tenant.counter, self._last_counter if floor is None else floor)
        self._backlog.push(tenant)

    def _unpark_resident(self, now: float, wanted: list[int]) -> None:
        for tenant in self._waits.ready(now, wanted):
            self._activate(tenant)

    def _remove_waiting(self, req: Request) -> None:
        tenant = self._tenants[req.tenant_id]
        was_head = tenant.queue[0] is req
        tenant.queue.remove(req)
        self._num_waiting -= 1
        if not tenant.queue:
            self._backlog.drop(tenant)
            if tenant.parked_on is not None:
                self._waits.unpark(tenant)
        elif was_head and tenant.parked_on is not None:   # the new head may use another adapter
            self._waits.unpark(tenant)
            self._activate(tenant)

    def _expire(self, now: float) -> list[Request]:
        dropped = self._deadlines.due(now, self._is_waiting, self._num_waiting)
        for req in dropped:
            self._remove_waiting(req)
            del self._requests[req.request_id]
            req.status = RequestStatus.EXPIRED
            self._counts["expired"] += 1
        return dropped

    def _is_waiting(self, req: Request) -> bool:
        return req.status is RequestStatus.WAITING and self._requests.get(req.request_id) is req

    def _finish(self, req: Request, status: RequestStatus, error: str | None = None) -> None:
        req.status = status
        if error is not None:
            req.metadata["error"] = error
        self._requests.pop(req.request_id, None)
        self._num_running -= 1
        self._counts["finished" if status is RequestStatus.FINISHED else "failed"] += 1
