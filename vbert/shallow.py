"""Shallow n-gram layers for skip mode (SkipBERT / PLOT): the model, its merge, its directories
(`vbert distill` output and shippable float16 exports) and the function that computes table entries.

The lowest k layers of the backbone are replaced by shallow layers that see only a token's trigram
(left, self, right; the edge id outside the sentence). A trigram's output, [3, H] (one vector per
slot), depends only on its three ids, so it can be looked up instead of computed. A token's state
entering layer k is merged from the three windows that contain it:

    s_i = g_c * T(i)[centre] + g_l * T(i-1)[right] + g_r * T(i+1)[left]        (g = sigmoid(gates))
    h_i = LayerNorm(s_i + position[i] + token_type[i])

and layers k..N-1 (with the tenants' adapters) run as usual on the whole sequence. ShallowModel holds
the trainable pieces (initialized from the teacher; `vbert distill` trains them). Shallow outputs
are always rounded to the table's dtype (compute_entries), so the table, the miss path and the
force-computed path produce identical values. vbert.skip serves them.
"""
from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .backbone import BackboneSpec, EncoderLayer
from .ngram import TABLE_COMPUTE_DTYPES, trigram_ids, unpack, weights_hash

SHALLOW_FORMAT = "vbert-shallow"
SHALLOW_META = "shallow.json"
SHALLOW_WEIGHTS = "shallow.safetensors"
TABLE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
COMPUTE_DTYPES = ("auto", *TABLE_COMPUTE_DTYPES)   # what the shallow layers compute in (auto: bfloat16 where fast)
COMPUTE_CHUNK = 256            # trigrams per shallow forward, always (fewer are padded): one shape


class SkipError(ValueError):
    """A shallow-layer directory or skip configuration that cannot be used (names the problem)."""


def resolve_compute_dtype(name: str, device: torch.device | str) -> str:
    """The dtype the shallow layers compute table entries in: "auto" is bfloat16 where `device` multiplies it
    faster than float32 (vbert.device.fast_bfloat16), else float32."""
    from .device import fast_bfloat16

    if name not in COMPUTE_DTYPES:
        raise SkipError(f"compute dtype {name!r} is not one of {COMPUTE_DTYPES}")
    if name == "auto":
        return "bfloat16" if fast_bfloat16(device) else "float32"
    return name


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
            x = layer(x, attn_mask, None, short=True)
        return x

    def for_compute(self, dtype: str) -> "ShallowModel":
        """The model that computes table entries in `dtype` (float32 or bfloat16): itself for float32, else
        a copy with every weight in that dtype (bfloat16 on a CPU with AVX-512 BF16: about 2x faster a chunk)."""
        if dtype not in TABLE_COMPUTE_DTYPES:
            raise SkipError(f"compute dtype {dtype!r} is not one of {TABLE_COMPUTE_DTYPES}")
        if dtype == "float32":
            return self
        return copy.deepcopy(self).to(TABLE_DTYPES[dtype]).eval().requires_grad_(False)

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
    dtype: str = "float32"                        # of the stored weights (float16: a shipped export)
    file_sha256: str | None = None                # of shallow.safetensors, checked at load when present


def teacher_upper_hash(teacher, skip_layers: int) -> str:
    """Hash of the teacher layers that skip mode still runs: shallow layers belong to one teacher."""
    return weights_hash({k: v for k, v in teacher.state_dict().items()
                         if k.startswith("layers.") and int(k.split(".")[1]) >= skip_layers})


