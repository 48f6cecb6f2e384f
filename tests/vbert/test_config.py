import pytest

from vbert import BackboneConfig, BatchingConfig, PoolConfig
from vbert.device import DeviceContext


@pytest.mark.parametrize("make,message", [
    (lambda: BackboneConfig(path="/nonexistent"), "is not a directory"),
    (lambda: BackboneConfig(dtype="int8"), "dtype 'int8' is not one of"),
    (lambda: BackboneConfig(device="tpu"), "expected auto, cpu, cuda or cuda:N"),
    (lambda: BackboneConfig(device="cpu", dtype="float16"), "only supported on CUDA"),
    (lambda: PoolConfig(num_lora_slots=-1), "num_lora_slots must be >= 0"),
    (lambda: PoolConfig(max_lora_rank=0), "max_lora_rank must be >= 1"),
    (lambda: PoolConfig(lora_targets=("query", "pooler")), r"unknown lora targets \['pooler'\]"),
    (lambda: BatchingConfig(bucket_overhead_tokens=-1), "bucket_overhead_tokens must be >= 0"),
])
def test_configs_validate_at_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_device_context_cpu():
    d = DeviceContext.create("cpu", "auto")
    assert d.dtype_name == "float32" and not d.is_cuda and d.new_stream() is None
    with d.stream(None):
        pass


def test_backbone_errors_name_the_problem(tmp_path):
    from vbert.backbone import BackboneSpec

    with pytest.raises(ValueError, match="no config.json"):
        BackboneSpec.from_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        BackboneSpec.from_checkpoint(tmp_path)
