"""An adapter artifact: the adapter weights (or none) plus the task head, as one unit that the
pool loads into a slot and that the store saves as files.

On-disk layout (a directory):
  vbert_adapter.json        {"format": "vbert-adapter", "version": 1, "kind", "head", "backbone", ...,
                            "skip_table" (only for adapters trained in skip mode: the table's name)}
  adapter_config.json       LoRA only: the PEFT config (so PEFT loads the directory unchanged)
  adapter_model.safetensors LoRA: PEFT tensor names; bottleneck: `layers.N.{down,up}.{weight,bias}`
                            (vbert_adapter.json's "bottleneck": {"size", "layers", "placement"}; placement
                            "both" adds `ffn_layers.N.*`, the feed-forward ones, and `layers.N.*` are at attn_out)
  head.safetensors          classify / tag heads: `weight` [C, H], `bias` [C]
A directory with only the two PEFT files (trained with Hugging Face PEFT) also loads: as LoRA with
an embed head, or with PEFT's saved `classifier` as a classify (SEQ_CLS) or tag (TOKEN_CLS) head;
task_type CAUSAL_LM makes it a decoder artifact (LoRA on a Llama-family decoder + a generate head).

A decoder artifact (backbone "decoder": its head is a generate head) is always LoRA keyed
(layer, target), target in vbert.decoder_lora.DECODER_LORA_TARGETS; its directory is the same with
the PEFT files written for a causal LM (`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`)
and no head file.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import peft_format
from .adapters import (BOTTLENECK_PLACEMENTS, AdapterError, BackboneShape, BottleneckAdapter, BottleneckWeights,
                       LoraAdapter, LoraWeights)
from .config import LORA_TARGETS
from .decoder_lora import DECODER_LORA_TARGETS, read_peft_causal_lm, to_peft_causal_lm
from .heads import DECODER, Head, HeadKind, HeadSpec

FORMAT = "vbert-adapter"
VERSION = 1
# Version 2 only marks a bottleneck placed anywhere but attn_out, so that a reader that predates
# placements refuses it instead of serving it in the wrong place; everything else stays version 1.
VERSIONS = (1, 2)
META_FILE = "vbert_adapter.json"
WEIGHTS_FILE = "adapter_model.safetensors"
HEAD_FILE = "head.safetensors"


@dataclass
class AdapterArtifact:
    adapter: LoraAdapter | BottleneckAdapter | None
    head: Head
    skip_table: str | None = None    # the skip-mode n-gram table it was trained with (None: the full model)

    @property
    def kind(self) -> str:
        return self.adapter.kind if self.adapter is not None else "none"

    @property
    def backbone(self) -> str:
        """"decoder" for a generate head (vbert.heads.DECODER), else "encoder"."""
        return self.head.spec.backbone

    def check_backbone(self) -> None:
        """AdapterError unless the adapter fits its backbone's family (no shapes checked): a decoder
        artifact is LoRA on DECODER_LORA_TARGETS without a skip table; an encoder LoRA targets LORA_TARGETS."""
        a = self.adapter
        if self.backbone == DECODER:
            if not isinstance(a, LoraAdapter):
                raise AdapterError(f"a decoder adapter (generate head) must be LoRA on {DECODER_LORA_TARGETS}, "
                                   f"got adapter kind {self.kind!r}")
            if self.skip_table is not None:
                raise AdapterError(f"a decoder adapter has no skip table (got {self.skip_table!r})")
            allowed, family = DECODER_LORA_TARGETS, "a decoder adapter (generate head)"
        elif isinstance(a, LoraAdapter):
            allowed, family = LORA_TARGETS, "an encoder adapter"
        else:
            return
        for layer, target in sorted(a.modules):
            if target not in allowed:
                raise AdapterError(f"lora layer {layer} {target}: not a target of {family} (known: {allowed})")

    def validate(self, shape: BackboneShape) -> None:
        if self.adapter is not None:
            self.adapter.validate(shape)
        self.head.validate(shape.hidden_size)

    def num_parameters(self) -> int:
        return (self.adapter.num_parameters() if self.adapter is not None else 0) + self.head.num_parameters()

    def tensors(self) -> list[torch.Tensor]:
        a, out = self.adapter, []
        if isinstance(a, LoraAdapter):
            out += [t for w in a.modules.values() for t in (w.A, w.B)]
        elif isinstance(a, BottleneckAdapter):
            out += [t for ws in a.positions().values() for w in ws.values()
                    for t in (w.down_w, w.down_b, w.up_w, w.up_b)]
        return out + [t for t in (self.head.weight, self.head.bias) if t is not None]

    def nbytes(self) -> int:
        """Host memory its tensors take."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def map_tensors(self, fn) -> "AdapterArtifact":
        """A copy with `fn` applied to every tensor (e.g. pin_memory for the host tier)."""
        a = self.adapter
        if isinstance(a, LoraAdapter):
            a = LoraAdapter(a.rank, a.alpha, {k: LoraWeights(fn(w.A), fn(w.B), w.scale) for k, w in a.modules.items()},
                            a.use_rslora)
        elif isinstance(a, BottleneckAdapter):
            def mapped(ws: dict[int, BottleneckWeights]) -> dict[int, BottleneckWeights]:
                return {k: BottleneckWeights(*(fn(t) for t in (w.down_w, w.down_b, w.up_w, w.up_b)))
                        for k, w in ws.items()}

            a = BottleneckAdapter(a.size, mapped(a.layer_weights), a.placement, mapped(a.ffn_weights))
        h = self.head
        head = Head(h.spec, fn(h.weight) if h.weight is not None else None, fn(h.bias) if h.bias is not None else None)
        return AdapterArtifact(a, head, self.skip_table)


