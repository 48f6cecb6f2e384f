"""vbert.sampling: SamplingParams validation and the batched sampler against its Semantics."""
from __future__ import annotations

import math

import pytest
import torch

from vbert.sampling import SamplingParams, _adjusted, sample, step_generator


def _logits(num_seqs: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_seqs, vocab, generator=g) * 3                  # [num_seqs, vocab]


def _reference_row(x: torch.Tensor, p: SamplingParams, step: int) -> int:
    """The docstring's Semantics for one row, in plain Python lists."""
    x = x.float()
    if p.temperature < 1e-5:
        return int(torch.argmax(x))
    z = (x / p.temperature).tolist()
    kept = list(range(len(z)))
    if 0 < p.top_k < len(z):
        kth = sorted(z, reverse=True)[p.top_k - 1]
        kept = [i for i in kept if z[i] >= kth]
    top = max(z[i] for i in kept)
    weights = {i: math.exp(z[i] - top) for i in kept}
    total = math.fsum(weights.values())
    q = {i: w / total for i, w in weights.items()}
    if p.top_p < 1:
        mass, cutoff = 0.0, None
        for value in sorted(q.values(), reverse=True):
            if mass < p.top_p:
                cutoff = value
            mass += value
        kept = [i for i in kept if q[i] >= cutoff]
    if p.min_p > 0:
        top = max(q[i] for i in kept)
        kept = [i for i in kept if q[i] >= p.min_p * top]
    u = torch.rand(1, dtype=torch.float64, generator=step_generator(p.seed, step)).item()
    target, cum = u * math.fsum(q[i] for i in kept), 0.0
    for i in kept:
        cum += q[i]
        if cum > target:
            return i
    return kept[-1]


def test_greedy_equals_argmax():
    x = _logits(6, 50, 0)
    ids, logprobs = sample(x, [SamplingParams(temperature=0)] * 6, [0] * 6)
    assert ids.tolist() == torch.argmax(x, dim=-1).tolist()
    assert ids.dtype == torch.int64 and logprobs is None


def test_near_zero_temperature_and_top_k_1_equal_greedy():
    x = _logits(8, 100, 1)
    greedy = torch.argmax(x, dim=-1).tolist()
    for params in (SamplingParams(temperature=1e-4, seed=3),
                   SamplingParams(temperature=1.5, top_k=1, seed=4)):
        for step in range(5):
            assert sample(x, [params] * 8, [step] * 8)[0].tolist() == greedy


def test_matches_semantics_reference():
    x = _logits(12, 40, 2)
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, seed=s)
              for s, (t, k, p) in enumerate([(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.6), (0.9, 10, 0.8),
                                             (0.0, 0, 1.0), (2.0, 3, 0.3)] * 2)]
    for step in range(4):
        got = sample(x, params, [step] * 12)[0].tolist()
        assert got == [_reference_row(x[i], params[i], step) for i in range(12)]


def test_matches_semantics_reference_large_vocab():
    """Top-p among the first candidates (peaked rows) and by a full sort (flat rows), top-k > 64."""
    peaked, flat = _logits(3, 3000, 8) * 3, _logits(3, 3000, 9) * 0.1
    x = torch.cat([peaked, flat])
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=1),
              SamplingParams(top_k=200, top_p=0.95, seed=2),
              SamplingParams(top_k=100, seed=3), SamplingParams(top_p=0.5, seed=4),
              SamplingParams(top_k=300, top_p=0.99, seed=5), SamplingParams(temperature=0.5, seed=6)]
    for step in range(3):
        got = sample(x, params, [step] * 6)[0].tolist()
        assert got == [_reference_row(x[i], params[i], step) for i in range(6)]


def test_ties_at_the_top_k_boundary_are_kept():
    x = torch.tensor([[1.0, 1.0, 1.0, 0.0, -1.0]]).repeat(300, 1)
    params = [SamplingParams(top_k=2, seed=s) for s in range(300)]
    assert set(sample(x, params, [0] * 300)[0].tolist()) == {0, 1, 2}


def test_top_p_keeps_smallest_set_with_mass_at_least_p():
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])                   # sorted: 1, 3, 4, 2, 0
    x = probs.log()[None, :].repeat(400, 1)                               # [400, 5]
    for top_p, support in [(0.4, {1}), (0.5, {1, 3}), (0.7, {1, 3}), (0.71, {1, 3, 4}), (0.85, {1, 3, 4}),
                           (0.9, {1, 3, 4, 2}), (1.0, {0, 1, 2, 3, 4}), (1e-6, {1})]:
        params = [SamplingParams(top_p=top_p, seed=s) for s in range(400)]
        drawn = set(sample(x, params, [0] * 400)[0].tolist())
        assert drawn == support, top_p


