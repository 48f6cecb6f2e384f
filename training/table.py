"""`vbert build-table`: precompute the shallow layers' outputs for a corpus's n-grams.

    vbert build-table --shallow shallow/ --corpus a.txt --corpus b.jsonl --budget-mb 512 --out table.safetensors

Every token of every corpus sentence contributes its trigram (edge ids outside the sentence) and
its three fallbacks (left bigram, right bigram, unigram). Unigrams go in first (so strict fallback
mode always finds something for a token the corpus has seen), then the other keys by frequency
until the memory budget is spent. Values are computed with vbert.skip.compute_entries (the same
function the server uses on a miss) and written with vbert.ngram.save_table, tagged with the
shallow weights' hash.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .data import CORPUS_FORMATS, read_corpus

INDEX_BYTES_PER_ENTRY = 24          # key (8) + hash index slots (capacity 2N of 8 bytes)


@dataclass(frozen=True)
class TableConfig:
    shallow: str
    corpus: tuple[str, ...]
    out: str
    budget_mb: float = 512.0
    dtype: str = "float16"
    max_length: int = 128
    corpus_format: str = "auto"
    backbone: str | None = None        # for the tokenizer; default the embedded backbone
    device: str = "cpu"
    show_progress: bool = True

    def __post_init__(self) -> None:
        from vbert.skip import TABLE_DTYPES

        if not self.corpus:
            raise ValueError("give at least one corpus file")
        for path in self.corpus:
            if not Path(path).is_file():
                raise ValueError(f"corpus file {path!r} does not exist")
        if not Path(self.shallow).is_dir():
            raise ValueError(f"shallow directory {self.shallow!r} does not exist")
        if not self.budget_mb > 0:
            raise ValueError(f"budget_mb must be > 0, got {self.budget_mb}")
        if self.dtype not in TABLE_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {tuple(TABLE_DTYPES)}")
        if self.max_length < 3:
            raise ValueError(f"max_length must be >= 3, got {self.max_length}")
        if self.corpus_format not in CORPUS_FORMATS:
            raise ValueError(f"corpus format {self.corpus_format!r} is not one of {CORPUS_FORMATS}")
        if Path(self.out).exists():
            raise ValueError(f"output {self.out} exists; choose a new path")


def entry_bytes(hidden_size: int, dtype: torch.dtype) -> int:
    return 3 * hidden_size * torch.finfo(dtype).bits // 8 + INDEX_BYTES_PER_ENTRY


def select_keys(keys: np.ndarray, counts: np.ndarray, bits: int, edge_id: int, max_entries: int) -> np.ndarray:
    """Unigram keys first, then the rest in the given (frequency) order, at most max_entries."""
    from vbert.ngram import unpack

    ids = unpack(torch.from_numpy(keys), bits).numpy()                                 # [N, 3]
    unigram = (ids[:, 0] == edge_id) & (ids[:, 2] == edge_id)
    order = np.concatenate([np.nonzero(unigram)[0], np.nonzero(~unigram)[0]])
    return keys[order[:max_entries]]


def build_table(config: TableConfig, echo: Callable[[str], None] = print) -> dict:
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from vbert.config import default_backbone_path
    from vbert.device import DeviceContext
    from vbert.ngram import TableMeta, count_ngrams, key_bits, save_table, unpack
    from vbert.skip import TABLE_DTYPES, compute_entries, load_shallow

    started = time.perf_counter()
    model, meta = load_shallow(config.shallow)
    device = DeviceContext.create(config.device, "float32").device
    model = model.to(device)
    dtype = TABLE_DTYPES[config.dtype]
    bits = key_bits(model.spec.vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(str(config.backbone or default_backbone_path()), local_files_only=True)
    if len(tokenizer) > model.spec.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, the shallow layers {model.spec.vocab_size}")
    texts = [t for path in config.corpus for t in read_corpus(path, config.corpus_format)]
    rows = tokenizer(texts, truncation=True, max_length=config.max_length)["input_ids"]
    keys, counts = count_ngrams(rows, meta.edge_id, bits, show_progress=config.show_progress)
    max_entries = int(config.budget_mb * 2**20 // entry_bytes(model.spec.hidden_size, dtype))
    chosen = select_keys(keys, counts, bits, meta.edge_id, max_entries)
    chosen_t = torch.from_numpy(np.ascontiguousarray(chosen))
    echo(f"{len(texts)} sentences, {int(sum(len(r) for r in rows)):,} tokens, {len(keys):,} distinct n-grams; "
         f"budget {config.budget_mb:g} MiB holds {max_entries:,}; computing {len(chosen):,} entries")
    with tqdm(total=len(chosen), desc="table entries", unit="entry", disable=not config.show_progress) as bar:
        values = compute_entries(model, chosen_t, bits, dtype, progress=bar).cpu()
    ids = unpack(chosen_t, bits)
    outer_edges = (ids[:, 0] == meta.edge_id).long() + (ids[:, 2] == meta.edge_id).long()
    kinds = {"trigram": int((outer_edges == 0).sum()), "bigram": int((outer_edges == 1).sum()),
             "unigram": int((outer_edges == 2).sum())}
    table_meta = TableMeta(weights_hash=meta.weights_hash, edge_id=meta.edge_id, bits=bits,
                           hidden_size=model.spec.hidden_size, dtype=config.dtype, num_entries=len(chosen),
                           kinds=kinds, extra={"corpus": ",".join(Path(p).name for p in config.corpus),
                                               "backbone": meta.backbone, "skip_layers": str(meta.skip_layers)})
    Path(config.out).parent.mkdir(parents=True, exist_ok=True)
    save_table(config.out, chosen_t, values, table_meta)
    summary = {"out": str(config.out), "entries": len(chosen), "kinds": kinds, "distinct_ngrams": len(keys),
               "budget_mb": config.budget_mb, "file_bytes": Path(config.out).stat().st_size,
               "seconds": time.perf_counter() - started}
    echo(f"wrote {config.out}: {len(chosen):,} entries ({kinds}), {summary['file_bytes'] / 2**20:.1f} MiB, "
         f"{summary['seconds']:.0f} s")
    return summary
