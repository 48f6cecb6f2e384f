"""The generation engine: the decoder's step loop on its own thread, fed by a thread- and asyncio-safe
submit() that returns a stream of text deltas.

Every iteration is three moves (nano-vllm style): the policy picks the step (Orca: again at every
iteration, so finished requests leave and new ones join at once), the runner computes it and samples,
and the post-processing appends tokens, detokenizes them incrementally (vbert.detokenize: never half a
character, stop strings held back), checks the stop conditions and pushes events to the streams.
Submissions and cancellations from other threads are queued and applied between steps, so the policy
and the KV cache are only ever touched by this thread. A cancelled request's blocks are freed before
the next step. The loop is serial: the next step's inputs depend on this step's sampled tokens.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from vbert.detokenize import FinishReason, TextStream
from vbert.sampling import SamplingParams, TokenLogprobs
from vbert.structured import Matcher, StructuredCompiler, compiler_for

from .engine import DeadlineExceededError, EngineStoppedError, RequestFailedError, wait_for_drain
from .generation_policy import GenerationBatch, GenerationScheduler, GenerationSchedulerConfig
from .generation_runner import GenerationRunner
from .policy import QueueFullError
from .types import Request, RequestStatus, StepOutput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationEngineConfig:
    idle_wait_s: float = 0.02         # longest sleep of an idle loop (deadline sweeps, adapter loads)
    adapter_load_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 < self.idle_wait_s <= 1:
            raise ValueError(f"idle_wait_s must be in (0, 1], got {self.idle_wait_s}")
        if not 0 < self.adapter_load_timeout_s < float("inf"):
            raise ValueError(f"adapter_load_timeout_s must be a finite number > 0, got {self.adapter_load_timeout_s}")


@dataclass
class GenerationDelta:
    """Text produced since the previous event (possibly "" while a stop string is undecided), with the
    token ids (and their log-probabilities when asked for) generated since then."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] = field(default_factory=list)


@dataclass(frozen=True)
class GenerationResult:
    """The last event of a stream."""

    request_id: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    num_prompt_tokens: int
    queue_s: float                 # arrival -> first scheduled
    time_to_first_token_s: float   # arrival -> first generated token
    time_per_output_token_s: float   # mean time between tokens after the first
    total_s: float
    num_preemptions: int
    num_cached_tokens: int = 0     # prompt tokens whose K/V came from the prefix cache (at first admission)

    @property
    def num_generated_tokens(self) -> int:
        return len(self.token_ids)


_END = object()


