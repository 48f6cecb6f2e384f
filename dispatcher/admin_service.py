"""Admin API servicer: tenants (register, list, quotas, suspend/resume, delete, key rotation),
adapters (streamed upload, versions, activation, pinning, deletion) and the server's status.

Blocking manager calls run in threads; every error is answered through `errors.abort` (one
exception class -> one status code); every write clears the authenticator's key cache, so a
suspension, rotation or deletion holds for the very next tenant call. The audit log's actor is
"admin@<peer address>".

Upload (client stream): the first chunk is the header (tenant, name, sha256, size, activate), the
following chunks are the payload, an uncompressed tar of the adapter directory. Refused with
INVALID_ARGUMENT (a retry of the same upload can never succeed, so never RESOURCE_EXHAUSTED): a
missing or repeated header, a declared size of 0 or above `max_upload_bytes` (before any data is
read), more data than declared (as soon as it arrives), less data than declared, a sha256
mismatch, and an unsafe or malformed archive. An archive that holds no readable adapter, or an
adapter that does not fit the backbone or the pool, is FAILED_PRECONDITION. So is an adapter whose
head metadata fails the head schema (vbert.heads: labels a JSON list of non-empty strings of at most
128 UTF-8 bytes without control characters or lone surrogates, at most the pool's max_labels of them;
kind and pooling from their enums; normalize a JSON boolean; no unknown fields), and one whose
worst-case Classify/Tag response (max_texts_per_request texts x max_tokens_per_text tokens with its
labels, vbert.heads.check_response_size) would not fit max_message_bytes: the archive is well formed,
the adapter in it is not usable here. Nothing is stored
unless every check passed; the temporary extraction directory (under data_dir/uploads, never the
system temp directory) is always removed, and a killed process's leftovers at the next start.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import re
import shutil
import tempfile
from pathlib import Path


from manager.config import ResponseLimits
from manager.errors import FailedPreconditionError, InvalidArgumentError
from manager.records import AdapterRecord, Quotas, Tenant, validate_name
from vbert.adapters import AdapterError
from vbert.artifact import load_artifact
from vbert.heads import HeadSpec

from .app import App
from .uploads import MAX_UPLOAD_BYTES, MAX_UPLOAD_FILES, extract_adapter_tar, uploads_dir
from .rpc import unary
from .gen.vbert.v1 import admin_pb2, admin_pb2_grpc

VERSION = "0.1.0"
DEFAULT_PAGE_SIZE = 100
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_QUOTA_FIELDS = tuple(f.name for f in dataclasses.fields(Quotas))


# -- conversion --------------------------------------------------------------------------------
def quotas_of(message: admin_pb2.Quotas, base: Quotas) -> Quotas:
    """`base` with the fields set (non-zero) in `message`; invalid values -> InvalidArgumentError."""
    changes = {name: getattr(message, name) for name in _QUOTA_FIELDS if getattr(message, name) != 0}
    return dataclasses.replace(base, **changes)


def tenant_pb(t: Tenant) -> admin_pb2.Tenant:
    q = t.quotas
    return admin_pb2.Tenant(id=t.id, name=t.name, created=t.created, status=t.status, quotas=admin_pb2.Quotas(
        requests_per_s=q.requests_per_s, burst=q.burst, max_tokens_per_request=q.max_tokens_per_request,
        weight=q.weight))


QUARANTINED = "quarantined"      # head_kind of a version whose head fails the schema (manager.manager)


def adapter_pb(rec: AdapterRecord, tenant_name: str, caches: dict) -> admin_pb2.Adapter:
    """Never fails on a stored record: a quarantined version (or one whose head does not parse) is
    listed with head_kind "quarantined", no labels, not active; the problem is in the audit log and
    the start-up WARNING, and resolving the adapter answers FAILED_PRECONDITION naming it. `caches`:
    the manager's caches by backbone (a backbone this server does not load: neither pinned nor resident)."""
    try:
        head = None if rec.is_quarantined else HeadSpec.from_json(rec.head)
    except AdapterError:
        head = None
    head_kind, labels = (head.kind.value, list(head.labels)) if head is not None else (QUARANTINED, [])
    cache = caches.get(rec.backbone)
    return admin_pb2.Adapter(tenant=tenant_name, name=rec.name, version=rec.version, kind=rec.kind,
                             head_kind=head_kind, labels=labels, sha256=rec.sha256, size=rec.size,
                             created=rec.created, is_active=rec.is_active,
                             is_pinned=cache is not None and cache.is_pinned(rec.id),
                             is_resident=cache is not None and cache.is_resident(rec.id), backbone=rec.backbone)


