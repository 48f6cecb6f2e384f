"""Scale-out of generation, the front door's side: the decoder's engine runs as Ray Serve replicas
(dispatcher/replica.py, DecoderReplica).

Imported only when `decoder_replicas` > 0. ReplicaGeneration has the surface of
scheduler.generation_engine.GenerationEngine that the edge uses (submit_async -> a GenerationStream, cancel, start,
stop, is_accepting, num_pending), so gRPC Generate and the OpenAI-compatible API run unchanged in front of it.
Each request is one streaming Ray call with `multiplexed_model_id` = its adapter's id and version (Ray routes it
to a replica that holds the adapter; the adapter's files travel with the call as an object reference, as for the
encoder); the replica's events are relayed into the request's stream as they come.

- Admission: submit_async returns once the replica's engine has queued the request, so a request too long for
  the replica's KV cache or a full queue is refused before the call's first message (ValueError, QueueFullError),
  as in one process.
- Faults: a call whose replica is lost before it accepted the request is sent once more; once tokens have been
  streamed it is not (sampling is not replayed): the stream ends with UnavailableError (UNAVAILABLE, retry).
- Cancellation: the caller leaving cancels the Ray call; the replica cancels the request, freeing its KV blocks.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from concurrent.futures import Future

from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError

from manager.manager import Manager
from scheduler.engine import EngineStoppedError, RequestFailedError
from scheduler.generation_engine import FinishReason, GenerationResult, GenerationStream
from scheduler.policy import QueueFullError
from scheduler.prefix_routing import routing_totals
from scheduler.types import Request
from vbert.sampling import SamplingParams

from .config import ScaleOutConfig, ServerConfig
from .errors import UnavailableError
from .replica import decoder_deployment
from .scaleout import (REPLICA_LOST, AdapterFiles, FrontDoorEngine, deploy, replica_server_config,
                       row_error)

log = logging.getLogger("vbert.scaleout")


class ReplicaGeneration(FrontDoorEngine):
    """The decoder's engine on Ray Serve replicas, as seen by the edge (see the module docstring)."""

    def __init__(self, config: ScaleOutConfig, handle, files: AdapterFiles, lease, on_finish=None):
        super().__init__(config, handle, files, lease, "scaleout-generation")
        self.on_finish = on_finish
        self._relays: dict[int, Future] = {}     # request id -> its relay (every request not finished)
        self._stopped: EngineStoppedError | None = None   # set by stop(): what the relays it cancels end with

    @property
    def num_pending(self) -> int:
        """Requests not finished; a request leaves before its stream's last item is put, so a caller that has read
        the end never counts its own request."""
        return len(self._relays)

    def _end_left(self) -> int:
        with self._lock:
            left = list(self._relays.values())
        self._stopped = EngineStoppedError("the server stopped before this request finished")
        for relay in left:
            relay.cancel()
        return len(left)

    def routed_counts(self) -> dict[str, int] | None:
        """decoder_routing = "prefix": requests the front door's router ranked by prompt, and of them those sent to a
        replica holding part of the prompt's prefix (the router: dispatcher/prefix_router.py, in this process); None
        with another routing."""
        return routing_totals() if self.config.routing == "prefix" else None

    def replica_stats(self, timeout: float = 10) -> dict:
        """engine_stats of one replica, Ray's choice (a probe: tests call it until each replica answered)."""
        return self.handle.engine_stats.remote().result(timeout_s=timeout)

    # -- submission --------------------------------------------------------------------------------
    async def submit_async(self, request: Request, sampling: SamplingParams, *,
                           ignore_eos: bool = False) -> GenerationStream:
        """Like GenerationEngine.submit_async: returns the request's stream once a replica has queued it; raises what
        the replica refused it with (ValueError: too long; QueueFullError), or UnavailableError."""
        if not self._is_accepting:
            raise EngineStoppedError("the engine is not accepting requests (draining or stopped)")
        stream = GenerationStream(request, asyncio.get_running_loop())
        accepted: Future = Future()
        relay = asyncio.run_coroutine_threadsafe(self._relay(request, sampling, ignore_eos, stream, accepted),
                                                 self._loop)
        with self._lock:
            self._relays[request.request_id] = relay
        relay.add_done_callback(lambda _f, rid=request.request_id: self._forget(rid))
        try:
            await asyncio.wrap_future(accepted)
        except BaseException:
            relay.cancel()
            raise
        return stream

    def cancel(self, request_id: int) -> bool:
        """Cancel a request: its Ray call is cancelled (the replica frees its KV blocks) and its stream ends with a
        CANCELLED result. False if it is unknown or finished."""
        with self._lock:
            relay = self._relays.get(request_id)
        return relay is not None and relay.cancel()

    def _forget(self, request_id: int) -> None:
        with self._lock:
            self._relays.pop(request_id, None)

    # -- the calls (on the loop thread) ----------------------------------------------------------------
    async def _relay(self, req: Request, sampling: SamplingParams, ignore_eos: bool, stream: GenerationStream,
                     accepted: Future) -> None:
        text, token_ids, started = [], [], time.monotonic()
        try:
            model_id, adapter = await asyncio.to_thread(self.files.get, req.adapter_id)
            handle = self.handle.options(stream=True)
            if self.config.routing != "any":
                handle = handle.options(multiplexed_model_id=model_id)
            for attempt in range(2):
                row = {"tenant_id": req.tenant_id, "prompt_ids": list(req.prompt_ids), "weight": req.weight,
                       "max_new_tokens": req.max_new_tokens, "remaining_s": req.deadline - time.monotonic(),
                       "sampling": sampling, "ignore_eos": ignore_eos}
                self.stats.calls += 1
                self.stats.rows += 1
                events = handle.generate.remote(model_id, adapter, row)
                try:
                    async for item in events:
                        if not accepted.done():
                            if item[0] == "error":
                                raise ValueError(item[2]) if item[1] == "ValueError" else row_error(item[1], item[2])
                            self.stats.rows_per_replica[item[1]] += 1
                            accepted.set_result(None)
                        elif isinstance(item, tuple):
                            raise row_error(item[1], item[2])
                        elif isinstance(item, GenerationResult):
                            result = dataclasses.replace(item, request_id=req.request_id)
                            if self.on_finish is not None:
                                self.on_finish(req, result)
                            self._forget(req.request_id)     # not pending once its caller can see the end
                            stream.put(result)
                            return
                        else:
                            text.append(item.text)
                            token_ids.extend(item.token_ids)
                            stream.put(item)
                    raise RequestFailedError("the decoder replica ended the stream without a result")
                except asyncio.CancelledError:
                    events.cancel()      # Ray cancels the replica's generator: it cancels the request there
                    raise
                except REPLICA_LOST as e:
                    if attempt == 0 and not accepted.done():
                        self.stats.retries += 1
                        log.warning("a decoder replica was lost before it accepted a request (%s); sending it again",
                                    type(e).__name__)
                        continue
                    self.stats.unavailable += 1
                    raise UnavailableError(f"the decoder replica was lost ({type(e).__name__}); retry",
                                           self.config.retry_after_s) from None
                except BackPressureError as e:
                    raise QueueFullError(f"every decoder replica is at its limit of calls ({e}); retry later") from None
                except RayTaskError as e:
                    raise RequestFailedError(f"the decoder replica failed: {e.cause!r}") from None
        except asyncio.CancelledError:
            self._forget(req.request_id)
            if self._stopped is not None or not accepted.done():
                _end(accepted, stream, self._stopped or EngineStoppedError("the request was cancelled before a "
                                                                           "replica accepted it"))
            else:                        # as in one process: the stream ends with a CANCELLED result
                stream.put(GenerationResult(
                    request_id=req.request_id, text="".join(text), token_ids=tuple(token_ids),
                    finish_reason=FinishReason.CANCELLED, num_prompt_tokens=len(req.prompt_ids), queue_s=0.0,
                    time_to_first_token_s=0.0, time_per_output_token_s=0.0, total_s=time.monotonic() - started,
                    num_preemptions=0))
            raise
        except BaseException as e:  # noqa: BLE001 - the request's error, to its caller
            self._forget(req.request_id)
            _end(accepted, stream, e)


def _end(accepted: Future, stream: GenerationStream, error: BaseException) -> None:
    """An error before acceptance goes to submit_async's caller; after it, into the stream."""
    if not accepted.done():
        accepted.set_exception(error)
    else:
        stream.put(error)


def start_decoder_replicas(config: ScaleOutConfig, server_config: ServerConfig, manager: Manager,
                           on_finish=None) -> ReplicaGeneration:
    """Deploy config.num_replicas decoder replicas (waits until they are ready) and return the engine that calls
    them; on_finish(request, result) as GenerationEngine's (the front door's metrics)."""
    handle, lease = deploy(config, decoder_deployment(config, replica_server_config(server_config)), "decoder")
    return ReplicaGeneration(config, handle, AdapterFiles(manager, config.object_store_bytes // 2), lease, on_finish)
