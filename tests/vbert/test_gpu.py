"""The same code on CUDA (skipped without it): fp32 matches the CPU exactly enough, fp16/bf16 closely."""
from __future__ import annotations

import random

import pytest
import torch

from tests.conftest import classify, embed_head, make_artifact, tag, tiny_pool_config
from vbert import BackboneConfig, EncodeRow, HeadKind, ModelConfig, MultiTenantModel

TOLERANCE = {"float32": 1e-4, "float16": 3e-2, "bfloat16": 1e-1}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", sorted(TOLERANCE))
def test_cuda_mixed_batch_matches_cpu(tiny_checkpoint, dtype):
    models = [MultiTenantModel(ModelConfig(BackboneConfig(path=str(tiny_checkpoint), device=d, dtype=t),
                                           tiny_pool_config()))
              for d, t in (("cpu", "float32"), ("cuda", dtype))]
    shape = models[0].spec.shape
    arts = [make_artifact(shape, "lora", classify(3), 1, rank=8), make_artifact(shape, "bottleneck", tag(4), 2, size=16),
            make_artifact(shape, "lora", embed_head("mean", True), 3, rank=2, layers=(2,))]
    rng = random.Random(0)
    rows_by_model = []
    for m in models:
        slots = [m.load_adapter(a) for a in arts]
        rng.seed(0)
        rows_by_model.append([EncodeRow([2] + [rng.randrange(5, 100) for _ in range(rng.randrange(2, 40))] + [3],
                                        rng.choice(slots + [0])) for _ in range(24)])
    cpu_out, gpu_out = (m.forward(rows) for m, rows in zip(models, rows_by_model))
    assert models[1].device.is_cuda and models[1].device.dtype_name == dtype
    for a, b in zip(cpu_out, gpu_out):
        x, y = (a.embedding, b.embedding) if a.kind is HeadKind.EMBED else (a.logits, b.logits)
        torch.testing.assert_close(y, x, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
