"""Canonical encoding of an AdapterArtifact as one safetensors file (the store's blob format).

Every tensor under a canonical name, float32, sorted; the artifact's config (kind, LoRA scales and
ranks, bottleneck size and placement, head spec) embedded as safetensors metadata, so the bytes
(and their sha256) cover all content and the same content always gives the same bytes. Decoding is
strict: any disagreement between the bytes, the embedded config and the JSON is a _Problem, which
the store reports as a CorruptAdapterError.

A decoder artifact (generate head) has `"backbone": "decoder"` in its config and LoRA targets of
vbert.decoder_lora.DECODER_LORA_TARGETS; encoder artifacts have no "backbone" field (so blobs written
before decoders existed keep their bytes and sha256).

Tensor names: lora.<layer>.<target>.A [r, in], lora.<layer>.<target>.B [out, r],
bottleneck.<layer>.down.weight [m, H], .down.bias [m], .up.weight [H, m], .up.bias [H] (placement
"both" adds the same under bottleneck_ffn.<layer>, the feed-forward ones), head.weight [C, H], head.bias [C].
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from vbert.adapters import (BOTTLENECK_PLACEMENTS, AdapterError, BottleneckAdapter, BottleneckWeights, LoraAdapter,
                            LoraWeights)
from vbert.artifact import AdapterArtifact
from vbert.config import LORA_TARGETS
from vbert.decoder_lora import DECODER_LORA_TARGETS
from vbert.heads import DECODER, ENCODER, Head, HeadSpec

from .errors import CorruptAdapterError, FailedPreconditionError

log = logging.getLogger(__name__)

FORMAT = "vbert-store-adapter"
VERSION = 1
METADATA_KEY = "vbert_adapter"
STORED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # all cast to float32 exactly
_FILE_FIELDS = ("num_tensors", "num_bytes", "sha256")          # in the JSON, not in the embedded copy
_BOTTLENECK_PARTS = ("down.weight", "down.bias", "up.weight", "up.bias")
_MAX_HEADER_BYTES = 100 * 2**20
TARGETS_OF = {ENCODER: LORA_TARGETS, DECODER: DECODER_LORA_TARGETS}   # LoRA targets per backbone


class _Problem(Exception):
    """What is wrong with stored bytes; wrapped into CorruptAdapterError with the sha."""


# -- canonical encoding ----------------------------------------------------------------------------

def _as_float32(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise FailedPreconditionError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.dtype not in STORED_DTYPES:
        raise FailedPreconditionError(f"{name}: dtype {t.dtype} is not stored (float32, float16 or bfloat16)")
    return t.detach().to("cpu", torch.float32, copy=True).contiguous()  # own storage, no shared views


def _finite_float(name: str, x) -> float:
    x = float(x)
    if not math.isfinite(x):
        raise FailedPreconditionError(f"{name}: {x} is not finite")
    return x


def _content(artifact: AdapterArtifact) -> tuple[dict, dict[str, torch.Tensor]]:
    """The artifact's config (JSON-able, canonical types) and its tensors under canonical names."""
    a, head = artifact.adapter, artifact.head
    try:                                   # what is written must read back under the head schema
        head_json = HeadSpec.from_json(head.spec.to_json()).to_json()
    except (AdapterError, AttributeError) as e:
        raise FailedPreconditionError(f"head spec: {e}") from None
    content: dict = {"format": FORMAT, "version": VERSION, "kind": artifact.kind, "head": head_json}
    if artifact.skip_table is not None:                  # absent otherwise: older blobs keep their bytes
        content["skip_table"] = str(artifact.skip_table)
    backbone = head.spec.backbone
    if backbone != ENCODER:                              # absent for the encoder: older blobs keep their bytes
        content["backbone"] = backbone
    try:
        artifact.check_backbone()                        # decoder: LoRA on decoder targets, no skip table
    except AdapterError as e:
        raise FailedPreconditionError(str(e)) from None
    targets = TARGETS_OF[backbone]
    tensors: dict[str, torch.Tensor] = {}
    if isinstance(a, LoraAdapter):
        modules = []
        for (layer, target), w in sorted(a.modules.items()):
            name = f"lora layer {layer} {target}"
            if target not in targets:
                raise FailedPreconditionError(f"{name}: unknown target for the {backbone} (known: {targets})")
            modules.append({"layer": int(layer), "target": target, "rank": int(w.rank),
                            "scale": _finite_float(f"{name} scale", w.scale)})
            tensors[f"lora.{layer}.{target}.A"] = _as_float32(f"{name} lora_A", w.A)  # [r, in]
            tensors[f"lora.{layer}.{target}.B"] = _as_float32(f"{name} lora_B", w.B)  # [out, r]
        content["lora"] = {"rank": int(a.rank), "alpha": _finite_float("lora alpha", a.alpha),
                           "use_rslora": bool(a.use_rslora), "modules": modules}
    elif isinstance(a, BottleneckAdapter):
        for prefix, ws in (("bottleneck", a.layer_weights), ("bottleneck_ffn", a.ffn_weights)):  # ffn: "both" only
            for layer, w in sorted(ws.items()):
                for part, t in zip(_BOTTLENECK_PARTS, (w.down_w, w.down_b, w.up_w, w.up_b)):
                    tensors[f"{prefix}.{layer}.{part}"] = _as_float32(f"{prefix} layer {layer} {part}", t)
        content["bottleneck"] = {"size": int(a.size), "layers": [int(x) for x in sorted(a.layer_weights)]}
        if a.placement != "attn_out":      # absent for the original placement: older blobs keep their bytes
            content["bottleneck"]["placement"] = str(a.placement)
    elif a is not None:
        raise FailedPreconditionError(f"unknown adapter type {type(a).__name__}")
    has_weights = head.weight is not None or head.bias is not None
    if not head.spec.has_weights and has_weights:
        raise FailedPreconditionError(f"a {head.spec.kind.value} head has no weights")
    if head.spec.has_weights:
        if head.weight is None or head.bias is None:
            raise FailedPreconditionError(f"{head.spec.kind.value} head is missing its weight or bias")
        tensors["head.weight"] = _as_float32("head weight", head.weight)  # [C, H]
        tensors["head.bias"] = _as_float32("head bias", head.bias)        # [C]
    return content, tensors


