"""The device-resident adapter pool: preallocated stacked tensors, one slot per adapter.

Banks (all preallocated at construction, entry 0 of each is the all-zero null entry):
  LoRA, per input group g of the pool's targets (qkv share their input):
    A_g [num_layers, num_lora_slots + 1, in, R * |g|]   (A transposed, targets side by side)
    B_t [num_layers, num_lora_slots + 1, R, out]        (pre-scaled by alpha / r)
  bottleneck: down_w [nl, S_b + 1, H, M], down_b [nl, S_b + 1, 1, M], up_w [nl, S_b + 1, M, H],
    up_b [nl, S_b + 1, 1, H]; one bank for both positions (attn_out, ffn_out): a batch gathers it
    once per position present, with the null entry for rows with nothing there. A Houlsby adapter
    (placement "both") takes two entries of the bank, one per position.
  heads: weight [num_slots + 1, C, H], bias [num_slots + 1, C]
R = max_lora_rank, M = max_bottleneck_size, C = max_labels. Smaller adapters are zero-padded,
which is exact (zero columns add nothing; gelu(0) = 0) and costs memory and compute in proportion
to the padding. Rows of the bare backbone use slot 0, whose entries are all zero.

A slot is the handle the caller keeps: `load()` returns it, batch rows name it, `unload()` frees it.
Which adapter should be resident is not decided here (that is the manager's cache policy).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .adapters import (BOTTLENECK_POSITIONS, AdapterError, BackboneShape, BottleneckAdapter, BottleneckWeights,
                       LoraAdapter)
from .artifact import AdapterArtifact
from .backbone import BackboneSpec, LayerAdapters
from .config import PoolConfig
from .device import DeviceContext
from .heads import ENCODER, HEAD_KIND_CODES, POOLING_CODES, Head

LORA_GROUPS = {"qkv": ("query", "key", "value"), "attn_out": ("attn_out",), "ffn_in": ("ffn_in",),
               "ffn_out": ("ffn_out",)}
KIND_NONE, KIND_LORA, KIND_BOTTLENECK = 0, 1, 2


def validate_artifact(artifact: AdapterArtifact, shape: BackboneShape, config: PoolConfig) -> None:
    """Raise AdapterError naming the mismatch if the artifact cannot be served by a backbone of
    this shape in a pool of this config (kind, layers, every tensor's shape, rank and size limits,
    enabled LoRA targets, label count, NaN/Inf)."""
    if artifact.backbone != ENCODER:
        raise AdapterError(f"the adapter is for the {artifact.backbone} backbone (a {artifact.head.spec.kind.value} "
                           f"head); the encoder's pool cannot load it")
    a = artifact.adapter
    if isinstance(a, LoraAdapter):
        a.validate(shape, config.max_lora_rank, tuple(config.lora_targets))
    elif isinstance(a, BottleneckAdapter):
        a.validate(shape, config.max_bottleneck_size)
        if len(a.positions()) > config.num_bottleneck_slots:
            raise AdapterError(f"bottleneck placement {a.placement!r} takes {len(a.positions())} bottleneck "
                               f"slots; the pool has num_bottleneck_slots={config.num_bottleneck_slots}")
    elif a is not None:
        raise AdapterError(f"unknown adapter type {type(a).__name__}")
    artifact.head.validate(shape.hidden_size, config.max_labels)


class PoolFullError(RuntimeError):
    """No free slot of the kind asked for; the caller must unload something first."""


@dataclass
class BatchAdapters:
    """Everything the forward pass needs about a batch's rows, gathered from the pool."""

    layers: list[LayerAdapters | None] | None   # per layer, None where no row has an adapter
    head_kinds: np.ndarray                      # [B] int, HEAD_KIND_CODES
    num_labels: np.ndarray                      # [B] int
    labels: list[tuple[str, ...]]               # [B] each row's head labels (captured at gather)
    pooling: torch.Tensor                       # [B] long, POOLING_CODES
    normalize: torch.Tensor                     # [B] bool
    head_weight: torch.Tensor                   # [B, C, H] (zeros for embed rows)
    head_bias: torch.Tensor                     # [B, C]


