"""Python client of the vbert server: tenant calls (classify, tag, embed) and admin calls, blocking
(`Client`) or asyncio (`AsyncClient`, grpc.aio), with the same methods and results (plain dicts
and lists, no protobuf).

    with Client("127.0.0.1:50051", api_key=key) as c:
        c.classify("tickets", ["my card was charged twice"])  # [{"label": ..., "scores": {...}}]

Errors raise `VbertError` (status code, details, the server's request id, retry-after).

Retries (exponential backoff with jitter, at most `max_retries` after the first attempt):
- only UNAVAILABLE and RESOURCE_EXHAUSTED are ever retried; every other code is raised at once;
- a server's `retry-after-ms` trailer sets the wait (never shorter than asked nor than `backoff_s`,
  plus up to 10% jitter); a wait longer than `timeout` is not taken, the error is raised instead;
- idempotent calls are retried on both codes: every tenant call (classify, tag, embed), every
  read (get, list, status), and the admin writes that set a state (update quotas, suspend,
  resume, activate, pin, unpin);
- writes that are not idempotent (register, upload, rotate key, delete tenant, delete adapter)
  are retried only when the server provably refused them before doing anything: UNAVAILABLE
  answered by the server itself (it carries an `x-request-id` trailer: the draining check, which
  runs before any handler). Never on RESOURCE_EXHAUSTED (the admin API has no rate limit; there
  it means a message over the size limit or the concurrent-call limit), and never on a
  connection-level UNAVAILABLE, after which the write may or may not have happened.

This module imports only grpc and the generated stubs (no torch), so the CLI starts fast.
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import random
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import grpc

from .gen.vbert.v1 import admin_pb2, admin_pb2_grpc, tenant_pb2, tenant_pb2_grpc

RETRY_AFTER_KEY = "retry-after-ms"   # = dispatcher.errors.RETRY_AFTER_KEY (not imported: it pulls in torch)
REQUEST_ID_KEY = "x-request-id"
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
CHUNK_BYTES = 1 << 20
MAX_MESSAGE_BYTES = 64 << 20


class VbertError(Exception):
    """A failed call: `code` (grpc.StatusCode), `details`, `request_id` (None when the server
    never answered), `retry_after_s` (when the server said when to come back)."""

    def __init__(self, code: grpc.StatusCode, details: str, request_id: str | None = None,
                 retry_after_s: float | None = None):
        self.code, self.details, self.request_id, self.retry_after_s = code, details, request_id, retry_after_s
        super().__init__(f"{code.name}: {details}" + (f" (request id {request_id})" if request_id else ""))

    @classmethod
    def from_rpc_error(cls, e: grpc.RpcError) -> "VbertError":
        code = e.code() if callable(getattr(e, "code", None)) else grpc.StatusCode.UNKNOWN
        details = (e.details() if callable(getattr(e, "details", None)) else None) or str(e)
        trailers = {}
        try:
            for key, value in (e.trailing_metadata() or ()):
                trailers[key] = value
        except Exception:  # noqa: BLE001 - no trailers on this error
            pass
        retry_after = None
        try:
            if RETRY_AFTER_KEY in trailers:
                retry_after = max(0.0, int(trailers[RETRY_AFTER_KEY]) / 1000)
        except ValueError:
            retry_after = None
        return cls(code or grpc.StatusCode.UNKNOWN, details, trailers.get(REQUEST_ID_KEY), retry_after)

    @property
    def is_retryable(self) -> bool:
        return self.code in RETRYABLE


def should_retry(error: VbertError, is_idempotent: bool) -> bool:
    """The retry rule of the module docstring."""
    if error.code not in RETRYABLE:
        return False
    if is_idempotent:
        return True
    return error.code is grpc.StatusCode.UNAVAILABLE and error.request_id is not None


def retry_delay(error: VbertError, attempt: int, backoff_s: float, max_backoff_s: float,
                rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait before retry number attempt + 1 (attempt counts from 0). A server's hint is
    never taken below backoff_s: a hint of 0 does not mean "retry at once"."""
    if error.retry_after_s is not None:
        return max(error.retry_after_s, min(backoff_s, max_backoff_s)) * (1 + 0.1 * rand())
    return min(max_backoff_s, backoff_s * 2 ** attempt) * (0.5 + 0.5 * rand())


