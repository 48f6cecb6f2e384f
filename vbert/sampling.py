"""Per-request sampling parameters and the batched sampler of a decode step.

`SamplingParams` is what a generation request asks for (validated at construction; a bad value raises
`ValueError` naming the field). `sample` turns one step's logits, one row per sequence, into one token
per row: greedy rows take the argmax, the others go temperature -> top-k -> top-p -> draw.

Reproducibility whatever the batch-mates: a row draws its one uniform number from its own
`torch.Generator`, seeded from (the request's seed, the number of tokens it has generated so far),
never from a global RNG, and the filtering of a row reads only that row. So a request's tokens depend
only on its logits, its parameters and its seed, not on which rows share its batch or where it sits.
A request without a seed gets a random one when its `SamplingParams` is created.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Sequence

import torch

MAX_LOGPROBS = 20
GREEDY_BELOW_TEMPERATURE = 1e-5   # smaller temperatures are greedy (as in vLLM): x / T would overflow
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy; top_k 0 and top_p 1 are off; logprobs n > 0 asks for the sampled token's
    log-probability and the n most likely tokens' (of the model's distribution, before temperature and
    filtering) at each step. seed None draws a random seed here, so `seed` is always an int afterwards."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    logprobs: int = 0

    def __post_init__(self) -> None:
        _check_number("temperature", self.temperature)
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature!r}")
        _check_int("top_k", self.top_k)
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 is off), got {self.top_k!r}")
        _check_number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is None:
            object.__setattr__(self, "seed", secrets.randbits(63))
        _check_int("seed", self.seed)
        _check_int("max_new_tokens", self.max_new_tokens)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens!r}")
        ids = _as_tuple("stop_token_ids", self.stop_token_ids)
        for i in ids:
            _check_int("stop_token_ids", i)
            if i < 0:
                raise ValueError(f"stop_token_ids must be token ids >= 0, got {i!r}")
        object.__setattr__(self, "stop_token_ids", ids)
        stop = _as_tuple("stop", self.stop)
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must hold non-empty strings, got {s!r}")
        object.__setattr__(self, "stop", stop)
        _check_int("logprobs", self.logprobs)
        if not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in 0..{MAX_LOGPROBS}, got {self.logprobs!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE


def _check_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")


def _check_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{name} must be a number, got {value!r}")


def _as_tuple(name: str, value) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
        raise ValueError(f"{name} must be a tuple or list, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class TokenLogprobs:
    """The sampled token's log-probability and the top-n (most likely first) at one step."""
    token_id: int
    logprob: float
    top_ids: tuple[int, ...]
    top_logprobs: tuple[float, ...]


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of a request's draw at `step` (tokens generated so far): a function of (seed,
    step) only, so preemption and recompute, or any batch-mates, give the same draws."""
    g = torch.Generator(device="cpu")
    g.manual_seed(_splitmix64(_splitmix64(seed & _MASK64) ^ (step & _MASK64)) >> 1)
    return g


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], num_generated: Sequence[int],
           ) -> tuple[torch.Tensor, list[TokenLogprobs | None] | None]:
    """One token per row of logits [num_seqs, vocab]; row i follows params[i] and is request i's draw
    number num_generated[i]. Returns (token_ids [num_seqs] int64 on logits' device, logprobs: None when
    no row asks for them, else one TokenLogprobs or None per row).

    Semantics: for each row i, with x = logits[i] as float32 and p = params[i]:
      if p.temperature < 1e-5 (0 is greedy): token = argmax(x) (the first maximum);
      else: z = x / p.temperature; if 0 < p.top_k < vocab, keep the tokens with z >= the top_k-th
            largest z (ties at that boundary all kept); q = softmax of the kept z (0 elsewhere);
            if p.top_p < 1, keep the tokens with q >= c, where c is the q of the first token, in
            descending q order, at which the mass of the tokens before it is < top_p and the mass
            up to it is >= top_p (the smallest most-likely set with mass >= top_p, ties at c kept);
            u = torch.rand(1, dtype=float64, generator=step_generator(p.seed, num_generated[i]));
            token = the first kept token in token-id order whose cumulative kept q exceeds
            u * (total kept q) (the last kept token with q > 0 if rounding says none).
      logprobs (p.logprobs = n > 0): log_softmax(x) of the token and of its n largest (ties in any order).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [num_seqs, vocab], got shape {tuple(logits.shape)}")
    num_seqs, vocab = logits.shape
    if len(params) != num_seqs or len(num_generated) != num_seqs:
        raise ValueError(f"{num_seqs} logits rows but {len(params)} params and "
                         f"{len(num_generated)} step counts")
    x = logits.float()                                                    # [num_seqs, vocab]
    rows = [i for i, p in enumerate(params) if not p.is_greedy]
    if len(rows) == num_seqs:                                             # no copies when all rows sample
        token_ids = _draw(x, params, num_generated)                       # [num_seqs]
    else:
        token_ids = torch.argmax(x, dim=-1)                               # [num_seqs]
        if rows:
            token_ids[rows] = _draw(x[rows], [params[i] for i in rows], [num_generated[i] for i in rows])
    logprobs = None
    if any(p.logprobs > 0 for p in params):
        logprobs = _logprobs(x, params, token_ids)
    return token_ids, logprobs


