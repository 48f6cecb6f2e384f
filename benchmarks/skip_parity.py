#!/usr/bin/env python
"""Skip mode on held-out text against the full model, nothing else loaded: is routed skip mode at parity?

    python benchmarks/skip_parity.py --json benchmarks/results/cpu-DATE/skip/skip_parity.json

Four contenders on the same held-out rows (test-set sentences packed into B x L tokens, as
benchmarks/skip.py's held_out), timed side by side, every contender once per iteration in a seeded
random order: the full model, skip mode with route "layers" (every row on the real lower layers: the
split forward without the router), skip mode with route "cost" (the default: the router decides), and
a second copy of the full model loaded last (how far two identical contenders land). For each, the
median of the per-iteration full / contender time ratios with a 95 % bootstrap interval; and the
router's own time inside the cost contender (trigram keys, lookups, the per-row choice). Defaults: the
shipped shallow layers and var/table-shipped.safetensors (`vbert build-table` from the shipped layers).
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
    router = []                                   # seconds of the cost contender's per-row choice
    runtime = models["skip_cost"].skip
    choose = runtime._choose

    def timed_choose(*a, **k):
        t0 = time.perf_counter()
        out = choose(*a, **k)
        router.append(time.perf_counter() - t0)
        return out

    runtime._choose = timed_choose
    texts = [t for f in DEFAULT_HELD_OUT for t in read_corpus(str(f))]
    rows = packed_rows(models["full"].tokenizer, texts, args.seq, args.batch * (args.iters + args.warmup))
    times = {k: [] for k in models}
    rng = random.Random(0)
    for it in tqdm(range(args.warmup + args.iters), desc="iterations", unit="it"):
        batch = [EncodeRow(r) for r in rows[it * args.batch:(it + 1) * args.batch]]
        names = list(models)
        rng.shuffle(names)
        for n in names:
            t0 = time.perf_counter()
            models[n].forward(batch)
            if it >= args.warmup:
                times[n].append(time.perf_counter() - t0)
    router = router[args.warmup:]
    stats = runtime.stats()["bench"]
    out = {"date": datetime.date.today().isoformat(), "machine": platform.platform(), "batch": args.batch,
           "seq": args.seq, "iters": args.iters, "shallow": str(shallow), "table": args.table,
           "seconds_median": {k: statistics.median(v) for k, v in times.items()},
           "paired": {k: paired_ratio(times["full"], v) for k, v in times.items() if k != "full"},
           "router_seconds_median": statistics.median(router),
           "router_share_of_skip_cost": statistics.median(router) / statistics.median(times["skip_cost"]),
           "rows_layers": stats["rows_layers"], "rows_table": stats["rows_table"], "seconds_all": times}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps({k: out[k] for k in ("seconds_median", "paired", "router_seconds_median",
                                          "router_share_of_skip_cost", "rows_layers", "rows_table")}, indent=2))


if __name__ == "__main__":
    main()
