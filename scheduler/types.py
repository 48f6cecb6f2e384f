"""The scheduler <-> runner contract: plain dataclasses, no torch.

Request state follows the "computed tokens catch up with tokens" view (vLLM v1): a request has
`num_tokens` (prompt + generated so far) and `num_computed_tokens`; a step computes some of the
difference. An encoder request (classify, tag, embed) is computed whole in one step and finishes;
a generative request (max_new_tokens > 0, a later issue) gets one new token per step after its
prompt, joining or leaving the batch between steps (Orca's iteration-level scheduling).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class RequestStatus(str, Enum):
    WAITING = "waiting"            # queued (possibly waiting for its adapter to become resident)
    RUNNING = "running"            # scheduled in a step in flight, or generating across steps
    FINISHED = "finished"
    EXPIRED = "expired"            # deadline passed before compute: answered as deadline exceeded
    CANCELLED = "cancelled"        # the client went away
    FAILED = "failed"              # the runner raised for this request

    @property
    def is_finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)


_ids = itertools.count(1)


@dataclass(eq=False)
class Request:
    """One unit of work. `prompt_ids` may be None until the preparation stage tokenizes `text`."""

    tenant_id: int
    adapter_id: int | None            # None = the bare backbone (pool slot 0)
    deadline: float                   # time.monotonic() by which it must be computed
    prompt_ids: list[int] | None = None
    text: str | None = None
    truncate: bool = True
    max_length: int | None = None     # the tenant's token limit per input (None = the model's)
    normalize: bool | None = None     # embed heads: override the head's normalization
    weight: float = 1.0               # the tenant's scheduling weight (from its quotas)
    max_new_tokens: int = 0           # 0 = encoder request, finished in one step
    request_id: int = field(default_factory=lambda: next(_ids))
    arrival: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    output_ids: list[int] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)   # timings filled along the way

    def __post_init__(self) -> None:
        if self.prompt_ids is None and self.text is None:
            raise ValueError("a request needs prompt_ids or text")
        if self.prompt_ids is not None and not self.prompt_ids:
            raise ValueError("prompt_ids is empty")
        if self.weight <= 0:
            raise ValueError(f"weight must be > 0, got {self.weight}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")

    @property
    def is_tokenized(self) -> bool:
        return self.prompt_ids is not None

    @property
    def num_tokens(self) -> int:
        return (len(self.prompt_ids) if self.prompt_ids is not None else 0) + len(self.output_ids)

    @property
    def is_generative(self) -> bool:
        return self.max_new_tokens > 0

    def all_token_ids(self) -> list[int]:
        """The prompt then the generated tokens: position p's token (a new list)."""
        return self.prompt_ids + self.output_ids

    def tokens_to_compute(self) -> int:
        return self.num_tokens - self.num_computed_tokens


@dataclass(frozen=True)
class ScheduledRow:
    request: Request
    num_tokens: int                   # tokens of this request computed in this step


@dataclass(frozen=True)
class ScheduledBatch:
    """Scheduler -> runner: the work of one forward pass."""

    step: int
    rows: tuple[ScheduledRow, ...]
    dropped: tuple[Request, ...] = ()  # expired or cancelled while queued (answered, not computed)
    token_budget: int | None = None    # the step's token budget when below max_tokens_per_step (latency sizing)

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    @property
    def num_tokens(self) -> int:
        return sum(r.num_tokens for r in self.rows)

    @property
    def adapter_ids(self) -> list[int]:
        return sorted({r.request.adapter_id for r in self.rows if r.request.adapter_id is not None})


@dataclass(frozen=True)
class RowResult:
    request_id: int
    output: Any = None                # the runner's per-row result (e.g. vbert RowOutput)
    new_token_id: int | None = None   # generative requests: the token sampled this step
    error: str | None = None


@dataclass(frozen=True)
class StepOutput:
    """Runner -> scheduler: what one forward pass produced, one result per scheduled row."""

    step: int
    results: tuple[RowResult, ...]
    compute_s: float = 0.0
