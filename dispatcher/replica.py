"""The encoder's engine as a Ray Serve deployment (imported only with `replicas` > 0; needs the `ray` extra).

Each replica holds the backbone, an adapter pool with its tiered cache and our engine, which batches the rows of
every call it is serving in one step, whatever their adapters (no `@serve.batch`: it splits batches by model id).
A call carries the rows of one adapter; the front door (dispatcher/scaleout.py) names that adapter as the call's
multiplexed model id, so Ray routes it to a replica that has the adapter loaded. The adapter's files come with
the call as an object reference (the front door reads them from its store): a replica never needs the control
plane's filesystem, and checks the bytes against the registry's sha256 before it decodes them.

Rows and answers are plain values (dicts, tuples, the runner's RowOutput): no protobuf, no grpc here.
"""
from __future__ import annotations

import asyncio
import os
import time
from collections import Counter, deque

from ray import serve

from manager.cache import CacheConfig, TieredCache
from manager.codec import decode_artifact
from manager.errors import CorruptAdapterError, NotFoundError
from scheduler.types import Request
from vbert.decoder_backbone import DecoderBackbone
from vbert.device import DeviceContext, keep_host_heap, reserve_cpu_for_steps
from vbert.model import MultiTenantModel

from .engines import encoder_engine, generation_engine
from .heap import freeze_startup_heap
from .replica_load import Reporter

BASE_MODEL_ID = "base"      # the bare backbone (no adapter to load)
RATE_WINDOW_S = 5.0         # the rows-per-second a replica reports to Ray's autoscaler is over this window
RETURNED_METADATA = ("offsets", "word_ids")   # what the servicers read of a computed request (Tag's character offsets)


def model_id_of(adapter_id: int | None, version: int) -> str:
    """The multiplexed model id of an adapter version ('<id>v<version>'); the bare backbone is BASE_MODEL_ID."""
    return BASE_MODEL_ID if adapter_id is None else f"{adapter_id}v{version}"


def failure(exc: BaseException) -> tuple[str, str, str]:
    """A row's error as plain values (class name, message): rebuilt by the front door from its own classes."""
    return ("error", type(exc).__name__, str(exc))


class _LoadedAdapter:
    """What Ray's multiplexed LRU holds per adapter; Ray calls __del__ when it evicts it (replica.forget)."""

    def __init__(self, replica: "_Replica", adapter_id: int):
        self.replica, self.adapter_id = replica, adapter_id

    def __del__(self) -> None:
        replica, self.replica = self.replica, None
        if replica is not None:
            replica.forget(self.adapter_id)


