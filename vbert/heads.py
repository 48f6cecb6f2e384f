"""Per-tenant task heads and their batched application.

Three kinds share one encoder pass:
- classify: pooled vector -> logits over the head's labels;
- tag: every token -> logits over the head's tag set (NER);
- embed: pooled vector, optionally L2-normalized (no weights).
A fourth, generate, marks an adapter of the decoder backbone (text generation through its own LM
head: no weights, labels, pooling or normalization here). The head kind names the backbone an
adapter belongs to (HeadSpec.backbone).
Pooling: "mean" (masked mean over all real tokens, as sentence-transformers), "cls" (first token),
"pooler" (BERT's pretrained tanh(dense(CLS)), as Hugging Face BertForSequenceClassification).
"""
from __future__ import annotations

import math
import re
from collections import Counter
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
    GENERATE = "generate"


ENCODER, DECODER = "encoder", "decoder"    # the backbones an adapter can belong to
BACKBONES = (ENCODER, DECODER)
WEIGHTLESS_KINDS = (HeadKind.EMBED, HeadKind.GENERATE)
# The encoder pool's head codes; a generate head never enters the encoder pool (vbert.pool refuses it).
HEAD_KIND_CODES = {HeadKind.CLASSIFY: 0, HeadKind.TAG: 1, HeadKind.EMBED: 2}
POOLING_CODES = {name: i for i, name in enumerate(POOLINGS)}

# The head's JSON schema (vbert_adapter.json "head", the store's blobs, the registry's records):
#   {"kind": one of HeadKind (required), "labels": a JSON list of strings (default []),
#    "pooling": one of POOLINGS (default "mean"), "normalize": true/false (default false)}; nothing else.
# Each label: a non-empty string of at most MAX_LABEL_BYTES UTF-8 bytes (so no lone surrogates: they have
# no UTF-8 encoding) without control characters (Unicode category Cc: C0, DEL, C1); labels are unique.
# The number of labels is bounded by the pool's max_labels (Head.validate, check_head_json).
HEAD_FIELDS = ("kind", "labels", "pooling", "normalize")
MAX_LABEL_BYTES = 128
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f]")   # exactly Unicode's category Cc


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _preview(value: object, limit: int = 48) -> str:
    """repr(value), cut to `limit` characters: error messages stay short whatever the input."""
    text = repr(value[:limit + 1] if isinstance(value, str) else value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} characters" if isinstance(value, str) else f"{len(text)} characters of repr"
    return f"{text[:limit]}... ({size})"


def check_label(index: int, label: object) -> str:
    """One head label against the schema above; AdapterError naming labels[index] and the problem."""
    where = f"head labels[{index}]"
    if not isinstance(label, str):
        raise AdapterError(f"{where} must be a string, got {type(label).__name__} {_preview(label)}")
    if not label:
        raise AdapterError(f"{where} is empty")
    if len(label) > MAX_LABEL_BYTES:   # characters <= UTF-8 bytes: refused before encoding a huge string
        raise AdapterError(f"{where} {_preview(label)} is longer than {MAX_LABEL_BYTES} UTF-8 bytes")
    try:
        num_bytes = len(label.encode("utf-8"))
    except UnicodeEncodeError:
        raise AdapterError(f"{where} {_preview(label)} cannot be encoded as UTF-8 (a lone surrogate)") from None
    if num_bytes > MAX_LABEL_BYTES:
        raise AdapterError(f"{where} {_preview(label)} has {num_bytes} UTF-8 bytes, above the limit of "
                           f"{MAX_LABEL_BYTES}")
    control = _CONTROL_RE.search(label)
    if control is not None:
        raise AdapterError(f"{where} {_preview(label)} contains the control character {control.group()!r}")
    return label


def check_num_labels(num_labels: int, max_labels: int | None) -> None:
    if max_labels is not None and num_labels > max_labels:
        raise AdapterError(f"head has {num_labels} labels, above the limit of {max_labels}")


