"""Scale-out, the front door's side: the encoder's engine runs as Ray Serve replicas (dispatcher/replica.py).

Imported only when `replicas` > 0 (it needs the `ray` extra; the single-process server never imports Ray).
ReplicaEngine has the surface of scheduler.engine.Engine that the edge uses (submit -> a Future of a Completion,
cancel, start, stop, is_accepting), so authentication, limits, the error mapping, OIP and the HTTP API run
unchanged in front of it. What it adds:

- calls: the requests submitted in one event-loop turn are grouped by adapter, one Ray call per group, with
  `multiplexed_model_id` set to the adapter's id and version, so Ray routes it to a replica that has it loaded
  (routing "any": Ray's default choice, for comparison);
- adapter files: read from the store once (verified), put into Ray's object store and handed to the replica
  with the call as a reference (AdapterFiles); the registry and store stay here;
- faults: a call whose replica died (SIGKILL, node lost) is sent once more (encoder requests are idempotent);
  if that fails too, its requests fail with UnavailableError (UNAVAILABLE with a retry hint). No request is
  left without an answer: each ends in its future's result or error.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import threading
import time
from collections import Counter, OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from manager.cache import CacheFullError
from manager.errors import (CorruptAdapterError, FailedPreconditionError, InvalidArgumentError, NotFoundError)
from manager.manager import Manager
from scheduler.engine import (DeadlineExceededError, EngineStoppedError, RequestCancelledError,
                              RequestFailedError, wait_for_drain)
from scheduler.policy import QueueFullError
from scheduler.types import Request
from vbert.adapters import AdapterError
from vbert.model import InputError

from .config import ScaleOutConfig, ServerConfig
from .errors import UnavailableError
from .replica import BASE_MODEL_ID, deployment, model_id_of
from .replica_load import create_board, read_board

log = logging.getLogger("vbert.scaleout")

# a replica's row error (class name, message) -> the class the edge maps to a status code
ROW_ERRORS: dict[str, type[Exception]] = {cls.__name__: cls for cls in (
    DeadlineExceededError, RequestCancelledError, RequestFailedError, EngineStoppedError, QueueFullError,
    CacheFullError, InputError, AdapterError, CorruptAdapterError, NotFoundError, InvalidArgumentError,
    FailedPreconditionError)}
# a call that failed because its replica is gone (or none is up): sent once more, then UNAVAILABLE
REPLICA_LOST = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)
CALL_MARGIN_S = 5.0     # a call is abandoned this long after its latest row's deadline


def row_error(name: str, message: str) -> Exception:
    cls = ROW_ERRORS.get(name)
    if cls is None:
        return RequestFailedError(f"{name}: {message}")
    try:
        return cls(message)
    except TypeError:                     # a class whose constructor takes more than the message
        return RequestFailedError(message)


class AdapterFiles:
    """adapter id -> (model id, what a replica needs to load it): the version and sha256 from the registry, the
    verified files put into Ray's object store once (LRU within a byte budget: a dropped reference frees them)."""

    def __init__(self, manager: Manager, budget_bytes: int):
        self.manager, self.budget_bytes = manager, budget_bytes
        self._refs: OrderedDict[int, tuple[str, dict, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, adapter_id: int | None) -> tuple[str, dict | None]:
        if adapter_id is None:
            return BASE_MODEL_ID, None
        with self._lock:
            if adapter_id in self._refs:
                self._refs.move_to_end(adapter_id)
                model_id, adapter, _ = self._refs[adapter_id]
                return model_id, adapter
        rec = self.manager.registry.get_adapter(adapter_id)          # NotFoundError once deleted
        data, config = self.manager.store.read_blob(rec.sha256)      # verified: sha256 of the bytes
        adapter = {"id": adapter_id, "sha256": rec.sha256, "blob": [ray.put((data, config))]}
        model_id = model_id_of(adapter_id, rec.version)
        with self._lock:
            if adapter_id in self._refs:          # another call put it meanwhile: keep one copy, count it once
                return self._refs[adapter_id][:2]
            self._refs[adapter_id] = (model_id, adapter, len(data))
            self._bytes += len(data)
            while self._bytes > self.budget_bytes and len(self._refs) > 1:
                _, (_, _, size) = self._refs.popitem(last=False)
                self._bytes -= size
        return model_id, adapter


@dataclass(eq=False)
class _Call:
    """One Ray call: the requests of one adapter submitted in one loop turn."""

    adapter_id: int | None
    items: list[tuple[Request, Future]]
    task: asyncio.Task | None = None

    @property
    def is_abandoned(self) -> bool:
        return all(f.done() for _, f in self.items)


@dataclass
class ScaleOutStats:
    calls: int = 0
    rows: int = 0
    retries: int = 0
    unavailable: int = 0
    adapter_loads: int = 0            # calls whose replica had to load their adapter
    adapter_calls: int = 0            # calls with an adapter (the hit rate's denominator)
    rows_per_replica: Counter = field(default_factory=Counter)

    @property
    def adapter_hit_rate(self) -> float | None:
        return None if not self.adapter_calls else 1 - self.adapter_loads / self.adapter_calls


class FrontDoorEngine:
    """What the front door's engines for Ray Serve replicas share (ReplicaEngine here, ReplicaGeneration in
    dispatcher/scaleout_generation.py): the deployment's handle, the adapters' files, an event loop thread of their
    own for the Ray calls, and the lifecycle: start, stop (drain, end what is left, delete the deployment, leave
    Ray), is_accepting. Subclasses define num_pending and _end_left."""

    scheduler = None   # the policy runs on the replicas (no local queue to export as metrics)

    def __init__(self, config: ScaleOutConfig, handle, files: AdapterFiles, lease: "RayLease", thread_name: str):
        self.config, self.handle, self.files, self._lease = config, handle, files, lease
        self.stats = ScaleOutStats()
        self._board = create_board(config.app_name)     # the replicas report their engine's load there
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=thread_name, daemon=True)
        self._lock = threading.Lock()
        self._is_accepting = False

    def start(self):
        if not self._thread.is_alive():
            self._thread.start()
        self._is_accepting = True
        return self

    def stop(self, drain: bool = True, timeout: float | None = 60) -> int:
        """Refuse new requests; with drain, wait (up to timeout) for those on the replicas; end the rest with
        EngineStoppedError; then delete the deployment (Ray drains the replicas) and leave Ray. Returns how many
        pending requests finished."""
        self._is_accepting = False
        num_pending = self.num_pending
        if drain:
            wait_for_drain(self, timeout)
        num_left = self._end_left()
        if self._board is not None:
            with contextlib.suppress(Exception):        # Ray may be gone already
                ray.kill(self._board)
        shutdown(self.config, self._lease)
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        return max(0, num_pending - num_left)

    @property
    def is_accepting(self) -> bool:
        return self._is_accepting

    def replica_states(self) -> dict[str, int]:
        """Ray Serve's count of this deployment's replicas by state (RUNNING, STARTING, ...); {} when Serve does not
        answer (for the metrics: never raises)."""
        try:
            app = serve.status().applications.get(self.config.app_name)
            return {} if app is None else {str(k): int(v) for d in app.deployments.values()
                                           for k, v in d.replica_states.items()}
        except Exception:  # noqa: BLE001 - a scrape must not fail because Ray is shutting down
            return {}

    def replica_loads(self) -> dict[str, dict]:
        """{replica (its pid): what its engine is doing} from the replicas' last reports (dispatcher/replica_load.py):
        waiting (both backbones), and for the decoder running, KV blocks in all and free, preemptions; {} when Ray
        does not answer."""
        return read_board(self._board)

    def routed_counts(self) -> dict[str, int] | None:
        """The front door's own routing choices, where a router of ours makes them (decoder replicas: prefix
        routing); None: Ray's."""
        return None

    @property
    def num_pending(self) -> int:
        raise NotImplementedError

    def _end_left(self) -> int:
        """End every request still pending with EngineStoppedError; returns how many there were."""
        raise NotImplementedError


