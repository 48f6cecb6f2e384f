#!/usr/bin/env python
"""How large a corpus (and table budget) skip mode needs for a given hit rate on text it has not seen.

    python benchmarks/skip_coverage.py --json benchmarks/results/cpu-DATE/skip/skip_coverage.json

The keys `vbert build-table` would choose (training.table.select_keys: unigrams, a bigram share, then
the most frequent trigrams, within a budget) from growing seeded samples of a corpus pool, and the
share of the trigram lookups of held-out text (every token position, as exact mode looks them up)
and of the corpus's own text that those keys hold. No shallow layer runs: only which trigrams are in
the table matters here, so this takes minutes, not hours. Writes JSON and a PNG (coverage against
corpus size, a line per budget).

The pool is every train and dev file of the five sets except the held-out ones' test files (the
stream of benchmarks/skip.py); --held-out is that stream.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import random
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"
POOL = ["cls/sci-cite/train.txt", "cls/sci-cite/dev.txt", "cls/rct-20k/train.txt", "cls/rct-20k/dev.txt",
        "cls/chemprot/train.txt", "cls/chemprot/dev.txt", "ner/NCBI-disease/train.txt", "ner/NCBI-disease/dev.txt",
        "ner/JNLPBA/train.txt", "ner/JNLPBA/dev.txt", "ner/JNLPBA/test.txt"]
HELD_OUT = ["cls/sci-cite/test.txt", "cls/rct-20k/test.txt", "cls/chemprot/test.txt", "ner/NCBI-disease/test.txt"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True)
    p.add_argument("--pool", nargs="*", default=POOL, help="corpus files, relative to ../shared/data or absolute")
    p.add_argument("--held-out", nargs="*", default=HELD_OUT)
    p.add_argument("--fractions", default="0.0625,0.125,0.25,0.5,1", help="samples of the pool, as fractions")
    p.add_argument("--budgets-mb", default="64,128,256,512,1024,2048", help="table budgets (MiB)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per sentence, as build-table cuts them")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from training.data import read_corpus
    from training.table import TableConfig, entry_bytes, position_keys, select_keys
    from vbert.backbone import BackboneSpec
    from vbert.config import default_backbone_path
    from vbert.ngram import key_bits

    resolve = lambda f: Path(f) if Path(f).is_absolute() else DATA / f   # noqa: E731
    path = default_backbone_path()
    spec = BackboneSpec.from_checkpoint(path)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    edge, bits = spec.pad_token_id, key_bits(spec.vocab_size)
    per_entry = entry_bytes(spec.hidden_size, torch.float16)
    pool = [t for f in args.pool for t in read_corpus(resolve(f))]
    held = [t for f in args.held_out for t in read_corpus(resolve(f))]
    random.Random(args.seed).shuffle(pool)
    pool_rows = tok(pool, truncation=True, max_length=args.max_length)["input_ids"]
    held_keys = position_keys(tok(held, truncation=True, max_length=args.max_length)["input_ids"], edge, bits)
    fractions = [float(x) for x in args.fractions.split(",")]
    budgets = [float(x) for x in args.budgets_mb.split(",")] + [math.inf]
    cells = []
    for frac in tqdm(fractions, desc="corpus sizes"):
        rows = pool_rows[:max(1, int(len(pool_rows) * frac))]
        own = position_keys(rows, edge, bits)
        all_trigrams = np.unique(own).size
        for budget in budgets:
            entries = 1 << 40 if math.isinf(budget) else int(budget * 2**20 // per_entry)
            keys = select_keys(rows, edge, bits, entries, TableConfig.__dataclass_fields__["fallback_share"].default)
            cells.append({"sentences": len(rows), "tokens": int(sum(len(r) for r in rows)),
                          "distinct_trigrams": int(all_trigrams), "budget_mb": None if math.isinf(budget) else budget,
                          "entries": int(len(keys)), "table_mib": len(keys) * per_entry / 2**20,
                          "held_out_hit_rate": float(np.isin(held_keys, keys).mean()),
                          "in_corpus_hit_rate": float(np.isin(own, keys).mean())})
    result = {"date": datetime.date.today().isoformat(), "machine": platform.platform(),
              "pool": args.pool, "held_out": args.held_out, "pool_sentences": len(pool),
              "held_out_sentences": len(held), "held_out_tokens": int(held_keys.size),
              "bytes_per_entry": per_entry, "max_length": args.max_length, "cells": cells}
    sizes = sorted({c["sentences"] for c in cells})
    full = [c for c in cells if c["budget_mb"] is None]
    if len(full) >= 2:                          # hit rate on unseen text against log(corpus size), unlimited budget
        x = np.log10([c["sentences"] for c in full])
        y = np.array([c["held_out_hit_rate"] for c in full])
        slope, intercept = np.polyfit(x, y, 1)
        result["fit_held_out_hit_rate_per_decade"] = float(slope)
        result["fit_sentences_for"] = {str(h): float(10 ** ((h - intercept) / slope)) if slope > 0 else None
                                       for h in (0.5, 0.67, 0.8)}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, sizes, budgets, out.with_suffix(".png"))
    for c in cells:
        print(f"{c['sentences']:>7,} sentences  budget {str(c['budget_mb'] or 'all'):>6}  {c['table_mib']:7.0f} MiB  "
              f"held-out {c['held_out_hit_rate']:.3f}  in-corpus {c['in_corpus_hit_rate']:.3f}")
    if "fit_sentences_for" in result:
        print("sentences for a held-out hit rate (log fit):", result["fit_sentences_for"])


def plot(result: dict, sizes, budgets, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for budget in budgets:
        b = None if math.isinf(budget) else budget
        cs = [c for c in result["cells"] if c["budget_mb"] == b]
        label = "every trigram (no budget)" if b is None else f"{b:g} MiB"
        ax.plot([c["sentences"] for c in cs], [c["held_out_hit_rate"] for c in cs], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("corpus sentences (seeded samples of the pool)")
    ax.set_ylabel("held-out lookups found in the table")
    ax.set_title("skip-mode table coverage of unseen text", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="table budget")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
