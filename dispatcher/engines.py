"""The step loops built from a ServerConfig, the same in the server's process (dispatcher/app.py) and on a Ray
Serve replica (dispatcher/replica.py): the encoder's Engine and the decoder's GenerationEngine over their
adapter caches (not started)."""
from __future__ import annotations

from scheduler.engine import Engine
from scheduler.generation_engine import GenerationEngine
from scheduler.generation_runner import GenerationRunner
from scheduler.residency import CacheResidency
from scheduler.runner import ModelRunner

from .config import ServerConfig


def encoder_engine(config: ServerConfig, model, cache, metrics=None) -> Engine:
    """model: a vbert.model.MultiTenantModel; cache: its TieredCache; metrics: dispatcher.metrics.Metrics or None."""
    return Engine(config.engine_config(), config.scheduler_config(), ModelRunner(model, cache), cache,
                  on_step=metrics.on_step if metrics else None)


def generation_engine(config: ServerConfig, decoder, cache, metrics=None) -> GenerationEngine:
    """decoder: a vbert.decoder_backbone.DecoderBackbone; cache: the TieredCache over its LoRA pool."""
    sched = config.generation_scheduler_config()
    residency = CacheResidency(cache, lambda: generation.wake(), max_outstanding=sched.max_adapters)
    generation = GenerationEngine(config.generation_engine_config(), sched,
                                  GenerationRunner(decoder.model, decoder.kv, cache), decoder.tokenizer,
                                  decoder.eos_token_ids, adapters=cache, residency=residency,
                                  on_step=metrics.on_generation_step if metrics else None,
                                  on_finish=metrics.on_generation_finish if metrics else None)
    return generation
