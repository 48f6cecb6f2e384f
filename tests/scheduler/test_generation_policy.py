"""The generation policy (Orca): decode first, chunked prefill within the token budget, VTC-fair admission,
KV blocks as a hard budget with preemption and recompute, request-level (static) mode, cancellation."""
from __future__ import annotations

import pytest

from scheduler.generation_policy import GenerationScheduler, GenerationSchedulerConfig
from scheduler.policy import QueueFullError
from scheduler.types import Request, RequestStatus, RowResult, StepOutput
from vbert.device import DeviceContext
from vbert.kv_cache import KVCacheConfig, PagedKVCache

CPU = DeviceContext.create("cpu", "float32")


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def kv(num_blocks: int, block_size: int = 4) -> PagedKVCache:
    return PagedKVCache(KVCacheConfig(block_size=block_size, num_blocks=num_blocks), 1, 1, 2, CPU)


def req(tenant: int, prompt_len: int, max_new: int, deadline: float = 1e9, weight: float = 1.0) -> Request:
    return Request(tenant_id=tenant, adapter_id=None, deadline=deadline, prompt_ids=list(range(1, prompt_len + 1)),
                   max_new_tokens=max_new, weight=weight)


def run_step(s: GenerationScheduler, stop=lambda r, t: False):
    """Schedule one step, 'compute' it (token = 7 for rows that reach their last token) and update."""
    batch = s.schedule()
    results = tuple(RowResult(r.request.request_id, None,
                              7 if r.request.num_computed_tokens + r.num_tokens == r.request.num_tokens else None)
                    for r in batch.rows)
    done = s.update(batch, StepOutput(batch.step, results), stop)
    return batch, done


def test_decode_first_then_prefill_chunks_and_joins_at_once():
    s = GenerationScheduler(GenerationSchedulerConfig(max_tokens_per_step=8, max_running=4), kv(64))
    a = req(1, 3, 5)
    s.add(a)
    b1, _ = run_step(s)
    assert [(r.request, r.num_tokens) for r in b1.rows] == [(a, 3)] and a.output_ids == [7]
    long = req(2, 20, 2)
    s.add(long)                                   # joins the very next step, prefilled in chunks
    b2, _ = run_step(s)
    assert [(r.request, r.num_tokens) for r in b2.rows] == [(a, 1), (long, 7)]
    b3, _ = run_step(s)
    assert [(r.request, r.num_tokens) for r in b3.rows] == [(a, 1), (long, 7)]
    assert long.output_ids == []                  # no token until its prompt is computed
    b4, _ = run_step(s)
    assert [(r.request, r.num_tokens) for r in b4.rows] == [(a, 1), (long, 6)]
    assert long.output_ids == [7] and long.num_computed_tokens == 20
    b5, done = run_step(s)
    assert [(r.request, r.num_tokens) for r in b5.rows] == [(a, 1), (long, 1)]
    assert done == [a, long] and s.num_running == 0
    assert s.kv.num_free_blocks == 64             # every block back


def test_stop_callback_sees_every_token_and_finishes():
    s = GenerationScheduler(GenerationSchedulerConfig(), kv(16))
    r = req(1, 2, 10)
    s.add(r)
    seen = []
    _, done = run_step(s, lambda q, t: seen.append(t) or len(q.output_ids) == 3)
    assert not done
    run_step(s, lambda q, t: seen.append(t) or len(q.output_ids) == 3)
    _, done = run_step(s, lambda q, t: seen.append(t) or len(q.output_ids) == 3)
    assert done == [r] and r.status is RequestStatus.FINISHED and seen == [7, 7, 7]
    assert s.kv.num_free_blocks == 16


