"""Per-tenant adapter weights (LoRA and bottleneck), their validation and random factories.

Conventions (those of PEFT, so imports and exports are plain copies):
- LoRA on a linear W [out, in]: y = W x + scale * B (A x), A [r, in], B [out, r],
  scale = alpha / r (or alpha / sqrt(r) with rsLoRA).
- Bottleneck (Houlsby / vBERT): h' = h + up(gelu(down(h))), down [m, H] + [m], up [H, m] + [H],
  applied to the attention output (after its dense projection, before the residual LayerNorm).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .config import LORA_TARGETS


class AdapterError(ValueError):
    """An adapter does not fit the backbone or the pool; the message names the mismatch."""


@dataclass(frozen=True)
class BackboneShape:
    """What an adapter must agree with (a subset of the backbone spec)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int

    def target_dims(self, target: str) -> tuple[int, int]:
        """(in_features, out_features) of a LoRA target module."""
        h, i = self.hidden_size, self.intermediate_size
        return {"query": (h, h), "key": (h, h), "value": (h, h), "attn_out": (h, h),
                "ffn_in": (h, i), "ffn_out": (i, h)}[target]


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not torch.is_floating_point(t):
        raise AdapterError(f"{name}: dtype {t.dtype} is not a floating point type")
    if not bool(torch.isfinite(t).all()):
        raise AdapterError(f"{name}: contains NaN or Inf")


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise AdapterError(f"{name}: shape {tuple(t.shape)} does not match expected {shape}")


@dataclass(frozen=True)
class LoraWeights:
    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclass
class LoraAdapter:
    """LoRA weights keyed by (layer, target). Ranks may differ per module (PEFT rank_pattern)."""

    rank: int
    alpha: float
    modules: dict[tuple[int, str], LoraWeights]
    use_rslora: bool = False
    kind: str = field(default="lora", init=False)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({layer for layer, _ in self.modules}))

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t for t in LORA_TARGETS if any(t == m for _, m in self.modules))

    @property
    def max_rank(self) -> int:
        return max(w.rank for w in self.modules.values())

    def num_parameters(self) -> int:
        return sum(w.A.numel() + w.B.numel() for w in self.modules.values())

    def validate(self, shape: BackboneShape, max_rank: int | None = None,
                 allowed_targets: tuple[str, ...] | None = None) -> None:
        if not self.modules:
            raise AdapterError("lora adapter has no modules")
        for (layer, target), w in self.modules.items():
            name = f"lora layer {layer} {target}"
            if target not in LORA_TARGETS:
                raise AdapterError(f"{name}: unknown target (known: {LORA_TARGETS})")
            if allowed_targets is not None and target not in allowed_targets:
                raise AdapterError(f"{name}: target not enabled in this pool (enabled: {allowed_targets}; the "
                                   f"server setting lora_targets enables more)")
            if not 0 <= layer < shape.num_layers:
                raise AdapterError(f"{name}: layer out of range, backbone has {shape.num_layers} layers")
            r = w.rank
            if r < 1:
                raise AdapterError(f"{name}: rank must be >= 1")
            if max_rank is not None and r > max_rank:
                raise AdapterError(f"{name}: rank {r} exceeds the pool's max_lora_rank {max_rank}")
            fin, fout = shape.target_dims(target)
            _check_shape(f"{name} lora_A", w.A, (r, fin))
            _check_shape(f"{name} lora_B", w.B, (fout, r))
            _check_finite(f"{name} lora_A", w.A)
            _check_finite(f"{name} lora_B", w.B)
            if not math.isfinite(w.scale):
                raise AdapterError(f"{name}: scale {w.scale} is not finite")

    @staticmethod
    def scale_for(rank: int, alpha: float, use_rslora: bool) -> float:
        return alpha / math.sqrt(rank) if use_rslora else alpha / rank

    @classmethod
    def random(cls, shape: BackboneShape, rank: int, targets=("query", "key", "value", "attn_out"),
               layers=None, alpha: float | None = None, std: float = 0.05,
               generator: torch.Generator | None = None) -> "LoraAdapter":
        """Random A and (unlike training init) random non-zero B, so the adapter changes outputs."""
        alpha = float(alpha if alpha is not None else 2 * rank)
        layers = range(shape.num_layers) if layers is None else layers
        scale = cls.scale_for(rank, alpha, False)
        modules = {}
        for layer in layers:
            for t in targets:
                fin, fout = shape.target_dims(t)
                a = torch.randn(rank, fin, generator=generator) * (1.0 / math.sqrt(fin))
                b = torch.randn(fout, rank, generator=generator) * std
                modules[(layer, t)] = LoraWeights(a, b, scale)
        return cls(rank=rank, alpha=alpha, modules=modules)


