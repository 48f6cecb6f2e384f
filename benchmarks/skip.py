#!/usr/bin/env python
"""Skip mode vs the full model: the lowest k layers served from an n-gram table.

    python benchmarks/skip.py --shallow var/shallow-k3 --json benchmarks/results/cpu-DATE/skip.json

Same process, same inputs, timed interleaved (each iteration runs every contender once, in a
seeded random order): the full 6-layer model, and skip mode (k = 3 of 6) on
  in_corpus   rows of the corpus the table was built from: its sentences of >= --seq tokens,
              truncated to --seq as the server truncates them (every trigram is in the table)
  held_out    test-set sentences packed into rows of --seq tokens (text the table has not seen; exact
              mode: misses computed by the shallow layers and cached)
  fallback    the held-out rows in fallback mode (misses -> bigram / unigram entries; approximate)
Skip mode routes as the server does by default (route "cost": a row whose misses would cost more
than the real lower layers runs those layers); held_out_table is the held-out rows with every row
on the table (route "table", misses computed: what skip mode did before routing).
Every row has exactly --seq real tokens (B x L, no padding); both models get the same rows.
Then the warm stream (benchmarks/skip_stream.py, --stream-passes 0 to leave it out): the held-out
test sets served in order, sentence by sentence in batches of --batch, --stream-passes times, by the
full model and three skip contenders (route cost; route cost with --warm-budget; route table), timed
side by side; coverage and skip / full per window of requests, and per pass.
The table's entries (and so every miss) are computed in --compute-dtype (build-table's default, auto: bfloat16
on a CPU with AVX-512 BF16); unless it is float32, a second table of the same corpus computed in float32 (what
tables were before) serves the contender skip_held_out_float32 and the stream's cost_float32 beside it
(--no-float32-beside leaves them out).
Without --shallow the shallow layers are the teacher's own lower layers (undistilled: the speed is
the same, the outputs are not). Without --table one is built from --corpus into a temporary file.
Writes the JSON (full_tokens_per_s, skip_tokens_per_s, skip_over_full, hit_rate, table_bytes, ...;
"paired": the median of the per-iteration full / skip time ratios with a 95 % bootstrap interval, in
corpus and held out; held_out.paired_full_copies: the same statistic for a second copy of the full
model, loaded after the skip models: the spread two identical contenders show; held_out.paired_same_weights:
the held-out skip contender's twin running on the full model's own encoder object, so both read the same
weights in memory and only skip mode's own work differs) and a PNG next to it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"
DEFAULT_CORPUS = [DATA / "cls/sci-cite/train.txt", DATA / "cls/rct-20k/train.txt", DATA / "cls/chemprot/train.txt",
                  DATA / "ner/NCBI-disease/train.txt"]
DEFAULT_HELD_OUT = [DATA / "cls/sci-cite/test.txt", DATA / "cls/rct-20k/test.txt", DATA / "ner/NCBI-disease/test.txt"]
DEFAULT_STREAM = [DATA / "cls/sci-cite/test.txt", DATA / "cls/rct-20k/test.txt", DATA / "cls/chemprot/test.txt",
                  DATA / "ner/NCBI-disease/test.txt"]


def packed_rows(tokenizer, texts: list[str], seq: int, count: int) -> list[list[int]]:
    """`count` rows of exactly `seq` ids: [CLS] + consecutive sentences' word pieces + [SEP]."""
    body = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        body.extend(ids)
        if len(body) >= count * (seq - 2):
            break
    if len(body) < count * (seq - 2):
        raise SystemExit(f"not enough text for {count} rows of {seq} tokens")
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    return [[cls] + body[i * (seq - 2):(i + 1) * (seq - 2)] + [sep] for i in range(count)]


def long_rows(tokenizer, texts: list[str], seq: int, count: int) -> list[list[int]]:
    """`count` rows of exactly `seq` ids: the sentences of at least `seq` tokens, truncated as the
    server and `vbert build-table` truncate them, reused in turn if there are fewer than `count`."""
    rows = [r for r in tokenizer(texts, truncation=True, max_length=seq)["input_ids"] if len(r) == seq]
    if not rows:
        raise SystemExit(f"no sentence of {seq} tokens in the corpus")
    return [rows[i % len(rows)] for i in range(count)]


def paired_ratio(full_s: list[float], skip_s: list[float], resamples: int = 2000, seed: int = 0) -> dict:
    """Speed of skip over full from iterations timed side by side: the median of the per-iteration
    ratios full_s[i] / skip_s[i] (> 1: skip faster) and a 95 % percentile-bootstrap interval of that
    median, so a ratio of 0.99 can be told from noise."""
    import numpy as np

    if len(full_s) != len(skip_s) or not full_s:
        raise ValueError(f"need the same number (>= 1) of paired times, got {len(full_s)} and {len(skip_s)}")
    r = np.asarray(full_s, dtype=float) / np.asarray(skip_s, dtype=float)
    rng = np.random.default_rng(seed)
    medians = np.median(r[rng.integers(0, len(r), size=(resamples, len(r)))], axis=1)
    low, high = np.percentile(medians, [2.5, 97.5])
    return {"median": float(np.median(r)), "ci95": [float(low), float(high)], "pairs": len(r),
            "skip_faster_share": float(np.mean(r > 1.0))}


