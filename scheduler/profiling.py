"""`vbert profile`: measure each backbone's step latency on this machine for the placement simulator
(scheduler/latency_profile.py holds the result; scheduler/simulator.py reads it).

- encoder: one mixed-tenant forward (every row a different LoRA adapter, as in serving) of R rows of T tokens,
  on a grid of R x T;
- decoder: one decode step of B running sequences whose context holds C tokens (the KV blocks are allocated,
  not computed: a decode step's cost does not depend on what the cache holds), on a grid of B x C; one prefill
  chunk of N tokens. When the configured KV cache cannot hold the grid, this run uses a larger one (compute is
  measured; `memory_bytes` reports the configured budget);
- start_s: constructing the backbone (weights, pools, caches) until its first step is done, in this process
  (a Ray Serve replica adds Ray's own worker start: benchmarks/scaleout.py records `start_s` with replicas);
- memory_bytes: the tensors a replica holds (weights, adapter pool, KV cache), counted, not estimated;
- encoder-base: a BERT-base-shaped encoder (12 layers, hidden 768) with random weights and the configured
  encoder's tokenizer, profiled as the encoder is: a larger backbone for placement studies (a step's time and a
  replica's memory depend on the shape, not on the weights' values).

Each point is the median of `repeats` timed runs after one untimed run, on the CPU threads this process has.
"""
from __future__ import annotations

import dataclasses
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

from vbert.config import ModelConfig
from vbert.model import EncodeRow, MultiTenantModel

from .latency_profile import BackboneProfile, Curve, Grid, LatencyProfile

ENCODER_ROWS = (1, 4, 16, 64)
ENCODER_TOKENS = (16, 32, 64, 128)
DECODER_BATCH = (1, 4, 16, 32)
DECODER_CONTEXT = (64, 256, 512)
PREFILL_TOKENS = (16, 64, 256, 512)
BERT_BASE_SHAPE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
BACKBONES = ("encoder", "decoder", "encoder-base")


def timed(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))


