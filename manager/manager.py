"""The manager facade: who the tenants are, where their adapters live, which are resident.

It keeps the three parts consistent with each other:
- an upload is validated and written to the store, then registered in one registry transaction;
  a crash in between leaves an unreferenced blob that start-up recovery removes;
- deleting an adapter or a tenant removes its rows, evicts it from every cache tier and deletes
  the blobs nobody references any more;
- resolving (tenant, adapter name) gives the id of the version active NOW; a request keeps that id,
  so activating a new version switches new requests atomically while scheduled ones finish on
  the version they started with.
Admin writes are serialized by one lock (they are rare); the inference path does not take it.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

from vbert.adapters import AdapterError
from vbert.artifact import AdapterArtifact
from vbert.heads import HeadSpec
from vbert.model import MultiTenantModel

from .cache import CacheConfig, TieredCache
from .config import RegistryConfig, StoreConfig
from .errors import FailedPreconditionError, NotFoundError
from .registry import AdapterRecord, Quotas, Registry, Tenant, open_registry
from .store import AdapterStore

DEFAULT_ADAPTER = "default"   # every tenant: the bare backbone (embeddings), no upload needed


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
    """What a request needs to run on a tenant's adapter: the exact version's id and its head.
    adapter_id None = the bare backbone (pool slot 0)."""

    tenant_id: int
    name: str
    adapter_id: int | None
    version: int
    kind: str
    head: HeadSpec


class Manager:
    def __init__(self, config: ManagerConfig, model: MultiTenantModel):
        self.config, self.model = config, model
        self.registry: Registry = open_registry(config.registry)
        self.store = AdapterStore(config.store)
        self.recovery = self.store.recover(keep=self.registry.referenced_shas())
        self.cache = TieredCache(config.cache, model.pool, self._load_from_store)
        self._admin = threading.Lock()
        self._default_head = model.pool.head(0).spec

    def close(self) -> None:
        self.cache.close()
        self.registry.close()

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
                       actor: str = "admin", activate: bool = True) -> AdapterRecord:
        """Validate against the backbone, store, register (a new version). Nothing is stored or
        registered if any step fails."""
        if adapter_name == DEFAULT_ADAPTER:
            raise FailedPreconditionError(f"adapter name {DEFAULT_ADAPTER!r} is reserved for the bare backbone")
        if isinstance(artifact, AdapterArtifact):
            try:
                self.model.check_skip(artifact)        # runs with this server's skip mode (or full model)?
            except AdapterError as e:
                raise FailedPreconditionError(str(e)) from e
        with self._admin:
            tenant = self.registry.get_tenant(tenant_name)
            stored = self.store.put(artifact, self.model.spec.shape, self.model.pool.config)
            try:
                return self.registry.add_adapter_version(
                    tenant.id, adapter_name, stored.kind, stored.config, artifact.head.spec.to_json(),
                    stored.sha256, stored.size, actor=actor, activate=activate)
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
        return self.cache.pin(self._active_id(tenant_name, adapter_name))

    def unpin(self, tenant_name: str, adapter_name: str) -> None:
        self.cache.unpin(self._active_id(tenant_name, adapter_name))

    def _active_id(self, tenant_name: str, adapter_name: str) -> int:
        tenant = self.registry.get_tenant(tenant_name)
        return self.registry.get_active_adapter(tenant.id, adapter_name).id

    def _forget(self, removed: list[AdapterRecord]) -> None:
        for rec in removed:
            self.cache.invalidate(rec.id)
        self._delete_unreferenced({rec.sha256 for rec in removed})

    def _delete_unreferenced(self, shas) -> None:
        referenced = self.registry.referenced_shas()
        for sha in shas:
            if sha not in referenced:
                self.store.delete(sha)

    # -- inference path ----------------------------------------------------------------------------
    def resolve(self, tenant: Tenant, adapter_name: str) -> AdapterRef:
        """The active version of the tenant's adapter (or the bare backbone for 'default')."""
        if adapter_name == DEFAULT_ADAPTER:
            return AdapterRef(tenant.id, adapter_name, None, 0, "none", self._default_head)
        try:
            rec = self.registry.get_active_adapter(tenant.id, adapter_name)
        except NotFoundError:
            raise NotFoundError(f"tenant {tenant.name!r} has no active adapter {adapter_name!r}") from None
        return AdapterRef(tenant.id, adapter_name, rec.id, rec.version, rec.kind, HeadSpec.from_json(rec.head))
