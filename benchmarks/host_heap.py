#!/usr/bin/env python
"""The host heap setting (`host_heap_keep_mb`, vbert.device.keep_host_heap) against glibc's defaults, side by side.

    python benchmarks/host_heap.py --json benchmarks/results/cpu-DATE/host_heap/host_heap.json

Two worker processes load the same models: one keeps up to --keep-mb MiB of freed memory (as `vbert serve` and
every Ray Serve replica do by default), the other leaves glibc's defaults (host_heap_keep_mb = 0). The parent
sends each workload to one worker at a time, both workers every iteration in a seeded random order, so they never
compute together and each pair of times is taken moments apart. Workloads, as the server runs them:
  encoder_B32_L128 / encoder_B32_L32 / encoder_B4_L32   the default encoder (MultiTenantModel.forward), random ids
  skip_misses_1024  the shipped shallow layers computing 1,024 unseen trigrams (skip mode's miss path, its
                    table's compute dtype: bfloat16 where the CPU does it fast)
  decoder_prefill_4x128 / decoder_decode_16x256   the default decoder's step: 4 prompts of 128 tokens; one token
                    for each of 16 sequences with 256 tokens of context (paged KV cache)
  train_B32_L128    one step of `vbert train` (classification, the default bottleneck recipe on the default
                    encoder): forward, cross-entropy, backward, AdamW, on 32 random rows of 128 tokens
Per workload: the median of the per-iteration default / kept time ratios (> 1: keeping the heap is faster) with
a 95 % bootstrap interval, each side's median time and minor page faults per call; per worker its peak resident
memory. JSON and a PNG beside it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import platform
import random
import statistics
import sys
import time
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from skip import paired_ratio  # noqa: E402

WORKLOADS = ("encoder_B32_L128", "encoder_B32_L32", "encoder_B4_L32", "skip_misses_1024",
             "decoder_prefill_4x128", "decoder_decode_16x256", "train_B32_L128")


def _worker(conn, keep_mb: int, threads: int | None, seed: int) -> None:
    """Load the models, then run what the parent names until it sends None."""
    import resource

    import torch

    from vbert.device import keep_host_heap

    kept = keep_host_heap(keep_mb)
    if threads:
        torch.set_num_threads(threads)
    from vbert import BackboneConfig, EncodeRow, ModelConfig, MultiTenantModel
    from vbert.backbone import Encoder
    from vbert.config import default_backbone_path, default_shallow_path
    from vbert.decoder import DecoderModel, StepSequence
    from vbert.decoder_checkpoint import default_decoder_path
    from vbert.device import DeviceContext
    from vbert.kv_cache import KVCacheConfig
    from vbert.ngram import key_bits, pack
    from vbert.shallow import load_shallow, resolve_compute_dtype, TABLE_DTYPES, compute_entries

    g = torch.Generator().manual_seed(seed)
    encoder = MultiTenantModel(ModelConfig(backbone=BackboneConfig(device="cpu", dtype="float32")))
    vocab = encoder.spec.vocab_size

    def rows(b: int, length: int) -> list:
        return [EncodeRow(torch.randint(1000, vocab, (length,), generator=g).tolist()) for _ in range(b)]

    shallow, _ = load_shallow(default_shallow_path(), Encoder.from_checkpoint(default_backbone_path()))
    compute_dtype = resolve_compute_dtype("auto", "cpu")
    computer = shallow.for_compute(compute_dtype)
    bits = key_bits(vocab)

    def misses(n: int) -> torch.Tensor:
        return pack(torch.randint(1000, vocab, (n, 3), generator=g), bits)

    cpu = DeviceContext.create("cpu", "float32")
    decoder = DecoderModel.from_pretrained(default_decoder_path(REPO / "var" / "models"), cpu)
    cache = decoder.new_cache(KVCacheConfig(block_size=16, budget_bytes=256 << 20))
    dvocab = decoder.spec.vocab_size

    def decoder_step(num_seqs: int, context: int, new: int) -> None:
        seqs = [StepSequence(("s", i), context, new) for i in range(num_seqs)]
        for s in seqs:
            cache.allocate(s.seq_id, context + new)
        ids = torch.randint(0, dvocab, (num_seqs * new,), generator=g)
        decoder.forward(ids, None, seqs, cache)
        for s in seqs:
            cache.free(s.seq_id)

    from training.model import AdapterConfig, TrainableModel, load_backbone
    from vbert.heads import HeadKind, HeadSpec

    trainee = TrainableModel(load_backbone(default_backbone_path()), AdapterConfig().resolved("classification"),
                             HeadSpec(HeadKind.CLASSIFY, ("a", "b", "c")))       # the default: a bottleneck
    optimizer = torch.optim.AdamW(trainee.trainable_parameters(), lr=1e-4)

    def train_step(b: int, length: int) -> None:
        with torch.inference_mode(False), torch.enable_grad():
            ids = torch.randint(1000, vocab, (b, length), generator=g)
            loss = torch.nn.functional.cross_entropy(trainee(ids, torch.ones_like(ids)),
                                                     torch.randint(0, 3, (b,), generator=g))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    work = {
        "train_B32_L128": lambda: train_step(32, 128),
        "encoder_B32_L128": lambda: encoder.forward(rows(32, 128)),
        "encoder_B32_L32": lambda: encoder.forward(rows(32, 32)),
        "encoder_B4_L32": lambda: encoder.forward(rows(4, 32)),
        "skip_misses_1024": lambda: compute_entries(computer, misses(1024), bits, TABLE_DTYPES["float16"]),
        "decoder_prefill_4x128": lambda: decoder_step(4, 0, 128),
        "decoder_decode_16x256": lambda: decoder_step(16, 256, 1),
    }
    conn.send({"kept": kept, "compute_dtype": compute_dtype})
    with torch.inference_mode():
        while True:
            name = conn.recv()
            if name is None:
                break
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            work[name]()
            dt = time.perf_counter() - t0
            conn.send((dt, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0))
    conn.send({"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True)
    p.add_argument("--keep-mb", type=int, default=None, help="the kept side's setting (default: the server's)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads of each worker (default: torch's)")
    p.add_argument("--workloads", nargs="*", default=list(WORKLOADS), choices=WORKLOADS)
    args = p.parse_args()
    if args.keep_mb is None:
        from dispatcher.config import ServerConfig
        args.keep_mb = ServerConfig.__dataclass_fields__["host_heap_keep_mb"].default
    if args.keep_mb <= 0:
        raise SystemExit("--keep-mb must be > 0 (the other side is glibc's defaults)")

    ctx = mp.get_context("spawn")
    sides = {"kept": args.keep_mb, "default": 0}
    conns, procs, info = {}, {}, {}
    for side, keep in sides.items():
        parent, child = ctx.Pipe()
        procs[side] = ctx.Process(target=_worker, args=(child, keep, args.threads, 0), daemon=True)
        procs[side].start()
        conns[side] = parent
    for side in sides:                         # both loaded before anything is timed
        info[side] = conns[side].recv()
    if not info["kept"]["kept"]:
        raise SystemExit("keep_host_heap had no effect here (the C library is not glibc): nothing to compare")

    times = {w: {s: [] for s in sides} for w in args.workloads}
    faults = {w: {s: [] for s in sides} for w in args.workloads}
    rng = random.Random(0)
    for it in tqdm(range(args.warmup + args.iters), desc="iterations", unit="it"):
        for w in args.workloads:
            order = list(sides)
            rng.shuffle(order)
            for side in order:
                conns[side].send(w)
                dt, flt = conns[side].recv()
                if it >= args.warmup:
                    times[w][side].append(dt)
                    faults[w][side].append(flt)
    for side in sides:
        conns[side].send(None)
        info[side].update(conns[side].recv())
        procs[side].join(timeout=60)

    result = {
        "date": datetime.date.today().isoformat(), "machine": platform.platform(), "processor": platform.processor(),
        "keep_mb": args.keep_mb, "iters": args.iters, "threads": args.threads or "torch default",
        "skip_compute_dtype": info["kept"]["compute_dtype"],
        "max_rss_mb": {s: info[s]["max_rss_mb"] for s in sides},
        "workloads": {w: {
            "paired_default_over_kept": paired_ratio(times[w]["default"], times[w]["kept"]),
            "median_s": {s: statistics.median(times[w][s]) for s in sides},
            "faults_per_call": {s: statistics.median(faults[w][s]) for s in sides},
        } for w in args.workloads},
        "seconds_all": times,
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    for w, r in result["workloads"].items():
        pr = r["paired_default_over_kept"]
        print(f"{w:24s} default/kept {pr['median']:.3f} ({pr['ci95'][0]:.3f}-{pr['ci95'][1]:.3f})  faults "
              f"{r['faults_per_call']['default']:.0f} -> {r['faults_per_call']['kept']:.0f}")
    print(f"peak RSS MB: kept {result['max_rss_mb']['kept']:.0f}, default {result['max_rss_mb']['default']:.0f}")
    print(f"wrote {out}")


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["workloads"])
    med = [result["workloads"][w]["paired_default_over_kept"]["median"] for w in names]
    lo = [m - result["workloads"][w]["paired_default_over_kept"]["ci95"][0] for m, w in zip(med, names)]
    hi = [result["workloads"][w]["paired_default_over_kept"]["ci95"][1] - m for m, w in zip(med, names)]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.barh(names, med, xerr=[lo, hi], color="tab:blue")
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xlabel("speed with the kept heap / glibc's defaults (paired median, 95 % CI)")
    ax.set_title(f"host_heap_keep_mb = {result['keep_mb']} vs 0, {result['date']}", fontsize=10)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
