"""A decoder-only server (backbones = "decoder") over real gRPC on loopback: Generate and decoder adapters
work; every encoder RPC, the Open Inference Protocol and encoder uploads answer FAILED_PRECONDITION
naming the missing backbone, store nothing and leave the server serving; status lists only the decoder."""
from __future__ import annotations

import grpc
import pytest
import torch

from dispatcher.gen.inference import grpc_service_pb2 as oip_pb, grpc_service_pb2_grpc
from dispatcher.gen.vbert.v1 import tenant_pb2
from tests.conftest import classify, make_artifact
from tests.decoder_models import write_tiny_decoder_lora
from tests.dispatcher.conftest import ADMIN_TOKEN, RunningServer, bearer, tiny_server_config

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def dec_server(tiny_checkpoint, decoder_dir, tmp_path_factory):
    # bfloat16 LoRA banks here (the other decoder servers in the tests keep the default, float32)
    s = RunningServer(tiny_server_config(tiny_checkpoint, tmp_path_factory.mktemp("var"), backbones="decoder",
                                         decoder=str(decoder_dir), decoder_kv_cache_mb=1, decoder_block_size=4,
                                         decoder_lora_dtype="bfloat16"))
    s.key = s.register("acme")
    yield s
    s.stop()


def _refused(call) -> str:
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value.details()
    return e.value.details()


def test_config_accepts_a_decoder_only_server(tiny_checkpoint, tmp_path):
    cfg = tiny_server_config(tiny_checkpoint, tmp_path, backbones="decoder")
    assert cfg.has_decoder and not cfg.has_encoder
    with pytest.raises(ValueError, match="backbones"):
        tiny_server_config(tiny_checkpoint, tmp_path, backbones="")
    with pytest.raises(ValueError, match="decoder_lora_dtype 'float16' is not one of"):
        tiny_server_config(tiny_checkpoint, tmp_path, backbones="decoder", decoder_lora_dtype="float16")
    with pytest.raises(ValueError, match="decoder_staging_mb must be >= 0"):
        tiny_server_config(tiny_checkpoint, tmp_path, backbones="decoder", decoder_staging_mb=-1)
    assert tiny_server_config(tiny_checkpoint, tmp_path, backbones="decoder",
                              decoder_staging_mb=0).decoder_config().kv_config().staging_bytes == 0
    assert tiny_server_config(tiny_checkpoint, tmp_path, backbones="decoder",     # unset: the KV cache's budget
                              decoder_kv_cache_mb=3).decoder_config().kv_config().staging_bytes == 3 << 20
    with pytest.raises(ValueError, match="generation_prefix_sharing 'everyone' is not one of"):
        tiny_server_config(tiny_checkpoint, tmp_path, backbones="decoder", generation_prefix_sharing="everyone")
    assert not tiny_server_config(tiny_checkpoint, tmp_path, backbones="decoder", generation_prefix_caching=False,
                                  generation_prefix_sharing="global").generation_scheduler_config().prefix_caching


def test_generate_and_decoder_adapters_work(dec_server, decoder_dir, tmp_path):
    from dispatcher.client import Client

    s = dec_server
    assert s.app.model is None and s.app.engine is None
    assert s.app.decoder.lora.a["qkv"].dtype == torch.bfloat16
    with Client(s.address, admin_token=ADMIN_TOKEN) as admin:
        rec = admin.upload_adapter("acme", "writer", write_tiny_decoder_lora(tmp_path / "lora", decoder_dir, seed=3))
        status = admin.status()
    assert rec["backbone"] == "decoder"
    assert set(status["backbones"]) == {"decoder"}
    assert status["backbone"] == s.app.decoder.name
    with Client(s.address, api_key=s.key) as c:
        bare = [t for e in c.generate("the patient", max_new_tokens=6, temperature=0, ignore_eos=True)
                for t in e["token_ids"]]
        tuned = list(c.generate("the patient", adapter="writer", max_new_tokens=6, temperature=0, ignore_eos=True))
    assert len(bare) == 6 and tuned[-1]["finish_reason"] == "length"
    assert [t for e in tuned for t in e["token_ids"]] != bare


def test_encoder_rpcs_name_the_missing_backbone(dec_server):
    s = dec_server
    md, x = bearer(s.key), [tenant_pb2.Input(text="x")]
    for call in (lambda: s.tenant.Classify(tenant_pb2.ClassifyRequest(adapter="cls", inputs=x), metadata=md),
                 lambda: s.tenant.Embed(tenant_pb2.EmbedRequest(inputs=x), metadata=md),
                 lambda: s.tenant.Tag(tenant_pb2.TagRequest(adapter="ner", inputs=x), metadata=md)):
        details = _refused(call)
        assert "no encoder backbone" in details and "'decoder'" in details
    oip = grpc_service_pb2_grpc.GRPCInferenceServiceStub(s.channel)
    tensor = oip_pb.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(b"x")
    details = _refused(lambda: oip.ModelInfer(oip_pb.ModelInferRequest(model_name="cls", inputs=[tensor]),
                                              metadata=md))
    assert "no encoder backbone" in details and "Open Inference Protocol" in details
    assert oip.ServerReady(oip_pb.ServerReadyRequest()).ready          # the decoder still serves


def test_encoder_upload_is_refused_and_stores_nothing(dec_server, tiny_model, tmp_path):
    from dispatcher.client import Client, VbertError
    from vbert.artifact import save_artifact

    s = dec_server
    path = save_artifact(make_artifact(tiny_model.spec.shape, "lora", classify(2), 1, rank=2), tmp_path / "cls")
    blobs = sorted(p.name for p in s.app.manager.store.root.rglob("*") if p.is_file())
    with Client(s.address, admin_token=ADMIN_TOKEN) as admin:
        with pytest.raises(VbertError) as e:
            admin.upload_adapter("acme", "cls", path)
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "no encoder backbone" in e.value.details
        assert "cls" not in {a["name"] for a in admin.list_adapters("acme")}
    assert sorted(p.name for p in s.app.manager.store.root.rglob("*") if p.is_file()) == blobs


def test_vbert_info_lists_only_the_decoder(decoder_dir, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    vbert = str(Path(sys.executable).parent / "vbert")
    out = subprocess.run([vbert, "info", "--backbones", "decoder", "--decoder", str(decoder_dir), "--data-dir",
                          str(tmp_path), "--device", "cpu", "-o", "json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert set(info) == {"decoder"} and info["decoder"]["kv_cache"]["blocks"] > 0
