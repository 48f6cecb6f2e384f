"""Tenant API servicer: Classify, Tag, Embed (unary and bidirectional streams), Generate (server stream).
Model compute never runs on the event loop: requests go to the engine's threads and are awaited."""
from __future__ import annotations

import asyncio
import time

import grpc

from manager.errors import FailedPreconditionError
from manager.manager import ENCODER, AdapterRef, require_backbone
from vbert.heads import HeadKind

from . import convert, generate_rpc
from .app import App
from .auth import current_request_id, current_tenant
from .errors import abort
from .rpc import run_inputs, unary
from .gen.vbert.v1 import tenant_pb2, tenant_pb2_grpc

STREAM_WINDOW = 64   # messages of one stream processed concurrently (answers stay in order)
METHOD_FOR = {HeadKind.CLASSIFY: "Classify", HeadKind.TAG: "Tag", HeadKind.EMBED: "Embed"}


class TenantServicer(tenant_pb2_grpc.TenantServiceServicer):
    def __init__(self, app: App):
        self.app = app
        self._special = set(app.model.tokenizer.all_special_tokens) if app.model is not None else set()

    # -- unary ---------------------------------------------------------------------------------
    @unary
    async def Classify(self, request, context):
        return await self._classify(request, context)

    @unary
    async def Tag(self, request, context):
        return await self._tag(request, context)

    @unary
    async def Embed(self, request, context):
        return await self._embed(request, context)

    # -- streams -------------------------------------------------------------------------------
    async def ClassifyStream(self, request_iterator, context):
        async for response in self._stream(request_iterator, context, self._classify):
            yield response

    async def TagStream(self, request_iterator, context):
        async for response in self._stream(request_iterator, context, self._tag):
            yield response

    async def EmbedStream(self, request_iterator, context):
        async for response in self._stream(request_iterator, context, self._embed):
            yield response

    async def Generate(self, request, context):
        rid = current_request_id()
        try:
            async for response in generate_rpc.generate(self.app, request, context):
                yield response
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as e:  # noqa: BLE001 - mapped to its status code
            await abort(context, e, rid)

    # -- the work ------------------------------------------------------------------------------
    async def _stream(self, request_iterator, context, handler):
        """Answer a stream's messages in order, at most STREAM_WINDOW of them in work at once. However the
        call ends (the client aborts, a message fails, the server drains), reading stops and every
        message still in work is cancelled, its engine requests with it, and its outcome retrieved: a
        client that went away leaves nothing submitting on its behalf and no unretrieved task error."""
        rid = current_request_id()
        window = asyncio.Semaphore(STREAM_WINDOW)
        queue: asyncio.Queue = asyncio.Queue()      # tasks in order; then None, or the reading error

        async def read():
            try:
                async for req in request_iterator:
                    await window.acquire()
                    task = asyncio.ensure_future(handler(req, context))
                    task.add_done_callback(_retrieve)
                    queue.put_nowait(task)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - e.g. an undecodable message: answered below
                queue.put_nowait(e)
            else:
                queue.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, Exception):
                    await abort(context, item, rid)
                try:
                    response = await item
                except (grpc.aio.AbortError, asyncio.CancelledError):
                    raise
                except Exception as e:  # noqa: BLE001
                    await abort(context, e, rid)
                window.release()
                yield response
        finally:
            reader.cancel()
            while not queue.empty():
                item = queue.get_nowait()
                if isinstance(item, asyncio.Future):
                    item.cancel()
        context.set_trailing_metadata([("x-request-id", rid)])

    async def _run(self, request, context, kind: HeadKind, normalize: bool | None = None):
        """Resolve the adapter, check the head, validate, rate-limit, submit every input to the
        engine and await all; returns (completions, requests, ref, started)."""
        started = time.perf_counter()
        app, tenant = self.app, current_tenant()
        app.require_encoder(METHOD_FOR[kind])
        ref: AdapterRef = await asyncio.to_thread(app.manager.resolve, tenant, request.adapter or "default")
        require_backbone(ref, ENCODER, METHOD_FOR[kind])
        if ref.head.kind is not kind:
            raise FailedPreconditionError(f"adapter {request.adapter!r} has a {ref.head.kind.value} head; "
                                          f"call {METHOD_FOR[ref.head.kind]} instead")
        inputs = convert.inputs_of(request, app.config.max_texts_per_request, app.model.spec.vocab_size)
        truncate = request.truncation != tenant_pb2.REJECT
        limit = min(tenant.quotas.max_tokens_per_request, app.config.max_tokens_per_text, app.model.max_length)
        inputs = [(text, convert.fit_ids(ids, limit, truncate, i) if ids is not None else None)
                  for i, (text, ids) in enumerate(inputs)]
        completions, reqs = await run_inputs(app, context.time_remaining(), tenant, ref, inputs, truncate=truncate,
                                             normalize=normalize, method=METHOD_FOR[kind])
        return completions, reqs, ref, started

    async def _classify(self, request, context):
        completions, _, ref, started = await self._run(request, context, HeadKind.CLASSIFY)
        return tenant_pb2.ClassifyResponse(
            results=[convert.classification(c.output, request.top_k) for c in completions],
            metadata=convert.metadata(completions, time.perf_counter() - started, ref.version))

    async def _tag(self, request, context):
        completions, reqs, ref, started = await self._run(request, context, HeadKind.TAG)
        tok = self.app.model.tokenizer
        results = [convert.tagging_of(c.output, r, tok, self._special) for c, r in zip(completions, reqs)]
        return tenant_pb2.TagResponse(results=results,
                                      metadata=convert.metadata(completions, time.perf_counter() - started, ref.version))

    async def _embed(self, request, context):
        normalize = request.normalize if request.HasField("normalize") else None
        completions, _, ref, started = await self._run(request, context, HeadKind.EMBED, normalize)
        return tenant_pb2.EmbedResponse(results=[convert.embedding(c.output) for c in completions],
                                        metadata=convert.metadata(completions, time.perf_counter() - started,
                                                                  ref.version))


def _retrieve(task: asyncio.Future) -> None:
    """Mark a stream message's outcome as seen (its error was answered, or nobody is left to answer)."""
    if not task.cancelled():
        task.exception()