class AdapterPool:
    def __init__(self, config: PoolConfig, spec: BackboneSpec, device: DeviceContext, default_head: Head):
        self.config, self.spec, self.device = config, spec, device
        nl, h, c = spec.num_layers, spec.hidden_size, config.max_labels
        R, M = config.max_lora_rank, config.max_bottleneck_size
        sl, sb, s = config.num_lora_slots + 1, config.num_bottleneck_slots + 1, config.num_slots + 1
        kw = dict(device=device.device, dtype=device.dtype)
        shape = spec.shape
        self.groups = {g: tuple(t for t in ts if t in config.lora_targets) for g, ts in LORA_GROUPS.items()}
        self.groups = {g: ts for g, ts in self.groups.items() if ts}
        self.lora_a = {g: torch.zeros(nl, sl, shape.target_dims(ts[0])[0], R * len(ts), **kw)
                       for g, ts in self.groups.items()}
        self.lora_b = {t: torch.zeros(nl, sl, R, shape.target_dims(t)[1], **kw) for t in config.lora_targets}
        self.bn = (torch.zeros(nl, sb, h, M, **kw), torch.zeros(nl, sb, 1, M, **kw),
                   torch.zeros(nl, sb, M, h, **kw), torch.zeros(nl, sb, 1, h, **kw))
        self.head_weight = torch.zeros(s, c, h, **kw)
        self.head_bias = torch.zeros(s, c, **kw)
        # host-side slot table: what each slot holds, read when a batch is built (no device sync)
        self.slot_kind = np.zeros(s, np.int64)
        self.slot_bank = np.zeros(s, np.int64)              # index into the LoRA bank (0: none)
        self.slot_bn = {p: np.zeros(s, np.int64) for p in BOTTLENECK_POSITIONS}   # bottleneck bank per position
        self.slot_layers = np.zeros((s, nl), bool)          # layers where the slot's adapter acts
        self.slot_table = np.zeros(s, np.int64)             # skip mode: index of the slot's n-gram table
        self.slot_skip_trained = np.zeros(s, bool)          # skip mode: adapter trained on the merged states
        self.skip_check: Callable[[AdapterArtifact], int] | None = None   # set by a skip-mode model
        self.slot_head_kind = np.zeros(s, np.int64)
        self.slot_num_labels = np.zeros(s, np.int64)
        self.slot_pooling = np.zeros(s, np.int64)
        self.slot_normalize = np.zeros(s, bool)
        self.slot_heads: list[Head | None] = [None] * s
        self._free_slots = list(range(s - 1, 0, -1))
        self._free_banks = {KIND_LORA: list(range(sl - 1, 0, -1)), KIND_BOTTLENECK: list(range(sb - 1, 0, -1))}
        self._write_head(0, default_head)

    # -- capacity --------------------------------------------------------------------------
    @property
    def capacity(self) -> dict[str, int]:
        return {"lora": self.config.num_lora_slots, "bottleneck": self.config.num_bottleneck_slots}

    def num_free(self, kind: str) -> int:
        """How many more adapters of this kind fit (a Houlsby bottleneck takes two bank entries:
        use `fits` for a given artifact)."""
        code = {"lora": KIND_LORA, "bottleneck": KIND_BOTTLENECK}.get(kind)
        return len(self._free_slots) if code is None else min(len(self._free_slots), len(self._free_banks[code]))

    @staticmethod
    def _banks_needed(artifact: AdapterArtifact) -> int:
        a = artifact.adapter
        return len(a.positions()) if isinstance(a, BottleneckAdapter) else int(a is not None)

    def fits(self, artifact: AdapterArtifact) -> bool:
        """Whether `load(artifact)` finds a free slot and enough free bank entries now."""
        kind = {"lora": KIND_LORA, "bottleneck": KIND_BOTTLENECK}.get(artifact.kind)
        free_banks = len(self._free_banks[kind]) if kind is not None else 0
        return bool(self._free_slots) and free_banks >= self._banks_needed(artifact)

    def bytes_per_slot(self, kind: str) -> int:
        """Device bytes one resident adapter of this kind occupies (padded), head included."""
        elt = torch.finfo(self.device.dtype).bits // 8
        head = (self.head_weight[0].numel() + self.head_bias[0].numel()) * elt
        if kind == "lora":
            n = sum(t[:, 0].numel() for t in self.lora_a.values()) + sum(t[:, 0].numel() for t in self.lora_b.values())
        elif kind == "bottleneck":
            n = sum(t[:, 0].numel() for t in self.bn)
        else:
            n = 0
        return n * elt + head

    def total_bytes(self) -> int:
        tensors = [*self.lora_a.values(), *self.lora_b.values(), *self.bn, self.head_weight, self.head_bias]
        return sum(t.numel() * t.element_size() for t in tensors)

    # -- load / unload ---------------------------------------------------------------------
    def validate(self, artifact: AdapterArtifact) -> int:
        """Raise AdapterError naming the mismatch if the artifact cannot live in this pool (or cannot
        run in the model's skip mode); returns the index of its skip table (0 without skip mode)."""
        validate_artifact(artifact, self.spec.shape, self.config)
        return self.skip_check(artifact) if self.skip_check is not None else 0

    def load(self, artifact: AdapterArtifact, stream=None) -> int:
        """Validate, copy into a free slot (on `stream` under CUDA) and return the slot."""
        table = self.validate(artifact)
        kind = {"lora": KIND_LORA, "bottleneck": KIND_BOTTLENECK, "none": KIND_NONE}[artifact.kind]
        if not self.fits(artifact):
            raise PoolFullError(f"adapter pool has no free {artifact.kind} slot")
        slot = self._free_slots.pop()
        self.slot_kind[slot] = kind
        self.slot_bank[slot] = 0
        for p in BOTTLENECK_POSITIONS:
            self.slot_bn[p][slot] = 0
        with torch.no_grad(), self.device.stream(stream):
            if kind == KIND_LORA:
                self.slot_bank[slot] = self._free_banks[kind].pop()
                self._write_lora(int(self.slot_bank[slot]), artifact.adapter)
            elif kind == KIND_BOTTLENECK:
                for p, weights in artifact.adapter.positions().items():
                    self.slot_bn[p][slot] = self._free_banks[kind].pop()
                    self._write_bottleneck(int(self.slot_bn[p][slot]), artifact.adapter.size, weights)
            self._write_head(slot, artifact.head)
        self.slot_layers[slot] = False
        self.slot_table[slot] = table
        self.slot_skip_trained[slot] = artifact.skip_table is not None
        if artifact.adapter is not None:
            self.slot_layers[slot, list(artifact.adapter.layers)] = True
        return slot

    def unload(self, slot: int) -> None:
        if not 1 <= slot < len(self.slot_kind) or slot in self._free_slots:
            raise KeyError(f"slot {slot} is not loaded")
        kind = int(self.slot_kind[slot])
        if kind == KIND_LORA:
            self._free_banks[kind].append(int(self.slot_bank[slot]))
        elif kind == KIND_BOTTLENECK:
            self._free_banks[kind] += [int(b[slot]) for b in self.slot_bn.values() if b[slot]]
        self.slot_kind[slot] = self.slot_bank[slot] = 0
        for p in BOTTLENECK_POSITIONS:
            self.slot_bn[p][slot] = 0
        self.slot_layers[slot] = False
        self.slot_table[slot] = 0
        self.slot_skip_trained[slot] = False
        self.slot_heads[slot] = None
        self._free_slots.append(slot)

    def head(self, slot: int) -> Head:
        h = self.slot_heads[slot]
        if h is None:
            raise KeyError(f"slot {slot} is not loaded")
        return h

    def _put(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(self.device.host_tensor(src.to(self.device.dtype)), non_blocking=self.device.is_cuda)

    def _write_lora(self, bank: int, a: LoraAdapter) -> None:
        R = self.config.max_lora_rank
        for t in self.lora_a.values():
            t[:, bank].zero_()
        for t in self.lora_b.values():
            t[:, bank].zero_()
        for (layer, target), w in a.modules.items():
            group = next(g for g, ts in self.groups.items() if target in ts)
            j = self.groups[group].index(target)
            self._put(self.lora_a[group][layer, bank, :, j * R:j * R + w.rank], w.A.t())
            self._put(self.lora_b[target][layer, bank, :w.rank], (w.B * w.scale).t())

    def _write_bottleneck(self, bank: int, m: int, weights: dict[int, BottleneckWeights]) -> None:
        for t in self.bn:
            t[:, bank].zero_()
        down_w, down_b, up_w, up_b = self.bn
        for layer, w in weights.items():
            self._put(down_w[layer, bank, :, :m], w.down_w.t())
            self._put(down_b[layer, bank, 0, :m], w.down_b)
            self._put(up_w[layer, bank, :m], w.up_w.t())
            self._put(up_b[layer, bank, 0], w.up_b)

    def _write_head(self, slot: int, head: Head) -> None:
        spec = head.spec
        self.head_weight[slot].zero_()
        self.head_bias[slot].zero_()
        if head.weight is not None:
            c = spec.num_labels
            self._put(self.head_weight[slot, :c], head.weight)
            self._put(self.head_bias[slot, :c], head.bias)
        self.slot_head_kind[slot] = HEAD_KIND_CODES[spec.kind]
        self.slot_num_labels[slot] = spec.num_labels
        self.slot_pooling[slot] = POOLING_CODES[spec.pooling]
        self.slot_normalize[slot] = spec.normalize
        self.slot_heads[slot] = head

    # -- batch gather ----------------------------------------------------------------------
    def gather(self, slots: Sequence[int], normalize: Sequence[bool | None] | None = None) -> BatchAdapters:
        """Per-row weights for a batch whose row b uses `slots[b]`. `normalize[b]` overrides the
        embed head's normalization for that row (None keeps the head's)."""
        slots = np.asarray(slots, dtype=np.int64)
        loaded = (self.slot_heads[s] is not None for s in slots)
        if not all(loaded):
            bad = sorted({int(s) for s in slots if self.slot_heads[s] is None})
            raise KeyError(f"slots {bad} are not loaded")
        kinds = self.slot_kind[slots]
        banks = self.slot_bank[slots]
        dev = self.device.device
        layers = None
        attn_banks, ffn_banks = self.slot_bn["attn_out"][slots], self.slot_bn["ffn_out"][slots]
        lora_rows, attn_rows, ffn_rows = kinds == KIND_LORA, attn_banks > 0, ffn_banks > 0
        if lora_rows.any() or attn_rows.any() or ffn_rows.any():
            lora_idx = torch.from_numpy(np.where(lora_rows, banks, 0)).to(dev)
            attn_idx = torch.from_numpy(attn_banks).to(dev)
            ffn_idx = torch.from_numpy(ffn_banks).to(dev)
            lora_layers = self.slot_layers[slots[lora_rows]].any(0)
            attn_layers = self.slot_layers[slots[attn_rows]].any(0)
            ffn_layers = self.slot_layers[slots[ffn_rows]].any(0)
            layers = []
            for i in range(self.spec.num_layers):
                la = LayerAdapters()
                if lora_layers[i]:
                    for g, ts in self.groups.items():
                        parts, offset = [], 0
                        for t in ts:
                            out = self.lora_b[t].shape[-1]
                            parts.append((t, self.lora_b[t][i].index_select(0, lora_idx), offset))
                            offset += out
                        la.lora[g] = (self.lora_a[g][i].index_select(0, lora_idx), parts)
                if attn_layers[i]:
                    la.bottleneck = tuple(t[i].index_select(0, attn_idx) for t in self.bn)
                if ffn_layers[i]:
                    la.bottleneck_ffn = tuple(t[i].index_select(0, ffn_idx) for t in self.bn)
                layers.append(la if la else None)
        norm = self.slot_normalize[slots].copy()
        if normalize is not None:
            for b, v in enumerate(normalize):
                if v is not None:
                    norm[b] = v
        slot_t = torch.from_numpy(slots).to(dev)
        return BatchAdapters(
            layers=layers,
            head_kinds=self.slot_head_kind[slots],
            num_labels=self.slot_num_labels[slots],
            labels=[self.slot_heads[s].spec.labels for s in slots],
            pooling=torch.from_numpy(self.slot_pooling[slots]).to(dev),
            normalize=torch.from_numpy(norm).to(dev),
            head_weight=self.head_weight.index_select(0, slot_t),
            head_bias=self.head_bias.index_select(0, slot_t),
        )

