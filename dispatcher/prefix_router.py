"""Ray Serve's request router for the decoder replicas with `decoder_routing = "prefix"` (the default): a prompt goes
to the replica whose prefix cache holds the longest prefix of it, within a load slack (the choice:
scheduler/prefix_routing.py). Imported only with decoder replicas (needs the `ray` extra).

It runs where the deployment's handle routes (the front door's process). Candidates are first narrowed as Ray's
default router narrows them for a multiplexed model id (the replicas that hold the request's adapter, else those
holding the fewest), then ranked by the prefix choice; Ray tries the ranks in order and takes the first replica with
room in its queue. A call that carries no prompt (stats) goes to the least loaded replica. Load: each replica's
requests in flight, counted from Ray's reports of each request accepted and finished (where Ray makes none, as
through Ray Client: its queue-length cache).
"""
from __future__ import annotations

import random
from collections import Counter, OrderedDict
from typing import List, Optional

from ray.serve.request_router import MultiplexMixin, PendingRequest, RequestRouter, RunningReplica

from scheduler.generation_policy import PREFIX_SHARING
from scheduler.prefix_routing import PrefixRouting


def prompt_of(pending_request: PendingRequest | None) -> tuple[str, dict] | None:
    """(multiplexed model id, row) of a DecoderReplica.generate call (args: model id, adapter, row), else None."""
    if pending_request is None or len(pending_request.args) < 3:
        return None
    model_id, _, row = pending_request.args[:3]
    if not isinstance(row, dict) or "prompt_ids" not in row:
        return None
    return str(model_id), row


class PrefixAffinityRouter(MultiplexMixin, RequestRouter):
    """See the module docstring. Ray calls initialize_state with the deployment's request_router_kwargs."""

    def initialize_state(self, block_size: int = 16, slack: int = 4, sharing: str = "tenant",
                         max_blocks_per_replica: int = 1 << 16, **_ignored):
        if sharing not in PREFIX_SHARING:
            raise ValueError(f"sharing must be one of {PREFIX_SHARING}, got {sharing!r}")
        self.routing = PrefixRouting(block_size, slack, max_blocks_per_replica)
        self.sharing = sharing
        self._in_flight: Counter = Counter()       # replica -> requests it accepted from this router, not finished
        self._placed: OrderedDict = OrderedDict()  # request id -> its replica (accepted, not finished)
        self._done_early: OrderedDict = OrderedDict()   # request ids finished before Ray reported them accepted
        self._pending: OrderedDict = OrderedDict()      # request id -> its prompt's hashes, until accepted
        self._counts_own = False                  # Ray reports acceptance (strict queues): count in flight ourselves

    def _loads(self, replicas: List[RunningReplica]) -> dict:
        """Requests in flight per replica: our own count where Ray reports acceptances, else Ray's queue-length
        cache (None where it has no fresh entry)."""
        if self._counts_own:
            return {r.replica_id: self._in_flight[r.replica_id] for r in replicas}
        return {r.replica_id: self._replica_queue_len_cache.get(r.replica_id) for r in replicas}

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        if pending_request is not None and pending_request.metadata.multiplexed_model_id:
            ids = self.apply_multiplex_routing(pending_request=pending_request)
            candidates = [r for r in candidate_replicas if r.replica_id in ids]
        else:
            candidates = list(candidate_replicas)
        if not candidates:
            return []
        found = prompt_of(pending_request)
        if found is None:                       # one rank: Ray takes the least loaded, equals in random order
            random.shuffle(candidates)
            return [candidates]
        model_id, row = found
        by_id = {r.replica_id: r for r in candidates}
        tenant = row.get("tenant_id", "") if self.sharing == "tenant" else "*"
        hashes = self.routing.hashes(row["prompt_ids"], f"{tenant}/{model_id}".encode())
        order = self.routing.rank(hashes, list(by_id), self._loads(candidates))
        if self._counts_own:
            _put(self._pending, pending_request.metadata.internal_request_id, hashes)
        else:                                   # no acceptance reports: the first choice takes it unless it is full
            self.routing.record(order[0], hashes)
        return [[by_id[rid]] for rid in order]

    def on_request_routed(self, pending_request: PendingRequest, replica_id, result) -> None:
        """Ray: the replica accepted the request (strict queues, the default outside Ray Client)."""
        self._counts_own = True
        rid = pending_request.metadata.internal_request_id
        hashes = self._pending.pop(rid, None)
        if hashes is not None:
            self.routing.record(replica_id, hashes)
        if self._done_early.pop(rid, None) is None:
            self._in_flight[replica_id] += 1
            _put(self._placed, rid, replica_id)

    def on_request_completed(self, replica_id, internal_request_id: str) -> None:
        if self._placed.pop(internal_request_id, None) is not None:
            self._in_flight[replica_id] -= 1
        else:                                   # finished before (or without) Ray's report that it was accepted
            _put(self._done_early, internal_request_id, True)

    def update_replicas(self, replicas: List[RunningReplica]):
        super().update_replicas(replicas)
        self.routing.keep_only([r.replica_id for r in replicas])

    def on_replica_actor_died(self, replica_id):
        super().on_replica_actor_died(replica_id)
        self.routing.keep_only(list(self._replicas))        # Ray has dropped it from its replicas
        for rid in [rid for rid, where in self._placed.items() if where == replica_id]:
            del self._placed[rid]               # its requests end with it
        self._in_flight.pop(replica_id, None)


def _put(d: OrderedDict, key, value, bound: int = 1 << 16) -> None:
    """d[key] = value, the oldest entries dropped past the bound (requests Ray never reported back)."""
    d[key] = value
    while len(d) > bound:
        d.popitem(last=False)