def test_vtc_admits_the_light_tenant_before_the_flooders_backlog():
    s = GenerationScheduler(GenerationSchedulerConfig(max_tokens_per_step=16, max_running=4), kv(256))
    flood = [req(1, 8, 50) for _ in range(10)]
    for r in flood:
        s.add(r)
    run_step(s)                                   # tenant 1: two requests prefilled, counter 16
    light = req(2, 8, 2)
    s.add(light)                                  # lifted to tenant 1's counter: no banked credit, no debt
    batch, _ = run_step(s)
    assert light in {r.request for r in batch.rows}
    assert sum(r.status is not RequestStatus.WAITING for r in flood) <= 3
    # from now on the two tenants' counters stay within one request's tokens of each other
    heavy = req(2, 8, 40)
    s.add(heavy)
    for _ in range(20):
        run_step(s)
        c = {t: v["virtual_counter"] for t, v in s.stats()["tenants"].items()}
        if s.num_waiting_for(2):
            assert abs(c[1] - c[2]) <= 16 + 8


def test_kv_pressure_preempts_the_newest_and_everything_finishes():
    # 12 blocks of 4 tokens; each request needs 4 + 12 = 16 tokens = 4 blocks at the end: 3 fit, 5 do not
    s = GenerationScheduler(GenerationSchedulerConfig(max_tokens_per_step=32, max_running=5), kv(12))
    reqs = [req(i, 4, 12) for i in range(5)]
    for r in reqs:
        s.add(r)
    finished, steps = [], 0
    while s.has_work and steps < 500:
        _, done = run_step(s)
        finished += done
        steps += 1
        assert s.kv.num_free_blocks >= 0
    assert sorted(r.request_id for r in finished) == sorted(r.request_id for r in reqs)
    assert all(len(r.output_ids) == 12 and r.status is RequestStatus.FINISHED for r in reqs)
    assert s.counts["preempted"] > 0
    assert max(r.metadata["num_preemptions"] for r in reqs[3:]) > 0   # the newest were preempted
    assert reqs[0].metadata["num_preemptions"] == 0                     # the oldest never
    assert s.kv.num_free_blocks == 12


def test_request_too_large_for_the_whole_cache_is_refused_at_add():
    s = GenerationScheduler(GenerationSchedulerConfig(), kv(4))
    with pytest.raises(ValueError, match="more than the whole cache"):
        s.add(req(1, 10, 10))                      # 20 tokens = 5 blocks > 4
    assert s.num_waiting == 0


def test_static_mode_admits_a_batch_only_when_idle_and_holds_early_finishers():
    s = GenerationScheduler(GenerationSchedulerConfig(max_tokens_per_step=64, max_running=2, mode="request"), kv(64))
    short, long = req(1, 4, 2), req(2, 4, 6)
    s.add(short)
    s.add(long)
    late = req(3, 4, 1)
    b1, _ = run_step(s)
    assert {r.request for r in b1.rows} == {short, long}
    s.add(late)
    leaves = []
    for _ in range(5):
        batch, done = run_step(s)
        assert late not in {r.request for r in batch.rows}     # nobody joins a running batch
        leaves.append(done)
    assert short.status is RequestStatus.FINISHED and leaves[:4] == [[], [], [], []]
    assert set(leaves[4]) == {short, long}                     # returned together when the batch ends
    batch, done = run_step(s)
    assert [r.request for r in batch.rows] == [late] and done == [late]


def test_cancel_frees_blocks_at_once_and_queue_limits():
    s = GenerationScheduler(GenerationSchedulerConfig(max_waiting=3, max_waiting_per_tenant=2), kv(32))
    a, b = req(1, 9, 5), req(2, 3, 5)
    s.add(a)
    s.add(b)
    run_step(s)
    assert s.kv.num_free_blocks < 32
    assert s.cancel(a.request_id) is a and a.status is RequestStatus.CANCELLED
    assert s.cancel(b.request_id) is b
    assert s.kv.num_free_blocks == 32 and s.num_running == 0 and s.cancel(a.request_id) is None
    s.add(req(1, 2, 2))
    s.add(req(1, 2, 2))
    with pytest.raises(QueueFullError, match="tenant 1"):
        s.add(req(1, 2, 2))
    s.add(req(2, 2, 2))
    with pytest.raises(QueueFullError, match="queue is full"):
        s.add(req(3, 2, 2))


