"""`vbert demo`: the default backbone, a few hundred random tenants, one mixed batch."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .adapters import BottleneckAdapter, LoraAdapter
from .artifact import AdapterArtifact
from .config import ModelConfig, PoolConfig
from .heads import Head, HeadKind, HeadSpec
from .model import EncodeRow, MultiTenantModel

SENTENCES = [
    "The patient was treated with cisplatin and showed a partial response.",
    "We propose a new method for citation intent classification.",
    "Expression of the BRCA1 gene was reduced in tumor cells.",
    "Results show a significant increase in survival at five years.",
    "This study follows the protocol of an earlier randomized trial.",
    "Mutations in this protein cause an inherited form of deafness.",
]


@dataclass
class Tenant:
    name: str
    slot: int
    kind: str
    head: HeadSpec


def build_tenants(model: MultiTenantModel, num_tenants: int, seed: int = 0) -> list[Tenant]:
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    shape, tenants = model.spec.shape, []
    for i in tqdm(range(num_tenants), desc="building tenants", unit="tenant"):
        if i % 2 == 0:
            adapter = LoraAdapter.random(shape, rank=rng.choice([4, 8, 16]), generator=g)
        else:
            adapter = BottleneckAdapter.random(shape, size=rng.choice([16, 32, 64]), generator=g)
        kind = rng.choice([HeadKind.CLASSIFY, HeadKind.TAG, HeadKind.EMBED])   # the encoder's heads
        if kind is HeadKind.EMBED:
            spec = HeadSpec(kind, pooling="mean", normalize=True)
        else:
            n = rng.randint(2, 9) if kind is HeadKind.CLASSIFY else rng.choice([3, 5, 9])
            spec = HeadSpec(kind, tuple(f"{kind.value[0]}{j}" for j in range(n)))
        slot = model.load_adapter(AdapterArtifact(adapter, Head.random(spec, shape.hidden_size, generator=g)))
        tenants.append(Tenant(f"tenant-{i:04d}", slot, adapter.kind, spec))
    return tenants


def run_demo(num_tenants: int = 300, batch: int = 32, repeats: int = 3, seed: int = 0, echo=print) -> dict:
    half = (num_tenants + 1) // 2
    model = MultiTenantModel(ModelConfig(pool=PoolConfig(num_lora_slots=half, num_bottleneck_slots=half)))
    echo(f"backbone {model.name} on {model.device.describe()} ({model.device.dtype_name})")
    tenants = build_tenants(model, num_tenants, seed)
    rng = random.Random(seed + 1)
    chosen = [rng.choice(tenants) for _ in range(batch)]
    texts = [rng.choice(SENTENCES) for _ in range(batch)]
    ids = model.tokenize(texts)
    rows = [EncodeRow(i, t.slot) for i, t in zip(ids, chosen)]
    outs = model.forward(rows)
    for t, text, out in zip(chosen, texts, outs):
        if out.kind is HeadKind.CLASSIFY:
            result = f"label={out.predicted()}"
        elif out.kind is HeadKind.TAG:
            result = "tags=" + " ".join(out.predicted()[:8]) + (" ..." if out.logits.shape[0] > 8 else "")
        else:
            result = f"embedding[{out.embedding.shape[0]}] norm={float(out.embedding.norm()):.3f}"
        echo(f"{t.name} {t.kind:<10} {out.kind.value:<8} {text[:40]:<40} {result}")
    tokens = sum(len(r.input_ids) for r in rows)
    start = time.perf_counter()
    for _ in range(repeats):
        model.forward(rows)
    model.device.synchronize()
    dt = (time.perf_counter() - start) / repeats
    summary = {"tenants": num_tenants, "rows": batch, "distinct_tenants": len({t.slot for t in chosen}),
               "tokens": tokens, "seconds_per_batch": dt, "rows_per_s": batch / dt, "tokens_per_s": tokens / dt}
    echo(f"mixed batch: {batch} rows of {summary['distinct_tenants']} tenants, {tokens} tokens, "
         f"{dt * 1000:.1f} ms -> {summary['rows_per_s']:.0f} rows/s, {summary['tokens_per_s']:.0f} tokens/s")
    return summary
