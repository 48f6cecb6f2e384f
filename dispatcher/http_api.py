"""The OpenAI-compatible HTTP API (FastAPI on uvicorn, in the gRPC server's asyncio loop, the same App).

    POST /v1/completions, POST /v1/chat/completions (`stream: true`: server-sent events ending with
    `data: [DONE]`; `stream_options.include_usage`), POST /v1/embeddings, GET /v1/models[/{model}],
    POST /tokenize and /detokenize (vLLM's), GET /health (no key).

`Authorization: Bearer <tenant API key>` (the gRPC keys, the same call slots, rate limits and quotas);
`model` names one of the caller's adapters (`default`: the bare backbone). Requests become the same
domain calls as gRPC (dispatcher.generation_call, dispatcher.rpc.run_inputs); errors take the gRPC edge's
single mapping (dispatcher.errors.status_of) and leave in OpenAI's shape
`{"error": {"message", "type", "param", "code"}}` with the matching HTTP status. Unknown fields are
ignored, as OpenAI does, except those that would change what comes back (functions, suffix, audio: refused,
UNSUPPORTED); tools are called (tool_choice "auto", "required" or a named function) in one tagged format whose
calls a grammar keeps valid (dispatcher.tool_calling); `top_k`, `min_p`, `min_tokens`, `ignore_eos`,
`repetition_penalty`, `stop_token_ids` and `include_stop_str_in_output` are accepted as vLLM accepts them; `n` (up
to 16) choices are n generations of the request, merged into one answer or stream. Structured output: OpenAI's
`response_format` (json_object, json_schema), vLLM's `structured_outputs` and `guided_json` / `guided_regex` /
`guided_choice` / `guided_grammar`.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import math
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from manager.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError, UnauthenticatedError
from manager.manager import DECODER, DEFAULT_ADAPTER, ENCODER, require_backbone
from scheduler.generation_engine import GenerationDelta, GenerationResult
from vbert.detokenize import FinishReason
from vbert.heads import HeadKind
from vbert.tokens import MAX_CHARS_PER_TOKEN

from .auth import _request_id, _tenant
from .errors import DrainingError, status_of
from .generation_call import GenerateParams, start_generation, structured_of
from .tool_calling import ToolTurns, tool_plan, with_tools
from .rpc import run_inputs

# gRPC status -> (HTTP status, OpenAI error type)
HTTP_OF = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "not_implemented"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
    grpc.StatusCode.DATA_LOSS: (500, "server_error"),
    grpc.StatusCode.INTERNAL: (500, "server_error"),
}
FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.CANCELLED: "abort"}
COMPLETIONS_DEFAULT_MAX_TOKENS = 16      # OpenAI's default for /v1/completions (chat: up to the context)
MAX_TOP_LOGPROBS = 20
MAX_CHOICES = 16                  # n: choices of one request, each a generation of its own


class _Param(InvalidArgumentError):
    """A bad request field; `param` names it in the error body."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


def error_response(exc: BaseException, request_id: str) -> JSONResponse:
    code, message, retry = status_of(exc)
    status, kind = HTTP_OF.get(code, (500, "server_error"))
    if code is grpc.StatusCode.INTERNAL:
        message = f"internal error (request id {request_id})"
    body = {"error": {"message": message or code.name.lower(), "type": kind,
                      "param": getattr(exc, "param", None), "code": code.name.lower()}}
    headers = {"x-request-id": request_id}
    if retry is not None:
        headers["retry-after"] = str(max(1, math.ceil(retry)))
        headers["retry-after-ms"] = str(max(10, math.ceil(retry * 1000)))
    return JSONResponse(body, status_code=status, headers=headers)


