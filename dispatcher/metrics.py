"""Prometheus metrics on their own port. No per-tenant labels on histograms (cardinality)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .heap import GC_PAUSE_BUCKETS, GcPauses

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.rpc_seconds = Histogram("vbert_rpc_duration_seconds", "RPC duration", ["method", "code"],
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.queue_seconds = Histogram("vbert_queue_seconds", "time a request waited before its step",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram("vbert_batch_rows", "rows per step", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
                                    registry=r)
        self.batch_tokens = Histogram("vbert_batch_tokens", "tokens per step",
                                      buckets=(16, 64, 256, 1024, 4096, 8192, 16384, 65536), registry=r)
        self.step_seconds = Histogram("vbert_step_compute_seconds", "compute time per step",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.inputs = Counter("vbert_inputs_total", "inputs served", ["method"], registry=r)
        # generation (the decoder's step loop)
        self.generation_tokens = Counter("vbert_generation_tokens_total", "decoder tokens computed or generated",
                                         ["kind"], registry=r)   # prompt (prefill and recompute), generated
        self.generation_requests = Counter("vbert_generation_requests_total", "generation requests finished",
                                           ["finish_reason"], registry=r)
        self.time_to_first_token = Histogram("vbert_time_to_first_token_seconds",
                                             "arrival -> first generated token", buckets=LATENCY_BUCKETS, registry=r)
        self.time_per_output_token = Histogram("vbert_time_per_output_token_seconds",
                                               "mean time between a request's generated tokens after the first",
                                               buckets=TOKEN_BUCKETS, registry=r)
        self.generation_step_seconds = Histogram("vbert_generation_step_seconds", "compute time per decoder step",
                                                 buckets=LATENCY_BUCKETS, registry=r)
        self.generation_step_rows = Histogram("vbert_generation_step_rows", "sequences per decoder step",
                                              buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        # structured output: requests accepted with a grammar, and the edge's time to compile one
        self.structured_requests = Counter("vbert_generation_structured_requests_total",
                                           "generation requests accepted with a grammar (structured output)", ["kind"],
                                           registry=r)
        self.structured_compile_seconds = Histogram("vbert_structured_compile_seconds",
                                                    "compiling a request's grammar at the edge (its check)",
                                                    buckets=LATENCY_BUCKETS, registry=r)
        # the Python garbage collector's stop-the-world pauses (dispatcher/heap.py), installed while the app runs
        self.gc_pauses = GcPauses.into_histogram(Histogram(
            "vbert_gc_pause_seconds", "pause of one Python garbage collection", ["generation"], buckets=GC_PAUSE_BUCKETS,
            registry=r))
        self._sources = {}

    def watch(self, cache=None, scheduler=None, skip=None, generation=None, staging=None, replicas=None) -> None:
        """Read cache counters, queue depths, skip-mode table counters, the KV cache, its decode staging and
        (replicas: {backbone: the front door's engine for its Ray Serve replicas}) the replicas' counts and calls
        when scraped."""
        self._sources = {"cache": cache, "scheduler": scheduler, "skip": skip, "generation": generation,
                         "staging": staging, "replicas": replicas or {}}
        self.registry.register(_LiveCollector(self._sources))

    def on_step(self, batch, output) -> None:
        self.batch_rows.observe(batch.num_rows)
        self.batch_tokens.observe(batch.num_tokens)
        self.step_seconds.observe(output.compute_s)

    def on_generation_step(self, batch, output) -> None:
        self.generation_step_rows.observe(batch.num_rows)
        self.generation_step_seconds.observe(output.compute_s)
        generated = sum(r.new_token_id is not None for r in output.results)
        self.generation_tokens.labels(kind="prompt").inc(batch.num_tokens - generated)
        self.generation_tokens.labels(kind="generated").inc(generated)

    def on_generation_finish(self, request, result) -> None:
        self.generation_requests.labels(finish_reason=result.finish_reason.value).inc()
        if result.num_generated_tokens:
            self.time_to_first_token.observe(result.time_to_first_token_s)
        if result.num_generated_tokens > 1:
            self.time_per_output_token.observe(result.time_per_output_token_s)

    def serve(self, host: str, port: int):
        if port:
            return start_http_server(port, addr=host, registry=self.registry)
        return None


class _LiveCollector:
    def __init__(self, sources):
        self.sources = sources

    def collect(self):
        cache, scheduler = self.sources.get("cache"), self.sources.get("scheduler")
        if cache is not None:
            stats = cache.stats()
            for name, help_text in (("hits", "adapter cache hits"), ("misses", "adapter cache misses"),
                                    ("evictions", "adapter cache evictions"), ("loads", "adapter loads")):
                c = CounterMetricFamily(f"vbert_adapter_cache_{name}", help_text, labels=["tier"])
                for tier in ("device", "host", "disk"):
                    c.add_metric([tier], stats[tier].get(name, 0))
                yield c
            g = GaugeMetricFamily("vbert_resident_adapters", "adapters resident per tier", labels=["tier"])
            g.add_metric(["device"], stats["device"]["resident"])
            g.add_metric(["host"], stats["host"]["resident"])
            yield g
        if scheduler is not None:
            g = GaugeMetricFamily("vbert_queue_depth", "requests waiting in the engine")
            g.add_metric([], scheduler.num_waiting)
            yield g
        generation = self.sources.get("generation")
        if generation is not None:
            stats = generation.stats()
            for name, help_text, value in (
                    ("vbert_generation_queue_depth", "generation requests waiting", stats["num_waiting"]),
                    ("vbert_generation_running", "generation requests running", stats["num_running"]),
                    ("vbert_kv_cache_blocks_free", "free KV cache blocks", stats["num_free_blocks"]),
                    ("vbert_kv_cache_blocks", "KV cache blocks in all", stats["num_blocks"]),
                    ("vbert_kv_cache_blocks_cached", "KV cache blocks registered for prefix reuse (held or free)",
                     stats["num_cached_blocks"])):
                g = GaugeMetricFamily(name, help_text)
                g.add_metric([], value)
                yield g
            for name, help_text, value in (
                    ("vbert_generation_preemptions", "running requests preempted for KV blocks (recomputed later)",
                     stats["num_preempted"]),
                    ("vbert_prefix_cache_queried_tokens", "tokens looked up in the prefix cache at admission",
                     stats["num_prefix_queried_tokens"]),
                    ("vbert_prefix_cache_hit_tokens", "of those, tokens whose K/V came from the prefix cache",
                     stats["num_prefix_hit_tokens"]),
                    ("vbert_kv_cache_evicted_blocks", "cached KV blocks evicted to make room",
                     stats["num_evicted_blocks"])):
                c = CounterMetricFamily(name, help_text)
                c.add_metric([], value)
                yield c
        staging = self.sources.get("staging")
        if staging is not None:
            g = GaugeMetricFamily("vbert_kv_staging_bytes", "memory of the decode staging (the running decode rows' "
                                  "K/V kept contiguous; at most decoder_staging_mb)")
            g.add_metric([], staging.nbytes)
            yield g
            for name, help_text, value in (
                    ("vbert_kv_staging_fills", "sequences copied from their KV blocks into the decode staging",
                     staging.num_fills),
                    ("vbert_kv_staging_fallbacks", "decode steps that read the KV blocks: the staging would have "
                     "exceeded decoder_staging_mb", staging.num_fallbacks)):
                c = CounterMetricFamily(name, help_text)
                c.add_metric([], value)
                yield c
        yield from _replica_metrics(self.sources.get("replicas") or {})
        skip = self.sources.get("skip")
        if skip is not None:
            stats = skip.stats()
            rate = GaugeMetricFamily("vbert_skip_table_hit_rate",
                                     "share of distinct n-gram lookups served from the table or miss cache",
                                     labels=["table"])
            for table, st in stats.items():
                rate.add_metric([table], st["hit_rate"])
            yield rate
            size = GaugeMetricFamily("vbert_skip_miss_cache_entries", "computed n-grams held in the miss cache "
                                     "(restored at start when the cache is kept across restarts)", labels=["table"])
            for table, st in stats.items():
                size.add_metric([table], st["cache"]["size"])
            yield size
            for key, help_text in (("tokens", "tokens whose lower layers came from skip mode"),
                                   ("lookups", "distinct n-gram lookups"), ("table_hits", "n-gram table hits"),
                                   ("cache_hits", "n-gram miss cache hits"),
                                   ("computed", "n-grams computed by the shallow layers (exact)"),
                                   ("fallback", "n-grams served by a bigram/unigram entry (approximate)")):
                c = CounterMetricFamily(f"vbert_skip_{key}", help_text, labels=["table"])
                for table, st in stats.items():
                    c.add_metric([table], st[key])
                yield c


def _replica_metrics(engines: dict):
    """Per backbone on Ray Serve replicas: the replicas by state, the requests out to them, and the front door's calls,
    retries after a lost replica and requests answered UNAVAILABLE."""
    if not engines:
        return
    states = GaugeMetricFamily("vbert_replicas", "Ray Serve replicas by state", labels=["backbone", "state"])
    pending = GaugeMetricFamily("vbert_replica_requests_in_flight", "requests out to the replicas",
                                labels=["backbone"])
    counters = {name: CounterMetricFamily(f"vbert_replica_{name}", help_text, labels=["backbone"]) for name, help_text in (
        ("calls", "Ray calls to the replicas"), ("retries", "calls sent again after their replica was lost"),
        ("unavailable", "requests answered UNAVAILABLE (no replica answered)"))}
    for backbone, engine in engines.items():
        for state, n in engine.replica_states().items():
            states.add_metric([backbone, state], n)
        pending.add_metric([backbone], engine.num_pending)
        for name, c in counters.items():
            c.add_metric([backbone], getattr(engine.stats, name))
    yield states
    yield pending
    yield from counters.values()
    routed = [(backbone, engine.routed_counts()) for backbone, engine in engines.items()]
    if any(counts is not None for _, counts in routed):
        for key, help_text in (("routed", "choices of a replica by the prompt's prefix (a request that waits for room "
                                          "in the replicas' queues may be chosen for again)"),
                               ("to_cached_prefix", "of those, a replica that held part of the prefix")):
            c = CounterMetricFamily(f"vbert_prefix_{key}", help_text, labels=["backbone"])
            for backbone, counts in routed:
                if counts is not None:
                    c.add_metric([backbone], counts[key])
            yield c
    yield from _replica_loads(engines)


REPLICA_LOADS = (("num_waiting", "vbert_replica_queue_depth", "requests waiting in a replica's engine"),
                 ("num_running", "vbert_replica_generation_running", "generation requests running on a replica"),
                 ("num_blocks", "vbert_replica_kv_cache_blocks", "KV cache blocks of a replica, in all"),
                 ("num_free_blocks", "vbert_replica_kv_cache_blocks_free", "free KV cache blocks of a replica"),
                 ("staging_bytes", "vbert_replica_kv_staging_bytes", "memory of a replica's decode staging"))


def _replica_loads(engines: dict):
    """Per replica (its pid), what its engine reported last (dispatcher/replica_load.py): waiting, and for the decoder
    running and KV blocks; preemptions as a counter."""
    gauges = {key: GaugeMetricFamily(name, help_text, labels=["backbone", "replica"])
              for key, name, help_text in REPLICA_LOADS}
    preempted = CounterMetricFamily("vbert_replica_generation_preemptions", "running requests preempted for KV "
                                    "blocks on a replica", labels=["backbone", "replica"])
    for backbone, engine in engines.items():
        for replica, stats in sorted(engine.replica_loads().items()):
            for key, g in gauges.items():
                if key in stats:
                    g.add_metric([backbone, replica], stats[key])
            if "num_preempted" in stats:
                preempted.add_metric([backbone, replica], stats["num_preempted"])
    yield from gauges.values()
    yield preempted