class GenerationStream:
    """One request's events: GenerationDelta, ..., then a GenerationResult (or an exception raised from
    the iterator). Iterate it synchronously, or asynchronously when created with an event loop."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop | None = None):
        self.request, self._loop = request, loop
        self._queue: queue.SimpleQueue | asyncio.Queue = asyncio.Queue() if loop is not None else queue.SimpleQueue()
        self.result: GenerationResult | None = None
        self.is_done = False

    def put(self, item) -> None:
        """Thread-safe: a GenerationDelta, a GenerationResult or an exception (the last two end it)."""
        if self.is_done:
            return
        if not isinstance(item, GenerationDelta):
            self.is_done = True
            if isinstance(item, GenerationResult):
                self.result = item
        if self._loop is None:
            self._queue.put(item)
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def __iter__(self):
        if self._loop is not None:
            raise TypeError("this stream was created for asyncio: use `async for`")
        while True:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, GenerationResult):
                return

    async def __aiter__(self):
        if self._loop is None:
            raise TypeError("this stream was created without an event loop: use `for`")
        while True:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, GenerationResult):
                return

    def final(self) -> GenerationResult:
        """Consume the stream (sync) and return its GenerationResult."""
        for item in self:
            if isinstance(item, GenerationResult):
                return item
        raise RuntimeError("the stream ended without a result")


@dataclass
class _Live:
    stream: GenerationStream
    text: TextStream
    stop_ids: frozenset
    adapter_held: bool = False
    pending: GenerationDelta = field(default_factory=lambda: GenerationDelta("", []))
    finish: FinishReason | None = None
    first_token: float | None = None
    last_token: float | None = None


class GenerationEngine:
    def __init__(self, config: GenerationEngineConfig, scheduler_config: GenerationSchedulerConfig,
                 runner: GenerationRunner, tokenizer, eos_token_ids: Sequence[int] = (), adapters=None,
                 residency=None, on_step: Callable[[GenerationBatch, StepOutput], None] | None = None,
                 on_finish: Callable[[Request, GenerationResult], None] | None = None):
        """adapters: the decoder's TieredCache (prefetch/release holds; None = bare decoder only);
        residency: the policy's view of it (scheduler.residency.CacheResidency)."""
        self.config, self.runner, self.tokenizer = config, runner, tokenizer
        self.eos_token_ids = frozenset(int(i) for i in eos_token_ids)
        self.adapters, self.on_step, self.on_finish = adapters, on_step, on_finish
        self.scheduler = GenerationScheduler(scheduler_config, runner.kv, residency)
        self.residency = residency
        self.max_context = runner.model.spec.max_position_embeddings
        self._wake = threading.Condition()
        self._incoming: list[Request] = []
        self._cancels: list[int] = []
        self._live: dict[int, _Live] = {}
        self._thread: threading.Thread | None = None
        self._is_accepting = False
        self._is_stopping = False
        self.num_steps = 0

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "GenerationEngine":
        self._is_accepting = True
        self._thread = threading.Thread(target=self._loop, name="generation-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, drain: bool = True, timeout: float | None = 60) -> int:
        """Refuse new requests; with drain, finish the running and queued ones first (up to timeout);
        the rest fail with EngineStoppedError. Returns how many pending requests finished."""
        self._is_accepting = False
        num_pending = self.num_pending
        if drain:
            wait_for_drain(self, timeout)
        self._is_stopping = True
        self._notify()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._wake:
            left = list(self._live.values())
            self._live.clear()
        for live in left:
            live.stream.put(EngineStoppedError("the engine stopped before this request finished"))
        return max(0, num_pending - len(left))

    def __enter__(self) -> "GenerationEngine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def is_accepting(self) -> bool:
        return self._is_accepting

    @property
    def num_pending(self) -> int:
        return len(self._live)

    # -- submission ----------------------------------------------------------------------------
    def submit(self, request: Request, sampling: SamplingParams, *, ignore_eos: bool = False,
               loop: asyncio.AbstractEventLoop | None = None, matcher: Matcher | None = None) -> GenerationStream:
        """Queue a tokenized generative request (request.max_new_tokens = sampling.max_new_tokens).
        Raises EngineStoppedError, QueueFullError (backpressure) or ValueError (too long; a grammar that does not
        compile) at once. matcher: sampling.structured's, made by submit_async off the event loop (its first mask
        can take seconds); None: made here."""
        if not self._is_accepting:
            raise EngineStoppedError("the engine is not accepting requests (draining or stopped)")
        if not request.is_tokenized or request.max_new_tokens != sampling.max_new_tokens:
            raise ValueError("a generative request must be tokenized, with max_new_tokens from its sampling")
        total = len(request.prompt_ids) + request.max_new_tokens
        if total > self.max_context:
            raise ValueError(f"prompt ({len(request.prompt_ids)} tokens) + max_new_tokens "
                             f"({request.max_new_tokens}) = {total} exceeds the decoder's context of "
                             f"{self.max_context} tokens")
        self.scheduler.check_fits(total)
        request.metadata["sampling"] = sampling
        stop_ids = frozenset(sampling.stop_token_ids) | (frozenset() if ignore_eos else frozenset(self.eos_token_ids))
        request.metadata["stop_ids"] = tuple(sorted(stop_ids))     # the runner keeps them out until min_tokens
        if sampling.structured is not None:       # its grammar's state, which the runner masks the draws with
            request.metadata["matcher"] = matcher or self.grammars.matcher(sampling.structured)
        stream = GenerationStream(request, loop)
        live = _Live(stream, TextStream(self.tokenizer, sampling.stop, request.prompt_ids,
                                        include_stop=sampling.include_stop_str_in_output), stop_ids)
        with self._wake:
            cfg = self.scheduler.config
            tenant_waiting = sum(r.tenant_id == request.tenant_id for r in self._incoming) \
                + self.scheduler.num_waiting_for(request.tenant_id)
            if len(self._incoming) + self.scheduler.num_waiting >= cfg.max_waiting:
                raise QueueFullError(f"the generation queue is full ({cfg.max_waiting} waiting requests); retry later")
            if tenant_waiting >= cfg.max_waiting_per_tenant:
                raise QueueFullError(f"tenant {request.tenant_id} has {tenant_waiting} generation requests "
                                     f"waiting, its limit is {cfg.max_waiting_per_tenant}; retry later")
            self._live[request.request_id] = live
            self._incoming.append(request)
            self._wake.notify_all()
        return stream

    async def submit_async(self, request: Request, sampling: SamplingParams, *,
                           ignore_eos: bool = False) -> GenerationStream:
        """As submit; a structured request's matcher is made in a worker thread."""
        matcher = None
        if sampling.structured is not None:
            matcher = await asyncio.to_thread(self.grammars.matcher, sampling.structured)
        return self.submit(request, sampling, ignore_eos=ignore_eos, loop=asyncio.get_running_loop(), matcher=matcher)

    @property
    def grammars(self) -> StructuredCompiler:
        """Compiles structured-output grammars for this engine's tokenizer (shared with its backbone's edge check)."""
        return compiler_for(self.tokenizer, self.runner.model.spec.vocab_size, self.eos_token_ids)

    def cancel(self, request_id: int) -> bool:
        """Cancel a queued or running request (its KV blocks are freed before the next step); its stream
        ends with a CANCELLED result. False if it is unknown or already finished."""
        with self._wake:
            if request_id not in self._live:
                return False
            self._cancels.append(request_id)
            self._wake.notify_all()
        return True

    def wake(self) -> None:
        """Look at the queues now (e.g. an adapter finished loading)."""
        with self._wake:
            self._wake.notify_all()

    _notify = wake

    # -- the loop --------------------------------------------------------------------------------
    def _loop(self) -> None:
        enter = getattr(self.runner, "enter_step_thread", None)
        if enter is not None:
            enter()
        while not self._is_stopping:
            try:
                self._iteration()
            except Exception:  # noqa: BLE001 - the loop must survive; requests were answered
                log.exception("generation step loop error")

    def _iteration(self) -> None:
        self._apply_queued()
        if self.residency is not None:
            self.residency.expire()
            for adapter_id, exc in self.residency.take_failures().items():
                self._fail_adapter(adapter_id, exc)
        if not self.scheduler.has_work:
            with self._wake:
                if not self._incoming and not self._cancels and not self._is_stopping:
                    self._wake.wait(self.config.idle_wait_s)
            return
        batch = self.scheduler.schedule()
        for req in batch.dropped:
            self._end(req, error=DeadlineExceededError(f"request {req.request_id} passed its deadline while queued"))
        for req in batch.preempted:
            self._release_adapter(req)
        for req in batch.admitted:
            self._hold_adapter(req)
        if not batch.rows:
            with self._wake:
                if not self._incoming and not self._cancels and not self._is_stopping:
                    self._wake.wait(self.config.idle_wait_s)
            return
        try:
            output = self.runner.execute(batch)
        except Exception as e:  # noqa: BLE001 - answered per request
            log.exception("generation step %d failed", batch.step)
            for req in self.scheduler.abort(batch, str(e)):
                self._end(req, error=RequestFailedError(f"step failed: {e}"))
            return
        now = time.monotonic()
        tokens = {r.request_id: r for r in output.results if r.new_token_id is not None}
        done = self.scheduler.update(batch, output, lambda req, tok: self._on_token(req, tok, tokens, now))
        self.num_steps += 1
        if self.on_step is not None:
            self.on_step(batch, output)
        for row in batch.rows:
            live = self._live.get(row.request.request_id)
            if live is not None and live.pending.token_ids and row.request.status is RequestStatus.RUNNING:
                live.stream.put(live.pending)
                live.pending = GenerationDelta("", [])
        for req in done:
            self._end(req)

    def _on_token(self, req: Request, token: int, results: dict, now: float) -> bool:
        """Detokenize one new token; True when it ends the request (a stop token or a stop string)."""
        live = self._live[req.request_id]
        live.first_token = live.first_token or now
        live.last_token = now
        live.pending.token_ids.append(token)
        lp = results[req.request_id].output
        if lp is not None:
            live.pending.logprobs.append(lp)
        if token in live.stop_ids:
            live.finish = FinishReason.STOP
            return True
        # stop strings count from the min_tokens-th token's text on (the earlier text is streamed unsearched)
        live.pending.text += live.text.add(token, check_stop=len(req.output_ids) >= req.metadata["sampling"].min_tokens)
        if live.text.finish_reason is FinishReason.STOP:
            live.finish = FinishReason.STOP
            return True
        matcher = req.metadata.get("matcher")
        if matcher is not None and matcher.is_done:     # the grammar is complete: nothing may follow (ignore_eos too)
            live.finish = FinishReason.STOP
            return True
        return False

    def _apply_queued(self) -> None:
        with self._wake:
            incoming, self._incoming = self._incoming, []
            cancels, self._cancels = self._cancels, []
        for req in incoming:
            try:
                self.scheduler.add(req)
            except (QueueFullError, ValueError) as e:
                self._end(req, error=e)
        for request_id in cancels:
            req = self.scheduler.cancel(request_id)
            if req is not None:
                self._end(req)

    def _hold_adapter(self, req: Request) -> None:
        live = self._live.get(req.request_id)
        if req.adapter_id is None or live is None or self.adapters is None:
            return
        self.adapters.prefetch([req.adapter_id]).result(self.config.adapter_load_timeout_s)
        live.adapter_held = True
        if self.residency is not None:
            self.residency.claimed([req.adapter_id])

    def _release_adapter(self, req: Request) -> None:
        live = self._live.get(req.request_id)
        if live is not None and live.adapter_held:
            live.adapter_held = False
            self.adapters.release([req.adapter_id])

    def _fail_adapter(self, adapter_id: int, exc: BaseException) -> None:
        victims = [live.stream.request for live in list(self._live.values())
                   if live.stream.request.adapter_id == adapter_id]
        for req in victims:
            if self.scheduler.cancel(req.request_id) is not None:
                self._end(req, error=RequestFailedError(f"adapter could not be loaded: {exc}"))

    def _end(self, req: Request, error: BaseException | None = None) -> None:
        """Answer a request that left: its final result (or error) to its stream; holds released."""
        self._release_adapter(req)
        with self._wake:
            live = self._live.pop(req.request_id, None)
        if live is None:
            return
        if error is None and req.status is RequestStatus.FAILED:
            error = RequestFailedError(req.metadata.get("error") or "the runner failed this request")
        if error is not None:
            live.stream.put(error)
            return
        reason = (FinishReason.CANCELLED if req.status is RequestStatus.CANCELLED
                  else live.finish or FinishReason.LENGTH)
        tail = live.text.finish(reason)
        if live.pending.token_ids or tail:
            live.pending.text += tail
            live.stream.put(live.pending)
        now = time.monotonic()
        first = live.first_token
        n = len(req.output_ids)
        result = GenerationResult(
            request_id=req.request_id, text=live.text.text, token_ids=tuple(req.output_ids), finish_reason=reason,
            num_prompt_tokens=len(req.prompt_ids),
            queue_s=req.metadata.get("first_scheduled", now) - req.arrival,
            time_to_first_token_s=(first - req.arrival) if first is not None else 0.0,
            time_per_output_token_s=((live.last_token - first) / (n - 1)) if first is not None and n > 1 else 0.0,
            total_s=now - req.arrival, num_preemptions=req.metadata.get("num_preemptions", 0),
            num_cached_tokens=req.metadata.get("num_cached_tokens", 0))
        if self.on_finish is not None:
            self.on_finish(req, result)
        live.stream.put(result)
