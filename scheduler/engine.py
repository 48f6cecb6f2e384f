"""The engine: a step loop on its own threads, fed by a thread- and asyncio-safe submit().

Each step is three moves (nano-vllm style): schedule, run, postprocess. With pipelining on, two
threads overlap them: the preparation thread tokenizes new requests, schedules step k+1, makes its
adapters resident (asynchronous prefetch on the cache's loader threads: the policy lets a request
whose adapter is not resident wait without losing its place) and builds its device inputs, while
the compute thread runs step k. With pipelining off, one thread does everything in order and loads
a step's adapters synchronously before computing it (the baseline of benchmarks/pipeline.py).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass

from manager.cache import TieredCache

from .config import SchedulerConfig
from .policy import QueueFullError, Scheduler
from .residency import CacheResidency, adapters_per_step
from .runner import ModelRunner, PreparedStep
from .sizing import Demand, StepSizer
from .types import Request, RequestStatus, ScheduledBatch

log = logging.getLogger(__name__)


class DeadlineExceededError(TimeoutError):
    """The request's deadline passed before it was computed."""


class RequestCancelledError(RuntimeError):
    pass


class RequestFailedError(RuntimeError):
    """The request could not be computed (bad input, adapter failed to load, runner error)."""


class EngineStoppedError(RuntimeError):
    """The engine is draining or stopped: no new requests."""


@dataclass(frozen=True)
class EngineConfig:
    """latency_target_s: how long a light tenant's request may wait behind other tenants' work. While a
    light tenant is among the recent ones (scheduler.sizing.Demand over `recent_window_s`), steps are
    sized (scheduler.sizing.StepSizer) so that the step computing when its request arrives plus its
    own step fit the target, and the next step is prepared only `prepare_lead_s` before the one
    computing is predicted to end (so a request that arrives meanwhile still joins it): a step's target
    is (latency_target_s - prepare_lead_s) / 2. None: steps are bounded by the scheduler's budgets only.
    max_admit_chars: the most text characters tokenized in one admission round (round-robin over
    tenants), so one tenant's long texts never hold up the next step for long."""

    is_pipelined: bool = True
    max_prepared_steps: int = 1      # steps prepared ahead of the one computing
    idle_wait_s: float = 0.02        # longest sleep of an idle loop (deadline sweeps, residency)
    latency_target_s: float | None = None
    recent_window_s: float = 5.0
    prepare_lead_s: float = 0.01
    max_admit_chars: int = 1 << 20

    def __post_init__(self) -> None:
        if self.max_prepared_steps < 1:
            raise ValueError(f"max_prepared_steps must be >= 1, got {self.max_prepared_steps}")
        if not 0 < self.idle_wait_s <= 1:
            raise ValueError(f"idle_wait_s must be in (0, 1], got {self.idle_wait_s}")
        if self.latency_target_s is not None and not 0 < self.latency_target_s < float("inf"):
            raise ValueError(f"latency_target_s must be a finite number > 0 (or None), got {self.latency_target_s}")
        if not 0 < self.recent_window_s < float("inf"):
            raise ValueError(f"recent_window_s must be a finite number > 0, got {self.recent_window_s}")
        if self.max_admit_chars < 1:
            raise ValueError(f"max_admit_chars must be >= 1, got {self.max_admit_chars}")
        if not 0 <= self.prepare_lead_s < float("inf"):
            raise ValueError(f"prepare_lead_s must be a finite number >= 0, got {self.prepare_lead_s}")
        if self.latency_target_s is not None and self.is_pipelined and self.latency_target_s <= 2 * self.prepare_lead_s:
            raise ValueError(f"latency_target_s ({self.latency_target_s}) must exceed twice prepare_lead_s "
                             f"({self.prepare_lead_s})")

    @property
    def step_target_s(self) -> float | None:
        """What one step may take: a request arriving behind a flood waits for the step computing (and,
        pipelined, at most prepare_lead_s more) and then its own step."""
        if self.latency_target_s is None:
            return None
        return (self.latency_target_s - (self.prepare_lead_s if self.is_pipelined else 0.0)) / 2


@dataclass(frozen=True)
class Completion:
    """What a finished request returns: the runner's output and where its time went."""

    request_id: int
    output: object
    num_tokens: int
    queue_s: float          # arrival -> scheduled into a step
    tokenize_s: float
    inference_s: float      # the compute of its step
    step: int