def _bottleneck_tensors(a: BottleneckAdapter) -> dict[str, torch.Tensor]:
    """`layers.N.*` at the placement (for "both": at attn_out) and, for "both", `ffn_layers.N.*`."""
    out = {}
    for prefix, ws in (("layers", a.layer_weights), ("ffn_layers", a.ffn_weights)):
        for layer, w in ws.items():
            out[f"{prefix}.{layer}.down.weight"] = w.down_w
            out[f"{prefix}.{layer}.down.bias"] = w.down_b
            out[f"{prefix}.{layer}.up.weight"] = w.up_w
            out[f"{prefix}.{layer}.up.bias"] = w.up_b
    return out


def _bottleneck_from_tensors(size: int, t: dict[str, torch.Tensor], placement: str = "attn_out") -> BottleneckAdapter:
    prefixes = ("layers", "ffn_layers") if placement == "both" else ("layers",)
    found: dict[str, dict[int, dict[str, torch.Tensor]]] = {p: {} for p in prefixes}
    for k, v in t.items():
        parts = k.split(".")
        if len(parts) != 4 or parts[0] not in prefixes or not parts[1].isdigit() or parts[2] not in ("down", "up") \
                or parts[3] not in ("weight", "bias"):
            raise AdapterError(f"unexpected tensor {k!r} in bottleneck adapter (placement {placement})")
        found[parts[0]].setdefault(int(parts[1]), {})[f"{parts[2]}.{parts[3]}"] = v
    weights: dict[str, dict[int, BottleneckWeights]] = {p: {} for p in prefixes}
    for prefix, layers in found.items():
        for layer, d in layers.items():
            missing = {"down.weight", "down.bias", "up.weight", "up.bias"} - set(d)
            if missing:
                raise AdapterError(f"bottleneck {prefix} {layer} is missing {sorted(missing)}")
            weights[prefix][layer] = BottleneckWeights(d["down.weight"], d["down.bias"], d["up.weight"], d["up.bias"])
    return BottleneckAdapter(size=size, layer_weights=weights["layers"], placement=placement,
                             ffn_weights=weights.get("ffn_layers", {}))


