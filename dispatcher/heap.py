"""The server process's Python heap: what start-up made is frozen out of the garbage collector's full passes, and
every collection's pause is timed (a metric).

A full (generation 2) collection stops every Python thread while it walks every tracked object. After start-up
the heap holds about half a million of them (torch, transformers, grpc, the models' modules), and on this
project's 2-core machine such a pass took 250-450 ms, once a minute or so under load: longer than the encoder's
latency target, landing on whichever requests were in flight. Those objects live as long as the process, so
`freeze_startup_heap` moves them to the collector's permanent generation (`gc.freeze`) once the server is up;
full passes then walk only what serving made (about 9 ms measured). Objects are still freed by reference
counting; only cycles among frozen objects are never collected, and start-up makes none worth collecting
(`gc.collect()` runs first).
"""
from __future__ import annotations

import gc
import threading
import time
from typing import Callable

GC_PAUSE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


def freeze_startup_heap() -> int:
    """Collect, then freeze every object alive now (gc.freeze); returns how many are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class GcPauses:
    """Times every garbage collection (gc.callbacks): observe(generation, seconds) once per collection, in the
    collecting thread. install() once, remove() when done (a callback keeps this object, and what `observe`
    holds, alive)."""

    def __init__(self, observe: Callable[[int, float], None]):
        self.observe = observe
        self._started = threading.local()

    @classmethod
    def into_histogram(cls, histogram) -> "GcPauses":
        """Into a prometheus_client Histogram labelled by "generation"."""
        return cls(lambda generation, seconds: histogram.labels(generation=str(generation)).observe(seconds))

    def install(self) -> "GcPauses":
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)
        return self

    def remove(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        now = time.perf_counter()
        if phase == "start":
            self._started.t = now
            return
        started = getattr(self._started, "t", None)
        if started is not None:
            self._started.t = None
            self.observe(info["generation"], now - started)
