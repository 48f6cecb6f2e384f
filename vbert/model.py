"""The mixed-tenant model: shared encoder + adapter pool + per-row heads, one forward for all rows.

    model = MultiTenantModel(ModelConfig())
    slot = model.load_adapter(artifact)                     # device-resident until unloaded
    outs = model.forward([EncodeRow(ids, slot), EncodeRow(ids2)])   # slot 0: bare backbone

Rows of any tenants, adapter kinds, head kinds and label counts share one pass per length bucket.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .artifact import AdapterArtifact
from .backbone import Encoder
from .bucketing import plan_buckets
from .config import ModelConfig
from .device import DeviceContext
from .heads import HEAD_KIND_CODES, Head, HeadKind, HeadSpec, classify_logits, embed, pool_hidden, tag_logits
from .pool import AdapterPool, BatchAdapters
from .tokens import TextTooLong, TokenizedText, tokenize_bounded_spans


class InputError(ValueError):
    """A request input the model cannot take (empty, too long, unknown slot...)."""


@dataclass(frozen=True)
class EncodeRow:
    input_ids: Sequence[int]
    slot: int = 0                               # pool slot; 0 = bare backbone with the default head
    token_type_ids: Sequence[int] | None = None
    normalize: bool | None = None               # embed heads: override the head's normalization


@dataclass
class RowOutput:
    kind: HeadKind
    labels: tuple[str, ...]
    logits: torch.Tensor | None = None      # classify [C]; tag [L, C] (L = the row's tokens)
    embedding: torch.Tensor | None = None   # embed [H]

    def predicted(self):
        """classify: the top label; tag: one label per token; embed: None."""
        if self.kind is HeadKind.CLASSIFY:
            return self.labels[int(self.logits.argmax())]
        if self.kind is HeadKind.TAG:
            return [self.labels[i] for i in self.logits.argmax(-1).tolist()]
        return None


def default_head_of(path: str | Path) -> Head:
    """The bare backbone's head: an embedding with the checkpoint's sentence-transformers pooling
    and normalization when it declares them, else mean pooling without normalization."""
    path = Path(path)
    pooling, normalize = "mean", False
    pcfg = path / "1_Pooling" / "config.json"
    if pcfg.is_file():
        p = json.loads(pcfg.read_text())
        pooling = "cls" if p.get("pooling_mode_cls_token") else "mean"
    modules = path / "modules.json"
    if modules.is_file():
        normalize = any(m.get("type", "").endswith("Normalize") for m in json.loads(modules.read_text()))
    return Head(HeadSpec(HeadKind.EMBED, pooling=pooling, normalize=normalize))


@dataclass
class _Bucket:
    row_index: list[int]               # positions of its rows in the prepared batch
    input_ids: torch.Tensor            # [B, L] on the device
    token_type_ids: torch.Tensor       # [B, L]
    mask: torch.Tensor                 # [B, L] bool
    is_full: bool                      # no padding at all (attention needs no mask)
    adapters: BatchAdapters
    tables: np.ndarray | None = None   # skip mode: [B] index of each row's n-gram table
    table_only: np.ndarray | None = None   # skip mode: [B] rows whose adapter was trained in skip mode


@dataclass
class PreparedBatch:
    """Device-ready inputs of one step (see MultiTenantModel.prepare)."""

    rows: list[EncodeRow]
    buckets: list[_Bucket]
    event: object = None               # CUDA event of the preparation stream; None on CPU


class MultiTenantModel:
    def __init__(self, config: ModelConfig | None = None):
        self.config = config = config or ModelConfig()
        path = config.backbone.resolved_path
        self.path = path
        self.device = DeviceContext.create(config.backbone.device, config.backbone.dtype)
        enc = Encoder.from_checkpoint(path)
        self.encoder = enc.to(self.device.device, self.device.dtype).eval().requires_grad_(False)
        self.spec = enc.spec
        # the embedded default's config names the model it was distilled from; name what it is
        self.name = "all-MiniLM-L6-v2" if config.backbone.path is None else enc.spec.name
        self.max_length = min(config.backbone.max_length, self.spec.max_position_embeddings)
        self.pool = AdapterPool(config.pool, self.spec, self.device, default_head_of(path))
        self._tokenizer = None
        self.skip = None
        self.skip_cache_restored: dict[str, int | str] = {}   # per table: entries restored, or why none were
        if config.skip.enabled:
            self.skip = self._open_skip(config.skip, enc)
            self._lower_layers = self._real_lower(self.skip.skip_layers)
        self.pool.skip_check = self.check_skip     # every load (also the manager cache's) checks the mode

    def _open_skip(self, config, teacher):
        from .skip import SkipRuntime, open_table

        tables = {t.name: open_table(t.name, t.shallow, t.table, teacher, self.device.device,
                                     config.miss_cache_entries) for t in config.tables}
        runtime = SkipRuntime(tables, config.mode, config.default, route=config.route, warm_budget=config.warm_budget)
        runtime.timed = not self.device.is_cuda        # wall-clock step times mean something on CPU only
        if config.cache_dir is not None:
            self.skip_cache_restored = runtime.restore_caches(config.cache_dir)
        if config.route == "cost" and config.mode == "exact":
            runtime.calibrate(self._real_lower(runtime.skip_layers), self.max_length, self.device.device,
                              self.device.synchronize)
        return runtime

    def save_skip_caches(self) -> dict[str, int]:
        """Write skip mode's miss caches to its cache_dir (per table: entries written); {} when skip mode
        is off or keeps no cache_dir."""
        if self.skip is None or self.config.skip.cache_dir is None:
            return {}
        return self.skip.save_caches(self.config.skip.cache_dir)

    def _real_lower(self, skip_layers: int):
        """The real lower layers (no adapters: skip mode refuses adapters there) for skip mode's rows
        that are cheaper to compute than to look up: exactly the full model's layer-k states."""
        def lower(ids: torch.Tensor, types: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            x = self.encoder.embed(ids, types)
            return self.encoder.run_layers(x, mask, None, start=0, stop=skip_layers, has_padding=not bool(mask.all()))
        return lower

    # -- tokenization -----------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        return self._tokenizer

    def tokenize(self, texts: Sequence[str], truncate: bool = True) -> list[list[int]]:
        """Token ids with [CLS]/[SEP]; too long a text is cut to max_length, or refused if
        truncate is False. Raises InputError naming the first bad text."""
        if not texts:
            raise InputError("no texts given")
        out = self.tokenize_each(texts, [truncate] * len(texts))
        for i, row in enumerate(out):
            if isinstance(row, InputError):
                raise InputError(f"text {i} {row}")
        return [row.ids for row in out]

    def tokenize_each(self, texts: Sequence[str], truncate: Sequence[bool],
                      max_length: Sequence[int | None] | None = None) -> list[TokenizedText | InputError]:
        """Tokenizer calls over many texts (vbert.tokens: the cost is bounded by each text's token
        limit, not its length); each text gives its kept tokens' ids, character offsets and word
        indices, or, for a bad text, an InputError whose message is a predicate ("is empty",
        "has N tokens, above the limit of M ...")."""
        out: list[TokenizedText | InputError] = [InputError("is empty") for _ in texts]
        good = [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
        if good:
            limits = [min(self.max_length, (max_length[i] if max_length is not None else None) or self.max_length)
                      for i in good]
            rows = tokenize_bounded_spans(self.tokenizer, [texts[i] for i in good], limits,
                                          [truncate[i] for i in good])
            for i, row in zip(good, rows):
                out[i] = InputError(str(row)) if isinstance(row, TextTooLong) else row
        return out

    # -- adapters ------------------------------------------------------------------------------
    def check_skip(self, artifact: AdapterArtifact) -> int:
        """Skip mode: the index of the table the artifact runs with; raises AdapterError if it names a
        table this model does not hold or has adapter weights in the layers the table replaces.
        Without skip mode: an adapter trained in skip mode is refused (its upper layers expect the
        shallow layers' states)."""
        from .adapters import AdapterError

        if self.skip is None:
            if artifact.skip_table is not None:
                raise AdapterError(f"adapter was trained in skip mode (table {artifact.skip_table!r}) and this "
                                   f"server runs the full backbone; enable skip mode with that table")
            return 0
        low = [layer for layer in (artifact.adapter.layers if artifact.adapter is not None else ())
               if layer < self.skip.skip_layers]
        if low:
            raise AdapterError(f"adapter has weights in layers {sorted(low)}, which skip mode replaces by its n-gram "
                               f"table (layers 0..{self.skip.skip_layers - 1}); train it on the top "
                               f"{self.spec.num_layers - self.skip.skip_layers} layers (--layers)")
        if artifact.skip_table is not None and artifact.skip_table not in self.skip.tables:
            raise AdapterError(f"adapter was trained with skip table {artifact.skip_table!r}, which this server "
                               f"does not hold (it holds {self.skip.names})")
        return self.skip.index_of(artifact.skip_table)

    def load_adapter(self, artifact: AdapterArtifact, stream=None) -> int:
        return self.pool.load(artifact, stream)

    def unload_adapter(self, slot: int) -> None:
        self.pool.unload(slot)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, rows: Sequence[EncodeRow]) -> list[RowOutput]:
        """Outputs in row order. Rows are bucketed by length so padding stays small."""
        return self.execute(self.prepare(rows))

    @torch.inference_mode()
    def prepare(self, rows: Sequence[EncodeRow], stream=None) -> PreparedBatch:
        """Everything before compute: validation, length buckets, input packing, host-to-device
        copies and the gather of each row's adapter and head weights. Under CUDA it runs on
        `stream` (e.g. a copy stream) and `execute` waits for it; on CPU it runs inline, so a
        preparation thread can overlap it with the compute of the previous step."""
        lengths = []
        for i, r in enumerate(rows):
            n = len(r.input_ids)
            if n == 0:
                raise InputError(f"row {i} has no tokens")
            if n > self.max_length:
                raise InputError(f"row {i} has {n} tokens, above the limit of {self.max_length}")
            if r.token_type_ids is not None and len(r.token_type_ids) != n:
                raise InputError(f"row {i}: token_type_ids length {len(r.token_type_ids)} != input_ids length {n}")
            lengths.append(n)
        buckets = []
        with self.device.stream(stream):
            for idx in plan_buckets(lengths, self.config.batching):
                buckets.append(self._prepare_bucket(idx, [rows[i] for i in idx]))
            event = self.device.record_event(stream)
        return PreparedBatch(list(rows), buckets, event)

    def _prepare_bucket(self, idx: list[int], rows: list[EncodeRow]) -> _Bucket:
        bsz, seq = len(rows), max(len(r.input_ids) for r in rows)
        ids = np.full((bsz, seq), self.spec.pad_token_id, np.int64)
        types = np.zeros((bsz, seq), np.int64)
        mask = np.zeros((bsz, seq), bool)
        for b, r in enumerate(rows):   # host-side packing of inputs (not model compute)
            n = len(r.input_ids)
            ids[b, :n] = r.input_ids
            mask[b, :n] = True
            if r.token_type_ids is not None:
                types[b, :n] = r.token_type_ids
        if (ids >= self.spec.vocab_size).any() or (ids < 0).any():
            raise InputError(f"token ids must be in [0, {self.spec.vocab_size})")
        dev = self.device
        ids_t, types_t, mask_t = (dev.to_device(dev.host_tensor(torch.from_numpy(a))) for a in (ids, types, mask))
        slots = [r.slot for r in rows]
        adapters = self.pool.gather(slots, [r.normalize for r in rows])
        tables = self.pool.slot_table[slots] if self.skip is not None else None
        table_only = self.pool.slot_skip_trained[slots] if self.skip is not None else None
        return _Bucket(idx, ids_t, types_t, mask_t, bool(mask.all()), adapters, tables, table_only)

    @torch.inference_mode()
    def execute(self, prepared: PreparedBatch) -> list[RowOutput]:
        """The forward passes of a prepared batch (one per length bucket); outputs in row order."""
        self.device.wait_event(prepared.event)
        outputs: list[RowOutput | None] = [None] * len(prepared.rows)
        for bucket in prepared.buckets:
            for i, out in zip(bucket.row_index, self._execute_bucket(bucket, [prepared.rows[i] for i in bucket.row_index])):
                outputs[i] = out
        return outputs

    def _execute_bucket(self, bucket: _Bucket, rows: list[EncodeRow]) -> list[RowOutput]:
        batch, mask_t, dev = bucket.adapters, bucket.mask, self.device
        if self.skip is None:
            hidden = self.encoder(bucket.input_ids, bucket.token_type_ids, mask_t, batch.layers,
                                  has_padding=not bucket.is_full)                              # [B, L, H]
        else:                          # lower layers from the n-gram tables, the rest as usual
            lower = self.skip.lower_states(bucket.input_ids, bucket.token_type_ids, mask_t, bucket.tables,
                                           dev.dtype, self._lower_layers, bucket.table_only)   # [B, L, H]
            hidden = self.encoder.run_layers(lower, mask_t, batch.layers, start=self.skip.skip_layers,
                                             has_padding=not bucket.is_full)
        pooled = pool_hidden(hidden, mask_t, batch.pooling, self.encoder.pooler)                # [B, H]
        results: dict[HeadKind, tuple[np.ndarray, torch.Tensor]] = {}
        for kind, code in HEAD_KIND_CODES.items():
            idx_np = np.nonzero(batch.head_kinds == code)[0]
            if len(idx_np) == 0:
                continue
            idx = torch.from_numpy(idx_np).to(dev.device)
            if kind is HeadKind.CLASSIFY:
                out = classify_logits(pooled[idx], batch.head_weight[idx], batch.head_bias[idx])
            elif kind is HeadKind.TAG:
                out = tag_logits(hidden[idx], batch.head_weight[idx], batch.head_bias[idx])
            else:
                out = embed(pooled[idx], batch.normalize[idx])
            results[kind] = (idx_np, out.float().cpu())
        outputs: list[RowOutput | None] = [None] * len(rows)
        for kind, (idx_np, out) in results.items():
            for j, b in enumerate(idx_np.tolist()):   # slicing results to each row's own size
                labels = batch.labels[b]
                c, n = int(batch.num_labels[b]), len(rows[b].input_ids)
                if kind is HeadKind.CLASSIFY:
                    outputs[b] = RowOutput(kind, labels, logits=out[j, :c])
                elif kind is HeadKind.TAG:
                    outputs[b] = RowOutput(kind, labels, logits=out[j, :n, :c])
                else:
                    outputs[b] = RowOutput(kind, (), embedding=out[j])
        return outputs

    # -- description ---------------------------------------------------------------------------
    def info(self) -> dict:
        p = self.pool
        return {
            "backbone": self.name, "path": str(self.path), "layers": self.spec.num_layers,
            "hidden_size": self.spec.hidden_size, "parameters": self.encoder.num_parameters(),
            "device": self.device.describe(), "dtype": self.device.dtype_name,
            "pool": {"lora_slots": p.config.num_lora_slots, "bottleneck_slots": p.config.num_bottleneck_slots,
                     "max_lora_rank": p.config.max_lora_rank, "lora_targets": list(p.config.lora_targets),
                     "max_bottleneck_size": p.config.max_bottleneck_size, "max_labels": p.config.max_labels,
                     "bytes_per_lora_slot": p.bytes_per_slot("lora"),
                     "bytes_per_bottleneck_slot": p.bytes_per_slot("bottleneck"),
                     "total_bytes": p.total_bytes()},
            "skip": None if self.skip is None else {
                "skip_layers": self.skip.skip_layers, "mode": self.skip.mode, "default": self.skip.default,
                "route": self.skip.route, "warm_budget": self.skip.warm_budget,
                "costs": None if self.skip.costs is None else self.skip.costs.to_dict(),
                "tables": self.skip.stats()},
        }
