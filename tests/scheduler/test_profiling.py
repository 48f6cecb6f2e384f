"""`vbert profile`'s measurements on tiny random backbones: every grid point measured, memory counted from the
tensors, the JSON readable by the simulator's loader, and a KV cache too small for the grid refused by name."""
from __future__ import annotations

from scheduler.latency_profile import LatencyProfile
from scheduler.profiling import profile_decoder, profile_encoder
from tests.conftest import tiny_pool_config
from vbert import BackboneConfig, ModelConfig
from vbert.decoder_backbone import DecoderBackboneConfig
from vbert.device import DeviceContext


def test_encoder_profile_on_a_tiny_backbone(tiny_checkpoint, tmp_path):
    calls = []
    enc = profile_encoder(ModelConfig(BackboneConfig(path=str(tiny_checkpoint), device="cpu"), tiny_pool_config()),
                          rows=(1, 4), tokens=(8, 16), repeats=1, num_adapters=3, progress=lambda: calls.append(1))
    assert len(calls) == 4 and enc.kind == "encoder" and enc.start_s > 0
    assert all(s > 0 for row in enc.step.seconds for s in row)
    assert enc.memory_bytes["weights"] > 0 and enc.memory_bytes["adapter_pool"] > 0
    LatencyProfile({"encoder": enc}).save(tmp_path / "p.json")
    assert LatencyProfile.load(tmp_path / "p.json")["encoder"].encoder_step_s(2, 12) > 0


def test_decoder_profile_on_a_tiny_backbone(tmp_path):
    from tests.decoder_models import write_tiny_decoder_checkpoint

    path = write_tiny_decoder_checkpoint(tmp_path / "dec")
    config = DecoderBackboneConfig(path=str(path), kv_cache_bytes=1 << 20, block_size=16, num_lora_slots=2,
                                   max_lora_rank=4)
    dec = profile_decoder(config, DeviceContext.create("cpu", "float32"), batches=(1, 2), contexts=(16, 64),
                          prefill=(8, 32), repeats=1)
    assert dec.kind == "decoder" and dec.decode_step_s(2, 64) > 0 and dec.prefill_s(20) > 0
    assert 0 < dec.memory_bytes["kv_cache"] <= 1 << 20 and dec.memory_bytes["weights"] > 0
    # a grid larger than the configured KV cache is measured on a larger one; memory reports the configured budget
    big = profile_decoder(config, DeviceContext.create("cpu", "float32"), batches=(1, 64), contexts=(16, 200),
                          prefill=(8, 32), repeats=1)
    assert big.decode_step_s(64, 200) > 0 and big.memory_bytes["kv_cache"] == dec.memory_bytes["kv_cache"]


def test_a_random_encoder_of_another_shape_is_profiled_as_the_encoder_is(tiny_checkpoint, tmp_path):
    from scheduler.profiling import write_random_encoder

    shape = {"hidden_size": 48, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 96}
    path = write_random_encoder(tmp_path / "wide", tiny_checkpoint, max_position_embeddings=64, **shape)
    small = profile_encoder(ModelConfig(BackboneConfig(path=str(tiny_checkpoint), device="cpu"), tiny_pool_config()),
                            rows=(1, 2), tokens=(4, 8), repeats=1, num_adapters=2)
    wide = profile_encoder(ModelConfig(BackboneConfig(path=str(path), device="cpu"), tiny_pool_config()),
                           rows=(1, 2), tokens=(4, 8), repeats=1, num_adapters=2)
    # the weights and the adapter pool grow with the shape (counted from the tensors)
    assert wide.memory_bytes["weights"] > small.memory_bytes["weights"]
    assert wide.memory_bytes["adapter_pool"] > small.memory_bytes["adapter_pool"]
    assert wide.encoder_step_s(2, 8) > 0


def test_vbert_profile_refuses_an_unknown_backbone_by_name(tmp_path):
    from click.testing import CliRunner

    from dispatcher.commands.local import profile

    out = CliRunner().invoke(profile, ["--out", str(tmp_path / "p.json"), "--backbones", "encoder,bert-huge"])
    assert out.exit_code == 2 and "bert-huge" in out.output and "encoder-base" in out.output
    assert not (tmp_path / "p.json").exists()
