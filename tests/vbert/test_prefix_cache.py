"""Prefix caching in the paged KV cache (the mechanism; the policy's use of it is in
tests/scheduler/test_generation_policy.py): registered blocks are shared by reference, released blocks keep
their contents until evicted (a sequence's last blocks first, least recently released first), salts and
tokens key them, and the free-block count stays the pool's truth throughout."""
from __future__ import annotations

import pytest

from vbert.device import DeviceContext
from vbert.kv_cache import KVCacheConfig, PagedKVCache

CPU = DeviceContext.create("cpu", "float32")
TOKENS = list(range(100, 130))       # 30 tokens: 7 full blocks of 4


def cache(num_blocks: int = 16) -> PagedKVCache:
    return PagedKVCache(KVCacheConfig(block_size=4, num_blocks=num_blocks), 1, 1, 2, CPU)


def computed(kv: PagedKVCache, seq, tokens, salt=b"t1", n=None) -> int:
    """A sequence that matched what it could, allocated the rest and computed n (default all) tokens."""
    n = len(tokens) if n is None else n
    hit = kv.match_prefix(seq, tokens[:-1], salt)
    kv.allocate(seq, len(tokens))
    kv.commit(seq, tokens, n)
    return hit


def test_a_computed_prefix_is_shared_by_reference_and_never_past_the_last_token():
    kv = cache()
    assert computed(kv, "a", TOKENS[:10]) == 0                     # nothing registered yet
    assert kv.num_cached_blocks == 2                               # 10 computed tokens fill 2 blocks of 4
    hit = kv.match_prefix("b", TOKENS[:10][:-1], b"t1")           # the same 10 tokens: blocks 0 and 1
    assert hit == 8 and kv.block_table("b") == kv.block_table("a")[:2]
    assert kv.match_prefix("c", TOKENS[:8][:-1], b"t1") == 4        # 8 tokens: its last block must be computed
    kv.allocate("b", 12)
    assert kv.block_table("b")[:2] == kv.block_table("a")[:2] and kv.block_table("b")[2] not in kv.block_table("a")
    used = kv.num_used_blocks
    kv.free("a")                                                   # b and c still hold the shared blocks
    assert kv.num_used_blocks == used - 1                          # only a's private third block came back
    assert kv.match_prefix("d", TOKENS[:12], b"t1") == 8


def test_salt_and_every_earlier_token_key_a_block():
    kv = cache()
    computed(kv, "a", TOKENS[:13])
    assert kv.match_prefix("other-tenant", TOKENS[:12], b"t2") == 0
    changed = TOKENS[:12]
    changed[5] = 7                                                  # block 1 differs: blocks 1 and 2 miss
    assert kv.match_prefix("b", changed, b"t1") == 4
    shifted = [1] + TOKENS[:11]                                     # same tokens, other positions: no hit
    assert kv.match_prefix("c", shifted, b"t1") == 0


def test_released_blocks_stay_cached_and_free_then_are_evicted_tail_first():
    kv = cache(num_blocks=8)
    computed(kv, "a", TOKENS[:16])                                  # 4 blocks, all registered
    kv.free("a")
    assert kv.num_free_blocks == 8 and kv.num_cached_blocks == 4    # free for allocation, contents kept
    kv.allocate("x", 4 * 5)                                         # 4 never-used blocks + 1 eviction
    assert kv.num_cached_blocks == 3 and kv.num_evicted_blocks == 1
    assert kv.match_prefix("b", TOKENS[:16][:-1], b"t1") == 12      # a's last block went first
    kv.free("b")
    kv.free("x")
    kv.allocate("y", 4 * 8)                                          # the whole pool: everything evicted
    assert kv.num_cached_blocks == 0 and kv.num_free_blocks == 0
    kv.free("y")
    assert kv.match_prefix("c", TOKENS[:16], b"t1") == 0


def test_matched_blocks_are_not_free_and_an_unmatched_release_returns_them():
    kv = cache(num_blocks=6)
    computed(kv, "a", TOKENS[:17])                                  # 5 blocks, 4 registered
    kv.free("a")
    assert kv.num_free_blocks == 6
    assert kv.match_prefix("b", TOKENS[:16], b"t1") == 16
    assert kv.num_free_blocks == 2                                  # 4 taken back by b
    with pytest.raises(ValueError, match="already holds"):
        kv.match_prefix("b", TOKENS[:16], b"t1")
    kv.free("b")
    assert kv.num_free_blocks == 6 and kv.num_cached_blocks == 4


