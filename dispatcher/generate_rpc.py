"""Generate (server-streaming): protobuf <-> the protocol-neutral generation call
(dispatcher/generation_call.py: validation, quotas, the engine). The text deltas go out as the engine
produces them; the last message carries the finish reason, token usage and timing, and with tools the calls
the text holds (dispatcher/tool_calling.py; the text streams as the model wrote it, calls included). A client
that goes away (or whose deadline passes) cancels the request, which frees its KV blocks before the next step."""
from __future__ import annotations

import json

from manager.errors import InvalidArgumentError
from scheduler.generation_engine import GenerationDelta, GenerationResult
from vbert.detokenize import FinishReason

from .auth import current_request_id, current_tenant
from .gen.vbert.v1 import tenant_pb2
from .generation_call import GenerateParams, start_generation, structured_of
from .tool_calling import ToolError, ToolPlan, ToolTurns, tool_plan, with_tools

FINISH_REASONS = {FinishReason.STOP: tenant_pb2.STOP, FinishReason.LENGTH: tenant_pb2.LENGTH,
                  FinishReason.CANCELLED: tenant_pb2.CANCELLED}


def params_of(request) -> tuple[GenerateParams, ToolPlan | None]:
    """A GenerateRequest as the protocol-neutral GenerateParams (validated by start_generation) and its tool plan
    (None: no tools)."""
    try:
        plan = tool_plan(_tools_body(request))
        params = with_tools(_params(request), plan)
    except ToolError as e:                  # OpenAI's field paths, as this request names them
        raise InvalidArgumentError(str(e).replace(".function.", ".", 1)) from None
    return params, plan


def _params(request) -> GenerateParams:
    return GenerateParams(
        adapter=request.adapter or "default", prompt=request.prompt or None,
        messages=_messages(request.messages),
        max_new_tokens=int(request.max_new_tokens),
        temperature=request.temperature if request.HasField("temperature") else None,
        top_p=request.top_p if request.HasField("top_p") else None, top_k=int(request.top_k),
        seed=int(request.seed) if request.HasField("seed") else None, stop=tuple(request.stop),
        stop_token_ids=tuple(request.stop_token_ids), logprobs=int(request.logprobs),
        truncate_prompt=request.truncate_prompt, ignore_eos=request.ignore_eos, min_tokens=int(request.min_tokens),
        logit_bias=tuple(sorted(request.logit_bias.items())), structured=_structured(request),
        include_stop_str_in_output=request.include_stop_str_in_output,
        **{name: getattr(request, name) if request.HasField(name) else None
           for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_p")})


def _messages(messages) -> tuple[tuple[str, str], ...] | None:
    """The chat as (role, content) turns: an assistant's tool_calls and a tool's result as text turns."""
    turns, out = ToolTurns(), []
    for i, m in enumerate(messages):
        turn = turns.turn(i, {"role": m.role, "content": m.content, "tool_call_id": m.tool_call_id,
                              "tool_calls": [{"id": c.id, "function": {"name": c.name, "arguments": c.arguments}}
                                             for c in m.tool_calls]})
        out.append(turn or (m.role, m.content))
    return tuple(out) or None


def _tools_body(request) -> dict:
    """The request's tools in OpenAI's shape, for tool_plan."""
    tools = []
    for i, t in enumerate(request.tools):
        try:
            parameters = json.loads(t.parameters) if t.parameters else None
        except ValueError as e:
            raise InvalidArgumentError(f"tools[{i}].parameters: not JSON ({e})") from None
        tools.append({"type": "function", "function": {"name": t.name, "description": t.description,
                                                       "parameters": parameters}})
    choice = request.tool_choice or None
    if choice not in (None, "auto", "none", "required"):
        choice = {"type": "function", "function": {"name": choice}}
    body = {"tools": tools, "tool_choice": choice}
    if request.HasField("parallel_tool_calls"):
        body["parallel_tool_calls"] = request.parallel_tool_calls
    return body


def _structured(request):
    if not request.HasField("structured_output"):
        return None
    so = request.structured_output
    kind = so.WhichOneof("kind")
    if kind is None:
        raise InvalidArgumentError("structured_output: set one of json, json_object, regex, choice, grammar")
    if kind == "json_object" and not so.json_object:
        raise InvalidArgumentError("structured_output: json_object must be true (leave it unset for free text)")
    value = tuple(so.choice.values) if kind == "choice" else getattr(so, kind)
    return structured_of(kind, None if kind == "json_object" else value)


def _response(delta: GenerationDelta) -> tenant_pb2.GenerateResponse:
    return tenant_pb2.GenerateResponse(
        text=delta.text, token_ids=delta.token_ids,
        logprobs=[tenant_pb2.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, top_ids=lp.top_ids,
                                          top_logprobs=lp.top_logprobs) for lp in delta.logprobs])


def _final(result: GenerationResult, version: int, calls: list[dict]) -> tenant_pb2.GenerateResponse:
    ms = 1000.0
    return tenant_pb2.GenerateResponse(
        tool_calls=[tenant_pb2.ToolCall(id=c["id"], name=c["function"]["name"], arguments=c["function"]["arguments"])
                    for c in calls],
        is_final=True, finish_reason=FINISH_REASONS[result.finish_reason],
        usage=tenant_pb2.GenerationUsage(prompt_tokens=result.num_prompt_tokens,
                                         completion_tokens=result.num_generated_tokens,
                                         cached_prompt_tokens=result.num_cached_tokens),
        metadata=tenant_pb2.GenerationMetadata(
            queue_ms=result.queue_s * ms, time_to_first_token_ms=result.time_to_first_token_s * ms,
            time_per_output_token_ms=result.time_per_output_token_s * ms, total_ms=result.total_s * ms,
            adapter_version=version, num_preemptions=result.num_preemptions))


async def generate(app, request, context):
    """The Generate RPC's body (an async generator of GenerateResponse); exceptions are mapped by the caller."""
    params, plan = params_of(request)
    gen = await start_generation(app, current_tenant(), params, context.time_remaining())
    text = ""                               # with tools: the answer so far, parsed for calls at the end
    async for event in gen.events():
        if isinstance(event, GenerationDelta):
            if plan is not None:
                text += event.text
            yield _response(event)
        else:
            parsed = plan.parse(text, event.finish_reason) if plan is not None else None
            yield _final(event, gen.ref.version, parsed[1] if parsed else [])
    context.set_trailing_metadata([("x-request-id", current_request_id())])
