"""`vbert build-table`: precompute the shallow layers' outputs for a corpus's n-grams.

    vbert build-table --shallow shallow/ --corpus a.txt --corpus b.jsonl --out table.safetensors   # --budget-mb, default 1536

Every token of every corpus sentence contributes its trigram (edge ids outside the sentence) and
its three fallbacks (left bigram, right bigram, unigram). Unigrams go in first (so strict fallback
mode always finds something for a token the corpus has seen), then a share of the budget goes to
the most frequent bigrams, and the rest to the most frequent trigrams (select_keys). Values are
computed with vbert.shallow.compute_entries (the same function the server uses on a miss) and written
with vbert.ngram.save_table, tagged with the shallow weights' hash.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .data import CORPUS_FORMATS, check_corpus, read_corpus

INDEX_BYTES_PER_ENTRY = 24          # key (8) + hash index slots (capacity 2N of 8 bytes)


@dataclass(frozen=True)
class TableConfig:
    shallow: str
    corpus: tuple[str, ...]
    out: str
    budget_mb: float = 1536.0          # every trigram of ~20,000 sentences (benchmarks/skip_coverage.py)
    fallback_share: float = 0.1        # of the budget after unigrams: bigram fallback entries
    dtype: str = "float16"
    compute_dtype: str = "auto"        # the shallow layers' arithmetic: auto = bfloat16 where it is fast
    max_length: int = 128
    corpus_format: str = "auto"
    backbone: str | None = None        # for the tokenizer; default the embedded backbone
    device: str = "cpu"
    show_progress: bool = True

    def __post_init__(self) -> None:
        from vbert.shallow import COMPUTE_DTYPES, TABLE_DTYPES

        check_corpus(self.corpus)
        if not Path(self.shallow).is_dir():
            raise ValueError(f"shallow directory {self.shallow!r} does not exist")
        if not self.budget_mb > 0:
            raise ValueError(f"budget_mb must be > 0, got {self.budget_mb}")
        if not 0 <= self.fallback_share <= 1:
            raise ValueError(f"fallback_share must be in [0, 1], got {self.fallback_share}")
        if self.dtype not in TABLE_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {tuple(TABLE_DTYPES)}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype {self.compute_dtype!r} is not one of {COMPUTE_DTYPES}")
        if self.max_length < 3:
            raise ValueError(f"max_length must be >= 3, got {self.max_length}")
        if self.corpus_format not in CORPUS_FORMATS:
            raise ValueError(f"corpus format {self.corpus_format!r} is not one of {CORPUS_FORMATS}")
        if Path(self.out).exists():
            raise ValueError(f"output {self.out} exists; choose a new path")


def entry_bytes(hidden_size: int, dtype: torch.dtype) -> int:
    return 3 * hidden_size * torch.finfo(dtype).bits // 8 + INDEX_BYTES_PER_ENTRY


def position_keys(rows, edge_id: int, bits: int) -> np.ndarray:
    """The trigram key of every token position of every row (edge ids outside each row): what
    exact mode looks up on this text, in order."""
    from vbert.ngram import pack

    rows = [np.asarray(r, dtype=np.int64) for r in rows if len(r)]
    flat = np.concatenate(rows)
    ends = np.cumsum([len(r) for r in rows])
    starts = ends - np.array([len(r) for r in rows])
    left, right = np.roll(flat, 1), np.roll(flat, -1)
    left[starts], right[ends - 1] = edge_id, edge_id
    return pack(torch.from_numpy(np.stack([left, flat, right], 1)), bits).numpy()


def trigram_counts(rows, edge_id: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(distinct trigram keys, occurrences) over all positions of all rows (edge ids outside each
    row), most frequent first: exactly the keys exact mode looks up on this text."""
    uniq, counts = np.unique(position_keys(rows, edge_id, bits), return_counts=True)
    order = np.lexsort((uniq, -counts))
    return uniq[order], counts[order]


