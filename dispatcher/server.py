"""The gRPC server: listeners, services, health, reflection, limits, TLS, graceful drain.

Tenant API, Open Inference Protocol, health and reflection listen on host:port. The admin API
listens on loopback: on the same listener when that is loopback, else on admin_host:admin_port.
SIGTERM (or SIGINT): health goes NOT_SERVING, new RPCs get UNAVAILABLE, in-flight RPCs finish
(up to grace_s), the engine drains, the process exits 0.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from vbert.device import keep_host_heap, reserve_cpu_for_steps

from .admin_service import AdminServicer
from .app import App
from .auth import AuthInterceptor
from .config import ServerConfig
from .gen.inference import grpc_service_pb2, grpc_service_pb2_grpc
from .gen.vbert.v1 import admin_pb2, admin_pb2_grpc, tenant_pb2, tenant_pb2_grpc
from .heap import freeze_startup_heap
from .http_api import HttpServer, create_http_app
from .oip_service import InferenceServicer
from .tenant_service import TenantServicer

log = logging.getLogger("vbert.dispatcher")

TENANT_SERVICES = (tenant_pb2.DESCRIPTOR.services_by_name["TenantService"].full_name,
                   grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name)
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name


DRAIN_QUIET_S = 0.25   # a drain keeps refusing new calls this long after the last call in flight ended


def server_options(config: ServerConfig) -> list[tuple[str, int]]:
    ping_ms = int(config.keepalive_min_ping_s * 1000)
    return [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        # accept client keepalive pings as often as every keepalive_min_ping_s, with or without
        # calls in flight, and never answer them with GOAWAY (no ping strikes)
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", ping_ms),
        ("grpc.http2.min_ping_interval_without_data_ms", ping_ms),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
    ]


def _credentials(config: ServerConfig):
    if config.tls_cert is None:
        return None
    with open(config.tls_key, "rb") as f:
        key = f.read()
    with open(config.tls_cert, "rb") as f:
        cert = f.read()
    ca = None
    if config.tls_client_ca is not None:
        with open(config.tls_client_ca, "rb") as f:
            ca = f.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def _bind(server: grpc.aio.Server, address: str, creds) -> int:
    port = server.add_secure_port(address, creds) if creds is not None else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return port


class Server:
    """One or two grpc.aio servers around an App."""

    def __init__(self, app: App):
        self.app, config = app, app.config
        self.health = health.aio.HealthServicer()
        # call slots are ours (dispatcher.admission: per tenant, per caller without a key, in total),
        # not grpc's one global pool, which idle streams of one caller can fill for everyone
        self.interceptor = interceptor = AuthInterceptor(app.auth, lambda: app.is_draining, app.metrics,
                                                         app.admission)
        kw = dict(interceptors=[interceptor], options=server_options(config))
        self.main = grpc.aio.server(**kw)
        separate_admin = config.admin_port is not None
        self.admin = grpc.aio.server(**kw) if separate_admin else self.main
        tenant_pb2_grpc.add_TenantServiceServicer_to_server(TenantServicer(app), self.main)
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(app), self.main)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(app), self.admin)
        # reflection on the tenant listener lists the tenant services only (callers there have no
        # business with the admin API, even when it shares the listener on loopback)
        for s, names in ((self.main, TENANT_SERVICES), *(((self.admin, (ADMIN_SERVICE,)),) if separate_admin else ())):
            health_pb2_grpc.add_HealthServicer_to_server(self.health, s)
            reflection.enable_server_reflection(
                names + (health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), s)
        creds = _credentials(config)
        self.port = _bind(self.main, config.address, creds)
        self.admin_port = _bind(self.admin, f"{config.admin_host}:{config.admin_port}", creds) if separate_admin \
            else self.port
        self._servers = [self.main] + ([self.admin] if separate_admin else [])
        self.http = None            # the OpenAI-compatible HTTP API (dispatcher/http_api.py), 0 = off
        if config.http_port:
            ssl = dict(ssl_certfile=config.tls_cert, ssl_keyfile=config.tls_key) if config.tls_cert else None
            self.http = HttpServer(create_http_app(app, interceptor), config.http_host, config.http_port, ssl)
        self.http_port = self.http.port if self.http is not None else None
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        self.app.start()
        for s in self._servers:
            await s.start()
        if self.http is not None:
            await self.http.start()
        for name in ("", *TENANT_SERVICES, ADMIN_SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.metrics_server = self.app.metrics.serve(self.app.config.metrics_host, self.app.config.metrics_port)
        log.info("serving", extra={"method": f"{self.app.config.host}:{self.port}"})

    async def drain_and_stop(self) -> None:
        """Graceful shutdown: NOT_SERVING, refuse new RPCs, let in-flight ones finish; then one log
        line: the calls in flight and the inputs queued in the engine when the drain began, how many
        inputs the engine still finished after the listeners stopped, and how long it all took."""
        if self.app.is_draining:
            return
        self.app.is_draining = True
        started = time.monotonic()
        use = self.app.admission.stats()
        num_calls = use["num_keyed_in_flight"] + use["num_public_in_flight"]
        num_inputs = sum(e.num_pending for e in self.app.engines)
        await self.health.enter_graceful_shutdown()
        # the listeners stay open while the tenant calls in flight finish, so every new call meanwhile
        # gets the interceptor's UNAVAILABLE (retry elsewhere), not whatever a closing listener answers
        # (and stay open DRAIN_QUIET_S after the last one, for calls already on their way)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.app.config.grace_s
        quiet_since = None
        while loop.time() < deadline:
            if self.app.admission.stats()["num_keyed_in_flight"]:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = loop.time()
            elif loop.time() - quiet_since >= DRAIN_QUIET_S:
                break
            await asyncio.sleep(0.02)
        await asyncio.gather(*(s.stop(max(0.5, deadline - loop.time())) for s in self._servers),
                             *((self.http.stop(),) if self.http is not None else ()))
        num_late = await asyncio.to_thread(self.app.close)
        self.interceptor.close()
        if getattr(self, "metrics_server", None) is not None:
            self.metrics_server[0].shutdown()
        duration_ms = round((time.monotonic() - started) * 1000, 1)
        log.info(f"drained {num_calls} calls in flight ({num_inputs} inputs queued; {num_late} finished after "
                 f"the listeners stopped) in {duration_ms:.0f} ms",
                 extra={"method": "shutdown", "inputs": num_inputs, "duration_ms": duration_ms})
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()


def _create_app(config: ServerConfig) -> App:
    reserve_cpu_for_steps()
    return App.create(config)


async def serve(config: ServerConfig, ready=None) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code (0 after a clean drain)."""
    reserve_cpu_for_steps()   # this thread and the loader make no OpenMP pool: the cores go to step threads
    if keep_host_heap(config.host_heap_keep_mb):   # steps reuse freed activations' pages (vbert/device.py)
        log.info("host heap: up to %d MiB of freed memory kept for the next steps", config.host_heap_keep_mb)
    app = await asyncio.to_thread(_create_app, config)
    server = Server(app)
    await server.start()
    num_frozen = freeze_startup_heap()     # full garbage collections skip what start-up made (dispatcher/heap.py)
    log.info("start-up heap frozen: %d objects", num_frozen)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.drain_and_stop()))
    if ready is not None:
        ready(server)
    await server.wait()
    return 0