def save_artifact(artifact: AdapterArtifact, path: str | Path, backbone_name: str = "",
                  shape: BackboneShape | None = None) -> Path:
    """Write the artifact directory (files written to a temporary sibling, then renamed)."""
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not empty")
    artifact.check_backbone()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    meta: dict = {"format": FORMAT, "version": VERSION, "kind": artifact.kind, "head": artifact.head.spec.to_json(),
                  "backbone": {"name": backbone_name}}
    if artifact.skip_table is not None:
        meta["skip_table"] = artifact.skip_table
    if shape is not None:
        meta["backbone"].update(hidden_size=shape.hidden_size, num_layers=shape.num_layers,
                                intermediate_size=shape.intermediate_size)
    a = artifact.adapter
    if isinstance(a, LoraAdapter):
        to_peft = to_peft_causal_lm if artifact.backbone == DECODER else peft_format.to_peft
        cfg, tensors = to_peft(a, base_model_name_or_path=backbone_name)
        (tmp / peft_format.CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_FILE))
    elif isinstance(a, BottleneckAdapter):
        meta["bottleneck"] = {"size": a.size, "layers": list(a.layers), "placement": a.placement}
        if a.placement != "attn_out":
            meta["version"] = 2
        save_file({k: v.contiguous() for k, v in _bottleneck_tensors(a).items()}, str(tmp / WEIGHTS_FILE))
    if artifact.head.weight is not None:
        save_file({"weight": artifact.head.weight.contiguous(), "bias": artifact.head.bias.contiguous()},
                  str(tmp / HEAD_FILE))
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    if path.exists():
        path.rmdir()
    os.replace(tmp, path)
    return path


def load_artifact(path: str | Path) -> AdapterArtifact:
    """Read an artifact directory (ours, or a plain PEFT LoRA directory). Shapes are checked by
    AdapterArtifact.validate / the pool against a backbone."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"{path} is not an adapter directory")
    if not (path / META_FILE).is_file():
        if (path / peft_format.CONFIG_FILE).is_file():
            if _peft_task_type(path) == "CAUSAL_LM":
                return AdapterArtifact(read_peft_causal_lm(path), Head(HeadSpec(HeadKind.GENERATE)))
            return AdapterArtifact(*peft_format.read_peft_dir(path))
        raise AdapterError(f"{path}: neither {META_FILE} nor {peft_format.CONFIG_FILE} found")
    try:
        meta = json.loads((path / META_FILE).read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path / META_FILE}: invalid JSON ({e})")
    if not isinstance(meta, dict):
        raise AdapterError(f"{path / META_FILE}: not a JSON object")
    if meta.get("format") != FORMAT or meta.get("version") not in VERSIONS:
        raise AdapterError(f"{path}: format {meta.get('format')!r} v{meta.get('version')!r} is not {FORMAT} "
                           f"v{' or v'.join(map(str, VERSIONS))}")
    spec = HeadSpec.from_json(meta.get("head", {}))   # the head schema (vbert.heads): types, enums, labels
    head = Head(spec)
    if spec.has_weights:
        if not (path / HEAD_FILE).is_file():
            raise AdapterError(f"{path}: {spec.kind.value} head declared but {HEAD_FILE} is missing")
        t = load_file(str(path / HEAD_FILE))
        head = Head(spec, t.get("weight"), t.get("bias"))
    kind = meta.get("kind")
    if kind == "lora" and spec.backbone == DECODER:
        adapter = read_peft_causal_lm(path)
    elif kind == "lora":
        adapter, _ = peft_format.read_peft_lora(path)
    elif kind == "bottleneck":
        placement = meta["bottleneck"].get("placement", "attn_out")
        if placement not in BOTTLENECK_PLACEMENTS:
            raise AdapterError(f"{path / META_FILE}: bottleneck placement {placement!r} is not one of "
                               f"{BOTTLENECK_PLACEMENTS}")
        adapter = _bottleneck_from_tensors(int(meta["bottleneck"]["size"]), load_file(str(path / WEIGHTS_FILE)),
                                           placement)
    elif kind == "none":
        adapter = None
    else:
        raise AdapterError(f"{path}: adapter kind {kind!r} is not one of lora, bottleneck, none")
    skip_table = meta.get("skip_table")
    if skip_table is not None and (not isinstance(skip_table, str) or not skip_table):
        raise AdapterError(f"{path / META_FILE}: skip_table must be a non-empty string, got {skip_table!r}")
    artifact = AdapterArtifact(adapter, head, skip_table)
    artifact.check_backbone()
    return artifact


def _peft_task_type(path: Path) -> object:
    """The task_type of a plain PEFT directory's config (None if unreadable: the reader names the problem)."""
    try:
        cfg = json.loads((path / peft_format.CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    return cfg.get("task_type") if isinstance(cfg, dict) else None