class ReplicaEngine(FrontDoorEngine):
    """The encoder's engine on Ray Serve replicas, as seen by the edge (see the module docstring)."""

    def __init__(self, config: ScaleOutConfig, handle, files: AdapterFiles, lease: "RayLease"):
        super().__init__(config, handle, files, lease, "scaleout-calls")
        self._pending: dict[int | None, list[tuple[Request, Future]]] = {}   # submitted, not sent yet
        self._calls: dict[int, _Call] = {}     # request id -> its call
        self._futures: dict[int, Future] = {}  # request id -> its future (every request not answered yet)
        self._is_flush_scheduled = False

    @property
    def num_pending(self) -> int:
        """Requests not answered: a future counts until it is settled, not until its done-callback has run (a
        caller woken by the result may look before the setter's thread has run the callbacks)."""
        with self._lock:
            return sum(not fut.done() for fut in self._futures.values())

    def _end_left(self) -> int:
        with self._lock:
            left = list(self._futures.values())
        for fut in left:
            _settle(fut, exc=EngineStoppedError("the server stopped before this request was computed"))
        return len(left)

    def step_budget(self) -> int | None:
        return None   # steps are sized on the replicas

    # -- submission --------------------------------------------------------------------------------
    def submit(self, request: Request) -> Future:
        """Like Engine.submit: the future resolves to a Completion or fails with the replica's error for the
        row, or UnavailableError when no replica answered (twice)."""
        if not self._is_accepting:
            raise EngineStoppedError("the engine is not accepting requests (draining or stopped)")
        if request.is_generative:
            raise NotImplementedError("generative requests do not run on encoder replicas")
        fut: Future = Future()
        with self._lock:
            self._futures[request.request_id] = fut
            self._pending.setdefault(request.adapter_id, []).append((request, fut))
            is_first, self._is_flush_scheduled = not self._is_flush_scheduled, True
        fut.add_done_callback(lambda _f, rid=request.request_id: self._forget(rid))
        if is_first:     # the rows submitted until the loop thread runs go out together, one call per adapter
            self._loop.call_soon_threadsafe(self._flush)
        return fut

    def cancel(self, request_id: int) -> bool:
        with self._lock:
            fut = self._futures.get(request_id)
            call = self._calls.get(request_id)
        if fut is None:
            return False
        _settle(fut, exc=RequestCancelledError(f"request {request_id} was cancelled"))
        if call is not None and call.is_abandoned and call.task is not None:
            self._loop.call_soon_threadsafe(call.task.cancel)   # Ray cancels it on the replica too
        return True

    def _forget(self, request_id: int) -> None:
        with self._lock:
            self._futures.pop(request_id, None)
            self._calls.pop(request_id, None)

    # -- the calls (on the loop thread) ----------------------------------------------------------------
    def _flush(self) -> None:
        with self._lock:
            pending, self._pending, self._is_flush_scheduled = self._pending, {}, False
            calls = []
            for adapter_id, items in pending.items():
                items = [(req, fut) for req, fut in items if not fut.done()]    # cancelled before they were sent
                if items:
                    call = _Call(adapter_id, items)
                    calls.append(call)
                    for req, _ in items:
                        self._calls[req.request_id] = call
        for call in calls:
            call.task = self._loop.create_task(self._run(call))

    async def _run(self, call: _Call) -> None:
        try:
            await self._send(call)
        except asyncio.CancelledError:
            pass
        except Exception as e:  # noqa: BLE001 - every request of the call gets the error
            for _, fut in call.items:
                _settle(fut, exc=e)

    async def _send(self, call: _Call) -> None:
        model_id, adapter = await asyncio.to_thread(self.files.get, call.adapter_id)
        for attempt in range(2):
            live = [(req, fut) for req, fut in call.items if not fut.done()]
            now = time.monotonic()
            rows = []
            for req, fut in list(live):
                if req.deadline <= now:
                    _settle(fut, exc=DeadlineExceededError(f"request {req.request_id} passed its deadline"))
                    live.remove((req, fut))
                else:
                    rows.append(_row(req, now))
            if not live:
                return
            handle = self.handle if self.config.routing == "any" else self.handle.options(multiplexed_model_id=model_id)
            self.stats.calls += 1
            self.stats.rows += len(rows)
            timeout = max(req.deadline for req, _ in live) - now + CALL_MARGIN_S
            response = handle.run.remote(model_id, adapter, rows)
            try:
                answer = await asyncio.wait_for(_await(response), timeout)
            except asyncio.CancelledError:       # every request of the call was cancelled: so is the call
                response.cancel()
                raise
            except REPLICA_LOST as e:
                if attempt == 0:
                    self.stats.retries += 1
                    log.warning("a replica was lost with %d rows on it (%s); sending them again", len(rows),
                                type(e).__name__)
                    continue
                self.stats.unavailable += len(live)
                raise UnavailableError(f"no encoder replica answered ({type(e).__name__}); retry",
                                       self.config.retry_after_s) from None
            except BackPressureError as e:
                raise QueueFullError(f"every encoder replica is at its limit of calls ({e}); retry later") from None
            except asyncio.TimeoutError:
                raise DeadlineExceededError(f"no replica answered within {timeout:.1f} s") from None
            except RayTaskError as e:
                raise RequestFailedError(f"the replica failed: {e.cause!r}") from None
            self._deliver(live, answer, adapter is not None)
            return

    def _deliver(self, live: list[tuple[Request, Future]], answer: dict, has_adapter: bool) -> None:
        self.stats.rows_per_replica[answer["replica"]] += len(live)
        if has_adapter:
            self.stats.adapter_calls += 1
            self.stats.adapter_loads += bool(answer["loaded"])
        for (req, fut), result in zip(live, answer["results"]):
            if result[0] == "ok":
                _, completion, token_ids, metadata = result
                if token_ids:
                    req.prompt_ids = token_ids     # the servicers read the tokenization (Tag's offsets)
                req.metadata.update(metadata, replica=answer["replica"])
                _settle(fut, result=completion)
            else:
                _settle(fut, exc=row_error(result[1], result[2]))


