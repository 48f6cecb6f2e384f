"""Tiny random Llama-family checkpoints with a real (tiny) tokenizer and a ChatML chat template, written
to a directory as a user's Hugging Face checkpoint would be: what the decoder backbone, the generation
engine and the server load in tests."""
from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["the patient was treated with aspirin and recovered", "Hello world, café déjà vu.",
          "What is the capital of France? Paris is the capital of France.",
          "the quick brown fox jumps over the lazy dog", "emoji 🙂 and 日本語 text", "STOP here and stop"] * 4


def tiny_tokenizer():
    """A byte-level BPE (GPT-2 style) of about 300 tokens; <|im_end|> is its end-of-sequence token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                  pad_token="<|endoftext|>")
    out.chat_template = CHAT_TEMPLATE
    return out


def write_tiny_decoder_checkpoint(path: Path, seed: int = 0, num_layers: int = 2, hidden: int = 32,
                                  max_positions: int = 256) -> Path:
    """A random LlamaForCausalLM (GQA: 4 query / 2 KV heads, tied embeddings) with the tiny tokenizer."""
    import transformers

    path = Path(path)
    tokenizer = tiny_tokenizer()
    cfg = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 3 // 2,
                                   num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=max_positions, tie_word_embeddings=True,
                                   rope_theta=5000.0, bos_token_id=tokenizer.bos_token_id,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = transformers.LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g) * 0.25
            p.copy_(1.0 + 0.1 * noise if "norm" in name else noise)
    model.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_tiny_decoder_lora(path: Path, checkpoint: Path, seed: int, rank: int = 4,
                            targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
    """A PEFT CAUSAL_LM LoRA directory with random (non-zero) A and B for the checkpoint."""
    import peft
    import transformers

    base = transformers.LlamaForCausalLM.from_pretrained(checkpoint)
    model = peft.get_peft_model(base, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets),
                                                      task_type="CAUSAL_LM", init_lora_weights=False))
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(path)
    return path
