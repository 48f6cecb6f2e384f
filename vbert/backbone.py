"""The shared BERT encoder: checkpoint loading and the one encoder implementation.

The encoder runs padded [B, L, H] batches. Per-row adapter weights, already gathered from the
pool for this batch (see pool.AdapterPool.gather), are applied with batched matmuls: no Python
loop over rows or tenants.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import BackboneShape

SUPPORTED_MODEL_TYPES = ("bert",)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str
    pad_token_id: int

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")

    @property
    def shape(self) -> BackboneShape:
        return BackboneShape(self.hidden_size, self.intermediate_size, self.num_layers)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "BackboneSpec":
        cfg_path = Path(path) / "config.json"
        if not cfg_path.is_file():
            raise ValueError(f"{path}: no config.json; expected a Hugging Face checkpoint directory")
        cfg = json.loads(cfg_path.read_text())
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{path}: model_type {model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: position_embedding_type {cfg['position_embedding_type']!r}; only absolute is supported")
        return cls(
            name=cfg.get("_name_or_path") or Path(path).name,
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
            intermediate_size=cfg["intermediate_size"],
            max_position_embeddings=cfg["max_position_embeddings"],
            type_vocab_size=cfg.get("type_vocab_size", 2), layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
            hidden_act=cfg.get("hidden_act", "gelu"), pad_token_id=cfg.get("pad_token_id", 0),
        )


def read_checkpoint_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights of a BERT checkpoint directory, with names normalized to `embeddings.*`,
    `encoder.layer.N.*`, `pooler.*` (a `bert.` prefix is stripped, gamma/beta renamed)."""
    from safetensors.torch import load_file

    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if files:
        state = {}
        for f in files:
            state.update(load_file(str(f)))
    elif (path / "pytorch_model.bin").is_file():
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{path}: no *.safetensors or pytorch_model.bin weights")
    out = {}
    for k, v in state.items():
        k = k.removeprefix("bert.").replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        out[k] = v
    return out


@dataclass
class LayerAdapters:
    """Adapter weights of one layer gathered per batch row (row b uses its own slot).

    lora: input group -> (A [B, in, sum r], [(target, B [B, r, out], out_offset)]): all targets in
        a group share their input, so their A are concatenated and shrunk with one bmm.
    bottleneck: (down_w [B, H, m], down_b [B, 1, m], up_w [B, m, H], up_b [B, 1, H]) or None: on the
        attention output (placement attn_out); bottleneck_ffn: the same on the feed-forward output
        (ffn_out). A row whose adapter sits elsewhere gets the bank's all-zero entry (the identity).
    """

    lora: dict[str, tuple[torch.Tensor, list[tuple[str, torch.Tensor, int]]]] = field(default_factory=dict)
    bottleneck: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    bottleneck_ffn: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def __bool__(self) -> bool:
        return bool(self.lora) or self.bottleneck is not None or self.bottleneck_ffn is not None


def apply_lora(out: torch.Tensor, x: torch.Tensor, group: tuple | None) -> torch.Tensor:
    """Semantics: out[b] += x[b] @ A[b] @ B[b] per target slice (B pre-scaled by alpha/r).
    out [B, L, O], x [B, L, in]"""
    if group is None:
        return out
    a, parts = group
    shrunk = torch.bmm(x, a)                                   # [B, L, sum r]
    r0 = 0
    for _target, b, offset in parts:
        r, o = b.shape[1], b.shape[2]
        out[..., offset:offset + o] += torch.bmm(shrunk[..., r0:r0 + r], b)   # one bmm per target
        r0 += r
    return out


def apply_bottleneck(h: torch.Tensor, weights: tuple | None) -> torch.Tensor:
    """Semantics: h[b] + up_b[b] + gelu(h[b] @ down_w[b] + down_b[b]) @ up_w[b]. h [B, L, H]"""
    if weights is None:
        return h
    down_w, down_b, up_w, up_b = weights
    z = F.gelu(torch.baddbmm(down_b, h, down_w))               # [B, L, m]
    out = torch.baddbmm(h, z, up_w)                            # [B, L, H] = h + z @ up_w
    out += up_b
    return out


