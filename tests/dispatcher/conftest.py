"""A real server on 127.0.0.1 (random port) in this process, on its own event-loop thread."""
from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from dispatcher.app import App
from dispatcher.config import ServerConfig
from dispatcher.gen.vbert.v1 import admin_pb2_grpc, tenant_pb2_grpc
from dispatcher.server import Server

ADMIN_TOKEN = "test-admin-token"


class RunningServer:
    def __init__(self, config: ServerConfig):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.app = App.create(config)
        self.server = self._call(self._start())
        self.address = f"127.0.0.1:{self.server.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.tenant = tenant_pb2_grpc.TenantServiceStub(self.channel)
        self.admin = admin_pb2_grpc.AdminServiceStub(self.channel)

    async def _start(self):
        server = Server(self.app)
        await server.start()
        return server

    def _call(self, coro, timeout=120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def register(self, name: str, **quotas) -> str:
        """A tenant through the manager (the admin API has its own tests); returns its key."""
        from manager.records import Quotas

        _, key = self.app.manager.create_tenant(name, Quotas(**quotas) if quotas else None)
        return key

    def stop(self):
        self.channel.close()
        self._call(self.server.drain_and_stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def tiny_server_config(checkpoint, data_dir, **kw) -> ServerConfig:
    base = dict(port=0, metrics_port=0, http_port=0, data_dir=str(data_dir), backbone=str(checkpoint), device="cpu",
                lora_slots=8, bottleneck_slots=8, max_lora_rank=8, max_bottleneck_size=16, max_labels=8,
                admin_token=ADMIN_TOKEN, max_texts_per_request=8, grace_s=10)
    base.update(kw)
    base.setdefault("backbones", "encoder,decoder" if base.get("decoder") else "encoder")
    return ServerConfig(**base)


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    s = RunningServer(tiny_server_config(tiny_checkpoint, tmp_path_factory.mktemp("var")))
    yield s
    s.stop()


def bearer(key: str):
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory):
    """A tiny random Llama checkpoint with a byte-level BPE tokenizer and a chat template."""
    from tests.decoder_models import write_tiny_decoder_checkpoint

    return write_tiny_decoder_checkpoint(tmp_path_factory.mktemp("decoder") / "model")
