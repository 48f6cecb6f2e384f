"""The generation policy (Orca's iteration-level scheduling): which tokens of which requests run in the
next decoder step, within a token budget, a row budget and the free KV blocks. Pure Python, no torch.

Request state is "computed tokens catch up with tokens" (scheduler.types.Request): a request has
prompt + generated tokens and a count of those whose K/V are in the cache. A step gives each scheduled
request some of the difference: its one new token when decoding, a chunk of its prompt when prefilling
(long prompts take several steps, "chunked prefill"), or, after a preemption, a chunk of prompt and
output to recompute. A request samples its next token in the step that computes its last token.

Every step, in `iteration` mode:
1. waiting requests past their deadline are dropped (EXPIRED, in `dropped`);
2. running requests that decode (one token each) get their token, oldest first; then running
   requests still prefilling get a chunk from what is left of the budget;
3. waiting requests are admitted from the backlogged tenant with the smallest virtual token counter
   (VTC, Sheng et al. OSDI'24), one head request at a time, while the budget, the row limit, the
   adapter limit and the free KV blocks allow; a request is admitted with blocks for its first chunk
   only. Every computed token (prompt, recomputed or generated) is charged to its tenant's counter,
   divided by the tenant's weight; a tenant that becomes backlogged again has its counter lifted to
   the smallest backlogged one, so idle time banks no credit.
Prefix caching (`prefix_caching`, on by default): a request being admitted first takes the cached
blocks that hold its leading full blocks (prompt, and output after a preemption; never its last token,
which must be computed for its logits) and starts computing after them; every block a step fills is
registered for later requests. The cache key salts the tokens with the adapter (its K/V differ) and, with
`prefix_sharing = "tenant"` (the default), the tenant, so one tenant never reuses (or times) another's
prompts; "global" shares the bare backbone's prefixes across tenants.
KV memory is a hard budget: when a running request needs a block and none is free, the newest running
request not yet in this step is preempted (its blocks freed, its computed count reset to 0; it goes back
to the front of its tenant's queue with its output kept, and is recomputed when admitted again). If it
is itself the newest, it is the one preempted. A request whose prompt + max_new_tokens cannot fit the
whole pool is refused at add(), so every admitted request can finish alone: nothing deadlocks.

In `request` mode (static batching, the baseline): a batch is admitted only when nothing runs, with
blocks reserved for every member's prompt + max_new_tokens, and runs until its longest member finishes;
nobody joins, and members that finish early are returned only when the whole batch has finished
(as a request-level server answers). No preemption is ever needed.

Single-threaded: the engine calls every method from its step loop (submissions and cancellations are
queued by the engine and applied between steps). `stats()` may be read from any thread.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Hashable, Protocol, Sequence

from .adapter_waits import AdapterWaits, Residency
from .config import _check_int
from .deadlines import Deadlines
from .fair_queue import FairQueue
from .policy import QueueFullError
from .types import Request, RequestStatus, ScheduledRow, StepOutput

SCHEDULING_MODES = ("iteration", "request")
PREFIX_SHARING = ("tenant", "global")


class KVBlocks(Protocol):
    """The KV cache's block accounting as the policy sees it (vbert.kv_cache.PagedKVCache)."""

    num_blocks: int
    block_size: int
    num_evicted_blocks: int

    @property
    def num_free_blocks(self) -> int: ...

    @property
    def num_cached_blocks(self) -> int: ...

    def blocks_for(self, num_tokens: int) -> int: ...

    def num_blocks_needed(self, seq_id: Hashable, num_tokens: int) -> int: ...

    def allocate(self, seq_id: Hashable, num_tokens: int) -> None: ...

    def free(self, seq_id: Hashable) -> int: ...

    def has_sequence(self, seq_id: Hashable) -> bool: ...

    def match_prefix(self, seq_id: Hashable, tokens: Sequence[int], salt: bytes) -> int: ...

    def commit(self, seq_id: Hashable, tokens: Sequence[int], num_computed: int) -> int: ...


