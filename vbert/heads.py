"""Per-tenant task heads and their batched application.

Three kinds share one backbone pass:
- classify: pooled vector -> logits over the head's labels;
- tag: every token -> logits over the head's tag set (NER);
- embed: pooled vector, optionally L2-normalized (no weights).
Pooling: "mean" (masked mean over all real tokens, as sentence-transformers), "cls" (first token),
"pooler" (BERT's pretrained tanh(dense(CLS)), as Hugging Face BertForSequenceClassification).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F

from .adapters import AdapterError, _check_finite, _check_shape
from .config import POOLINGS


class HeadKind(str, Enum):
    CLASSIFY = "classify"
    TAG = "tag"
    EMBED = "embed"


HEAD_KIND_CODES = {HeadKind.CLASSIFY: 0, HeadKind.TAG: 1, HeadKind.EMBED: 2}
POOLING_CODES = {name: i for i, name in enumerate(POOLINGS)}


@dataclass(frozen=True)
class HeadSpec:
    kind: HeadKind
    labels: tuple[str, ...] = ()
    pooling: str = "mean"
    normalize: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", HeadKind(self.kind))
        object.__setattr__(self, "labels", tuple(self.labels))
        if self.pooling not in POOLINGS:
            raise AdapterError(f"head pooling {self.pooling!r} is not one of {POOLINGS}")
        if self.kind is HeadKind.EMBED:
            if self.labels:
                raise AdapterError("an embed head takes no labels")
        else:
            if not self.labels:
                raise AdapterError(f"a {self.kind.value} head needs at least one label")
            if len(set(self.labels)) != len(self.labels):
                raise AdapterError(f"head labels are not unique: {list(self.labels)}")

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def to_json(self) -> dict:
        return {"kind": self.kind.value, "labels": list(self.labels), "pooling": self.pooling,
                "normalize": self.normalize}

    @classmethod
    def from_json(cls, d: dict) -> "HeadSpec":
        unknown = set(d) - {"kind", "labels", "pooling", "normalize"}
        if unknown:
            raise AdapterError(f"unknown head fields {sorted(unknown)}")
        try:
            kind = HeadKind(d["kind"])
        except (KeyError, ValueError):
            raise AdapterError(f"head kind {d.get('kind')!r} is not one of {[k.value for k in HeadKind]}")
        return cls(kind=kind, labels=tuple(d.get("labels", ())), pooling=d.get("pooling", "mean"),
                   normalize=bool(d.get("normalize", False)))


@dataclass
class Head:
    spec: HeadSpec
    weight: torch.Tensor | None = None  # [num_labels, H]
    bias: torch.Tensor | None = None    # [num_labels]

    def validate(self, hidden_size: int, max_labels: int | None = None) -> None:
        if self.spec.kind is HeadKind.EMBED:
            if self.weight is not None or self.bias is not None:
                raise AdapterError("an embed head has no weights")
            return
        c = self.spec.num_labels
        if max_labels is not None and c > max_labels:
            raise AdapterError(f"head has {c} labels, above the limit of {max_labels}")
        if self.weight is None or self.bias is None:
            raise AdapterError(f"{self.spec.kind.value} head is missing its weight or bias")
        _check_shape("head weight", self.weight, (c, hidden_size))
        _check_shape("head bias", self.bias, (c,))
        _check_finite("head weight", self.weight)
        _check_finite("head bias", self.bias)

    def num_parameters(self) -> int:
        return sum(t.numel() for t in (self.weight, self.bias) if t is not None)

    @classmethod
    def random(cls, spec: HeadSpec, hidden_size: int, generator: torch.Generator | None = None) -> "Head":
        if spec.kind is HeadKind.EMBED:
            return cls(spec)
        c = spec.num_labels
        w = torch.randn(c, hidden_size, generator=generator) / math.sqrt(hidden_size)
        b = torch.randn(c, generator=generator) * 0.1
        return cls(spec, w, b)


def pool_hidden(hidden: torch.Tensor, mask: torch.Tensor, pooling_codes: torch.Tensor,
                pooler: torch.nn.Linear | None) -> torch.Tensor:
    """Per-row pooling, each row by its own method.

    Semantics: row b -> mean_{t: mask[b,t]} hidden[b,t] if pooling[b] == mean;
    hidden[b,0] if cls; tanh(pooler(hidden[b,0])) if pooler.
    hidden [B, L, H], mask [B, L] bool, pooling_codes [B] long -> [B, H]
    """
    m = mask.unsqueeze(-1).to(hidden.dtype)                                  # [B, L, 1]
    mean = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)                     # [B, H]
    cls = hidden[:, 0]                                                       # [B, H]
    candidates = [mean, cls, torch.tanh(pooler(cls)) if pooler is not None else cls]
    stacked = torch.stack(candidates, dim=1)                                 # [B, 3, H]
    idx = pooling_codes.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
    return stacked.gather(1, idx).squeeze(1)                                 # [B, H]


def classify_logits(pooled: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Semantics: logits[b] = weight[b] @ pooled[b] + bias[b].
    pooled [B, H], weight [B, C, H], bias [B, C] -> [B, C]"""
    return torch.baddbmm(bias.unsqueeze(1), pooled.unsqueeze(1), weight.transpose(1, 2)).squeeze(1)


def tag_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Semantics: logits[b, t] = weight[b] @ hidden[b, t] + bias[b].
    hidden [B, L, H], weight [B, C, H], bias [B, C] -> [B, L, C]"""
    return torch.baddbmm(bias.unsqueeze(1), hidden, weight.transpose(1, 2))


def embed(pooled: torch.Tensor, normalize: torch.Tensor) -> torch.Tensor:
    """Semantics: pooled[b] / ||pooled[b]|| where normalize[b], else pooled[b]. [B, H] -> [B, H]"""
    return torch.where(normalize.unsqueeze(-1), F.normalize(pooled, p=2, dim=-1), pooled)
