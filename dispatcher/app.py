"""The application: model + manager + engine + edge helpers, composed once from a ServerConfig.
Servicers receive the App; nothing reads configuration from anywhere else."""
from __future__ import annotations

import dataclasses
import importlib
import logging
import time
from dataclasses import dataclass, field

from manager.errors import FailedPreconditionError
from manager.manager import AdapterRef, Manager
from manager.records import Tenant
from scheduler.engine import Engine
from scheduler.generation_engine import GenerationEngine
from scheduler.types import Request
from vbert.decoder_backbone import DecoderBackbone
from vbert.device import DeviceContext
from vbert.model import MultiTenantModel

from .admission import Admission
from .auth import Authenticator, load_admin_token
from .config import ServerConfig
from .engines import encoder_engine, generation_engine
from .limits import RateLimiter
from .metrics import Metrics
from .uploads import uploads_dir

log = logging.getLogger("vbert.dispatcher")


def _on_ray(module: str, key: str, scaleout):
    """A scale-out module of this package, imported only when asked for (it imports Ray)."""
    try:
        return importlib.import_module(module, __package__)
    except ImportError as e:
        raise ValueError(f"{key} = {scaleout.num_replicas} needs Ray Serve: pip install -e '.[ray]' ({e})") from None


@dataclass
class App:
    config: ServerConfig
    model: MultiTenantModel | None                  # the encoder backbone (None: a decoder-only server)
    manager: Manager
    engine: Engine | None                           # its step loop
    auth: Authenticator
    limiter: RateLimiter
    metrics: Metrics
    admin_token: str
    admission: Admission = field(default_factory=Admission)
    decoder: DecoderBackbone | None = None          # the decoder backbone (None: encoder only)
    generation: GenerationEngine | None = None      # its step loop
    started: float = field(default_factory=time.time)
    is_draining: bool = False

    @classmethod
    def create(cls, config: ServerConfig) -> "App":
        model = MultiTenantModel(config.model_config()) if config.has_encoder else None
        if model is not None and model.skip_cache_restored:
            log.info("skip mode: miss caches restored (%s)",
                     ", ".join(f"{k}: {v}" for k, v in model.skip_cache_restored.items()))
        device = model.device if model is not None else DeviceContext.create(config.device, config.dtype)
        decoder = DecoderBackbone.load(cls._decoder_config(config), device) if config.has_decoder else None
        manager = Manager(config.manager_config(), model, decoder_pool=decoder.lora if decoder else None)
        if manager.recovery.num_removed:
            log.warning("start-up recovery removed %d leftover files", manager.recovery.num_removed)
        uploads_dir(config.data_dir, clear=True)  # a killed process's half-extracted uploads, before serving
        metrics = Metrics()
        engine = cls._encoder_engine(config, model, manager, metrics) if model is not None else None
        generation = cls._generation_engine(config, decoder, manager, metrics) if decoder else None
        metrics.watch(cache=manager.cache, scheduler=engine.scheduler if engine else None,
                      skip=model.skip if model else None,
                      generation=generation.scheduler if generation else None,
                      staging=decoder.kv.staging if decoder is not None and generation is not None else None,
                      replicas={name: e for name, e in (("encoder", engine), ("decoder", generation))
                                if e is not None and hasattr(e, "replica_states")})
        token = load_admin_token(config.data_dir, config.admin_token)
        return cls(config, model, manager, engine, Authenticator(manager, token), RateLimiter(), metrics, token,
                   Admission(config.admission_config()), decoder, generation)

    @staticmethod
    def _decoder_config(config: ServerConfig):
        """With decoder replicas this process's decoder never generates: a KV cache of one MiB, not the configured."""
        decoder = config.decoder_config()
        if not config.decoder_replicas:
            return decoder
        return dataclasses.replace(decoder, kv_cache_bytes=1 << 20, staging_bytes=0)

    @staticmethod
    def _encoder_engine(config: ServerConfig, model: MultiTenantModel, manager: Manager, metrics: Metrics):
        """The encoder's step loop in this process, or (replicas > 0) on Ray Serve replicas that hold their own
        copy of the backbone: this process then keeps it only for tokenization, shapes and upload checks."""
        scaleout = config.scaleout_config()
        if scaleout is None:
            return encoder_engine(config, model, manager.cache, metrics)
        return _on_ray(".scaleout", "replicas", scaleout).start_replicas(scaleout, config, manager)

    @staticmethod
    def _generation_engine(config: ServerConfig, decoder: DecoderBackbone, manager: Manager, metrics: Metrics):
        """The decoder's step loop in this process, or (decoder_replicas > 0) on Ray Serve replicas that hold their
        own copy of the decoder: this process then keeps it only for tokenization, the chat template and upload
        checks."""
        scaleout = config.decoder_scaleout_config()
        if scaleout is None:
            return generation_engine(config, decoder, manager.decoder_cache, metrics)
        return _on_ray(".scaleout_generation", "decoder_replicas", scaleout).start_decoder_replicas(
            scaleout, config, manager, on_finish=metrics.on_generation_finish)

    def start(self) -> "App":
        for engine in self.engines:
            engine.start()
        self.metrics.gc_pauses.install()
        return self

    def close(self) -> int:
        """Drain the engines (up to grace_s) and close the manager; returns the engines' drained count."""
        num_drained = sum(engine.stop(drain=True, timeout=self.config.grace_s) for engine in self.engines)
        self.metrics.gc_pauses.remove()
        self.manager.close()
        if self.model is not None and self.config.scaleout_config() is None:
            try:                                       # (replicas on Ray Serve hold their own caches)
                saved = self.model.save_skip_caches()
                if saved:
                    log.info("skip mode: miss caches saved (%s)", ", ".join(f"{k}: {v} entries" for k, v in saved.items()))
            except OSError as e:                       # a cache: losing it costs speed, not correctness
                log.warning("skip mode: miss caches not saved: %s", e)
        return num_drained

    @property
    def engines(self) -> list:
        return [e for e in (self.engine, self.generation) if e is not None]

    @property
    def is_accepting(self) -> bool:
        return not self.is_draining and all(e.is_accepting for e in self.engines)

    def require_encoder(self, rpc: str) -> Engine:
        """The encoder's engine; FailedPreconditionError naming the RPC on a server without the encoder."""
        if self.engine is None:
            raise FailedPreconditionError(f"this server loads no encoder backbone (backbones = "
                                          f"{self.config.backbones!r}); {rpc} needs one")
        return self.engine

    def new_request(self, tenant: Tenant, ref: AdapterRef, deadline: float, *, text: str | None = None,
                    token_ids: list[int] | None = None, truncate: bool = True,
                    normalize: bool | None = None) -> Request:
        return Request(tenant_id=tenant.id, adapter_id=ref.adapter_id, deadline=deadline, text=text,
                       prompt_ids=token_ids, truncate=truncate, normalize=normalize, weight=tenant.quotas.weight,
                       max_length=min(tenant.quotas.max_tokens_per_request, self.config.max_tokens_per_text))
