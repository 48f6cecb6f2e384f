from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Quotas(_message.Message):
    __slots__ = ("requests_per_s", "burst", "max_tokens_per_request", "weight")
    REQUESTS_PER_S_FIELD_NUMBER: _ClassVar[int]
    BURST_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    requests_per_s: float
    burst: int
    max_tokens_per_request: int
    weight: float
    def __init__(self, requests_per_s: _Optional[float] = ..., burst: _Optional[int] = ..., max_tokens_per_request: _Optional[int] = ..., weight: _Optional[float] = ...) -> None: ...

class Tenant(_message.Message):
    __slots__ = ("id", "name", "created", "status", "quotas")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    QUOTAS_FIELD_NUMBER: _ClassVar[int]
    id: int
    name: str
    created: float
    status: str
    quotas: Quotas
    def __init__(self, id: _Optional[int] = ..., name: _Optional[str] = ..., created: _Optional[float] = ..., status: _Optional[str] = ..., quotas: _Optional[_Union[Quotas, _Mapping]] = ...) -> None: ...

class TenantRef(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RegisterTenantRequest(_message.Message):
    __slots__ = ("name", "quotas")
    NAME_FIELD_NUMBER: _ClassVar[int]
    QUOTAS_FIELD_NUMBER: _ClassVar[int]
    name: str
    quotas: Quotas
    def __init__(self, name: _Optional[str] = ..., quotas: _Optional[_Union[Quotas, _Mapping]] = ...) -> None: ...

class RegisterTenantResponse(_message.Message):
    __slots__ = ("tenant", "api_key")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    tenant: Tenant
    api_key: str
    def __init__(self, tenant: _Optional[_Union[Tenant, _Mapping]] = ..., api_key: _Optional[str] = ...) -> None: ...

class ListTenantsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListTenantsResponse(_message.Message):
    __slots__ = ("tenants", "next_page_token")
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tenants: _containers.RepeatedCompositeFieldContainer[Tenant]
    next_page_token: str
    def __init__(self, tenants: _Optional[_Iterable[_Union[Tenant, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class UpdateQuotasRequest(_message.Message):
    __slots__ = ("name", "quotas")
    NAME_FIELD_NUMBER: _ClassVar[int]
    QUOTAS_FIELD_NUMBER: _ClassVar[int]
    name: str
    quotas: Quotas
    def __init__(self, name: _Optional[str] = ..., quotas: _Optional[_Union[Quotas, _Mapping]] = ...) -> None: ...

class DeleteTenantResponse(_message.Message):
    __slots__ = ("num_adapters_deleted",)
    NUM_ADAPTERS_DELETED_FIELD_NUMBER: _ClassVar[int]
    num_adapters_deleted: int
    def __init__(self, num_adapters_deleted: _Optional[int] = ...) -> None: ...

class RotateKeyRequest(_message.Message):
    __slots__ = ("name", "grace_seconds")
    NAME_FIELD_NUMBER: _ClassVar[int]
    GRACE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    grace_seconds: float
    def __init__(self, name: _Optional[str] = ..., grace_seconds: _Optional[float] = ...) -> None: ...

class RotateKeyResponse(_message.Message):
    __slots__ = ("api_key",)
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    api_key: str
    def __init__(self, api_key: _Optional[str] = ...) -> None: ...

class UploadAdapterHeader(_message.Message):
    __slots__ = ("tenant", "name", "sha256", "size", "activate")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    ACTIVATE_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    name: str
    sha256: str
    size: int
    activate: bool
    def __init__(self, tenant: _Optional[str] = ..., name: _Optional[str] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ..., activate: _Optional[bool] = ...) -> None: ...

class UploadAdapterChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: UploadAdapterHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[UploadAdapterHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Adapter(_message.Message):
    __slots__ = ("tenant", "name", "version", "kind", "head_kind", "labels", "sha256", "size", "created", "is_active", "is_pinned", "is_resident", "backbone")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    HEAD_KIND_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    IS_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    IS_PINNED_FIELD_NUMBER: _ClassVar[int]
    IS_RESIDENT_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    name: str
    version: int
    kind: str
    head_kind: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    sha256: str
    size: int
    created: float
    is_active: bool
    is_pinned: bool
    is_resident: bool
    backbone: str
    def __init__(self, tenant: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[int] = ..., kind: _Optional[str] = ..., head_kind: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ..., created: _Optional[float] = ..., is_active: _Optional[bool] = ..., is_pinned: _Optional[bool] = ..., is_resident: _Optional[bool] = ..., backbone: _Optional[str] = ...) -> None: ...

class AdapterRef(_message.Message):
    __slots__ = ("tenant", "name")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    name: str
    def __init__(self, tenant: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters",)
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[Adapter]
    def __init__(self, adapters: _Optional[_Iterable[_Union[Adapter, _Mapping]]] = ...) -> None: ...

class ActivateAdapterRequest(_message.Message):
    __slots__ = ("tenant", "name", "version")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    name: str
    version: int
    def __init__(self, tenant: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class DeleteAdapterResponse(_message.Message):
    __slots__ = ("num_versions_deleted",)
    NUM_VERSIONS_DELETED_FIELD_NUMBER: _ClassVar[int]
    num_versions_deleted: int
    def __init__(self, num_versions_deleted: _Optional[int] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerStatus(_message.Message):
    __slots__ = ("backbone", "device", "dtype", "num_tenants", "num_resident_adapters", "queue_depth", "lora_slots", "bottleneck_slots", "is_draining", "version", "limits", "backbones")
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_TENANTS_FIELD_NUMBER: _ClassVar[int]
    NUM_RESIDENT_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    LORA_SLOTS_FIELD_NUMBER: _ClassVar[int]
    BOTTLENECK_SLOTS_FIELD_NUMBER: _ClassVar[int]
    IS_DRAINING_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    BACKBONES_FIELD_NUMBER: _ClassVar[int]
    backbone: str
    device: str
    dtype: str
    num_tenants: int
    num_resident_adapters: int
    queue_depth: int
    lora_slots: int
    bottleneck_slots: int
    is_draining: bool
    version: str
    limits: ServerLimits
    backbones: _containers.RepeatedCompositeFieldContainer[Backbone]
    def __init__(self, backbone: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., num_tenants: _Optional[int] = ..., num_resident_adapters: _Optional[int] = ..., queue_depth: _Optional[int] = ..., lora_slots: _Optional[int] = ..., bottleneck_slots: _Optional[int] = ..., is_draining: _Optional[bool] = ..., version: _Optional[str] = ..., limits: _Optional[_Union[ServerLimits, _Mapping]] = ..., backbones: _Optional[_Iterable[_Union[Backbone, _Mapping]]] = ...) -> None: ...

class Backbone(_message.Message):
    __slots__ = ("name", "kind", "model", "num_parameters", "weight_bytes", "adapter_slots", "adapter_pool_bytes", "kv_cache_bytes", "kv_blocks_total", "kv_blocks_free")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_SLOTS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_POOL_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    model: str
    num_parameters: int
    weight_bytes: int
    adapter_slots: int
    adapter_pool_bytes: int
    kv_cache_bytes: int
    kv_blocks_total: int
    kv_blocks_free: int
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., model: _Optional[str] = ..., num_parameters: _Optional[int] = ..., weight_bytes: _Optional[int] = ..., adapter_slots: _Optional[int] = ..., adapter_pool_bytes: _Optional[int] = ..., kv_cache_bytes: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., kv_blocks_free: _Optional[int] = ...) -> None: ...

class ServerLimits(_message.Message):
    __slots__ = ("max_concurrent_rpcs", "max_concurrent_rpcs_per_tenant", "max_concurrent_public_rpcs", "max_concurrent_public_rpcs_per_peer", "max_failed_auth_per_s", "max_failed_auth_burst", "latency_target_ms", "step_token_budget", "num_rpcs_in_flight", "num_public_rpcs_in_flight", "num_refused")
    MAX_CONCURRENT_RPCS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_RPCS_PER_TENANT_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_PUBLIC_RPCS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_PUBLIC_RPCS_PER_PEER_FIELD_NUMBER: _ClassVar[int]
    MAX_FAILED_AUTH_PER_S_FIELD_NUMBER: _ClassVar[int]
    MAX_FAILED_AUTH_BURST_FIELD_NUMBER: _ClassVar[int]
    LATENCY_TARGET_MS_FIELD_NUMBER: _ClassVar[int]
    STEP_TOKEN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    NUM_RPCS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    NUM_PUBLIC_RPCS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    NUM_REFUSED_FIELD_NUMBER: _ClassVar[int]
    max_concurrent_rpcs: int
    max_concurrent_rpcs_per_tenant: int
    max_concurrent_public_rpcs: int
    max_concurrent_public_rpcs_per_peer: int
    max_failed_auth_per_s: float
    max_failed_auth_burst: int
    latency_target_ms: float
    step_token_budget: int
    num_rpcs_in_flight: int
    num_public_rpcs_in_flight: int
    num_refused: int
    def __init__(self, max_concurrent_rpcs: _Optional[int] = ..., max_concurrent_rpcs_per_tenant: _Optional[int] = ..., max_concurrent_public_rpcs: _Optional[int] = ..., max_concurrent_public_rpcs_per_peer: _Optional[int] = ..., max_failed_auth_per_s: _Optional[float] = ..., max_failed_auth_burst: _Optional[int] = ..., latency_target_ms: _Optional[float] = ..., step_token_budget: _Optional[int] = ..., num_rpcs_in_flight: _Optional[int] = ..., num_public_rpcs_in_flight: _Optional[int] = ..., num_refused: _Optional[int] = ...) -> None: ...
