"""The model runner: owns every tensor of the engine. Turns a ScheduledBatch into model inputs
(adapter residency, slots, packed inputs, host-to-device copies) and runs the forward pass.
Prepare and execute are separate so the engine can prepare step k+1 while step k computes."""
from __future__ import annotations

import time
from dataclasses import dataclass

from manager.cache import CacheFullError, TieredCache
from vbert.device import enter_step_thread
from vbert.model import EncodeRow, InputError, MultiTenantModel, PreparedBatch

from .types import Request, RowResult, ScheduledBatch, StepOutput


@dataclass
class PreparedStep:
    batch: ScheduledBatch
    inputs: PreparedBatch
    held_adapters: list[int]
    prepare_s: float


class ModelRunner:
    def __init__(self, model: MultiTenantModel, cache: TieredCache | None = None):
        self.model, self.cache = model, cache
        self._stream = model.device.new_stream()   # copy stream under CUDA, None on CPU

    def enter_step_thread(self) -> None:
        """Called first by the thread that runs execute(): it takes the CPU threads reserved for steps."""
        enter_step_thread()

    def tokenize(self, requests: list[Request]) -> list[tuple[Request, InputError]]:
        """Tokenize requests given as text, in place (one tokenizer call): prompt_ids, and in metadata
        "offsets" and "word_ids" (see vbert.tokens.TokenizedText); returns the failures."""
        todo = [r for r in requests if not r.is_tokenized]
        if not todo:
            return []
        t0 = time.perf_counter()
        rows = self.model.tokenize_each([r.text for r in todo], [r.truncate for r in todo], [r.max_length for r in todo])
        dt = time.perf_counter() - t0
        failed = []
        for r, row in zip(todo, rows):
            r.metadata["tokenize_s"] = dt
            if isinstance(row, InputError):
                failed.append((r, InputError(f"text {row}")))
            else:
                r.prompt_ids = row.ids
                r.metadata["offsets"] = row.offsets     # (start, end) in r.text per token; (0, 0) for specials
                r.metadata["word_ids"] = row.word_ids   # word index per token; None for specials
        return failed

    def prepare(self, batch: ScheduledBatch) -> PreparedStep:
        """Hold the batch's adapters on the device (already resident when the policy checked
        residency; loaded now otherwise), map them to slots and build the device inputs."""
        t0 = time.perf_counter()
        ids = batch.adapter_ids
        slots: dict[int, int] = {}
        if ids:
            if self.cache is None:
                raise RuntimeError("a batch names adapters but the runner has no adapter cache")
            self._hold(ids)
            try:
                slots = dict(zip(ids, self.cache.resolve(ids)))
            except BaseException:
                self.cache.release(ids)
                raise
        try:
            rows = [EncodeRow(r.request.prompt_ids, slots.get(r.request.adapter_id, 0), normalize=r.request.normalize)
                    for r in batch.rows]
            inputs = self.model.prepare(rows, self._stream)
        except BaseException:
            if ids:
                self.cache.release(ids)
            raise
        return PreparedStep(batch, inputs, ids, time.perf_counter() - t0)

    def _hold(self, ids: list[int], timeout_s: float = 30.0) -> None:
        """Hold the step's adapters; if the device is full of adapters held by the step still
        computing, wait for it to release them (the policy caps a step's adapters to fit)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.cache.prefetch(ids).result()
                return
            except CacheFullError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)

    def execute(self, step: PreparedStep) -> StepOutput:
        t0 = time.perf_counter()
        outputs = self.model.execute(step.inputs)
        dt = time.perf_counter() - t0
        results = tuple(RowResult(r.request.request_id, out) for r, out in zip(step.batch.rows, outputs))
        return StepOutput(step.batch.step, results, compute_s=dt)

    def release(self, step: PreparedStep) -> None:
        if step.held_adapters:
            self.cache.release(step.held_adapters)
