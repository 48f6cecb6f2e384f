"""Issue 17 (security probe against a real server on loopback): upload leftovers outside the data
directory, keys accepted after their grace period, a non-loopback admin listener without TLS, and
a retry-after hint of 0 ms."""
from __future__ import annotations

import asyncio
import io
import os
import signal
import stat
import sys
import tarfile
import threading
import time
from pathlib import Path

import grpc
import pytest

import dispatcher.admin_service as admin_service
from dispatcher.auth import Authenticator
from dispatcher.client import Client, VbertError, _Call, retry_delay, upload_chunks
from dispatcher.config import ServerConfig
from dispatcher.errors import RETRY_AFTER_KEY, RateLimitedError, abort
from dispatcher.gen.vbert.v1 import admin_pb2, admin_pb2_grpc, tenant_pb2
from dispatcher.limits import RateLimiter
from manager.errors import UnauthenticatedError
from manager.records import Quotas, Tenant
from tests.dispatcher.conftest import ADMIN_TOKEN, RunningServer, bearer, tiny_server_config
from tests.dispatcher.test_server_process import ServeProcess

VBERT = str(Path(sys.executable).parent / "vbert")
ADMIN = bearer(ADMIN_TOKEN)


def junk_tar(num_files: int, file_bytes: int) -> bytes:
    """An archive that extracts fine but holds no adapter (the upload fails after extraction)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(num_files):
            info = tarfile.TarInfo(f"part{i:02d}.bin")
            info.size = file_bytes
            tar.addfile(info, io.BytesIO(os.urandom(file_bytes)))
    return buf.getvalue()


def embed(stub, key: str):
    return stub.Embed(tenant_pb2.EmbedRequest(adapter="default", inputs=[tenant_pb2.Input(text="the gene")]),
                      metadata=bearer(key), timeout=30)


# -- 5: uploads are extracted under the data directory, leftovers removed at start-up ----------------
def test_upload_is_extracted_under_the_data_dir_not_the_system_temp(tiny_checkpoint, tmp_path, monkeypatch):
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(system_tmp))
    seen = []
    real_extract = admin_service.extract_adapter_tar

    def spy(payload, dest, *args):
        out = real_extract(payload, dest, *args)
        seen.append((Path(dest), sorted(p.name for p in Path(dest).iterdir()), sorted(os.listdir(system_tmp))))
        return out

    monkeypatch.setattr(admin_service, "extract_adapter_tar", spy)
    data_dir = tmp_path / "var"
    server = RunningServer(tiny_server_config(tiny_checkpoint, data_dir))
    try:
        server.register("acme")
        with pytest.raises(grpc.RpcError) as e:
            server.admin.UploadAdapter(iter(upload_chunks("acme", "junk", junk_tar(3, 1000))), metadata=ADMIN)
        assert e.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    finally:
        server.stop()
    (dest, files, in_system_tmp), = seen
    uploads = data_dir / "uploads"
    assert dest.parent == uploads and files == ["part00.bin", "part01.bin", "part02.bin"]
    assert in_system_tmp == [], "the upload was (also) written to the system temp directory"
    assert stat.S_IMODE(uploads.stat().st_mode) == 0o700
    assert list(uploads.iterdir()) == [] and list(system_tmp.iterdir()) == []


def test_start_up_removes_leftover_uploads(tiny_checkpoint, tmp_path, caplog):
    data_dir = tmp_path / "var"
    killed = data_dir / "uploads" / "upload-killed"
    killed.mkdir(parents=True)
    (killed / "adapter_model.safetensors").write_bytes(b"tenant data" * 1000)
    (data_dir / "uploads" / "stray").write_bytes(b"x")
    os.chmod(data_dir / "uploads", 0o755)
    caplog.set_level("WARNING", logger="vbert.dispatcher")
    server = RunningServer(tiny_server_config(tiny_checkpoint, data_dir))
    server.stop()
    assert list((data_dir / "uploads").iterdir()) == []
    assert stat.S_IMODE((data_dir / "uploads").stat().st_mode) == 0o700
    assert any("removed 2 leftover uploads" in r.getMessage() for r in caplog.records)


class _Serve(ServeProcess):
    """`vbert serve` in its own process, with TMPDIR pointed at `system_tmp`; its logs to a file (never a
    pipe that could fill up and block the server)."""

    def __init__(self, checkpoint, data_dir: Path, system_tmp: Path, log_path: Path):
        super().__init__(data_dir, checkpoint, extra_env={"TMPDIR": str(system_tmp), "VBERT_ADMIN_TOKEN": ADMIN_TOKEN},
                         log_path=log_path, channel_options=[("grpc.max_send_message_length", 64 << 20)])
        self.admin = admin_pb2_grpc.AdminServiceStub(self.channel)

    def close(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(60)
        self.channel.close()
        return code


def _folders_with_files(*roots: Path) -> list[Path]:
    found = []
    for root in roots:
        try:
            for d in os.scandir(root):
                if d.is_dir(follow_symlinks=False) and os.listdir(d.path):
                    found.append(Path(d.path))
        except FileNotFoundError:
            pass
    return found


def test_sigkill_during_an_upload_leaves_nothing_outside_the_data_dir_and_restart_clears_it(
        tiny_checkpoint, tmp_path):
    """A real `vbert serve` is SIGKILLed while it extracts an upload (the tenant's files are on disk):
    nothing is in the system temp directory, and the next start removes what is under data_dir."""
    data_dir, system_tmp = tmp_path / "var", tmp_path / "system-tmp"
    system_tmp.mkdir()
    uploads = data_dir / "uploads"
    s = _Serve(tiny_checkpoint, data_dir, system_tmp, tmp_path / "serve-1.log")
    try:
        s.admin.RegisterTenant(admin_pb2.RegisterTenantRequest(name="acme"), metadata=ADMIN, timeout=30)
        payload = junk_tar(48, 1 << 20)     # ~48 MB: extraction takes long enough to be caught
        killed = threading.Event()

        def watch():
            while s.proc.poll() is None:
                if _folders_with_files(uploads, system_tmp):    # files of an upload being extracted
                    s.proc.send_signal(signal.SIGKILL)
                    killed.set()
                    return
                time.sleep(0.001)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        for _ in range(5):
            try:
                s.admin.UploadAdapter(iter(upload_chunks("acme", "big", payload)), metadata=ADMIN, timeout=60)
            except grpc.RpcError as e:
                if killed.is_set():
                    break
                assert e.code() is grpc.StatusCode.FAILED_PRECONDITION, e
        assert killed.wait(5), "no upload was ever seen being extracted under data_dir/uploads"
    finally:
        code = s.close(signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert list(system_tmp.iterdir()) == [], "an upload left files in the system temp directory"
    assert _folders_with_files(uploads), "the kill did not land during the extraction"
    s2 = _Serve(tiny_checkpoint, data_dir, system_tmp, tmp_path / "serve-2.log")
    try:
        assert list(uploads.iterdir()) == []      # removed at start-up, before serving
    finally:
        assert s2.close() == 0
    assert "removed 1 leftover uploads" in (tmp_path / "serve-2.log").read_text()
    assert list(system_tmp.iterdir()) == []


# -- 6: a key whose grace period ended is refused at once, cached or not ----------------------------
def test_rotated_key_is_refused_right_after_its_grace_period(tiny_checkpoint, tmp_path):
    grace_s = 1.5
    server = RunningServer(tiny_server_config(tiny_checkpoint, tmp_path / "var"))
    try:
        old = server.register("rotor")
        rotated = time.monotonic()
        server.admin.RotateKey(admin_pb2.RotateKeyRequest(name="rotor", grace_seconds=grace_s), metadata=ADMIN)
        embed(server.tenant, old)                              # verified during the grace period: cached
        assert server.app.auth.cached(old) is not None        # (the cache is what this test is about)
        embed(server.tenant, old)
        assert time.monotonic() - rotated < grace_s, "the machine is too slow for this test's timing"
        time.sleep(max(0.0, rotated + grace_s + 0.05 - time.monotonic()))
        assert server.app.auth.cached(old) is None
        with pytest.raises(grpc.RpcError) as e:
            embed(server.tenant, old)
        assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop()


class _FakeManager:
    def __init__(self, valid_for):
        self.valid_for, self.calls = valid_for, 0
        self.tenant = Tenant(1, "acme", 0.0, "active", Quotas())

    def authenticate_valid_for(self, key):
        self.calls += 1
        if self.valid_for is not None and self.valid_for <= 0:
            raise UnauthenticatedError("expired")
        return self.tenant, self.valid_for


def test_authenticator_cache_ends_at_the_keys_expiry():
    expiring = Authenticator(_FakeManager(0.2), "admin", ttl_s=5.0)
    assert expiring.tenant("k").name == "acme" and expiring.cached("k").name == "acme"
    time.sleep(0.25)
    assert expiring.cached("k") is None                     # the key expired: not the 5 s ttl
    forever = Authenticator(_FakeManager(None), "admin", ttl_s=0.2)
    forever.tenant("k")
    assert forever.cached("k") is not None
    time.sleep(0.25)
    assert forever.cached("k") is None                      # no expiry: the ttl


# -- 8b: the admin listener leaves loopback only with TLS -------------------------------------------
def test_non_loopback_admin_host_needs_tls(tmp_path):
    with pytest.raises(ValueError, match=r"admin_host '0\.0\.0\.0' is not loopback.*tls_cert and tls_key"):
        ServerConfig(admin_port=0, admin_host="0.0.0.0", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="admin_host '10.1.2.3' is not loopback"):
        ServerConfig.load(env={"VBERT_ADMIN_HOST": "10.1.2.3", "VBERT_ADMIN_PORT": "0"})
    for host in ("127.0.0.1", "localhost", "::1"):
        assert ServerConfig(admin_port=0, admin_host=host, data_dir=str(tmp_path)).admin_host == host
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x"), key.write_text("x")
    config = ServerConfig(admin_port=0, admin_host="0.0.0.0", tls_cert=str(cert), tls_key=str(key),
                          data_dir=str(tmp_path))
    assert config.admin_host == "0.0.0.0"


# -- 8c: the retry-after hint is never 0, and a 0 hint does not mean "retry at once" ----------------
def test_nearly_full_bucket_hints_at_least_the_minimum():
    now = [100.0]
    limiter = RateLimiter(clock=lambda: now[0])
    tenant = Tenant(7, "fast", 0.0, "active", Quotas(requests_per_s=1000.0, burst=1))
    limiter.acquire(tenant)
    now[0] += 0.99999 / 1000                                 # 0.99999 tokens back: short by 1e-8 s
    with pytest.raises(RateLimitedError) as e:
        limiter.acquire(tenant)
    assert e.value.retry_after_s >= 0.01


class _Context:
    def __init__(self):
        self.trailing = None

    def set_trailing_metadata(self, trailing):
        self.trailing = dict(trailing)

    async def abort(self, code, message):
        raise RuntimeError(code)


@pytest.mark.parametrize("retry_s, expected_ms", [(0.0, "10"), (1e-8, "10"), (0.0101, "11"), (0.25, "250"),
                                                  (1.0001, "1001")])
def test_retry_after_trailer_is_rounded_up_and_never_below_10_ms(retry_s, expected_ms):
    context = _Context()
    with pytest.raises(RuntimeError):
        asyncio.run(abort(context, RateLimitedError("slow down", retry_after_s=retry_s), "rid"))
    assert context.trailing[RETRY_AFTER_KEY] == expected_ms


class _RpcError(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.RESOURCE_EXHAUSTED

    def details(self):
        return "over the rate limit"

    def trailing_metadata(self):
        return ((RETRY_AFTER_KEY, "0"), ("x-request-id", "r1"))


def test_client_waits_at_least_its_backoff_on_a_zero_hint():
    error = VbertError.from_rpc_error(_RpcError())
    assert error.retry_after_s == 0.0
    assert retry_delay(error, 0, 0.1, 5, rand=lambda: 0.0) >= 0.1
    assert retry_delay(error, 0, 0.1, 0.05, rand=lambda: 0.0) >= 0.05      # capped by max_backoff_s
    calls = []

    class Stub:
        def Embed(self, request, timeout, metadata):
            calls.append(time.monotonic())
            if len(calls) == 1:
                raise _RpcError()
            return tenant_pb2.EmbedResponse()

    with Client("127.0.0.1:1", api_key="k", backoff_s=0.2) as c:
        c._stubs["tenant"] = Stub()
        assert c._run(_Call("tenant", "Embed", tenant_pb2.EmbedRequest(), lambda r: "served")) == "served"
    assert len(calls) == 2 and calls[1] - calls[0] >= 0.2