def test_min_p_keeps_the_tokens_at_least_min_p_as_likely_as_the_top_one_after_top_k_and_top_p():
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    x = probs.log()[None, :].repeat(400, 1)
    for kwargs, support in [(dict(min_p=0.3), {1, 3, 4}), (dict(min_p=0.2), {1, 2, 3, 4}), (dict(min_p=1.0), {1}),
                            (dict(min_p=0.3, top_k=2), {1, 3}), (dict(min_p=0.74, top_k=2), {1, 3}),   # 0.3 / 0.4 = 0.75
                            (dict(min_p=0.8, top_k=2), {1})]:
        params = [SamplingParams(seed=s, **kwargs) for s in range(400)]
        assert set(sample(x, params, [0] * 400)[0].tolist()) == support, kwargs
    mixed = [SamplingParams(seed=s, temperature=0.8, min_p=0.1 * (s % 4), top_p=0.9 if s % 3 else 1.0)
             for s in range(12)]
    y = _logits(12, 40, 5)
    for step in range(3):                                                # against the Semantics, in a mixed batch
        got = sample(y, mixed, [step] * 12)[0].tolist()
        assert got == [_reference_row(y[i], mixed[i], step) for i in range(12)]


def test_top_k_keeps_the_k_most_likely():
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    x = probs.log()[None, :].repeat(300, 1)
    params = [SamplingParams(top_k=2, seed=s) for s in range(300)]
    assert set(sample(x, params, [0] * 300)[0].tolist()) == {1, 3}


def test_same_seed_same_tokens_alone_or_in_any_batch():
    vocab, num_steps = 64, 12
    target = _logits(num_steps, vocab, 5)                                 # request A's logits per step
    a = SamplingParams(temperature=1.2, top_k=20, top_p=0.9, seed=1234)
    alone = [sample(target[t:t + 1], [a], [t])[0].item() for t in range(num_steps)]
    for position, num_mates in [(0, 3), (2, 4), (7, 7)]:
        got = []
        for t in range(num_steps):
            mates = _logits(num_mates, vocab, 100 + t * 7 + position)
            x = torch.cat([mates[:position], target[t:t + 1], mates[position:]])
            params = ([SamplingParams(temperature=0.8, seed=9 + m) for m in range(position)] + [a]
                      + [SamplingParams(temperature=0.0)] * (num_mates - position))
            steps = [t + 3] * position + [t] + [0] * (num_mates - position)
            got.append(sample(x, params, steps)[0][position].item())
        assert got == alone
    # another seed draws differently at some step (the seed matters)
    b = SamplingParams(temperature=1.2, top_k=20, top_p=0.9, seed=4321)
    assert [sample(target[t:t + 1], [b], [t])[0].item() for t in range(num_steps)] != alone


def test_ties_do_not_make_a_row_depend_on_its_batch_mates():
    """Logits with many exact ties (as from a quantized model): top-k and top-p cut through tie groups,
    and the batch-mates change the number of candidates the sampler looks at."""
    vocab = 500
    g = torch.Generator().manual_seed(11)
    target = torch.randint(0, 6, (8, vocab), generator=g).float()         # [steps, vocab], 6 distinct values
    a = SamplingParams(temperature=0.7, top_k=30, top_p=0.6, seed=77)
    alone = [sample(target[t:t + 1], [a], [t])[0].item() for t in range(8)]
    for mate in (SamplingParams(top_k=400, top_p=0.99, seed=1), SamplingParams(top_p=0.3, seed=2),
                 SamplingParams(top_k=3, seed=3)):
        got = [sample(torch.cat([_logits(2, vocab, t), target[t:t + 1]]), [mate, mate, a],
                      [t, 0, t])[0][2].item() for t in range(8)]
        assert got == alone
    assert alone == [_reference_row(target[t], a, t) for t in range(8)]


def test_unseeded_requests_get_a_random_seed():
    seeds = {SamplingParams().seed for _ in range(5)}
    assert len(seeds) == 5 and all(isinstance(s, int) for s in seeds)
    p = SamplingParams(temperature=1.0)
    x = _logits(1, 1000, 6)
    assert sample(x, [p], [0])[0].item() == sample(x, [p], [0])[0].item()