@dataclass(frozen=True)
class HeadSpec:
    """A head's kind, labels, pooling and normalization, checked against the schema above at
    construction (AdapterError naming the field and the problem)."""

    kind: HeadKind
    labels: tuple[str, ...] = ()
    pooling: str = "mean"
    normalize: bool = False

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", HeadKind(self.kind))
        except (ValueError, TypeError):
            raise AdapterError(f"head kind {_preview(self.kind)} is not one of {[k.value for k in HeadKind]}") \
                from None
        if not isinstance(self.labels, (list, tuple)):   # a string would become one label per character
            raise AdapterError(f"head labels must be a list of strings, got {type(self.labels).__name__} "
                               f"{_preview(self.labels)}")
        object.__setattr__(self, "labels", tuple(check_label(i, x) for i, x in enumerate(self.labels)))
        if not isinstance(self.pooling, str) or self.pooling not in POOLINGS:
            raise AdapterError(f"head pooling {_preview(self.pooling)} is not one of {POOLINGS}")
        if not isinstance(self.normalize, bool):          # bool("no") is True: only true/false are accepted
            raise AdapterError(f"head normalize must be true or false, got {type(self.normalize).__name__} "
                               f"{_preview(self.normalize)}")
        if self.kind in WEIGHTLESS_KINDS:
            if self.labels:
                raise AdapterError(f"{_article(self.kind.value)} {self.kind.value} head takes no labels")
            if self.kind is HeadKind.GENERATE and (self.pooling != "mean" or self.normalize):
                raise AdapterError(f"a generate head takes no pooling or normalization (got pooling "
                                   f"{self.pooling!r}, normalize {self.normalize}): the decoder's LM head "
                                   f"generates the text")
        else:
            if not self.labels:
                raise AdapterError(f"a {self.kind.value} head needs at least one label")
            if len(set(self.labels)) != len(self.labels):
                repeated = next(x for x, n in Counter(self.labels).items() if n > 1)
                raise AdapterError(f"head labels are not unique: {_preview(repeated)} appears more than once")

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def has_weights(self) -> bool:
        """Classify and tag heads carry a weight and a bias; embed and generate heads none."""
        return self.kind not in WEIGHTLESS_KINDS

    @property
    def backbone(self) -> str:
        """The backbone this head's adapter runs on: DECODER for a generate head, else ENCODER."""
        return DECODER if self.kind is HeadKind.GENERATE else ENCODER

    def to_json(self) -> dict:
        return {"kind": self.kind.value, "labels": list(self.labels), "pooling": self.pooling,
                "normalize": self.normalize}

    @classmethod
    def from_json(cls, d: dict) -> "HeadSpec":
        """The spec of a head's JSON object, strictly (types are never coerced); AdapterError otherwise."""
        if not isinstance(d, dict):
            raise AdapterError(f"head must be a JSON object, got {type(d).__name__} {_preview(d)}")
        unknown = sorted(set(d) - set(HEAD_FIELDS), key=repr)
        if unknown:
            raise AdapterError(f"unknown head fields {[_preview(k) for k in unknown[:4]]} (known: {list(HEAD_FIELDS)})")
        if "kind" not in d:
            raise AdapterError(f"head kind is missing (one of {[k.value for k in HeadKind]})")
        if not isinstance(d["kind"], str):
            raise AdapterError(f"head kind must be a string, got {type(d['kind']).__name__} {_preview(d['kind'])}")
        labels = d.get("labels", [])
        if not isinstance(labels, list):
            raise AdapterError(f"head labels must be a JSON list of strings, got {type(labels).__name__} "
                               f"{_preview(labels)}")
        return cls(kind=d["kind"], labels=tuple(labels), pooling=d.get("pooling", "mean"),
                   normalize=d.get("normalize", False))


def check_head_json(d: object, max_labels: int | None = None) -> HeadSpec:
    """A head's JSON against the schema and the pool's label limit: the spec, or AdapterError."""
    spec = HeadSpec.from_json(d)
    check_num_labels(spec.num_labels, max_labels)
    return spec


# Upper estimates of the protobuf bytes of Classify / Tag responses (vbert.v1 tenant.proto), beyond the labels:
_LABEL_SCORE_BYTES = 16       # a LabelScore or Classification: field tags, length prefixes, a float32 score
_TOKEN_BYTES = 64             # a TokenTag or an Entity: its token text (a vocabulary piece), tags, lengths,
                              # score and offsets (an entity's text is its tokens', counted once per token)
_RESPONSE_BYTES = 1024        # per response: the metadata message and its framing


def worst_case_response_bytes(spec: HeadSpec, max_texts: int, max_tokens_per_text: int) -> int:
    """An upper estimate of the bytes of the largest response this head can produce for a request of
    `max_texts` texts of `max_tokens_per_text` tokens each. Classify (top_k 0: every label scored):
    per text, the best label plus every label with its score. Tag: per token, a TokenTag and at most
    one Entity, each with a label. Embed: no labels (embeddings depend on the backbone, not the head)."""
    longest = max((len(x.encode("utf-8")) for x in spec.labels), default=0)
    if spec.kind is HeadKind.CLASSIFY:
        per_text = longest + _LABEL_SCORE_BYTES + sum(len(x.encode("utf-8")) + _LABEL_SCORE_BYTES for x in spec.labels)
    elif spec.kind is HeadKind.TAG:
        per_text = max_tokens_per_text * 2 * (longest + _TOKEN_BYTES)
    else:
        per_text = 0
    return _RESPONSE_BYTES + max_texts * per_text


def check_response_size(spec: HeadSpec, max_texts: int, max_tokens_per_text: int, max_message_bytes: int) -> None:
    """AdapterError if the head's worst-case response (worst_case_response_bytes) exceeds max_message_bytes:
    every such request would then fail, so the head is refused at upload instead."""
    need = worst_case_response_bytes(spec, max_texts, max_tokens_per_text)
    if need > max_message_bytes:
        longest = max((len(x.encode("utf-8")) for x in spec.labels), default=0)
        raise AdapterError(
            f"head labels too long for this server: a {spec.kind.value} response for {max_texts} texts of "
            f"{max_tokens_per_text} tokens with {spec.num_labels} labels (the longest {longest} UTF-8 bytes) can "
            f"reach ~{need} bytes, above the server's max_message_bytes={max_message_bytes}; use shorter labels")


@dataclass
class Head:
    spec: HeadSpec
    weight: torch.Tensor | None = None  # [num_labels, H]
    bias: torch.Tensor | None = None    # [num_labels]

    def validate(self, hidden_size: int, max_labels: int | None = None) -> None:
        if not self.spec.has_weights:
            if self.weight is not None or self.bias is not None:
                raise AdapterError(f"{_article(self.spec.kind.value)} {self.spec.kind.value} head has no weights")
            return
        c = self.spec.num_labels
        check_num_labels(c, max_labels)
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
        if not spec.has_weights:
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
