"""Autoscaling the encoder's replicas: dispatcher/autoscaling.py's policy (with Ray Serve's own AutoscalingContext)
and, on a real local Ray cluster, a server whose replica count follows its load up and back down."""
from __future__ import annotations

import json
import os
import threading
import time

import pytest

pytest.importorskip("ray.serve")

from ray.serve._private.common import DeploymentID, ReplicaID  # noqa: E402
from ray.serve.config import AutoscalingContext  # noqa: E402

from dispatcher.autoscaling import ReplicaAutoscaler, ray_autoscaling_config  # noqa: E402
from dispatcher.config import ServerConfig  # noqa: E402
from dispatcher.gen.vbert.v1 import tenant_pb2 as T  # noqa: E402
from tests.conftest import classify, make_artifact  # noqa: E402
from tests.dispatcher.conftest import RunningServer, bearer, tiny_server_config  # noqa: E402

DEP = DeploymentID(name="EncoderReplica", app_name="vbert-encoder")


def context(target: int, running: int, rows_per_s: list[float], metric: str = "rows_per_s",
            other: dict | None = None) -> AutoscalingContext:
    """Ray's context as the controller builds it: the replicas' reports of `metric` (and any `other` metrics),
    target and running counts."""
    ids = [ReplicaID(f"r{i}", DEP) for i in range(max(running, len(rows_per_s)))]
    reports = {metric: dict(zip(ids, rows_per_s)), **{k: dict(zip(ids, v)) for k, v in (other or {}).items()}}
    return AutoscalingContext(
        deployment_id=DEP, deployment_name=DEP.name, app_name=DEP.app_name, current_num_replicas=running,
        target_num_replicas=target, running_replicas=ids[:running], total_num_requests=0.0, total_queued_requests=0.0,
        aggregated_metrics=reports, raw_metrics={},
        capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=10, policy_state={},
        last_scale_up_time=None, last_scale_down_time=None, current_time=None, config=None)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_the_policy_decides_once_per_interval_on_the_mean_of_the_summed_reports():
    clock = Clock()
    policy = ReplicaAutoscaler("predictive", capacity_rps=10, interval_s=5, day_s=100, min_replicas=1,
                               max_replicas=4, clock=clock)
    assert policy(context(1, 1, [4.0]))[0] == 1           # the first call starts the interval
    for _ in range(4):
        clock.t += 1
        assert policy(context(1, 1, [20.0, 6.0]))[0] == 1  # held until the interval ends
    clock.t += 1.5
    want, state = policy(context(1, 1, [20.0, 6.0]))
    # samples 4, 26, 26, 26, 26, 26 -> mean 22.33 rows/s; before two days of history: the last load x 1.1 -> 3
    assert want == 3 and state["load"] == pytest.approx(22.33, abs=0.01) and state["intervals"] == 1
    clock.t += 1
    assert policy(context(3, 1, [0.0]))[0] == 3           # held again until the next interval


def test_the_policy_stays_within_its_bounds_and_measures_the_replica_start_time():
    clock = Clock()
    policy = ReplicaAutoscaler("predictive", capacity_rps=1, interval_s=2, day_s=48, min_replicas=2,
                               max_replicas=3, clock=clock)
    policy(context(2, 2, [0.0]))
    clock.t += 2
    assert policy(context(2, 2, [100.0]))[0] == 3          # 110 replicas wanted: the max
    clock.t += 2
    assert policy(context(3, 2, [0.0]))[0] == 2            # load gone: the min, not 1
    clock.t += 3                                           # the third replica runs 5 s after it was asked for
    policy(context(2, 3, [0.0]))
    assert policy.start_s == pytest.approx(5.0) and policy.policy.lead == 3


def test_the_history_seeds_the_forecast_so_it_predicts_from_the_first_interval():
    per_day, capacity = 24, 10.0
    history = [capacity * (2 + (i % per_day >= 12)) for i in range(2 * per_day)]   # 2 replicas, then 3 for half a day
    clock = Clock()
    policy = ReplicaAutoscaler("predictive", capacity_rps=capacity, interval_s=1, day_s=per_day, min_replicas=1,
                               max_replicas=8, history=history, clock=clock)
    policy(context(2, 2, [15.0]))
    for k in range(11):                                   # the day's first half at 1.5 replicas' load
        clock.t += 1
        want, _ = policy(context(2, 2, [15.0]))
    assert want == 3          # ahead of the second half: the season says 3 replicas are coming (reactive says 2)


def test_on_decoder_replicas_the_policy_counts_streams_in_flight():
    clock = Clock()
    policy = ReplicaAutoscaler("predictive", capacity_rps=16, interval_s=2, day_s=48, min_replicas=1, max_replicas=4,
                               clock=clock, metric="streams")
    policy(context(1, 1, [40.0], metric="streams", other={"rows_per_s": [1.0]}))
    clock.t += 2
    want, state = policy(context(1, 1, [40.0, 20.0], metric="streams", other={"rows_per_s": [1.0, 1.0]}))
    # 40 then 60 streams in flight (not the 2 rows/s): 50 x 1.1 (no history yet) at 16 per replica: 4 replicas
    assert want == 4 and state["metric"] == "streams" and state["load"] == pytest.approx(50.0)


