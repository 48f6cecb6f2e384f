"""What each Ray Serve replica's engine is doing, for the front door's metrics and status (imported only with
replicas; needs the `ray` extra).

A Serve handle routes every call to a replica of Ray's choice, so the front door cannot ask a given replica. Instead
each replica pushes its engine's numbers (waiting, running, KV blocks) every REPORT_PERIOD_S to a small named actor,
the deployment's load board, which the front door creates next to the deployment and reads when it is scraped or
asked for its status. A report older than STALE_AFTER_S (a replica gone) is not shown.

Plain values only: no torch, no protobuf.
"""
from __future__ import annotations

import threading
import time

import ray

NAMESPACE = "vbert"
REPORT_PERIOD_S = 1.0
STALE_AFTER_S = 5.0


def board_name(app_name: str) -> str:
    return f"{app_name}-load"


class LoadBoard:
    """The latest report of each replica (a Ray actor: one per deployment, owned by the front door's process)."""

    def __init__(self) -> None:
        self._reports: dict[str, tuple[float, dict]] = {}

    def put(self, replica: str, stats: dict) -> None:
        self._reports[replica] = (time.monotonic(), stats)

    def reports(self, max_age_s: float = STALE_AFTER_S) -> dict[str, dict]:
        """{replica: its last stats} of the replicas that reported within max_age_s; older ones are dropped."""
        now = time.monotonic()
        self._reports = {k: v for k, v in self._reports.items() if now - v[0] <= max_age_s}
        return {k: v[1] for k, v in self._reports.items()}


def create_board(app_name: str):
    """The deployment's board (reused when it exists); None when this process is not connected to Ray."""
    if not ray.is_initialized():
        return None
    return ray.remote(LoadBoard).options(name=board_name(app_name), namespace=NAMESPACE, get_if_exists=True,
                                         num_cpus=0).remote()


def read_board(board, timeout_s: float = 2.0) -> dict[str, dict]:
    """The replicas' latest reports; {} when there is no board or it does not answer (a scrape never fails because
    of it)."""
    if board is None:
        return {}
    try:
        return ray.get(board.reports.remote(), timeout=timeout_s)
    except Exception:  # noqa: BLE001 - Ray shutting down, the board gone: nothing to show
        return {}


class Reporter:
    """A replica's side: a daemon thread pushing `stats()` to its deployment's board every REPORT_PERIOD_S, until
    stopped. A board not found yet (the replica started first) is looked up again on the next report."""

    def __init__(self, replica: str, stats, period_s: float = REPORT_PERIOD_S):
        self.replica, self._stats, self.period_s = replica, stats, period_s
        self._stop = threading.Event()
        self._board = None
        self._app: str | None = None
        self._thread = threading.Thread(target=self._run, name="vbert-load-report", daemon=True)

    def start(self) -> "Reporter":
        from ray import serve

        try:
            self._app = serve.get_replica_context().app_name
        except Exception:  # noqa: BLE001 - not inside a Serve replica: nothing to report to
            return self
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                if self._board is None:
                    self._board = ray.get_actor(board_name(self._app), namespace=NAMESPACE)
                self._board.put.remote(self.replica, self._stats())
            except Exception:  # noqa: BLE001 - no board (yet), or it went away: try again next period
                self._board = None