class _Replica:
    """What the encoder's and the decoder's replicas share: their adapters, delivered with the calls that need
    them, checked, decoded and held while Ray's multiplexed LRU keeps them (the tiered cache's disk tier on a
    replica is `_artifact`), and their engine's health check and drain."""

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose engine stopped is replaced."""
        if not self.engine.is_accepting:
            raise RuntimeError("the engine is not accepting requests")

    def __del__(self) -> None:      # Ray Serve ends the replica (scale down, shutdown): drain the engine first
        reporter = getattr(self, "_reporter", None)
        if reporter is not None:
            reporter.stop()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop(drain=True, timeout=10)

    def _report_load(self) -> None:
        """Push load_stats() to the deployment's load board every second (dispatcher/replica_load.py)."""
        self._reporter = Reporter(str(self.pid), self.load_stats).start()

    def load_stats(self) -> dict:
        """What this replica's engine is doing now (plain numbers), for the front door's metrics and status."""
        raise NotImplementedError

    def _hold_adapters(self, cache: TieredCache) -> None:
        self.cache = cache
        self._artifacts: dict[int, object] = {}     # adapter id -> its decoded artifact (while Ray keeps it loaded)
        self._sources: dict[int, dict] = {}         # adapter id -> {"sha256", "blob": [ObjectRef]} of its last call
        self._in_flight: Counter = Counter()         # adapter id -> rows (or sequences) computing
        self._evicted: set[int] = set()              # evicted by Ray while rows still compute: dropped after them

    def _artifact(self, adapter_id: int):
        """The cache's disk tier on a replica: the artifact delivered with a call."""
        try:
            return self._artifacts[adapter_id]
        except KeyError:
            raise NotFoundError(f"adapter {adapter_id} is not loaded on this replica") from None

    async def load_adapter(self, model_id: str) -> _LoadedAdapter:
        """Fetch, check and decode the adapter's files and make it device-resident. The deployed class wraps this
        in @serve.multiplexed (see `deployment`): Ray then calls it once per adapter held, evicting the least
        recently used beyond `replica_adapters`, and routes the adapter's calls here."""
        adapter_id = int(model_id.partition("v")[0])
        source = self._sources[adapter_id]
        data, config = await source["blob"][0]
        if not isinstance(config, dict) or config.get("sha256") != source["sha256"]:
            raise CorruptAdapterError(f"adapter {adapter_id}: the files received are not sha256 {source['sha256']}")
        self._artifacts[adapter_id] = await asyncio.to_thread(decode_artifact, data, config)   # checks the bytes
        self._evicted.discard(adapter_id)
        try:
            await asyncio.wrap_future(self.cache.prefetch([adapter_id]))   # onto the device before the first row
        except BaseException:
            self._artifacts.pop(adapter_id, None)
            raise
        self.cache.release([adapter_id])
        return _LoadedAdapter(self, adapter_id)

    def forget(self, adapter_id: int) -> None:
        """Ray evicted the adapter (LRU over `replica_adapters`): drop it from every tier once its rows are done."""
        if self._in_flight[adapter_id]:
            self._evicted.add(adapter_id)
            return
        self._artifacts.pop(adapter_id, None)
        self.cache.invalidate(adapter_id)

    def _done(self, adapter_id: int, num_rows: int) -> None:
        self._in_flight[adapter_id] -= num_rows
        if self._in_flight[adapter_id] <= 0:
            del self._in_flight[adapter_id]
            if adapter_id in self._evicted:
                self._evicted.discard(adapter_id)
                self.forget(adapter_id)


