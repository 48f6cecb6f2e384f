"""Per-token LoRA for the decoder: PEFT (CAUSAL_LM) import and a stacked slot pool (Punica BGMV).

PEFT names a Llama module `base_model.model.model.layers.N.self_attn.q_proj` (k_proj, v_proj, o_proj)
or `...mlp.gate_proj` (up_proj, down_proj). Conventions as on the encoder side (vbert/adapters.py):
y = W x + scale * B (A x), A [r, in], B [out, r], scale = alpha / r (alpha / sqrt(r) with rsLoRA).

Pool banks (preallocated; slot 0 is the all-zero "no adapter" entry), per input group g (targets that
read the same input), laid out for vbert.bgmv:
  a[g]     [num_layers, num_slots + 1, |g| * R, in]         target j's A in rows j*R..j*R+rank-1
  b[g]     [num_layers, num_slots + 1, sum_j R * out_j]     target j's (scale * B)^T [R, out_j], flattened
  ranks[g] [num_layers, num_slots + 1, |g|] int32 (host)    each target's real rank (0: no LoRA there)
R = max_rank; smaller ranks are zero-padded, which is exact (and the CPU kernel skips the padding).

The pool also speaks the slot interface of the manager's TieredCache (`device`, `capacity`, `fits`,
`load(artifact, stream)`, `unload`), so decoder adapters are cached exactly as encoder ones.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors.torch import save_file

from .adapters import AdapterError, LoraAdapter, LoraWeights, _check_finite, _check_shape
from .bgmv import BANK_DTYPES, BGMV_BACKENDS, bgmv, resolve_backend, resolve_bank_dtype
from .device import DeviceContext
from .heads import DECODER
from .peft_format import CONFIG_FILE, WEIGHTS_FILE, _pattern_value, read_peft_files

DECODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# input group -> targets that read the same input (their A matrices sit side by side)
DECODER_LORA_GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",),
                       "gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])"
                  r"(?:\.default)?\.weight$")


class DecoderShape(Protocol):
    num_layers: int

    def target_dims(self, target: str) -> tuple[int, int]: ...


def decoder_module_name(layer: int, target: str) -> str:
    return f"model.layers.{layer}.{_PARENT[target]}.{target}"


def read_peft_causal_lm(path: str | Path) -> LoraAdapter:
    """The LoRA of a PEFT directory saved for a Llama-family causal LM (modules keyed (layer, target),
    target one of DECODER_LORA_TARGETS)."""
    path = Path(path)
    cfg, tensors = read_peft_files(path)
    if cfg.get("task_type") not in ("CAUSAL_LM", None):
        raise AdapterError(f"{path}: task_type {cfg.get('task_type')!r} is not CAUSAL_LM")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"{path}: modules_to_save {cfg['modules_to_save']!r} is not supported")
    rank, alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    use_rslora = bool(cfg.get("use_rslora", False))
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        m = _KEY.match(k)
        if m is None or m.group(3) not in DECODER_LORA_TARGETS or _PARENT[m.group(3)] != m.group(2):
            raise AdapterError(f"{path}: tensor {k!r} is not LoRA on a supported module "
                               f"(supported: {DECODER_LORA_TARGETS} in decoder layers)")
        parts.setdefault((int(m.group(1)), m.group(3)), {})[m.group(4)] = v
    modules = {}
    for (layer, target), ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{path}: layer {layer} {target} has lora_{''.join(ab)} but not both A and B")
        alpha_m = float(_pattern_value(cfg.get("alpha_pattern"), decoder_module_name(layer, target), alpha))
        modules[(layer, target)] = LoraWeights(ab["A"].float(), ab["B"].float(),
                                               LoraAdapter.scale_for(ab["A"].shape[0], alpha_m, use_rslora))
    if not modules:
        raise AdapterError(f"{path}: no LoRA weights found in {WEIGHTS_FILE}")
    return LoraAdapter(rank=rank, alpha=alpha, modules=modules, use_rslora=use_rslora)


def to_peft_causal_lm(adapter: LoraAdapter, base_model_name_or_path: str = "") -> tuple[dict, dict[str, torch.Tensor]]:
    """PEFT config (task CAUSAL_LM) and tensors of a decoder LoRA. target_modules is a regex over the
    exact module paths (`model.layers.N.self_attn.q_proj`, ...); modules whose rank or scale differ from
    the adapter's nominal ones get rank_pattern / alpha_pattern entries (full module paths)."""
    if not adapter.modules:
        raise AdapterError("lora adapter has no modules")
    rank_pattern, alpha_pattern, tensors, names = {}, {}, {}, []
    for (layer, target), w in sorted(adapter.modules.items()):
        if target not in DECODER_LORA_TARGETS:
            raise AdapterError(f"lora layer {layer} {target}: not a decoder target (known: {DECODER_LORA_TARGETS})")
        name = decoder_module_name(layer, target)
        names.append(name)
        if w.rank != adapter.rank:
            rank_pattern[name] = w.rank
        alpha_m = w.scale * (math.sqrt(w.rank) if adapter.use_rslora else w.rank)
        if abs(alpha_m - adapter.alpha) > 1e-6 * max(1.0, abs(adapter.alpha)):
            alpha_pattern[name] = alpha_m
        tensors[f"base_model.model.{name}.lora_A.weight"] = w.A.detach().float().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = w.B.detach().float().contiguous()
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": adapter.rank, "lora_alpha": adapter.alpha, "lora_dropout": 0.0, "bias": "none",
        "use_rslora": adapter.use_rslora, "fan_in_fan_out": False, "inference_mode": True,
        "target_modules": "|".join(re.escape(n) for n in names),
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "modules_to_save": None,
    }
    return cfg, tensors