def _draw(x: torch.Tensor, params: Sequence[SamplingParams], steps: Sequence[int]) -> torch.Tensor:
    """Temperature -> top-k -> top-p -> inverse-CDF draw for rows that all sample; x [n, vocab].
    Only values (never the order of equal values) decide what is kept, so ties cannot make a row
    depend on its batch-mates; the draw walks the vocabulary in token-id order."""
    n, vocab = x.shape
    device = x.device
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
    scaled = x / temperature[:, None]                                     # [n, vocab]
    k_rows = [i for i, p in enumerate(params) if 0 < p.top_k < vocab]
    if k_rows:
        top_k = torch.tensor([params[i].top_k for i in k_rows], device=device)        # [m]
        z = scaled if len(k_rows) == n else scaled[k_rows]                             # [m, vocab]
        largest = torch.topk(z, int(top_k.max()), dim=-1).values                      # [m, max_k], sorted
        kth = largest.gather(1, (top_k - 1)[:, None])                                  # [m, 1]
        z = z.masked_fill_(z < kth, float("-inf"))
        if len(k_rows) < n:
            scaled[k_rows] = z
    probs = torch.softmax(scaled, dim=-1)                                  # [n, vocab], renormalized
    p_rows = [i for i, p in enumerate(params) if p.top_p < 1]
    if p_rows:
        top_p = torch.tensor([params[i].top_p for i in p_rows], dtype=torch.float32, device=device)
        # candidates: enough for a top-k row's kept tokens; more are sorted only where these fall short
        num_candidates = max([64] + [params[i].top_k for i in p_rows])
        q = probs if len(p_rows) == n else probs[p_rows]                              # [m, vocab]
        q = q.masked_fill_(q < _top_p_cutoff(q, top_p, num_candidates)[:, None], 0.0)
        if len(p_rows) < n:
            probs[p_rows] = q
    cdf = torch.cumsum(probs, dim=-1)                                      # [n, vocab]
    u = torch.cat([torch.rand(1, dtype=torch.float64, generator=step_generator(p.seed, s))
                   for p, s in zip(params, steps)]).to(device)            # [n]
    target = (u * cdf[:, -1].double()).float()                           # [n]
    # right=True: the first token with cdf > target, whose q is then > 0; none (pick == vocab) only
    # where rounding made target reach the total: those rows take their last token with q > 0
    pick = torch.searchsorted(cdf, target[:, None], right=True)[:, 0]    # [n]
    is_past = pick >= vocab                                               # [n]
    if bool(is_past.any()):
        ids = torch.arange(vocab, device=device)[None, :]                 # [1, vocab]
        last_nonzero = torch.where(probs[is_past] > 0, ids, -1).max(dim=-1).values
        pick[is_past] = last_nonzero.clamp(min=0)
    return pick


def _top_p_cutoff(q: torch.Tensor, top_p: torch.Tensor, num_candidates: int = 1024) -> torch.Tensor:
    """Per row of q [m, vocab], the probability c of the top-p Semantics: the q of the first token (in
    descending order) whose preceding mass is < top_p and cumulative mass is >= top_p. Looks among the
    num_candidates largest first and sorts the whole row only where their mass is short of top_p
    (a row's path depends on its own values only)."""
    m, vocab = q.shape
    cutoff = torch.empty(m, dtype=q.dtype, device=q.device)                # [m]
    values = torch.topk(q, min(num_candidates, vocab), dim=-1).values      # [m, c], sorted descending
    mass = torch.cumsum(values, dim=-1)                                    # [m, c]
    # a prefix sum does not depend on how long the row is, so the number of candidates (which
    # depends on the batch) never changes a cutoff: it is found here or in the full sort alike
    is_short = mass[:, -1] < top_p                                         # [m]
    rows = torch.arange(m, device=q.device)
    for sel, vals, mass in ((rows[~is_short], values[~is_short], mass[~is_short]),
                            (rows[is_short], torch.sort(q[is_short], dim=-1, descending=True).values, None)):
        if sel.numel() == 0:
            continue
        if mass is None:
            mass = torch.cumsum(vals, dim=-1)                              # [k, vocab]
        mass_before = mass - vals                                          # [k, c or vocab]
        last = ((mass_before < top_p[sel, None]).sum(dim=-1) - 1).clamp(min=0)  # [k]
        cutoff[sel] = vals.gather(1, last[:, None])[:, 0]
    return cutoff


def _logprobs(x: torch.Tensor, params: Sequence[SamplingParams], token_ids: torch.Tensor,
              ) -> list[TokenLogprobs | None]:
    n_max = max(p.logprobs for p in params)
    log_probs = torch.log_softmax(x, dim=-1)                              # [num_seqs, vocab]
    top_values, top_ids = torch.topk(log_probs, n_max, dim=-1)            # [num_seqs, n_max], sorted
    top_values, top_ids = top_values.cpu(), top_ids.cpu()
    chosen = log_probs.gather(1, token_ids[:, None])[:, 0].cpu()          # [num_seqs]
    ids = token_ids.cpu()
    out: list[TokenLogprobs | None] = []
    for i, p in enumerate(params):
        if p.logprobs == 0:
            out.append(None)
            continue
        out.append(TokenLogprobs(int(ids[i]), float(chosen[i]), tuple(top_ids[i, :p.logprobs].tolist()),
                                 tuple(top_values[i, :p.logprobs].tolist())))
    return out