# -- request fields --------------------------------------------------------------------------------
def _get(body: dict, name: str, kinds, default=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise _Param(name, f"expected {kinds}, got a boolean")
    if not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
        raise _Param(name, f"expected {names}, got {type(value).__name__}")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise _Param("stop", "expected a string or a list of strings")


def _max_tokens(body: dict, default: int) -> int:
    value = _get(body, "max_completion_tokens", int)
    if value is None:
        value = _get(body, "max_tokens", int)
    if value is None:
        return default
    if value < 1:
        raise _Param("max_tokens", f"must be >= 1, got {value}")
    return value


def _num_choices(body: dict) -> int:
    n = _get(body, "n", int, 1)
    if not 1 <= n <= MAX_CHOICES:
        raise _Param("n", f"must be in [1, {MAX_CHOICES}], got {n}")
    if body.get("best_of") not in (None, n):
        raise _Param("best_of", "only best_of = n is supported (no server-side choice among more)")
    return n


# OpenAI fields that change what comes back: silently ignoring them would answer another question than the one asked
UNSUPPORTED = {"functions": "function calls are not supported", "function_call": "function calls are not supported",
               "suffix": "insertion (suffix) is not supported", "audio": "audio output is not supported",
               "prediction": "predicted outputs are not supported"}


def _refuse_unsupported(body: dict) -> None:
    for name, why in UNSUPPORTED.items():
        value = body.get(name)
        if value is None or value == []:
            continue
        raise _Param(name, why)
    if body.get("modalities") not in (None, ["text"]):
        raise _Param("modalities", "only text is supported (audio output is not supported)")


def _common(body: dict) -> dict:
    _refuse_unsupported(body)
    return dict(temperature=_float(body, "temperature"), top_p=_float(body, "top_p"),
                top_k=max(0, _get(body, "top_k", int, 0)), seed=_get(body, "seed", int), stop=_stop(body),
                ignore_eos=bool(_get(body, "ignore_eos", bool, False)),
                presence_penalty=_float(body, "presence_penalty"), frequency_penalty=_float(body, "frequency_penalty"),
                repetition_penalty=_float(body, "repetition_penalty"), min_p=_float(body, "min_p"),
                min_tokens=_get(body, "min_tokens", int, 0), logit_bias=_logit_bias(body),
                include_stop_str_in_output=bool(_get(body, "include_stop_str_in_output", bool, False)),
                structured=_structured(body),
                stop_token_ids=_token_ids(body, "stop_token_ids"))


GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def _structured(body: dict):
    """The answer's grammar: OpenAI's response_format (json_object, json_schema), vLLM's structured_outputs
    ({json | json_object | regex | choice | grammar: ...}) or its older guided_json / _regex / _choice / _grammar."""
    given = [name for name in ("response_format", "structured_outputs", *GUIDED) if body.get(name) is not None]
    if not given or given == ["response_format"] and body["response_format"] == {"type": "text"}:
        return None
    if len(given) > 1:
        raise _Param(given[1], f"give one of {', '.join(given)}")
    name, value = given[0], body[given[0]]
    try:
        return structured_of(*_structured_kind(name, value))
    except _Param:
        raise
    except InvalidArgumentError as e:
        raise _Param(name, str(e)) from None


def _structured_kind(name: str, value) -> tuple:
    if name in GUIDED:
        return GUIDED[name], value
    if not isinstance(value, dict):
        raise _Param(name, "expected an object")
    if name == "response_format":
        kind = value.get("type")
        if kind == "json_object":
            return "json_object", None
        if kind == "json_schema":
            schema = (value.get("json_schema") or {}).get("schema") if isinstance(value.get("json_schema"), dict) \
                else None
            if schema is None:
                raise _Param(name, "json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": {...}}}")
            return "json", schema
        raise _Param(name, f"type must be text, json_object or json_schema, got {kind!r}")
    kinds = [k for k in ("json", "json_object", "regex", "choice", "grammar") if value.get(k) not in (None, False)]
    unknown = sorted(set(value) - {"json", "json_object", "regex", "choice", "grammar"})
    if unknown or len(kinds) != 1:
        raise _Param(name, "set exactly one of json, json_object, regex, choice, grammar"
                     + (f" ({', '.join(unknown)} not supported)" if unknown else ""))
    return kinds[0], None if kinds[0] == "json_object" else value[kinds[0]]