def test_empirical_frequencies_match_softmax():
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0])
    temperature, n = 0.8, 6000
    expected = torch.softmax(logits / temperature, dim=-1) * n
    params = [SamplingParams(temperature=temperature, seed=s) for s in range(n // 2)]
    x = logits[None, :].repeat(n // 2, 1)                                 # [n / 2, 5]
    ids = torch.cat([sample(x, params, [step] * (n // 2))[0] for step in (0, 1)])
    counts = torch.bincount(ids, minlength=5).double()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 25.0, (counts.tolist(), expected.tolist())             # 4 dof: p ~ 5e-5


def test_logprobs():
    x = _logits(3, 30, 7)
    params = [SamplingParams(temperature=0, logprobs=3), SamplingParams(seed=1),
              SamplingParams(seed=2, logprobs=20)]
    ids, logprobs = sample(x, params, [0, 0, 0])
    ref = torch.log_softmax(x, dim=-1)
    assert logprobs[1] is None
    lp0 = logprobs[0]
    assert lp0.token_id == ids[0].item() == lp0.top_ids[0]
    assert list(lp0.top_ids) == torch.argsort(ref[0], descending=True)[:3].tolist()
    assert lp0.top_logprobs == pytest.approx(ref[0].sort(descending=True).values[:3].tolist())
    assert logprobs[2].logprob == pytest.approx(ref[2, ids[2]].item())
    assert len(logprobs[2].top_ids) == 20
    assert math.fsum(math.exp(v) for v in logprobs[2].top_logprobs) <= 1 + 1e-6


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(top_k=1.5), "top_k"), (dict(top_p=0), "top_p"),
    (dict(top_p=1.01), "top_p"), (dict(seed="x"), "seed"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(stop_token_ids=(1, -2)), "stop_token_ids"),
    (dict(stop=("ok", "")), "stop"), (dict(stop="STOP"), "stop"), (dict(logprobs=21), "logprobs"),
    (dict(logprobs=-1), "logprobs"), (dict(min_p=-0.1), "min_p"), (dict(min_p=1.5), "min_p"),
    (dict(min_p=float("nan")), "min_p"), (dict(min_tokens=-1), "min_tokens"), (dict(min_tokens=True), "min_tokens"),
    (dict(min_tokens=17, max_new_tokens=16), "min_tokens"),
])
def test_validation_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_params_are_frozen_and_normalized():
    p = SamplingParams(stop=["a", "b"], stop_token_ids=[2], seed=5)
    assert p.stop == ("a", "b") and p.stop_token_ids == (2,) and p.seed == 5
    with pytest.raises(Exception):
        p.temperature = 0.5  # type: ignore[misc]


def test_shape_errors():
    with pytest.raises(ValueError, match="num_seqs"):
        sample(torch.zeros(4), [SamplingParams()], [0])
    with pytest.raises(ValueError, match="params"):
        sample(torch.zeros(2, 4), [SamplingParams()], [0])


def _reference_penalties(x: torch.Tensor, p: SamplingParams, prompt: list[int], generated: list[int]) -> list[float]:
    """The Semantics' penalties for one row, in plain Python."""
    z = x.float().tolist()
    r = p.repetition_penalty
    for t in set(prompt) | set(generated):
        z[t] = z[t] / r if z[t] > 0 else z[t] * r
    for t in set(generated):
        z[t] -= p.frequency_penalty * generated.count(t) + p.presence_penalty
    for t, bias in p.logit_bias:
        z[t] += bias
    return z


def test_penalties_follow_the_semantics_row_by_row_and_leave_logprobs_to_the_model():
    x = _logits(6, 40, 7)
    prompt, generated = [3, 5, 5, 9], [5, 11, 11, 11, 2]
    params = [SamplingParams(temperature=0, frequency_penalty=1.5),
              SamplingParams(temperature=0, presence_penalty=-2.0, logprobs=3),
              SamplingParams(temperature=0, repetition_penalty=1.7),
              SamplingParams(temperature=0.8, seed=4, presence_penalty=0.5, frequency_penalty=0.3,
                             repetition_penalty=0.6, logit_bias={5: 4.0, 39: -100}),
              SamplingParams(temperature=0),                                   # no penalty: no history needed
              SamplingParams(temperature=0, logit_bias=((int(torch.argmax(x[5])), -100.0), (0, 2.5)))]   # nor here
    history = [(prompt, generated)] * 4 + [None, None]
    ids, logprobs = sample(x, params, [len(generated)] * 6, history)
    adjusted = _adjusted(x, params, history)                                 # the logits the rows decide on
    for i, p in enumerate(params[:4] + params[5:]):
        row = i if i < 4 else 5
        hist = (prompt, generated) if i < 4 else ([], [])
        assert adjusted[row].tolist() == pytest.approx(_reference_penalties(x[row], p, *hist), abs=1e-6, rel=1e-6)
    assert torch.equal(adjusted[4], x[4]) and not torch.equal(adjusted, x)
    for i, p in enumerate(params[:4]):
        z = torch.tensor(_reference_penalties(x[i], p, prompt, generated))
        assert ids[i].item() == _reference_row(z, p, len(generated)), i
    assert ids[4].item() == int(torch.argmax(x[4]))
    assert ids[5].item() != int(torch.argmax(x[5]))                          # the greedy choice, banned
    # a large frequency penalty steers greedy away from the token generated three times
    top = int(torch.argmax(x[0]))
    steered = sample(x[:1], [SamplingParams(temperature=0, frequency_penalty=2.0)], [3], [([], [top] * 3)])[0]
    assert steered.item() != top
    # logprobs are the model's distribution (before penalties), of the token the penalized row picked
    assert logprobs[1].top_logprobs == pytest.approx(torch.log_softmax(x[1], -1).topk(3).values.tolist(), abs=1e-5)
    assert logprobs[1].token_id == ids[1].item()
    with pytest.raises(ValueError, match="history"):
        sample(x[:1], params[:1], [0])


def test_penalty_validation_names_the_field():
    for kwargs, name in ((dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=-3), "frequency_penalty"),
                         (dict(frequency_penalty=float("nan")), "frequency_penalty"),
                         (dict(repetition_penalty=0), "repetition_penalty"),
                         (dict(repetition_penalty=float("inf")), "repetition_penalty"),
                         (dict(presence_penalty=True), "presence_penalty")):
        with pytest.raises(ValueError, match=name):
            SamplingParams(**kwargs)
    assert not SamplingParams().has_penalties and SamplingParams(repetition_penalty=1.1).has_penalties
    for bias, match in (({3: 101}, "logit_bias"), ({-1: 1.0}, "logit_bias"), (((3, 1.0), (3, 2.0)), "twice"),
                        ({3: "x"}, "logit_bias"), ([3], "logit_bias")):
        with pytest.raises(ValueError, match=match):
            SamplingParams(logit_bias=bias)
    assert SamplingParams(logit_bias={7: -1, 2: 100}).logit_bias == ((2, 100.0), (7, -1.0))
    with pytest.raises(ValueError, match="outside the vocabulary"):                # the sampler checks the vocab too
        sample(_logits(1, 10, 0), [SamplingParams(temperature=0, logit_bias={10: 1.0})], [0])


def test_suppressed_tokens_are_never_drawn_and_logprobs_stay_the_models():
    """min_tokens' mechanism: suppress[i] takes token ids out of row i's draw (greedy takes the next best; a sampling
    row never draws them), other rows and the logprobs are untouched; ids outside the vocabulary are ignored."""
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    logits[:, 7] = 30.0                                         # token 7 is every row's overwhelming favourite
    before = logits.clone()
    greedy, hot = SamplingParams(temperature=0, logprobs=2), SamplingParams(temperature=1.0, seed=3)
    params = [greedy, hot, greedy]
    suppress = [(7, 1000), (7,), None]
    second = int(torch.topk(logits[0], 2).indices[1])
    for step in range(20):
        ids, lps = sample(logits, params, [step] * 3, suppress=suppress)
        assert int(ids[0]) == second and int(ids[1]) != 7 and int(ids[2]) == 7
        assert lps[0].top_ids[0] == 7 and lps[0].logprob == pytest.approx(float(torch.log_softmax(logits[0], -1)[second]))
    assert torch.equal(logits, before)                          # the caller's logits are not written
    assert sample(logits, params, [0] * 3)[0].tolist()[0] == 7  # without suppress the favourite wins
    with pytest.raises(ValueError, match="suppress"):
        sample(logits, params, [0] * 3, suppress=[(7,)])


def test_allowed_tokens_bound_every_draw_and_win_over_suppress():
    """Structured output's mechanism: allowed [rows, vocab] keeps each row to its tokens (greedy: the best allowed;
    sampling: never outside), a row allowed everything is untouched, and where suppress (min_tokens) would leave a
    row nothing, the grammar's tokens stay drawable."""
    torch.manual_seed(1)
    logits = torch.randn(3, 40)
    allowed = torch.ones(3, 40, dtype=torch.bool)
    allowed[0] = False
    allowed[0, [3, 5, 9]] = True
    allowed[1] = False
    allowed[1, [2]] = True                                  # only token 2, which suppress takes away
    greedy, hot = SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=5)
    best = max((3, 5, 9), key=lambda t: float(logits[0, t]))
    for step in range(30):
        ids = sample(logits, [greedy, greedy, hot], [step] * 3, suppress=[None, (2,), None], allowed=allowed)[0]
        assert ids.tolist()[:2] == [best, 2]
    hot_rows = {int(sample(logits, [hot, hot, hot], [s] * 3, allowed=allowed)[0][0]) for s in range(40)}
    assert hot_rows <= {3, 5, 9} and len(hot_rows) > 1
    free = sample(logits, [greedy] * 3, [0] * 3)[0]
    assert int(sample(logits, [greedy] * 3, [0] * 3, allowed=allowed)[0][2]) == int(free[2])
    with pytest.raises(ValueError, match="allowed"):
        sample(logits, [greedy] * 3, [0] * 3, allowed=allowed[:2])
