"""Generate (server-streaming): protobuf <-> the generation engine's domain, validation, quotas and the
stream itself. The text deltas go out as the engine produces them; the last message carries the finish
reason, token usage and timing. A client that goes away (or whose deadline passes) cancels the request,
which frees its KV blocks before the next decoder step."""
from __future__ import annotations

import asyncio
import dataclasses
import math
import time

from manager.errors import FailedPreconditionError, InvalidArgumentError
from manager.manager import DECODER, require_backbone
from scheduler.generation_engine import GenerationDelta, GenerationResult
from scheduler.types import Request
from vbert.detokenize import FinishReason
from vbert.sampling import SamplingParams

from .auth import current_request_id, current_tenant
from .gen.vbert.v1 import tenant_pb2

FINISH_REASONS = {FinishReason.STOP: tenant_pb2.STOP, FinishReason.LENGTH: tenant_pb2.LENGTH,
                  FinishReason.CANCELLED: tenant_pb2.CANCELLED}
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


def sampling_of(request, max_new_tokens: int) -> SamplingParams:
    """The request's sampling parameters; InvalidArgumentError naming the field."""
    temperature = request.temperature if request.HasField("temperature") else 1.0
    top_p = request.top_p if request.HasField("top_p") else 1.0
    if not math.isfinite(temperature) or not math.isfinite(top_p):
        raise InvalidArgumentError("temperature and top_p must be finite numbers")
    if len(request.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in request.stop):
        raise InvalidArgumentError(f"stop: at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters")
    try:
        return SamplingParams(temperature=float(temperature), top_k=int(request.top_k), top_p=float(top_p),
                              seed=int(request.seed) if request.HasField("seed") else None,
                              max_new_tokens=max_new_tokens, stop_token_ids=tuple(request.stop_token_ids),
                              stop=tuple(request.stop), logprobs=int(request.logprobs))
    except ValueError as e:
        raise InvalidArgumentError(str(e)) from None


def _prompt_text(app, request) -> tuple[str, bool]:
    if bool(request.prompt) == bool(request.messages):
        raise InvalidArgumentError("give exactly one of prompt and messages")
    if request.prompt:
        return request.prompt, False
    return app.decoder.render_chat([(m.role, m.content) for m in request.messages]), True


def _response(delta: GenerationDelta) -> tenant_pb2.GenerateResponse:
    return tenant_pb2.GenerateResponse(
        text=delta.text, token_ids=delta.token_ids,
        logprobs=[tenant_pb2.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, top_ids=lp.top_ids,
                                          top_logprobs=lp.top_logprobs) for lp in delta.logprobs])


def _final(result: GenerationResult, version: int) -> tenant_pb2.GenerateResponse:
    ms = 1000.0
    return tenant_pb2.GenerateResponse(
        is_final=True, finish_reason=FINISH_REASONS[result.finish_reason],
        usage=tenant_pb2.GenerationUsage(prompt_tokens=result.num_prompt_tokens,
                                         completion_tokens=result.num_generated_tokens),
        metadata=tenant_pb2.GenerationMetadata(
            queue_ms=result.queue_s * ms, time_to_first_token_ms=result.time_to_first_token_s * ms,
            time_per_output_token_ms=result.time_per_output_token_s * ms, total_ms=result.total_s * ms,
            adapter_version=version, num_preemptions=result.num_preemptions))


async def generate(app, request, context):
    """The Generate RPC's body (an async generator of GenerateResponse); exceptions are mapped by the caller."""
    if app.generation is None:
        raise FailedPreconditionError(f"this server loads no decoder backbone (backbones = "
                                      f"{app.config.backbones!r}); Generate needs one")
    tenant = current_tenant()
    ref = await asyncio.to_thread(app.manager.resolve, tenant, request.adapter or "default", DECODER)
    require_backbone(ref, DECODER, "Generate")
    text, is_chat = _prompt_text(app, request)
    context_len = app.decoder.spec.max_position_embeddings
    limit = min(context_len, tenant.quotas.max_tokens_per_request)   # prompt + max_new_tokens
    wanted = int(request.max_new_tokens)
    if wanted >= limit:
        raise InvalidArgumentError(f"max_new_tokens {wanted} leaves no room for the prompt: prompt + max_new_tokens "
                                   f"must be <= {limit} (the decoder's context {context_len}, the tenant's quota "
                                   f"of {tenant.quotas.max_tokens_per_request} tokens per request)")
    sampling = sampling_of(request, max(1, wanted))      # bad parameters answer before any tokenization
    app.limiter.acquire(tenant, 1)
    ids = await asyncio.to_thread(app.decoder.tokenize_prompt, text, limit - max(1, wanted),
                                  request.truncate_prompt, is_chat)
    max_new = wanted or (limit - len(ids))
    sampling = dataclasses.replace(sampling, max_new_tokens=max_new)
    remaining = context.time_remaining()
    budget = app.config.default_deadline_s if remaining is None else remaining
    req = Request(tenant_id=tenant.id, adapter_id=ref.adapter_id, deadline=time.monotonic() + budget,
                  prompt_ids=ids, max_new_tokens=max_new, weight=tenant.quotas.weight)
    try:
        stream = await app.generation.submit_async(req, sampling, ignore_eos=request.ignore_eos)
    except ValueError as e:                      # too long for the context or the whole KV cache
        raise InvalidArgumentError(str(e)) from None
    try:
        async for event in stream:
            if isinstance(event, GenerationDelta):
                yield _response(event)
            else:
                yield _final(event, ref.version)
    finally:
        if not stream.is_done:
            app.generation.cancel(req.request_id)
    context.set_trailing_metadata([("x-request-id", current_request_id())])