def limits_pb(app: App) -> admin_pb2.ServerLimits:
    c, use = app.config, app.admission.stats()
    return admin_pb2.ServerLimits(
        max_concurrent_rpcs=c.max_concurrent_rpcs, max_concurrent_rpcs_per_tenant=c.max_concurrent_rpcs_per_tenant,
        max_concurrent_public_rpcs=c.max_concurrent_public_rpcs,
        max_concurrent_public_rpcs_per_peer=c.max_concurrent_public_rpcs_per_peer,
        max_failed_auth_per_s=c.max_failed_auth_per_s, max_failed_auth_burst=c.max_failed_auth_burst,
        latency_target_ms=c.latency_target_ms,
        step_token_budget=(app.engine.step_budget() or 0) if app.engine is not None else 0,
        num_rpcs_in_flight=use["num_keyed_in_flight"], num_public_rpcs_in_flight=use["num_public_in_flight"],
        num_refused=sum(use["num_refused"].values()))


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, app: App, max_upload_bytes: int = MAX_UPLOAD_BYTES, max_upload_files: int = MAX_UPLOAD_FILES):
        self.app = app
        self.max_upload_bytes, self.max_upload_files = max_upload_bytes, max_upload_files

    @property
    def _m(self):
        return self.app.manager

    def _wrote(self) -> None:
        self.app.auth.invalidate()

    @staticmethod
    def _actor(context) -> str:
        return f"admin@{context.peer() or 'unknown'}"[:256]

    # -- tenants ---------------------------------------------------------------------------------
    @unary
    async def RegisterTenant(self, request, context):
        quotas = quotas_of(request.quotas, Quotas())
        tenant, key = await asyncio.to_thread(self._m.create_tenant, request.name, quotas, self._actor(context))
        self._wrote()
        return admin_pb2.RegisterTenantResponse(tenant=tenant_pb(tenant), api_key=key)

    @unary
    async def GetTenant(self, request, context):
        return tenant_pb(await asyncio.to_thread(self._m.get_tenant, request.name))

    @unary
    async def ListTenants(self, request, context):
        tenants, token = await asyncio.to_thread(self._m.registry.list_tenants, request.page_size or DEFAULT_PAGE_SIZE,
                                                 request.page_token or None)
        return admin_pb2.ListTenantsResponse(tenants=[tenant_pb(t) for t in tenants], next_page_token=token or "")

    @unary
    async def UpdateQuotas(self, request, context):
        if not request.HasField("quotas"):
            raise InvalidArgumentError("quotas are missing: set at least one of " + ", ".join(_QUOTA_FIELDS))

        def update() -> Tenant:
            current = self._m.get_tenant(request.name)
            return self._m.registry.update_quotas(request.name, quotas_of(request.quotas, current.quotas),
                                                  self._actor(context))

        tenant = await asyncio.to_thread(update)
        self._wrote()
        return tenant_pb(tenant)

    async def _set_status(self, name: str, status: str, context) -> admin_pb2.Tenant:
        tenant = await asyncio.to_thread(self._m.registry.set_status, name, status, self._actor(context))
        self._wrote()
        return tenant_pb(tenant)

    @unary
    async def SuspendTenant(self, request, context):
        return await self._set_status(request.name, "suspended", context)

    @unary
    async def ResumeTenant(self, request, context):
        return await self._set_status(request.name, "active", context)

    @unary
    async def DeleteTenant(self, request, context):
        tenant = await asyncio.to_thread(self._m.get_tenant, request.name)
        removed = await asyncio.to_thread(self._m.delete_tenant, request.name, self._actor(context))
        self.app.limiter.forget(tenant.id)
        self._wrote()
        return admin_pb2.DeleteTenantResponse(num_adapters_deleted=len({r.name for r in removed}))

    @unary
    async def RotateKey(self, request, context):
        key = await asyncio.to_thread(self._m.registry.rotate_key, request.name, request.grace_seconds,
                                      self._actor(context))
        self._wrote()
        return admin_pb2.RotateKeyResponse(api_key=key)

    # -- adapters --------------------------------------------------------------------------------
    @unary
    async def UploadAdapter(self, request_iterator, context):
        chunks = request_iterator.__aiter__()
        try:
            first = await chunks.__anext__()
        except StopAsyncIteration:
            raise InvalidArgumentError("empty upload: the first chunk must be the header") from None
        if first.WhichOneof("chunk") != "header":
            raise InvalidArgumentError("the first chunk of an upload must be the header (tenant, name, sha256, size)")
        h = first.header
        validate_name(h.tenant)
        validate_name(h.name, "adapter")
        declared = h.sha256.lower()
        if not _SHA256_RE.fullmatch(declared):
            raise InvalidArgumentError(f"header sha256 {h.sha256!r} must be 64 hex digits")
        if not 0 < h.size <= self.max_upload_bytes:
            raise InvalidArgumentError(f"header size {h.size} must be in 1..{self.max_upload_bytes} bytes "
                                       f"(the server's upload limit)")
        await asyncio.to_thread(self._m.get_tenant, h.tenant)   # NOT_FOUND before reading the payload
        payload, hasher = bytearray(), hashlib.sha256()
        async for chunk in chunks:
            if chunk.WhichOneof("chunk") != "data":
                raise InvalidArgumentError("only the first chunk of an upload may be a header")
            if len(payload) + len(chunk.data) > h.size:
                raise InvalidArgumentError(f"the payload is larger than the {h.size} bytes declared in the header")
            payload += chunk.data
            hasher.update(chunk.data)
        if len(payload) != h.size:
            raise InvalidArgumentError(f"the payload has {len(payload)} bytes, the header declared {h.size}")
        actual = hasher.hexdigest()
        if actual != declared:
            raise InvalidArgumentError(f"payload sha256 {actual} does not match the header's sha256 {declared}; "
                                       f"nothing was stored")
        rec = await asyncio.to_thread(self._store_upload, payload, h, self._actor(context))
        self._wrote()
        return adapter_pb(rec, h.tenant, self._m.caches)

    def _store_upload(self, payload: bytes | bytearray, h, actor: str) -> AdapterRecord:
        tmp = Path(tempfile.mkdtemp(prefix="upload-", dir=uploads_dir(self.app.config.data_dir)))
        try:
            directory = extract_adapter_tar(payload, tmp, self.max_upload_bytes, self.max_upload_files)
            try:
                artifact = load_artifact(directory)
            except Exception as e:  # noqa: BLE001 - untrusted files: any parse failure is the upload's fault
                reason = str(e).replace(f"{directory}: ", "").replace(f"{directory}/", "").replace(str(directory), ".")
                what = "is not a usable adapter" if isinstance(e, AdapterError) else "cannot be read as an adapter"
                raise FailedPreconditionError(f"the uploaded directory {what}: {reason}") from e
            return self._m.upload_adapter(h.tenant, h.name, artifact, actor=actor, activate=h.activate,
                                          response_limits=self._response_limits())
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _response_limits(self) -> ResponseLimits:
        c = self.app.config
        return ResponseLimits(c.max_texts_per_request, c.max_tokens_per_text, c.max_message_bytes)

    @unary
    async def ListAdapters(self, request, context):
        records = await asyncio.to_thread(self._m.list_adapters, request.tenant)
        return admin_pb2.ListAdaptersResponse(adapters=[adapter_pb(r, request.tenant, self._m.caches) for r in records])

    @unary
    async def ActivateAdapter(self, request, context):
        if request.version < 1:
            raise InvalidArgumentError(f"version must be >= 1, got {request.version}")
        rec = await asyncio.to_thread(self._m.activate, request.tenant, request.name, request.version,
                                      self._actor(context))
        self._wrote()
        return adapter_pb(rec, request.tenant, self._m.caches)

    def _active(self, tenant_name: str, adapter_name: str) -> AdapterRecord:
        tenant = self._m.get_tenant(tenant_name)
        return self._m.registry.get_active_adapter(tenant.id, validate_name(adapter_name, "adapter"))

    @unary
    async def PinAdapter(self, request, context):
        """Pins the active version and answers once it is resident on the device."""
        rec = await asyncio.to_thread(self._active, request.tenant, request.name)
        cfg = self.app.config
        num_replicas = cfg.replicas if rec.backbone == "encoder" else cfg.decoder_replicas
        if num_replicas:
            raise FailedPreconditionError(
                f"the {rec.backbone} runs on {num_replicas} Ray Serve replicas: each keeps the adapters of its "
                f"recent calls loaded (replica_adapters = {cfg.replica_adapters}), and pinning one in "
                f"this process would not reach them")
        loaded = await asyncio.to_thread(self._m.pin, request.tenant, request.name)
        try:
            await asyncio.wrap_future(loaded)
        except BaseException:
            await asyncio.shield(asyncio.to_thread(self._m.unpin, request.tenant, request.name))
            raise
        self._wrote()
        return adapter_pb(rec, request.tenant, self._m.caches)

    @unary
    async def UnpinAdapter(self, request, context):
        rec = await asyncio.to_thread(self._active, request.tenant, request.name)
        await asyncio.to_thread(self._m.unpin, request.tenant, request.name)
        self._wrote()
        return adapter_pb(rec, request.tenant, self._m.caches)

    @unary
    async def DeleteAdapter(self, request, context):
        removed = await asyncio.to_thread(self._m.delete_adapter, request.tenant, request.name, self._actor(context))
        self._wrote()
        return admin_pb2.DeleteAdapterResponse(num_versions_deleted=len(removed))

    # -- server ----------------------------------------------------------------------------------
    @unary
    async def GetStatus(self, request, context):
        app = self.app
        num_tenants = await asyncio.to_thread(self._m.registry.count_tenants)
        resident = sum(c.stats()["device"]["resident"] for c in self._m.caches.values())
        # waiting in the local engines; with Ray Serve replicas (no local queue) the calls out to them
        queued = sum(e.scheduler.num_waiting if e.scheduler is not None else e.num_pending for e in app.engines)
        if app.model is not None:      # the top-level fields describe the encoder when there is one
            pool = app.model.pool.config
            name, device = app.model.name, app.model.device
            lora, bottleneck = pool.num_lora_slots, pool.num_bottleneck_slots
        else:
            name, device, lora, bottleneck = (app.decoder.name, app.decoder.model.device,
                                              app.decoder.lora.config.num_slots, 0)
        loads = None
        if app.generation is not None and hasattr(app.generation, "replica_loads"):
            loads = await asyncio.to_thread(app.generation.replica_loads)
        return admin_pb2.ServerStatus(
            backbone=name, device=device.describe(), dtype=device.dtype_name, num_tenants=num_tenants,
            num_resident_adapters=resident, queue_depth=queued, lora_slots=lora, bottleneck_slots=bottleneck,
            is_draining=app.is_draining, version=VERSION, limits=limits_pb(app), backbones=backbones_pb(app, loads))