# -- archive of an adapter directory -----------------------------------------------------------
def tar_directory(path: str | Path) -> bytes:
    """An uncompressed tar of the regular files at the top of `path` (links followed, sub-folders
    skipped), reproducible: sorted names, mtime 0, mode 0644."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory")
    files = sorted(p for p in path.iterdir() if p.is_file())
    if not files:
        raise ValueError(f"{path} holds no files")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for p in files:
            data = p.read_bytes()
            info = tarfile.TarInfo(p.name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def upload_chunks(tenant: str, name: str, payload: bytes, activate: bool = True,
                  chunk_bytes: int = CHUNK_BYTES) -> list[admin_pb2.UploadAdapterChunk]:
    header = admin_pb2.UploadAdapterHeader(tenant=tenant, name=name, sha256=hashlib.sha256(payload).hexdigest(),
                                           size=len(payload), activate=activate)
    return [admin_pb2.UploadAdapterChunk(header=header)] + [
        admin_pb2.UploadAdapterChunk(data=payload[i:i + chunk_bytes]) for i in range(0, len(payload), chunk_bytes)]


# -- protobuf -> plain values ------------------------------------------------------------------
def _classification(c) -> dict:
    return {"label": c.label, "scores": {s.label: s.score for s in c.scores}}


def _tagging(t) -> dict:
    return {"tokens": [{"token": x.token, "label": x.label, "score": x.score, "start_char": x.start_char,
                        "end_char": x.end_char} for x in t.tokens],
            "entities": [{"label": e.label, "text": e.text, "start_token": e.start_token, "end_token": e.end_token,
                          "score": e.score, "start_char": e.start_char, "end_char": e.end_char}
                         for e in t.entities]}


def _quotas(q) -> dict:
    return {"requests_per_s": q.requests_per_s, "burst": q.burst, "max_tokens_per_request": q.max_tokens_per_request,
            "weight": q.weight}


def _tenant(t) -> dict:
    return {"id": t.id, "name": t.name, "created": t.created, "status": t.status, "quotas": _quotas(t.quotas)}


def _adapter(a) -> dict:
    return {"tenant": a.tenant, "name": a.name, "version": a.version, "kind": a.kind, "head_kind": a.head_kind,
            "labels": list(a.labels), "sha256": a.sha256, "size": a.size, "created": a.created,
            "is_active": a.is_active, "is_pinned": a.is_pinned, "is_resident": a.is_resident,
            "backbone": a.backbone or "encoder"}   # an older server does not send it: all its adapters are encoder ones


def _status(s) -> dict:
    return {"backbone": s.backbone, "device": s.device, "dtype": s.dtype, "num_tenants": s.num_tenants,
            "num_resident_adapters": s.num_resident_adapters, "queue_depth": s.queue_depth,
            "lora_slots": s.lora_slots, "bottleneck_slots": s.bottleneck_slots, "is_draining": s.is_draining,
            "version": s.version,
            "limits": {f.name: getattr(s.limits, f.name) for f in s.limits.DESCRIPTOR.fields},
            "backbones": {b.name: {f.name: getattr(b, f.name) for f in b.DESCRIPTOR.fields if f.name != "name"}
                          for b in s.backbones}}


def _generation_event(r) -> dict:
    """One streamed message: {"text", "token_ids"[, "logprobs"]}; the final one adds "finish_reason"
    ("stop" | "length" | "cancelled"), "usage", "metadata" (timing in ms) and, when the answer called tools,
    "tool_calls": [{"id", "name", "arguments": a dict}]."""
    out = {"text": r.text, "token_ids": list(r.token_ids)}
    if r.logprobs:
        out["logprobs"] = [{"token_id": lp.token_id, "logprob": lp.logprob, "top": dict(zip(lp.top_ids, lp.top_logprobs))}
                           for lp in r.logprobs]
    if r.is_final:
        if r.tool_calls:
            out["tool_calls"] = [{"id": c.id, "name": c.name, "arguments": json.loads(c.arguments)}
                                 for c in r.tool_calls]
        out["finish_reason"] = tenant_pb2.FinishReason.Name(r.finish_reason).lower()
        out["usage"] = {"prompt_tokens": r.usage.prompt_tokens, "completion_tokens": r.usage.completion_tokens,
                        "cached_prompt_tokens": r.usage.cached_prompt_tokens}
        out["metadata"] = {f.name: v for f, v in r.metadata.ListFields()}
    return out


def _inputs(texts: str | Iterable[str]) -> list[tenant_pb2.Input]:
    if isinstance(texts, str):
        texts = [texts]
    return [tenant_pb2.Input(text=t) for t in texts]


def _truncation(truncate: bool) -> int:
    return tenant_pb2.TRUNCATE if truncate else tenant_pb2.REJECT


@dataclass(frozen=True)
class _Call:
    service: str                 # "tenant" | "admin"
    method: str                  # the RPC's name
    request: Any                 # a message, or a list of messages for a client stream
    convert: Callable[[Any], Any]
    is_idempotent: bool = True
    is_stream: bool = False
    timeout: float | None = None


def _credentials(tls) -> grpc.ChannelCredentials | None:
    """None/False: plaintext; True: TLS with the system roots; a path: TLS with that CA bundle
    (PEM); grpc.ChannelCredentials: as given (e.g. with a client certificate for mTLS)."""
    if tls is None or tls is False:
        return None
    if tls is True:
        return grpc.ssl_channel_credentials()
    if isinstance(tls, (str, Path)):
        return grpc.ssl_channel_credentials(root_certificates=Path(tls).read_bytes())
    return tls


def _chat_message(m: dict):
    """{"role", "content"[, "tool_calls": [{"id", "name", "arguments": dict or JSON}], "tool_call_id"]} as
    protobuf (tool_calls as the final event gave them)."""
    calls = [tenant_pb2.ToolCall(id=c.get("id", ""), name=c["name"], arguments=c["arguments"] if isinstance(
        c["arguments"], str) else json.dumps(c["arguments"])) for c in m.get("tool_calls") or ()]
    return tenant_pb2.ChatMessage(role=m["role"], content=m.get("content") or "", tool_calls=calls,
                                  tool_call_id=m.get("tool_call_id") or "")


def _tool(t: dict):
    """{"name", "description", "parameters": a JSON Schema (dict or JSON text)} (or OpenAI's {"type": "function",
    "function": {...}}) as protobuf."""
    fn = t.get("function", t)
    parameters = fn.get("parameters")
    return tenant_pb2.Tool(name=fn["name"], description=fn.get("description") or "",
                           parameters=parameters if isinstance(parameters, str) else json.dumps(parameters or {}))


def _structured_output(spec: dict):
    """{"json": schema} | {"json_object": True} | {"regex": r} | {"choice": [...]} | {"grammar": lark} as protobuf."""
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ValueError("structured_output: a dict with exactly one of json, json_object, regex, choice, grammar")
    (kind, value), = spec.items()
    if kind == "json":
        return tenant_pb2.StructuredOutput(json=value if isinstance(value, str) else json.dumps(value))
    if kind == "choice":
        return tenant_pb2.StructuredOutput(choice=tenant_pb2.Choices(values=list(value)))
    if kind in ("json_object", "regex", "grammar"):
        return tenant_pb2.StructuredOutput(**{kind: value})
    raise ValueError(f"structured_output: unknown kind {kind!r} (json, json_object, regex, choice, grammar)")


class _Api:
    """The calls, shared by both clients: each method builds a _Call and hands it to `_run`,
    which the sync client executes and the async client turns into a coroutine."""

    def __init__(self, address: str, api_key: str | None = None, admin_token: str | None = None, tls=None,
                 timeout: float = 30.0, max_retries: int = 3, backoff_s: float = 0.1, max_backoff_s: float = 5.0,
                 on_retry: Callable[[str, int, VbertError, float], None] | None = None, options=()):
        if timeout <= 0 or max_retries < 0 or backoff_s < 0 or max_backoff_s < 0:
            raise ValueError("timeout must be > 0; max_retries, backoff_s and max_backoff_s >= 0")
        self.address, self.api_key, self.admin_token = address, api_key, admin_token
        self.timeout, self.max_retries = timeout, max_retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.on_retry = on_retry
        self._credentials = _credentials(tls)
        self._options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                         ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), *options]

    def _run(self, call: _Call):
        raise NotImplementedError

    def _metadata(self, service: str) -> tuple:
        secret = self.api_key if service == "tenant" else self.admin_token
        return (("authorization", f"Bearer {secret}"),) if secret else ()

    def _after_failure(self, call: _Call, error: VbertError, attempt: int) -> float:
        """The wait before the next attempt, or raises `error` when the call is not retried."""
        if attempt >= self.max_retries or not should_retry(error, call.is_idempotent):
            raise error
        delay = retry_delay(error, attempt, self.backoff_s, self.max_backoff_s)
        if delay > self.timeout:
            raise error
        if self.on_retry is not None:
            self.on_retry(call.method, attempt + 1, error, delay)
        return delay

    # -- tenant API ------------------------------------------------------------------------------
    def classify(self, adapter: str, texts: str | Iterable[str], top_k: int = 0, truncate: bool = True):
        """One {"label", "scores": {label: probability, best first}} per text."""
        req = tenant_pb2.ClassifyRequest(adapter=adapter, inputs=_inputs(texts), truncation=_truncation(truncate),
                                         top_k=top_k)
        return self._run(_Call("tenant", "Classify", req, lambda r: [_classification(c) for c in r.results]))

    def tag(self, adapter: str, texts: str | Iterable[str], truncate: bool = True):
        """One {"tokens": [{token, label, score, start_char, end_char}], "entities": [{label, text,
        start_token, end_token, score, start_char, end_char}]} per text (entities: the IOB2 spans over
        words, as the HF pipeline's aggregation_strategy="first"; start_char/end_char: offsets into the
        text, end exclusive, -1 for special tokens; an entity's text is text[start_char:end_char])."""
        req = tenant_pb2.TagRequest(adapter=adapter, inputs=_inputs(texts), truncation=_truncation(truncate))
        return self._run(_Call("tenant", "Tag", req, lambda r: [_tagging(t) for t in r.results]))

    def embed(self, texts: str | Iterable[str], adapter: str = "default", normalize: bool | None = None,
              truncate: bool = True):
        """One vector (list of floats) per text; adapter "default" is the bare backbone."""
        req = tenant_pb2.EmbedRequest(adapter=adapter, inputs=_inputs(texts), truncation=_truncation(truncate))
        if normalize is not None:
            req.normalize = normalize
        return self._run(_Call("tenant", "Embed", req, lambda r: [list(e.values) for e in r.results]))

    def _generate_request(self, prompt: str | None, messages, adapter: str, max_new_tokens: int,
                          temperature: float | None, top_k: int, top_p: float | None, seed: int | None, stop,
                          stop_token_ids, logprobs: int, truncate_prompt: bool, ignore_eos: bool, **adjust):
        """adjust: presence_penalty, frequency_penalty, repetition_penalty, min_p, min_tokens,
        include_stop_str_in_output, parallel_tool_calls (None: unset), logit_bias (a dict), structured_output (a dict
        of one kind, see Client.generate), tools and tool_choice."""
        req = tenant_pb2.GenerateRequest(
            adapter=adapter, prompt=prompt or "", max_new_tokens=max_new_tokens, top_k=top_k,
            stop=[stop] if isinstance(stop, str) else list(stop or ()), stop_token_ids=list(stop_token_ids or ()),
            logprobs=logprobs, truncate_prompt=truncate_prompt, ignore_eos=ignore_eos,
            messages=[_chat_message(m) for m in messages or ()])
        bias = adjust.pop("logit_bias", None)
        req.tools.extend(_tool(t) for t in adjust.pop("tools", None) or ())
        req.tool_choice = adjust.pop("tool_choice", None) or ""
        structured = adjust.pop("structured_output", None)
        if structured:
            req.structured_output.CopyFrom(_structured_output(structured))
        for name, value in (("temperature", temperature), ("top_p", top_p), ("seed", seed), *adjust.items()):
            if value is not None:
                setattr(req, name, value)
        req.logit_bias.update({int(t): float(b) for t, b in (bias or {}).items()})
        return req

    # -- admin API: tenants ----------------------------------------------------------------------
    def register_tenant(self, name: str, quotas: dict | None = None):
        """{"tenant": name, "api_key": key (shown once), "id", "status", "created", "quotas"}."""
        req = admin_pb2.RegisterTenantRequest(name=name, quotas=admin_pb2.Quotas(**(quotas or {})))
        return self._run(_Call("admin", "RegisterTenant", req,
                               lambda r: {"tenant": r.tenant.name, "api_key": r.api_key, **_tenant(r.tenant)},
                               is_idempotent=False))

    def get_tenant(self, name: str):
        return self._run(_Call("admin", "GetTenant", admin_pb2.TenantRef(name=name), _tenant))

    def list_tenants(self, page_size: int = 0, page_token: str = ""):
        """One page: {"tenants": [...], "next_page_token": "" on the last page}."""
        req = admin_pb2.ListTenantsRequest(page_size=page_size, page_token=page_token)
        return self._run(_Call("admin", "ListTenants", req, lambda r: {
            "tenants": [_tenant(t) for t in r.tenants], "next_page_token": r.next_page_token}))

    def update_quotas(self, name: str, **quotas):
        """Set the given quotas (requests_per_s, burst, max_tokens_per_request, weight); others keep their value."""
        req = admin_pb2.UpdateQuotasRequest(name=name, quotas=admin_pb2.Quotas(**quotas))
        return self._run(_Call("admin", "UpdateQuotas", req, _tenant))

    def suspend_tenant(self, name: str):
        return self._run(_Call("admin", "SuspendTenant", admin_pb2.TenantRef(name=name), _tenant))

    def resume_tenant(self, name: str):
        return self._run(_Call("admin", "ResumeTenant", admin_pb2.TenantRef(name=name), _tenant))

    def delete_tenant(self, name: str):
        return self._run(_Call("admin", "DeleteTenant", admin_pb2.TenantRef(name=name),
                               lambda r: {"num_adapters_deleted": r.num_adapters_deleted}, is_idempotent=False))

    def rotate_key(self, name: str, grace_seconds: float = 0.0):
        req = admin_pb2.RotateKeyRequest(name=name, grace_seconds=grace_seconds)
        return self._run(_Call("admin", "RotateKey", req, lambda r: {"tenant": name, "api_key": r.api_key},
                               is_idempotent=False))

    # -- admin API: adapters ---------------------------------------------------------------------
    def upload_adapter(self, tenant: str, name: str, path: str | Path, activate: bool = True,
                       timeout: float | None = None):
        """Upload an adapter directory (ours, or a PEFT LoRA directory): header + 1 MiB chunks."""
        chunks = upload_chunks(tenant, name, tar_directory(path), activate)
        return self._run(_Call("admin", "UploadAdapter", chunks, _adapter, is_idempotent=False, is_stream=True,
                               timeout=timeout))

    def list_adapters(self, tenant: str):
        """Every version of every adapter of the tenant."""
        return self._run(_Call("admin", "ListAdapters", admin_pb2.ListAdaptersRequest(tenant=tenant),
                               lambda r: [_adapter(a) for a in r.adapters]))

    def activate(self, tenant: str, name: str, version: int):
        req = admin_pb2.ActivateAdapterRequest(tenant=tenant, name=name, version=version)
        return self._run(_Call("admin", "ActivateAdapter", req, _adapter))

    def pin(self, tenant: str, name: str):
        return self._run(_Call("admin", "PinAdapter", admin_pb2.AdapterRef(tenant=tenant, name=name), _adapter))

    def unpin(self, tenant: str, name: str):
        return self._run(_Call("admin", "UnpinAdapter", admin_pb2.AdapterRef(tenant=tenant, name=name), _adapter))

    def delete_adapter(self, tenant: str, name: str):
        return self._run(_Call("admin", "DeleteAdapter", admin_pb2.AdapterRef(tenant=tenant, name=name),
                               lambda r: {"num_versions_deleted": r.num_versions_deleted}, is_idempotent=False))

    def status(self):
        return self._run(_Call("admin", "GetStatus", admin_pb2.GetStatusRequest(), _status))


class Client(_Api):
    """Blocking client; `with Client(...) as c:` closes the channel.

    address: "host:port". api_key: the tenant's key (tenant calls); admin_token: for admin calls.
    tls: None (plaintext), True (system CA roots), a CA bundle path, or grpc.ChannelCredentials.
    timeout: seconds per attempt (an upload may pass its own). max_retries: retries after the
    first attempt (see the module docstring for which calls and codes); backoff_s, max_backoff_s:
    the exponential backoff's first and largest wait. on_retry(method, attempt, error, delay_s):
    called before each retry (logging, metrics). options: extra gRPC channel options.
    """

    def __init__(self, address: str, api_key: str | None = None, admin_token: str | None = None, tls=None,
                 timeout: float = 30.0, max_retries: int = 3, **kw):
        super().__init__(address, api_key, admin_token, tls, timeout, max_retries, **kw)
        self._channel = (grpc.secure_channel(address, self._credentials, self._options) if self._credentials
                         else grpc.insecure_channel(address, self._options))
        self._stubs = {"tenant": tenant_pb2_grpc.TenantServiceStub(self._channel),
                       "admin": admin_pb2_grpc.AdminServiceStub(self._channel)}

    def _run(self, call: _Call):
        attempt = 0
        while True:
            method = getattr(self._stubs[call.service], call.method)
            request = iter(call.request) if call.is_stream else call.request
            try:
                response = method(request, timeout=call.timeout or self.timeout, metadata=self._metadata(call.service))
                return call.convert(response)
            except grpc.RpcError as e:
                error = VbertError.from_rpc_error(e)
            time.sleep(self._after_failure(call, error, attempt))
            attempt += 1

    def generate(self, prompt: str | None = None, *, messages=None, adapter: str = "default",
                 max_new_tokens: int = 0, temperature: float | None = None, top_k: int = 0,
                 top_p: float | None = None, seed: int | None = None, stop=(), stop_token_ids=(), logprobs: int = 0,
                 truncate_prompt: bool = False, ignore_eos: bool = False, timeout: float | None = None,
                 presence_penalty: float | None = None, frequency_penalty: float | None = None,
                 repetition_penalty: float | None = None, logit_bias: dict | None = None,
                 min_p: float | None = None, min_tokens: int | None = None, structured_output: dict | None = None,
                 include_stop_str_in_output: bool | None = None, tools=None, tool_choice: str | None = None,
                 parallel_tool_calls: bool | None = None):
        """Stream a generation: prompt (or messages=[{"role", "content"}, ...] through the chat template) on a decoder adapter
        ("default" = the bare decoder); yields one dict per streamed message (see _generation_event), the last
        with "finish_reason", "usage" and "metadata". temperature None = 1.0, 0 = greedy; penalties None = off;
        logit_bias {token id: bias in [-100, 100]}; min_p None = off; min_tokens: no stop token or stop string ends
        the first min_tokens tokens (None = off); structured_output: the answer follows a grammar, one of
        {"json": a JSON Schema (dict or JSON text)}, {"json_object": True}, {"regex": str}, {"choice": [str, ...]},
        {"grammar": a Lark grammar} (vLLM's structured outputs); include_stop_str_in_output: the stop string that
        ended the text stays at its end; tools: [{"name", "description", "parameters": a JSON Schema}] (or OpenAI's
        {"type": "function", "function": {...}}) with tool_choice None/"auto" (text or calls), "required", "none" or
        a tool's name: the final event's "tool_calls"; messages may carry an earlier answer's "tool_calls" and
        "tool" turns with "tool_call_id" (docs/api.md).
        Not retried: a failure raises VbertError (before or during the stream)."""
        req = self._generate_request(prompt, messages, adapter, max_new_tokens, temperature, top_k, top_p, seed, stop,
                                     stop_token_ids, logprobs, truncate_prompt, ignore_eos,
                                     presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                     repetition_penalty=repetition_penalty, logit_bias=logit_bias, min_p=min_p,
                                     min_tokens=min_tokens, structured_output=structured_output,
                                     include_stop_str_in_output=include_stop_str_in_output, tools=tools,
                                     tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls)
        call = self._stubs["tenant"].Generate(req, timeout=timeout or self.timeout, metadata=self._metadata("tenant"))
        try:
            for r in call:
                yield _generation_event(r)
        except grpc.RpcError as e:
            raise VbertError.from_rpc_error(e) from None
        finally:
            call.cancel()

    def all_tenants(self, page_size: int = 100) -> list[dict]:
        out, token = [], ""
        while True:
            page = self.list_tenants(page_size, token)
            out += page["tenants"]
            token = page["next_page_token"]
            if not token:
                return out

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_Api):
    """asyncio client (grpc.aio): the methods of Client, awaited. Create it inside the event loop
    that uses it; `async with AsyncClient(...) as c:` closes the channel."""

    def __init__(self, address: str, api_key: str | None = None, admin_token: str | None = None, tls=None,
                 timeout: float = 30.0, max_retries: int = 3, **kw):
        super().__init__(address, api_key, admin_token, tls, timeout, max_retries, **kw)
        self._channel = (grpc.aio.secure_channel(address, self._credentials, self._options) if self._credentials
                         else grpc.aio.insecure_channel(address, self._options))
        self._stubs = {"tenant": tenant_pb2_grpc.TenantServiceStub(self._channel),
                       "admin": admin_pb2_grpc.AdminServiceStub(self._channel)}

    async def _run(self, call: _Call):
        attempt = 0
        while True:
            method = getattr(self._stubs[call.service], call.method)
            request = iter(call.request) if call.is_stream else call.request
            try:
                response = await method(request, timeout=call.timeout or self.timeout,
                                        metadata=self._metadata(call.service))
                return call.convert(response)
            except grpc.RpcError as e:
                error = VbertError.from_rpc_error(e)
            await asyncio.sleep(self._after_failure(call, error, attempt))
            attempt += 1

    async def generate(self, prompt: str | None = None, *, messages=None, adapter: str = "default",
                       max_new_tokens: int = 0, temperature: float | None = None, top_k: int = 0,
                       top_p: float | None = None, seed: int | None = None, stop=(), stop_token_ids=(),
                       logprobs: int = 0, truncate_prompt: bool = False, ignore_eos: bool = False,
                       timeout: float | None = None, presence_penalty: float | None = None,
                       frequency_penalty: float | None = None, repetition_penalty: float | None = None,
                       logit_bias: dict | None = None, min_p: float | None = None, min_tokens: int | None = None,
                       structured_output: dict | None = None, include_stop_str_in_output: bool | None = None,
                       tools=None, tool_choice: str | None = None, parallel_tool_calls: bool | None = None):
        """`async for event in client.generate(...)`: as Client.generate."""
        req = self._generate_request(prompt, messages, adapter, max_new_tokens, temperature, top_k, top_p, seed, stop,
                                     stop_token_ids, logprobs, truncate_prompt, ignore_eos,
                                     presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                     repetition_penalty=repetition_penalty, logit_bias=logit_bias, min_p=min_p,
                                     min_tokens=min_tokens, structured_output=structured_output,
                                     include_stop_str_in_output=include_stop_str_in_output, tools=tools,
                                     tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls)
        call = self._stubs["tenant"].Generate(req, timeout=timeout or self.timeout, metadata=self._metadata("tenant"))
        try:
            async for r in call:
                yield _generation_event(r)
        except grpc.RpcError as e:
            raise VbertError.from_rpc_error(e) from None
        finally:
            call.cancel()

    async def all_tenants(self, page_size: int = 100) -> list[dict]:
        out, token = [], ""
        while True:
            page = await self.list_tenants(page_size, token)
            out += page["tenants"]
            token = page["next_page_token"]
            if not token:
                return out

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
