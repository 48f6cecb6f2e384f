"""A Llama-family decoder (Llama, SmolLM2, TinyLlama, Qwen2) for iteration-level serving (Orca).

One step takes the tokens of many sequences flattened: prefill chunks and decode tokens mixed. Token-wise
work (embedding, RMSNorm, projections, per-token LoRA, SwiGLU MLP) runs on all tokens at once
`[num_tokens, hidden]`; only attention is split per sequence, each sequence's new queries against its
K/V in the paged cache (earlier tokens plus this step's, causal within the chunk). Logits come out for
the last token of each sequence only.

Weights load from a local Hugging Face checkpoint directory (config.json + *.safetensors), names as
`model.layers.N.self_attn.q_proj.weight`; biases are used where the checkpoint has them (Qwen2's q/k/v,
Llama's attention_bias / mlp_bias).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Hashable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from .decoder_lora import DecoderLoraPool
from .device import DeviceContext
from .kv_cache import KVCacheConfig, PagedKVCache

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


class DecoderLoadError(ValueError):
    """A checkpoint this decoder cannot run; the message says what is unsupported."""


@dataclass(frozen=True)
class DecoderSpec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool

    def target_dims(self, target: str) -> tuple[int, int]:
        """(in_features, out_features) of a projection (a LoRA target)."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.num_heads * self.head_dim, \
            self.num_kv_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}[target]

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "DecoderSpec":
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise DecoderLoadError(f"model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise DecoderLoadError(f"hidden_act {act!r} is not supported (only silu, SwiGLU)")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise DecoderLoadError(f"rope type {rope_type!r} is not supported (only unscaled 'default' "
                                   f"rotary embeddings; {rope!r})")
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        if float(cfg.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))) != 1.0:
            raise DecoderLoadError("partial_rotary_factor != 1 is not supported")
        if cfg.get("sliding_window") and cfg.get("use_sliding_window", model_type == "mistral"):
            raise DecoderLoadError("sliding-window attention is not supported")
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise DecoderLoadError(f"num_attention_heads {heads} is not a multiple of "
                                   f"num_key_value_heads {kv_heads}")
        return cls(vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
                   intermediate_size=int(cfg["intermediate_size"]), num_layers=int(cfg["num_hidden_layers"]),
                   num_heads=heads, num_kv_heads=kv_heads,
                   head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
                   rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
                   max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                   tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)))


@dataclass
class DecoderLayerWeights:
    input_norm: torch.Tensor        # [H]
    qkv: torch.Tensor               # [(nh + 2 nkv) d, H]  q, k, v stacked
    qkv_bias: torch.Tensor | None   # [(nh + 2 nkv) d]
    o: torch.Tensor                 # [H, nh d]
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor         # [H]
    gate_up: torch.Tensor           # [2 I, H]  gate, up stacked
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor              # [H, I]
    down_bias: torch.Tensor | None


@dataclass(frozen=True)
class StepSequence:
    """One sequence's share of a step: `num_new` tokens at positions num_computed..num_computed+num_new-1
    (its tokens already in the KV cache: positions < num_computed); adapter_slot 0 = no adapter."""

    seq_id: Hashable
    num_computed: int
    num_new: int
    adapter_slot: int = 0


