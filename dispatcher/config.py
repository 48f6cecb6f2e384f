"""Server configuration: defaults < config file (TOML) < `VBERT_*` environment < command-line flags,
composed once at start-up and validated with clear errors; each component gets only its part."""
from __future__ import annotations

import ipaddress
import tomllib
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from manager.cache import CacheConfig
from manager.manager import ManagerConfig
from scheduler.config import SchedulerConfig
from scheduler.engine import EngineConfig
from scheduler.generation_engine import GenerationEngineConfig
from scheduler.generation_policy import PREFIX_SHARING, GenerationSchedulerConfig
from vbert.config import (DEFAULT_LORA_TARGETS, HOST_HEAP_KEEP_MB, BackboneConfig, ModelConfig, PoolConfig,
                          SkipConfig, SkipTableConfig, default_shallow_path)

from vbert.bgmv import BANK_DTYPES
from vbert.decoder_backbone import DecoderBackboneConfig

from .admission import AdmissionConfig

ENV_PREFIX = "VBERT_"
BACKBONE_NAMES = ("encoder", "decoder")
REPLICA_ROUTINGS = ("adapter", "any")
DECODER_ROUTINGS = ("prefix", "adapter", "any")   # prefix: adapter's replicas, then the longest cached prompt prefix


AUTOSCALE_POLICIES = ("off", "predictive", "reactive")
# what a policy's load is measured in (the replicas' report to Ray), and the settings that name it
AUTOSCALE_METRICS = {"rows_per_s": ("replica_capacity_rps", "rows per second", "autoscale_history"),
                     "streams": ("decoder_target_streams", "streams in flight", "decoder_autoscale_history")}


@dataclass(frozen=True)
class AutoscaleConfig:
    """The replica count decided by a policy (dispatcher/autoscaling.py) between min and max replicas. The load is
    what the replicas report as `metric`: the encoder's rows per second ("rows_per_s"), the decoder's streams in
    flight ("streams"); one replica serves capacity_rps of it; history: earlier intervals' loads, in that unit."""

    policy: str
    capacity_rps: float
    min_replicas: int = 1
    max_replicas: int = 4
    interval_s: float = 60.0
    day_s: float = 86400.0
    history: tuple[float, ...] = ()
    metric: str = "rows_per_s"

    def __post_init__(self) -> None:
        if self.metric not in AUTOSCALE_METRICS:
            raise ValueError(f"autoscaling metric {self.metric!r} is not one of {tuple(AUTOSCALE_METRICS)}")
        capacity, unit, history = AUTOSCALE_METRICS[self.metric]
        if self.policy not in AUTOSCALE_POLICIES[1:]:
            raise ValueError(f"autoscale {self.policy!r} is not one of {AUTOSCALE_POLICIES[1:]}")
        if not 0 < self.capacity_rps < float("inf"):
            raise ValueError(f"autoscaling needs {capacity} > 0 (the {unit} one replica serves within its latency "
                             f"objective: measure it), got {self.capacity_rps}")
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 1 <= min_replicas <= max_replicas, got {self.min_replicas} and {self.max_replicas}")
        if not 0 < self.interval_s < float("inf") or not self.day_s >= 2 * self.interval_s:
            raise ValueError(f"need autoscale_interval_s > 0 and autoscale_day_s >= 2 intervals, got "
                             f"{self.interval_s} and {self.day_s}")
        if any(not (x >= 0 and x < float("inf")) for x in self.history):
            raise ValueError(f"{history} holds loads ({unit}): finite numbers >= 0")