def test_bad_policy_settings_are_refused_with_their_name(tmp_path):
    with pytest.raises(ValueError, match="unknown autoscaling policy"):
        ReplicaAutoscaler("magic", 1, 1, 10, 1, 2)
    with pytest.raises(ValueError, match="replica_capacity_rps"):
        ServerConfig(data_dir=str(tmp_path), replicas=1, autoscale="predictive")
    with pytest.raises(ValueError, match="set replicas >= 1"):
        ServerConfig(data_dir=str(tmp_path), autoscale="predictive", replica_capacity_rps=5)
    with pytest.raises(ValueError, match="within min_replicas"):
        ServerConfig(data_dir=str(tmp_path), replicas=3, max_replicas=2, autoscale="reactive", replica_capacity_rps=5)
    bad = tmp_path / "history.json"
    bad.write_text('{"not": "a list"}')
    with pytest.raises(ValueError, match="autoscale_history"):
        ServerConfig(data_dir=str(tmp_path), replicas=1, autoscale="predictive", replica_capacity_rps=5,
                     autoscale_history=str(bad))
    good = tmp_path / "ok.json"
    good.write_text(json.dumps([1, 2.5]))
    config = ServerConfig(data_dir=str(tmp_path), replicas=1, max_replicas=3, autoscale="predictive",
                          replica_capacity_rps=5, autoscale_history=str(good)).scaleout_config()
    ray_config = ray_autoscaling_config(config.autoscale, config.num_replicas)
    assert ray_config["policy"]["policy_kwargs"]["history"] == [1.0, 2.5]
    assert (ray_config["min_replicas"], ray_config["max_replicas"], ray_config["initial_replicas"]) == (1, 3, 1)


def test_decoder_autoscale_settings_make_our_policy_scale_the_decoder_replicas_on_streams(tmp_path):
    history = tmp_path / "streams.json"
    history.write_text(json.dumps([8, 20]))
    config = ServerConfig(data_dir=str(tmp_path), backbones="decoder", decoder_replicas=2, decoder_max_replicas=5,
                          decoder_target_streams=8, decoder_autoscale="predictive", autoscale_interval_s=20,
                          decoder_autoscale_history=str(history))
    dec = config.decoder_scaleout_config()
    assert dec.streams is None                       # not Ray's request-based policy: ours
    ray_config = ray_autoscaling_config(dec.autoscale, dec.num_replicas)
    kwargs = ray_config["policy"]["policy_kwargs"]
    assert (kwargs["metric"], kwargs["capacity_rps"], kwargs["history"], kwargs["interval_s"]) == ("streams", 8, [8, 20],
                                                                                                  20)
    assert (ray_config["min_replicas"], ray_config["max_replicas"], ray_config["initial_replicas"]) == (1, 5, 2)
    assert dec.metrics_push_s == 5.0                 # replicas report every interval / 4 (Ray's default: 10 s)
    # the encoder's policy alone also makes both deployments' replicas report often
    both = ServerConfig(data_dir=str(tmp_path), backbones="encoder,decoder", replicas=1, decoder_replicas=1,
                        autoscale="reactive", replica_capacity_rps=5, autoscale_interval_s=4)
    assert both.scaleout_config().metrics_push_s == both.decoder_scaleout_config().metrics_push_s == 1.0
    assert both.decoder_scaleout_config().autoscale is None
    base = {"data_dir": str(tmp_path), "backbones": "decoder"}
    for bad, match in (({"decoder_autoscale": "magic", "decoder_replicas": 1}, "decoder_autoscale 'magic'"),
                       ({"decoder_autoscale": "predictive"}, "set decoder_replicas >= 1"),
                       ({"decoder_autoscale": "predictive", "decoder_replicas": 1, "decoder_target_streams": 0},
                        "decoder_target_streams"),
                       ({"decoder_autoscale": "predictive", "decoder_replicas": 3, "decoder_max_replicas": 2},
                        "decoder_replicas \\(3, the initial count\\) must lie within"),
                       ({"decoder_autoscale": "predictive", "decoder_replicas": 1,
                         "decoder_autoscale_history": str(tmp_path / "missing.json")}, "decoder_autoscale_history")):
        with pytest.raises(ValueError, match=match):
            ServerConfig(**{**base, **bad})


def running_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get("vbert-encoder")
    return 0 if app is None else sum(int(n) for d in app.deployments.values() for s, n in d.replica_states.items()
                                      if str(getattr(s, "value", s)) == "RUNNING")


def wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False


@pytest.mark.slow
def test_a_server_scales_its_replicas_up_under_load_and_back_down_when_it_stops(tiny_checkpoint, tmp_path):
    os.environ.pop("RAY_ADDRESS", None)
    config = tiny_server_config(tiny_checkpoint, tmp_path / "var", replicas=1, replica_cpus=0.5,
                                ray_object_store_mb=128, host_cache_mb=64, autoscale="predictive",
                                replica_capacity_rps=4, min_replicas=1, max_replicas=2, autoscale_interval_s=1,
                                autoscale_day_s=48)
    s = RunningServer(config)
    try:
        key = s.register("alpha")
        s.app.manager.upload_adapter("alpha", "cls", make_artifact(s.app.model.spec.shape, "lora", classify(3), 1,
                                                                   rank=4))
        assert running_replicas() == 1
        stop = threading.Event()
        answered = []

        def load():   # about 20 rows/s: five replicas' worth at 4 rows/s each
            req = T.ClassifyRequest(adapter="cls", inputs=[T.Input(text="gene expression in the liver")] * 4)
            while not stop.is_set():
                s.tenant.Classify(req, metadata=bearer(key), timeout=30)
                answered.append(1)
                time.sleep(0.2)

        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        try:
            assert wait_for(lambda: running_replicas() == 2, 90), "the policy did not add the second replica"
        finally:
            stop.set()
            thread.join(30)
        assert answered
        assert wait_for(lambda: running_replicas() == 1, 90), "the policy did not let the second replica go"
        # the server still answers on the one replica left
        out = s.tenant.Classify(T.ClassifyRequest(adapter="cls", inputs=[T.Input(text="a mild rash")]),
                                metadata=bearer(key), timeout=30)
        assert len(out.results) == 1
    finally:
        s.stop()