class EncoderReplica(_Replica):
    """One replica of the encoder (the class Ray Serve deploys; see `deployment`)."""

    def __init__(self, config) -> None:   # config: dispatcher.config.ServerConfig (validated by the front door)
        reserve_cpu_for_steps(config.replica_threads)
        keep_host_heap(config.host_heap_keep_mb)
        self.model = MultiTenantModel(config.model_config())
        self._hold_adapters(TieredCache(CacheConfig(host_budget_bytes=config.host_cache_mb << 20), self.model.pool,
                                        self._artifact))
        self.engine = encoder_engine(config, self.model, self.cache).start()
        self._arrivals: deque[tuple[float, int]] = deque()   # (when, rows) of the calls of the last RATE_WINDOW_S
        self._started = time.monotonic()
        self.pid = os.getpid()
        freeze_startup_heap()     # a replica is a process of its own: full collections skip its start-up heap
        self._report_load()

    # -- calls ---------------------------------------------------------------------------------------
    async def run(self, model_id: str, adapter: dict | None, rows: list[dict]) -> dict:
        """Compute rows of one adapter. adapter: {"id", "sha256", "blob": [ObjectRef of (bytes, config)]} or None
        (the bare backbone); each row: tenant_id, text or prompt_ids, truncate, normalize, weight, max_length,
        remaining_s (seconds left of its deadline). Returns {"replica": pid, "loaded": did the adapter have to be
        loaded for this call (not held already), "results": per row ("ok", Completion, token ids, metadata) or
        ("error", class name, message)}."""
        adapter_id = adapter["id"] if adapter is not None else None
        was_loaded = adapter_id is None or adapter_id in self._artifacts
        self._arrivals.append((time.monotonic(), len(rows)))
        self._forget_arrivals_before(time.monotonic() - RATE_WINDOW_S)
        if adapter_id is not None:
            self._sources[adapter_id] = adapter
            self._in_flight[adapter_id] += len(rows)
        try:
            if adapter_id is not None:
                try:
                    await self.load_adapter(model_id)
                except Exception as e:  # noqa: BLE001 - every row of the call answers the loading error
                    return self._answer(was_loaded, [failure(e)] * len(rows))
            return self._answer(was_loaded, await self._compute(adapter_id, rows))
        finally:
            if adapter_id is not None:
                self._done(adapter_id, len(rows))

    def _answer(self, was_loaded: bool, results: list) -> dict:
        return {"replica": self.pid, "loaded": not was_loaded, "results": results}

    async def _compute(self, adapter_id: int | None, rows: list[dict]) -> list:
        now = time.monotonic()
        futures, reqs, results = [], [], [None] * len(rows)
        try:
            for i, row in enumerate(rows):
                try:
                    req = Request(tenant_id=row["tenant_id"], adapter_id=adapter_id, deadline=now + row["remaining_s"],
                                  text=row["text"], prompt_ids=row["prompt_ids"], truncate=row["truncate"],
                                  normalize=row["normalize"], weight=row["weight"], max_length=row["max_length"])
                    futures.append(asyncio.wrap_future(self.engine.submit(req)))
                    reqs.append((i, req))
                except Exception as e:  # noqa: BLE001 - this row's error (a full queue, bad input)
                    results[i] = failure(e)
            done = await asyncio.gather(*futures, return_exceptions=True)
        except asyncio.CancelledError:      # the front door cancelled the call (its caller went away)
            for _, req in reqs:
                self.engine.cancel(req.request_id)
            raise
        for (i, req), out in zip(reqs, done):
            results[i] = failure(out) if isinstance(out, BaseException) else (
                "ok", out, list(req.prompt_ids or ()), {k: req.metadata[k] for k in RETURNED_METADATA if k in req.metadata})
        return results

    def load_stats(self) -> dict:
        return {"num_waiting": self.engine.scheduler.num_waiting}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve's custom metric for the autoscaling policy (dispatcher/autoscaling.py): the rows this replica
        received per second over the last RATE_WINDOW_S (its share of the encoder's load)."""
        now = time.monotonic()
        self._forget_arrivals_before(now - RATE_WINDOW_S)
        window = min(RATE_WINDOW_S, max(now - self._started, 1e-3))
        return {"rows_per_s": sum(n for _, n in list(self._arrivals)) / window}

    def _forget_arrivals_before(self, t: float) -> None:
        while self._arrivals and self._arrivals[0][0] < t:
            self._arrivals.popleft()



class DecoderReplica(_Replica):
    """One replica of the decoder: the backbone, its LoRA pool and KV cache, and our generation engine (iteration-level
    scheduling over every sequence on this replica, whatever their adapters). One call per generation request; its
    events stream back as they are produced."""

    def __init__(self, config) -> None:   # config: dispatcher.config.ServerConfig (validated by the front door)
        reserve_cpu_for_steps(config.replica_threads)
        keep_host_heap(config.host_heap_keep_mb)
        self.decoder = DecoderBackbone.load(config.decoder_config(), DeviceContext.create(config.device, config.dtype))
        self._hold_adapters(TieredCache(CacheConfig(host_budget_bytes=config.host_cache_mb << 20), self.decoder.lora,
                                        self._artifact))
        self.engine = generation_engine(config, self.decoder, self.cache).start()
        self.pid = os.getpid()
        freeze_startup_heap()
        self._report_load()

    async def generate(self, model_id: str, adapter: dict | None, row: dict):
        """Generate for one request. adapter as in EncoderReplica.run; row: tenant_id, prompt_ids, max_new_tokens,
        weight, remaining_s, sampling (SamplingParams), ignore_eos. Yields ("accepted", pid) once the engine has queued
        it (or a failure tuple: too long, queue full, the adapter's loading error), then the engine's events
        (GenerationDelta ..., GenerationResult) or a failure tuple. Closing the stream (the front door's caller went
        away) cancels the request: its KV blocks are freed before the next step."""
        adapter_id = adapter["id"] if adapter is not None else None
        if adapter_id is not None:
            self._sources[adapter_id] = adapter
            self._in_flight[adapter_id] += 1
        try:
            try:
                if adapter_id is not None:
                    await self.load_adapter(model_id)
                req = Request(tenant_id=row["tenant_id"], adapter_id=adapter_id,
                              deadline=time.monotonic() + row["remaining_s"], prompt_ids=list(row["prompt_ids"]),
                              max_new_tokens=row["max_new_tokens"], weight=row["weight"])
                stream = await self.engine.submit_async(req, row["sampling"], ignore_eos=row["ignore_eos"])
            except Exception as e:  # noqa: BLE001 - the request's error, mapped by the front door
                yield failure(e)
                return
            try:
                yield ("accepted", self.pid)
                async for event in stream:
                    yield event
            except Exception as e:  # noqa: BLE001
                yield failure(e)
            finally:
                if not stream.is_done:
                    self.engine.cancel(req.request_id)
        finally:
            if adapter_id is not None:
                self._done(adapter_id, 1)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve's custom metric for our autoscaling policy (dispatcher/autoscaling.py, decoder_autoscale): the
        streams on this replica now, running or waiting (Ray averages the reports over its look-back window). Streams
        in flight are the decoder's load: a decode step's cost follows the sequences it runs, and when the replicas
        fall behind the waiting ones count too, so the load shows the demand, not what the replicas managed."""
        return {"streams": float(self.engine.num_pending)}

    def load_stats(self) -> dict:
        stats = self.engine.scheduler.stats()
        staging = self.decoder.kv.staging
        return {**{k: stats[k] for k in ("num_waiting", "num_running", "num_blocks", "num_free_blocks", "num_preempted")},
                "staging_bytes": 0 if staging is None else staging.nbytes}

    def engine_stats(self) -> dict:
        """The generation scheduler's numbers on this replica (waiting, running, KV blocks) and its pid."""
        return {"replica": self.pid, "num_pending": self.engine.num_pending, **self.engine.scheduler.stats()}


def _multiplexed(cls, max_adapters: int):
    """cls with load_adapter under Ray's multiplexed LRU of that size (the decorator's argument: a subclass per size;
    Ray pickles it by value)."""
    return type(f"Multiplexed{cls.__name__}", (cls,), {
        "load_adapter": serve.multiplexed(max_num_models_per_replica=max_adapters)(cls.load_adapter)})


def decoder_deployment(scaleout, server_config):
    """The Ray Serve deployment of DecoderReplica (a fixed replica count, or scaled on the streams in flight by Ray's
    request-based policy or by ours: dispatcher/autoscaling.py), bound to the ServerConfig it loads."""
    return _deployment(DecoderReplica, scaleout, server_config)


def _scaling(scaleout) -> dict:
    """A deployment's replica count: fixed, by Ray's request-based policy (streams), or by our policy (autoscale)."""
    if scaleout.autoscale is not None:
        from .autoscaling import ray_autoscaling_config

        return {"autoscaling_config": ray_autoscaling_config(scaleout.autoscale, scaleout.num_replicas)}
    if scaleout.streams is not None:
        return {"autoscaling_config": scaleout.streams.ray_config(scaleout.num_replicas)}
    return {"num_replicas": scaleout.num_replicas}


def _router(scaleout) -> dict:
    """routing "prefix" (decoders): our request router (dispatcher/prefix_router.py); else Ray's default."""
    if scaleout.routing != "prefix":
        return {}
    from ray.serve.config import RequestRouterConfig

    from .prefix_router import PrefixAffinityRouter

    return {"request_router_config": RequestRouterConfig(
        request_router_class=PrefixAffinityRouter,
        request_router_kwargs={"block_size": scaleout.prefix_block_size, "slack": scaleout.prefix_slack,
                               "sharing": scaleout.prefix_sharing})}


def deployment(scaleout, server_config):
    """The Ray Serve deployment of EncoderReplica for a ScaleOutConfig, bound to the ServerConfig it loads."""
    return _deployment(EncoderReplica, scaleout, server_config)


def _deployment(cls, scaleout, server_config):
    """cls (a replica class) as a Ray Serve deployment named after it: multiplexed adapters, its scaling, health
    checks and drain, bound to the ServerConfig it loads."""
    return serve.deployment(
        _multiplexed(cls, scaleout.max_adapters), name=cls.__name__, **_scaling(scaleout), **_router(scaleout),
        max_ongoing_requests=scaleout.max_ongoing_requests,
        ray_actor_options={"num_cpus": scaleout.cpus},
        health_check_period_s=2, health_check_timeout_s=30, graceful_shutdown_timeout_s=30,
    ).bind(server_config)