def _logit_bias(body: dict) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias: {"token id": bias}."""
    bias = body.get("logit_bias")
    if bias is None:
        return ()
    if not isinstance(bias, dict):
        raise _Param("logit_bias", "expected an object of token id -> bias")
    out = []
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise _Param("logit_bias", f"{key!r} is not a token id") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Param("logit_bias", f"the bias of {key} must be a number, got {value!r}")
        out.append((token, float(value)))
    return tuple(out)


def _token_ids(body: dict, name: str) -> tuple[int, ...]:
    value = body.get(name)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                              for t in value):
        raise _Param(name, "expected a list of token ids")
    return tuple(value)


def _float(body: dict, name: str) -> float | None:
    value = _get(body, name, (int, float))
    return None if value is None else float(value)


def _model(body: dict) -> str:
    model = _get(body, "model", str)
    if not model:
        raise _Param("model", "required: one of your adapters (see GET /v1/models), or 'default'")
    return model


def _messages(body: dict) -> tuple[tuple[str, str], ...]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _Param("messages", "expected a non-empty list of {role, content}")
    out, tools = [], ToolTurns()
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _Param(f"messages[{i}]", "expected an object with a string role")
        turn = tools.turn(i, m)                 # an earlier tool call or tool result, as a text turn
        if turn is not None:
            out.append(turn)
            continue
        content = m.get("content")
        if isinstance(content, list):        # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _Param(f"messages[{i}].content", "only text content parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise _Param(f"messages[{i}].content", "expected a string or a list of text parts")
        out.append((m["role"], content))
    return tuple(out)


def completion_params(body: dict) -> tuple[GenerateParams, dict]:
    """POST /v1/completions -> (GenerateParams, response options)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _Param("prompt", "expected a string (one prompt per request)")
    if body.get("echo"):
        raise _Param("echo", "echo is not supported")
    if body.get("tools") or body.get("tool_choice") not in (None, "none"):
        raise _Param("tools", "tools are called on /v1/chat/completions")
    logprobs = _get(body, "logprobs", int, 0)
    if not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise _Param("logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {logprobs}")
    params = GenerateParams(adapter=_model(body), prompt=prompt, logprobs=logprobs,
                            max_new_tokens=_max_tokens(body, COMPLETIONS_DEFAULT_MAX_TOKENS), **_common(body))
    return params, {"logprobs": logprobs > 0}


def chat_params(body: dict) -> tuple[GenerateParams, dict]:
    """POST /v1/chat/completions -> (GenerateParams, response options)."""
    want = bool(_get(body, "logprobs", bool, False))
    top = _get(body, "top_logprobs", int, 0)
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise _Param("top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {top}")
    if top and not want:
        raise _Param("top_logprobs", "needs logprobs: true")
    params = GenerateParams(adapter=_model(body), messages=_messages(body), logprobs=max(1, top) if want else 0,
                            max_new_tokens=_max_tokens(body, 0), **_common(body))
    plan = tool_plan(body)
    return with_tools(params, plan), {"logprobs": want, "top_logprobs": top, "tools": plan}


def _stream_options(body: dict) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise _Param("stream_options", "expected an object")
    return bool(options.get("include_usage", False))


class _CompletionShape:
    """/v1/completions: text choices, log-probabilities as tokens / token_logprobs / top_logprobs."""

    route, id_prefix, object, chunk_object = "/v1/completions", "cmpl", "text_completion", "text_completion"

    def __init__(self, body: dict, tokens):
        self.params, opts = completion_params(body)
        self.tokens, self.logprobs, self.offset = tokens, opts["logprobs"], 0

    def first(self) -> dict | None:
        return None

    def whole(self, text: str, lps, result: GenerationResult) -> dict:
        return {"text": text, "logprobs": self.tokens.completion_logprobs(lps, 0) if self.logprobs else None}

    def delta(self, ev: GenerationDelta) -> dict:
        lp = self.tokens.completion_logprobs(ev.logprobs, self.offset) if self.logprobs else None
        self.offset += len(ev.text)
        return {"text": ev.text, "logprobs": lp}

    def end(self) -> dict:
        return {"text": "", "logprobs": None}

    def tail(self, result: GenerationResult) -> dict | None:
        return None

    def finish(self, result: GenerationResult) -> str:
        return FINISH[result.finish_reason]