def wait_for_drain(engine, timeout: float | None) -> None:
    """Wait until engine.num_pending is 0 or timeout seconds passed (None: no limit); every engine's stop(drain=True)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while engine.num_pending and (deadline is None or time.monotonic() < deadline):
        time.sleep(0.01)


def take_round_robin(incoming: list[Request], max_chars: int) -> tuple[list[Request], list[Request]]:
    """(taken, left): requests taken one per tenant in turn, in arrival order within a tenant, until
    their texts hold max_chars characters (at least one is taken; tokenized requests count 0).
    Both lists keep the arrival order."""
    queues: dict[int, deque] = {}
    for req in incoming:
        queues.setdefault(req.tenant_id, deque()).append(req)
    taken: set[int] = set()
    chars = 0
    while queues:
        for tenant_id in list(queues):
            req = queues[tenant_id].popleft()
            size = len(req.text) if req.text is not None and not req.is_tokenized else 0
            if taken and chars + size > max_chars:
                return ([r for r in incoming if r.request_id in taken],
                        [r for r in incoming if r.request_id not in taken])
            taken.add(req.request_id)
            chars += size
            if not queues[tenant_id]:
                del queues[tenant_id]
    return list(incoming), []


class Engine:
    def __init__(self, config: EngineConfig, scheduler_config: SchedulerConfig, runner: ModelRunner,
                 cache: TieredCache | None = None, on_step=None):
        """on_step(batch: ScheduledBatch, output: StepOutput) is called after every computed step
        (e.g. metrics); it must be quick and must not raise."""
        self.config, self.runner, self.on_step = config, runner, on_step
        self._wake = threading.Condition()
        cap = adapters_per_step(cache, config.is_pipelined)
        if scheduler_config.max_adapters_per_step is None and cap is not None:
            scheduler_config = dataclasses.replace(scheduler_config, max_adapters_per_step=cap)
        self.residency = (CacheResidency(cache, self._notify, max_outstanding=cap)
                          if (cache is not None and config.is_pipelined) else None)
        self.scheduler = Scheduler(scheduler_config, residency=self.residency)
        self.sizer = (StepSizer(config.step_target_s, scheduler_config.max_tokens_per_step)
                      if config.step_target_s is not None else None)
        self.demand = Demand(config.recent_window_s)   # recent tokens per tenant: is a light one waiting?
        self._is_sized = False                     # the last step was sized by the latency target
        self._compute_ends: float | None = None    # predicted end of the step computing (sized steps)
        self._max_waiting_per_tenant = scheduler_config.max_waiting_per_tenant
        self._incoming_per_tenant: Counter = Counter()
        self._step_slots = threading.Semaphore(config.max_prepared_steps)
        self._max_waiting = scheduler_config.max_waiting
        self._full_step_rows = scheduler_config.max_rows_per_step
        self._is_computing = False
        self._incoming: list[Request] = []
        self._futures: dict[int, tuple[Request, Future]] = {}
        self._prepared: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._is_accepting = False
        self._is_stopping = False
        self.num_steps = 0

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "Engine":
        self._is_accepting = True
        loops = [self._prepare_loop, self._compute_loop] if self.config.is_pipelined else [self._serial_loop]
        self._threads = [threading.Thread(target=f, name=f"engine-{f.__name__.strip('_')}", daemon=True) for f in loops]
        for t in self._threads:
            t.start()
        return self

    def stop(self, drain: bool = True, timeout: float | None = 60) -> int:
        """Refuse new requests; with drain, finish the queued ones first; then end the threads.
        Returns how many of the requests pending at the call were drained (finished rather than
        failed with EngineStoppedError when the timeout ran out or without drain)."""
        self._is_accepting = False
        num_pending = self.num_pending
        if drain:
            wait_for_drain(self, timeout)
        self._is_stopping = True
        self._notify()
        for t in self._threads:
            t.join(timeout)
        left = list(self._futures.values())
        for req, fut in left:
            self._fail(req, EngineStoppedError("the engine stopped before this request was computed"))
        return max(0, num_pending - len(left))

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def is_accepting(self) -> bool:
        return self._is_accepting

    @property
    def num_pending(self) -> int:
        return len(self._futures)

    # -- submission ----------------------------------------------------------------------------
    def submit(self, request: Request) -> Future:
        """Queue a request; the future resolves to a Completion or fails with
        DeadlineExceededError, RequestCancelledError, RequestFailedError, EngineStoppedError.
        Raises QueueFullError at once when the queues are full (backpressure)."""
        if not self._is_accepting:
            raise EngineStoppedError("the engine is not accepting requests (draining or stopped)")
        if request.is_generative:
            raise NotImplementedError("generative requests are not implemented yet")
        fut: Future = Future()
        with self._wake:
            if len(self._incoming) + self.scheduler.num_waiting >= self._max_waiting:
                raise QueueFullError(f"the engine queue is full ({self._max_waiting} waiting requests); retry later")
            tenant_load = self._incoming_per_tenant[request.tenant_id] + self.scheduler.num_waiting_for(request.tenant_id)
            if tenant_load >= self._max_waiting_per_tenant:
                raise QueueFullError(f"tenant {request.tenant_id} has {tenant_load} requests waiting, its limit is "
                                     f"{self._max_waiting_per_tenant}; retry later")
            self._futures[request.request_id] = (request, fut)
            if request.is_tokenized:
                try:
                    self.scheduler.add(request)
                except BaseException:
                    del self._futures[request.request_id]
                    raise
                self.demand.add(request.tenant_id, request.num_tokens, time.monotonic())
            else:
                self._incoming.append(request)
                self._incoming_per_tenant[request.tenant_id] += 1
            self._wake.notify_all()
        return fut

    async def submit_async(self, request: Request) -> Completion:
        """asyncio flavour; cancelling the awaiting task cancels the request."""
        fut = asyncio.wrap_future(self.submit(request))
        try:
            return await fut
        except asyncio.CancelledError:
            self.cancel(request.request_id)
            raise

    def cancel(self, request_id: int) -> bool:
        with self._wake:
            entry = self._futures.get(request_id)
            if entry is None:
                return False
            req, _ = entry
            if req in self._incoming:
                self._incoming.remove(req)
                self._incoming_per_tenant[req.tenant_id] -= 1
            else:
                self.scheduler.cancel(request_id)
        self._fail(req, RequestCancelledError(f"request {request_id} was cancelled"))
        return True

    def _notify(self) -> None:
        with self._wake:
            self._wake.notify_all()

    # -- the loops -------------------------------------------------------------------------------
    def _admit(self) -> None:
        """Tokenize new requests (one tokenizer call of at most max_admit_chars characters, taken
        round-robin over tenants) and queue them; fail broken adapters' requests."""
        with self._wake:
            incoming, self._incoming = take_round_robin(self._incoming, self.config.max_admit_chars)
            for req in incoming:
                self._incoming_per_tenant[req.tenant_id] -= 1
                if self._incoming_per_tenant[req.tenant_id] <= 0:
                    del self._incoming_per_tenant[req.tenant_id]
        for req, err in self.runner.tokenize(incoming):
            self._fail(req, err)
        for req in incoming:
            if req.is_tokenized and req.request_id in self._futures:
                try:
                    self.scheduler.add(req)
                except (QueueFullError, ValueError) as e:
                    self._fail(req, e)
                    continue
                self.demand.add(req.tenant_id, req.num_tokens, time.monotonic())
        if self.residency is not None:
            self.residency.expire()
            self._fail_broken_adapters(self.residency.take_failures())

    def _idle_wait(self, timeout_s: float | None = None) -> None:
        with self._wake:
            if not self._incoming and not self._is_stopping:
                self._wake.wait(self.config.idle_wait_s if timeout_s is None else timeout_s)

    def step_budget(self) -> int | None:
        """The next step's token budget: from the latency target while a light tenant is among the
        recent ones (it would otherwise wait behind large steps), else None (the scheduler's own)."""
        if self.sizer is None or not self.demand.has_light_tenant(time.monotonic()):
            return None
        return self.sizer.budget()

    def _prepare_wait_s(self) -> float:
        """0 when the next step may be scheduled now; else how long to wait before looking again.
        Sized steps: only prepare_lead_s before the step computing is predicted to end, so requests
        arriving during it join the next step. Otherwise (Orca): while a step computes, only when a
        full step's worth of requests waits; else when compute is free, so late arrivals join."""
        if not (self._is_computing or not self._prepared.empty()):
            return 0.0
        if self._is_sized:
            ends = self._compute_ends
            if ends is None or not self._prepared.empty():
                return self.config.idle_wait_s
            return max(0.0, ends - self.config.prepare_lead_s - time.monotonic())
        return 0.0 if self.scheduler.num_waiting >= self._full_step_rows else self.config.idle_wait_s

    def _schedule(self) -> ScheduledBatch | None:
        """Schedule the next step and answer the requests it dropped (None if nothing to run)."""
        budget = self.step_budget()
        self._is_sized = budget is not None
        batch = self.scheduler.schedule(budget)
        for req in batch.dropped:
            if req.status is RequestStatus.EXPIRED:
                self._fail(req, DeadlineExceededError(f"request {req.request_id} passed its deadline while queued"))
        if not batch.rows:
            self._idle_wait()
            return None
        now = time.monotonic()
        for row in batch.rows:
            row.request.metadata["queue_s"] = now - row.request.arrival
        return batch

    def _fail_broken_adapters(self, failed: dict[int, BaseException]) -> None:
        if not failed:
            return
        with self._wake:
            victims = [r for r, _ in self._futures.values() if r.adapter_id in failed]
        for req in victims:
            self.scheduler.cancel(req.request_id)
            err = RequestFailedError(f"adapter could not be loaded: {failed[req.adapter_id]}")
            err.__cause__ = failed[req.adapter_id]
            self._fail(req, err)

    def _prepare(self, batch: ScheduledBatch) -> PreparedStep | None:
        try:
            step = self.runner.prepare(batch)
            if self.residency is not None:
                self.residency.claimed(step.held_adapters)
            return step
        except Exception as e:  # noqa: BLE001 - every failure is answered per request
            log.exception("preparing step %d failed", batch.step)
            for req in self.scheduler.abort_step(batch, str(e)):
                self._fail(req, RequestFailedError(f"step preparation failed: {e}"))
            return None

    def _compute(self, step: PreparedStep) -> None:
        try:
            output = self.runner.execute(step)
        except Exception as e:  # noqa: BLE001
            log.exception("step %d failed", step.batch.step)
            for req in self.scheduler.abort_step(step.batch, str(e)):
                self._fail(req, RequestFailedError(f"step failed: {e}"))
            return
        finally:
            self.runner.release(step)
        if self.sizer is not None:
            self.sizer.observe(step.batch.num_tokens, output.compute_s)
        if self.on_step is not None:
            self.on_step(step.batch, output)
        by_id = {r.request_id: r for r in output.results}
        for req in self.scheduler.update(output):
            result = by_id.get(req.request_id)
            if req.status is RequestStatus.FINISHED and result is not None:
                self._complete(req, Completion(req.request_id, result.output, req.num_tokens,
                                               req.metadata.get("queue_s", 0.0), req.metadata.get("tokenize_s", 0.0),
                                               output.compute_s, output.step))
            elif req.status is RequestStatus.FAILED:
                error = (result.error if result is not None else None) or req.metadata.get("error")
                self._fail(req, RequestFailedError(error or "the runner failed this request"))
        self.num_steps += 1

    def _prepare_loop(self) -> None:
        """Tokenization and adapter loads run ahead all the time. The next step is scheduled while
        the current one computes only when `_prepare_wait_s` says so; otherwise late arrivals still
        join it (Orca: the batch is picked at every iteration from all waiting work)."""
        while not self._is_stopping:
            self._admit()
            wait = self._prepare_wait_s()
            if wait > 0:
                self._idle_wait(min(wait, self.config.idle_wait_s))
                continue
            if not self._step_slots.acquire(timeout=self.config.idle_wait_s):
                continue                   # max_prepared_steps are prepared already
            if self._prepare_wait_s() > 0:   # a step started computing while the slot was awaited
                self._step_slots.release()
                continue
            batch = self._schedule()
            step = self._prepare(batch) if batch is not None else None
            if step is None:
                self._step_slots.release()
                continue
            self._prepared.put(step)       # never blocks: a slot was taken
        if self.residency is not None:
            self.residency.close()
        self._prepared.put(None)

    def _enter_step_thread(self) -> None:
        enter = getattr(self.runner, "enter_step_thread", None)
        if enter is not None:
            enter()

    def _compute_loop(self) -> None:
        self._enter_step_thread()
        while True:
            step = self._prepared.get()
            if step is None:
                return
            predicted = self.sizer.predict_s(step.batch.num_tokens) if self.sizer is not None else None
            self._compute_ends = None if predicted is None else time.monotonic() + predicted
            self._is_computing = True      # before the slot is given back: the preparation thread must
            self._step_slots.release()     # see this step computing when it may prepare the next one
            try:
                self._compute(step)
            finally:
                self._is_computing = False
                self._notify()

    def _serial_loop(self) -> None:
        self._enter_step_thread()
        while not self._is_stopping:
            self._admit()
            batch = self._schedule()
            if batch is not None:
                step = self._prepare(batch)
                if step is not None:
                    self._compute(step)

    # -- answering -------------------------------------------------------------------------------
    def _complete(self, req: Request, completion: Completion) -> None:
        with self._wake:
            entry = self._futures.pop(req.request_id, None)
        if entry is not None and not entry[1].done():
            entry[1].set_result(completion)

    def _fail(self, req: Request, exc: BaseException) -> None:
        with self._wake:
            entry = self._futures.pop(req.request_id, None)
        if entry is not None and not entry[1].done():
            entry[1].set_exception(exc)
