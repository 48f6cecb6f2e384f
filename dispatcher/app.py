"""The application: model + manager + engine + edge helpers, composed once from a ServerConfig.
Servicers receive the App; nothing reads configuration from anywhere else."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from manager.manager import AdapterRef, Manager
from manager.records import Tenant
from scheduler.engine import Engine
from scheduler.runner import ModelRunner
from scheduler.types import Request
from vbert.model import MultiTenantModel

from .admission import Admission
from .auth import Authenticator, load_admin_token
from .config import ServerConfig
from .limits import RateLimiter
from .metrics import Metrics
from .uploads import uploads_dir

log = logging.getLogger("vbert.dispatcher")


@dataclass
class App:
    config: ServerConfig
    model: MultiTenantModel
    manager: Manager
    engine: Engine
    auth: Authenticator
    limiter: RateLimiter
    metrics: Metrics
    admin_token: str
    admission: Admission = field(default_factory=Admission)
    started: float = field(default_factory=time.time)
    is_draining: bool = False

    @classmethod
    def create(cls, config: ServerConfig) -> "App":
        model = MultiTenantModel(config.model_config())
        manager = Manager(config.manager_config(), model)
        if manager.recovery.num_removed:
            log.warning("start-up recovery removed %d leftover files", manager.recovery.num_removed)
        uploads_dir(config.data_dir, clear=True)  # a killed process's half-extracted uploads, before serving
        metrics = Metrics()
        engine = Engine(config.engine_config(), config.scheduler_config(), ModelRunner(model, manager.cache),
                        manager.cache, on_step=metrics.on_step)
        metrics.watch(cache=manager.cache, scheduler=engine.scheduler, skip=model.skip)
        token = load_admin_token(config.data_dir, config.admin_token)
        return cls(config, model, manager, engine, Authenticator(manager, token), RateLimiter(), metrics, token,
                   Admission(config.admission_config()))

    def start(self) -> "App":
        self.engine.start()
        return self

    def close(self) -> int:
        """Drain the engine (up to grace_s) and close the manager; returns the engine's drained count."""
        num_drained = self.engine.stop(drain=True, timeout=self.config.grace_s)
        self.manager.close()
        return num_drained

    def new_request(self, tenant: Tenant, ref: AdapterRef, deadline: float, *, text: str | None = None,
                    token_ids: list[int] | None = None, truncate: bool = True,
                    normalize: bool | None = None) -> Request:
        return Request(tenant_id=tenant.id, adapter_id=ref.adapter_id, deadline=deadline, text=text,
                       prompt_ids=token_ids, truncate=truncate, normalize=normalize, weight=tenant.quotas.weight,
                       max_length=min(tenant.quotas.max_tokens_per_request, self.config.max_tokens_per_text))