class _ChatShape:
    """/v1/chat/completions: an assistant message (deltas when streamed), log-probabilities as content."""

    route, id_prefix, object, chunk_object = ("/v1/chat/completions", "chatcmpl", "chat.completion",
                                              "chat.completion.chunk")

    def __init__(self, body: dict, tokens):
        self.params, opts = chat_params(body)
        self.tokens, self.logprobs, self.top = tokens, opts["logprobs"], opts["top_logprobs"]
        self.tools, self._text, self._sent = opts["tools"], "", 0      # tools: the answer so far, its content streamed
        self._content, self._calls = None, None                       # a complete call's content and tool_calls

    def _lp(self, lps) -> dict | None:
        return {"content": self.tokens.chat_logprobs(lps, self.top)} if self.logprobs else None

    def first(self) -> dict | None:
        return {"delta": {"role": "assistant", "content": ""}, "logprobs": None}

    def _parse(self, text: str, result: GenerationResult) -> None:
        """The content and tool calls of an answer with a complete call (one cut by max_tokens or a stop string
        stays text)."""
        parsed = self.tools.parse(text, result.finish_reason) if self.tools is not None else None
        self._content, self._calls = parsed if parsed is not None else (None, None)

    def whole(self, text: str, lps, result: GenerationResult) -> dict:
        self._parse(text, result)
        if self._calls is not None:
            return {"message": {"role": "assistant", "content": self._content, "tool_calls": self._calls},
                    "logprobs": self._lp(lps)}
        return {"message": {"role": "assistant", "content": text}, "logprobs": self._lp(lps)}

    def delta(self, ev: GenerationDelta) -> dict | None:
        if self.tools is None:
            return {"delta": {"content": ev.text}, "logprobs": self._lp(ev.logprobs)}
        self._text += ev.text                # with tools: "auto" text streams up to where a call may begin; a call
        upto = self.tools.streamable(self._text)     # is streamed whole once complete (tail); no log-probabilities
        if upto <= self._sent:
            return None
        new, self._sent = self._text[self._sent:upto], upto
        return {"delta": {"content": new}, "logprobs": None}

    def tail(self, result: GenerationResult) -> dict | None:
        if self.tools is None:
            return None
        self._parse(self._text, result)
        if self._calls is None:              # no complete call: the rest of the text
            rest = self._text[self._sent:]
            return {"delta": {"content": rest}, "logprobs": None} if rest else None
        return {"delta": {"tool_calls": [{"index": k, **c} for k, c in enumerate(self._calls)]}, "logprobs": None}

    def end(self) -> dict:
        return {"delta": {}, "logprobs": None}

    def finish(self, result: GenerationResult) -> str:
        if self._calls is not None:          # OpenAI: "stop" for a forced function, "tool_calls" when calls came
            return "stop" if self.tools.mode == "named" else "tool_calls"
        return FINISH[result.finish_reason]


# -- responses ------------------------------------------------------------------------------------------
class _Tokens:
    """Token strings for log-probabilities (each token decoded alone)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def chat_logprobs(self, lps, top: int) -> list[dict]:
        out = []
        for lp in lps:
            t = self.text(lp.token_id)
            out.append({"token": t, "logprob": lp.logprob, "bytes": list(t.encode()),
                        "top_logprobs": [{"token": self.text(i), "logprob": v, "bytes": list(self.text(i).encode())}
                                         for i, v in list(zip(lp.top_ids, lp.top_logprobs))[:top]]})
        return out

    def completion_logprobs(self, lps, offset: int) -> dict:
        tokens = [self.text(lp.token_id) for lp in lps]
        offsets, pos = [], offset
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
                "top_logprobs": [{self.text(i): v for i, v in zip(lp.top_ids, lp.top_logprobs)} for lp in lps],
                "text_offset": offsets}


def _usage(results: list[GenerationResult]) -> dict:
    """The choices' usage: the prompt once (as OpenAI counts it; its cached tokens those of the first choice), the
    completions summed."""
    prompt, completion = results[0].num_prompt_tokens, sum(r.num_generated_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": results[0].num_cached_tokens}}


class _Primed:
    """A generation whose first event has been read (its prompt is computed), replayed first."""

    def __init__(self, gen):
        self.gen, self._events, self._first = gen, None, None

    @property
    def num_prompt_tokens(self) -> int:
        return self.gen.num_prompt_tokens

    async def prime(self) -> None:
        self._events = self.gen.events()
        self._first = await self._events.__anext__()

    async def events(self):
        try:
            yield self._first
            async for ev in self._events:
                yield ev
        finally:
            await self._events.aclose()

    def cancel(self) -> None:
        self.gen.cancel()


class _Choices:
    """The n generations of one request: cancelled together, their events merged as they come."""

    def __init__(self, gens: list):
        self.gens = gens

    def cancel(self) -> None:
        for g in self.gens:
            g.cancel()

    async def events(self) -> AsyncIterator[tuple[int, object]]:
        """(choice index, event) as each generation produces them, until every one has finished; an error in any
        ends the merge (the others are cancelled by the caller's cancel, as a disconnect would)."""
        if len(self.gens) == 1:                         # no tasks for the common case
            async for ev in self.gens[0].events():
                yield 0, ev
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, gen) -> None:
            try:
                async for ev in gen.events():
                    await queue.put((i, ev))
            except Exception as e:  # noqa: BLE001 - raised to the reader below
                await queue.put((i, e))
        tasks = [asyncio.get_running_loop().create_task(pump(i, g)) for i, g in enumerate(self.gens)]
        try:
            remaining = len(self.gens)
            while remaining:
                i, ev = await queue.get()
                if isinstance(ev, Exception):
                    raise ev
                if isinstance(ev, GenerationResult):
                    remaining -= 1
                yield i, ev
        finally:
            for t in tasks:
                t.cancel()


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


