"""The trainable model: a frozen Hugging Face BertModel, per-task adapter parameters applied with
forward hooks, and a task head. The hooks add exactly the formulas the server computes
(see tests/reference.py), so an exported adapter serves the outputs seen at training time:
  LoRA on module M:      M(x) + scale * (x @ A.T) @ B.T
  bottleneck on layer i: D(x) + up(gelu(down(D(x)))),  D = encoder.layer.i.attention.output.dense
                         (placement attn_out) or encoder.layer.i.output.dense (ffn_out), or one at
                         each (both: Houlsby's two adapters per layer)
Heads: classify = Linear(H, C) on the pooled vector (masked mean over real tokens, or [CLS]);
tag = Linear(H, C) on every token.

Initialization follows PEFT / Houlsby: LoRA A kaiming-uniform, B zeros; bottleneck down as
nn.Linear, up zeros. Both start as the identity, so step 0 is the bare backbone.
Dropout is off unless asked for (`dropout` > 0: the frozen backbone's hidden and attention dropout
and dropout on the head's input, during training only, as BertForTokenClassification and PEFT
training do). Either way training is deterministic for a given seed on CPU (the masks come from
torch's seeded global generator).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vbert import (AdapterArtifact, BackboneShape, BottleneckAdapter, Head, HeadKind, HeadSpec, LoraAdapter)
from vbert.adapters import BOTTLENECK_PLACEMENTS, BottleneckWeights, LoraWeights
from vbert.config import LORA_TARGETS
from vbert.peft_format import HF_MODULE

from .recipes import recipe

ADAPTER_KINDS = ("bottleneck", "lora", "none")   # "none": full fine-tuning (no adapter, backbone trainable)
TRAIN_POOLINGS = ("mean", "cls")
BOTTLENECK_HF_MODULE = {"attn_out": "attention.output.dense", "ffn_out": "output.dense"}   # per placement
FULL_META_FILE = "vbert_full_finetune.json"       # marks a full fine-tuned checkpoint directory
FULL_FORMAT = "vbert-full-finetune"
HEAD_FILE = "head.safetensors"
RECIPE_FIELDS = ("rank", "targets", "bottleneck_size", "bottleneck_placement")   # None: the task's recipe


@dataclass(frozen=True)
class AdapterConfig:
    """What is trained besides the head.

    kind: "bottleneck", "lora" or "none" (full fine-tuning: every backbone weight is trainable).
    num_top_layers: adapters on the top m layers only (None = all layers).
    bottleneck_placement: "attn_out", "ffn_out" or "both" (see vbert.adapters.BottleneckAdapter).
    alpha: LoRA alpha (None = 2 * rank); the scale is alpha / rank.
    rank, targets, bottleneck_size, bottleneck_placement: None = the task's default recipe
    (training.recipes), filled in by `resolved` (TrainConfig does it, the task being known there).
    """

    kind: str = "bottleneck"
    rank: int | None = None
    alpha: float | None = None
    targets: tuple[str, ...] | None = None
    bottleneck_size: int | None = None
    num_top_layers: int | None = None
    bottleneck_placement: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ADAPTER_KINDS:
            raise ValueError(f"adapter kind {self.kind!r} is not one of {ADAPTER_KINDS}")
        if self.bottleneck_placement is not None and self.bottleneck_placement not in BOTTLENECK_PLACEMENTS:
            raise ValueError(f"bottleneck placement {self.bottleneck_placement!r} is not one of "
                             f"{BOTTLENECK_PLACEMENTS}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.bottleneck_size is not None and self.bottleneck_size < 1:
            raise ValueError(f"bottleneck size must be >= 1, got {self.bottleneck_size}")
        if self.targets is not None:
            object.__setattr__(self, "targets", tuple(self.targets))
            unknown = [t for t in self.targets if t not in LORA_TARGETS]
            if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
                raise ValueError(f"lora targets {list(self.targets)}: must be non-empty, unique, from {LORA_TARGETS}")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a positive number, got {self.alpha}")
        if self.num_top_layers is not None and self.num_top_layers < 1:
            raise ValueError(f"layers must be >= 1, got {self.num_top_layers}")

    @property
    def is_resolved(self) -> bool:
        return None not in (self.rank, self.targets, self.bottleneck_size, self.bottleneck_placement)

    def resolved(self, task: str) -> "AdapterConfig":
        """The settings left unset filled in from the default recipe of `task` and this kind."""
        r = recipe(task, self.kind)
        return replace(self, **{name: getattr(r, name) for name in RECIPE_FIELDS if getattr(self, name) is None})

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else 2 * self.rank)

    def layers(self, num_layers: int) -> range:
        top = num_layers if self.num_top_layers is None else self.num_top_layers
        if top > num_layers:
            raise ValueError(f"layers {top} is above the backbone's {num_layers} layers")
        return range(num_layers - top, num_layers)


def load_backbone(path: str | Path, trainable: bool = False, dropout: float = 0.0):
    """A Hugging Face BertModel from a local directory with this hidden and attention dropout
    (0: off; TrainConfig validates it); frozen unless `trainable`."""
    from transformers import BertModel

    model = BertModel.from_pretrained(str(path), local_files_only=True, hidden_dropout_prob=dropout,
                                      attention_probs_dropout_prob=dropout)
    model.requires_grad_(trainable)
    return model.train(trainable)


def backbone_shape(backbone) -> BackboneShape:
    c = backbone.config
    return BackboneShape(c.hidden_size, c.intermediate_size, c.num_hidden_layers)


class LoraModule(nn.Module):
    def __init__(self, fin: int, fout: int, rank: int, scale: float):
        super().__init__()
        self.scale = scale
        self.A = nn.Parameter(torch.empty(rank, fin))     # [r, in]
        self.B = nn.Parameter(torch.zeros(fout, rank))    # [out, r]
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as PEFT (nn.Linear's default)

    def hook(self, module, inputs, out):
        return out + self.scale * (inputs[0] @ self.A.T) @ self.B.T


class BottleneckModule(nn.Module):
    def __init__(self, hidden: int, size: int):
        super().__init__()
        self.down = nn.Linear(hidden, size)
        self.up = nn.Linear(size, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def hook(self, module, inputs, out):
        return out + self.up(F.gelu(self.down(out)))


class TrainableModel(nn.Module):
    """Backbone + adapter (hooked in) + head. forward(input_ids, attention_mask) -> logits:
    classify [B, C], tag [B, L, C]. New parameters are drawn from torch's global generator
    (seed it first for a reproducible init)."""

    def __init__(self, backbone, adapter: AdapterConfig, head_spec: HeadSpec, skip=None):
        """skip: a vbert.skip.SkipRuntime with one table (force-computing): train in skip mode, the
        lower layers replaced by its shallow layers (frozen) and adapters only above them."""
        super().__init__()
        if head_spec.kind is HeadKind.EMBED:
            raise ValueError("training needs a classify or tag head")
        if head_spec.pooling not in TRAIN_POOLINGS:
            raise ValueError(f"pooling {head_spec.pooling!r} is not one of {TRAIN_POOLINGS}")
        if adapter.kind != "none" and not adapter.is_resolved:
            raise ValueError(f"adapter settings left to the task's recipe: resolve them first ({adapter})")
        self.backbone, self.adapter_config, self.head_spec = backbone, adapter, head_spec
        self.shape = backbone_shape(backbone)
        self.skip = skip
        if skip is not None:
            low = [layer for layer in adapter.layers(self.shape.num_layers) if layer < skip.skip_layers]
            if adapter.kind == "none" or low:
                raise ValueError(f"skip mode replaces layers 0..{skip.skip_layers - 1}: adapters must sit above "
                                 f"them (--layers {self.shape.num_layers - skip.skip_layers} or fewer), and full "
                                 f"fine-tuning cannot train in skip mode")
        self.lora = nn.ModuleDict()
        self.bottleneck = nn.ModuleDict()
        self._handles = []
        if adapter.kind == "lora":
            scale = LoraAdapter.scale_for(adapter.rank, adapter.lora_alpha, False)
            for layer in adapter.layers(self.shape.num_layers):
                for target in adapter.targets:
                    fin, fout = self.shape.target_dims(target)
                    m = self.lora[f"{layer}:{target}"] = LoraModule(fin, fout, adapter.rank, scale)
                    mod = backbone.get_submodule(f"encoder.layer.{layer}.{HF_MODULE[target]}")
                    self._handles.append(mod.register_forward_hook(m.hook))
        elif adapter.kind == "bottleneck":
            positions = (("attn_out", "ffn_out") if adapter.bottleneck_placement == "both"
                         else (adapter.bottleneck_placement,))
            for layer in adapter.layers(self.shape.num_layers):
                for position in positions:
                    m = BottleneckModule(self.shape.hidden_size, adapter.bottleneck_size)
                    self.bottleneck[self._bottleneck_key(layer, position)] = m
                    mod = backbone.get_submodule(f"encoder.layer.{layer}.{BOTTLENECK_HF_MODULE[position]}")
                    self._handles.append(mod.register_forward_hook(m.hook))
        self.head = nn.Linear(self.shape.hidden_size, head_spec.num_labels)
        c = backbone.config
        self.dropout = max(c.hidden_dropout_prob, c.attention_probs_dropout_prob)   # as load_backbone set it
        self.head_dropout = nn.Dropout(c.hidden_dropout_prob)

    def _bottleneck_key(self, layer: int, position: str) -> str:
        """"N" at the placement (for "both": at attn_out), "N_ffn" for both's feed-forward one."""
        both_ffn = self.adapter_config.bottleneck_placement == "both" and position == "ffn_out"
        return f"{layer}_ffn" if both_ffn else str(layer)

    @property
    def is_full_finetune(self) -> bool:
        return self.adapter_config.kind == "none"

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def train(self, mode: bool = True):
        super().train(mode)
        # a frozen backbone trains in eval mode unless it has dropout to apply
        self.backbone.train(mode and (self.is_full_finetune or self.dropout > 0))
        return self

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states [B, L, H]: the whole backbone, or in skip mode the shallow layers'
        merged states (exactly as the server computes them) through the upper layers."""
        if self.skip is None:
            return self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.bool()
        types = torch.zeros_like(input_ids)
        h = self.skip.lower_states(input_ids, types, mask, [0] * input_ids.shape[0], torch.float32).clone()
        am, _ = self.backbone._create_attention_masks(attention_mask=attention_mask, encoder_attention_mask=None,
                                                      embedding_output=h, encoder_hidden_states=None,
                                                      past_key_values=None)
        for layer in self.backbone.encoder.layer[self.skip.skip_layers:]:
            h = layer(h, attention_mask=am)
            h = h[0] if isinstance(h, tuple) else h
        return h

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encode(input_ids, attention_mask)                                              # [B, L, H]
        if self.head_spec.kind is HeadKind.TAG:
            return self.head(self.head_dropout(hidden))                                      # [B, L, C]
        if self.head_spec.pooling == "cls":
            pooled = hidden[:, 0]                                                            # [B, H]
        else:
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)                                # [B, L, 1]
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)                           # [B, H]
        return self.head(self.head_dropout(pooled))                                          # [B, C]

    # -- export ----------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Copies of the trained tensors (for keeping the best epoch)."""
        return {k: v.detach().clone() for k, v in self.named_parameters() if v.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)

    def head_weights(self) -> Head:
        return Head(self.head_spec, self.head.weight.detach().float().clone(), self.head.bias.detach().float().clone())

    def to_artifact(self) -> AdapterArtifact:
        """The servable artifact (adapter tensors + head), float32 on the CPU."""
        def t(p):
            return p.detach().float().cpu().clone()

        cfg = self.adapter_config
        if cfg.kind == "lora":
            modules = {}
            for key, m in self.lora.items():
                layer, target = key.split(":")
                modules[(int(layer), target)] = LoraWeights(t(m.A), t(m.B), m.scale)
            adapter = LoraAdapter(rank=cfg.rank, alpha=cfg.lora_alpha, modules=modules)
        elif cfg.kind == "bottleneck":
            weights = {k: BottleneckWeights(t(m.down.weight), t(m.down.bias), t(m.up.weight), t(m.up.bias))
                       for k, m in self.bottleneck.items()}
            adapter = BottleneckAdapter(cfg.bottleneck_size, {int(k): w for k, w in weights.items() if k.isdigit()},
                                        placement=cfg.bottleneck_placement,
                                        ffn_weights={int(k.removesuffix("_ffn")): w for k, w in weights.items()
                                                     if k.endswith("_ffn")})
        else:
            raise ValueError("a full fine-tuned model has no adapter artifact; use save_full_finetune")
        head = self.head_weights()
        skip_table = self.skip.default if self.skip is not None else None
        return AdapterArtifact(adapter, Head(head.spec, t(head.weight), t(head.bias)), skip_table)


