"""A process of ours that serves gRPC and forks to exec (Ray's local cluster: gcs_server and raylet, started with a
preexec_fn, so by fork() and not vfork) must not run gRPC's fork handlers: with the server's threads inside gRPC they
are skipped half-way, the parent's poller can break and a child can hang before its exec (a CI run's `ray.init` timed
out waiting for a gcs_server that never started). Importing `dispatcher` turns them off (dispatcher/__init__.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Run in a fresh interpreter: the variable only counts before gRPC is first imported, and this test process has
# imported it long ago. The child imports dispatcher first, as `vbert serve` does, then serves gRPC's health service
# (as our server does) to four busy client threads while it forks 100 children the way Ray starts its processes.
CHILD = r"""
import os, subprocess, sys, threading
from concurrent import futures
import dispatcher  # noqa: F401
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

server = grpc.server(futures.ThreadPoolExecutor(8))
health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
port = server.add_insecure_port("127.0.0.1:0")
server.start()
stop = threading.Event()

def hammer():
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    while not stop.is_set():
        stub.Check(health_pb2.HealthCheckRequest(), timeout=10)

threads = [threading.Thread(target=hammer, daemon=True) for _ in range(4)]
for t in threads:
    t.start()

def preexec():                      # what Ray's start_ray_process does in the child before its exec
    import signal
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

codes = [subprocess.run(["/bin/true"], preexec_fn=preexec, timeout=60).returncode
         for _ in range(100)]
stop.set()
print("setting", os.environ.get("GRPC_ENABLE_FORK_SUPPORT"), "exits", sorted(set(codes)), flush=True)
server.stop(None)
"""


def _run(env_value: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
    if env_value is not None:
        env["GRPC_ENABLE_FORK_SUPPORT"] = env_value
    return subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)


def test_importing_dispatcher_turns_grpcs_fork_handlers_off_for_a_busy_server_that_forks():
    done = _run(None)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "setting false exits [0]" in done.stdout
    # gRPC logs each fork whose handlers it had to skip; with the handlers off there is nothing to skip or break
    assert "fork() handlers" not in done.stderr, done.stderr[-2000:]
    assert "Bad file descriptor" not in done.stderr, done.stderr[-2000:]


def test_an_operators_own_setting_wins():
    """The setting is a default: GRPC_ENABLE_FORK_SUPPORT=true in the environment keeps gRPC's handlers (a server
    run so hung in the test above: with them on, the child of this test stalled at a fork and was killed after 5
    minutes, where it takes seconds with them off)."""
    env = dict(os.environ, GRPC_ENABLE_FORK_SUPPORT="true")
    done = subprocess.run([sys.executable, "-c", "import os, dispatcher; print(os.environ['GRPC_ENABLE_FORK_SUPPORT'])"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["true"], done.stderr[-2000:]
