"""The manager facade: who the tenants are, where their adapters live, which are resident.

It keeps the three parts consistent with each other:
- an upload is validated and written to the store, then registered in one registry transaction;
  a crash in between leaves an unreferenced blob that start-up recovery removes;
- deleting an adapter or a tenant removes its rows, evicts it from every cache tier and deletes
  the blobs nobody references any more;
- resolving (tenant, adapter name) gives the id of the version active NOW; a request keeps that id,
  so activating a new version switches new requests atomically while scheduled ones finish on
  the version they started with;
- at start-up, every registered version whose head fails today's schema (vbert.heads: an older
  server let it in) is quarantined: made inactive for good with its problem recorded, an audit
  entry and a WARNING naming tenant, adapter, version and problem. It stays listed (with
  `problem` set) until deleted; resolving its adapter answers FAILED_PRECONDITION naming the
  problem; the tenant's other adapters are not affected. A head with more labels than the pool's
  max_labels now is only reported (that depends on the settings; the pool refuses to load it).
Admin writes are serialized by one lock (they are rare); the inference path does not take it.

Two backbones: every adapter belongs to one (AdapterRecord.backbone, from its head: a generate head
is a decoder adapter). The encoder's adapters live in `cache` (over the model's AdapterPool), the
decoder's, when the server has one, in `decoder_cache` (over a DecoderLoraPool); registry and store
are shared. A servicer checks that a resolved adapter is on its RPC's backbone (require_backbone).
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

from vbert.adapters import AdapterError
from vbert.artifact import AdapterArtifact
from vbert.decoder_lora import DecoderLoraPool
from vbert.heads import BACKBONES, DECODER, ENCODER, HeadKind, HeadSpec, check_head_json, check_response_size
from vbert.model import MultiTenantModel

from .cache import CacheConfig, TieredCache
from .config import RegistryConfig, ResponseLimits, StoreConfig
from .errors import FailedPreconditionError, NotFoundError
from .registry import AdapterRecord, Quotas, Registry, Tenant, open_registry
from .store import AdapterStore

log = logging.getLogger(__name__)

DEFAULT_ADAPTER = "default"   # every tenant: the bare backbone (embeddings), no upload needed
STARTUP_ACTOR = "startup-check"


def record_problem(rec: AdapterRecord) -> str | None:
    """Why a registered version cannot be served under today's head schema, or None: its head (and
    the copy in its config, if any) must pass HeadSpec.from_json."""
    for where, head in (("head", rec.head), ("config head", rec.config.get("head", rec.head))):
        try:
            HeadSpec.from_json(head)
        except AdapterError as e:
            return str(e) if where == "head" else f"{where}: {e}"
    return None


@dataclass(frozen=True)
class ManagerConfig:
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)

    @classmethod
    def under(cls, data_dir: str, **kw) -> "ManagerConfig":
        """All parts under one data directory."""
        return cls(registry=RegistryConfig(data_dir=data_dir, **kw.pop("registry", {})),
                   store=StoreConfig(data_dir=data_dir), cache=kw.pop("cache", CacheConfig()))


@dataclass(frozen=True)
class AdapterRef:
    """What a request needs to run on a tenant's adapter: the exact version's id, its head and the
    backbone it runs on. adapter_id None = the bare backbone (pool slot 0)."""

    tenant_id: int
    name: str
    adapter_id: int | None
    version: int
    kind: str
    head: HeadSpec
    backbone: str = ENCODER
    tenant_name: str = ""


_USE_INSTEAD = {ENCODER: "Classify, Tag or Embed", DECODER: "Generate"}


def require_backbone(ref: AdapterRef, backbone: str, rpc: str) -> None:
    """FailedPreconditionError naming the adapter, its backbone and the RPC unless the resolved adapter
    runs on `backbone` (an RPC of one backbone called with an adapter of the other)."""
    if ref.backbone != backbone:
        article = "an" if backbone == ENCODER else "a"
        raise FailedPreconditionError(
            f"adapter {ref.name!r} of tenant {ref.tenant_name!r} is on the {ref.backbone} backbone; {rpc} needs "
            f"{article} {backbone} adapter (use {_USE_INSTEAD.get(ref.backbone, 'another RPC')})")


class Manager:
    def __init__(self, config: ManagerConfig, model: MultiTenantModel | None,
                 decoder_pool: DecoderLoraPool | None = None):
        """model: the encoder (None: a decoder-only server); decoder_pool: the decoder's LoRA pool (None: no
        decoder). At least one of them."""
        if model is None and decoder_pool is None:
            raise ValueError("a manager needs a backbone: the encoder model, the decoder's pool or both")
        self.config, self.model, self.decoder_pool = config, model, decoder_pool
        self.registry: Registry = open_registry(config.registry)
        self.quarantined = self._quarantine_unusable(model.pool.config.max_labels if model is not None else None)
        self.store = AdapterStore(config.store)
        self.recovery = self.store.recover(keep=self.registry.referenced_shas())
        self.cache = TieredCache(config.cache, model.pool, self._load_from_store) if model is not None else None
        self.decoder_cache = (TieredCache(config.cache, decoder_pool, self._load_from_store)
                              if decoder_pool is not None else None)
        self.caches: dict[str, TieredCache] = {}
        if self.cache is not None:
            self.caches[ENCODER] = self.cache
        if self.decoder_cache is not None:
            self.caches[DECODER] = self.decoder_cache
        self._admin = threading.Lock()
        self._default_head = model.pool.head(0).spec if model is not None else None

    def close(self) -> None:
        for cache in self.caches.values():
            cache.close()
        self.registry.close()

    def cache_for(self, rec: AdapterRecord) -> TieredCache:
        """The cache of the record's backbone; FailedPreconditionError if this server does not load it."""
        cache = self.caches.get(rec.backbone)
        if cache is None:
            raise FailedPreconditionError(f"adapter {rec.name!r} version {rec.version} is on the {rec.backbone} "
                                          f"backbone; this server loads no {rec.backbone} backbone")
        return cache

    def _quarantine_unusable(self, max_labels: int | None) -> list[AdapterRecord]:
        """The start-up check (module docstring): quarantine every version whose head fails the schema;
        returns the versions quarantined now."""
        out = []
        for rec in self.registry.list_usable_adapters():
            problem = record_problem(rec)
            if problem is not None:
                out.append(self.registry.quarantine_version(rec.id, problem, actor=STARTUP_ACTOR))
                log.warning("start-up check quarantined adapter %r version %d of tenant %r (it was %s): %s",
                            rec.name, rec.version, self.registry.get_tenant_by_id(rec.tenant_id).name, rec.state,
                            problem)
                continue
            if max_labels is None or rec.backbone != ENCODER:
                continue
            try:
                check_head_json(rec.head, max_labels)
            except AdapterError as e:
                log.warning("adapter %r version %d of tenant %r cannot be loaded with these settings: %s",
                            rec.name, rec.version, self.registry.get_tenant_by_id(rec.tenant_id).name, e)
        return out

    def _load_from_store(self, adapter_id: int) -> AdapterArtifact:
        return self.store.get(self.registry.get_adapter(adapter_id).sha256)

    # -- tenants ---------------------------------------------------------------------------------
    def create_tenant(self, name: str, quotas: Quotas | None = None, actor: str = "admin") -> tuple[Tenant, str]:
        return self.registry.create_tenant(name, quotas, actor=actor)

    def get_tenant(self, name: str) -> Tenant:
        return self.registry.get_tenant(name)

    def authenticate(self, api_key: str) -> Tenant:
        return self.registry.authenticate(api_key)

    def authenticate_valid_for(self, api_key: str) -> tuple[Tenant, float | None]:
        """The key's tenant and for how many more seconds the key is valid (None: no expiry)."""
        return self.registry.authenticate_valid_for(api_key)

    def delete_tenant(self, name: str, actor: str = "admin") -> list[AdapterRecord]:
        with self._admin:
            removed = self.registry.delete_tenant(name, actor=actor)
            self._forget(removed)
            return removed

    # -- adapters --------------------------------------------------------------------------------
    def upload_adapter(self, tenant_name: str, adapter_name: str, artifact: AdapterArtifact,
                       actor: str = "admin", activate: bool = True,
                       response_limits: ResponseLimits | None = None) -> AdapterRecord:
        """Validate against the backbone (and, given response_limits, the largest response its head can
        produce: vbert.heads.check_response_size), store, register (a new version). Nothing is stored or
        registered if any step fails."""
        if adapter_name == DEFAULT_ADAPTER:
            raise FailedPreconditionError(f"adapter name {DEFAULT_ADAPTER!r} is reserved for the bare backbone")
        if isinstance(artifact, AdapterArtifact) and artifact.backbone == ENCODER and self.model is not None:
            try:
                self.model.check_skip(artifact)        # runs with this server's skip mode (or full model)?
                if response_limits is not None:
                    r = response_limits
                    check_response_size(artifact.head.spec, r.max_texts_per_request, r.max_tokens_per_text,
                                        r.max_message_bytes)
            except AdapterError as e:
                raise FailedPreconditionError(str(e)) from e
        with self._admin:
            tenant = self.registry.get_tenant(tenant_name)
            decoder = self.decoder_pool.limits if self.decoder_pool is not None else None
            model = self.model
            stored = self.store.put(artifact, model.spec.shape if model else None, model.pool.config if model else None,
                                    decoder=decoder)
            try:
                return self.registry.add_adapter_version(
                    tenant.id, adapter_name, stored.kind, stored.config, artifact.head.spec.to_json(),
                    stored.sha256, stored.size, actor=actor, activate=activate, backbone=artifact.backbone)
            except BaseException:
                self._delete_unreferenced([stored.sha256])
                raise

    def activate(self, tenant_name: str, adapter_name: str, version: int, actor: str = "admin") -> AdapterRecord:
        with self._admin:
            tenant = self.registry.get_tenant(tenant_name)
            return self.registry.activate_version(tenant.id, adapter_name, version, actor=actor)

    def delete_adapter(self, tenant_name: str, adapter_name: str, actor: str = "admin") -> list[AdapterRecord]:
        with self._admin:
            tenant = self.registry.get_tenant(tenant_name)
            removed = self.registry.delete_adapter(tenant.id, adapter_name, actor=actor)
            self._forget(removed)
            return removed

    def list_adapters(self, tenant_name: str) -> list[AdapterRecord]:
        return self.registry.list_adapters(self.registry.get_tenant(tenant_name).id)

    def pin(self, tenant_name: str, adapter_name: str) -> Future:
        rec = self._active(tenant_name, adapter_name)
        return self.cache_for(rec).pin(rec.id)

    def unpin(self, tenant_name: str, adapter_name: str) -> None:
        rec = self._active(tenant_name, adapter_name)
        self.cache_for(rec).unpin(rec.id)

    def _active(self, tenant_name: str, adapter_name: str) -> AdapterRecord:
        tenant = self.registry.get_tenant(tenant_name)
        return self.registry.get_active_adapter(tenant.id, adapter_name)

    def _forget(self, removed: list[AdapterRecord]) -> None:
        for rec in removed:
            cache = self.caches.get(rec.backbone)
            if cache is not None:
                cache.invalidate(rec.id)
        self._delete_unreferenced({rec.sha256 for rec in removed})

    def _delete_unreferenced(self, shas) -> None:
        referenced = self.registry.referenced_shas()
        for sha in shas:
            if sha not in referenced:
                self.store.delete(sha)

    # -- inference path ----------------------------------------------------------------------------
    def resolve(self, tenant: Tenant, adapter_name: str, default_backbone: str = ENCODER) -> AdapterRef:
        """The active version of the tenant's adapter, on the backbone of its record; 'default' is the
        bare `default_backbone` (the encoder's default head, or a generate head on the decoder)."""
        if adapter_name == DEFAULT_ADAPTER:
            if default_backbone not in BACKBONES:
                raise ValueError(f"default_backbone {default_backbone!r} is not one of {BACKBONES}")
            if default_backbone not in self.caches:
                raise FailedPreconditionError(f"adapter {DEFAULT_ADAPTER!r} is the bare {default_backbone} backbone; "
                                              f"this server loads no {default_backbone} backbone")
            head = self._default_head if default_backbone == ENCODER else HeadSpec(HeadKind.GENERATE)
            return AdapterRef(tenant.id, adapter_name, None, 0, "none", head, default_backbone, tenant.name)
        try:
            rec = self.registry.get_active_adapter(tenant.id, adapter_name)
        except NotFoundError:
            quarantined = [r for r in self.registry.list_adapters(tenant.id, adapter_name) if r.is_quarantined]
            if quarantined:
                q = quarantined[-1]
                raise FailedPreconditionError(
                    f"adapter {adapter_name!r} of tenant {tenant.name!r} has no active version: version {q.version} "
                    f"is quarantined ({q.problem}); activate another version or upload a new one") from None
            raise NotFoundError(f"tenant {tenant.name!r} has no active adapter {adapter_name!r}") from None
        try:
            head = HeadSpec.from_json(rec.head)
        except AdapterError as e:
            raise FailedPreconditionError(f"adapter {adapter_name!r} version {rec.version} of tenant "
                                          f"{tenant.name!r} is not usable: {e}") from None
        return AdapterRef(tenant.id, adapter_name, rec.id, rec.version, rec.kind, head, rec.backbone, tenant.name)