class EncoderLayer(nn.Module):
    def __init__(self, spec: BackboneSpec):
        super().__init__()
        from transformers.activations import ACT2FN

        h, i = spec.hidden_size, spec.intermediate_size
        self.num_heads = spec.num_heads
        self.qkv = nn.Linear(h, 3 * h)           # query, key, value fused
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=spec.layer_norm_eps)
        self.ffn_in = nn.Linear(h, i)
        self.ffn_out = nn.Linear(i, h)
        self.ffn_norm = nn.LayerNorm(h, eps=spec.layer_norm_eps)
        self.act = ACT2FN[spec.hidden_act]

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None,
                adapters: LayerAdapters | None, short: bool = False) -> torch.Tensor:
        """short: the sequences are a few tokens long (skip mode's trigrams): attention by broadcasting,
        about 5x faster than the SDPA kernel at L = 3 on CPU; attn_mask then a bool key mask [B, 1, 1, L]."""
        bsz, seq, hidden = x.shape                                            # x [B, L, H]
        lora = adapters.lora if adapters is not None else {}
        if short:
            ctx = self._short_attention(apply_lora(self.qkv(x), x, lora.get("qkv")), attn_mask)      # [B, L, H]
        else:
            q, k, v = self._split_heads(apply_lora(self.qkv(x), x, lora.get("qkv")))   # each [B, nh, L, d]
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)    # [B, nh, L, d]
            ctx = ctx.transpose(1, 2).reshape(bsz, seq, hidden)                   # [B, L, H]
        a = apply_lora(self.attn_out(ctx), ctx, lora.get("attn_out"))
        a = apply_bottleneck(a, adapters.bottleneck if adapters is not None else None)
        h = self.attn_norm(a + x)
        inter = self.act(apply_lora(self.ffn_in(h), h, lora.get("ffn_in")))  # [B, L, I]
        out = apply_lora(self.ffn_out(inter), inter, lora.get("ffn_out"))
        out = apply_bottleneck(out, adapters.bottleneck_ffn if adapters is not None else None)
        return self.ffn_norm(out + h)

    def _short_attention(self, qkv: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """Attention over a few positions without a batched-matmul kernel: qkv [B, L, 3H] -> context [B, L, H],
        computed in float32 (cast back to qkv's dtype). key_mask: bool [B, 1, 1, L], True = attend. One key
        position at a time (L passes over [B, L, nh, d]): the same sums in the same order as one broadcast
        [B, L, L, nh, d] product, so the same bits, at a third of the time (no temporary larger than the input)."""
        bsz, seq, three_h = qkv.shape
        d = three_h // (3 * self.num_heads)
        parts = qkv.float().view(bsz, seq, 3, self.num_heads, d)
        q, k, v = parts[:, :, 0], parts[:, :, 1], parts[:, :, 2]                        # each [B, L, nh, d]
        scores = torch.stack([(q * k[:, j:j + 1]).sum(-1) for j in range(seq)], dim=2)  # [B, Lq, Lk, nh]
        scores = scores.div_(math.sqrt(d))
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask.reshape(bsz, 1, seq, 1), float("-inf"))
        probs = scores.softmax(dim=2)
        ctx = probs[:, :, 0, :, None] * v[:, 0:1]                                       # [B, Lq, nh, d]
        for j in range(1, seq):
            ctx += probs[:, :, j, :, None] * v[:, j:j + 1]
        return ctx.reshape(bsz, seq, three_h // 3).to(qkv.dtype)

    def _split_heads(self, qkv: torch.Tensor) -> torch.Tensor:
        """[B, L, 3H] -> [3, B, nh, L, d] (query, key, value)."""
        bsz, seq, three_h = qkv.shape
        return qkv.view(bsz, seq, 3, self.num_heads, three_h // (3 * self.num_heads)).permute(2, 0, 3, 1, 4)

    def attention_log_probs(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Log attention probabilities of this layer (no adapters) for input states x [B, L, H] and
        real-token mask [B, L] bool: [B, nh, L, L], padded keys at probability 0 (used to distill
        skip mode's shallow layers: the attention the first upper layer computes on their output)."""
        q, k, _ = self._split_heads(self.qkv(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])                           # [B, nh, L, L]
        scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
        return torch.log_softmax(scores, dim=-1)


class Encoder(nn.Module):
    """BERT embeddings + encoder layers + pooler, loaded from a Hugging Face checkpoint."""

    def __init__(self, spec: BackboneSpec):
        super().__init__()
        self.spec = spec
        h = spec.hidden_size
        self.word_embeddings = nn.Embedding(spec.vocab_size, h)
        self.position_embeddings = nn.Embedding(spec.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(spec.type_vocab_size, h)
        self.embed_norm = nn.LayerNorm(h, eps=spec.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(spec) for _ in range(spec.num_layers))
        self.pooler: nn.Linear | None = nn.Linear(h, h)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "Encoder":
        spec = BackboneSpec.from_checkpoint(path)
        with torch.device("meta"):
            enc = cls(spec)
        enc.load_hf_state(read_checkpoint_state(path))
        return enc

    def load_hf_state(self, s: dict[str, torch.Tensor]) -> None:
        def take(name: str) -> torch.Tensor:
            if name not in s:
                raise ValueError(f"checkpoint is missing tensor {name!r}")
            return s[name].float()

        new = {
            "word_embeddings.weight": take("embeddings.word_embeddings.weight"),
            "position_embeddings.weight": take("embeddings.position_embeddings.weight"),
            "token_type_embeddings.weight": take("embeddings.token_type_embeddings.weight"),
            "embed_norm.weight": take("embeddings.LayerNorm.weight"),
            "embed_norm.bias": take("embeddings.LayerNorm.bias"),
        }
        for i in range(self.spec.num_layers):
            p = f"encoder.layer.{i}."
            for part in ("weight", "bias"):
                new[f"layers.{i}.qkv.{part}"] = torch.cat(
                    [take(f"{p}attention.self.{n}.{part}") for n in ("query", "key", "value")])
                new[f"layers.{i}.attn_out.{part}"] = take(f"{p}attention.output.dense.{part}")
                new[f"layers.{i}.attn_norm.{part}"] = take(f"{p}attention.output.LayerNorm.{part}")
                new[f"layers.{i}.ffn_in.{part}"] = take(f"{p}intermediate.dense.{part}")
                new[f"layers.{i}.ffn_out.{part}"] = take(f"{p}output.dense.{part}")
                new[f"layers.{i}.ffn_norm.{part}"] = take(f"{p}output.LayerNorm.{part}")
        if "pooler.dense.weight" in s:
            new["pooler.weight"] = take("pooler.dense.weight")
            new["pooler.bias"] = take("pooler.dense.bias")
        else:
            self.pooler = None
        self.load_state_dict(new, strict=True, assign=True)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, mask: torch.Tensor,
                adapters: list[LayerAdapters | None] | None = None, has_padding: bool = True) -> torch.Tensor:
        """input_ids, token_type_ids [B, L] long; mask [B, L] bool (True = real token).
        adapters: per layer, or None for the bare backbone. Returns hidden states [B, L, H]."""
        return self.run_layers(self.embed(input_ids, token_type_ids), mask, adapters, has_padding=has_padding)

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        """The embedding layer: [B, L] ids -> [B, L, H] (the input of layer 0)."""
        seq = input_ids.shape[1]
        if seq > self.spec.max_position_embeddings:
            raise ValueError(f"sequence of {seq} tokens exceeds the backbone's "
                             f"{self.spec.max_position_embeddings} positions")
        pos = torch.arange(seq, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos) + self.token_type_embeddings(token_type_ids)
        return self.embed_norm(x)                                              # [B, L, H]

    def run_layers(self, x: torch.Tensor, mask: torch.Tensor, adapters: list[LayerAdapters | None] | None = None,
                   start: int = 0, stop: int | None = None, has_padding: bool = True) -> torch.Tensor:
        """Layers start..stop-1 on hidden states x [B, L, H] (the input of layer `start`; skip mode
        starts above the layers its n-gram table replaces). adapters: indexed by absolute layer."""
        attn_mask = mask[:, None, None, :] if has_padding else None           # [B, 1, 1, L]
        for i in range(start, self.spec.num_layers if stop is None else stop):
            x = self.layers[i](x, attn_mask, adapters[i] if adapters is not None else None)
        return x
