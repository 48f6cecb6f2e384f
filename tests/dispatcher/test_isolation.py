"""Hostile callers over real gRPC on loopback (issue 17): no lock-out by idle streams with or without a
key, failed-authentication floods refused before hashing, aborted streams stop working at once,
undecodable messages are INVALID_ARGUMENT, reflection hides the admin API, limits in the status."""
from __future__ import annotations

import asyncio
import gc
import logging
import secrets
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from dispatcher.errors import RETRY_AFTER_KEY
from dispatcher.gen.vbert.v1 import admin_pb2, tenant_pb2, tenant_pb2_grpc
from tests.conftest import classify, make_artifact
from tests.dispatcher.conftest import ADMIN_TOKEN, RunningServer, bearer, tiny_server_config

T = tenant_pb2


@pytest.fixture
def iso_server(tiny_checkpoint, tmp_path):
    s = RunningServer(tiny_server_config(tiny_checkpoint, tmp_path / "var", max_concurrent_rpcs_per_tenant=4,
                                         max_concurrent_public_rpcs=6, max_concurrent_public_rpcs_per_peer=3,
                                         max_failed_auth_burst=5, max_failed_auth_per_s=0.5,
                                         max_waiting=16, max_waiting_per_tenant=4))
    shape = s.app.model.spec.shape
    s.keys = {"attacker": s.register("attacker", requests_per_s=1e4, burst=10_000), "victim": s.register("victim")}
    for i, name in enumerate(s.keys):
        s.app.manager.upload_adapter(name, "cls", make_artifact(shape, "lora", classify(2), i + 1, rank=2))
    yield s
    s.stop()


def victim_classify(s, timeout=10):
    req = T.ClassifyRequest(adapter="cls", inputs=[T.Input(text="the patient with cancer")])
    return s.tenant.Classify(req, metadata=bearer(s.keys["victim"]), timeout=timeout)


def run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


async def _idle_streams(address, n, open_one, at_most_open):
    """Open n calls that stay idle; returns (the calls, those refused, their codes, the first's trailers).
    Waits (up to 30 s, a loaded CI machine is slow to answer 260 calls) until at most `at_most_open` are
    still open, then half a second more so that a limit that admits too many would show."""
    async with grpc.aio.insecure_channel(address) as ch:
        calls = [open_one(ch) for _ in range(n)]
        deadline = time.monotonic() + 30
        while sum(not c.done() for c in calls) > at_most_open and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        refused = [c for c in calls if c.done()]
        codes = {(await c.code()) for c in refused}
        trailers = [await c.trailing_metadata() for c in refused[:1]]
        yield calls, refused, codes, trailers
        for c in calls:
            c.cancel()


def test_idle_health_watch_streams_lock_out_nobody(iso_server):
    s = iso_server

    async def main():
        def watch(ch):
            call = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=30)
            asyncio.ensure_future(_drain(call))
            return call
        async for calls, refused, codes, trailers in _idle_streams(s.address, 260, watch, 3):
            assert len(calls) - len(refused) <= 3      # one address holds at most 3 calls without a key
            assert codes == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert int(dict(trailers[0])[RETRY_AFTER_KEY]) > 0
            # tenants are untouched: calls with a key have budgets of their own
            assert (await asyncio.to_thread(victim_classify, s)).results[0].label
    run(main())


async def _drain(call):
    try:
        async for _ in call:
            pass
    except (grpc.aio.AioRpcError, asyncio.CancelledError):
        pass