@dataclass(frozen=True)
class StreamScaling:
    """Decoder replicas scaled by Ray Serve's own request-based policy: each generation stream is one ongoing request,
    and Ray keeps about `target_streams` per replica, between min and max replicas, after the delays."""

    min_replicas: int
    max_replicas: int
    target_streams: float
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 1 <= decoder_min_replicas <= decoder_max_replicas, got {self.min_replicas} and "
                             f"{self.max_replicas}")
        if self.target_streams <= 0 or self.upscale_delay_s < 0 or self.downscale_delay_s < 0:
            raise ValueError("decoder_target_streams must be > 0 and the scaling delays >= 0")

    def ray_config(self, initial_replicas: int) -> dict:
        return {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "initial_replicas": initial_replicas, "target_ongoing_requests": self.target_streams,
                "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s}


@dataclass(frozen=True)
class ScaleOutConfig:
    """A backbone on Ray Serve replicas (the encoder: dispatcher/scaleout.py; the decoder:
    dispatcher/scaleout_generation.py): how many, where, and how a replica is sized."""

    num_replicas: int
    address: str = "local"
    cpus: float = 1.0
    max_adapters: int = 64
    object_store_bytes: int = 512 << 20
    routing: str = "adapter"            # REPLICA_ROUTINGS; a decoder's also "prefix" (dispatcher/prefix_router.py)
    prefix_slack: int = 4               # routing "prefix": requests in flight a replica may have beyond the least loaded
    prefix_block_size: int = 16         # ... hashing the prompt in the replicas' KV cache blocks
    prefix_sharing: str = "tenant"      # ... salted as the replicas' prefix cache is (generation_prefix_sharing)
    max_ongoing_requests: int = 1024    # calls one replica takes at once (our engine batches them)
    retry_after_s: float = 1.0          # the hint sent with UNAVAILABLE when no replica answered
    app_name: str = "vbert-encoder"
    autoscale: AutoscaleConfig | None = None    # None: num_replicas, fixed
    local_cpus: float = 0.0             # a local cluster starts with at least these CPUs (every deployment's replicas)
    streams: StreamScaling | None = None   # decoder replicas: Ray's request-based autoscaling (None: fixed count)
    metrics_push_s: float | None = None  # a local cluster's replicas report their load this often (None: Ray's 10 s)

    def __post_init__(self) -> None:
        if self.num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {self.num_replicas}")
        if self.autoscale is not None and not (self.autoscale.min_replicas <= self.num_replicas
                                               <= self.autoscale.max_replicas):
            raise ValueError(f"replicas ({self.num_replicas}, the initial count) must lie within min_replicas "
                             f"({self.autoscale.min_replicas}) and max_replicas ({self.autoscale.max_replicas})")
        if self.routing not in DECODER_ROUTINGS:
            raise ValueError(f"routing {self.routing!r} is not one of {DECODER_ROUTINGS}")
        if self.prefix_slack < 0 or self.prefix_block_size < 1 or self.prefix_sharing not in PREFIX_SHARING:
            raise ValueError(f"prefix_slack must be >= 0, prefix_block_size >= 1 and prefix_sharing one of "
                             f"{PREFIX_SHARING}; got {self.prefix_slack}, {self.prefix_block_size}, "
                             f"{self.prefix_sharing!r}")
        if self.max_adapters < 1 or self.max_ongoing_requests < 1:
            raise ValueError("max_adapters and max_ongoing_requests must be >= 1")
        if self.cpus < 0 or self.retry_after_s <= 0 or self.object_store_bytes < 1:
            raise ValueError("cpus must be >= 0, retry_after_s and object_store_bytes > 0")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServerConfig:
    # listeners
    host: str = "127.0.0.1"
    port: int = 50051
    admin_host: str = "127.0.0.1"
    admin_port: int | None = None        # None: the tenant listener, which must then be loopback
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9400             # 0 disables the metrics endpoint
    http_host: str = "127.0.0.1"         # the OpenAI-compatible HTTP API (dispatcher/http_api.py)
    http_port: int = 8000                # 0 disables it
    tls_cert: str | None = None          # PEM files; cert + key enable TLS
    tls_key: str | None = None
    tls_client_ca: str | None = None     # with TLS: require client certificates signed by this CA (mTLS)
    # state
    data_dir: str = "./var"
    admin_token: str | None = None       # None: VBERT_ADMIN_TOKEN, else generated into data_dir/admin_token
    # model
    backbone: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    lora_slots: int = 256
    bottleneck_slots: int = 256
    max_lora_rank: int = 16
    lora_targets: str = ",".join(DEFAULT_LORA_TARGETS)   # modules LoRA adapters may target (comma-separated)
    max_bottleneck_size: int = 64
    max_labels: int = 64
    host_cache_mb: int = 2048
    # backbones: which the server loads (comma-separated: encoder, decoder)
    backbones: str = "encoder,decoder"
    decoder: str | None = None           # a local Llama-family checkpoint dir; None: SmolLM2-135M-Instruct
    decoder_kv_cache_mb: int = 256       # the KV cache of generation (a hard budget; K and V, all layers)
    decoder_block_size: int = 16         # tokens per KV block
    decoder_staging_mb: int | None = None   # the running decode rows' K/V kept contiguous too (faster decode; 0: off;
                                            # unset: as much as decoder_kv_cache_mb)
    decoder_lora_slots: int = 32         # decoder LoRA adapters resident at once
    decoder_max_lora_rank: int = 16
    decoder_lora_dtype: str = "auto"     # the decoder LoRA pool's banks: auto (the model's dtype) | float32 | bfloat16 (half the memory)
    generation_mode: str = "iteration"   # iteration (Orca) | request (static batches, a baseline)
    generation_max_tokens_per_step: int = 512   # decode tokens + prefill chunks per decoder step
    generation_max_running: int = 32     # sequences per decoder step
    generation_prefix_caching: bool = True   # reuse the KV blocks of identical leading prompt tokens
    generation_prefix_sharing: str = "tenant"   # tenant (a tenant reuses only its own) | global (the bare model's across tenants)
    # skip mode (lower layers from n-gram tables; vbert.skip)
    skip: bool = False                   # on/off; needs skip_tables
    skip_tables: str | None = None       # "name=SHALLOW_DIR[:TABLE_FILE],name2=..." (distill / build-table output)
    skip_default: str | None = None      # table of adapters that name none (default: the first)
    skip_mode: str = "exact"             # exact | fallback (approximate)
    skip_cache_entries: int = 131072     # computed misses kept per table (302 MB in float16 at hidden size 384)
    skip_route: str = "cost"             # cost (each row the cheaper way: table or real lower layers) | table | layers
    skip_warm_budget: float = 0.0        # the table path may be predicted this much dearer and still chosen (warms the cache)
    skip_keep_cache: bool = True         # keep the miss caches across restarts (DATA_DIR/skip/misses; saved when the server stops)
    # limits
    max_message_bytes: int = 16 << 20
    max_texts_per_request: int = 64
    max_tokens_per_text: int = 512
    max_concurrent_rpcs: int = 4096      # keyed calls in flight, all tenants together (memory bound)
    max_concurrent_rpcs_per_tenant: int = 32   # calls (and open streams) one tenant holds at once
    max_concurrent_public_rpcs: int = 32       # calls without a key (health, reflection) held at once ...
    max_concurrent_public_rpcs_per_peer: int = 8   # ... of which from one address
    max_failed_auth_per_s: float = 5.0   # failed authentications per second one address may make ...
    max_failed_auth_burst: int = 20      # ... after a burst of this many; then refused without hashing
    default_deadline_s: float = 30.0
    keepalive_min_ping_s: float = 10.0   # client pings at most this often are accepted, never GOAWAY'd
    # engine
    is_pipelined: bool = True
    max_tokens_per_step: int = 8192
    max_rows_per_step: int = 64
    max_waiting: int = 10000
    max_waiting_per_tenant: int = 1000
    latency_target_ms: float = 250.0     # how long a light tenant may wait behind other tenants' steps;
                                         # steps are sized from measured step times to stay within it
    # lifecycle
    grace_s: float = 30.0
    host_heap_keep_mb: int = HOST_HEAP_KEEP_MB   # freed host memory the process keeps for its next steps (glibc; 0: its defaults)
    # scale-out (docs/scale-out.md): the encoder's engine as Ray Serve replicas (needs the `ray` extra)
    replicas: int = 0                    # 0: the encoder computes in this process; N: N replicas on Ray Serve
    ray_address: str = "local"           # "local": start a local Ray cluster; else join one ("auto", "HOST:6379")
    replica_threads: int = 1             # CPU threads of each replica's compute
    replica_cpus: float = 1.0            # CPUs Ray reserves for each replica (placement)
    replica_adapters: int = 64           # adapters a replica keeps loaded (Ray's multiplexed LRU)
    ray_object_store_mb: int = 512       # a local cluster's object store (adapter files travel through it)
    replica_routing: str = "adapter"     # the encoder's: adapter (multiplexed: where its adapter is loaded) | any
    decoder_replicas: int = 0            # 0: generation runs in this process; N: N decoder replicas on Ray Serve
    decoder_routing: str = "prefix"      # prefix (where the adapter is, then where the prompt's prefix is cached) |
                                         # adapter | any
    decoder_routing_slack: int = 4       # prefix: requests in flight the chosen replica may have beyond the least loaded
    decoder_max_replicas: int = 0        # > decoder_replicas: scaled by streams in flight (0: fixed)
    decoder_min_replicas: int = 1
    decoder_target_streams: float = 16.0   # streams per decoder replica the scaling aims for (Ray's policy or ours)
    decoder_autoscale: str = "off"       # off (Ray's request-based policy) | predictive | reactive, on streams
    decoder_autoscale_history: str | None = None   # JSON file: earlier intervals' streams in flight, oldest first
    decoder_upscale_delay_s: float = 30.0
    decoder_downscale_delay_s: float = 600.0
    # autoscaling of the replicas (docs/placement-autoscaling.md): a Ray Serve custom policy
    autoscale: str = "off"               # off | predictive (Holt-Winters forecast + reactive floor) | reactive
    min_replicas: int = 1
    max_replicas: int = 0                # 0: replicas (no autoscaling above the initial count)
    replica_capacity_rps: float = 0.0    # rows/s one replica serves within its latency objective (measure it)
    autoscale_interval_s: float = 60.0   # one load sample and one decision per interval
    autoscale_day_s: float = 86400.0     # the forecast's season (a day; shorter for a compressed-day test)
    autoscale_history: str | None = None # JSON file: earlier intervals' loads (rows/s), oldest first
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        for name in ("port", "metrics_port", "http_port"):
            v = getattr(self, name)
            if not 0 <= v <= 65535:
                raise ValueError(f"{name} must be in [0, 65535], got {v}")
        if self.admin_port is not None and not 0 <= self.admin_port <= 65535:
            raise ValueError(f"admin_port must be in [0, 65535], got {self.admin_port}")
        if self.admin_port is None and not is_loopback(self.host):
            raise ValueError(f"the admin API binds to loopback: with host {self.host!r} (not loopback) set admin_port "
                             f"for a separate admin listener on {self.admin_host}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if self.admin_port is not None and not is_loopback(self.admin_host) and self.tls_cert is None:
            raise ValueError(f"admin_host {self.admin_host!r} is not loopback: the admin listener would carry "
                             f"the admin token in plain text; set admin_host to 127.0.0.1, or set tls_cert "
                             f"and tls_key (TLS)")
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            v = getattr(self, name)
            if v is not None and not Path(v).is_file():
                raise ValueError(f"{name} {v!r} is not a file")
        for name in ("max_message_bytes", "max_texts_per_request", "max_tokens_per_text", "max_concurrent_rpcs",
                     "max_concurrent_rpcs_per_tenant", "max_concurrent_public_rpcs",
                     "max_concurrent_public_rpcs_per_peer", "max_failed_auth_burst",
                     "host_cache_mb", "max_tokens_per_step", "max_rows_per_step", "max_waiting",
                     "max_waiting_per_tenant", "decoder_kv_cache_mb"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("default_deadline_s", "keepalive_min_ping_s", "grace_s", "max_failed_auth_per_s",
                     "latency_target_ms"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.decoder_staging_mb is not None and self.decoder_staging_mb < 0:
            raise ValueError(f"decoder_staging_mb must be >= 0 (0: off), got {self.decoder_staging_mb}")
        if self.host_heap_keep_mb < 0:
            raise ValueError(f"host_heap_keep_mb must be >= 0 (0: glibc's defaults), got {self.host_heap_keep_mb}")
        if self.replicas < 0:
            raise ValueError(f"replicas must be >= 0 (0: compute in this process), got {self.replicas}")
        for name in ("replica_threads", "replica_adapters", "ray_object_store_mb"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.replica_cpus < 0:
            raise ValueError(f"replica_cpus must be >= 0, got {self.replica_cpus}")
        if self.replica_routing not in REPLICA_ROUTINGS:
            raise ValueError(f"replica_routing {self.replica_routing!r} is not one of {REPLICA_ROUTINGS}")
        if self.decoder_routing not in DECODER_ROUTINGS:
            raise ValueError(f"decoder_routing {self.decoder_routing!r} is not one of {DECODER_ROUTINGS}")
        if self.decoder_routing_slack < 0:
            raise ValueError(f"decoder_routing_slack must be >= 0, got {self.decoder_routing_slack}")
        if self.autoscale not in AUTOSCALE_POLICIES:
            raise ValueError(f"autoscale {self.autoscale!r} is not one of {AUTOSCALE_POLICIES}")
        if self.autoscale != "off" and not self.replicas:
            raise ValueError(f"autoscale = {self.autoscale!r} scales Ray Serve replicas: set replicas >= 1 (the initial "
                             f"count)")
        if not self.ray_address.strip():
            raise ValueError("ray_address must be 'local' or the address of a Ray cluster, got an empty string")
        if self.decoder_replicas < 0:
            raise ValueError(f"decoder_replicas must be >= 0 (0: generate in this process), got {self.decoder_replicas}")
        if self.decoder_max_replicas and not self.decoder_replicas:
            raise ValueError("decoder_max_replicas scales decoder replicas: set decoder_replicas >= 1 (the initial count)")
        if self.decoder_autoscale not in AUTOSCALE_POLICIES:
            raise ValueError(f"decoder_autoscale {self.decoder_autoscale!r} is not one of {AUTOSCALE_POLICIES}")
        if self.decoder_autoscale != "off" and not self.decoder_replicas:
            raise ValueError(f"decoder_autoscale = {self.decoder_autoscale!r} scales decoder replicas: set "
                             f"decoder_replicas >= 1 (the initial count)")
        if self.decoder_replicas and not self.has_decoder:
            raise ValueError(f"decoder_replicas = {self.decoder_replicas} runs the decoder on Ray Serve, but backbones = "
                             f"{self.backbones!r} loads no decoder")
        if self.replicas and not self.has_encoder:
            raise ValueError(f"replicas = {self.replicas} runs the encoder on Ray Serve, but backbones = "
                             f"{self.backbones!r} loads no encoder")
        if self.decoder_lora_dtype not in BANK_DTYPES:
            raise ValueError(f"decoder_lora_dtype {self.decoder_lora_dtype!r} is not one of {BANK_DTYPES}")
        if self.generation_prefix_sharing not in PREFIX_SHARING:
            raise ValueError(f"generation_prefix_sharing {self.generation_prefix_sharing!r} is not one of "
                             f"{PREFIX_SHARING}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(f"log_level {self.log_level!r} is not one of DEBUG, INFO, WARNING, ERROR")
        names = self.backbone_names
        if not names or set(names) - set(BACKBONE_NAMES) or len(set(names)) != len(names):
            raise ValueError(f"backbones {self.backbones!r} must name one or both of {BACKBONE_NAMES}, "
                             f"comma-separated")
        # the parts validate themselves
        self.model_config(), self.scheduler_config(), self.manager_config(), self.admission_config()
        self.engine_config(), self.decoder_config(), self.generation_scheduler_config(), self.scaleout_config()
        self.decoder_scaleout_config()

    @property
    def backbone_names(self) -> tuple[str, ...]:
        return tuple(n.strip() for n in self.backbones.split(",") if n.strip())

    @property
    def has_encoder(self) -> bool:
        return "encoder" in self.backbone_names

    @property
    def has_decoder(self) -> bool:
        return "decoder" in self.backbone_names

    # -- the parts -----------------------------------------------------------------------------
    def model_config(self) -> ModelConfig:
        return ModelConfig(
            backbone=BackboneConfig(path=self.backbone, device=self.device, dtype=self.dtype,
                                    max_length=self.max_tokens_per_text),
            pool=PoolConfig(num_lora_slots=self.lora_slots, num_bottleneck_slots=self.bottleneck_slots,
                            max_lora_rank=self.max_lora_rank, max_bottleneck_size=self.max_bottleneck_size,
                            max_labels=self.max_labels,
                            lora_targets=tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())),
            skip=self.skip_config())

    def skip_config(self) -> SkipConfig:
        if not self.skip:
            return SkipConfig()
        tables = []
        if not self.skip_tables:               # the shipped shallow layers with the operator's table
            table = Path(self.data_dir) / "skip" / "table.safetensors"
            if not table.is_file():
                raise ValueError(f"skip is on but skip_tables is empty and {table} does not exist: build it with "
                                 f"`vbert build-table --corpus YOUR_TEXT --out {table}` (from the shipped shallow "
                                 f"layers), or give skip_tables = name=SHALLOW_DIR[:TABLE_FILE],...")
            tables.append(SkipTableConfig("default", default_shallow_path(), str(table)))
        for item in self.skip_tables.split(",") if self.skip_tables else ():
            name, sep, paths = item.strip().partition("=")
            if not sep or not name or not paths:
                raise ValueError(f"skip_tables entry {item!r}: expected name=SHALLOW_DIR[:TABLE_FILE]")
            shallow, _, table = paths.partition(":")
            tables.append(SkipTableConfig(name.strip(), shallow, table or None))
        return SkipConfig(tuple(tables), mode=self.skip_mode, default=self.skip_default,
                          miss_cache_entries=self.skip_cache_entries, route=self.skip_route,
                          warm_budget=self.skip_warm_budget,
                          cache_dir=str(Path(self.data_dir) / "skip" / "misses") if self.skip_keep_cache else None)

    def manager_config(self) -> ManagerConfig:
        return ManagerConfig.under(self.data_dir, cache=CacheConfig(host_budget_bytes=self.host_cache_mb << 20))

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(max_tokens_per_step=max(self.max_tokens_per_step, self.max_tokens_per_text),
                               max_rows_per_step=self.max_rows_per_step, max_waiting=self.max_waiting,
                               max_waiting_per_tenant=self.max_waiting_per_tenant)

    def engine_config(self) -> EngineConfig:
        return EngineConfig(is_pipelined=self.is_pipelined, latency_target_s=self.latency_target_ms / 1000)

    def decoder_config(self) -> DecoderBackboneConfig:
        return DecoderBackboneConfig(path=self.decoder, cache_dir=str(Path(self.data_dir) / "models"),
                                     kv_cache_bytes=self.decoder_kv_cache_mb << 20, block_size=self.decoder_block_size,
                                     staging_bytes=(self.decoder_kv_cache_mb if self.decoder_staging_mb is None
                                                    else self.decoder_staging_mb) << 20,
                                     num_lora_slots=self.decoder_lora_slots, max_lora_rank=self.decoder_max_lora_rank,
                                     lora_dtype=self.decoder_lora_dtype)

    def generation_scheduler_config(self) -> GenerationSchedulerConfig:
        return GenerationSchedulerConfig(max_tokens_per_step=self.generation_max_tokens_per_step,
                                         max_running=self.generation_max_running, max_waiting=self.max_waiting,
                                         max_waiting_per_tenant=self.max_waiting_per_tenant,
                                         max_adapters=max(1, self.decoder_lora_slots // 2), mode=self.generation_mode,
                                         prefix_caching=self.generation_prefix_caching,
                                         prefix_sharing=self.generation_prefix_sharing)

    def generation_engine_config(self) -> GenerationEngineConfig:
        return GenerationEngineConfig()

    def admission_config(self) -> AdmissionConfig:
        return AdmissionConfig(total=self.max_concurrent_rpcs, per_tenant=self.max_concurrent_rpcs_per_tenant,
                               public=self.max_concurrent_public_rpcs,
                               public_per_peer=self.max_concurrent_public_rpcs_per_peer,
                               failed_auth_per_s=self.max_failed_auth_per_s,
                               failed_auth_burst=self.max_failed_auth_burst)

    def scaleout_config(self) -> ScaleOutConfig | None:
        """None: the encoder computes in this process."""
        if not self.replicas:
            return None
        return ScaleOutConfig(self.replicas, address=self.ray_address.strip(), cpus=self.replica_cpus,
                              max_adapters=self.replica_adapters, object_store_bytes=self.ray_object_store_mb << 20,
                              routing=self.replica_routing,   # replica_threads: the replica reads its ServerConfig
                              autoscale=self.autoscale_config(), local_cpus=self._cluster_cpus(),
                              metrics_push_s=self._metrics_push_s())

    def decoder_scaleout_config(self) -> ScaleOutConfig | None:
        """None: generation runs in this process. Decoder replicas share the encoder replicas' settings (address,
        CPUs, threads, adapters held) and route by decoder_routing; with decoder_max_replicas Ray scales them by
        streams in flight."""
        if not self.decoder_replicas:
            return None
        return ScaleOutConfig(self.decoder_replicas, address=self.ray_address.strip(), cpus=self.replica_cpus,
                              max_adapters=self.replica_adapters, object_store_bytes=self.ray_object_store_mb << 20,
                              routing=self.decoder_routing, prefix_slack=self.decoder_routing_slack,
                              prefix_block_size=self.decoder_block_size, prefix_sharing=self.generation_prefix_sharing,
                              app_name="vbert-decoder", local_cpus=self._cluster_cpus(),
                              streams=self._stream_scaling(), autoscale=self.decoder_autoscale_config(),
                              metrics_push_s=self._metrics_push_s())

    def _decoder_bounds(self) -> tuple[int, int]:
        most = self.decoder_max_replicas or self.decoder_replicas
        if not self.decoder_min_replicas <= self.decoder_replicas <= most:
            raise ValueError(f"decoder_replicas ({self.decoder_replicas}, the initial count) must lie within "
                             f"decoder_min_replicas ({self.decoder_min_replicas}) and decoder_max_replicas "
                             f"({self.decoder_max_replicas})")
        return self.decoder_min_replicas, most

    def _stream_scaling(self) -> StreamScaling | None:
        """Ray's request-based policy: only without a policy of ours (decoder_autoscale off)."""
        if not self.decoder_max_replicas or self.decoder_autoscale != "off":
            return None
        low, high = self._decoder_bounds()
        return StreamScaling(low, high, self.decoder_target_streams, self.decoder_upscale_delay_s,
                             self.decoder_downscale_delay_s)

    def decoder_autoscale_config(self) -> AutoscaleConfig | None:
        """decoder_autoscale's policy on the decoder replicas' streams in flight, decoder_target_streams per replica
        (the same interval and day as the encoder's)."""
        if self.decoder_autoscale == "off":
            return None
        low, high = self._decoder_bounds()
        return AutoscaleConfig(self.decoder_autoscale, self.decoder_target_streams, low, high, self.autoscale_interval_s,
                               self.autoscale_day_s, _history(self.decoder_autoscale_history, "decoder_autoscale_history"),
                               metric="streams")

    def _metrics_push_s(self) -> float | None:
        """How often replicas report their load to Ray's controller when a policy of ours decides (Ray's default,
        every 10 s, is too seldom for a short interval); None: Ray's default."""
        if self.autoscale == "off" and self.decoder_autoscale == "off":
            return None
        return min(10.0, max(0.5, self.autoscale_interval_s / 4))

    def _cluster_cpus(self) -> float:
        most = (self.max_replicas or self.replicas) if self.autoscale != "off" else self.replicas
        return (most + max(self.decoder_replicas, self.decoder_max_replicas)) * self.replica_cpus

    def autoscale_config(self) -> AutoscaleConfig | None:
        if self.autoscale == "off":
            return None
        return AutoscaleConfig(self.autoscale, self.replica_capacity_rps, self.min_replicas,
                               self.max_replicas or self.replicas, self.autoscale_interval_s, self.autoscale_day_s,
                               _history(self.autoscale_history, "autoscale_history"))

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # -- composition ---------------------------------------------------------------------------
    @classmethod
    def load(cls, config_file: str | None = None, env: Mapping[str, str] | None = None,
             flags: Mapping[str, Any] | None = None) -> "ServerConfig":
        """defaults < config file < VBERT_* env < flags (flags whose value is None are unset)."""
        values: dict[str, Any] = {}
        if config_file is not None:
            path = Path(config_file)
            if not path.is_file():
                raise ValueError(f"config file {config_file!r} does not exist")
            try:
                values.update(_check_keys(tomllib.loads(path.read_text()), f"config file {config_file}"))
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"config file {config_file}: {e}") from None
        env = env or {}
        known = {f.name for f in fields(cls)}
        for key, raw in env.items():
            if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX):].lower() in known:
                values[key[len(ENV_PREFIX):].lower()] = raw
        values.update({k: v for k, v in _check_keys(dict(flags or {}), "flags").items() if v is not None})
        return cls(**{k: _coerce(k, v) for k, v in values.items()})


def _check_keys(d: dict, where: str) -> dict:
    known = {f.name for f in fields(ServerConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{where}: unknown settings {unknown}")
    return d


_HINTS = typing.get_type_hints(ServerConfig)


def _coerce(name: str, value: Any) -> Any:
    """Strings from the environment (or TOML values) into the field's type, with a clear error."""
    hint = _HINTS[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    target = args[0]
    if value is None or (isinstance(value, str) and value == "" and type(None) in typing.get_args(hint)):
        return None
    if isinstance(value, target) and not (target is int and isinstance(value, bool)):
        return value
    try:
        if target is bool:
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return target(value)
    except (TypeError, ValueError):
        raise ValueError(f"setting {name}: {value!r} is not a valid {target.__name__}") from None


def _history(path: str | None, name: str) -> tuple[float, ...]:
    """An autoscaling history file: a JSON list of earlier intervals' loads, oldest first (None: none)."""
    if not path:
        return ()
    import json

    try:
        return tuple(float(x) for x in json.loads(Path(path).read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{name} {path!r}: not a JSON list of numbers ({e})") from None
