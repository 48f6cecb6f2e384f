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
import inspect
import os
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import grpc
import logging

from manager.errors import InvalidArgumentError, PermissionDeniedError, UnauthenticatedError
from manager.manager import Manager
from manager.records import Tenant

from .admission import Admission, SlotLimitError
from .errors import DrainingError, abort
from .logs import RefusalSampler

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
        self._known: set[bytes] = set()     # digests of keys that verified once (exempt from the
        self._lock = threading.Lock()       # failed-authentication limit of their address)

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
        digest = hashlib.sha256(key.encode()).digest()
        try:
            tenant, valid_for = self.manager.authenticate_valid_for(key)
        except UnauthenticatedError:
            with self._lock:
                self._known.discard(digest)
            raise
        until = started + (self.ttl_s if valid_for is None else min(self.ttl_s, valid_for))
        with self._lock:
            if len(self._cache) > 100_000:
                self._cache.clear()
            if len(self._known) > 100_000:
                self._known.clear()
            self._cache[digest] = (tenant, until)
            self._known.add(digest)
        return self._check_active(tenant)

    def is_known(self, key: str | None) -> bool:
        """Whether this key verified before (it is verified again all the same; only the failed-
        authentication limit of its address does not apply, so a flood of bad keys from the same
        address does not lock out a good one whose cache entry just expired)."""
        if not key:
            return False
        with self._lock:
            return hashlib.sha256(key.encode()).digest() in self._known

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


class _Undecodable:
    """Stands in for a request message that could not be parsed (e.g. invalid UTF-8 in a string
    field); the wrapped handler answers INVALID_ARGUMENT instead of grpc's UNKNOWN."""

    def __init__(self, error: Exception):
        self.error = error


def _lenient(deserializer):
    if deserializer is None:
        return None

    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception as e:  # noqa: BLE001 - untrusted bytes: any parse failure is the caller's
            return _Undecodable(e)
    return parse


def _checked(request):
    if isinstance(request, _Undecodable):
        raise InvalidArgumentError(f"the request message cannot be parsed: {request.error} (string fields must "
                                   f"be valid UTF-8)")
    return request


async def _checked_stream(request_iterator):
    async for request in request_iterator:
        yield _checked(request)