def test_one_tenants_idle_streams_do_not_take_other_tenants_slots(iso_server):
    s = iso_server   # the attacker's key never verified before: its 260 first calls share one verification

    async def main():
        def stream(ch):   # a stream that never sends a message
            return tenant_pb2_grpc.TenantServiceStub(ch).ClassifyStream(metadata=bearer(s.keys["attacker"]),
                                                                        timeout=30)
        async for calls, refused, codes, trailers in _idle_streams(s.address, 260, stream, 4):
            assert len(calls) - len(refused) == 4, (len(calls), len(refused))   # the attacker's limit
            assert codes == {grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
            assert "per-tenant limit" in (await refused[0].details())
            for _ in range(3):
                assert (await asyncio.to_thread(victim_classify, s)).results[0].label
            status = s.admin.GetStatus(admin_pb2.GetStatusRequest(), metadata=bearer(ADMIN_TOKEN), timeout=10)
            assert status.limits.max_concurrent_rpcs_per_tenant == 4
            assert status.limits.num_rpcs_in_flight == 4 and status.limits.num_refused >= 256, status.limits
    run(main())
    deadline = time.monotonic() + 5                    # the slots come back when the streams close
    while s.app.admission.stats()["num_keyed_in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert s.app.admission.stats()["num_keyed_in_flight"] == 0, s.app.admission.stats()


def test_failed_auth_flood_is_refused_before_hashing_and_known_keys_still_work(iso_server):
    s = iso_server
    assert victim_classify(s).results                  # the victim's key verified once
    hashed = []
    original = s.app.auth.tenant
    s.app.auth.tenant = lambda key: (hashed.append(key), original(key))[1]
    try:
        req = T.ClassifyRequest(adapter="cls", inputs=[T.Input(text="x")])
        started = time.monotonic()
        flood = [s.tenant.Classify.future(req, metadata=bearer("vb_" + secrets.token_urlsafe(24)), timeout=20)
                 for _ in range(30)]                   # concurrent: all arrive before the first fails
        errors = []
        for f in flood:
            with pytest.raises(grpc.RpcError) as e:
                f.result()
            errors.append(e.value)
        codes = [e.code() for e in errors]
        assert codes.count(grpc.StatusCode.UNAUTHENTICATED) == 5       # the burst
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 25   # refused without hashing ...
        assert time.monotonic() - started >= 1.0                        # ... and answered late (tarpit)
        refused = [e for e in errors if e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert int(dict(refused[0].trailing_metadata())[RETRY_AFTER_KEY]) >= 1000   # 0.5 failures/s refill
        assert "failed authentications" in refused[0].details()
        assert len(hashed) == 5
        s.app.auth.invalidate()                        # the cache is gone (as after any admin write) ...
        assert victim_classify(s).results              # ... yet a key that verified before is verified again
    finally:
        s.app.auth.tenant = original


def _count_hashes(s):
    hashed, original = [], s.app.auth.tenant

    def counting(key):
        hashed.append(key)
        time.sleep(0.3)                                # a slow hash: the burst arrives while it runs
        return original(key)
    s.app.auth.tenant = counting
    return hashed, original


def test_a_burst_of_first_calls_with_a_new_valid_key_shares_one_verification(tiny_checkpoint, tmp_path):
    s = RunningServer(tiny_server_config(tiny_checkpoint, tmp_path / "var", max_failed_auth_burst=5,
                                         max_failed_auth_per_s=0.5))
    key = s.register("newcomer")
    s.app.manager.upload_adapter("newcomer", "cls", make_artifact(s.app.model.spec.shape, "lora", classify(2), 7,
                                                                  rank=2))
    hashed, original = _count_hashes(s)
    try:
        req = T.ClassifyRequest(adapter="cls", inputs=[T.Input(text="the gene")])
        burst = [s.tenant.Classify.future(req, metadata=bearer(key), timeout=20) for _ in range(16)]
        # more first calls than the address's failed-authentication burst (5): all are answered, none refused
        # as a failed authentication, and the key was hashed once
        assert all(f.result().results[0].label for f in burst)
        assert len(hashed) == 1, len(hashed)
        assert s.app.admission.stats()["num_refused"].get("failed_auth", 0) == 0
    finally:
        s.app.auth.tenant = original
        s.stop()


def test_a_burst_with_one_bad_key_is_hashed_once_and_costs_one_attempt(iso_server):
    s = iso_server
    hashed, original = _count_hashes(s)
    try:
        req = T.ClassifyRequest(adapter="cls", inputs=[T.Input(text="x")])
        bad = "vb_" + secrets.token_urlsafe(24)
        flood = [s.tenant.Classify.future(req, metadata=bearer(bad), timeout=20) for _ in range(20)]
        for f in flood:
            with pytest.raises(grpc.RpcError) as e:
                f.result()
            assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED, e.value.details()
        assert len(hashed) == 1
        # one attempt of the burst of 5 is gone: four more different bad keys are still hashed, the fifth refused
        codes = []
        for _ in range(5):
            with pytest.raises(grpc.RpcError) as e:
                s.tenant.Classify(req, metadata=bearer("vb_" + secrets.token_urlsafe(24)), timeout=20)
            codes.append(e.value.code())
        assert codes[:4] == [grpc.StatusCode.UNAUTHENTICATED] * 4, codes
        assert codes[4] is grpc.StatusCode.RESOURCE_EXHAUSTED, codes
        assert len(hashed) == 5
    finally:
        s.app.auth.tenant = original


def test_aborted_stream_cancels_its_queued_work_and_logs_no_unretrieved_errors(tiny_checkpoint, tmp_path, caplog):
    s = RunningServer(tiny_server_config(tiny_checkpoint, tmp_path / "var"))
    key = s.register("attacker", requests_per_s=1e4, burst=10_000)
    s.app.manager.upload_adapter("attacker", "cls", make_artifact(s.app.model.spec.shape, "lora", classify(2), 1,
                                                                  rank=2))
    gate, original = threading.Event(), s.app.manager.cache.loader
    s.app.manager.cache.loader = lambda a: (gate.wait(20), original(a))[1]   # the adapter loads slowly
    caplog.set_level(logging.ERROR)
    try:
        def messages():
            for _ in range(64):
                yield T.ClassifyRequest(adapter="cls", inputs=[T.Input(text="the gene")] * 4)
            time.sleep(30)                             # the client keeps the stream open ...
        call = s.tenant.ClassifyStream(messages(), metadata=bearer(key), timeout=30)
        deadline = time.monotonic() + 10
        while s.app.engine.num_pending < 64 * 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert s.app.engine.num_pending == 64 * 4      # every message is waiting for the adapter
        call.cancel()                                  # ... then goes away
        deadline = time.monotonic() + 5
        while s.app.engine.num_pending and time.monotonic() < deadline:
            time.sleep(0.02)
        assert s.app.engine.num_pending == 0           # its queued requests were cancelled, not computed
        gate.set()
        time.sleep(0.5)
        gc.collect()
        assert s.app.engine.scheduler.stats()["num_scheduled_rows"] == 0
        assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
    finally:
        gate.set()
        s.app.manager.cache.loader = original
        s.stop()


def test_invalid_utf8_in_a_request_is_invalid_argument(iso_server):
    s = iso_server
    good = T.ClassifyRequest(adapter="cls", inputs=[T.Input(text="zzzz")]).SerializeToString()
    bad = good.replace(b"zzzz", b"z\xff\xfez")
    raw = s.channel.unary_unary("/vbert.v1.TenantService/Classify", request_serializer=lambda b: b,
                                response_deserializer=T.ClassifyResponse.FromString)
    with pytest.raises(grpc.RpcError) as e:
        raw(bad, metadata=bearer(s.keys["victim"]), timeout=10)
    assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in e.value.details()
    stream = s.channel.stream_stream("/vbert.v1.TenantService/ClassifyStream", request_serializer=lambda b: b,
                                     response_deserializer=T.ClassifyResponse.FromString)
    with pytest.raises(grpc.RpcError) as e:
        list(stream(iter([good, bad]), metadata=bearer(s.keys["victim"]), timeout=10))
    assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert raw(good, metadata=bearer(s.keys["victim"]), timeout=10).results


def test_reflection_on_the_tenant_port_hides_the_admin_api(iso_server):
    refl = reflection_pb2_grpc.ServerReflectionStub(iso_server.channel)
    (resp,) = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                             timeout=10))
    names = {svc.name for svc in resp.list_services_response.service}
    assert "vbert.v1.TenantService" in names and "vbert.v1.AdminService" not in names


def test_admission_config_and_peer_addresses():
    from dispatcher.admission import Admission, AdmissionConfig, SlotLimitError, peer_host
    from dispatcher.config import ServerConfig

    assert peer_host("ipv4:127.0.0.1:5000") == "127.0.0.1" and peer_host("ipv6:[::1]:5000") == "::1"
    assert peer_host("unix:/tmp/s") == "unix:/tmp/s" and peer_host(None) == "unknown"
    with pytest.raises(ValueError, match="per_tenant"):
        AdmissionConfig(total=4, per_tenant=8)
    with pytest.raises(ValueError, match="max_concurrent_rpcs_per_tenant"):
        ServerConfig(max_concurrent_rpcs_per_tenant=0)
    with pytest.raises(ValueError, match="latency_target_ms"):
        ServerConfig(latency_target_ms=0)
    a = Admission(AdmissionConfig(per_tenant=2, public=3, public_per_peer=2))
    a.enter_tenant(1, "one")
    a.enter_tenant(1, "one")
    a.enter_tenant(2, "two")                           # another tenant has slots of its own
    with pytest.raises(SlotLimitError, match="per-tenant limit"):
        a.enter_tenant(1, "one")
    a.leave_tenant(1)
    a.enter_tenant(1, "one")                           # a slot given back is taken again
    a.enter_public("ipv4:10.0.0.1:1")
    a.enter_public("ipv4:10.0.0.1:2")
    with pytest.raises(SlotLimitError, match="per-address"):
        a.enter_public("ipv4:10.0.0.1:3")
    a.enter_public("ipv4:10.0.0.2:1")                  # another address
    with pytest.raises(SlotLimitError, match="server's limit"):
        a.enter_public("ipv4:10.0.0.3:1")
    assert a.stats()["num_keyed_in_flight"] == 3 and a.stats()["num_public_in_flight"] == 3
