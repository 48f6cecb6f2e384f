"""A decoder backbone as a server holds it: the model, its tokenizer and chat template, its end-of-sequence
tokens, the paged KV cache and the LoRA slot pool, sized from one validated config."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .decoder import DecoderLoadError, DecoderModel
from .decoder_lora import DecoderLoraConfig, DecoderLoraPool
from .device import DeviceContext
from .kv_cache import KVCacheConfig, PagedKVCache
from .model import InputError
from .structured import StructuredCompiler, compiler_for

CHAT_ROLES = ("system", "user", "assistant")
MAX_CHARS_PER_TOKEN = 32      # a prompt longer than this many characters per allowed token is refused untokenized


@dataclass(frozen=True)
class DecoderBackboneConfig:
    """path: a local Hugging Face Llama-family checkpoint directory; None = the default SmolLM2-135M-Instruct
    (converted once from its packaged GGUF into cache_dir). kv_cache_bytes: K and V of all layers together
    (the hard memory budget of generation); block_size: tokens per KV block; staging_bytes: the decode staging, a
    contiguous copy of the running decode rows' K/V that spares each decode step reading them out of the blocks
    (kv_cache.DecodeStaging; 0: off)."""

    path: str | None = None
    cache_dir: str = "./var/models"
    kv_cache_bytes: int = 256 * 1024 ** 2
    block_size: int = 16
    staging_bytes: int = 256 * 1024 ** 2
    num_lora_slots: int = 32
    max_lora_rank: int = 16
    lora_dtype: str = "auto"      # the LoRA banks: auto (the model's dtype), float32, bfloat16 (half the memory)

    def __post_init__(self) -> None:
        for name in ("kv_cache_bytes", "block_size", "num_lora_slots", "max_lora_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"decoder {name} must be an integer >= 1, got {value!r}")
        if isinstance(self.staging_bytes, bool) or not isinstance(self.staging_bytes, int) or self.staging_bytes < 0:
            raise ValueError(f"decoder staging_bytes must be an integer >= 0 (0: off), got {self.staging_bytes!r}")
        if self.path is not None and not isinstance(self.path, str):
            raise ValueError(f"decoder path must be a string or None, got {self.path!r}")
        self.lora_config()

    def kv_config(self) -> KVCacheConfig:
        return KVCacheConfig(block_size=self.block_size, budget_bytes=self.kv_cache_bytes,
                             staging_bytes=self.staging_bytes)

    def lora_config(self) -> DecoderLoraConfig:
        return DecoderLoraConfig(num_slots=self.num_lora_slots, max_rank=self.max_lora_rank, bank_dtype=self.lora_dtype)


def _eos_ids(path: Path, tokenizer) -> tuple[int, ...]:
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        try:
            value = json.loads((path / name).read_text()).get("eos_token_id")
        except (OSError, json.JSONDecodeError):
            continue
        ids.update(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return tuple(sorted(ids))


class DecoderBackbone:
    def __init__(self, name: str, path: Path, model: DecoderModel, tokenizer, kv: PagedKVCache,
                 lora: DecoderLoraPool):
        self.name, self.path, self.model, self.tokenizer, self.kv, self.lora = name, path, model, tokenizer, kv, lora
        self.spec = model.spec
        self.eos_token_ids = _eos_ids(path, tokenizer)
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))

    @property
    def structured(self) -> StructuredCompiler:
        """Compiles structured-output grammars for this tokenizer (its engine's matchers share it)."""
        return compiler_for(self.tokenizer, self.spec.vocab_size, self.eos_token_ids)

    @classmethod
    def load(cls, config: DecoderBackboneConfig, device: DeviceContext) -> "DecoderBackbone":
        from transformers import AutoTokenizer

        if config.path is None:
            from .decoder_checkpoint import default_decoder_path
            path, name = default_decoder_path(config.cache_dir), "SmolLM2-135M-Instruct"
        else:
            path = Path(config.path)
            name = path.name
            if not (path / "config.json").is_file():
                raise DecoderLoadError(f"decoder checkpoint {path} has no config.json (a local Hugging Face "
                                       f"checkpoint directory is needed)")
        model = DecoderModel.from_pretrained(path, device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise DecoderLoadError(f"decoder checkpoint {path}: cannot load its tokenizer ({e})") from None
        return cls(name, path, model, tokenizer, model.new_cache(config.kv_config()),
                   DecoderLoraPool(config.lora_config(), model.spec, device))

    # -- prompts ---------------------------------------------------------------------------------
    def render_chat(self, messages: Sequence[tuple[str, str]]) -> str:
        """The chat (role, content) pairs through the backbone's chat template, ending with the
        assistant's turn. InputError for an unknown role or a backbone without a template."""
        if not self.has_chat_template:
            raise InputError(f"decoder {self.name} has no chat template; send a prompt instead of messages")
        if not messages:
            raise InputError("messages is empty")
        for i, (role, _) in enumerate(messages):
            if role not in CHAT_ROLES:
                raise InputError(f"messages[{i}].role {role!r} is not one of {CHAT_ROLES}")
        return self.tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages],
                                                  add_generation_prompt=True, tokenize=False)

    def tokenize_prompt(self, text: str, max_tokens: int, truncate: bool, is_chat: bool = False) -> list[int]:
        """Token ids of a prompt of at most max_tokens tokens: a longer prompt raises InputError, or with
        truncate keeps its last max_tokens tokens. Texts far longer than any allowed prompt are refused
        (or cut to their tail) before tokenization, so a huge text costs no tokenizer time."""
        if not text:
            raise InputError("the prompt is empty")
        max_chars = max_tokens * MAX_CHARS_PER_TOKEN
        if len(text) > max_chars:
            if not truncate:
                raise InputError(f"the prompt has {len(text)} characters, more than {max_chars} (the decoder's "
                                 f"{max_tokens}-token limit for this request); shorten it or set truncate_prompt")
            text = text[-max_chars:]
        ids = self.tokenizer(text, add_special_tokens=not is_chat)["input_ids"]
        if len(ids) > max_tokens:
            if not truncate:
                raise InputError(f"the prompt has {len(ids)} tokens, more than {max_tokens} (the decoder's context "
                                 f"{self.spec.max_position_embeddings} less the tokens to generate, within the "
                                 f"tenant's quota); shorten it, lower max_new_tokens or set truncate_prompt")
            ids = ids[-max_tokens:]
        if not ids:
            raise InputError("the prompt has no tokens")
        return list(ids)

    # -- memory ------------------------------------------------------------------------------------
    def weight_bytes(self) -> int:
        m = self.model
        tensors = [m.embed, m.norm] + ([] if m.lm_head is m.embed else [m.lm_head])
        for w in m.layers:
            tensors += [t for t in vars(w).values() if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def num_parameters(self) -> int:
        return self.weight_bytes() // self.model.embed.element_size()

    def info(self) -> dict:
        s, kv, lora = self.spec, self.kv, self.lora
        return {"backbone": self.name, "path": str(self.path), "layers": s.num_layers, "hidden_size": s.hidden_size,
                "heads": f"{s.num_heads} query / {s.num_kv_heads} KV", "context": s.max_position_embeddings,
                "parameters": self.num_parameters(), "weight_bytes": self.weight_bytes(),
                "device": self.model.device.describe(), "dtype": self.model.device.dtype_name,
                "eos_token_ids": list(self.eos_token_ids), "chat_template": self.has_chat_template,
                "kv_cache": {"bytes": kv.total_bytes(), "blocks": kv.num_blocks, "free_blocks": kv.num_free_blocks,
                             "cached_blocks": kv.num_cached_blocks, "block_size": kv.block_size,
                             "tokens": kv.num_blocks * kv.block_size},
                "decode_staging": {"budget_bytes": kv.config.staging_bytes,
                                   "bytes": 0 if kv.staging is None else kv.staging.nbytes},
                "lora_pool": {"slots": lora.config.num_slots, "max_rank": lora.config.max_rank,
                              "bytes": lora.total_bytes()}}