PUBLIC, TENANT, ADMIN = "public", "tenant", "admin"
REFUSALS = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED"})   # logs sampled


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authentication, call slots (dispatcher.admission), request ids, draining refusal, undecodable
    messages, and one log line + one histogram sample per keyed call (method, status code, duration;
    tenant in the log, never as a metric label). Keys not in the verified cache are hashed on a small
    pool of their own, so a flood of bad keys cannot occupy the threads other calls need."""

    def __init__(self, auth: Authenticator, is_draining, metrics=None, admission: Admission | None = None,
                 num_hash_threads: int = 2):
        self.auth, self.is_draining, self.metrics = auth, is_draining, metrics
        self.admission = admission or Admission()
        self._hash_pool = ThreadPoolExecutor(num_hash_threads, thread_name_prefix="vbert-auth")
        self._verifying: dict[bytes, Future] = {}   # sha256 of a key -> its verification now running
        self._verifying_lock = threading.Lock()
        self._refusals = RefusalSampler()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        if method in PUBLIC_METHODS or method.startswith(PUBLIC_PREFIXES):
            kind = PUBLIC
        else:
            kind = ADMIN if method.startswith(ADMIN_PREFIX) else TENANT
        return _wrap(handler, self, kind, method)

    async def enter(self, context, kind: str):
        """Runs in the handler's task before the handler: takes the call's slot and authenticates.
        Returns the function that gives the slot back (None if none was taken)."""
        if kind == PUBLIC:
            peer = context.peer()
            self.admission.enter_public(peer)
            return lambda: self.admission.leave_public(peer)
        _request_id.set(uuid.uuid4().hex[:16])
        if self.is_draining():
            raise DrainingError("the server is draining; retry on another replica")
        token = bearer(context.invocation_metadata())
        if kind == ADMIN:
            self.auth.check_admin(token)
            return None
        return await self.enter_tenant(token, context.peer)

    async def enter_tenant(self, token: str | None, peer_of) -> Callable[[], None]:
        """Authenticate a tenant's key and take its call slot (for every protocol: gRPC here, HTTP in
        dispatcher.http_api); peer_of() gives the caller's address, asked only when the key is not cached.
        Returns the function that gives the slot back."""
        tenant = self.auth.cached(token)
        if tenant is None:   # a miss hashes and queries the registry on the hashing pool
            tenant = await self._verify(token, peer_of)
        _tenant.set(tenant)
        self.admission.enter_tenant(tenant.id, tenant.name)
        return lambda: self.admission.leave_tenant(tenant.id)

    async def _verify(self, token: str | None, peer_of) -> Tenant:
        """Verify a key that is not in the cache, once however many calls bring it at the same time: calls
        that arrive while its verification runs wait for that one (they neither hash again nor take one of
        their address's failed-authentication attempts), so a burst of first calls with a valid new key is
        not refused as failed authentication. The first call of a key never verified before takes an attempt
        up front, refused at once (after a tarpit delay) when its address has none left."""
        if not token:
            return self.auth.tenant(token)   # raises at once: no key, nothing to hash
        digest, refusal, is_first = hashlib.sha256(token.encode()).digest(), None, False
        with self._verifying_lock:
            future = self._verifying.get(digest)
            if future is None:
                peer, is_limited = peer_of(), not self.auth.is_known(token)
                try:
                    if is_limited:
                        self.admission.begin_auth(peer)
                    future, is_first = self._hash_pool.submit(self.auth.tenant, token), True
                    self._verifying[digest] = future
                except SlotLimitError as e:
                    refusal = e
        if refusal is not None:
            await asyncio.sleep(self.admission.config.failed_auth_delay_s)   # tarpit
            raise refusal
        if is_first:
            future.add_done_callback(lambda f: self._verified(digest, f, peer, is_limited))
        # shielded: a caller that goes away does not cancel the verification the others wait for
        return await asyncio.shield(asyncio.wrap_future(future))

    def _verified(self, digest: bytes, future, peer: str, is_limited: bool) -> None:
        """Runs when a verification ends (in the hashing thread): later calls find the key in the cache (or
        verify it again if it failed), and a good key (or a suspended tenant's) gives its attempt back."""
        with self._verifying_lock:
            if self._verifying.get(digest) is future:
                del self._verifying[digest]
        if is_limited:
            is_failed = not future.cancelled() and isinstance(future.exception(), UnauthenticatedError)
            self.admission.end_auth(peer, is_ok=not is_failed)

    def record(self, method: str, context, started: float) -> None:
        code = context.code()
        name = "OK" if code is None else (code.name if hasattr(code, "name") else str(code))
        self.record_call(method, name, time.perf_counter() - started)

    def record_call(self, method: str, name: str, seconds: float, **fields) -> None:
        """One histogram sample and one JSON log line (refusals sampled) for a keyed call of any protocol;
        name: the gRPC status code's name (HTTP calls pass the code their status maps from)."""
        if self.metrics is not None:
            label = method if fields.get("protocol") == "http" else method.rsplit("/", 1)[-1]   # a route whole
            self.metrics.rpc_seconds.labels(method=label, code=name).observe(seconds)
        extra = {}
        if name in REFUSALS:
            suppressed = self._refusals.admit()
            if suppressed is None:
                return
            if suppressed:
                extra["num_suppressed"] = suppressed
        tenant = _tenant.get()
        log.info("rpc", extra={"request_id": current_request_id(), "tenant": tenant.name if tenant else None,
                               "method": method, "code": name, "duration_ms": round(seconds * 1000, 2), **fields,
                               **extra})

    def close(self) -> None:
        self._hash_pool.shutdown(wait=False, cancel_futures=True)


def _wrap(handler, interceptor: AuthInterceptor, kind: str, method: str):
    is_recorded = kind != PUBLIC

    def guard(behavior, streaming_request: bool, streaming_response: bool):
        def checked(request):
            return _checked_stream(request) if streaming_request else _checked(request)

        if streaming_response:
            async def wrapped(request, context):
                started, release = time.perf_counter(), None
                try:
                    try:
                        release = await interceptor.enter(context, kind)
                        request = checked(request)
                    except Exception as e:  # noqa: BLE001 - mapped to its status code
                        await abort(context, e, current_request_id())
                    if inspect.isasyncgenfunction(behavior):
                        async for item in behavior(request, context):
                            yield item
                    else:   # a coroutine that writes with context.write (e.g. health Watch)
                        await behavior(request, context)
                finally:
                    if release is not None:
                        release()
                    if is_recorded:
                        interceptor.record(method, context, started)
        else:
            async def wrapped(request, context):
                started, release = time.perf_counter(), None
                try:
                    try:
                        release = await interceptor.enter(context, kind)
                        request = checked(request)
                    except Exception as e:  # noqa: BLE001
                        await abort(context, e, current_request_id())
                    return await behavior(request, context)
                finally:
                    if release is not None:
                        release()
                    if is_recorded:
                        interceptor.record(method, context, started)
        return wrapped

    deserialize, serialize = _lenient(handler.request_deserializer), handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(guard(handler.unary_unary, False, False), deserialize, serialize)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(guard(handler.unary_stream, False, True), deserialize, serialize)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(guard(handler.stream_unary, True, False), deserialize, serialize)
    return grpc.stream_stream_rpc_method_handler(guard(handler.stream_stream, True, True), deserialize, serialize)
