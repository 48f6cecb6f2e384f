"""Authentication at the edge: tenant API keys (Bearer) and the admin token.

An interceptor wraps every handler: public methods (health, reflection, OIP server-level calls)
pass; admin methods need the admin token; every other method needs a tenant key, and the tenant
is put in a context variable the servicers read with `current_tenant()`. Verified keys are kept
for a few seconds (by sha256 of the key, never the key itself) so a request does not pay a scrypt
hash; every admin write in this process clears that cache, so suspensions, rotations and deletions
take effect at once."""
from __future__ import annotations

import asyncio
import contextvars
import hashlib
import hmac
import os
import secrets
import threading
import time
import uuid
from pathlib import Path

import grpc
import logging

from manager.errors import PermissionDeniedError, UnauthenticatedError
from manager.manager import Manager
from manager.records import Tenant

from .errors import DrainingError, abort

log = logging.getLogger("vbert.dispatcher")
_tenant: contextvars.ContextVar[Tenant | None] = contextvars.ContextVar("tenant", default=None)
_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

PUBLIC_METHODS = frozenset({
    "/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerReady",
    "/inference.GRPCInferenceService/ServerMetadata",
})
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
ADMIN_PREFIX = "/vbert.v1.AdminService/"
TOKEN_FILE = "admin_token"


def current_tenant() -> Tenant:
    t = _tenant.get()
    if t is None:
        raise UnauthenticatedError("no authenticated tenant for this call")
    return t


def current_request_id() -> str:
    return _request_id.get()


def load_admin_token(data_dir: str, configured: str | None, env: dict | None = None) -> str:
    """The configured token, else VBERT_ADMIN_TOKEN, else the one in data_dir/admin_token, else a
    new one written there with mode 0600."""
    env = os.environ if env is None else env
    token = configured or env.get("VBERT_ADMIN_TOKEN")
    if token:
        return token
    path = Path(data_dir) / TOKEN_FILE
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    token = "vbadm_" + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def bearer(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


class Authenticator:
    def __init__(self, manager: Manager, admin_token: str, ttl_s: float = 5.0):
        self.manager, self.ttl_s = manager, ttl_s
        self._admin = hashlib.sha256(admin_token.encode()).digest()
        self._cache: dict[bytes, tuple[Tenant, float]] = {}
        self._lock = threading.Lock()

    def cached(self, key: str | None) -> Tenant | None:
        """The tenant of a key verified in the last ttl_s seconds and not expired since (a rotation's
        grace period ends on time), without hashing; else None."""
        if not key:
            return None
        with self._lock:
            hit = self._cache.get(hashlib.sha256(key.encode()).digest())
        if hit is None or hit[1] <= time.monotonic():
            return None
        return self._check_active(hit[0])

    def tenant(self, key: str | None) -> Tenant:
        """Verify a key (scrypt + registry lookup: blocking, call it off the event loop)."""
        if not key:
            raise UnauthenticatedError("missing 'authorization: Bearer <api key>' metadata")
        started = time.monotonic()   # before the check: started + valid_for is never after the key's expiry
        tenant, valid_for = self.manager.authenticate_valid_for(key)
        until = started + (self.ttl_s if valid_for is None else min(self.ttl_s, valid_for))
        with self._lock:
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[hashlib.sha256(key.encode()).digest()] = (tenant, until)
        return self._check_active(tenant)

    @staticmethod
    def _check_active(tenant: Tenant) -> Tenant:
        if not tenant.is_active:
            raise PermissionDeniedError(f"tenant {tenant.name!r} is suspended")
        return tenant

    def check_admin(self, token: str | None) -> None:
        if not token:
            raise UnauthenticatedError("missing 'authorization: Bearer <admin token>' metadata")
        if not hmac.compare_digest(hashlib.sha256(token.encode()).digest(), self._admin):
            raise PermissionDeniedError("the admin token is not valid")

    def invalidate(self) -> None:
        with self._lock:
            self._cache.clear()


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authentication, request ids, draining refusal, and one log line + one histogram sample per
    call (method, status code, duration; tenant in the log, never as a metric label)."""

    def __init__(self, auth: Authenticator, is_draining, metrics=None):
        self.auth, self.is_draining, self.metrics = auth, is_draining, metrics

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        if method in PUBLIC_METHODS or method.startswith(PUBLIC_PREFIXES):
            return handler
        is_admin = method.startswith(ADMIN_PREFIX)
        return _wrap(handler, self, is_admin, method)

    async def enter(self, context, is_admin: bool) -> None:
        """Runs in the handler's task: request id, draining check, authentication."""
        _request_id.set(uuid.uuid4().hex[:16])
        if self.is_draining():
            raise DrainingError("the server is draining; retry on another replica")
        token = bearer(context.invocation_metadata())
        if is_admin:
            self.auth.check_admin(token)
        else:   # cache hit inline; a miss hashes and queries the registry on a worker thread
            _tenant.set(self.auth.cached(token) or await asyncio.to_thread(self.auth.tenant, token))

    def record(self, method: str, context, started: float) -> None:
        code = context.code()
        name = "OK" if code is None else (code.name if hasattr(code, "name") else str(code))
        seconds = time.perf_counter() - started
        if self.metrics is not None:
            self.metrics.rpc_seconds.labels(method=method.rsplit("/", 1)[-1], code=name).observe(seconds)
        tenant = _tenant.get()
        log.info("rpc", extra={"request_id": current_request_id(), "tenant": tenant.name if tenant else None,
                               "method": method, "code": name, "duration_ms": round(seconds * 1000, 2)})


def _wrap(handler, interceptor: AuthInterceptor, is_admin: bool, method: str):
    def guard(behavior, streaming_response: bool):
        if streaming_response:
            async def wrapped(request, context):
                started = time.perf_counter()
                try:
                    try:
                        await interceptor.enter(context, is_admin)
                    except Exception as e:  # noqa: BLE001 - mapped to its status code
                        await abort(context, e, current_request_id())
                    async for item in behavior(request, context):
                        yield item
                finally:
                    interceptor.record(method, context, started)
        else:
            async def wrapped(request, context):
                started = time.perf_counter()
                try:
                    try:
                        await interceptor.enter(context, is_admin)
                    except Exception as e:  # noqa: BLE001
                        await abort(context, e, current_request_id())
                    return await behavior(request, context)
                finally:
                    interceptor.record(method, context, started)
        return wrapped

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(guard(handler.unary_unary, False), handler.request_deserializer,
                                                   handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(guard(handler.unary_stream, True), handler.request_deserializer,
                                                    handler.response_serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(guard(handler.stream_unary, False), handler.request_deserializer,
                                                    handler.response_serializer)
    return grpc.stream_stream_rpc_method_handler(guard(handler.stream_stream, True), handler.request_deserializer,
                                                 handler.response_serializer)
