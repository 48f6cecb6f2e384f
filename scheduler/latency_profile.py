"""Measured latency profiles of the backbones, as the placement simulator reads them. Pure Python, no torch.

A profile is what `vbert profile` measured on one machine (scheduler/profiling.py writes it): per backbone, the
step latency on a grid (encoder: rows x tokens per row; decoder decode steps: running sequences x context
length; decoder prefill: tokens per chunk), how long a replica takes to start, and what it holds in memory.
Nothing here is a constant typed in by hand: every number comes from the JSON file.

Between grid points latency is interpolated linearly in each axis (bilinear on a 2-D grid); beyond the grid it
is extrapolated from the last two points of each axis (steps grow about linearly with rows and tokens), never
below the smallest measured latency.
"""
from __future__ import annotations

import bisect
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

FORMAT = "vbert-latency-profile/1"


def _check_axis(name: str, values: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) < 2 or any(b <= a for a, b in zip(values, values[1:])) or values[0] <= 0:
        raise ValueError(f"grid axis {name} must hold at least two increasing positive values, got {values}")
    return values


def _bracket(axis: tuple[float, ...], x: float) -> tuple[int, float]:
    """(i, t): x lies at axis[i] + t * (axis[i+1] - axis[i]); t < 0 or > 1 extrapolates."""
    i = bisect.bisect_right(axis, x) - 1
    if i < 0:
        i = 0
    elif i > len(axis) - 2:
        i = len(axis) - 2
    return i, (x - axis[i]) / (axis[i + 1] - axis[i])


@dataclass(frozen=True)
class Curve:
    """Seconds against one axis (the decoder's prefill chunk: seconds against tokens)."""

    x: tuple[float, ...]
    seconds: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "x", _check_axis("x", self.x))
        if len(self.seconds) != len(self.x) or any(not s > 0 for s in self.seconds):
            raise ValueError(f"a curve needs one positive latency per grid point ({len(self.x)}), got {self.seconds}")
        object.__setattr__(self, "seconds", tuple(float(s) for s in self.seconds))
        object.__setattr__(self, "_floor", min(self.seconds))

    def __call__(self, x: float) -> float:
        i, t = _bracket(self.x, x)
        return max(self._floor, self.seconds[i] + t * (self.seconds[i + 1] - self.seconds[i]))


@dataclass(frozen=True)
class Grid:
    """Seconds on a 2-D grid: seconds[i][j] at (a[i], b[j])."""

    a: tuple[float, ...]
    b: tuple[float, ...]
    seconds: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "a", _check_axis("a", self.a))
        object.__setattr__(self, "b", _check_axis("b", self.b))
        rows = tuple(tuple(float(s) for s in row) for row in self.seconds)
        if len(rows) != len(self.a) or any(len(r) != len(self.b) for r in rows) or any(not s > 0 for r in rows for s in r):
            raise ValueError(f"a grid needs {len(self.a)} x {len(self.b)} positive latencies")
        object.__setattr__(self, "seconds", rows)
        object.__setattr__(self, "_floor", min(min(r) for r in rows))

    def __call__(self, a: float, b: float) -> float:
        i, s = _bracket(self.a, a)
        j, t = _bracket(self.b, b)
        g = self.seconds
        lo = g[i][j] + t * (g[i][j + 1] - g[i][j])
        hi = g[i + 1][j] + t * (g[i + 1][j + 1] - g[i + 1][j])
        return max(self._floor, lo + s * (hi - lo))


