"""Structured JSON logs: one object per line with the request id and tenant of the current call."""
from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    FIELDS = ("request_id", "tenant", "method", "code", "duration_ms", "inputs", "num_suppressed", "protocol",
              "http_status")

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        for f in self.FIELDS:
            if hasattr(record, f):
                out[f] = getattr(record, f)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class RefusalSampler:
    """At most `per_s` log lines per second for refused calls (bad keys, limits): a flood of them must
    not cost the server more in logging than in refusing. The next line written after a quiet
    second carries how many were left out (`num_suppressed`); the metrics still count every call."""

    def __init__(self, per_s: int = 10, clock=time.monotonic):
        self.per_s, self._clock = per_s, clock
        self._window, self._num_in_window, self.num_suppressed = 0.0, 0, 0

    def admit(self) -> int | None:
        """None: leave this line out; else log it with this many lines suppressed before it."""
        now = self._clock()
        if now - self._window >= 1.0:
            self._window, self._num_in_window = now, 0
        if self._num_in_window >= self.per_s:
            self.num_suppressed += 1
            return None
        self._num_in_window += 1
        suppressed, self.num_suppressed = self.num_suppressed, 0
        return suppressed
