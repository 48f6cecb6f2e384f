"""The front door's handling of replica faults, without a cluster: ReplicaEngine against a stand-in for Ray's
deployment handle (Ray's own object, not ours, is what is replaced) that answers, fails as a dead replica does
(ActorDiedError), or hangs until cancelled. test_scaleout.py kills real replicas on a real cluster."""
from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import grpc
import pytest

pytest.importorskip("ray.serve")

from ray.exceptions import ActorDiedError  # noqa: E402

from dispatcher.config import ScaleOutConfig  # noqa: E402
from dispatcher.errors import UnavailableError, status_of  # noqa: E402
from dispatcher.scaleout import AdapterFiles, RayLease, ReplicaEngine, row_error  # noqa: E402
from scheduler.engine import (Completion, DeadlineExceededError, EngineStoppedError,  # noqa: E402
                              RequestCancelledError, RequestFailedError)
from scheduler.policy import QueueFullError  # noqa: E402
from scheduler.types import Request  # noqa: E402


class Response:
    def __init__(self, outcome):
        self.outcome, self.cancelled = outcome, False

    def __await__(self):
        return self._wait().__await__()

    async def _wait(self):
        if self.outcome == "hang":
            await asyncio.sleep(3600)
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def cancel(self):
        self.cancelled = True


class Handle:
    """Ray's DeploymentHandle as ReplicaEngine uses it: options(...).run.remote(model_id, adapter, rows)."""

    def __init__(self, outcomes):
        self.outcomes, self.calls, self.responses = list(outcomes), [], []
        self.run = self

    def options(self, **kw):
        return self

    def remote(self, model_id, adapter, rows):
        self.calls.append(rows)
        outcome = self.outcomes.pop(0)
        response = Response(outcome(rows) if callable(outcome) else outcome)
        self.responses.append(response)
        return response


def answer(rows):
    return {"replica": 4242, "loaded": False, "results": [
        ("ok", Completion(i, f"out{i}", 3, 0.0, 0.0, 0.0, 1), [101, 7, 102], {"offsets": [(0, 0), (0, 1), (0, 0)]})
        for i, _ in enumerate(rows)]}


def engine(outcomes, **kw) -> tuple[ReplicaEngine, Handle]:
    handle = Handle(outcomes)
    return ReplicaEngine(ScaleOutConfig(2, retry_after_s=0.5, **kw), handle, AdapterFiles(None, 1 << 20),
                         RayLease()).start(), handle


@contextlib.contextmanager
def one_call(eng: ReplicaEngine):
    """Hold the engine's loop thread while the block submits: everything submitted goes out in one call per
    adapter (as the rows of one RPC do when the loop thread is busy)."""
    release = threading.Event()
    eng._loop.call_soon_threadsafe(release.wait)
    try:
        yield
    finally:
        release.set()


def request(deadline_s=30.0) -> Request:
    return Request(tenant_id=1, adapter_id=None, deadline=time.monotonic() + deadline_s, text="a text")


def test_a_call_that_meets_a_dead_replica_is_sent_once_more_and_answered():
    eng, handle = engine([ActorDiedError(), answer])
    req = request()
    completion = eng.submit(req).result(10)
    assert completion.output == "out0" and req.prompt_ids == [101, 7, 102] and req.metadata["replica"] == 4242
    assert req.metadata["offsets"] == [(0, 0), (0, 1), (0, 0)]
    assert len(handle.calls) == 2 and eng.stats.retries == 1 and eng.num_pending == 0
    eng.stop()


def test_two_dead_replicas_in_a_row_answer_unavailable_with_a_retry_hint():
    eng, handle = engine([ActorDiedError(), ActorDiedError()])
    with one_call(eng):
        futures = [eng.submit(request()) for _ in range(3)]
    for fut in futures:
        with pytest.raises(UnavailableError) as e:
            fut.result(10)
        code, message, retry = status_of(e.value)
        assert code is grpc.StatusCode.UNAVAILABLE and retry == 0.5 and "retry" in message
    assert len(handle.calls) == 2 and len(handle.calls[0]) == 3 and eng.stats.unavailable == 3
    assert eng.num_pending == 0
    eng.stop()


def test_row_errors_come_back_as_the_edge_s_own_classes():
    assert isinstance(row_error("DeadlineExceededError", "late"), DeadlineExceededError)
    assert isinstance(row_error("QueueFullError", "full"), QueueFullError)
    unknown = row_error("ZeroDivisionError", "boom")
    assert isinstance(unknown, RequestFailedError) and "ZeroDivisionError: boom" in str(unknown)
    eng, _ = engine([lambda rows: {"replica": 1, "loaded": True, "results": [
        ("error", "QueueFullError", "tenant 1 has 1000 requests waiting"), *answer(rows[1:])["results"]]}])
    with one_call(eng):
        first, second = eng.submit(request()), eng.submit(request())
    with pytest.raises(QueueFullError, match="1000 requests"):
        first.result(10)
    assert second.result(10).output == "out0"
    assert eng.stats.adapter_calls == 0     # the bare backbone: no adapter to find loaded
    eng.stop()


