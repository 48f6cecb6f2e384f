"""Which decoder replica a prompt goes to, for its prefix cache (no torch, no Ray; dispatcher/prefix_router.py runs it
as Ray Serve's request router of the decoder replicas).

Each replica keeps its own prefix cache (vbert/kv_cache.py): a request reuses the KV blocks of a prompt prefix only on
the replica that computed them. So the router remembers, per replica, the chained hashes of the block-aligned prompt
prefixes it sent there (an LRU per replica, like the replica's own cache), and sends a prompt to the replica that holds
the longest prefix of it, unless that replica has more than `slack` requests in flight beyond the least loaded one's
(then the least loaded of the others within the slack: a shared system prompt must not pin every request to one
replica). A prompt that no replica has seen goes to the least loaded replica (ties broken at random). What the router
remembers can be stale (the replica evicted the blocks, or restarted): that costs a recompute, never a wrong answer.

The hashes are salted like the replica's cache (the adapter, and the tenant unless prefixes are shared globally), so
two tenants' equal prompts do not attract each other.
"""
from __future__ import annotations

import hashlib
import random
import weakref
from array import array
from collections import OrderedDict
from typing import Hashable, Mapping, Sequence


# this process's PrefixRouting objects, for the front door's metrics (routing_totals). Kept here, not beside the Ray
# router: Ray Serve pickles the router class by value (serve.status() does), with the globals its methods read.
_LIVE: "weakref.WeakSet[PrefixRouting]" = weakref.WeakSet()


def routing_totals() -> dict[str, int]:
    """The routing choices of this process's PrefixRouting objects together: "routed" (prompts ranked) and
    "to_cached_prefix" (of them, the first choice held part of the prompt's prefix)."""
    live = list(_LIVE)
    return {"routed": sum(r.routed for r in live), "to_cached_prefix": sum(r.routed_to_match for r in live)}


class PrefixRouting:
    """The router's memory of what each replica's prefix cache holds, and its choice (see the module docstring)."""

    def __init__(self, block_size: int = 16, slack: int = 4, max_blocks_per_replica: int = 1 << 16,
                 max_prompt_blocks: int = 1024, seed: int | None = None):
        if block_size < 1 or slack < 0 or max_blocks_per_replica < 1 or max_prompt_blocks < 1:
            raise ValueError(f"block_size, max_blocks_per_replica and max_prompt_blocks must be >= 1 and slack >= 0, "
                             f"got {block_size}, {max_blocks_per_replica}, {max_prompt_blocks}, {slack}")
        self.block_size, self.slack = block_size, slack
        self.max_blocks_per_replica, self.max_prompt_blocks = max_blocks_per_replica, max_prompt_blocks
        self._held: dict[Hashable, OrderedDict] = {}      # replica -> {prefix hash: None}, least recently sent first
        self._rng = random.Random(seed)
        self.routed = self.routed_to_match = 0           # requests chosen; of them, sent where a prefix was held
        _LIVE.add(self)

    def hashes(self, prompt_ids: Sequence[int], salt: bytes) -> list[bytes]:
        """The chained hashes of the prompt's full blocks, the last token excluded (a replica always computes it), at
        most max_prompt_blocks of them."""
        n = min((len(prompt_ids) - 1) // self.block_size, self.max_prompt_blocks)
        if n <= 0:
            return []
        data = array("q", prompt_ids[:n * self.block_size]).tobytes()
        step = 8 * self.block_size
        out, h = [], hashlib.blake2b(b"vbert-route:" + salt, digest_size=16).digest()
        for i in range(n):
            h = hashlib.blake2b(h + data[i * step:(i + 1) * step], digest_size=16).digest()
            out.append(h)
        return out

    def matched_blocks(self, replica: Hashable, hashes: Sequence[bytes]) -> int:
        """How many leading blocks of the prompt the router has sent to the replica."""
        held = self._held.get(replica)
        if not held:
            return 0
        n = 0
        for h in hashes:
            if h not in held:
                break
            n += 1
        return n

    def rank(self, hashes: Sequence[bytes], replicas: Sequence[Hashable],
             loads: Mapping[Hashable, int | None]) -> list[Hashable]:
        """The replicas in the order to try: first the one chosen (the longest held prefix among those within the
        slack of the least loaded, then the less loaded, then at random), then the others by load. loads: requests
        in flight per replica; None (unknown) counts as the least."""
        if not replicas:
            return []
        known = [v for v in (loads.get(r) for r in replicas) if v is not None]
        floor = min(known, default=0)
        load = {r: floor if loads.get(r) is None else loads[r] for r in replicas}
        ties = {r: self._rng.random() for r in replicas}
        eligible = [r for r in replicas if load[r] <= floor + self.slack]
        matched = {r: self.matched_blocks(r, hashes) for r in eligible}
        best = max(eligible, key=lambda r: (matched[r], -load[r], ties[r]))
        self.routed += 1
        self.routed_to_match += matched[best] > 0
        return [best] + sorted((r for r in replicas if r != best), key=lambda r: (load[r], ties[r]))

    def record(self, replica: Hashable, hashes: Sequence[bytes]) -> None:
        """The prompt went to the replica: its prefixes are held there now (the oldest forgotten past the bound)."""
        held = self._held.setdefault(replica, OrderedDict())
        for h in hashes:
            held[h] = None
            held.move_to_end(h)
        while len(held) > self.max_blocks_per_replica:
            held.popitem(last=False)

    def keep_only(self, replicas: Sequence[Hashable]) -> None:
        """Forget the replicas not among these (stopped or lost: a new replica starts with an empty cache)."""
        alive = set(replicas)
        for r in [r for r in self._held if r not in alive]:
            del self._held[r]

    def num_held(self, replica: Hashable) -> int:
        return len(self._held.get(replica, ()))
