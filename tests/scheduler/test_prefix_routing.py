"""The decoder replicas' prefix-aware choice (scheduler/prefix_routing.py), without Ray: the prompt goes where its
longest prefix was sent, within the load slack; unseen prompts go to the least loaded replica."""
from __future__ import annotations

import gc
import random

import pytest

from scheduler.prefix_routing import PrefixRouting, routing_totals

SYSTEM = list(range(100, 164))          # 64 tokens: four blocks of 16


def test_hashes_are_chained_salted_and_leave_the_last_token_out():
    r = PrefixRouting(block_size=16)
    assert r.hashes(list(range(16)), b"a") == []                      # the last token is always computed
    assert len(r.hashes(list(range(17)), b"a")) == 1
    a, b = r.hashes(SYSTEM + [1, 2, 3], b"t1"), r.hashes(SYSTEM + [9, 9], b"t1")
    assert len(a) == 4 and a == b                                    # same leading blocks, same hashes
    assert r.hashes(SYSTEM + [1], b"t2")[0] != a[0]                  # another tenant / adapter: another salt
    c = r.hashes([7] + SYSTEM[1:] + [1], b"t1")                       # a different first token changes every block
    assert all(x != y for x, y in zip(a, c))
    assert len(PrefixRouting(block_size=16, max_prompt_blocks=2).hashes(SYSTEM + [1], b"t1")) == 2


def test_a_prompt_goes_where_its_longest_prefix_went_within_the_slack():
    r = PrefixRouting(block_size=16, slack=2, seed=0)
    long, short = r.hashes(SYSTEM + [1], b"t"), r.hashes(SYSTEM[:32] + [5] * 20, b"t")
    r.record("a", long)
    r.record("b", short[:1])
    assert r.matched_blocks("a", short) == 2 and r.matched_blocks("b", short) == 1
    assert r.rank(short, ["a", "b", "c"], {"a": 2, "b": 0, "c": 0})[0] == "a"       # 2 more than the least: allowed
    assert r.rank(short, ["a", "b", "c"], {"a": 3, "b": 0, "c": 0})[0] == "b"       # beyond the slack: the next best
    assert r.rank(short, ["a", "b", "c"], {"a": 3, "b": 3, "c": 0})[0] == "c"       # nothing held within: least loaded
    order = r.rank(short, ["a", "b", "c"], {"a": 3, "b": 3, "c": 0})
    assert sorted(order) == ["a", "b", "c"]                                         # every replica, to fall back on
    assert r.rank(long, ["a", "b"], {"a": None, "b": 1})[0] == "a"     # unknown load counts as the least
    assert r.routed == 5 and r.routed_to_match == 3


def test_unseen_prompts_go_to_the_least_loaded_replica_and_spread_over_equals():
    r = PrefixRouting(block_size=4, slack=4, seed=1)
    h = r.hashes(list(range(30)), b"t")
    assert r.rank(h, ["a", "b", "c"], {"a": 3, "b": 1, "c": 2})[0] == "b"
    firsts = {r.rank(r.hashes([i] * 30, b"t"), ["a", "b", "c"], {"a": 0, "b": 0, "c": 0})[0] for i in range(40)}
    assert firsts == {"a", "b", "c"}


def test_what_a_replica_holds_is_bounded_and_forgotten_with_the_replica():
    r = PrefixRouting(block_size=4, max_blocks_per_replica=3)
    h = r.hashes(list(range(21)), b"t")                                # 5 blocks
    r.record("a", h)
    assert r.num_held("a") == 3 and r.matched_blocks("a", h) == 0      # the leading blocks went first
    r.record("a", h[:2])
    assert r.matched_blocks("a", h) == 2 and r.num_held("a") == 3
    r.keep_only(["b"])
    assert r.num_held("a") == 0 and r.matched_blocks("a", h) == 0


def test_routing_totals_add_up_the_live_routers_choices():
    """What the front door's metrics read (vbert_prefix_routed_total, vbert_prefix_to_cached_prefix_total): every
    live PrefixRouting of the process, a router gone takes its counts with it."""
    gc.collect()                                                     # other tests' routers gone before counting
    before = routing_totals()
    a, b = PrefixRouting(block_size=2, seed=0), PrefixRouting(block_size=2, seed=1)
    h = a.hashes([1, 2, 3, 4, 5], b"t/m")
    a.record("r0", h)
    for _ in range(3):
        a.rank(h, ["r0", "r1"], {"r0": 0, "r1": 0})                 # held on r0: to a cached prefix
    b.rank(b.hashes([7, 8, 9], b"t/m"), ["r0"], {"r0": 0})          # nothing held
    after = routing_totals()
    assert (after["routed"] - before["routed"], after["to_cached_prefix"] - before["to_cached_prefix"]) == (4, 3)
    del a, b
    gc.collect()
    assert routing_totals() == before


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="slack"):
        PrefixRouting(slack=-1)
    with pytest.raises(ValueError, match="block_size"):
        PrefixRouting(block_size=0)


def test_randomized_choices_keep_the_slack_and_take_the_longest_held_prefix():
    rng = random.Random(7)
    r = PrefixRouting(block_size=4, slack=3, seed=3)
    replicas = ["a", "b", "c", "d"]
    prefixes = [[rng.randrange(1000) for _ in range(24)] for _ in range(6)]
    for _ in range(2000):
        prompt = rng.choice(prefixes)[:rng.randrange(1, 25)] + [rng.randrange(1000) for _ in range(rng.randrange(9))]
        h = r.hashes(prompt, b"t")
        loads = {x: rng.choice([None, *range(8)]) for x in replicas}
        order = r.rank(h, replicas, loads)
        known = [v for v in loads.values() if v is not None]
        floor = min(known, default=0)
        load = {x: floor if loads[x] is None else loads[x] for x in replicas}
        eligible = [x for x in replicas if load[x] <= floor + 3]
        assert sorted(order) == replicas and order[0] in eligible
        assert r.matched_blocks(order[0], h) == max(r.matched_blocks(x, h) for x in eligible)
        r.record(order[0], h)