def encode_artifact(artifact: AdapterArtifact) -> tuple[bytes, dict]:
    """Canonical bytes of one safetensors file (sorted names, contiguous float32, the config embedded as
    metadata) and the JSON config (+ num_tensors, num_bytes, sha256). Same content -> same bytes."""
    content, tensors = _content(artifact)
    meta = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False)
    data = st_save(dict(sorted(tensors.items())), metadata={METADATA_KEY: meta})
    digest = hashlib.sha256(data).hexdigest()
    return data, dict(content, num_tensors=len(tensors), num_bytes=len(data), sha256=digest)


def _no_constant(name: str):
    raise ValueError(f"{name} is not allowed in a stored config")


def _loads(text: str | bytes):
    return json.loads(text, parse_constant=_no_constant)  # refuses NaN and Infinity


def _embedded_content(data: bytes) -> tuple[dict, int]:
    """The config embedded in a safetensors file's header, and the number of tensors it declares."""
    if len(data) < 8:
        raise _Problem(f"truncated: {len(data)} bytes, shorter than a safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8 or n > _MAX_HEADER_BYTES:
        raise _Problem(f"truncated or not safetensors: header length {n} exceeds the {len(data)} bytes")
    try:
        header = _loads(data[8:8 + n])
    except (ValueError, UnicodeDecodeError) as e:
        raise _Problem(f"safetensors header is not valid JSON ({e})")
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not isinstance(meta.get(METADATA_KEY), str):
        raise _Problem(f"safetensors header has no {METADATA_KEY!r} metadata")
    try:
        content = _loads(meta[METADATA_KEY])
    except ValueError as e:
        raise _Problem(f"embedded config is not valid JSON ({e})")
    if not isinstance(content, dict):
        raise _Problem("embedded config is not a JSON object")
    return content, len(header) - 1


def _int(d: dict, key: str, where: str, minimum: int = 0) -> int:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise _Problem(f"{where}: {key} {v!r} is not an integer >= {minimum}")
    return v


def _number(d: dict, key: str, where: str) -> float:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _Problem(f"{where}: {key} {v!r} is not a finite number")
    return float(v)


class _Tensors:
    """The tensors of a file, taken one by one with checks; what is never taken is unexpected."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors, self.taken = tensors, set()

    def take(self, name: str, shape: tuple[int | None, ...]) -> torch.Tensor:
        t = self.tensors.get(name)
        if t is None or name in self.taken:
            raise _Problem(f"tensor {name}: missing from the tensor file (or listed twice in the config)")
        self.taken.add(name)
        if t.dtype != torch.float32:
            raise _Problem(f"tensor {name}: dtype {t.dtype}, expected float32")
        if t.dim() != len(shape) or any(e is not None and s != e for s, e in zip(t.shape, shape)):
            raise _Problem(f"tensor {name}: shape {tuple(t.shape)} does not match {shape} (None = any)")
        if not bool(torch.isfinite(t).all()):
            raise _Problem(f"tensor {name}: contains NaN or Inf")
        return t


def _lora_from(cfg, tensors: _Tensors, backbone: str = ENCODER) -> LoraAdapter:
    modules_cfg = cfg.get("modules") if isinstance(cfg, dict) else None
    if not (isinstance(modules_cfg, list) and modules_cfg and isinstance(cfg.get("use_rslora"), bool)):
        raise _Problem("lora config needs a non-empty module list and a boolean use_rslora")
    targets = TARGETS_OF[backbone]
    modules: dict[tuple[int, str], LoraWeights] = {}
    for m in modules_cfg:
        if not isinstance(m, dict) or m.get("target") not in targets:
            raise _Problem(f"lora module {m!r}: target is not one of the {backbone}'s {targets}")
        layer, target = _int(m, "layer", "lora module"), m["target"]
        where = f"lora module {layer} {target}"
        r = _int(m, "rank", where, 1)
        p = f"lora.{layer}.{target}"
        modules[(layer, target)] = LoraWeights(tensors.take(f"{p}.A", (r, None)),   # [r, in]
                                               tensors.take(f"{p}.B", (None, r)),   # [out, r]
                                               _number(m, "scale", where))
    return LoraAdapter(rank=_int(cfg, "rank", "lora", 1), alpha=_number(cfg, "alpha", "lora"),
                       modules=modules, use_rslora=cfg["use_rslora"])


def _bottleneck_from(cfg, tensors: _Tensors, backbone: str = ENCODER) -> BottleneckAdapter:
    layers = cfg.get("layers") if isinstance(cfg, dict) else None
    if not isinstance(layers, list) or not layers:
        raise _Problem("bottleneck config needs a non-empty layer list")
    m = _int(cfg, "size", "bottleneck", 1)
    placement = cfg.get("placement", "attn_out")
    if placement not in BOTTLENECK_PLACEMENTS:
        raise _Problem(f"bottleneck placement {placement!r} is not one of {BOTTLENECK_PLACEMENTS}")
    prefixes = ("bottleneck", "bottleneck_ffn") if placement == "both" else ("bottleneck",)
    weights: dict[str, dict[int, BottleneckWeights]] = {p: {} for p in prefixes}
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise _Problem(f"bottleneck layer {layer!r} is not an integer >= 0")
        for prefix in prefixes:
            p = f"{prefix}.{layer}"
            down_w = tensors.take(f"{p}.down.weight", (m, None))                                      # [m, H]
            h = down_w.shape[1]
            weights[prefix][layer] = BottleneckWeights(down_w, tensors.take(f"{p}.down.bias", (m,)),   # [m]
                                                       tensors.take(f"{p}.up.weight", (h, m)),         # [H, m]
                                                       tensors.take(f"{p}.up.bias", (h,)))             # [H]
    return BottleneckAdapter(size=m, layer_weights=weights["bottleneck"], placement=placement,
                             ffn_weights=weights.get("bottleneck_ffn", {}))


_ADAPTER_DECODERS = {"lora": _lora_from, "bottleneck": _bottleneck_from, "none": None}


def _build(content: dict, tensors: dict[str, torch.Tensor]) -> AdapterArtifact:
    """The artifact described by a stored config and its tensors, checked for consistency."""
    if content.get("format") != FORMAT or content.get("version") != VERSION:
        raise _Problem(f"format {content.get('format')!r} v{content.get('version')!r} is not {FORMAT} "
                       f"v{VERSION}")
    kind = content.get("kind")
    if kind not in _ADAPTER_DECODERS:
        raise _Problem(f"adapter kind {kind!r} is not one of {list(_ADAPTER_DECODERS)}")
    if set(content) - {"skip_table", "backbone"} != {"format", "version", "kind", "head"} | ({kind} - {"none"}):
        raise _Problem(f"config fields {sorted(content)} do not fit a {kind} adapter")
    skip_table = content.get("skip_table")
    if skip_table is not None and (not isinstance(skip_table, str) or not skip_table):
        raise _Problem(f"skip_table must be a non-empty string, got {skip_table!r}")
    try:
        spec = HeadSpec.from_json(content["head"])
    except AdapterError as e:
        raise _Problem(f"head spec: {e}")
    backbone = content.get("backbone", ENCODER)
    if "backbone" in content and backbone != DECODER:   # canonical: written for the decoder only
        raise _Problem(f"backbone {backbone!r} is not {DECODER!r} (encoder blobs have no backbone field)")
    if backbone != spec.backbone:
        raise _Problem(f"backbone {backbone!r} does not fit the {spec.kind.value} head (its backbone is "
                       f"{spec.backbone!r})")
    if backbone == DECODER and (kind != "lora" or skip_table is not None):
        raise _Problem(f"a decoder adapter must be LoRA without a skip table, got kind {kind!r}"
                       f"{'' if skip_table is None else ' with a skip table'}")
    taken = _Tensors(tensors)
    decoder = _ADAPTER_DECODERS[kind]
    adapter = decoder(content[kind], taken, backbone) if decoder is not None else None
    head = Head(spec)
    if spec.has_weights:
        c = spec.num_labels
        head = Head(spec, taken.take("head.weight", (c, None)), taken.take("head.bias", (c,)))  # [C, H], [C]
    unexpected = sorted(set(tensors) - taken.taken)
    if unexpected:
        raise _Problem(f"tensors not described by the config: {unexpected[:4]}")
    return AdapterArtifact(adapter, head, skip_table)


def decode_artifact(data: bytes, config: dict) -> AdapterArtifact:
    """Inverse of encode_artifact. Checks the bytes against the config's sha256 and num_bytes, the
    config against the copy embedded in the file, every tensor name, shape, dtype and finiteness;
    raises CorruptAdapterError naming the sha and the problem."""
    sha = config.get("sha256") if isinstance(config, dict) else None
    try:
        if not isinstance(config, dict) or any(k not in config for k in _FILE_FIELDS):
            raise _Problem(f"config is not an object with {list(_FILE_FIELDS)}")
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha:
            raise _Problem(f"checksum mismatch: the tensor file ({len(data)} bytes) hashes to {digest}")
        if config["num_bytes"] != len(data):
            raise _Problem(f"size mismatch: config says {config['num_bytes']} bytes, file has {len(data)}")
        content, num_declared = _embedded_content(data)
        if {k: v for k, v in config.items() if k not in _FILE_FIELDS} != content:
            raise _Problem("the JSON config does not match the config embedded in the tensor file")
        try:
            tensors = st_load(data)
        except Exception as e:  # safetensors raises its own error types on malformed files
            raise _Problem(f"cannot parse the tensor file ({type(e).__name__}: {e})")
        if not len(tensors) == num_declared == config["num_tensors"]:
            raise _Problem(f"tensor count mismatch: config says {config['num_tensors']}, file {len(tensors)}")
        return _build(content, tensors)
    except _Problem as e:
        raise CorruptAdapterError(f"adapter {sha or '<unknown sha>'}: {e}") from None
