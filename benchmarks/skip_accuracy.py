"""The skip issue's accuracy table: adapters on the full model vs in skip mode, on real data.

    python benchmarks/skip_accuracy.py --shallow var/shallow-k3c --table var/table-k3c.safetensors \
        --json benchmarks/results/cpu-DATE/skip_accuracy.json

Per set (sci-cite, rct-20k, NCBI-disease; recipe and epochs as benchmarks/training_table.py but NCBI-disease 5,
bottleneck adapters on the top 3 layers, the ones skip mode still runs):
  full-model adapter   `vbert train --layers 3`, scored on the full model, in skip mode (exact: the
                       table, misses computed by the shallow layers) and in fallback mode (approximate)
  skip-mode adapter    `vbert train --layers 3 --skip-shallow S --skip-table-file T`, scored in skip mode
                       and on the real lower layers (`--skip-route layers`)
--per-set SET=SHALLOW,TABLE scores one set with other shallow layers (per-domain layers, as vBERT distills
per domain); the JSON records which layers scored each set. Every command runs in its own process as a
user would run it; finished runs are reused (--rerun forces them; the runs that depend on the shallow
layers are kept per weights hash). Writes the JSON, a Markdown table (.md, deltas to two decimals, so
-2.04 is not shown as -2.0) and a PNG.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import sys
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training_table import (COMMON, REPO, SETS, grouped_bars, headline, metric_names, run_logged,  # noqa: E402
                            vbert)

SKIP_SETS = ("sci-cite", "rct-20k", "NCBI-disease")
EPOCHS = {"NCBI-disease": 5}          # fewer than the training table's 10 (time); the others as there
ADAPTER = ["--adapter-kind", "bottleneck", "--bottleneck-size", "64", "--lr", "3e-3", "--layers", "3"]
SCORES = {  # name: (adapter trained in skip mode?, evaluate flags beyond the common ones)
    "full-model adapter, full model": (False, []),
    "full-model adapter, skip mode (exact)": (False, ["skip"]),
    "full-model adapter, skip mode (fallback)": (False, ["skip", "--skip-mode", "fallback"]),
    "skip-mode adapter, skip mode (exact)": (True, ["skip"]),
    # what the server's cost route would give it on the real lower layers (the route keeps such rows on
    # the table; this row measures whether that is needed)
    "skip-mode adapter, real lower layers": (True, ["skip", "--skip-route", "layers"]),
}


def run_set(set_name: str, data: Path, runs: Path, shallow: str, table: str, rerun: bool,
            epochs: int | None = None, seed: int = 0) -> dict:
    """RUN = RUNS/skip-SET (seed 0) or RUNS/skip-SET-seedN. The full-model adapter does not depend on the shallow layers: it is trained
    and scored once per set (RUN/full-model) and reused across distillations; everything that does
    depend on them lives in RUN/shallow-<weights hash>[-<table compute dtype>]/, so a new distillation (or a table
    computed in another dtype) never reuses stale scores."""
    task, sub, default_epochs = SETS[set_name]
    epochs = epochs or EPOCHS.get(set_name, default_epochs)
    run = runs / (f"skip-{set_name}" if seed == 0 else f"skip-{set_name}-seed{seed}")
    weights = json.loads((Path(shallow) / "shallow.json").read_text())["weights_hash"][:12]
    compute = table_compute_dtype(table)          # a table computed in another dtype serves other values
    key = weights if compute == "float32" else f"{weights}-{compute}"
    if rerun and run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    skip_run = run / f"shallow-{key}"
    if (skip_run / "result.json").exists():
        return json.loads((skip_run / "result.json").read_text())
    if skip_run.exists():
        shutil.rmtree(skip_run)
    skip_run.mkdir()
    base = vbert() + ["train", "--task", task, "--train", str(data / sub / "train.txt"), "--dev",
                      str(data / sub / "dev.txt"), "--epochs", str(epochs)] + seeded(COMMON, seed) + ADAPTER
    skip_flags = ["--skip-shallow", shallow, "--skip-table-file", table]
    adapters = {False: run / "full-model", True: skip_run / "skip-mode"}
    trains = {False: base + ["--out", str(adapters[False])],
              True: base + ["--out", str(adapters[True])] + skip_flags}
    evals = {}
    for name, (in_skip, flags) in SCORES.items():
        extra = [f for f in flags if f != "skip"]
        if "skip" in flags:
            extra = ["--skip-shallow", shallow, "--skip-table", table] + extra
        out = (skip_run if "skip" in flags else run) / (
            name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "") + ".json")
        evals[name] = (out, vbert() + ["evaluate", "--adapter", str(adapters[in_skip]),
                                       "--test", str(data / sub / "test.txt"), "--json", str(out), "--device", "cpu",
                                       "--max-length", "128"] + extra)
    reference = evals["full-model adapter, full model"]
    commands = []
    reused = (reference[0].exists() and (adapters[False] / "training.json").exists()
              and json.loads((adapters[False] / "training.json").read_text())["args"]["epochs"] == epochs)
    if not reused:                          # the shallow-independent part, unless an earlier run finished it
        if adapters[False].exists():
            shutil.rmtree(adapters[False])
        commands += [trains[False], reference[1]]
    commands += [trains[True]] + [cmd for name, (_, cmd) in evals.items() if name != "full-model adapter, full model"]
    run_logged(run, commands)
    trained = {k: json.loads((adapters[k == "skip-mode"] / "training.json").read_text())
               for k in ("full-model", "skip-mode")}
    result = {"set": set_name, "task": task, "shallow_weights": weights, "table_compute_dtype": compute,
              "seed": seed,
              "scores": {name: json.loads(out.read_text()) for name, (out, _) in evals.items()},
              "train_seconds": {k: v["train_seconds"] for k, v in trained.items()},
              "trainable_parameters": trained["full-model"]["trainable_parameters"],
              "commands": {"train": {str(k): " ".join(v[2:]) for k, v in trains.items()},
                           "evaluate": {k: " ".join(v[1][2:]) for k, v in evals.items()}}}
    (skip_run / "result.json").write_text(json.dumps(result, indent=2))
    return result


def table_compute_dtype(table: str) -> str:
    """The dtype a `vbert build-table` file's entries were computed in (float32 for tables from before it was
    recorded)."""
    from safetensors import safe_open

    with safe_open(table, framework="pt") as f:
        return (f.metadata() or {}).get("compute_dtype", "float32")


def seeded(common: list[str], seed: int) -> list[str]:
    """The common training flags with --seed set to `seed`."""
    out = list(common)
    out[out.index("--seed") + 1] = str(seed)
    return out


def mean_over_seeds(runs: list[dict]) -> dict:
    """One set's runs (one per seed) as one result: every metric the mean over the seeds, the seeds'
    own results under "per_seed"; a single run is returned as it is."""
    if len(runs) == 1:
        return runs[0]
    scores = {}
    for name in runs[0]["scores"]:
        keys = [k for k, v in runs[0]["scores"][name].items() if isinstance(v, float)]
        scores[name] = {**runs[0]["scores"][name],
                        **{k: sum(r["scores"][name][k] for r in runs) / len(runs) for k in keys}}
    return {**runs[0], "seed": [r.get("seed", 0) for r in runs], "scores": scores,
            "train_seconds": {k: sum(r["train_seconds"][k] for r in runs) / len(runs) for k in runs[0]["train_seconds"]},
            "per_seed": runs}


def seed_deltas(result: dict, name: str) -> str:
    """' (seeds: -1.20, -0.80)' for a result averaged over seeds, else ''."""
    if "per_seed" not in result:
        return ""
    key = headline(result["task"])
    ds = [100 * (r["scores"][name][key] - r["scores"]["full-model adapter, full model"][key]) for r in result["per_seed"]]
    return " (seeds: " + ", ".join(f"{d:+.2f}" for d in ds) + ")"


def set_label(result: dict, default_shallow: str | None) -> str:
    """The set's name, plus its shallow layers' directory name where they are not the default ones."""
    shallow = result.get("shallow", default_shallow)
    return result["set"] if shallow == default_shallow else f"{result['set']} [{Path(shallow).name}]"


def markdown(results: list[dict], default_shallow: str | None = None) -> str:
    """One row per score; a set served with other shallow layers than `default_shallow` names them."""
    lines = ["| set | adapter, scored on | test metric | vs full model | CPU train time | table hit rate |",
             "|---|---|---|---|---|---|"]
    for r in results:
        key = headline(r["task"])
        ref = r["scores"]["full-model adapter, full model"][key]
        for name, m in r["scores"].items():
            skip = m.get("skip", {})
            stats = next(iter(skip.values()), None)
            hit = f"{stats['table_hits'] / max(1, stats['lookups']):.2f}" if stats else ""
            minutes = r["train_seconds"]["skip-mode" if name.startswith("skip-mode") else "full-model"] / 60
            metrics = ", ".join(f"{n} {100 * m[n]:.1f}" for n in metric_names(r["task"]) if n in m)
            delta = ("" if name == "full-model adapter, full model"
                     else f"{100 * (m[key] - ref):+.2f}" + seed_deltas(r, name))
            cells = [set_label(r, default_shallow), name, metrics, delta, f"{minutes:.1f} min", hit]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path, default_shallow: str | None = None) -> None:
    grouped_bars(path, [f"{set_label(r, default_shallow)}\n({headline(r['task'])})" for r in results],
                 {name: [100 * r["scores"][name][headline(r["task"])] for r in results] for name in SCORES},
                 "skip mode (3 of 6 layers from the n-gram table) vs the full model")


def describe(shallow: str) -> dict:
    meta = json.loads((Path(shallow) / "shallow.json").read_text())
    return {"path": shallow, "skip_layers": meta["skip_layers"],
            "distill": {k: meta["distill"].get(k) for k in ("corpus", "sentences", "history")}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shallow", required=True, help="`vbert distill` output")
    p.add_argument("--table", required=True, help="`vbert build-table` output for those shallow layers")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--sets", default=",".join(SKIP_SETS))
    p.add_argument("--runs", default=str(REPO / "var" / "training-runs"))
    p.add_argument("--rerun", action="store_true")
    p.add_argument("--epochs", type=int, default=None, help="override every set's epoch count (smoke runs)")
    p.add_argument("--seeds", default="0", help="training seeds, comma-separated: every score is the mean over "
                   "them (each seed trains both adapters), the markdown shows each seed's delta too")
    p.add_argument("--per-set", action="append", default=[], metavar="SET=SHALLOW,TABLE",
                   help="score SET with these shallow layers and table instead (repeatable)")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    sets = [s for s in args.sets.split(",") if s]
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        p.error(f"--seeds {args.seeds!r}: expected comma-separated integers")
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        p.error(f"--seeds {args.seeds!r}: expected distinct integers >= 0")
    for s in sets:
        if s not in SETS:
            p.error(f"unknown set {s!r}")
    layers = {s: (args.shallow, args.table) for s in sets}
    for item in args.per_set:
        name, _, paths = item.partition("=")
        shallow, _, table = paths.partition(",")
        if name not in layers or not shallow or not table:
            p.error(f"--per-set {item!r}: expected SET=SHALLOW,TABLE with SET one of {', '.join(sets)}")
        layers[name] = (shallow, table)
    for s, (shallow, table) in layers.items():
        for path in (Path(shallow) / "shallow.json", Path(table)):
            if not path.exists():
                p.error(f"{s}: {path} does not exist")
    results = []
    for s in tqdm(sets, desc="sets", unit="set"):
        shallow, table = layers[s]
        results.append(mean_over_seeds([run_set(s, Path(args.data), Path(args.runs), str(Path(shallow).resolve()),
                                                str(Path(table).resolve()), args.rerun, args.epochs, seed)
                                        for seed in seeds]))
        results[-1] = {**results[-1], "shallow": shallow, "table": table}
        tqdm.write(f"{s}: " + ", ".join(f"{k}: {v[headline(results[-1]['task'])]:.3f}"
                                         for k, v in results[-1]["scores"].items()))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"date": datetime.date.today().isoformat(), "machine": platform.platform(),
           "shallow": describe(args.shallow), "table": args.table, "results": results}
    others = {s: {"shallow": describe(sh), "table": t} for s, (sh, t) in layers.items() if sh != args.shallow}
    if others:
        doc["per_set"] = others
    out.write_text(json.dumps(doc, indent=2))
    table = markdown(results, args.shallow)
    out.with_suffix(".md").write_text(table)
    plot(results, out.with_suffix(".png"), args.shallow)
    print(table)


if __name__ == "__main__":
    main()