def backbones_pb(app, decoder_replicas: dict | None = None) -> list:
    """The backbones this server holds, with their memory (weights, adapter pool, KV cache). decoder_replicas: the
    decoder replicas' load reports when generation runs on Ray Serve: the KV cache is then theirs, all together
    (this process's copy of the decoder never generates)."""
    m, out = app.model, []
    if m is not None:
        out.append(admin_pb2.Backbone(name="encoder", kind="encoder", model=m.name,
                                      num_parameters=m.encoder.num_parameters(),
                                      weight_bytes=m.encoder.num_parameters() * m.device.dtype.itemsize,
                                      adapter_slots=m.pool.config.num_lora_slots + m.pool.config.num_bottleneck_slots,
                                      adapter_pool_bytes=m.pool.total_bytes()))
    if app.decoder is not None:
        d = app.decoder.info()
        kv = (d["kv_cache"]["bytes"], d["kv_cache"]["blocks"], d["kv_cache"]["free_blocks"])
        if decoder_replicas is not None:
            kv = (len(decoder_replicas) * app.config.decoder_config().kv_cache_bytes,
                  sum(r["num_blocks"] for r in decoder_replicas.values()),
                  sum(r["num_free_blocks"] for r in decoder_replicas.values()))
        out.append(admin_pb2.Backbone(name="decoder", kind="decoder", model=d["backbone"], num_parameters=d["parameters"],
                                      weight_bytes=d["weight_bytes"], adapter_slots=d["lora_pool"]["slots"],
                                      adapter_pool_bytes=d["lora_pool"]["bytes"], kv_cache_bytes=kv[0],
                                      kv_blocks_total=kv[1], kv_blocks_free=kv[2]))
    return out

