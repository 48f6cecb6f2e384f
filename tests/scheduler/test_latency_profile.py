"""Latency profiles: interpolation inside the grid, extrapolation beyond it, JSON round trip, clear errors."""
from __future__ import annotations

import pytest

from scheduler.latency_profile import BackboneProfile, Curve, Grid, LatencyProfile


def encoder(**kw) -> BackboneProfile:
    # seconds = 0.01 + 0.001 * rows * tokens: bilinear interpolation is exact at the grid and between rows/tokens
    rows, tokens = (1, 4, 16), (16, 64)
    grid = Grid(rows, tokens, tuple(tuple(0.01 + 0.001 * r * t for t in tokens) for r in rows))
    return BackboneProfile("encoder", "encoder", start_s=6.5, memory_bytes={"weights": 90e6, "pool": 170e6},
                           step=grid, **kw)


def test_interpolation_is_exact_on_and_between_grid_points_and_extrapolates_linearly():
    enc = encoder()
    assert enc.encoder_step_s(4, 64) == pytest.approx(0.01 + 0.001 * 256)
    assert enc.encoder_step_s(10, 16) == pytest.approx(0.01 + 0.001 * 160)     # between rows 4 and 16
    assert enc.encoder_step_s(32, 16) == pytest.approx(0.01 + 0.001 * 512)     # beyond the grid: the last slope
    assert enc.encoder_step_s(0.01, 1) == pytest.approx(min(0.01 + 0.001 * 16, 0.026))  # never below the least
    curve = Curve((16, 64, 256), (0.02, 0.05, 0.17))
    assert curve(40) == pytest.approx(0.035) and curve(512) == pytest.approx(0.33)
    assert enc.replica_bytes == 260_000_000


def test_json_round_trip_and_errors(tmp_path):
    dec = BackboneProfile("decoder", "decoder", start_s=9.0, memory_bytes={"weights": 270e6, "kv": 256 << 20},
                          decode=Grid((1, 8), (64, 512), ((0.03, 0.04), (0.05, 0.09))),
                          prefill=Curve((16, 256), (0.05, 0.4)))
    profile = LatencyProfile({"encoder": encoder(), "decoder": dec}, {"cpu": "test"})
    profile.save(tmp_path / "p.json")
    back = LatencyProfile.load(tmp_path / "p.json")
    assert back == profile and back["decoder"].decode_step_s(4, 288) == pytest.approx(dec.decode_step_s(4, 288))
    with pytest.raises(KeyError, match="no backbone 'bert-base'"):
        back["bert-base"]
    with pytest.raises(ValueError, match="not a latency profile"):
        LatencyProfile.from_json({"backbones": {}})
    with pytest.raises(ValueError, match="increasing"):
        Grid((4, 1), (16, 64), ((1, 1), (1, 1)))
    with pytest.raises(ValueError, match="2 x 2 positive"):
        Grid((1, 4), (16, 64), ((1, 0), (1, 1)))
    with pytest.raises(ValueError, match="needs its decode grid"):
        BackboneProfile("d", "decoder", 1.0)
    with pytest.raises(ValueError, match="start_s"):
        encoder().__class__("e", "encoder", 0.0, step=encoder().step)