async def _await(response):
    return await response


def _row(req: Request, now: float) -> dict:
    return {"tenant_id": req.tenant_id, "text": req.text, "prompt_ids": req.prompt_ids, "truncate": req.truncate,
            "normalize": req.normalize, "weight": req.weight, "max_length": req.max_length,
            "remaining_s": req.deadline - now}


def _settle(fut: Future, result=None, exc: BaseException | None = None) -> None:
    """Set a future's outcome unless it has one (cancelled meanwhile)."""
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
    except Exception:  # noqa: BLE001 - concurrent.futures.InvalidStateError: already settled
        pass


# -- the cluster ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RayLease:
    """What this process did to Ray, so that it undoes exactly that: connected (and so disconnects), started the
    local cluster (and so also stops Serve in it). A cluster joined by address keeps its Serve and other apps."""

    connected: bool = False
    started_cluster: bool = False


_shared = {"lease": None, "users": 0}    # one lease for every deployment of this process (encoder, decoder)
_shared_lock = threading.Lock()


def connect(config: ScaleOutConfig) -> RayLease:
    """Join Ray: start a local cluster for address "local" (with CPUs for every deployment's replicas), else connect
    to the one at the address. The encoder's and the decoder's deployments share the lease: the last to shut down
    undoes it. A process connected by someone else gets an empty lease (nothing to undo)."""
    with _shared_lock:
        if _shared["users"]:
            _shared["users"] += 1
            return _shared["lease"]
        lease = RayLease() if ray.is_initialized() else _init(config)
        _shared.update(lease=lease, users=1)
        return lease


