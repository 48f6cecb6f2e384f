"""The decoder's runner: owns its tensors (the model, the paged KV cache, the LoRA slots through the
adapter cache). Turns a GenerationBatch into one flattened decoder step and samples the next token of
every request whose last token the step computed."""
from __future__ import annotations

import time
from typing import Protocol, Sequence

import torch

from vbert.decoder import DecoderModel, StepSequence
from vbert.device import enter_step_thread
from vbert.kv_cache import PagedKVCache
from vbert.sampling import SamplingParams, sample
from vbert.structured import allowed_tokens

from .generation_policy import GenerationBatch
from .types import RowResult, StepOutput


class AdapterSlots(Protocol):
    """What the runner needs of the decoder's adapter cache (manager.cache.TieredCache)."""

    pool: object

    def resolve(self, adapter_ids: Sequence[int]) -> list[int]: ...


class GenerationRunner:
    def __init__(self, model: DecoderModel, kv: PagedKVCache, adapters: AdapterSlots | None = None):
        self.model, self.kv, self.adapters = model, kv, adapters
        self.lora = getattr(adapters.pool, "lora_pool", adapters.pool) if adapters is not None else None

    def enter_step_thread(self) -> None:
        """Called first by the engine's step thread: it takes the CPU threads reserved for steps."""
        enter_step_thread()

    def execute(self, batch: GenerationBatch) -> StepOutput:
        """One decoder step; the result of a row carries the sampled token when the step computed the
        request's last token (else None: a prefill chunk that is not the last), and its TokenLogprobs
        (or None) as `output`."""
        t0 = time.perf_counter()
        ids = sorted({r.request.adapter_id for r in batch.rows if r.request.adapter_id is not None})
        slots = dict(zip(ids, self.adapters.resolve(ids))) if ids else {}
        tokens: list[int] = []
        seqs: list[StepSequence] = []
        for row in batch.rows:
            req, start = row.request, row.request.num_computed_tokens
            tokens += req.all_token_ids()[start:start + row.num_tokens]
            seqs.append(StepSequence(req.request_id, start, row.num_tokens, slots.get(req.adapter_id, 0)))
        input_ids = torch.tensor(tokens, dtype=torch.long)                       # [num_tokens]
        logits = self.model.forward(input_ids, None, seqs, self.kv, self.lora)   # [num_rows, vocab]
        ends = [i for i, row in enumerate(batch.rows)
                if row.request.num_computed_tokens + row.num_tokens == row.request.num_tokens]
        new_ids: dict[int, int] = {}
        logprobs: dict[int, object] = {}
        errors: dict[int, str] = {}
        if ends:
            params: list[SamplingParams] = [batch.rows[i].request.metadata["sampling"] for i in ends]
            counts = [len(batch.rows[i].request.output_ids) for i in ends]
            history = None
            if any(p.has_penalties for p in params):   # what the penalties count: the prompt and the output so far
                history = [(batch.rows[i].request.prompt_ids, batch.rows[i].request.output_ids) for i in ends]
            # min_tokens: a request short of it must not draw its stop tokens (the engine put them in its metadata)
            suppress = [batch.rows[i].request.metadata.get("stop_ids") if p.min_tokens > n else None
                        for i, p, n in zip(ends, params, counts)]
            # structured output: the tokens its grammar allows next (the engine gave each such request a Matcher)
            matchers = [batch.rows[i].request.metadata.get("matcher") for i in ends]
            allowed = None
            if any(m is not None for m in matchers):
                allowed = allowed_tokens(matchers, logits.shape[-1]).to(logits.device)    # [rows, vocab]
            picked, lps = sample(logits[ends], params, counts, history, suppress, allowed)
            for j, (i, token) in enumerate(zip(ends, picked.tolist())):   # one device->host copy
                new_ids[i] = token
                if lps is not None:
                    logprobs[i] = lps[j]
                if matchers[j] is not None and not matchers[j].consume(token):   # the grammar's own limits hit
                    errors[i] = f"structured output: {matchers[j].error or f'token {token} broke the grammar'}"
        results = tuple(RowResult(row.request.request_id, logprobs.get(i), new_ids.get(i), errors.get(i))
                        for i, row in enumerate(batch.rows))
        return StepOutput(batch.step, results, compute_s=time.perf_counter() - t0)