# -- full fine-tuning: a Hugging Face checkpoint directory plus the head ---------------------------
def save_full_finetune(model: TrainableModel, path: str | Path, tokenizer) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not empty")
    path.mkdir(parents=True, exist_ok=True)
    model.backbone.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    head = model.head_weights()
    save_file({"weight": head.weight.contiguous(), "bias": head.bias.contiguous()}, str(path / HEAD_FILE))
    (path / FULL_META_FILE).write_text(json.dumps({"format": FULL_FORMAT, "version": 1,
                                                   "head": head.spec.to_json()}, indent=2))
    return path


def is_full_finetune_dir(path: str | Path) -> bool:
    return (Path(path) / FULL_META_FILE).is_file()


def load_full_finetune(path: str | Path) -> TrainableModel:
    from safetensors.torch import load_file

    path = Path(path)
    meta = json.loads((path / FULL_META_FILE).read_text())
    if meta.get("format") != FULL_FORMAT:
        raise ValueError(f"{path / FULL_META_FILE}: format {meta.get('format')!r} is not {FULL_FORMAT}")
    spec = HeadSpec.from_json(meta["head"])
    model = TrainableModel(load_backbone(path), AdapterConfig(kind="none"), spec)
    head = load_file(str(path / HEAD_FILE))
    with torch.no_grad():
        model.head.weight.copy_(head["weight"])
        model.head.bias.copy_(head["bias"])
    return model.eval()