def select_keys(rows, edge_id: int, bits: int, max_entries: int, fallback_share: float) -> np.ndarray:
    """What goes in the table, in priority order, at most max_entries keys:
    1. the unigram (E, b, E) of every token seen (strict fallback always finds something);
    2. `fallback_share` of the rest: bigram fallbacks (a, b, E) / (E, b, c), most frequent first;
    3. the rest: trigrams, most frequent first (what exact mode looks up).
    A key is taken once (a sentence-edge trigram is also a bigram)."""
    from vbert.ngram import count_ngrams, unpack

    fallback_keys, _ = count_ngrams(rows, edge_id, bits)                        # all kinds, most frequent first
    ids = unpack(torch.from_numpy(fallback_keys), bits).numpy()
    edges = (ids[:, 0] == edge_id).astype(int) + (ids[:, 2] == edge_id).astype(int)
    unigrams, bigrams = fallback_keys[edges == 2], fallback_keys[edges == 1]
    trigrams, _ = trigram_counts(rows, edge_id, bits)
    room = max(0, max_entries - len(unigrams))
    n_bigrams = min(len(bigrams), int(room * fallback_share))
    chosen = [unigrams[:max_entries], bigrams[:n_bigrams]]
    taken = np.concatenate(chosen)
    rest = trigrams[~np.isin(trigrams, taken)][:max(0, max_entries - len(taken))]
    return np.concatenate([taken, rest])


def build_table(config: TableConfig, echo: Callable[[str], None] = print) -> dict:
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from vbert.config import default_backbone_path
    from vbert.device import DeviceContext, fast_bfloat16
    from vbert.ngram import TableMeta, key_bits, save_table, unpack
    from vbert.shallow import TABLE_DTYPES, compute_entries, load_shallow, resolve_compute_dtype

    started = time.perf_counter()
    model, meta = load_shallow(config.shallow)
    device = DeviceContext.create(config.device, "float32").device
    model = model.to(device)
    dtype = TABLE_DTYPES[config.dtype]
    compute_dtype = resolve_compute_dtype(config.compute_dtype, device)
    bits = key_bits(model.spec.vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(str(config.backbone or default_backbone_path()), local_files_only=True)
    if len(tokenizer) > model.spec.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, the shallow layers {model.spec.vocab_size}")
    texts = [t for path in config.corpus for t in read_corpus(path, config.corpus_format)]
    rows = tokenizer(texts, truncation=True, max_length=config.max_length)["input_ids"]
    max_entries = int(config.budget_mb * 2**20 // entry_bytes(model.spec.hidden_size, dtype))
    chosen = select_keys(rows, meta.edge_id, bits, max_entries, config.fallback_share)
    chosen_t = torch.from_numpy(np.ascontiguousarray(chosen))
    distinct, _ = trigram_counts(rows, meta.edge_id, bits)
    covered = float(np.isin(distinct, chosen).mean())
    echo(f"{len(texts)} sentences, {int(sum(len(r) for r in rows)):,} tokens, {len(distinct):,} distinct trigrams; "
         f"budget {config.budget_mb:g} MiB holds {max_entries:,}; computing {len(chosen):,} entries in {compute_dtype}")
    if compute_dtype == "bfloat16" and not fast_bfloat16(device):
        echo("note: this machine emulates bfloat16 (much slower than float32 here), and a server on such a machine "
             "computes this table's misses slowly too; --compute-dtype auto picks float32 here")
    with tqdm(total=len(chosen), desc="table entries", unit="entry", disable=not config.show_progress) as bar:
        values = compute_entries(model.for_compute(compute_dtype), chosen_t, bits, dtype, progress=bar).cpu()
    ids = unpack(chosen_t, bits)
    outer_edges = (ids[:, 0] == meta.edge_id).long() + (ids[:, 2] == meta.edge_id).long()
    kinds = {"trigram": int((outer_edges == 0).sum()), "bigram": int((outer_edges == 1).sum()),
             "unigram": int((outer_edges == 2).sum())}
    table_meta = TableMeta(weights_hash=meta.weights_hash, edge_id=meta.edge_id, bits=bits,
                           hidden_size=model.spec.hidden_size, dtype=config.dtype, num_entries=len(chosen),
                           kinds=kinds, compute_dtype=compute_dtype,
                           extra={"corpus": ",".join(Path(p).name for p in config.corpus),
                                               "backbone": meta.backbone, "skip_layers": str(meta.skip_layers)})
    Path(config.out).parent.mkdir(parents=True, exist_ok=True)
    save_table(config.out, chosen_t, values, table_meta)
    summary = {"out": str(config.out), "entries": len(chosen), "kinds": kinds, "compute_dtype": compute_dtype,
               "distinct_trigrams": len(distinct),
               "share_of_distinct_trigrams_in_table": covered,
               "budget_mb": config.budget_mb, "file_bytes": Path(config.out).stat().st_size,
               "seconds": time.perf_counter() - started}
    echo(f"wrote {config.out}: {len(chosen):,} entries ({kinds}), {summary['file_bytes'] / 2**20:.1f} MiB, "
         f"{summary['seconds']:.0f} s")
    return summary