@dataclass(frozen=True)
class GenerationSchedulerConfig:
    """max_tokens_per_step: tokens computed per step (decode tokens + prefill chunks); a prompt longer
        than this is prefilled in chunks. max_running: sequences in one step (the batch size).
    max_adapters: distinct adapters among running requests (None = no limit; the engine sets it from the
        decoder LoRA pool). mode: "iteration" (Orca) or "request" (static batching, the baseline).
    prefix_caching: reuse cached K/V blocks of identical leading tokens; prefix_sharing: "tenant" (a
    tenant's requests share with its own only) or "global" (the bare backbone's prefixes across tenants)."""

    max_tokens_per_step: int = 512
    max_running: int = 32
    max_waiting: int = 10_000
    max_waiting_per_tenant: int = 1000
    max_adapters: int | None = None
    mode: str = "iteration"
    residency_retry_s: float = 0.05
    prefix_caching: bool = True
    prefix_sharing: str = "tenant"

    def __post_init__(self) -> None:
        _check_int("max_tokens_per_step", self.max_tokens_per_step, 1)
        _check_int("max_running", self.max_running, 1)
        _check_int("max_waiting", self.max_waiting, 1)
        _check_int("max_waiting_per_tenant", self.max_waiting_per_tenant, 1)
        if self.max_adapters is not None:
            _check_int("max_adapters", self.max_adapters, 1)
        if self.mode not in SCHEDULING_MODES:
            raise ValueError(f"mode must be one of {SCHEDULING_MODES}, got {self.mode!r}")
        if not isinstance(self.prefix_caching, bool):
            raise ValueError(f"prefix_caching must be a bool, got {self.prefix_caching!r}")
        if self.prefix_sharing not in PREFIX_SHARING:
            raise ValueError(f"prefix_sharing must be one of {PREFIX_SHARING}, got {self.prefix_sharing!r}")
        if self.max_waiting_per_tenant > self.max_waiting:
            raise ValueError(f"max_waiting_per_tenant ({self.max_waiting_per_tenant}) must not exceed "
                             f"max_waiting ({self.max_waiting})")
        if not 0 <= self.residency_retry_s < float("inf"):
            raise ValueError(f"residency_retry_s must be a finite number >= 0, got {self.residency_retry_s!r}")


