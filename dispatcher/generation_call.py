"""A generation call, whatever the protocol: gRPC `Generate` (dispatcher/generate_rpc.py) and the OpenAI
completions and chat completions (dispatcher/http_api.py) turn their messages into GenerateParams, and
everything after that is here: the decoder adapter's resolution, validation (InvalidArgumentError naming
the field), the tenant's quota (prompt + max_new_tokens) and rate limit, tokenization, submission to the
generation engine, and the stream of its events, cancelled when the caller stops reading."""
from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from manager.errors import FailedPreconditionError, InvalidArgumentError
from manager.manager import DECODER, AdapterRef, require_backbone
from manager.records import Tenant
from scheduler.generation_engine import GenerationDelta, GenerationResult
from scheduler.types import Request
from vbert.sampling import SamplingParams
from vbert.structured import StructuredOutput

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 64       # each generated token is looked up in them


@dataclass(frozen=True)
class GenerateParams:
    """What a caller asks for (protocol-neutral). Exactly one of prompt and messages; max_new_tokens 0 =
    up to the context and the tenant's quota; temperature / top_p None = 1.0."""

    adapter: str = "default"
    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    max_new_tokens: int = 0
    temperature: float | None = None
    top_p: float | None = None
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int = 0
    truncate_prompt: bool = False
    ignore_eos: bool = False
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_p: float | None = None
    min_tokens: int = 0
    structured: StructuredOutput | None = None
    include_stop_str_in_output: bool = False


def structured_of(kind: str, value=None) -> StructuredOutput:
    """A request's structured output (vLLM's kinds: json, json_object, regex, choice, grammar); InvalidArgumentError
    naming the problem."""
    try:
        return StructuredOutput(kind, "" if value is None else value)
    except ValueError as e:
        raise InvalidArgumentError(str(e)) from None


def sampling_of(params: GenerateParams, max_new_tokens: int) -> SamplingParams:
    """The call's sampling parameters; InvalidArgumentError naming the field."""
    temperature = 1.0 if params.temperature is None else params.temperature
    top_p = 1.0 if params.top_p is None else params.top_p
    if not math.isfinite(temperature) or not math.isfinite(top_p):
        raise InvalidArgumentError("temperature and top_p must be finite numbers")
    penalties = {name: default if getattr(params, name) is None else float(getattr(params, name))
                 for name, default in (("presence_penalty", 0.0), ("frequency_penalty", 0.0),
                                       ("repetition_penalty", 1.0), ("min_p", 0.0))}
    if len(params.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in params.stop):
        raise InvalidArgumentError(f"stop: at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters")
    if len(params.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidArgumentError(f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS}, got {len(params.stop_token_ids)}")
    try:
        return SamplingParams(temperature=float(temperature), top_k=int(params.top_k), top_p=float(top_p),
                              seed=None if params.seed is None else int(params.seed), max_new_tokens=max_new_tokens,
                              stop_token_ids=tuple(params.stop_token_ids), stop=tuple(params.stop),
                              logprobs=int(params.logprobs), logit_bias=tuple(params.logit_bias),
                              min_tokens=int(params.min_tokens), structured=params.structured,
                              include_stop_str_in_output=bool(params.include_stop_str_in_output), **penalties)
    except ValueError as e:
        raise InvalidArgumentError(str(e)) from None


def _prompt_text(app, params: GenerateParams) -> tuple[str, bool]:
    if (params.prompt is None) == (params.messages is None) or not (params.prompt or params.messages):
        raise InvalidArgumentError("give exactly one of prompt and messages, not empty")
    if params.prompt is not None:
        return params.prompt, False
    return app.decoder.render_chat(list(params.messages)), True


class Generation:
    """A submitted request: its adapter, prompt length and events (deltas, then one GenerationResult)."""

    def __init__(self, app, ref: AdapterRef, request: Request, stream):
        self.app, self.ref, self.request, self._stream = app, ref, request, stream

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_ids)

    async def events(self) -> AsyncIterator[GenerationDelta | GenerationResult]:
        """The engine's events; leaving early (the caller went away) cancels the request, which frees its
        KV blocks before the next decoder step."""
        try:
            async for event in self._stream:
                yield event
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Cancel the request unless it has finished (idempotent; also for a stream never read)."""
        if not self._stream.is_done:
            self.app.generation.cancel(self.request.request_id)


async def start_generation(app, tenant: Tenant, params: GenerateParams, time_remaining: float | None,
                           rpc: str = "Generate") -> Generation:
    """Resolve, validate, rate-limit, tokenize and submit; every refusal raises before anything is queued."""
    if app.generation is None:
        raise FailedPreconditionError(f"this server loads no decoder backbone (backbones = "
                                      f"{app.config.backbones!r}); {rpc} needs one")
    ref = await asyncio.to_thread(app.manager.resolve, tenant, params.adapter or "default", DECODER)
    require_backbone(ref, DECODER, rpc)
    text, is_chat = _prompt_text(app, params)
    context_len = app.decoder.spec.max_position_embeddings
    limit = min(context_len, tenant.quotas.max_tokens_per_request)   # prompt + max_new_tokens
    wanted = int(params.max_new_tokens)
    if wanted < 0:
        raise InvalidArgumentError(f"max_new_tokens must be >= 0, got {wanted}")
    if wanted >= limit:
        raise InvalidArgumentError(f"max_new_tokens {wanted} leaves no room for the prompt: prompt + max_new_tokens "
                                   f"must be <= {limit} (the decoder's context {context_len}, the tenant's quota "
                                   f"of {tenant.quotas.max_tokens_per_request} tokens per request)")
    sampling = sampling_of(params, max(1, wanted))      # bad parameters answer before any tokenization
    vocab = app.decoder.spec.vocab_size
    outside = [t for t, _ in sampling.logit_bias if t >= vocab]
    if outside:
        raise InvalidArgumentError(f"logit_bias: token id {outside[0]} is not in the decoder's vocabulary of {vocab}")
    if sampling.structured is not None:             # the grammar compiles for this decoder's tokenizer (off the loop;
        t0 = time.perf_counter()                    # the engine, or the replica, makes the request's matcher)
        try:
            await asyncio.to_thread(app.decoder.structured.check, sampling.structured)
        except ValueError as e:
            raise InvalidArgumentError(str(e)) from None
        app.metrics.structured_compile_seconds.observe(time.perf_counter() - t0)
    app.limiter.acquire(tenant, 1)
    ids = await asyncio.to_thread(app.decoder.tokenize_prompt, text, limit - max(1, wanted),
                                  params.truncate_prompt, is_chat)
    max_new = wanted or (limit - len(ids))
    sampling = dataclasses.replace(sampling, max_new_tokens=max_new)
    budget = app.config.default_deadline_s if time_remaining is None else time_remaining
    req = Request(tenant_id=tenant.id, adapter_id=ref.adapter_id, deadline=time.monotonic() + budget,
                  prompt_ids=ids, max_new_tokens=max_new, weight=tenant.quotas.weight)
    try:
        stream = await app.generation.submit_async(req, sampling, ignore_eos=params.ignore_eos)
    except ValueError as e:             # too long for the context or the whole KV cache; a grammar's first mask too hard
        raise InvalidArgumentError(str(e)) from None
    if sampling.structured is not None:
        app.metrics.structured_requests.labels(kind=sampling.structured.kind).inc()
    return Generation(app, ref, req, stream)