def _init(config: ScaleOutConfig) -> RayLease:
    if config.address == "local":
        if config.metrics_push_s is not None:   # a policy of ours decides: loads reported often enough per interval
            os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", str(config.metrics_push_s))
        most = config.num_replicas if config.autoscale is None else config.autoscale.max_replicas
        num_cpus = max(os.cpu_count() or 1, math.ceil(most * config.cpus), math.ceil(config.local_cpus))
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, namespace="vbert",
                 object_store_memory=config.object_store_bytes, configure_logging=False)
        return RayLease(connected=True, started_cluster=True)
    ray.init(address=config.address, namespace="vbert", configure_logging=False)
    return RayLease(connected=True)


def deploy(config: ScaleOutConfig, app, what: str):
    """Join Ray (connect) and run one deployment as Serve application config.app_name; returns its handle (waits until
    its replicas are ready). On failure the lease taken here is given back."""
    lease = connect(config)
    try:
        serve.start(http_options={"location": "NoServer"})
        t0 = time.monotonic()
        handle = serve.run(app, name=config.app_name, route_prefix=None)
        log.info("%d %s replicas ready on Ray Serve in %.1f s", config.num_replicas, what, time.monotonic() - t0)
    except BaseException:
        _leave(lease)
        raise
    return handle, lease


def replica_server_config(server_config: ServerConfig) -> ServerConfig:
    """The ServerConfig a replica loads (paths made absolute: replicas run in other directories)."""
    return dataclasses.replace(server_config, data_dir=str(Path(server_config.data_dir).resolve()))


def start_replicas(config: ScaleOutConfig, server_config: ServerConfig, manager: Manager) -> ReplicaEngine:
    """Deploy config.num_replicas encoder replicas (waits until they are ready) and return the engine that
    calls them."""
    handle, lease = deploy(config, deployment(config, replica_server_config(server_config)), "encoder")
    return ReplicaEngine(config, handle, AdapterFiles(manager, config.object_store_bytes // 2), lease)


def shutdown(config: ScaleOutConfig, lease: RayLease) -> None:
    """Delete our deployment (Ray waits for the replicas' calls, then ends them); the last deployment of this process
    to shut down stops Serve in a cluster we started and disconnects if we connected."""
    try:
        if ray.is_initialized():
            serve.delete(config.app_name)
    finally:
        _leave(lease)


def _leave(lease: RayLease) -> None:
    with _shared_lock:
        _shared["users"] = max(0, _shared["users"] - 1)
        if _shared["users"]:
            return
        _shared["lease"] = None
    if not ray.is_initialized():
        return
    try:
        if lease.started_cluster:
            serve.shutdown()
    finally:
        if lease.connected:
            ray.shutdown()