def write_peft_causal_lm(adapter: LoraAdapter, path: str | Path, base_model_name_or_path: str = "") -> Path:
    """Write the adapter as a PEFT directory (adapter_config.json + adapter_model.safetensors) that
    `peft.PeftModel.from_pretrained(<a Llama-family causal LM>, path)` loads; read_peft_causal_lm reads it back."""
    cfg, tensors = to_peft_causal_lm(adapter, base_model_name_or_path)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    save_file(tensors, str(path / WEIGHTS_FILE))
    return path


def validate_decoder_lora(adapter: LoraAdapter, shape: DecoderShape, max_rank: int) -> None:
    """Raise AdapterError naming the mismatch if the adapter cannot run on a decoder of this shape."""
    if not adapter.modules:
        raise AdapterError("lora adapter has no modules")
    for (layer, target), w in adapter.modules.items():
        name = f"lora layer {layer} {target}"
        if target not in DECODER_LORA_TARGETS:
            raise AdapterError(f"{name}: unknown target (known: {DECODER_LORA_TARGETS})")
        if not 0 <= layer < shape.num_layers:
            raise AdapterError(f"{name}: layer out of range, the decoder has {shape.num_layers} layers")
        if not 1 <= w.rank <= max_rank:
            raise AdapterError(f"{name}: rank {w.rank} is not in [1, max_rank={max_rank}]")
        fin, fout = shape.target_dims(target)
        _check_shape(f"{name} lora_A", w.A, (w.rank, fin))
        _check_shape(f"{name} lora_B", w.B, (fout, w.rank))
        _check_finite(f"{name} lora_A", w.A)
        _check_finite(f"{name} lora_B", w.B)
        if not math.isfinite(w.scale):
            raise AdapterError(f"{name}: scale {w.scale} is not finite")


class HasAdapter(Protocol):
    """What the pool reads of a vbert.artifact.AdapterArtifact (imported there, not here: no cycle)."""

    adapter: object
    skip_table: str | None

    @property
    def backbone(self) -> str: ...

    @property
    def kind(self) -> str: ...