def _load_checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise DecoderLoadError(f"{path}: no *.safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Semantics: weight * x / sqrt(mean(x^2, -1) + eps), computed in float32. x [n, H]"""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Semantics: x * cos + rotate_half(x) * sin per token (HF Llama's rotary embedding).
    x [n, heads, d], cos/sin [n, d]"""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


@dataclass
class _StepPlan:
    """Host-side bookkeeping of a step, computed once and used by every layer. Sequences with one new
    token (decode) share one padded attention call; those with a chunk (prefill) share one padded call too
    when padding them to the longest chunk and context costs at most CHUNK_PAD_LIMIT times their own work (many
    short prompts joining), else attend one by one. K/V are read whole blocks at a time: a context of T tokens
    attends over its ceil(T / block_size) blocks, the positions past T masked out."""

    new_slots: torch.Tensor                 # [num_tokens] long: cache slot of each new token
    spans: list[tuple[int, int]]            # per chunk sequence attending alone: (first, end) in the flat tokens
    context_blocks: list[torch.Tensor]      # per such sequence: [ceil(end / block_size)] its blocks' ids
    masks: list[torch.Tensor]               # per such sequence: [num_new, blocks * block_size] bool (causal)
    chunks: _ChunkBatch | None              # the chunk sequences in one padded call (then spans is empty)
    decode_rows: torch.Tensor | None        # [D] long: flattened index of each decode sequence's token
    decode_blocks: torch.Tensor | None      # [D * B] long: the blocks of each decode sequence (padded to B)
    decode_mask: torch.Tensor | None        # [D, 1, 1, B * block_size] bool: position < its context (None: all
                                            # contexts fill their B blocks)
    staged: _Staged | None                  # the decode sequences on the cache's DecodeStaging (then decode_rows
                                            # and decode_blocks are None)
    adapter_idx: torch.Tensor | None        # [num_tokens] long (None: no token has an adapter)
    last: torch.Tensor                      # [num_sequences] long: flattened index of each last token
    positions: np.ndarray                   # [num_tokens] int64 (host): num_computed + 0..num_new-1 each


@dataclass(frozen=True)
class _Staged:
    """D decode sequences on rows 0..D-1 of the cache's DecodeStaging, attending over its first `tokens` positions."""

    rows: torch.Tensor                      # [D] long: flattened token of the sequence on staging row r
    row_ids: torch.Tensor                   # [D] long: 0..D-1
    positions: torch.Tensor                 # [D] long: its new token's position (num_computed)
    tokens: int                             # the longest context this step (max num_computed + 1)
    mask: torch.Tensor | None               # [D, 1, 1, tokens] bool: position <= its own (None: all the same length)


def _staged(dec_rows: list[int], dec_len: list[int], staging_rows: np.ndarray, to_dev) -> _Staged:
    order = np.argsort(staging_rows)                # staging rows are 0..D-1: the sequences in row order
    rows = np.asarray(dec_rows, dtype=np.int64)[order]
    lengths = np.asarray(dec_len, dtype=np.int64)[order]
    tokens = int(lengths.max())
    mask = None
    if (lengths != tokens).any():
        mask = to_dev((np.arange(tokens)[None, :] < lengths[:, None])[:, None, None, :])
    return _Staged(to_dev(rows), to_dev(np.arange(len(rows), dtype=np.int64)), to_dev(lengths - 1), tokens, mask)


# chunk sequences share one padded attention call when its work (chunks x longest chunk x longest context) is at
# most this many times the sum of their own (chunk x context)
CHUNK_PAD_LIMIT = 2.0


@dataclass(frozen=True)
class _ChunkBatch:
    """C chunk sequences padded to M query rows and B blocks each: one attention call for all."""

    rows: torch.Tensor                      # [C * M] long: flattened token of each query row (a pad row: the
                                            # chunk's last token, its output dropped)
    real: torch.Tensor                      # [num chunk tokens] long: the real rows among the C * M, in token order
    tokens: torch.Tensor                    # [num chunk tokens] long: their flattened tokens (same order)
    blocks: torch.Tensor                    # [C * B] long: each chunk sequence's blocks (padded with block 0)
    mask: torch.Tensor                      # [C, 1, M, B * block_size] bool: causal, each row its own position


def _chunk_batch(chunks: list[tuple[int, int, int, np.ndarray]], block_size: int, to_dev) -> _ChunkBatch | None:
    """chunks: (first flattened token, num_new, num_computed, block ids) per chunk sequence. None: they attend
    one by one (a single chunk, or padding would cost more than CHUNK_PAD_LIMIT times the work)."""
    if len(chunks) < 2:
        return None
    m_max = max(m for _, m, _, _ in chunks)
    b_max = max(len(b) for _, _, _, b in chunks)
    own = sum(m * len(b) for _, m, _, b in chunks)
    if len(chunks) * m_max * b_max > CHUNK_PAD_LIMIT * own:
        return None
    c = len(chunks)
    rows = np.empty((c, m_max), dtype=np.int64)
    q_pos = np.empty((c, m_max), dtype=np.int64)
    blocks = np.zeros((c, b_max), dtype=np.int64)                    # pad: block 0, masked out
    real, tokens = [], []
    for i, (first, m, computed, b) in enumerate(chunks):
        rows[i, :m] = np.arange(first, first + m)
        rows[i, m:] = first + m - 1
        q_pos[i, :m] = np.arange(computed, computed + m)
        q_pos[i, m:] = computed + m - 1                               # a pad row sees what the last one sees
        blocks[i, :len(b)] = b
        real.append(np.arange(i * m_max, i * m_max + m))
        tokens.append(rows[i, :m])
    mask = np.arange(b_max * block_size)[None, None, :] <= q_pos[:, :, None]          # [C, M, B * bs]
    return _ChunkBatch(to_dev(rows.reshape(-1)), to_dev(np.concatenate(real)), to_dev(np.concatenate(tokens)),
                       to_dev(blocks.reshape(-1)), to_dev(mask[:, None]))


class DecoderModel:
    """Plain tensors and a step function; no nn.Module (nothing is trained here)."""

    def __init__(self, spec: DecoderSpec, embed: torch.Tensor, layers: list[DecoderLayerWeights],
                 norm: torch.Tensor, lm_head: torch.Tensor, device: DeviceContext):
        self.spec, self.device = spec, device
        self.embed, self.layers, self.norm, self.lm_head = embed, layers, norm, lm_head   # [V, H] ... [V, H]
        d = spec.head_dim
        self.inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        self.inv_freq = self.inv_freq.to(device.device)   # [d / 2]

    @classmethod
    def from_pretrained(cls, path: str | Path, device: DeviceContext | None = None) -> "DecoderModel":
        path = Path(path)
        device = device or DeviceContext.create()
        try:
            cfg = json.loads((path / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DecoderLoadError(f"{path / 'config.json'}: cannot read ({e})")
        spec = DecoderSpec.from_hf_config(cfg)
        t = _load_checkpoint_tensors(path)

        def get(name: str, required: bool = True) -> torch.Tensor | None:
            w = t.get(name)
            if w is None and required:
                raise DecoderLoadError(f"{path}: weight {name!r} is missing")
            return None if w is None else device.to_device(w, dtype=device.dtype)

        def cat(names: list[str], bias: bool) -> torch.Tensor | None:
            parts = [get(n + (".bias" if bias else ".weight"), required=not bias) for n in names]
            if bias and all(p is None for p in parts):
                return None
            if bias:   # a bias on some of the stacked projections only: zeros for the others
                parts = [p if p is not None else
                         torch.zeros(get(n + ".weight").shape[0], device=device.device, dtype=device.dtype)
                         for p, n in zip(parts, names)]
            return torch.cat(parts, dim=0)

        layers = []
        for i in range(spec.num_layers):
            p = f"model.layers.{i}."
            qkv = [p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"]
            gu = [p + "mlp.gate_proj", p + "mlp.up_proj"]
            layers.append(DecoderLayerWeights(
                input_norm=get(p + "input_layernorm.weight"), qkv=cat(qkv, False), qkv_bias=cat(qkv, True),
                o=get(p + "self_attn.o_proj.weight"), o_bias=get(p + "self_attn.o_proj.bias", False),
                post_norm=get(p + "post_attention_layernorm.weight"), gate_up=cat(gu, False),
                gate_up_bias=cat(gu, True), down=get(p + "mlp.down_proj.weight"),
                down_bias=get(p + "mlp.down_proj.bias", False)))
        embed = get("model.embed_tokens.weight")
        lm_head = get("lm_head.weight", required=not spec.tie_word_embeddings)
        if lm_head is None:
            lm_head = embed
        if tuple(embed.shape) != (spec.vocab_size, spec.hidden_size):
            raise DecoderLoadError(f"{path}: embed_tokens shape {tuple(embed.shape)} does not match "
                                   f"the config")
        return cls(spec, embed, layers, get("model.norm.weight"), lm_head, device)

    def new_cache(self, config: KVCacheConfig) -> PagedKVCache:
        s = self.spec
        return PagedKVCache(config, s.num_layers, s.num_kv_heads, s.head_dim, self.device)

    # -- the step ---------------------------------------------------------------------------
    def _plan(self, sequences: Sequence[StepSequence], num_tokens: int, cache: PagedKVCache) -> _StepPlan:
        if sum(s.num_new for s in sequences) != num_tokens:
            raise ValueError(f"the sequences' num_new sum to {sum(s.num_new for s in sequences)}, "
                             f"but the step has {num_tokens} tokens")
        to_dev = lambda a: self.device.to_device(torch.from_numpy(a))   # noqa: E731
        spans, ctx, masks, new, pos, lasts, chunks = [], [], [], [], [], [], []
        dec_rows, dec_blocks, dec_len = [], [], []
        bs, first = cache.block_size, 0
        for s in sequences:
            if s.num_new < 1 or s.num_computed < 0:
                raise ValueError(f"sequence {s.seq_id!r}: num_new must be >= 1 and num_computed >= 0")
            end = s.num_computed + s.num_new
            if end > self.spec.max_position_embeddings:
                raise ValueError(f"sequence {s.seq_id!r}: {end} tokens exceed max_position_embeddings "
                                 f"{self.spec.max_position_embeddings}")
            new.append(cache.slots(s.seq_id, s.num_computed, end))
            blocks = cache.blocks(s.seq_id, end)                       # [ceil(end / bs)]
            pos.append(np.arange(s.num_computed, end, dtype=np.int64))
            if s.num_new == 1:
                dec_rows.append(first)
                dec_blocks.append(blocks)
                dec_len.append(end)
            else:
                chunks.append((first, s.num_new, s.num_computed, blocks))
            first += s.num_new
            lasts.append(first - 1)
        batch = _chunk_batch(chunks, bs, to_dev)
        if batch is None:
            for first_i, m, computed, blocks in chunks:
                ctx.append(to_dev(blocks))
                q_pos = np.arange(computed, computed + m)[:, None]
                masks.append(to_dev(np.arange(len(blocks) * bs)[None, :] <= q_pos))   # causal: also hides the pad
                spans.append((first_i, first_i + m))
        dec_ids = dec_mask = dec_idx = staged = None
        staging_rows = None
        if dec_rows and cache.staging is not None:
            decoding = [(s.seq_id, s.num_computed) for s in sequences if s.num_new == 1]
            staging_rows = cache.staging.prepare(cache, decoding)
        if staging_rows is not None:
            staged = _staged(dec_rows, dec_len, staging_rows, to_dev)
        elif dec_rows:
            lengths = np.array(dec_len, dtype=np.int64)
            b_max = max(len(b) for b in dec_blocks)
            padded = np.zeros((len(dec_blocks), b_max), dtype=np.int64)         # pad: block 0, masked out
            for i, b in enumerate(dec_blocks):
                padded[i, :len(b)] = b
            dec_ids, dec_idx = to_dev(padded.reshape(-1)), to_dev(np.array(dec_rows, dtype=np.int64))
            if (lengths != b_max * bs).any():
                dec_mask = to_dev((np.arange(b_max * bs)[None, :] < lengths[:, None])[:, None, None, :])
        slots_np = np.array([s.adapter_slot for s in sequences], dtype=np.int64)
        idx = None
        if slots_np.any():
            idx = to_dev(np.repeat(slots_np, [s.num_new for s in sequences]))
        last = to_dev(np.array(lasts, dtype=np.int64))
        return _StepPlan(to_dev(np.concatenate(new)), spans, ctx, masks, batch, dec_idx, dec_ids, dec_mask, staged,
                         idx, last, np.concatenate(pos))

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None,
                sequences: Sequence[StepSequence], cache: PagedKVCache,
                lora: DecoderLoraPool | None = None) -> torch.Tensor:
        """Run one step; returns logits [num_sequences, vocab] (float32) of each sequence's last token.

        Semantics: for each sequence s (its tokens contiguous in input_ids, in the order of
        `sequences`), the logits equal those of the full causal forward over its positions
        0..num_computed+num_new-1 with its adapter, given that the cache holds K/V of its first
        num_computed positions. This step's K/V are written into the cache, whose blocks must already
        cover num_computed + num_new tokens (cache.allocate).
        input_ids [num_tokens] long, positions [num_tokens] long (num_computed + 0..num_new-1 per sequence;
        None: derived from `sequences`; host positions are checked against them).
        """
        spec = self.spec
        if input_ids.dim() != 1:
            raise ValueError(f"input_ids must be flat [num_tokens], got shape {tuple(input_ids.shape)}")
        n = input_ids.shape[0]
        plan = self._plan(sequences, n, cache)
        if positions is None:
            positions = torch.from_numpy(plan.positions)
        elif positions.shape != input_ids.shape:
            raise ValueError(f"positions {tuple(positions.shape)} and input_ids {tuple(input_ids.shape)} "
                             f"differ")
        elif positions.device.type == "cpu" and not np.array_equal(positions.numpy(), plan.positions):
            raise ValueError("positions do not match the sequences' num_computed + 0..num_new-1")
        if plan.adapter_idx is not None and lora is None:
            raise ValueError("a sequence names an adapter slot but no LoRA pool was given")
        nh, nkv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
        freqs = positions.to(self.device.device).float()[:, None] * self.inv_freq[None, :]   # [n, d / 2]
        emb = torch.cat((freqs, freqs), dim=-1)                                               # [n, d]
        cos, sin = emb.cos().to(self.device.dtype), emb.sin().to(self.device.dtype)
        x = self.embed.index_select(0, input_ids.to(self.device.device))                     # [n, H]
        q_off, kv = (0, nh * d, (nh + nkv) * d), nkv * d
        for i, w in enumerate(self.layers):
            h = rms_norm(x, w.input_norm, spec.rms_norm_eps)                                  # [n, H]
            qkv = F.linear(h, w.qkv, w.qkv_bias)                                          # [n, (nh+2nkv) d]
            if plan.adapter_idx is not None:
                lora.apply(i, "qkv", h, qkv, plan.adapter_idx, q_off)
            q = apply_rope(qkv[:, :nh * d].view(n, nh, d), cos, sin)                          # [n, nh, d]
            k = apply_rope(qkv[:, nh * d:nh * d + kv].view(n, nkv, d), cos, sin)             # [n, nkv, d]
            v = qkv[:, nh * d + kv:].view(n, nkv, d)                                          # [n, nkv, d]
            cache.write(i, plan.new_slots, k, v)
            attn = self._attention(i, q, k, v, plan, cache)                                   # [n, nh d]
            o = F.linear(attn, w.o, w.o_bias)                                                 # [n, H]
            if plan.adapter_idx is not None:
                lora.apply(i, "o", attn, o, plan.adapter_idx, (0,))
            x = x + o
            h = rms_norm(x, w.post_norm, spec.rms_norm_eps)
            gu = F.linear(h, w.gate_up, w.gate_up_bias)                                       # [n, 2 I]
            if plan.adapter_idx is not None:
                lora.apply(i, "gate_up", h, gu, plan.adapter_idx, (0, spec.intermediate_size))
            gate, up = gu.split(spec.intermediate_size, dim=-1)
            act = F.silu(gate) * up                                                           # [n, I]
            down = F.linear(act, w.down, w.down_bias)                                         # [n, H]
            if plan.adapter_idx is not None:
                lora.apply(i, "down", act, down, plan.adapter_idx, (0,))
            x = x + down
        last = rms_norm(x.index_select(0, plan.last), self.norm, spec.rms_norm_eps)          # [S, H]
        return F.linear(last, self.lm_head).float()                                           # [S, V]

    def _attention(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, plan: _StepPlan,
                   cache: PagedKVCache) -> torch.Tensor:
        """Semantics: per sequence, softmax(q K^T / sqrt(d) + causal mask) V over its cached K/V
        (grouped-query: query head j reads KV head j // (nh / nkv)). q [n, nh, d] -> [n, nh d];
        k_new, v_new [n, nkv, d]: this step's K/V (already in the cache; staged decode rows take theirs here)."""
        out = torch.empty_like(q)                                                             # [n, nh, d]
        if plan.staged is not None:
            st = plan.staged
            kd, vd = k_new.index_select(0, st.rows), v_new.index_select(0, st.rows)          # [D, nkv, d]
            if cache.dtype != q.dtype:           # what the blocks hold: the staged rows equal a read of them
                kd, vd = kd.to(cache.dtype).to(q.dtype), vd.to(cache.dtype).to(q.dtype)
            cache.staging.write(layer, st.row_ids, st.positions, kd, vd)
            k, v = cache.staging.view(layer, st.rows.shape[0], st.tokens)                    # [D, nkv, T, d]
            qd = q.index_select(0, st.rows).unsqueeze(2)                                     # [D, nh, 1, d]
            o = F.scaled_dot_product_attention(qd, k, v, attn_mask=st.mask, enable_gqa=True)
            out.index_copy_(0, st.rows, o.squeeze(2))
        if plan.decode_rows is not None:
            num, d = plan.decode_rows.shape[0], q.shape[2]
            k, v = cache.read_blocks(layer, plan.decode_blocks)                               # [D T, nkv, d]
            k = k.view(num, -1, k.shape[1], d).transpose(1, 2).to(q.dtype)                    # [D, nkv, T, d]
            v = v.view(num, -1, v.shape[1], d).transpose(1, 2).to(q.dtype)
            qd = q.index_select(0, plan.decode_rows).unsqueeze(2)                             # [D, nh, 1, d]
            o = F.scaled_dot_product_attention(qd, k, v, attn_mask=plan.decode_mask, enable_gqa=True)
            out.index_copy_(0, plan.decode_rows, o.squeeze(2))                                # [D, nh, d]
        if plan.chunks is not None:
            c, d = plan.chunks.mask.shape[0], q.shape[2]
            k, v = cache.read_blocks(layer, plan.chunks.blocks)                               # [C T, nkv, d]
            k = k.view(c, -1, k.shape[1], d).transpose(1, 2).to(q.dtype)                      # [C, nkv, T, d]
            v = v.view(c, -1, v.shape[1], d).transpose(1, 2).to(q.dtype)
            qc = q.index_select(0, plan.chunks.rows).view(c, -1, q.shape[1], d).transpose(1, 2)   # [C, nh, M, d]
            o = F.scaled_dot_product_attention(qc, k, v, attn_mask=plan.chunks.mask, enable_gqa=True)
            o = o.transpose(1, 2).reshape(-1, q.shape[1], d)                                  # [C M, nh, d]
            out.index_copy_(0, plan.chunks.tokens, o.index_select(0, plan.chunks.real))
        for (first, end), blocks, mask in zip(plan.spans, plan.context_blocks, plan.masks):
            k, v = cache.read_blocks(layer, blocks)                                           # [T, nkv, d]
            qi = q[first:end].transpose(0, 1)                                                 # [nh, m, d]
            k, v = k.transpose(0, 1).to(q.dtype), v.transpose(0, 1).to(q.dtype)              # [nkv, T, d]
            o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, enable_gqa=True)    # [nh, m, d]
            out[first:end] = o.transpose(0, 1)
        return out.reshape(q.shape[0], -1)