@dataclass(frozen=True)
class BackboneProfile:
    """One backbone on one machine. encoder: `step` over (rows, tokens per row); decoder: `decode` over (running
    sequences, context tokens) and `prefill` over chunk tokens. start_s: a replica's start (load + first step);
    memory_bytes: what one replica holds (weights, adapter pool, KV cache), by part."""

    name: str
    kind: str                                    # "encoder" | "decoder"
    start_s: float
    memory_bytes: dict = field(default_factory=dict)
    step: Grid | None = None
    decode: Grid | None = None
    prefill: Curve | None = None
    kv_tokens: int = 0            # decoder: tokens its KV cache holds (the server's budget); 0: not limited

    def __post_init__(self) -> None:
        if self.kind not in ("encoder", "decoder"):
            raise ValueError(f"backbone {self.name!r}: kind must be encoder or decoder, got {self.kind!r}")
        if self.kind == "encoder" and self.step is None:
            raise ValueError(f"encoder {self.name!r} needs its step grid")
        if self.kind == "decoder" and (self.decode is None or self.prefill is None):
            raise ValueError(f"decoder {self.name!r} needs its decode grid and prefill curve")
        if not self.start_s > 0:
            raise ValueError(f"backbone {self.name!r}: start_s must be > 0, got {self.start_s}")

    @property
    def replica_bytes(self) -> int:
        return int(sum(self.memory_bytes.values()))

    def encoder_step_s(self, num_rows: int, tokens_per_row: float) -> float:
        return self.step(num_rows, tokens_per_row)

    def decode_step_s(self, num_running: int, context: float) -> float:
        return self.decode(num_running, context)

    def prefill_s(self, num_tokens: int) -> float:
        return self.prefill(num_tokens)

    def slowed(self, factor) -> "BackboneProfile":
        """The same backbone with every step `factor` times as long: a profile measured alone, carried into a
        serving process whose steps share the CPU and the GIL with the edge (benchmarks/sim_validation.py
        measures the factor from the server's own steps). factor: a number, or a function of the step's rows
        (encoder) or running sequences (decoder) -> a number (small steps are slowed more than large ones)."""
        at = factor if callable(factor) else (lambda _rows: factor)
        for x in (1.0, 64.0):
            f = at(x)
            if not 0 < f < float("inf"):
                raise ValueError(f"factor must be a finite number > 0, got {f!r}")

        def grid(g: Grid | None):
            return None if g is None else Grid(g.a, g.b, tuple(tuple(s * at(a) for s in r) for a, r in zip(g.a, g.seconds)))

        prefill = None if self.prefill is None else Curve(self.prefill.x, tuple(s * at(1.0) for s in self.prefill.seconds))
        return dataclasses.replace(self, step=grid(self.step), decode=grid(self.decode), prefill=prefill)


@dataclass(frozen=True)
class LatencyProfile:
    backbones: dict[str, BackboneProfile]
    machine: dict = field(default_factory=dict)

    def slowed(self, factors: dict) -> "LatencyProfile":
        """Each named backbone slowed by its factor (BackboneProfile.slowed); the others as they are."""
        return dataclasses.replace(self, backbones={n: b.slowed(factors[n]) if n in factors else b
                                                    for n, b in self.backbones.items()})

    def __getitem__(self, name: str) -> BackboneProfile:
        try:
            return self.backbones[name]
        except KeyError:
            raise KeyError(f"the profile has no backbone {name!r} (it has {sorted(self.backbones)})") from None

    # -- JSON --------------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        def grid(g: Grid | None):
            return None if g is None else {"a": list(g.a), "b": list(g.b), "seconds": [list(r) for r in g.seconds]}

        return {"format": FORMAT, "machine": self.machine, "backbones": {
            name: {"kind": b.kind, "start_s": b.start_s, "memory_bytes": b.memory_bytes, "step": grid(b.step),
                   "decode": grid(b.decode),
                   "prefill": None if b.prefill is None else {"x": list(b.prefill.x), "seconds": list(b.prefill.seconds)},
                   "kv_tokens": b.kv_tokens}
            for name, b in self.backbones.items()}}

    @classmethod
    def from_json(cls, data: dict) -> "LatencyProfile":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a latency profile (format {data.get('format') if isinstance(data, dict) else None!r}, "
                             f"expected {FORMAT!r}): write one with `vbert profile`")

        def grid(d):
            return None if d is None else Grid(tuple(d["a"]), tuple(d["b"]), tuple(tuple(r) for r in d["seconds"]))

        out = {}
        for name, b in data["backbones"].items():
            out[name] = BackboneProfile(name, b["kind"], float(b["start_s"]), dict(b.get("memory_bytes") or {}),
                                        step=grid(b.get("step")), decode=grid(b.get("decode")),
                                        prefill=None if b.get("prefill") is None else
                                        Curve(tuple(b["prefill"]["x"]), tuple(b["prefill"]["seconds"])),
                                        kv_tokens=int(b.get("kv_tokens") or 0))
        return cls(out, dict(data.get("machine") or {}))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "LatencyProfile":
        return cls.from_json(json.loads(Path(path).read_text()))