def test_a_duplicate_computation_keeps_the_first_block_and_the_chain_goes_on():
    kv = cache()
    kv.match_prefix("a", TOKENS[:7], b"t1")
    kv.match_prefix("b", TOKENS[:7], b"t1")                          # both miss: both compute block 0
    kv.allocate("a", 8)
    kv.allocate("b", 12)
    kv.commit("a", TOKENS[:8], 5)                                    # a has computed its block 0 only
    kv.commit("b", TOKENS[:12], 12)                                  # b's block 0 stays private, 1 and 2 register
    assert kv.num_cached_blocks == 3
    hit = kv.match_prefix("c", TOKENS[:12], b"t1")
    assert hit == 12 and kv.block_table("c") == (kv.block_table("a")[0], *kv.block_table("b")[1:3])


def test_commit_registers_only_full_computed_blocks():
    kv = cache()
    kv.match_prefix("a", TOKENS[:19], b"t1")
    kv.allocate("a", 20)
    assert kv.commit("a", TOKENS[:20], 7) == 1                       # 7 computed: block 0 only
    assert kv.commit("a", TOKENS[:20], 7) == 0
    assert kv.commit("a", TOKENS[:20], 20) == 4
    kv.allocate("plain", 8)                                          # no match_prefix: never registered
    assert kv.commit("plain", TOKENS[:8], 8) == 0 and kv.num_cached_blocks == 5


def test_clearing_forgets_every_registered_block_and_keeps_the_held_ones():
    kv = cache(num_blocks=8)
    computed(kv, "a", TOKENS[:9])
    computed(kv, "b", TOKENS[:13])                                  # shares a's 2 blocks, registers a third
    kv.free("a")
    assert kv.clear_prefix_cache() == 3 and kv.num_cached_blocks == 0
    assert kv.num_free_blocks == 8 - 4                               # b still holds its 4
    assert kv.match_prefix("c", TOKENS[:12], b"t1") == 0
    kv.free("b")
    kv.free("c")
    kv.allocate("all", 4 * 8)
    assert sorted(kv.block_table("all")) == list(range(8))           # every block handed out exactly once


def check_invariants(kv: PagedKVCache) -> None:
    """Every block is in exactly one place (never-registered free, released-but-cached, or held), its reference
    count is the number of tables holding it, and the hash maps agree."""
    held: dict[int, int] = {}
    for table in kv._tables.values():
        for b in table:
            held[b] = held.get(b, 0) + 1
    free, released = set(kv._free), set(kv._released)
    assert len(free) == len(kv._free) and not free & released and not (free | released) & set(held)
    assert free | released | set(held) == set(range(kv.num_blocks))
    assert all(kv._refs[b] == held.get(b, 0) for b in range(kv.num_blocks))
    assert all(b in kv._hash_of for b in released)
    assert all(kv._hash_of[b] == h for h, b in kv._by_hash.items())
    assert kv.num_free_blocks + len(held) == kv.num_blocks


def test_random_sequences_keep_the_invariants():
    import random

    rng = random.Random(5)
    kv = cache(num_blocks=24)
    prefixes = [list(range(1000 * p, 1000 * p + 12)) for p in range(3)]
    live: dict[int, list[int]] = {}
    hits = 0
    for step in range(2000):
        op = rng.random()
        if op < 0.4 and len(live) < 8:
            seq = step
            tokens = rng.choice(prefixes)[:rng.randint(4, 12)] + [rng.randrange(50) for _ in range(rng.randint(1, 9))]
            hits += kv.match_prefix(seq, tokens[:-1], rng.choice([b"t1", b"t2"]))
            if kv.num_blocks_needed(seq, len(tokens)) > kv.num_free_blocks:
                kv.free(seq)
            else:
                kv.allocate(seq, len(tokens))
                kv.commit(seq, tokens, rng.randint(0, len(tokens)))
                live[seq] = tokens
        elif op < 0.7 and live:
            seq = rng.choice(list(live))
            grown = live[seq] + [rng.randrange(50) for _ in range(rng.randint(1, 5))]
            if kv.num_blocks_needed(seq, len(grown)) <= kv.num_free_blocks:
                kv.allocate(seq, len(grown))
                kv.commit(seq, grown, len(grown))
                live[seq] = grown
        elif live:
            seq = rng.choice(list(live))
            del live[seq]
            kv.free(seq)
        check_invariants(kv)
    assert kv.num_evicted_blocks > 0 and kv.num_cached_blocks > 0 and hits > 0
