"""`vbert serve --replicas 1 --ray-address HOST:PORT` joining a cluster started with `ray start --head` (as on a real
multi-node cluster, here on one machine): it deploys its replica there, serves, and on SIGTERM removes only its own
application, leaving the cluster running. Ray 2.60's `ray start` turns token authentication on, so the joining
process runs with RAY_AUTH_MODE=token (the token is in ~/.ray/auth_token on this machine)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray.serve")

from tests.dispatcher.test_server_process import ServeProcess, classify_call, free_port, prepare_data_dir  # noqa: E402

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).parent / "ray")


def test_vbert_serve_joins_a_running_cluster_and_leaves_it_running(tiny_checkpoint, tmp_path):
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_AUTH_MODE": "token"}
    port = free_port()
    address = f"127.0.0.1:{port}"
    subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                    f"--object-store-memory={128 << 20}", "--disable-usage-stats"], check=True, env=env, timeout=180,
                   capture_output=True)
    try:
        key = prepare_data_dir(tiny_checkpoint, tmp_path / "var")
        s = ServeProcess(tmp_path / "var", tiny_checkpoint, log_path=tmp_path / "serve.log",
                         extra_env={"VBERT_REPLICAS": "1", "VBERT_REPLICA_CPUS": "0.5", "VBERT_RAY_ADDRESS": address,
                                    "RAY_AUTH_MODE": "token", "RAY_ADDRESS": ""})
        assert len(classify_call(s.tenant, key, timeout=120).results) == 1
        assert s.terminate(90) == 0
        status = subprocess.run([RAY, "status", f"--address={address}"], env=env, capture_output=True, text=True,
                                timeout=60)
        assert status.returncode == 0, status.stderr[-2000:]      # the cluster outlived the front door
    finally:   # `ray stop` ends every Ray process of this user here: the suite runs one cluster at a time
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
