"""benchmarks/skip.py's paired ratio: the statistic the held-out skip / full speed is reported with."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from skip import paired_ratio  # noqa: E402


def test_a_twice_as_fast_contender_reads_two_with_a_tight_interval():
    full = [0.40, 0.42, 0.41, 0.44, 0.39, 0.40]
    out = paired_ratio(full, [t / 2 for t in full])
    assert out["median"] == pytest.approx(2.0)
    assert out["ci95"] == pytest.approx([2.0, 2.0])
    assert out["pairs"] == 6 and out["skip_faster_share"] == 1.0


def test_noise_around_parity_gives_an_interval_that_holds_one_and_the_median():
    full = [0.400, 0.410, 0.405, 0.420, 0.398, 0.402, 0.415, 0.401, 0.409, 0.404]
    skip = [0.404, 0.406, 0.409, 0.414, 0.401, 0.400, 0.418, 0.399, 0.412, 0.403]
    out = paired_ratio(full, skip, seed=3)
    low, high = out["ci95"]
    assert low <= out["median"] <= high
    assert low < 1.0 < high
    assert 0.0 < out["skip_faster_share"] < 1.0


def test_unpaired_times_are_refused():
    with pytest.raises(ValueError, match="same number"):
        paired_ratio([0.4, 0.4], [0.4])
    with pytest.raises(ValueError, match="same number"):
        paired_ratio([], [])