def profile_encoder(config: ModelConfig, rows=ENCODER_ROWS, tokens=ENCODER_TOKENS, repeats: int = 3,
                    num_adapters: int = 16, seed: int = 0, progress=None) -> BackboneProfile:
    from vbert import AdapterArtifact, Head, HeadKind, HeadSpec, LoraAdapter

    t0 = time.perf_counter()
    model = MultiTenantModel(config)
    g = torch.Generator().manual_seed(seed)
    head = HeadSpec(HeadKind.CLASSIFY, ("a", "b", "c"))
    slots = [model.load_adapter(AdapterArtifact(LoraAdapter.random(model.spec.shape, rank=8, generator=g, std=0.05),
                                                Head.random(head, model.spec.hidden_size, generator=g)))
             for _ in range(min(num_adapters, config.pool.num_lora_slots))]
    vocab = model.spec.vocab_size

    def batch(r: int, t: int) -> list[EncodeRow]:
        ids = torch.randint(min(1000, vocab // 2), vocab, (r, t), generator=g).tolist()
        return [EncodeRow(row, slots[i % len(slots)]) for i, row in enumerate(ids)]

    model.forward(batch(1, 8))
    start_s = time.perf_counter() - t0
    grid = []
    for r in rows:
        line = []
        for t in tokens:
            b = batch(r, t)
            line.append(timed(lambda: model.forward(b), repeats))
            if progress:
                progress()
        grid.append(tuple(line))
    memory = {"weights": _tensor_bytes(model.encoder.parameters()), "adapter_pool": model.pool.total_bytes()}
    return BackboneProfile(model.name, "encoder", start_s, memory, step=Grid(tuple(rows), tuple(tokens), tuple(grid)))


def profile_decoder(config, device, batches=DECODER_BATCH, contexts=DECODER_CONTEXT, prefill=PREFILL_TOKENS,
                    repeats: int = 3, seed: int = 0, progress=None) -> BackboneProfile:
    from vbert.decoder import StepSequence
    from vbert.decoder_backbone import DecoderBackbone

    t0 = time.perf_counter()
    dec = DecoderBackbone.load(config, device)
    start_s = time.perf_counter() - t0      # + the first step, below
    configured_kv = dec.kv.total_bytes()
    kv_tokens = dec.kv.num_blocks * config.block_size     # what the server's budget holds
    per_token = configured_kv / (dec.kv.num_blocks * config.block_size)
    needed = int(per_token * config.block_size * max(batches) * (dec.kv.blocks_for(max(max(contexts) + 1, max(prefill))) + 1))
    if needed > configured_kv:   # the grid measures compute: a larger cache than the server's budget, for this run
        dec = DecoderBackbone.load(dataclasses.replace(config, kv_cache_bytes=needed), device)
    model, kv = dec.model, dec.kv
    lora = getattr(dec.lora, "lora_pool", dec.lora)
    g = torch.Generator().manual_seed(seed)
    vocab = dec.tokenizer.vocab_size

    def step(seqs: list[StepSequence], num_tokens: int):
        ids = torch.randint(min(100, vocab // 2), vocab, (num_tokens,), generator=g)
        return model.forward(ids, None, seqs, kv, lora)

    t1 = time.perf_counter()
    kv.allocate("warm", 8)
    step([StepSequence("warm", 0, 8)], 8)
    kv.free("warm")
    start_s += time.perf_counter() - t1
    grid = []
    for b in batches:
        line = []
        for c in contexts:
            for i in range(b):
                kv.allocate(("d", i), c + 1)
            seqs = [StepSequence(("d", i), c, 1) for i in range(b)]
            line.append(timed(lambda: step(seqs, b), repeats))
            for i in range(b):
                kv.free(("d", i))
            if progress:
                progress()
        grid.append(tuple(line))
    chunk = []
    for n in prefill:
        kv.allocate("p", n)
        chunk.append(timed(lambda: step([StepSequence("p", 0, n)], n), repeats))
        kv.free("p")
        if progress:
            progress()
    memory = {"weights": dec.weight_bytes(), "kv_cache": configured_kv,
              "adapter_pool": lora.total_bytes() if lora is not None else 0}
    return BackboneProfile(dec.name, "decoder", start_s, memory,
                           decode=Grid(tuple(batches), tuple(contexts), tuple(grid)),
                           prefill=Curve(tuple(prefill), tuple(chunk)), kv_tokens=kv_tokens)


def write_random_encoder(path, tokenizer_dir, seed: int = 0, max_position_embeddings: int = 512, **shape):
    """A BERT checkpoint with random weights (transformers' own initialization, seeded) of the given shape
    (BertConfig keys; default BERT-base) and the tokenizer of `tokenizer_dir`, written to `path`."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = Path(path)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), max_position_embeddings=max_position_embeddings, type_vocab_size=2,
                     pad_token_id=tok.pad_token_id or 0, **(shape or BERT_BASE_SHAPE))
    BertModel(cfg, add_pooling_layer=True).save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return path


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def profile(server_config, backbones: Iterable[str], repeats: int = 3, progress=None) -> LatencyProfile:
    """Profile the named backbones (BACKBONES) as `server_config` configures them (encoder-base: the encoder's
    configuration with a random BERT-base-shaped checkpoint)."""
    unknown = sorted(set(backbones) - set(BACKBONES))
    if unknown:
        raise ValueError(f"unknown backbone(s) {unknown}: profile any of {BACKBONES}")
    out = {}
    for name in backbones:
        if name == "encoder":
            out[name] = profile_encoder(server_config.model_config(), repeats=repeats, progress=progress)
        elif name == "encoder-base":
            import tempfile

            config = server_config.model_config()
            with tempfile.TemporaryDirectory(prefix="vbert-encoder-base-") as tmp:
                from vbert.config import default_backbone_path

                path = write_random_encoder(Path(tmp) / "bert-base-random",
                                            config.backbone.path or default_backbone_path())
                config = dataclasses.replace(config, backbone=dataclasses.replace(config.backbone, path=str(path)))
                out[name] = profile_encoder(config, repeats=repeats, progress=progress)
        elif name == "decoder":
            from vbert.device import DeviceContext

            out[name] = profile_decoder(server_config.decoder_config(),
                                        DeviceContext.create(server_config.device, server_config.dtype),
                                        repeats=repeats, progress=progress)
    return LatencyProfile(out, machine())
