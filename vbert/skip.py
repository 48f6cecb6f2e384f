"""Lower-layer skipping (SkipBERT / PLOT): shallow n-gram layers, their merge, and the runtime that
serves the lower layers from precomputed n-gram tables.

The lowest k layers of the backbone are replaced by shallow layers that see only a token's trigram
(left, self, right; the edge id outside the sentence). A trigram's output, [3, H] (one vector per
slot), depends only on its three ids, so it can be looked up instead of computed. A token's state
entering layer k is merged from the three windows that contain it:

    s_i = g_c * T(i)[centre] + g_l * T(i-1)[right] + g_r * T(i+1)[left]        (g = sigmoid(gates))
    h_i = LayerNorm(s_i + position[i] + token_type[i])

and layers k..N-1 (with the tenants' adapters) run as usual on the whole sequence.

ShallowModel holds the trainable pieces (initialized from the teacher; `vbert distill` trains them).
SkipRuntime holds, for one or more named tables, a ShallowModel, its NgramTable and a bounded miss
cache, and turns a padded batch into layer-k states: unique keys, one vectorized table lookup, then
misses computed by the shallow layers (exact) or, in fallback mode, looked up as bigrams / unigrams
(approximate). Shallow outputs are always rounded to the table's dtype, so the table, the miss
path and the force-computed path produce identical values.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .backbone import BackboneSpec, EncoderLayer
from .ngram import MissCache, NgramTable, TableError, fallback_keys, key_bits, load_table, pack, \
    trigram_ids, unpack, weights_hash

SHALLOW_FORMAT = "vbert-shallow"
SHALLOW_META = "shallow.json"
SHALLOW_WEIGHTS = "shallow.safetensors"
SKIP_MODES = ("exact", "fallback")
TABLE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
COMPUTE_CHUNK = 256            # trigrams per shallow forward, always (fewer are padded): one shape


class SkipError(ValueError):
    """A shallow-layer directory or skip configuration that cannot be used (names the problem)."""


# -- the shallow model ---------------------------------------------------------------------------
class ShallowModel(nn.Module):
    """Shallow layers over trigrams + the merge into layer-k token states.

    forward_ngrams(ids [N, 3]) -> [N, 3, H]: slot outputs of N trigrams.
    merge(slots [B, L, 3, H], token_type_ids) -> [B, L, H]: the input of layer k.
    """

    def __init__(self, spec: BackboneSpec, skip_layers: int, edge_id: int):
        super().__init__()
        if not 1 <= skip_layers < spec.num_layers:
            raise SkipError(f"skip_layers must be in [1, {spec.num_layers - 1}] for a {spec.num_layers}-layer "
                            f"backbone, got {skip_layers}")
        self.spec, self.skip_layers, self.edge_id = spec, skip_layers, edge_id
        h = spec.hidden_size
        self.word_embeddings = nn.Embedding(spec.vocab_size, h)
        self.slot_embeddings = nn.Parameter(torch.zeros(3, h))            # positions inside the trigram
        self.type_embedding = nn.Parameter(torch.zeros(h))
        self.embed_norm = nn.LayerNorm(h, eps=spec.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(spec) for _ in range(skip_layers))
        # merge
        self.gates = nn.Parameter(torch.full((3, h), -0.6931))           # sigmoid = 1/3: the mean of 3 views
        self.position_embeddings = nn.Embedding(spec.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(spec.type_vocab_size, h)
        self.merge_norm = nn.LayerNorm(h, eps=spec.layer_norm_eps)

    @classmethod
    def from_teacher(cls, teacher, skip_layers: int, edge_id: int) -> "ShallowModel":
        """Initialized from a vbert Encoder: embeddings, its lowest `skip_layers` layers, and the
        LayerNorm of layer k-1's output for the merge; merge position / type embeddings start at 0."""
        spec = teacher.spec
        model = cls(spec, skip_layers, edge_id)
        with torch.no_grad():
            model.word_embeddings.weight.copy_(teacher.word_embeddings.weight)
            model.slot_embeddings.copy_(teacher.position_embeddings.weight[:3])
            model.type_embedding.copy_(teacher.token_type_embeddings.weight[0])
            model.embed_norm.load_state_dict(teacher.embed_norm.state_dict())
            for i in range(skip_layers):
                model.layers[i].load_state_dict(teacher.layers[i].state_dict())
            model.position_embeddings.weight.zero_()
            model.token_type_embeddings.weight.zero_()
            model.merge_norm.load_state_dict(teacher.layers[skip_layers - 1].ffn_norm.state_dict())
        return model.float()

    def forward_ngrams(self, ids: torch.Tensor, has_edges: bool = True) -> torch.Tensor:
        """ids [N, 3] long (edge id outside the sentence) -> slot outputs [N, 3, H]. has_edges False
        promises that no id is the edge id (attention then runs without a mask: faster)."""
        x = self.word_embeddings(ids) + self.slot_embeddings + self.type_embedding                  # [N, 3, H]
        x = self.embed_norm(x)
        attn_mask = (ids != self.edge_id)[:, None, None, :] if has_edges else None                  # [N, 1, 1, 3]
        for layer in self.layers:
            x = layer(x, attn_mask, None)
        return x

    def merge(self, slots: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        """slots [B, L, 3, H] (each position's own trigram outputs, any float dtype; ZERO at padding
        positions, so they contribute nothing to their neighbours) -> [B, L, H] float32."""
        g = torch.sigmoid(self.gates)                                                               # [3, H]
        s = slots[:, :, 1] * g[1]                     # centre of its own trigram              [B, L, H]
        s[:, 1:] += slots[:, :-1, 2] * g[0]           # token i as the right slot of trigram i-1
        s[:, :-1] += slots[:, 1:, 0] * g[2]           # token i as the left slot of trigram i+1
        s += self.position_embeddings.weight[:slots.shape[1]]
        s += self.token_type_embeddings(token_type_ids)
        return self.merge_norm(s)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Training path: every real position's trigram through the shallow layers, merged -> [B, L, H]."""
        tri = trigram_ids(input_ids, mask, self.edge_id)                                             # [B, L, 3]
        slots = torch.zeros(*input_ids.shape, 3, self.spec.hidden_size, device=input_ids.device,
                            dtype=self.word_embeddings.weight.dtype)
        slots[mask] = self.forward_ngrams(tri[mask])
        return self.merge(slots, token_type_ids)

    def weights_hash(self) -> str:
        """Hash of the weights a table's values depend on (embeddings + shallow layers)."""
        return weights_hash({k: v for k, v in self.state_dict().items() if _table_relevant(k)})


def _table_relevant(name: str) -> bool:
    return name.split(".")[0] in ("word_embeddings", "slot_embeddings", "type_embedding", "embed_norm", "layers")


# -- shallow directories -------------------------------------------------------------------------
@dataclass(frozen=True)
class ShallowMeta:
    skip_layers: int
    edge_id: int
    backbone: str                 # the teacher's name
    teacher_hash: str             # weights_hash of the teacher's upper layers (k..N-1)
    weights_hash: str             # ShallowModel.weights_hash()
    spec: dict = field(default_factory=dict)
    distill: dict = field(default_factory=dict)   # how it was trained (corpus, steps, loss)


def teacher_upper_hash(teacher, skip_layers: int) -> str:
    """Hash of the teacher layers that skip mode still runs: shallow layers belong to one teacher."""
    return weights_hash({k: v for k, v in teacher.state_dict().items()
                         if k.startswith("layers.") and int(k.split(".")[1]) >= skip_layers})


def save_shallow(model: ShallowModel, path: str | Path, backbone: str, teacher_hash: str,
                 distill: dict | None = None) -> ShallowMeta:
    """Write shallow.safetensors + shallow.json into directory `path` (atomically per file)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = ShallowMeta(model.skip_layers, model.edge_id, backbone, teacher_hash, model.weights_hash(),
                       asdict(model.spec), distill or {})
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path, prefix=".shallow-", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": SHALLOW_FORMAT})
        os.replace(tmp, path / SHALLOW_WEIGHTS)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    doc = {"format": SHALLOW_FORMAT, "version": 1, **asdict(meta)}
    tmp_meta = path / (SHALLOW_META + ".tmp")
    tmp_meta.write_text(json.dumps(doc, indent=2))
    os.replace(tmp_meta, path / SHALLOW_META)
    return meta


def load_shallow(path: str | Path, teacher=None) -> tuple[ShallowModel, ShallowMeta]:
    """A ShallowModel from a `vbert distill` directory. With `teacher` (a vbert Encoder) it checks
    that the shallow layers were distilled for this teacher's upper layers."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_shallow_meta(path)
    spec = BackboneSpec(**meta.spec)
    if teacher is not None:
        if asdict(teacher.spec) | {"name": spec.name} != asdict(spec):
            raise SkipError(f"{path}: shallow layers were distilled for a backbone of another shape")
        got = teacher_upper_hash(teacher, meta.skip_layers)
        if got != meta.teacher_hash:
            raise SkipError(f"{path}: shallow layers were distilled for other upper-layer weights "
                            f"({meta.teacher_hash[:12]}, this backbone has {got[:12]})")
    model = ShallowModel(spec, meta.skip_layers, meta.edge_id)
    try:
        state = load_file(str(path / SHALLOW_WEIGHTS))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise SkipError(f"{path / SHALLOW_WEIGHTS}: unreadable ({e})") from e
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise SkipError(f"{path / SHALLOW_WEIGHTS}: missing tensors {sorted(missing)[:5]}")
    model.load_state_dict(state, strict=True)
    if model.weights_hash() != meta.weights_hash:
        raise SkipError(f"{path}: weights do not match the hash in {SHALLOW_META} (corrupt or edited)")
    return model.eval().requires_grad_(False), meta


def read_shallow_meta(path: str | Path) -> ShallowMeta:
    """The metadata of a `vbert distill` directory; SkipError if it is not one."""
    path = Path(path)
    if not (path / SHALLOW_META).is_file() or not (path / SHALLOW_WEIGHTS).is_file():
        raise SkipError(f"{path}: not a shallow-layer directory (expected {SHALLOW_META} and {SHALLOW_WEIGHTS}; "
                        f"`vbert distill` writes them)")
    doc = json.loads((path / SHALLOW_META).read_text())
    if doc.get("format") != SHALLOW_FORMAT:
        raise SkipError(f"{path / SHALLOW_META}: format {doc.get('format')!r} is not {SHALLOW_FORMAT!r}")
    return ShallowMeta(**{k: doc[k] for k in ShallowMeta.__dataclass_fields__})


# -- computing table entries ---------------------------------------------------------------------
@torch.inference_mode()
def compute_entries(model: ShallowModel, keys: torch.Tensor, bits: int, dtype: torch.dtype,
                    chunk: int = COMPUTE_CHUNK, progress=None) -> torch.Tensor:
    """Slot outputs of the trigrams `keys` [N] (int64), rounded to `dtype`: [N, 3, H].
    Every forward runs on exactly `chunk` trigrams (the last one padded), trigrams with an edge id
    (masked attention) and without one (no mask) in separate chunks: one shape and one path per key,
    so an entry's value does not depend on the batch it was computed in (tested bit for bit: table
    build, cache miss and training agree; with chunks of other sizes the CPU GEMMs of the real
    backbone do differ in the last bits). A small miss set still pays a whole chunk."""
    dev = model.word_embeddings.weight.device
    n, h = keys.shape[0], model.spec.hidden_size
    out = torch.empty((n, 3, h), dtype=dtype, device=dev)
    ids = unpack(keys.to(dev), bits)                                                              # [N, 3]
    edged = (ids == model.edge_id).any(1)
    for has_edges in (False, True):                   # a key's path depends only on the key itself
        idx = edged.nonzero().squeeze(1) if has_edges else (~edged).nonzero().squeeze(1)
        for start in range(0, idx.numel(), chunk):
            part_idx = idx[start:start + chunk]
            part = ids[part_idx]
            m = part.shape[0]
            if m < chunk:
                part = torch.cat([part, part[:1].expand(chunk - m, 3)])
            out[part_idx] = model.forward_ngrams(part, has_edges)[:m].to(dtype)
            if progress is not None:
                progress.update(m)
    return out


# -- the runtime -----------------------------------------------------------------------------------
@dataclass
class TableCounters:
    tokens: int = 0               # real token positions served
    lookups: int = 0              # unique trigram keys looked up
    table_hits: int = 0
    cache_hits: int = 0
    computed: int = 0             # misses computed by the shallow layers (exact)
    fallback: int = 0             # misses served by a bigram / unigram entry (approximate)

    def hit_rate(self) -> float:
        """Share of unique keys served without computing (table + miss cache)."""
        return (self.table_hits + self.cache_hits) / self.lookups if self.lookups else 0.0


class SkipTable:
    """One named set of shallow layers with its n-gram table (or none) and miss cache."""

    def __init__(self, name: str, shallow: ShallowModel, meta: ShallowMeta, table: NgramTable | None,
                 cache_entries: int, dtype: torch.dtype, device: torch.device):
        self.name, self.shallow, self.meta, self.table = name, shallow.to(device), meta, table
        self.bits = key_bits(shallow.spec.vocab_size)
        self.dtype = TABLE_DTYPES[table.meta.dtype] if table is not None else dtype
        self.cache = MissCache(cache_entries, (3, shallow.spec.hidden_size), self.dtype, device)
        self.counters = TableCounters()

    @torch.inference_mode()
    def slots(self, keys: torch.Tensor, mode: str, force: bool = False) -> torch.Tensor:
        """Slot outputs [N, 3, H] of unique trigram keys [N], from the table, the miss cache, or
        computed (exact mode, and anything fallback cannot find), computed ones cached."""
        c = self.counters
        n = keys.shape[0]
        c.lookups += n
        if force:
            c.computed += n
            return compute_entries(self.shallow, keys, self.bits, self.dtype)
        out = None
        todo = torch.ones(n, dtype=torch.bool, device=keys.device)
        if self.table is not None:
            pos, hit = self.table.lookup(keys)
            hits = int(hit.sum())
            c.table_hits += hits
            if hits == n:                              # everything in the table: one gather
                return self.table.values[pos]
            out = torch.empty((n, 3, self.shallow.spec.hidden_size), dtype=self.dtype, device=keys.device)
            out[hit] = self.table.values[pos[hit]]
            todo &= ~hit
        if out is None:
            out = torch.empty((n, 3, self.shallow.spec.hidden_size), dtype=self.dtype, device=keys.device)
        if mode == "fallback" and self.table is not None and bool(todo.any()):
            idx = todo.nonzero().squeeze(1)
            remaining = torch.ones_like(idx, dtype=torch.bool)
            for alt in fallback_keys(keys[idx], self.bits, self.shallow.edge_id):   # left bigram, right, unigram
                pos, hit = self.table.lookup(alt)
                hit &= remaining
                out[idx[hit]] = self.table.values[pos[hit]]
                remaining &= ~hit
                c.fallback += int(hit.sum())
            todo[idx[~remaining]] = False
        if bool(todo.any()):
            idx = todo.nonzero().squeeze(1)
            pos = self.cache.find(keys[idx])
            found = pos >= 0
            out[idx[found]] = self.cache.values[pos[found]]
            c.cache_hits += int(found.sum())
            idx = idx[~found]
            if idx.numel():
                values = compute_entries(self.shallow, keys[idx], self.bits, self.dtype)
                out[idx] = values
                self.cache.insert(keys[idx], values)
                c.computed += idx.numel()
        return out

    def nbytes(self) -> int:
        return (self.table.nbytes() if self.table is not None else 0) + self.cache.values.nbytes


class SkipRuntime:
    """The lower layers of skip mode for every configured table; rows of a batch may use different
    tables (row_tables), and all rows then share the upper layers."""

    def __init__(self, tables: dict[str, SkipTable], mode: str = "exact", default: str | None = None):
        if mode not in SKIP_MODES:
            raise SkipError(f"skip mode {mode!r} is not one of {SKIP_MODES}")
        if not tables:
            raise SkipError("skip mode needs at least one table")
        layers = {t.meta.skip_layers for t in tables.values()}
        if len(layers) != 1:
            raise SkipError(f"all shallow layer sets must replace the same number of layers, got {sorted(layers)}")
        self.tables = tables
        self.names = list(tables)
        self.mode = mode
        self.default = default if default is not None else self.names[0]
        if self.default not in tables:
            raise SkipError(f"default table {self.default!r} is not one of {self.names}")
        self.skip_layers = layers.pop()
        self.force = False            # True: ignore tables and caches, compute every trigram

    def index_of(self, name: str | None) -> int:
        name = self.default if name is None else name
        if name not in self.tables:
            raise SkipError(f"table {name!r} is not loaded (loaded: {self.names})")
        return self.names.index(name)

    @torch.inference_mode()
    def lower_states(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, mask: torch.Tensor,
                     row_tables: Sequence[int] | np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        """The input of layer k for a padded batch: [B, L, H] in `dtype`. row_tables[b]: the index
        (into self.names) of the table row b uses."""
        row_tables = np.asarray(row_tables, dtype=np.int64)
        used = np.unique(row_tables).tolist()
        if len(used) == 1:                             # the common case: no row gathering at all
            return self._lower(self.tables[self.names[used[0]]], input_ids, token_type_ids, mask).to(dtype)
        h = next(iter(self.tables.values())).shallow.spec.hidden_size
        out = torch.empty((*input_ids.shape, h), dtype=dtype, device=input_ids.device)
        for t in used:
            rows = torch.from_numpy(np.nonzero(row_tables == t)[0]).to(input_ids.device)
            out[rows] = self._lower(self.tables[self.names[t]], input_ids[rows], token_type_ids[rows],
                                    mask[rows]).to(dtype)
        return out

    def _lower(self, table: SkipTable, ids: torch.Tensor, types: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Rows of one table: unique trigram keys, their slot outputs, merged -> [b, L, H] float32."""
        bsz, seq = ids.shape
        keys = pack(trigram_ids(ids, mask, table.shallow.edge_id), table.bits)                       # [b, L]
        all_real = bool(mask.all())
        real_keys = keys.view(-1) if all_real else keys[mask]                                       # [n]
        unique, inverse = torch.unique(real_keys, return_inverse=True)
        table.counters.tokens += real_keys.numel()
        values = table.slots(unique, self.mode, self.force)                                         # [U, 3, H]
        if all_real:
            slots = values[inverse].view(bsz, seq, 3, -1)
        else:
            slots = torch.zeros((bsz, seq, *values.shape[1:]), dtype=values.dtype, device=ids.device)
            slots[mask] = values[inverse]
        return table.shallow.merge(slots, types)

    def stats(self) -> dict:
        return {name: {**asdict(t.counters), "hit_rate": t.counters.hit_rate(),
                       "table_entries": len(t.table.keys) if t.table is not None else 0,
                       "cache": t.cache.stats(), "bytes": t.nbytes()} for name, t in self.tables.items()}


def open_table(name: str, shallow_dir: str | Path, table_path: str | Path | None, teacher, device: torch.device,
               cache_entries: int, dtype: str = "float32") -> SkipTable:
    """Load shallow layers (checked against `teacher`) and their table (checked against the layers)."""
    model, meta = load_shallow(shallow_dir, teacher)
    table = None
    if table_path is not None:
        table = load_table(table_path, weights_hash=meta.weights_hash, device=device)
        if table.meta.edge_id != meta.edge_id or table.meta.hidden_size != model.spec.hidden_size:
            raise TableError(f"table {table_path}: built for another edge id or hidden size")
    return SkipTable(name, model, meta, table, cache_entries, TABLE_DTYPES[dtype], device)


__all__ = ["COMPUTE_CHUNK", "ShallowMeta", "ShallowModel", "SkipError", "SkipRuntime", "SkipTable",
           "TableCounters", "compute_entries", "load_shallow", "open_table", "read_shallow_meta", "save_shallow",
           "teacher_upper_hash"]