def validate_decoder_artifact(artifact: HasAdapter, shape: DecoderShape, max_rank: int) -> None:
    """Raise AdapterError naming the problem unless the artifact is a decoder LoRA (generate head, LoRA
    on DECODER_LORA_TARGETS, no skip table) that fits a decoder of this shape with this max rank."""
    if artifact.backbone != DECODER:
        raise AdapterError(f"the adapter is for the {artifact.backbone} backbone, not the decoder "
                           f"(a decoder adapter has a generate head)")
    if not isinstance(artifact.adapter, LoraAdapter):
        raise AdapterError(f"a decoder adapter must be LoRA on {DECODER_LORA_TARGETS}, got adapter kind "
                           f"{artifact.kind!r}")
    if artifact.skip_table is not None:
        raise AdapterError(f"a decoder adapter has no skip table (got {artifact.skip_table!r})")
    validate_decoder_lora(artifact.adapter, shape, max_rank)


@dataclass(frozen=True)
class DecoderAdapterLimits:
    """What an upload is validated against when the server has a decoder (the store needs no pool)."""

    shape: DecoderShape
    max_rank: int

    def validate(self, artifact: HasAdapter) -> None:
        validate_decoder_artifact(artifact, self.shape, self.max_rank)


class DecoderLoraPoolFullError(RuntimeError):
    """No free LoRA slot; the caller must unload one first."""


@dataclass(frozen=True)
class DecoderLoraConfig:
    num_slots: int = 8
    max_rank: int = 16
    backend: str = "auto"     # vbert.bgmv: "numba" (CPU), "torch" (any device), "auto"
    bank_dtype: str = "auto"  # vbert.bgmv: "float32", "bfloat16" (half the memory), "auto" (the model's dtype)

    def __post_init__(self) -> None:
        if self.bank_dtype not in BANK_DTYPES:
            raise ValueError(f"bank_dtype must be one of {BANK_DTYPES}, got {self.bank_dtype!r}")
        if self.backend not in ("auto", *BGMV_BACKENDS):
            raise ValueError(f"backend must be 'auto' or one of {BGMV_BACKENDS}, got {self.backend!r}")
        if not isinstance(self.num_slots, int) or self.num_slots < 1:
            raise ValueError(f"num_slots must be an integer >= 1, got {self.num_slots!r}")
        if not isinstance(self.max_rank, int) or self.max_rank < 1:
            raise ValueError(f"max_rank must be an integer >= 1, got {self.max_rank!r}")