def test_waiting_requests_expire_running_ones_do_not():
    clock = Clock()
    s = GenerationScheduler(GenerationSchedulerConfig(max_running=1), kv(32), clock=clock)
    running, waiting = req(1, 2, 5, deadline=1.0), req(2, 2, 5, deadline=1.0)
    s.add(running)
    s.add(waiting)
    run_step(s)
    clock.t = 2.0
    batch, _ = run_step(s)
    assert batch.dropped == (waiting,) and waiting.status is RequestStatus.EXPIRED
    assert running.status is RequestStatus.RUNNING


def test_config_is_validated():
    with pytest.raises(ValueError, match="mode"):
        GenerationSchedulerConfig(mode="static")
    with pytest.raises(ValueError, match="max_running"):
        GenerationSchedulerConfig(max_running=0)


class FlakyResidency:
    """Adapter 9's residency check raises until `broken` is cleared; the first request raises too."""

    def __init__(self):
        self.broken, self.resident, self.requested = True, set(), []

    def is_resident(self, adapter_id: int) -> bool:
        if adapter_id == 9 and self.broken:
            raise OSError("adapter store unreachable")
        return adapter_id in self.resident

    def request(self, adapter_ids):
        self.requested.extend(adapter_ids)
        if len(self.requested) == len(adapter_ids):    # the first request fails, as a full cache's might
            raise RuntimeError("adapter cache full")


def test_a_failing_residency_check_or_request_parks_its_tenant_and_the_others_go_on():
    clock, res = Clock(), FlakyResidency()
    s = GenerationScheduler(GenerationSchedulerConfig(max_tokens_per_step=16, max_running=4, residency_retry_s=1.0),
                            kv(64), residency=res, clock=clock)
    broken, waits, plain = req(1, 3, 2), req(2, 3, 2), req(3, 3, 2)
    broken.adapter_id, waits.adapter_id = 9, 5
    for r in (broken, waits, plain):
        s.add(r)
    b1, _ = run_step(s)                            # the check of adapter 9 raised: parked, not an error
    assert [r.request for r in b1.rows] == [plain] and s.stats()["num_waiting"] == 2
    assert res.requested == [9, 5]                 # both asked for once
    run_step(s)
    assert res.requested == [9, 5]                 # not again before residency_retry_s
    clock.t = 1.5
    run_step(s)
    assert res.requested == [9, 5, 9, 5]           # asked again after it (the first request had failed)
    res.resident.add(5)
    b3, _ = run_step(s)
    assert waits in [r.request for r in b3.rows] and broken.num_computed_tokens == 0
    res.broken = False
    res.resident.add(9)
    b4, _ = run_step(s)
    assert broken in [r.request for r in b4.rows]


def test_a_preempted_request_waits_again_under_its_deadline():
    clock = Clock()
    # 6 blocks of 4 tokens: two requests of 4 + 8 tokens (3 blocks each at the end) do not both fit early on
    s = GenerationScheduler(GenerationSchedulerConfig(max_tokens_per_step=32, max_running=2), kv(5), clock=clock)
    old, new = req(1, 4, 8, deadline=1e9), req(2, 4, 8, deadline=5.0)
    s.add(old)
    s.add(new)
    while not s.counts["preempted"]:
        run_step(s)
    assert new.status is RequestStatus.WAITING and new.metadata["num_preemptions"] == 1
    clock.t = 10.0                                  # past its deadline while waiting again: dropped
    batch, _ = run_step(s)
    assert batch.dropped == (new,) and new.status is RequestStatus.EXPIRED and s.num_waiting == 0
    while s.has_work:
        run_step(s)
    assert old.status is RequestStatus.FINISHED and s.kv.num_free_blocks == 5


