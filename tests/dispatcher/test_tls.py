"""TLS and mutual TLS by config, with certificates made by the openssl CLI for the test."""
from __future__ import annotations

import shutil
import subprocess

import grpc
import pytest

from dispatcher.gen.vbert.v1 import tenant_pb2, tenant_pb2_grpc
from tests.dispatcher.conftest import RunningServer, bearer, tiny_server_config

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=test-ca", cwd=d)
    for name, cn in (("server", "localhost"), ("client", "tenant-client")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj",
                f"/CN={cn}", cwd=d)
        (d / f"{name}.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
                f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    return d


def embed(channel, key):
    stub = tenant_pb2_grpc.TenantServiceStub(channel)
    return stub.Embed(tenant_pb2.EmbedRequest(inputs=[tenant_pb2.Input(text="gene")]), metadata=bearer(key), timeout=30)


def test_tls_and_mutual_tls(tiny_checkpoint, tmp_path, pki):
    read = lambda n: (pki / n).read_bytes()  # noqa: E731
    server = RunningServer(tiny_server_config(tiny_checkpoint, tmp_path / "var", tls_cert=str(pki / "server.pem"),
                                              tls_key=str(pki / "server.key"), tls_client_ca=str(pki / "ca.pem")))
    try:
        key = server.register("acme")
        target = f"localhost:{server.server.port}"
        with_cert = grpc.ssl_channel_credentials(read("ca.pem"), read("client.key"), read("client.pem"))
        assert len(embed(grpc.secure_channel(target, with_cert), key).results[0].values) == 32
        without = grpc.ssl_channel_credentials(read("ca.pem"))
        with pytest.raises(grpc.RpcError) as e:          # mTLS: no client certificate, no call
            embed(grpc.secure_channel(target, without), key)
        assert e.value.code() is grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as e:          # and plaintext is refused
            embed(grpc.insecure_channel(target), key)
        assert e.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()