def test_cancelling_every_request_of_a_call_cancels_the_call():
    eng, handle = engine(["hang"])
    reqs = [request(), request()]
    with one_call(eng):
        futures = [eng.submit(r) for r in reqs]
    deadline = time.monotonic() + 10
    while not handle.responses and time.monotonic() < deadline:
        time.sleep(0.01)
    assert eng.cancel(reqs[0].request_id)
    time.sleep(0.1)
    assert not handle.responses[0].cancelled        # the other request still waits for the call
    assert eng.cancel(reqs[1].request_id) and not eng.cancel(reqs[1].request_id)
    for fut in futures:
        with pytest.raises(RequestCancelledError):
            fut.result(1)
    while not handle.responses[0].cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert handle.responses[0].cancelled and eng.num_pending == 0
    eng.stop()


def test_an_expired_request_is_not_sent_and_a_stopped_engine_refuses():
    eng, handle = engine([answer])
    with pytest.raises(DeadlineExceededError):
        eng.submit(request(deadline_s=-1)).result(10)
    assert handle.calls == []
    eng.stop()
    with pytest.raises(EngineStoppedError):
        eng.submit(request())


def test_scale_out_settings_are_validated_and_read_from_the_environment(tiny_checkpoint, tmp_path):
    from dispatcher.config import ServerConfig

    base = {"data_dir": str(tmp_path), "backbone": str(tiny_checkpoint), "backbones": "encoder"}
    config = ServerConfig.load(None, {"VBERT_REPLICAS": "3", "VBERT_REPLICA_ROUTING": "any",
                                      "VBERT_RAY_ADDRESS": "10.0.0.5:6379"}, base)
    so = config.scaleout_config()
    assert (so.num_replicas, so.routing, so.address, so.max_adapters) == (3, "any", "10.0.0.5:6379", 64)
    assert ServerConfig(**base).scaleout_config() is None
    both = ServerConfig.load(None, {"VBERT_REPLICAS": "2", "VBERT_DECODER_REPLICAS": "3"},
                             {**base, "backbones": "encoder,decoder"})
    dec = both.decoder_scaleout_config()
    assert (dec.num_replicas, dec.app_name, dec.autoscale) == (3, "vbert-decoder", None)
    assert dec.local_cpus == both.scaleout_config().local_cpus == 5.0     # a local cluster sized for both
    assert ServerConfig(**base).decoder_scaleout_config() is None
    assert dec.streams is None                                            # a fixed count unless a maximum is set
    scaled = ServerConfig(**{**base, "backbones": "decoder", "decoder_replicas": 2, "decoder_max_replicas": 4,
                             "decoder_target_streams": 8}).decoder_scaleout_config()
    assert scaled.streams.ray_config(2) == {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 2,
                                            "target_ongoing_requests": 8, "upscale_delay_s": 30.0,
                                            "downscale_delay_s": 600.0}
    assert scaled.local_cpus == 4.0                                       # room for the most replicas
    assert (scaled.routing, scaled.prefix_slack, scaled.prefix_block_size, scaled.prefix_sharing) == \
        ("prefix", 4, 16, "tenant")                                       # the decoder's routing: prefix by default
    routed = ServerConfig(**{**base, "backbones": "decoder", "decoder_replicas": 2, "decoder_routing": "adapter",
                             "decoder_routing_slack": 9, "decoder_block_size": 8,
                             "generation_prefix_sharing": "global"}).decoder_scaleout_config()
    assert (routed.routing, routed.prefix_slack, routed.prefix_block_size, routed.prefix_sharing) == \
        ("adapter", 9, 8, "global")
    for bad, match in (({"replicas": -1}, "replicas must be >= 0"), ({"replica_routing": "nearest"}, "replica_routing"),
                       ({"replica_routing": "prefix"}, "replica_routing"),     # the encoder has no prefix cache
                       ({"decoder_routing": "nearest"}, "decoder_routing"),
                       ({"decoder_routing_slack": -1}, "decoder_routing_slack"),
                       ({"replicas": 2, "backbones": "decoder"}, "loads no encoder"),
                       ({"decoder_replicas": 2}, "loads no decoder"),
                       ({"decoder_replicas": -1, "backbones": "decoder"}, "decoder_replicas must be >= 0"),
                       ({"decoder_max_replicas": 2, "backbones": "decoder"}, "set decoder_replicas"),
                       ({"decoder_replicas": 3, "decoder_max_replicas": 2, "backbones": "decoder"}, "must lie within"),
                       ({"decoder_replicas": 1, "decoder_max_replicas": 2, "decoder_target_streams": 0,
                         "backbones": "decoder"}, "decoder_target_streams"),
                       ({"replica_threads": 0}, "replica_threads"), ({"ray_address": " "}, "ray_address")):
        with pytest.raises(ValueError, match=match):
            ServerConfig(**{**base, **bad})


def test_the_single_process_server_never_imports_ray(tiny_checkpoint, tmp_path):
    import subprocess
    import sys

    code = ("import sys; from dispatcher.app import App; from dispatcher.config import ServerConfig; "
            f"app = App.create(ServerConfig(data_dir={str(tmp_path)!r}, backbone={str(tiny_checkpoint)!r}, "
            "backbones='encoder', device='cpu', lora_slots=4, bottleneck_slots=4, max_lora_rank=8, "
            "max_bottleneck_size=16, max_labels=8, admin_token='t')); app.start(); app.close(); "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