# -- prefix caching ------------------------------------------------------------------------------------
def preq(tenant: int, prompt: list[int], max_new: int, adapter: int | None = None) -> Request:
    return Request(tenant_id=tenant, adapter_id=adapter, deadline=1e9, prompt_ids=list(prompt), max_new_tokens=max_new)


def finish(s: GenerationScheduler, *reqs: Request) -> None:
    for r in reqs:
        s.add(r)
    for _ in range(200):
        if not s.has_work:
            return
        run_step(s)
    raise AssertionError("did not finish")


SYSTEM = list(range(50, 71))             # a 21-token shared prefix: 5 full blocks of 4


def test_a_repeated_prefix_is_computed_once_and_the_rest_from_its_blocks():
    s = GenerationScheduler(GenerationSchedulerConfig(max_tokens_per_step=64), kv(64))
    first = preq(1, SYSTEM + [1, 2, 3], 2)
    finish(s, first)
    assert first.metadata["num_cached_tokens"] == 0
    second = preq(1, SYSTEM + [9, 8, 7, 6], 2)
    s.add(second)
    batch, _ = run_step(s)
    assert [(r.request, r.num_tokens) for r in batch.rows] == [(second, 25 - 20)]   # 5 blocks of the prefix reused
    assert second.metadata["num_cached_tokens"] == 20
    same = preq(1, SYSTEM + [9, 8, 7, 6], 2)    # the same prompt: everything but its last token is cached ...
    run_step(s)
    s.add(same)
    batch, _ = run_step(s)
    row = next(r for r in batch.rows if r.request is same)
    assert row.num_tokens == 1 and same.metadata["num_cached_tokens"] == 24   # ... which is computed for logits
    assert s.counts["prefix_hit_tokens"] == 20 + 24 and s.counts["prefix_queried_tokens"] == 23 + 24 + 24
    for _ in range(10):
        run_step(s)
    assert not s.has_work and s.kv.num_free_blocks == 64 and s.stats()["num_cached_blocks"] > 0


def test_prefixes_are_keyed_by_tenant_and_adapter_unless_shared_globally():
    for sharing, other_tenant_hit in (("tenant", 0), ("global", 20)):
        s = GenerationScheduler(GenerationSchedulerConfig(max_tokens_per_step=64, prefix_sharing=sharing), kv(64))
        finish(s, preq(1, SYSTEM + [1], 1))
        b, c, d = preq(2, SYSTEM + [2], 1), preq(1, SYSTEM + [3], 1, adapter=4), preq(1, SYSTEM + [3], 1)
        finish(s, b, c, d)
        assert b.metadata["num_cached_tokens"] == other_tenant_hit    # another tenant, the bare model
        assert c.metadata["num_cached_tokens"] == 0                   # an adapter's K/V differ
        assert d.metadata["num_cached_tokens"] == 20
    s = GenerationScheduler(GenerationSchedulerConfig(max_tokens_per_step=64, prefix_caching=False), kv(64))
    finish(s, preq(1, SYSTEM + [1], 1))
    again = preq(1, SYSTEM + [1], 1)
    finish(s, again)
    assert again.metadata["num_cached_tokens"] == 0 and s.kv.num_cached_blocks == 0
    with pytest.raises(ValueError, match="prefix_sharing"):
        GenerationSchedulerConfig(prefix_sharing="everyone")


