"""A tiny greedy generation loop over DecoderModel steps (for tests and as a reference of the step contract).

Every step, each running sequence's computed tokens catch up with its tokens: a sequence that has
a token not yet in the KV cache gets up to `chunk_size` of them (a prefill chunk, or its one new
token when decoding), all in ONE flattened step, within `token_budget`. Sequences join at their
arrival step and leave (their blocks freed) when they have max_new_tokens tokens or emit EOS. There
is no preemption: the scheduler (scheduler/) is where admission and memory pressure are decided.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .decoder import DecoderModel, StepSequence
from .decoder_lora import DecoderLoraPool
from .kv_cache import PagedKVCache


@dataclass
class _Running:
    index: int
    tokens: list[int]
    num_prompt: int
    max_new_tokens: int
    adapter_slot: int
    num_computed: int = 0
    generated: list[int] = field(default_factory=list)


def generate_greedy(model: DecoderModel, prompts: Sequence[Sequence[int]], cache: PagedKVCache,
                    adapter_slots: Sequence[int] | None = None, max_new_tokens: int | Sequence[int] = 16,
                    lora: DecoderLoraPool | None = None, chunk_size: int = 8, token_budget: int = 64,
                    arrival_steps: Sequence[int] | None = None, eos_token_id: int | None = None,
                    step_log: list | None = None) -> list[list[int]]:
    """Greedy continuation of each prompt (token ids), generated tokens only, in prompt order.
    step_log, if given, receives per step the list of (request index, num_new) that ran."""
    n = len(prompts)
    slots = list(adapter_slots) if adapter_slots is not None else [0] * n
    limits = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    arrivals = list(arrival_steps) if arrival_steps is not None else [0] * n
    if not (len(slots) == len(limits) == len(arrivals) == n):
        raise ValueError("adapter_slots, max_new_tokens and arrival_steps must have one entry per prompt")
    if chunk_size < 1 or token_budget < 1:
        raise ValueError("chunk_size and token_budget must be >= 1")
    if any(len(p) < 1 for p in prompts) or any(m < 1 for m in limits):
        raise ValueError("every prompt needs at least one token and max_new_tokens >= 1")
    waiting = [_Running(i, list(prompts[i]), len(prompts[i]), limits[i], slots[i]) for i in range(n)]
    running: list[_Running] = []
    outputs: list[list[int]] = [[] for _ in range(n)]
    step = 0
    while waiting or running:
        running += [r for r in waiting if arrivals[r.index] <= step]
        waiting = [r for r in waiting if arrivals[r.index] > step]
        budget, batch = token_budget, []
        # decode tokens first (one each), then prefill chunks, within the step's token budget
        for r in sorted(running, key=lambda r: (r.num_computed < r.num_prompt, r.index)):
            num_new = min(len(r.tokens) - r.num_computed, chunk_size, budget)
            if num_new < 1:
                continue
            cache.allocate(r.index, r.num_computed + num_new)
            batch.append((r, num_new))
            budget -= num_new
        step += 1
        if not batch:
            continue
        if step_log is not None:
            step_log.append([(r.index, k) for r, k in batch])
        ids = torch.tensor([t for r, k in batch for t in r.tokens[r.num_computed:r.num_computed + k]])
        pos = torch.cat([torch.arange(r.num_computed, r.num_computed + k) for r, k in batch])
        seqs = [StepSequence(r.index, r.num_computed, k, r.adapter_slot) for r, k in batch]
        logits = model.forward(ids, pos, seqs, cache, lora)                  # [num_sequences, V]
        next_ids = logits.argmax(-1).tolist()
        for (r, k), tok in zip(batch, next_ids):
            r.num_computed += k
            if r.num_computed < len(r.tokens):   # a prefill chunk that is not the prompt's last
                continue
            r.tokens.append(tok)
            r.generated.append(tok)
            if len(r.generated) >= r.max_new_tokens or tok == eos_token_id:
                outputs[r.index] = r.generated
                cache.free(r.index)
                running.remove(r)
    return outputs
