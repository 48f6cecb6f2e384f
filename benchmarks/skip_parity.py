#!/usr/bin/env python
"""Skip mode on held-out text against the full model, nothing else loaded: is routed skip mode at parity?

    python benchmarks/skip_parity.py --json benchmarks/results/cpu-DATE/skip/skip_parity.json

Four contenders on the same held-out rows (test-set sentences packed into B x L tokens, as
benchmarks/skip.py's held_out), timed side by side, every contender once per iteration in a seeded
random order: the full model, skip mode with route "layers" (every row on the real lower layers: the
split forward without the router), skip mode with route "cost" (the default: the router decides), and
a second copy of the full model loaded last (how far two identical contenders land), and skip mode with
route "cost" running on the full model's own encoder object (`skip_cost_shared`: the same weights in
memory as `full`, so only the router and the split differ, not where each copy's weights landed). For
each, the median of the per-iteration full / contender time ratios with a 95 % bootstrap interval; the
router's own time inside the cost contenders (trigram keys, lookups, the per-row choice); and, per
contender, the median time per batch in the encoder's layers (`run_layers`: the lower and the upper
layers of a skip contender, all six of a full one) and outside them. Defaults: the shipped shallow
layers and var/table-shipped.safetensors (`vbert build-table` from the shipped layers). JSON and a PNG.
"""
from __future__ import annotations

import argparse
import datetime
import json
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
from skip import DEFAULT_HELD_OUT, packed_rows, paired_ratio  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True)
    p.add_argument("--shallow", default=None, help="shallow layers (default: the shipped ones)")
    p.add_argument("--table", default=str(REPO / "var" / "table-shipped.safetensors"))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()

    from training.data import read_corpus
    from vbert import BackboneConfig, EncodeRow, ModelConfig, MultiTenantModel
    from vbert.config import SkipConfig, SkipTableConfig, default_shallow_path

    shallow = args.shallow or default_shallow_path()
    if not Path(args.table).is_file():
        raise SystemExit(f"{args.table} does not exist: `vbert build-table --corpus TEXT --out {args.table}`")
    base = BackboneConfig(device="cpu", dtype="float32")

    def skip(route: str) -> MultiTenantModel:
        return MultiTenantModel(ModelConfig(backbone=base, skip=SkipConfig(
            (SkipTableConfig("bench", str(shallow), args.table),), route=route)))

    models = {"full": MultiTenantModel(ModelConfig(backbone=base)), "skip_layers": skip("layers"),
              "skip_cost": skip("cost")}
    models["full_copy"] = MultiTenantModel(ModelConfig(backbone=base))
    models["skip_cost_shared"] = skip("cost")
    models["skip_cost_shared"].encoder = models["full"].encoder      # the same weights as `full` (its own freed)
    router = {k: [] for k in ("skip_cost", "skip_cost_shared")}      # seconds of the per-row choice, per call
    layers = {k: [] for k in models}                                 # seconds in run_layers, per batch
    current = {}

    def timed(fn, sink):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            sink(time.perf_counter() - t0)
            return out
        return wrapper

    for name in router:
        runtime = models[name].skip
        runtime._choose = timed(runtime._choose, router[name].append)
    for name, model in models.items():
        if name == "skip_cost_shared":
            continue                                  # its encoder is full's: timed once, charged to the caller
        model.encoder.run_layers = timed(model.encoder.run_layers,
                                         lambda dt: current.__setitem__("layers", current.get("layers", 0.0) + dt))
    texts = [t for f in DEFAULT_HELD_OUT for t in read_corpus(str(f))]
    rows = packed_rows(models["full"].tokenizer, texts, args.seq, args.batch * (args.iters + args.warmup))
    times = {k: [] for k in models}
    rng = random.Random(0)
    from dispatcher.heap import freeze_startup_heap
    freeze_startup_heap()          # as a server does once it is up (dispatcher/heap.py)
    for it in tqdm(range(args.warmup + args.iters), desc="iterations", unit="it"):
        batch = [EncodeRow(r) for r in rows[it * args.batch:(it + 1) * args.batch]]
        names = list(models)
        rng.shuffle(names)
        for n in names:
            current["layers"] = 0.0
            t0 = time.perf_counter()
            models[n].forward(batch)
            if it >= args.warmup:
                times[n].append(time.perf_counter() - t0)
                layers[n].append(current["layers"])
    router = {k: v[args.warmup:] for k, v in router.items()}
    stats = models["skip_cost"].skip.stats()["bench"]
    phases = {k: {"layers_s": statistics.median(layers[k]),
                  "outside_layers_s": statistics.median(t - x for t, x in zip(times[k], layers[k]))} for k in models}
    out = {"date": datetime.date.today().isoformat(), "machine": platform.platform(), "batch": args.batch,
           "seq": args.seq, "iters": args.iters, "shallow": str(shallow), "table": args.table,
           "seconds_median": {k: statistics.median(v) for k, v in times.items()},
           "paired": {k: paired_ratio(times["full"], v) for k, v in times.items() if k != "full"},
           "router_seconds_median": statistics.median(router["skip_cost"]),
           "router_share_of_skip_cost": statistics.median(router["skip_cost"]) / statistics.median(times["skip_cost"]),
           "router_seconds_median_shared": statistics.median(router["skip_cost_shared"]),
           "phases": phases, "rows_layers": stats["rows_layers"], "rows_table": stats["rows_table"],
           "seconds_all": times}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    plot(out, path.with_suffix(".png"))
    print(json.dumps({k: out[k] for k in ("seconds_median", "paired", "router_seconds_median", "phases",
                                          "router_share_of_skip_cost", "rows_layers", "rows_table")}, indent=2))


def plot(out: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["full", *out["paired"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    lay = [1e3 * out["phases"][n]["layers_s"] for n in names]
    rest = [1e3 * out["phases"][n]["outside_layers_s"] for n in names]
    left.bar(names, lay, label="encoder layers")
    left.bar(names, rest, bottom=lay, label="outside the layers (router, embeddings, heads)")
    left.set_ylabel("ms per batch (median)")
    left.tick_params(axis="x", rotation=20)
    left.legend(fontsize=8)
    paired = [out["paired"][n] for n in names[1:]]
    med = [p["median"] for p in paired]
    err = [[m - p["ci95"][0] for m, p in zip(med, paired)], [p["ci95"][1] - m for m, p in zip(med, paired)]]
    right.bar(names[1:], med, yerr=err, capsize=6, color="tab:green")
    right.axhline(1.0, color="gray", linestyle="--")
    right.set_ylim(min(0.9, min(med) - 0.02), max(1.1, max(med) + 0.02))
    right.set_ylabel("full / contender time (paired median, 95 % CI)")
    right.tick_params(axis="x", rotation=20)
    fig.suptitle(f"held-out rows, B={out['batch']}, L={out['seq']}, {out['iters']} iterations", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