class DecoderLoraPool:
    """Stacked LoRA banks for all targets of all layers; `load` returns the slot a token names."""

    def __init__(self, config: DecoderLoraConfig, shape: DecoderShape, device: DeviceContext):
        self.config, self.shape, self.device = config, shape, device
        self.backend = resolve_backend(config.backend, device.device, device.dtype)
        self.bank_dtype = resolve_bank_dtype(config.bank_dtype, self.backend, device.dtype)
        nl, s, R = shape.num_layers, config.num_slots + 1, config.max_rank
        kw = dict(device=device.device, dtype=self.bank_dtype)
        self.a, self.b, self.ranks, self._layout = {}, {}, {}, {}
        for g, ts in DECODER_LORA_GROUPS.items():
            outs = np.array([shape.target_dims(t)[1] for t in ts], dtype=np.int64)
            b_offsets = np.concatenate(([0], np.cumsum(R * outs)[:-1])).astype(np.int64)
            self.a[g] = torch.zeros(nl, s, len(ts) * R, shape.target_dims(ts[0])[0], **kw)
            self.b[g] = torch.zeros(nl, s, int(R * outs.sum()), **kw)
            self.ranks[g] = np.zeros((nl, s, len(ts)), dtype=np.int32)
            self._layout[g] = (outs, b_offsets)
        self._free = list(range(s - 1, 0, -1))
        self._loaded: set[int] = set()

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> dict[str, int]:
        """Slots per adapter kind (the TieredCache's and the scheduler's view): LoRA only."""
        return {"lora": self.config.num_slots}

    @property
    def limits(self) -> DecoderAdapterLimits:
        return DecoderAdapterLimits(self.shape, self.config.max_rank)

    def fits(self, artifact: HasAdapter) -> bool:
        """Whether `load(artifact)` finds a free slot now."""
        return bool(self._free)

    def total_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.a.values(), *self.b.values()])

    def load(self, adapter: LoraAdapter | HasAdapter, stream=None) -> int:
        """Validate, copy into a free slot (on `stream` under CUDA) and return the slot. Takes a
        LoraAdapter or a decoder AdapterArtifact (as the TieredCache passes)."""
        if isinstance(adapter, LoraAdapter):
            validate_decoder_lora(adapter, self.shape, self.config.max_rank)
        else:
            validate_decoder_artifact(adapter, self.shape, self.config.max_rank)
            adapter = adapter.adapter
        if not self._free:
            raise DecoderLoraPoolFullError(f"decoder LoRA pool has no free slot (of {self.config.num_slots})")
        slot = self._free.pop()
        R = self.config.max_rank
        with torch.no_grad(), self.device.stream(stream):
            for g in DECODER_LORA_GROUPS:
                self.a[g][:, slot].zero_()
                self.b[g][:, slot].zero_()
                self.ranks[g][:, slot] = 0
            for (layer, target), w in adapter.modules.items():
                group = next(g for g, ts in DECODER_LORA_GROUPS.items() if target in ts)
                j = DECODER_LORA_GROUPS[group].index(target)
                outs, b_offsets = self._layout[group]
                bo, od = int(b_offsets[j]), int(outs[j])
                self._put(self.a[group][layer, slot, j * R:j * R + w.rank], w.A)
                self._put(self.b[group][layer, slot, bo:bo + R * od].view(R, od)[:w.rank], (w.B * w.scale).t())
                self.ranks[group][layer, slot, j] = w.rank
        self._loaded.add(slot)
        return slot

    def unload(self, slot: int) -> None:
        if slot not in self._loaded:
            raise KeyError(f"slot {slot} is not loaded")
        self._loaded.discard(slot)
        self._free.append(slot)

    def entry(self, layer: int, slot: int, target: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """What the slot holds for one target of one layer: (A [R, in], (scale * B)^T [R, out], rank), the
        rows past the rank zero (views into the banks)."""
        group = next(g for g, ts in DECODER_LORA_GROUPS.items() if target in ts)
        j, R = DECODER_LORA_GROUPS[group].index(target), self.config.max_rank
        outs, b_offsets = self._layout[group]
        bo, od = int(b_offsets[j]), int(outs[j])
        return (self.a[group][layer, slot, j * R:(j + 1) * R], self.b[group][layer, slot, bo:bo + R * od].view(R, od),
                int(self.ranks[group][layer, slot, j]))

    def _put(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(self.device.host_tensor(src.to(self.bank_dtype)), non_blocking=self.device.is_cuda)

    def apply(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor, idx: torch.Tensor,
              offsets: tuple[int, ...]) -> torch.Tensor:
        """Semantics (BGMV): for each token i and target t of `group`,
        out[i, off_t:off_t + out_t] += x[i] @ A_t[layer, idx[i]] @ B_t[layer, idx[i]] (B pre-scaled),
        with idx[i] = 0 adding nothing. x [n, in], out [n, sum out_t], idx [n] long; returns out."""
        outs, b_offsets = self._layout[group]
        return bgmv(self.backend, x, self.a[group][layer], self.b[group][layer], self.ranks[group][layer], idx,
                    out, np.asarray(offsets, dtype=np.int64), outs, b_offsets, self.config.max_rank)
