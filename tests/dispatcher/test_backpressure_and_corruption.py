"""RESOURCE_EXHAUSTED from full engine queues, and DATA_LOSS from a corrupt stored adapter."""
from __future__ import annotations

import threading
import time

import grpc
import pytest

from dispatcher.errors import RETRY_AFTER_KEY
from dispatcher.gen.vbert.v1 import tenant_pb2
from tests.conftest import classify, make_artifact
from tests.dispatcher.conftest import RunningServer, bearer, tiny_server_config


@pytest.fixture
def small_server(tiny_checkpoint, tmp_path):
    s = RunningServer(tiny_server_config(tiny_checkpoint, tmp_path / "var", max_waiting=4, max_waiting_per_tenant=2))
    yield s
    s.stop()


def classify_future(server, key, adapter="cls"):
    return server.tenant.Classify.future(tenant_pb2.ClassifyRequest(adapter=adapter, inputs=[tenant_pb2.Input(text="gene")]),
                                        metadata=bearer(key), timeout=30)


def test_full_queue_is_resource_exhausted_with_retry_info(small_server):
    s = small_server
    key = s.register("acme")
    s.app.manager.upload_adapter("acme", "cls", make_artifact(s.app.model.spec.shape, "lora", classify(2), 1, rank=2))
    gate, original = threading.Event(), s.app.manager.cache.loader
    s.app.manager.cache.loader = lambda a: (gate.wait(20), original(a))[1]   # the disk tier is slow
    try:
        stuck = [classify_future(s, key) for _ in range(2)]
        time.sleep(0.3)                                # both are queued, waiting for their adapter
        with pytest.raises(grpc.RpcError) as e:
            classify_future(s, key).result()
        assert e.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and "retry later" in e.value.details()
        assert int(dict(e.value.trailing_metadata())[RETRY_AFTER_KEY]) > 0
        gate.set()
        assert all(f.result().results for f in stuck)
    finally:
        gate.set()
        s.app.manager.cache.loader = original


def test_corrupt_stored_adapter_is_data_loss_and_never_served(small_server):
    s = small_server
    key = s.register("acme")
    rec = s.app.manager.upload_adapter("acme", "cls", make_artifact(s.app.model.spec.shape, "lora", classify(2), 1, rank=2))
    blob, _ = s.app.manager.store.paths(rec.sha256)
    data = bytearray(blob.read_bytes())
    data[-5] ^= 0xFF                                   # one flipped bit in the weights
    blob.write_bytes(bytes(data))
    with pytest.raises(grpc.RpcError) as e:
        classify_future(s, key).result()
    assert e.value.code() is grpc.StatusCode.DATA_LOSS and rec.sha256 in e.value.details()
    assert not s.app.manager.cache.is_resident(rec.id)
