"""dispatcher/heap.py: the start-up heap frozen out of full collections; every collection's pause timed into the
server's metrics while the app runs (and the callback gone once it stops)."""
from __future__ import annotations

import gc
import weakref

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from dispatcher.heap import GC_PAUSE_BUCKETS, GcPauses, freeze_startup_heap
from tests.dispatcher.conftest import RunningServer, tiny_server_config


class _Marker:
    """A tracked object the collector's lists can be searched for."""


@pytest.fixture
def unfrozen():
    yield
    gc.unfreeze()      # the rest of the test process collects as before


def _tracked(obj) -> bool:
    return any(o is obj for o in gc.get_objects())


def test_freeze_moves_what_exists_out_of_the_collectors_passes(unfrozen):
    before = _Marker()
    assert _tracked(before)
    num = freeze_startup_heap()
    assert 0 < gc.get_freeze_count() <= num    # frozen objects still die by reference count (other threads run)
    after = _Marker()
    assert not _tracked(before) and _tracked(after)     # frozen objects are not walked; new ones are
    # a cycle made after the freeze is still collected
    cycle = [_Marker()]
    cycle.append(cycle)
    ref = weakref.ref(cycle[0])
    del cycle
    gc.collect()
    assert ref() is None


def _counts(registry) -> dict[str, float]:
    out = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == "vbert_gc_pause_seconds_count":
                out[sample.labels["generation"]] = sample.value
    return out


def test_gc_pauses_are_timed_by_generation_until_removed():
    registry = CollectorRegistry()
    pauses = GcPauses.into_histogram(Histogram("vbert_gc_pause_seconds", "x", ["generation"], buckets=GC_PAUSE_BUCKETS,
                                               registry=registry))
    pauses.install().install()                        # twice: one callback
    try:
        assert sum(cb == pauses._callback for cb in gc.callbacks) == 1
        gc.collect(2)
        gc.collect(1)
        counts = _counts(registry)
        assert counts["2"] >= 1 and counts["1"] >= 1
    finally:
        pauses.remove()
    assert pauses._callback not in gc.callbacks
    gc.collect(2)
    assert _counts(registry) == counts                # nothing timed once removed


def test_a_running_server_times_its_collections(tiny_checkpoint, tmp_path):
    s = RunningServer(tiny_server_config(tiny_checkpoint, tmp_path / "var"))
    try:
        gc.collect(2)
        body = generate_latest(s.app.metrics.registry).decode()
        assert 'vbert_gc_pause_seconds_count{generation="2"}' in body
        assert s.app.metrics.gc_pauses._callback in gc.callbacks
    finally:
        s.stop()
    assert s.app.metrics.gc_pauses._callback not in gc.callbacks