def shallow_dir(args, teacher, tmp: Path) -> Path:
    from vbert.shallow import ShallowModel, save_shallow, teacher_upper_hash

    if args.shallow:
        return Path(args.shallow)
    model = ShallowModel.from_teacher(teacher, args.skip_layers, teacher.spec.pad_token_id)
    save_shallow(model, tmp / "shallow", "all-MiniLM-L6-v2", teacher_upper_hash(teacher, args.skip_layers))
    return tmp / "shallow"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True)
    p.add_argument("--shallow", default=None, help="`vbert distill` output (default: undistilled teacher layers)")
    p.add_argument("--table", default=None, help="`vbert build-table` output (default: built from --corpus)")
    p.add_argument("--corpus", nargs="*", default=[str(x) for x in DEFAULT_CORPUS])
    p.add_argument("--held-out", nargs="*", default=[str(x) for x in DEFAULT_HELD_OUT])
    p.add_argument("--budget-mb", type=float, default=None, help="table budget (default: build-table's)")
    p.add_argument("--compute-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="what the built table's entries and misses are computed in (build-table's --compute-dtype)")
    p.add_argument("--no-float32-beside", action="store_true",
                   help="leave out the contenders on a second table computed in float32")
    p.add_argument("--cache-entries", type=int, default=None, help="miss cache entries (default: the server's)")
    p.add_argument("--stream", nargs="*", default=[str(x) for x in DEFAULT_STREAM])
    p.add_argument("--stream-passes", type=int, default=2)
    p.add_argument("--stream-window", type=int, default=256, help="requests per point of the stream plot")
    p.add_argument("--stream-max", type=int, default=None, help="requests of the stream at most (default all)")
    p.add_argument("--warm-budget", type=float, default=0.5, help="the warming contender's skip_warm_budget")
    p.add_argument("--restart-between-passes", action="store_true",
                   help="restart every skip contender between stream passes: its miss cache saved and restored, "
                        "as a server with skip_keep_cache does across a restart")
    p.add_argument("--skip-layers", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-freeze", action="store_true", help="leave the set-up heap in the garbage collector's full "
                   "passes (a server freezes it: dispatcher/heap.py)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from training.data import read_corpus
    from training.table import TableConfig, build_table
    from vbert import BackboneConfig, EncodeRow, ModelConfig, MultiTenantModel
    from vbert.backbone import Encoder
    from dispatcher.config import ServerConfig
    from vbert.config import SkipConfig, SkipTableConfig, default_backbone_path

    from skip_stream import plot_stream, run_stream

    if args.budget_mb is None:
        args.budget_mb = TableConfig.__dataclass_fields__["budget_mb"].default
    if args.cache_entries is None:
        args.cache_entries = ServerConfig.__dataclass_fields__["skip_cache_entries"].default

    tmp = tempfile.TemporaryDirectory(prefix="vbert-skip-bench-")
    teacher = Encoder.from_checkpoint(default_backbone_path())
    shallow = shallow_dir(args, teacher, Path(tmp.name))
    table_path = args.table
    build = None
    if table_path is None:
        table_path = str(Path(tmp.name) / "table.safetensors")
        build = build_table(TableConfig(shallow=str(shallow), corpus=tuple(args.corpus), out=table_path,
                                        budget_mb=args.budget_mb, compute_dtype=args.compute_dtype), echo=tqdm.write)
    f32_path, f32_build = None, None
    if build is not None and build["compute_dtype"] != "float32" and not args.no_float32_beside:
        f32_path = str(Path(tmp.name) / "table-float32.safetensors")
        f32_build = build_table(TableConfig(shallow=str(shallow), corpus=tuple(args.corpus), out=f32_path,
                                            budget_mb=args.budget_mb, compute_dtype="float32"), echo=tqdm.write)

    base = BackboneConfig(device="cpu", dtype="float32")
    full = MultiTenantModel(ModelConfig(backbone=base))
    def skip_model(mode: str, route: str = "cost", warm: float = 0.0, cache_dir: str | None = None,
                   table: str | None = None) -> MultiTenantModel:
        return MultiTenantModel(ModelConfig(backbone=base, skip=SkipConfig(
            (SkipTableConfig("bench", str(shallow), table or table_path),), mode=mode,
            miss_cache_entries=args.cache_entries,
            route=route, warm_budget=warm, cache_dir=cache_dir)))

    skip = {"in_corpus": skip_model("exact"), "held_out": skip_model("exact"),
            "held_out_table": skip_model("exact", "table"), "fallback": skip_model("fallback")}
    if f32_path is not None:
        skip["held_out_float32"] = skip_model("exact", table=f32_path)
    full_copy = MultiTenantModel(ModelConfig(backbone=base))   # a second copy, loaded last: the noise floor
    same_weights = skip_model("exact")
    same_weights.encoder = full.encoder        # the full model's weights (its own copy freed): no placement lottery
    tok = full.tokenizer
    n = args.batch * (args.iters + args.warmup)
    corpus_texts = [t for f in args.corpus for t in read_corpus(f)]
    held_texts = [t for f in args.held_out for t in read_corpus(f)]
    inputs = {"in_corpus": long_rows(tok, corpus_texts, args.seq, n),
              "held_out": packed_rows(tok, held_texts, args.seq, n)}
    contenders = {
        "full": (full, "in_corpus"),
        "skip_in_corpus": (skip["in_corpus"], "in_corpus"),
        "full_held_out": (full, "held_out"),
        "skip_held_out": (skip["held_out"], "held_out"),
        "skip_held_out_table": (skip["held_out_table"], "held_out"),
        "skip_fallback": (skip["fallback"], "held_out"),
        "full_copy_held_out": (full_copy, "held_out"),
        "skip_held_out_same_weights": (same_weights, "held_out"),
    }
    if f32_path is not None:
        contenders["skip_held_out_float32"] = (skip["held_out_float32"], "held_out")
    times = {name: [] for name in contenders}
    snapshots = {}
    total = args.warmup + args.iters
    if not args.no_freeze:     # as a server does once it is up (dispatcher/heap.py): full collections skip the models
        from dispatcher.heap import freeze_startup_heap
        freeze_startup_heap()
    order_rng = random.Random(0)
    for it in tqdm(range(total), desc="iterations", unit="it"):
        rows_of = {k: v[it * args.batch:(it + 1) * args.batch] for k, v in inputs.items()}
        names = list(contenders)
        order_rng.shuffle(names)                # a new order each iteration: no contender always follows the same one
        for name in names:
            model, which = contenders[name]
            batch = [EncodeRow(r) for r in rows_of[which]]
            t0 = time.perf_counter()
            model.forward(batch)
            dt = time.perf_counter() - t0
            if it >= args.warmup:
                times[name].append(dt)
        if it == args.warmup - 1:
            snapshots = {m: json.loads(json.dumps(s.skip.stats())) for m, s in skip.items()}

    tokens = args.batch * args.seq
    tps = {name: tokens / statistics.median(t) for name, t in times.items()}

    def measured(which: str) -> dict:
        """Counters of the measured iterations only (after warm-up)."""
        now, then = skip[which].skip.stats()["bench"], snapshots[which]["bench"]
        d = {k: now[k] - then[k] for k in ("tokens", "lookups", "table_hits", "cache_hits", "computed", "fallback",
                                            "rows_table", "rows_layers", "layer_tokens", "probed", "probed_known")}
        d["hit_rate"] = (d["table_hits"] + d["cache_hits"]) / d["lookups"] if d["lookups"] else 0.0
        d["table_hit_rate"] = d["table_hits"] / d["lookups"] if d["lookups"] else 0.0
        d["coverage"] = d["probed_known"] / d["probed"] if d["probed"] else d["hit_rate"]
        return d

    table = skip["in_corpus"].skip.tables["bench"]
    result = {
        "date": datetime.date.today().isoformat(), "machine": platform.platform(), "processor": platform.processor(),
        "threads": torch.get_num_threads(), "heap_frozen": not args.no_freeze, "batch": args.batch, "seq": args.seq,
        "iters": args.iters,
        "skip_layers": args.skip_layers, "num_layers": full.spec.num_layers,
        "shallow": str(args.shallow) if args.shallow else "undistilled (teacher's lower layers)",
        "table": args.table or f"built from {[Path(c).name for c in args.corpus]} ({args.budget_mb:g} MiB budget)",
        "table_build": build, "compute_dtype": build["compute_dtype"] if build else "as the table records",
        "full_tokens_per_s": tps["full"], "skip_tokens_per_s": tps["skip_in_corpus"],
        "skip_over_full": tps["skip_in_corpus"] / tps["full"],
        "held_out": {"full_tokens_per_s": tps["full_held_out"], "skip_tokens_per_s": tps["skip_held_out"],
                     "skip_over_full": tps["skip_held_out"] / tps["full_held_out"],
                     "table_route_tokens_per_s": tps["skip_held_out_table"],
                     "table_route_over_full": tps["skip_held_out_table"] / tps["full_held_out"],
                     "fallback_tokens_per_s": tps["skip_fallback"],
                     "fallback_over_full": tps["skip_fallback"] / tps["full_held_out"],
                     "paired": paired_ratio(times["full_held_out"], times["skip_held_out"]),
                     # the same full model, loaded twice: how far apart two identical contenders land
                     "paired_full_copies": paired_ratio(times["full_held_out"], times["full_copy_held_out"]),
                     "paired_same_weights": paired_ratio(times["full_held_out"], times["skip_held_out_same_weights"])},
        "paired": paired_ratio(times["full"], times["skip_in_corpus"]),
        "hit_rate": measured("in_corpus")["hit_rate"], "counters_in_corpus": measured("in_corpus"),
        "counters_held_out": measured("held_out"), "counters_held_out_table": measured("held_out_table"),
        "counters_fallback": measured("fallback"), "budget_mb": args.budget_mb, "cache_entries": args.cache_entries,
        "costs": skip["held_out"].skip.costs.to_dict(),
        "table_bytes": table.table.nbytes(), "table_entries": len(table.table.keys),
        "miss_cache_bytes": table.cache.values.nbytes,
        "seconds_median": {k: statistics.median(v) for k, v in times.items()},
        "float32_beside": None if f32_path is None else {
            "table_build": f32_build, "skip_over_full": tps["skip_held_out_float32"] / tps["full_held_out"],
            "paired": paired_ratio(times["full_held_out"], times["skip_held_out_float32"]),
            "counters": measured("held_out_float32"), "costs": skip["held_out_float32"].skip.costs.to_dict()},
        "seconds_all": times,
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, tps, out.with_suffix(".png"))
    if args.stream_passes > 0:
        del skip, contenders                                         # fresh models: a cold miss cache
        texts = [t for f in args.stream for t in read_corpus(f)][:args.stream_max]
        rows = full.tokenize(texts)
        settings = {"cost": {"mode": "exact", "route": "cost"},
                    "cost_warm": {"mode": "exact", "route": "cost", "warm": args.warm_budget},
                    "table": {"mode": "exact", "route": "table"}}
        if f32_path is not None:
            settings["cost_float32"] = {"mode": "exact", "route": "cost", "table": f32_path}
        keep = Path(tmp.name) / "misses"

        def restart(name: str, model: MultiTenantModel) -> MultiTenantModel:
            """What a server restart with skip_keep_cache does: save the caches, start anew, restore them."""
            model.skip.save_caches(keep / name)
            return skip_model(**settings[name], cache_dir=str(keep / name))

        streamers = {name: skip_model(**s) for name, s in settings.items()}
        stream = run_stream(full, streamers, rows, args.batch, args.stream_passes, args.stream_window, "bench",
                            restart if args.restart_between_passes else None)
        stream["restart_between_passes"] = args.restart_between_passes
        stream["texts"] = [str(Path(f).relative_to(DATA)) if Path(f).is_relative_to(DATA) else f for f in args.stream]
        stream["warm_budget"] = args.warm_budget
        last = {n: stream["per_pass"][n][-1]["skip_over_full"] for n in streamers}
        first = {n: stream["per_pass"][n][0]["skip_over_full"] for n in streamers}
        result["stream"] = stream
        result["stream_first_pass_over_full"] = first
        result["stream_after_one_pass_over_full"] = last
        out.write_text(json.dumps(result, indent=2))
        plot_stream(stream, {"cost": "route cost (default)", "cost_warm": f"route cost, warm budget {args.warm_budget:g}",
                             "table": "route table (every row on the table)",
                             "cost_float32": "route cost, table computed in float32"},
                    out.with_name(out.stem + "-stream.png"))
    print(json.dumps({k: result.get(k) for k in ("full_tokens_per_s", "skip_tokens_per_s", "skip_over_full", "paired", "hit_rate",
                                                 "table_bytes", "held_out", "stream_first_pass_over_full",
                                                 "stream_after_one_pass_over_full")}, indent=2))


def plot(result: dict, tps: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["full\n(in-corpus)", "skip\n(in-corpus)", "full\n(held-out)", "skip exact\n(held-out)",
              "skip exact,\nall on table\n(held-out)", "skip fallback\n(held-out)"]
    values = [tps[k] for k in ("full", "skip_in_corpus", "full_held_out", "skip_held_out", "skip_held_out_table",
                               "skip_fallback")]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar(labels, values, color=["#888", "#2a7", "#888", "#2a7", "#8c8", "#7a2"])
    ax.set_ylabel("tokens / s")
    ax.set_title(f"skip {result['skip_layers']} of {result['num_layers']} layers, B={result['batch']} "
                 f"L={result['seq']}: skip/full {result['skip_over_full']:.2f} (held-out trigrams in the table "
                 f"or cache: {result['counters_held_out']['coverage']:.2f})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
