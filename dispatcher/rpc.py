"""What every servicer shares: answering a call with mapped errors, and the engine round trip."""
from __future__ import annotations

import asyncio
import functools
import time

import grpc

from manager.manager import AdapterRef
from manager.records import Tenant

from .auth import current_request_id
from .errors import abort


def unary(method):
    """Decorate a servicer method: every exception -> its status code; request id in the trailers."""

    @functools.wraps(method)
    async def wrapped(self, request, context):
        rid = current_request_id()
        try:
            response = await method(self, request, context)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as e:  # noqa: BLE001 - mapped to its status code
            await abort(context, e, rid)
        context.set_trailing_metadata([("x-request-id", rid)])
        return response

    return wrapped


async def run_inputs(app, time_remaining: float | None, tenant: Tenant, ref: AdapterRef,
                     inputs: list[tuple[str | None, list[int] | None]], *, truncate: bool, normalize: bool | None,
                     method: str):
    """Rate-limit, submit every input (text or token ids) to the encoder's engine with the call's deadline
    (time_remaining: seconds the caller still waits, None: the default), and await all (cancelling all if
    one fails or the client goes away). Returns (completions, requests); the requests carry their token ids
    after tokenization."""
    engine = app.require_encoder(method)
    app.limiter.acquire(tenant, len(inputs))
    remaining = time_remaining
    budget = app.config.default_deadline_s if remaining is None else min(remaining, app.config.default_deadline_s)
    deadline = time.monotonic() + budget
    reqs = [app.new_request(tenant, ref, deadline, text=text, token_ids=ids, truncate=truncate, normalize=normalize)
            for text, ids in inputs]
    futures = []
    try:
        for r in reqs:
            futures.append(asyncio.wrap_future(engine.submit(r)))
        completions = await asyncio.gather(*futures)
    except BaseException:
        for r in reqs:
            engine.cancel(r.request_id)
        raise
    app.metrics.inputs.labels(method=method).inc(len(reqs))
    for c in completions:
        app.metrics.queue_seconds.observe(c.queue_s)
    return completions, reqs