@dataclass(frozen=True)
class GenerationBatch:
    """Policy -> runner: one decoder step. `admitted` joined the running set in this step (their adapters
    must be held); `preempted` left it (blocks freed, back in the queue; their adapters may be released)."""

    step: int
    rows: tuple[ScheduledRow, ...]
    dropped: tuple[Request, ...] = ()
    admitted: tuple[Request, ...] = ()
    preempted: tuple[Request, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(r.num_tokens for r in self.rows)

    @property
    def num_rows(self) -> int:
        return len(self.rows)


@dataclass(eq=False)
class _Tenant:
    tenant_id: int
    weight: float = 1.0
    counter: float = 0.0
    queue: deque = field(default_factory=deque)
    heap_seq: int | None = None                # its live entry in the backlog; None when not backlogged
    parked_on: int | None = None
    num_served_tokens: int = 0


class GenerationScheduler:
    def __init__(self, config: GenerationSchedulerConfig, kv: KVBlocks, residency: Residency | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.config, self.kv, self.clock = config, kv, clock
        self._tenants: dict[int, _Tenant] = {}
        self._backlog = FairQueue()                    # tenants with a waiting head that is not parked
        self._deadlines = Deadlines()                  # waiting requests by deadline
        self._running: list[Request] = []              # admission order, oldest first
        self._requests: dict[int, Request] = {}        # waiting or running
        self._batch_done: list[Request] = []          # request mode: finished, held until the batch ends
        self._waits = AdapterWaits(residency, config.residency_retry_s)   # tenants parked on an adapter
        self._last_counter = 0.0
        self._next_step = 0
        self._num_waiting = 0
        self.counts = dict.fromkeys(("expired", "cancelled", "finished", "preempted", "scheduled_tokens",
                                     "prefill_tokens", "decode_tokens", "rejected", "prefix_queried_tokens",
                                     "prefix_hit_tokens"), 0)

    # -- submission ----------------------------------------------------------------------------
    def check_fits(self, num_tokens: int) -> None:
        """ValueError if a request of num_tokens (prompt + max_new_tokens) could never hold its K/V."""
        need = self.kv.blocks_for(num_tokens)
        if need > self.kv.num_blocks:
            raise ValueError(f"the request needs {need} KV blocks for {num_tokens} tokens (prompt + "
                             f"max_new_tokens), more than the whole cache ({self.kv.num_blocks} blocks); "
                             f"lower max_new_tokens or shorten the prompt")

    def add(self, request: Request) -> None:
        if not request.is_tokenized or not request.is_generative:
            raise ValueError(f"request {request.request_id} must be tokenized with max_new_tokens >= 1")
        if request.status is not RequestStatus.WAITING or request.request_id in self._requests:
            raise ValueError(f"request {request.request_id} is already queued, running or finished")
        self.check_fits(len(request.prompt_ids) + request.max_new_tokens)
        if self._num_waiting >= self.config.max_waiting:
            self.counts["rejected"] += 1
            raise QueueFullError(f"the generation queue is full ({self.config.max_waiting} waiting requests); "
                                 f"retry after a short backoff")
        tenant = self._tenants.get(request.tenant_id)
        if tenant is None:
            tenant = self._tenants[request.tenant_id] = _Tenant(request.tenant_id)
        if len(tenant.queue) >= self.config.max_waiting_per_tenant:
            self.counts["rejected"] += 1
            raise QueueFullError(f"tenant {request.tenant_id} has {len(tenant.queue)} waiting generation "
                                 f"requests (max_waiting_per_tenant); retry after some complete")
        tenant.weight = request.weight
        request.metadata.setdefault("num_preemptions", 0)
        self._enqueue(tenant, request, front=False)
        self._requests[request.request_id] = request
        self._deadlines.add(request)

    def cancel(self, request_id: int) -> Request | None:
        """Remove a waiting or running request (its blocks freed at once); None if unknown."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return None
        if req.status is RequestStatus.WAITING:
            self._remove_waiting(req)
        else:
            self._running.remove(req)
            self._free_blocks(req)
        req.status = RequestStatus.CANCELLED
        self.counts["cancelled"] += 1
        return req

    # -- one step ----------------------------------------------------------------------------
    def schedule(self) -> GenerationBatch:
        now = self.clock()
        step = self._next_step
        self._next_step += 1
        dropped = self._expire(now)
        wanted: list[int] = []
        self._unpark_resident(now, wanted)
        rows: list[ScheduledRow] = []
        preempted: list[Request] = []
        scheduled: set[int] = set()
        budget = self.config.max_tokens_per_step
        decoding = [r for r in self._running if r.tokens_to_compute() == 1]
        prefilling = [r for r in self._running if r.tokens_to_compute() > 1]
        for req in decoding + prefilling:               # 1-2. running requests: decode, then prefill chunks
            if budget <= 0:
                break
            if req.status is not RequestStatus.RUNNING:   # preempted earlier in this loop
                continue
            num = min(req.tokens_to_compute(), budget)
            if not self._make_room(req, num, scheduled, preempted):
                continue
            rows.append(ScheduledRow(req, num))
            scheduled.add(req.request_id)
            budget -= num
            self._charge(req, num)
        admitted: list[Request] = []
        if self.config.mode == "iteration" or not self._running:   # 3. admission
            admitted = self._admit(rows, budget, now, wanted)
        self._waits.request(wanted)
        self.counts["scheduled_tokens"] += sum(r.num_tokens for r in rows)
        return GenerationBatch(step, tuple(rows), tuple(dropped), tuple(admitted), tuple(preempted))

    def update(self, batch: GenerationBatch, output: StepOutput,
               is_stopped: Callable[[Request, int], bool]) -> list[Request]:
        """Apply a step's results: computed counts advance, sampled tokens are appended; a request whose
        token makes `is_stopped(request, token)` true, or that has max_new_tokens tokens, finishes (its
        blocks freed). Returns the requests that left (in request mode: only once the batch is over)."""
        by_id = {r.request_id: r for r in output.results}
        done: list[Request] = []
        for row in batch.rows:
            req, result = row.request, by_id.get(row.request.request_id)
            if req.status is not RequestStatus.RUNNING:
                continue
            if result is None or result.error is not None:
                self._leave(req, RequestStatus.FAILED)
                req.metadata["error"] = "the runner returned no result" if result is None else result.error
                done.append(req)
                continue
            before, bs = req.num_computed_tokens, self.kv.block_size
            req.num_computed_tokens += row.num_tokens
            if self.config.prefix_caching and req.num_computed_tokens // bs > before // bs:   # filled a block
                self.kv.commit(req.request_id, req.all_token_ids(), req.num_computed_tokens)
            token = result.new_token_id
            if token is None:
                continue
            req.output_ids.append(token)
            is_stop = is_stopped(req, token)             # always called: it sees every token
            if is_stop or len(req.output_ids) >= req.max_new_tokens:
                self._leave(req, RequestStatus.FINISHED)
                done.append(req)
        if self.config.mode == "request":
            self._batch_done.extend(done)
            if self._running:
                return [r for r in done if r.status is RequestStatus.FAILED]
            done, self._batch_done = self._batch_done, []
        return done

    def abort(self, batch: GenerationBatch, error: str) -> list[Request]:
        """The runner raised for a whole step: its requests fail (blocks freed); returned."""
        out = []
        for row in batch.rows:
            req = row.request
            if req.status is RequestStatus.RUNNING:
                self._leave(req, RequestStatus.FAILED)
                req.metadata["error"] = error
                out.append(req)
        return out

    # -- introspection ---------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def has_work(self) -> bool:
        return bool(self._num_waiting or self._running)

    def num_waiting_for(self, tenant_id: int) -> int:
        tenant = self._tenants.get(tenant_id)
        return len(tenant.queue) if tenant is not None else 0

    def stats(self) -> dict:
        out = {"num_waiting": self._num_waiting, "num_running": len(self._running), "num_steps": self._next_step,
               "num_free_blocks": self.kv.num_free_blocks, "num_blocks": self.kv.num_blocks,
               "num_cached_blocks": self.kv.num_cached_blocks, "num_evicted_blocks": self.kv.num_evicted_blocks}
        out.update({f"num_{k}": v for k, v in self.counts.items()})
        out["tenants"] = {t.tenant_id: {"num_waiting": len(t.queue), "num_served_tokens": t.num_served_tokens,
                                        "virtual_counter": t.counter, "weight": t.weight}
                          for t in list(self._tenants.values())}
        return out

    # -- internals ---------------------------------------------------------------------------------
    def _make_room(self, req: Request, num: int, scheduled: set[int], preempted: list[Request]) -> bool:
        """Blocks for req's next `num` tokens, preempting the newest unscheduled running requests (req
        itself if it is the newest); False if req was preempted."""
        total = req.num_computed_tokens + num
        while self.kv.num_blocks_needed(req.request_id, total) > self.kv.num_free_blocks:
            victims = [r for r in self._running if r.request_id not in scheduled]
            victim = victims[-1]                       # req is among them: it is not scheduled yet
            self._preempt(victim)
            preempted.append(victim)
            if victim is req:
                return False
        self.kv.allocate(req.request_id, total)
        return True

    def _admit(self, rows: list[ScheduledRow], budget: int, now: float, wanted: list[int]) -> list[Request]:
        admitted: list[Request] = []
        is_static = self.config.mode == "request"
        adapters = {r.adapter_id for r in self._running if r.adapter_id is not None}
        while len(self._backlog) and len(self._running) < self.config.max_running and (budget > 0 or is_static):
            tenant = self._backlog.peek()
            req = tenant.queue[0]
            if not self._waits.is_resident(req.adapter_id, now, wanted):
                self._park(tenant, req.adapter_id)
                continue
            cap = self.config.max_adapters
            if cap is not None and req.adapter_id is not None and req.adapter_id not in adapters \
                    and len(adapters) >= cap:
                break
            queried = hit = 0
            if self.config.prefix_caching and not self.kv.has_sequence(req.request_id):
                queried = req.num_tokens - 1            # the last token is computed, for its logits
                hit = self.kv.match_prefix(req.request_id, req.all_token_ids()[:queried], self._salt(req))
                req.num_computed_tokens = hit
            num = min(req.tokens_to_compute(), budget)
            reserve = len(req.prompt_ids) + req.max_new_tokens if is_static else req.num_computed_tokens + num
            if self.kv.num_blocks_needed(req.request_id, reserve) > self.kv.num_free_blocks:
                if self.kv.has_sequence(req.request_id):   # give the matched blocks back (they stay cached)
                    self.kv.free(req.request_id)
                req.num_computed_tokens = 0
                break                                   # no blocks: wait for running requests to finish
            self.counts["prefix_queried_tokens"] += queried
            self.counts["prefix_hit_tokens"] += hit
            req.metadata.setdefault("num_cached_tokens", hit)
            tenant.queue.popleft()
            self._num_waiting -= 1
            if not tenant.queue:
                self._backlog.drop(tenant)
            self.kv.allocate(req.request_id, reserve)
            req.status = RequestStatus.RUNNING
            req.metadata.setdefault("first_scheduled", now)
            self._running.append(req)
            admitted.append(req)
            if req.adapter_id is not None:
                adapters.add(req.adapter_id)
            self._last_counter = tenant.counter
            if num > 0:
                rows.append(ScheduledRow(req, num))
                budget -= num
                self._charge(req, num)
        return admitted

    def _salt(self, req: Request) -> bytes:
        tenant = req.tenant_id if self.config.prefix_sharing == "tenant" else "*"
        return f"{tenant}/{req.adapter_id if req.adapter_id is not None else '-'}".encode()

    def _charge(self, req: Request, num: int) -> None:
        tenant = self._tenants[req.tenant_id]
        tenant.counter += num / tenant.weight
        tenant.num_served_tokens += num
        if tenant in self._backlog:
            self._backlog.push(tenant)                  # re-keyed with its new counter
        self.counts["decode_tokens" if req.tokens_to_compute() == 1 and req.output_ids else "prefill_tokens"] += num

    def _preempt(self, req: Request) -> None:
        self._running.remove(req)
        self._free_blocks(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.metadata["num_preemptions"] = req.metadata.get("num_preemptions", 0) + 1
        self.counts["preempted"] += 1
        self._enqueue(self._tenants[req.tenant_id], req, front=True)
        self._deadlines.add(req)                        # waiting again: its deadline applies again

    def _enqueue(self, tenant: _Tenant, req: Request, front: bool) -> None:
        was_idle = not tenant.queue
        if front:
            tenant.queue.appendleft(req)
            if tenant.parked_on is not None:      # the new head may use another adapter
                self._waits.unpark(tenant)
        else:
            tenant.queue.append(req)
        self._num_waiting += 1
        if was_idle and tenant.parked_on is None:
            self._activate(tenant)
        elif front and tenant not in self._backlog and tenant.parked_on is None:
            self._backlog.push(tenant)

    def _activate(self, tenant: _Tenant) -> None:
        floor = self._backlog.min_counter()
        tenant.counter = max(tenant.counter, self._last_counter if floor is None else floor)
        self._backlog.push(tenant)

    def _free_blocks(self, req: Request) -> None:
        if self.kv.has_sequence(req.request_id):
            self.kv.free(req.request_id)

    def _leave(self, req: Request, status: RequestStatus) -> None:
        self._running.remove(req)
        self._requests.pop(req.request_id, None)
        self._free_blocks(req)
        req.status = status
        self.counts["finished"] += 1

    def _remove_waiting(self, req: Request) -> None:
        tenant = self._tenants[req.tenant_id]
        was_head = tenant.queue[0] is req
        tenant.queue.remove(req)
        self._num_waiting -= 1
        if not tenant.queue:
            self._backlog.drop(tenant)
            if tenant.parked_on is not None:
                self._waits.unpark(tenant)
        elif was_head and tenant.parked_on is not None:
            self._waits.unpark(tenant)
            self._activate(tenant)

    def _expire(self, now: float) -> list[Request]:
        dropped = self._deadlines.due(now, self._is_waiting, self._num_waiting)
        for req in dropped:
            self._remove_waiting(req)
            self._requests.pop(req.request_id, None)
            req.status = RequestStatus.EXPIRED
            self.counts["expired"] += 1
        return dropped

    def _is_waiting(self, req: Request) -> bool:
        return req.status is RequestStatus.WAITING and self._requests.get(req.request_id) is req

    def _park(self, tenant: _Tenant, adapter_id: int) -> None:
        self._waits.park(tenant, adapter_id)
        self._backlog.drop(tenant)

    def _unpark_resident(self, now: float, wanted: list[int]) -> None:
        for tenant in self._waits.ready(now, wanted):
            if tenant.queue:
                self._activate(tenant)