@dataclass(frozen=True)
class BottleneckWeights:
    down_w: torch.Tensor  # [m, H]
    down_b: torch.Tensor  # [m]
    up_w: torch.Tensor    # [H, m]
    up_b: torch.Tensor    # [H]


BOTTLENECK_PLACEMENTS = ("attn_out", "ffn_out", "both")
BOTTLENECK_POSITIONS = ("attn_out", "ffn_out")   # where one set of weights can sit ("both" uses the two)


@dataclass
class BottleneckAdapter:
    """Bottleneck adapters keyed by layer (by default the top m layers of the backbone).

    placement: where in each layer the adapter sits, always on a sublayer's output before its
    residual add and LayerNorm: "attn_out" (after the attention output projection, Houlsby's first
    position; the format's original and default), "ffn_out" (after the feed-forward output
    projection, Pfeiffer's position) or "both" (Houlsby: one adapter at each, twice the weights).
    layer_weights sit at the placement ("both": at attn_out); ffn_weights only for "both", at
    ffn_out, on the same layers."""

    size: int
    layer_weights: dict[int, BottleneckWeights]
    placement: str = "attn_out"
    ffn_weights: dict[int, BottleneckWeights] = field(default_factory=dict)
    kind: str = field(default="bottleneck", init=False)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.layer_weights))

    def positions(self) -> dict[str, dict[int, BottleneckWeights]]:
        """{position: {layer: weights}} for each position in BOTTLENECK_POSITIONS the adapter uses."""
        if self.placement == "both":
            return {"attn_out": self.layer_weights, "ffn_out": self.ffn_weights}
        return {self.placement: self.layer_weights}

    def num_parameters(self) -> int:
        return sum(w.down_w.numel() + w.down_b.numel() + w.up_w.numel() + w.up_b.numel()
                   for ws in self.positions().values() for w in ws.values())

    def validate(self, shape: BackboneShape, max_size: int | None = None) -> None:
        if not self.layer_weights:
            raise AdapterError("bottleneck adapter has no layers")
        if self.placement not in BOTTLENECK_PLACEMENTS:
            raise AdapterError(f"bottleneck placement {self.placement!r} is not one of {BOTTLENECK_PLACEMENTS}")
        if self.placement == "both" and set(self.ffn_weights) != set(self.layer_weights):
            raise AdapterError(f"bottleneck placement 'both' needs weights at attn_out and ffn_out on the same "
                               f"layers, got {sorted(self.layer_weights)} and {sorted(self.ffn_weights)}")
        if self.placement != "both" and self.ffn_weights:
            raise AdapterError(f"bottleneck placement {self.placement!r} has a second set of weights "
                               f"(only 'both' has)")
        if self.size < 1:
            raise AdapterError(f"bottleneck size must be >= 1, got {self.size}")
        if max_size is not None and self.size > max_size:
            raise AdapterError(f"bottleneck size {self.size} exceeds the pool's max_bottleneck_size {max_size}")
        h, m = shape.hidden_size, self.size
        for position, weights in self.positions().items():
            for layer, w in weights.items():
                name = f"bottleneck layer {layer}" + (f" {position}" if self.placement == "both" else "")
                if not 0 <= layer < shape.num_layers:
                    raise AdapterError(f"{name}: layer out of range, backbone has {shape.num_layers} layers")
                for part, t, expected in (("down.weight", w.down_w, (m, h)), ("down.bias", w.down_b, (m,)),
                                          ("up.weight", w.up_w, (h, m)), ("up.bias", w.up_b, (h,))):
                    _check_shape(f"{name} {part}", t, expected)
                    _check_finite(f"{name} {part}", t)

    @classmethod
    def random(cls, shape: BackboneShape, size: int, top_layers: int | None = None, std: float = 0.05,
               generator: torch.Generator | None = None, placement: str = "attn_out") -> "BottleneckAdapter":
        n = shape.num_layers
        top = n if top_layers is None else top_layers
        if not 1 <= top <= n:
            raise AdapterError(f"top_layers must be in [1, {n}], got {top_layers}")
        h = shape.hidden_size

        def one() -> BottleneckWeights:
            return BottleneckWeights(
                down_w=torch.randn(size, h, generator=generator) * (1.0 / math.sqrt(h)),
                down_b=torch.randn(size, generator=generator) * std,
                up_w=torch.randn(h, size, generator=generator) * std,
                up_b=torch.randn(h, generator=generator) * std,
            )

        weights = {layer: one() for layer in range(n - top, n)}
        ffn = {layer: one() for layer in range(n - top, n)} if placement == "both" else {}
        return cls(size=size, layer_weights=weights, placement=placement, ffn_weights=ffn)


Adapter = LoraAdapter | BottleneckAdapter