def test_a_preempted_request_recomputes_only_past_its_registered_blocks():
    # 10 blocks of 4: two requests of 8 prompt + 16 new tokens (6 blocks each at the end) cannot both finish
    s = GenerationScheduler(GenerationSchedulerConfig(max_tokens_per_step=32, max_running=2), kv(10))
    old, new = preq(1, list(range(1, 9)), 16), preq(2, list(range(11, 19)), 16)
    s.add(old)
    s.add(new)
    readmitted = []
    for _ in range(200):
        if not s.has_work:
            break
        was_waiting = new.status is RequestStatus.WAITING and new.metadata["num_preemptions"] > 0
        batch, _ = run_step(s)
        if was_waiting and new in batch.admitted:
            readmitted.append((new.num_computed_tokens - next(r.num_tokens for r in batch.rows if r.request is new),
                               new.num_tokens))
    assert new.metadata["num_preemptions"] > 0 and readmitted
    cached, total = readmitted[0]
    assert cached > 0 and cached % 4 == 0 and cached <= total - 1     # not recomputed from its first token
    assert len(old.output_ids) == 16 and len(new.output_ids) == 16 and s.kv.num_free_blocks == 10


def test_admission_without_blocks_gives_matched_blocks_back():
    s = GenerationScheduler(GenerationSchedulerConfig(max_tokens_per_step=64, max_running=4), kv(12))
    finish(s, preq(1, SYSTEM + [1], 1))                                # 22 computed tokens: 5 blocks registered
    s.kv.allocate("outside", 4 * 8)                                    # 7 never-used blocks and 1 evicted
    assert s.kv.num_free_blocks == 4 and s.kv.num_cached_blocks == 4
    waiting = preq(1, SYSTEM + list(range(300, 312)), 1)               # 16 tokens cached, 5 more blocks needed
    s.add(waiting)
    run_step(s)
    assert waiting.status is RequestStatus.WAITING and waiting.num_computed_tokens == 0
    assert not s.kv.has_sequence(waiting.request_id)
    assert s.kv.num_free_blocks == 4 and s.kv.num_cached_blocks == 4   # given back, still cached
    s.kv.free("outside")
    batch, _ = run_step(s)
    assert [(r.request, r.num_tokens) for r in batch.rows] == [(waiting, 33 - 16)]


def test_a_follow_up_turn_reuses_the_blocks_of_the_previous_answer():
    s = GenerationScheduler(GenerationSchedulerConfig(max_tokens_per_step=64), kv(64))
    turn1 = preq(1, list(range(100, 113)), 8)                  # 13 prompt tokens, 8 generated (7 computed)
    finish(s, turn1)
    assert len(turn1.output_ids) == 8
    turn2 = preq(1, turn1.prompt_ids + turn1.output_ids + [300, 301, 302], 2)   # the conversation so far, then more
    finish(s, turn2)
    assert turn2.metadata["num_cached_tokens"] == 20           # 13 + 7 computed tokens: 5 blocks, answer included


def test_random_admissions_cancellations_and_preemptions_keep_the_blocks_consistent():
    import random

    from tests.vbert.test_prefix_cache import check_invariants

    rng = random.Random(11)
    s = GenerationScheduler(GenerationSchedulerConfig(max_tokens_per_step=24, max_running=6), kv(16))
    prefixes = [list(range(500 * p, 500 * p + 10)) for p in range(3)]
    sent = []
    for step in range(400):
        if step < 300 and rng.random() < 0.5:
            prompt = rng.choice(prefixes)[:rng.randint(3, 10)] + [rng.randrange(1, 40) for _ in range(rng.randint(1, 6))]
            r = preq(rng.randrange(3), prompt, rng.randint(1, 12), adapter=rng.choice([None, None, 2]))
            s.add(r)
            sent.append(r)
        if sent and rng.random() < 0.1:
            s.cancel(rng.choice(sent).request_id)
        run_step(s)
        check_invariants(s.kv)
    for _ in range(300):
        if not s.has_work:
            break
        run_step(s)
        check_invariants(s.kv)
    assert not s.has_work and s.kv.num_free_blocks == 16
    done = [r for r in sent if r.status is RequestStatus.FINISHED]
    assert all(len(r.output_ids) == r.max_new_tokens for r in done) and len(done) > len(sent) // 2
    assert s.counts["preempted"] > 0 and s.counts["prefix_hit_tokens"] > 0 and s.counts["cancelled"] > 0