def save_shallow(model: ShallowModel, path: str | Path, backbone: str, teacher_hash: str,
                 distill: dict | None = None, dtype: str = "float32") -> ShallowMeta:
    """Write shallow.safetensors + shallow.json into directory `path` (atomically per file). dtype
    float16 / bfloat16 stores rounded weights (a shipped export): the recorded weights hash is that of
    the rounded weights, which is what a load gives and what a table built from them records."""
    from safetensors.torch import save_file

    if dtype not in TABLE_DTYPES:
        raise SkipError(f"shallow dtype {dtype!r} is not one of {tuple(TABLE_DTYPES)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if dtype != "float32":                     # a rounded copy: its hash is what a load of the file gives
        source = model.state_dict()
        model = ShallowModel(model.spec, model.skip_layers, model.edge_id).float()
        with torch.no_grad():
            for name, value in model.state_dict().items():
                value.copy_(source[name].detach().cpu().to(TABLE_DTYPES[dtype]))
    state = {k: v.detach().to(TABLE_DTYPES[dtype]).cpu().contiguous() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path, prefix=".shallow-", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": SHALLOW_FORMAT})
        digest = _sha256(tmp)
        os.replace(tmp, path / SHALLOW_WEIGHTS)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    meta = ShallowMeta(model.skip_layers, model.edge_id, backbone, teacher_hash, model.weights_hash(),
                       asdict(model.spec), distill or {}, dtype, digest)
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
    if meta.file_sha256 is not None and _sha256(path / SHALLOW_WEIGHTS) != meta.file_sha256:
        raise SkipError(f"{path / SHALLOW_WEIGHTS}: sha256 differs from the one in {SHALLOW_META} (damaged or "
                        f"replaced file)")
    try:
        state = load_file(str(path / SHALLOW_WEIGHTS))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise SkipError(f"{path / SHALLOW_WEIGHTS}: unreadable ({e})") from e
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise SkipError(f"{path / SHALLOW_WEIGHTS}: missing tensors {sorted(missing)[:5]}")
    model.load_state_dict(state, strict=True)     # float16 weights are widened into the float32 model
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
    optional = {"dtype": "float32", "file_sha256": None}           # fields newer than the first format
    try:
        return ShallowMeta(**{k: doc[k] if k not in optional else doc.get(k, optional[k])
                              for k in ShallowMeta.__dataclass_fields__})
    except KeyError as e:
        raise SkipError(f"{path / SHALLOW_META}: missing field {e}") from e


def export_shallow(src: str | Path, dst: str | Path, dtype: str = "float16") -> ShallowMeta:
    """A shippable copy of a `vbert distill` directory: weights rounded to `dtype`, their sha256 and
    the rounded weights' hash in shallow.json (tables must be built from the export, not the source)."""
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise SkipError(f"{dst} exists and is not empty")
    model, meta = load_shallow(src)
    return save_shallow(model, dst, meta.backbone, meta.teacher_hash, meta.distill, dtype)


def _sha256(path: str | Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- computing table entries ---------------------------------------------------------------------
@torch.inference_mode()
def compute_entries(model: ShallowModel, keys: torch.Tensor, bits: int, dtype: torch.dtype,
                    chunk: int = COMPUTE_CHUNK, progress=None, timings: dict | None = None) -> torch.Tensor:
    """Slot outputs of the trigrams `keys` [N] (int64), rounded to `dtype`: [N, 3, H], computed in the dtype
    of `model`'s weights (ShallowModel.for_compute: a table records it, its misses must use the same).
    Every forward runs on exactly `chunk` trigrams (the last one padded), trigrams with an edge id
    (masked attention) and without one (no mask) in separate chunks: one shape and one path per key,
    so an entry's value does not depend on the batch it was computed in (tested bit for bit: table
    build, cache miss and training agree; with chunks of other sizes the CPU GEMMs of the real
    backbone do differ in the last bits). A small miss set still pays a whole chunk. `timings`, if
    given, collects [seconds, chunks] under "chunk" and "edge_chunk" (wall time: CPU only)."""
    dev = model.word_embeddings.weight.device
    n, h = keys.shape[0], model.spec.hidden_size
    out = torch.empty((n, 3, h), dtype=dtype, device=dev)
    ids = unpack(keys.to(dev), bits)                                                              # [N, 3]
    edged = (ids == model.edge_id).any(1)
    for has_edges in (False, True):                   # a key's path depends only on the key itself
        idx = edged.nonzero().squeeze(1) if has_edges else (~edged).nonzero().squeeze(1)
        t0 = time.perf_counter()
        for start in range(0, idx.numel(), chunk):
            part_idx = idx[start:start + chunk]
            part = ids[part_idx]
            m = part.shape[0]
            if m < chunk:
                part = torch.cat([part, part[:1].expand(chunk - m, 3)])
            out[part_idx] = model.forward_ngrams(part, has_edges)[:m].to(dtype)
            if progress is not None:
                progress.update(m)
        if timings is not None and idx.numel():
            slot = timings.setdefault("edge_chunk" if has_edges else "chunk", [0.0, 0])
            slot[0] += time.perf_counter() - t0
            slot[1] += math.ceil(idx.numel() / chunk)
    return out

__all__ = ["COMPUTE_CHUNK", "COMPUTE_DTYPES", "SHALLOW_FORMAT", "SHALLOW_META", "SHALLOW_WEIGHTS", "TABLE_DTYPES",
           "ShallowMeta",
           "ShallowModel", "SkipError", "compute_entries", "export_shallow", "load_shallow", "read_shallow_meta",
           "resolve_compute_dtype", "save_shallow", "teacher_upper_hash"]
