"""Scaling decoder replicas on a real local Ray cluster, by Ray Serve's request-based policy (decoder_max_replicas >
decoder_replicas: a burst of streams above decoder_target_streams per replica makes Ray start a second, which then
serves streams too, every answer equal to the first ones, greedy) and by our predictive policy on the streams the
replicas report (decoder_autoscale: up under the burst, back down once it ends). A module of its own: its
deployment has the same name as test_scaleout_decoder's."""
from __future__ import annotations

import os
import threading
import time

import pytest

pytest.importorskip("ray.serve")

from dispatcher.gen.vbert.v1 import tenant_pb2 as T  # noqa: E402
from tests.dispatcher.conftest import RunningServer, bearer, tiny_server_config  # noqa: E402

pytestmark = pytest.mark.slow


def running_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get("vbert-decoder")
    if app is None:
        return 0
    return app.deployments["DecoderReplica"].replica_states.get("RUNNING", 0)


def test_a_burst_of_streams_scales_the_decoder_replicas_out(tiny_checkpoint, decoder_dir, tmp_path):
    os.environ.pop("RAY_ADDRESS", None)
    s = RunningServer(tiny_server_config(
        tiny_checkpoint, tmp_path / "var", backbones="decoder", decoder=str(decoder_dir), decoder_kv_cache_mb=4,
        decoder_block_size=4, decoder_replicas=1, decoder_max_replicas=2, decoder_target_streams=2,
        decoder_upscale_delay_s=0.5, replica_cpus=0.5, ray_object_store_mb=128))
    try:
        key = s.register("acme", requests_per_s=1e4, burst=10_000)
        req = T.GenerateRequest(prompt="the patient was treated", max_new_tokens=64, temperature=0, ignore_eos=True)

        def tokens():
            return [t for m in s.tenant.Generate(req, metadata=bearer(key), timeout=120) for t in m.token_ids]
        expected = tokens()
        assert len(expected) == 64 and running_replicas() == 1
        results, errors, stop = [], [], threading.Event()

        def caller():
            while not stop.is_set():
                try:
                    results.append(tokens())
                except Exception as e:  # noqa: BLE001 - collected and asserted below
                    errors.append(e)
        callers = [threading.Thread(target=caller) for _ in range(8)]   # 8 streams in flight, target 2 per replica
        for t in callers:
            t.start()
        deadline = time.monotonic() + 120
        while running_replicas() < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        scaled = running_replicas()
        served_by = set(s.app.generation.stats.rows_per_replica)
        deadline = time.monotonic() + 60                   # the new replica takes streams too
        while len(served_by) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
            served_by = set(s.app.generation.stats.rows_per_replica)
        stop.set()
        for t in callers:
            t.join(120)
        assert scaled == 2
        assert len(served_by) == 2, s.app.generation.stats.rows_per_replica
        assert not errors, errors[:3]
        assert results and all(r == expected for r in results)
    finally:
        s.stop()


def test_our_predictive_policy_scales_the_decoder_replicas_on_streams_up_and_back_down(tiny_checkpoint, decoder_dir,
                                                                                       tmp_path):
    """decoder_autoscale = predictive: the replicas report their streams in flight, our policy in Ray's controller
    decides once per interval (here 1 s) at decoder_target_streams per replica."""
    os.environ.pop("RAY_ADDRESS", None)
    s = RunningServer(tiny_server_config(
        tiny_checkpoint, tmp_path / "var", backbones="decoder", decoder=str(decoder_dir), decoder_kv_cache_mb=4,
        decoder_block_size=4, decoder_replicas=1, decoder_max_replicas=2, decoder_target_streams=2,
        decoder_autoscale="predictive", autoscale_interval_s=1, autoscale_day_s=48, replica_cpus=0.5,
        ray_object_store_mb=128))
    try:
        from ray import serve

        policy = serve.status().applications["vbert-decoder"].deployments["DecoderReplica"]
        assert running_replicas() == 1, policy
        key = s.register("acme", requests_per_s=1e4, burst=10_000)
        req = T.GenerateRequest(prompt="the patient was treated", max_new_tokens=64, temperature=0, ignore_eos=True)
        errors, stop, answered = [], threading.Event(), []

        def caller():
            while not stop.is_set():
                try:
                    answered.append(len([t for m in s.tenant.Generate(req, metadata=bearer(key), timeout=120)
                                         for t in m.token_ids]))
                except Exception as e:  # noqa: BLE001 - collected and asserted below
                    errors.append(e)
        callers = [threading.Thread(target=caller) for _ in range(8)]   # 8 streams, 2 per replica: the max, 2
        for t in callers:
            t.start()
        try:
            deadline = time.monotonic() + 120
            while running_replicas() < 2 and time.monotonic() < deadline:
                time.sleep(0.5)
            scaled = running_replicas()
        finally:
            stop.set()
            for t in callers:
                t.join(120)
        assert scaled == 2, "the policy did not add the second decoder replica"
        assert not errors, errors[:3]
        assert answered and set(answered) == {64}
        deadline = time.monotonic() + 90                # no streams: back to decoder_min_replicas
        while running_replicas() > 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert running_replicas() == 1, "the policy did not let the second decoder replica go"
        out = [t for m in s.tenant.Generate(req, metadata=bearer(key), timeout=120) for t in m.token_ids]
        assert len(out) == 64
    finally:
        s.stop()