# -- the application ---------------------------------------------------------------------------------
def create_http_app(app, interceptor) -> FastAPI:
    """The FastAPI application over the App; interceptor: the gRPC edge's AuthInterceptor (its call slots,
    authentication cache, failed-authentication limits, metrics and log lines are shared)."""
    api = FastAPI(title="vbert-serve OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
    tokens = _Tokens(app.decoder.tokenizer) if app.decoder is not None else None

    async def enter(request: Request, method: str):
        """Request id, draining refusal, authentication and the tenant's call slot; returns (tenant, release)."""
        _request_id.set(uuid.uuid4().hex[:16])
        if app.is_draining:
            raise DrainingError("the server is draining; retry on another replica")
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else None
        if not token:
            raise UnauthenticatedError("missing 'Authorization: Bearer <api key>' header")
        peer = _peer(request)
        release = await interceptor.enter_tenant(token, lambda: peer)
        return _tenant.get(), release

    def finish(method: str, started: float, exc: BaseException | None, status: int = 200) -> None:
        code = "OK" if exc is None else status_of(exc)[0].name
        interceptor.record_call(method, code, time.perf_counter() - started, protocol="http", http_status=status)

    async def handle(request: Request, method: str, work, has_body: bool = True) -> JSONResponse | StreamingResponse:
        """Run `work(tenant, body)`: a dict (JSON response) or (async iterator of SSE bytes, its Generation):
        a stream, which keeps the call slot until it ends. Every error -> error_response."""
        started, release = time.perf_counter(), None
        try:
            tenant, release = await enter(request, method)
            body = await _json_body(request) if has_body else {}
            result = await work(tenant, body)
        except Exception as e:  # noqa: BLE001 - mapped to its status
            if release is not None:
                release()
            response = error_response(e, _request_id.get())
            finish(method, started, e, response.status_code)
            return response
        rid = _request_id.get()
        if isinstance(result, dict):
            release()
            finish(method, started, None)
            return JSONResponse(result, headers={"x-request-id": rid})
        chunks, gen = result
        outcome: list = []

        def done() -> None:
            """Once: cancel the generation if it has not finished, give the slot back, record the call.
            Runs when the stream ends, fails, or never started (the client left before the first byte)."""
            if outcome and outcome[-1] == "done":
                return
            gen.cancel()
            release()
            finish(method, started, outcome[0] if outcome else None)
            outcome.append("done")

        async def body_iter():
            try:
                async for chunk in chunks:
                    yield chunk
            except Exception as e:  # noqa: BLE001 - the stream has begun: an error event, then the end
                outcome.insert(0, e)
                code, message, _ = status_of(e)
                kind = HTTP_OF.get(code, (500, "server_error"))[1]
                yield _sse({"error": {"message": message or code.name.lower(), "type": kind, "param": None,
                                      "code": code.name.lower()}})
            finally:
                done()
        return _EventStream(body_iter(), done, media_type="text/event-stream",
                            headers={"x-request-id": rid, "cache-control": "no-cache"})

    # -- generation -------------------------------------------------------------------------------------
    async def generate(tenant, params: GenerateParams, rpc: str):
        # HTTP has no deadline header of its own: the server's default_deadline_s applies
        return await start_generation(app, tenant, params, None, rpc=rpc)

    async def start_choices(tenant, params: GenerateParams, rpc: str, n: int) -> _Choices:
        """n generations of the same request (choice i with seed + i when a seed is given, else each its own
        random one); a refusal of any cancels those already started."""
        gens = []
        try:
            for i in range(n):
                p = params if i == 0 or params.seed is None else dataclasses.replace(params, seed=params.seed + i)
                gens.append(await generate(tenant, p, rpc))
                if i == 0 and n > 1 and app.config.generation_prefix_caching \
                        and gens[0].num_prompt_tokens > app.config.decoder_block_size:
                    # the others start once the first has computed its prompt: its full blocks are then in the
                    # prefix cache, which they take instead of computing the prompt again
                    gens[0] = _Primed(gens[0])
                    await gens[0].prime()
        except BaseException:
            for g in gens:
                g.cancel()
            raise
        return _Choices(gens)

    async def generation_route(request: Request, shape_of) -> JSONResponse | StreamingResponse:
        """/v1/completions and /v1/chat/completions: the same call, answered in the route's shape; n choices."""
        async def work(tenant, body):
            n = _num_choices(body)
            shapes = [shape_of(body, tokens) for _ in range(n)]      # each choice keeps its own offsets
            shape = shapes[0]
            stream, usage_too = bool(body.get("stream", False)), _stream_options(body)
            gens = await start_choices(tenant, shape.params, shape.route, n)
            head = {"id": f"{shape.id_prefix}-{_request_id.get()}", "created": int(time.time()),
                    "model": shape.params.adapter}
            if not stream:
                try:
                    outs = await asyncio.gather(*(_collect(g, request) for g in gens.gens))
                finally:
                    gens.cancel()
                return {**head, "object": shape.object, "usage": _usage([result for _, _, result in outs]),
                        "choices": [{"index": i, **shapes[i].whole(text, lps, result),
                                     "finish_reason": shapes[i].finish(result)}
                                    for i, (text, lps, result) in enumerate(outs)]}

            async def chunks() -> AsyncIterator[bytes]:
                base = {**head, "object": shape.chunk_object}

                def chunk(i: int, choice: dict, finish_reason=None) -> bytes:
                    return _sse({**base, "choices": [{"index": i, **choice, "finish_reason": finish_reason}]})
                for i, sh in enumerate(shapes):
                    first = sh.first()
                    if first is not None:
                        yield chunk(i, first)
                results = []
                async for i, ev in gens.events():
                    if isinstance(ev, GenerationDelta):
                        delta = shapes[i].delta(ev) if ev.text or ev.token_ids else None
                        if delta is not None:
                            yield chunk(i, delta)
                    else:
                        results.append(ev)
                        tail = shapes[i].tail(ev)
                        if tail is not None:
                            yield chunk(i, tail)
                        yield chunk(i, shapes[i].end(), shapes[i].finish(ev))
                if usage_too:
                    yield _sse({**base, "choices": [], "usage": _usage(results)})
                yield b"data: [DONE]\n\n"
            return chunks(), gens
        return await handle(request, shape_of.route, work)

    async def completions(request: Request):
        return await generation_route(request, _CompletionShape)

    async def chat_completions(request: Request):
        return await generation_route(request, _ChatShape)

    # -- embeddings -----------------------------------------------------------------------------------
    async def embeddings(request: Request):
        async def work(tenant, body):
            method = "/v1/embeddings"
            app.require_encoder(method)
            model = _model(body)
            texts = _embedding_inputs(body, app.config.max_texts_per_request, app.model.spec.vocab_size)
            fmt = _get(body, "encoding_format", str, "float")
            if fmt not in ("float", "base64"):
                raise _Param("encoding_format", f"expected 'float' or 'base64', got {fmt!r}")
            if body.get("dimensions") is not None:
                raise _Param("dimensions", "is not supported (the embedding has the backbone's width)")
            ref = await asyncio.to_thread(app.manager.resolve, tenant, model)
            require_backbone(ref, ENCODER, method)
            if ref.head.kind is not HeadKind.EMBED:
                raise FailedPreconditionError(f"adapter {model!r} has a {ref.head.kind.value} head; {method} needs "
                                              f"an embed head (or 'default', the bare encoder)")
            limit = min(tenant.quotas.max_tokens_per_request, app.config.max_tokens_per_text, app.model.max_length)
            inputs = [(t, None) if isinstance(t, str) else (None, t[:limit - 1] + t[-1:] if len(t) > limit else t)
                      for t in texts]
            completions, reqs = await run_inputs(app, None, tenant, ref, inputs, truncate=True,
                                                 normalize=None, method=method)
            data = []
            for i, c in enumerate(completions):
                vec = c.output.embedding.float()
                value = (base64.b64encode(np.asarray(vec.numpy(), dtype="<f4").tobytes()).decode() if fmt == "base64"
                         else vec.tolist())
                data.append({"object": "embedding", "index": i, "embedding": value})
            n = sum(len(r.prompt_ids or ()) for r in reqs)
            return {"object": "list", "data": data, "model": model,
                    "usage": {"prompt_tokens": n, "total_tokens": n}}
        return await handle(request, "/v1/embeddings", work)

    # -- tokenization (vLLM's /tokenize and /detokenize) ----------------------------------------------------
    async def _tokenizer_of(tenant, body: dict, method: str):
        """(backbone, its tokenizer, its context) of the body's model: an adapter's backbone; for 'default', the
        body's "backbone" or the decoder when this server has one."""
        model = _model(body)
        which = _get(body, "backbone", str, DECODER if app.decoder is not None else ENCODER)
        if which not in (ENCODER, DECODER):
            raise _Param("backbone", f"expected {ENCODER!r} or {DECODER!r}, got {which!r}")
        ref = await asyncio.to_thread(app.manager.resolve, tenant, model, which)
        if ref.backbone == DECODER:
            if app.decoder is None:
                raise FailedPreconditionError(f"this server loads no decoder backbone; {method} of {model!r} needs it")
            return DECODER, app.decoder.tokenizer, app.decoder.spec.max_position_embeddings
        app.require_encoder(method)
        return ENCODER, app.model.tokenizer, app.model.max_length

    async def tokenize(request: Request):
        async def work(tenant, body):
            backbone, tokenizer, context = await _tokenizer_of(tenant, body, "/tokenize")
            app.limiter.acquire(tenant, 1)
            if (body.get("prompt") is None) == (body.get("messages") is None):
                raise _Param("prompt", "give exactly one of prompt and messages")
            if body.get("messages") is not None:
                if backbone != DECODER:
                    raise _Param("messages", "a chat is tokenized by the decoder; send a prompt for the encoder")
                messages = _messages(body)
                plan = tool_plan(body)          # the tools' system message, as /v1/chat/completions sends it
                text = app.decoder.render_chat(list(plan.messages(messages) if plan is not None else messages))
            else:
                text = body["prompt"]
                if not isinstance(text, str):
                    raise _Param("prompt", "expected a string")
            special = _get(body, "add_special_tokens", bool, body.get("messages") is None)
            if len(text) > context * MAX_CHARS_PER_TOKEN:
                raise _Param("prompt", f"{len(text)} characters, more than {context * MAX_CHARS_PER_TOKEN} (the "
                                       f"{backbone}'s context of {context} tokens x {MAX_CHARS_PER_TOKEN})")
            ids = await asyncio.to_thread(lambda: list(tokenizer(text, add_special_tokens=special)["input_ids"]))
            out = {"count": len(ids), "max_model_len": context, "tokens": ids}
            if _get(body, "return_token_strs", bool, False):
                out["token_strs"] = tokenizer.convert_ids_to_tokens(ids)
            return out
        return await handle(request, "/tokenize", work)

    async def detokenize(request: Request):
        async def work(tenant, body):
            backbone, tokenizer, context = await _tokenizer_of(tenant, body, "/detokenize")
            app.limiter.acquire(tenant, 1)
            ids, vocab = body.get("tokens"), len(tokenizer)
            if not isinstance(ids, list) or len(ids) > 4 * context or not all(
                    isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
                raise _Param("tokens", f"expected a list of at most {4 * context} token ids in [0, {vocab})")
            return {"prompt": await asyncio.to_thread(tokenizer.decode, ids)}
        return await handle(request, "/detokenize", work)

    # -- models ---------------------------------------------------------------------------------------
    def _model_entry(name: str, created: float, tenant_name: str, backbone: str | None) -> dict:
        return {"id": name, "object": "model", "created": int(created), "owned_by": tenant_name,
                "backbone": backbone}

    async def list_models(request: Request):
        async def work(tenant, body):
            records = await asyncio.to_thread(app.manager.list_adapters, tenant.name)
            entries = [_model_entry(DEFAULT_ADAPTER, app.started, tenant.name, None)]
            entries += [_model_entry(r.name, r.created, tenant.name, r.backbone) for r in records if r.is_active]
            return {"object": "list", "data": entries}
        return await handle(request, "/v1/models", work, has_body=False)

    async def get_model(request: Request, model: str):
        async def work(tenant, body):
            if model == DEFAULT_ADAPTER:
                return _model_entry(DEFAULT_ADAPTER, app.started, tenant.name, None)
            records = await asyncio.to_thread(app.manager.list_adapters, tenant.name)
            active = [r for r in records if r.name == model and r.is_active]
            if not active:
                raise NotFoundError(f"tenant {tenant.name!r} has no active adapter {model!r}")
            return _model_entry(model, active[0].created, tenant.name, active[0].backbone)
        return await handle(request, "/v1/models/{model}", work, has_body=False)

    async def health(request: Request):
        ok = app.is_accepting
        return JSONResponse({"status": "ok" if ok else "draining"}, status_code=200 if ok else 503)

    api.add_api_route("/v1/completions", completions, methods=["POST"])
    api.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    api.add_api_route("/v1/embeddings", embeddings, methods=["POST"])
    api.add_api_route("/v1/models", list_models, methods=["GET"])
    api.add_api_route("/v1/models/{model}", get_model, methods=["GET"])
    api.add_api_route("/tokenize", tokenize, methods=["POST"])
    api.add_api_route("/detokenize", detokenize, methods=["POST"])
    api.add_api_route("/health", health, methods=["GET"])
    return api


DISCONNECT_POLL_S = 0.1


async def _collect(gen, request: Request) -> tuple[str, list, GenerationResult]:
    """A whole (non-streamed) generation: its text, log-probabilities and result. A client that goes away
    meanwhile cancels it (checked every DISCONNECT_POLL_S), as a streamed one is."""
    async def watch():
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        gen.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    text, lps, result = [], [], None
    try:
        async for ev in gen.events():
            if isinstance(ev, GenerationDelta):
                text.append(ev.text)
                lps += ev.logprobs
            else:
                result = ev
    finally:
        watcher.cancel()
    return "".join(text), lps, result


async def _json_body(request: Request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidArgumentError(f"the request body is not JSON ({e})") from None
    if not isinstance(body, dict):
        raise InvalidArgumentError("the request body must be a JSON object")
    return body


def _peer(request: Request) -> str:
    """The caller's address as gRPC writes peers (dispatcher.admission.peer_host parses it)."""
    if request.client is None:
        return "unknown"
    host, port = request.client.host, request.client.port
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


def _embedding_inputs(body: dict, max_inputs: int, vocab_size: int) -> list:
    value = body.get("input")
    if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(t, int) for t in value)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise _Param("input", "expected a string, a list of strings, or token ids")
    if len(value) > max_inputs:
        raise _Param("input", f"{len(value)} inputs, above the limit of {max_inputs} per request")
    for i, item in enumerate(value):
        if isinstance(item, str):
            if not item.strip():
                raise _Param("input", f"input {i} is empty")
        elif isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            bad = [t for t in item if not 0 <= t < vocab_size]
            if bad:
                raise _Param("input", f"input {i}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
        else:
            raise _Param("input", f"input {i}: expected a non-empty string or list of token ids")
    return value


class _EventStream(StreamingResponse):
    """A server-sent event stream whose cleanup runs however the response ends, even when the client
    left before its first byte (then the body iterator never starts, and its own `finally` never runs)."""

    def __init__(self, content, cleanup, **kw):
        super().__init__(content, **kw)
        self._cleanup = cleanup

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._cleanup()


class HttpServer:
    """uvicorn serving the API on a socket bound at construction (so its port is known at once), in the
    running event loop; signals stay with the gRPC server, which drains both."""

    def __init__(self, api: FastAPI, host: str, port: int, ssl: dict | None = None):
        import socket

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(api, log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=5,
                                **(ssl or {}))
        self.server = _QuietUvicorn(config)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[self.sock]))
        while not self.server.started and not self._task.done():
            await asyncio.sleep(0.01)
        if self._task.done():
            self._task.result()        # raises what stopped it

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class _QuietUvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        yield       # the gRPC server's SIGTERM handler drains HTTP too
