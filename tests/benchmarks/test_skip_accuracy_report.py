"""benchmarks/skip_accuracy.py's report over seeds: means, each seed's delta, results written before --seeds."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from skip_accuracy import SCORES, markdown, mean_over_seeds, seeded  # noqa: E402


def run(seed, ref, skip, with_seed=True):
    scores = {name: {"accuracy": 0.5, "macro_f1": ref if name == "full-model adapter, full model" else skip,
                     "num_examples": 10} for name in SCORES}
    out = {"set": "sci-cite", "task": "classification", "scores": scores,
           "train_seconds": {"full-model": 60.0 * (seed + 1), "skip-mode": 30.0}}
    return {**out, "seed": seed} if with_seed else out


def test_scores_are_averaged_over_seeds_and_each_seeds_delta_is_shown():
    merged = mean_over_seeds([run(0, 0.80, 0.77, with_seed=False), run(1, 0.70, 0.71)])   # seed 0: an old result
    assert merged["seed"] == [0, 1]
    assert merged["scores"]["full-model adapter, full model"]["macro_f1"] == pytest.approx(0.75)
    assert merged["scores"]["skip-mode adapter, skip mode (exact)"]["macro_f1"] == pytest.approx(0.74)
    assert merged["scores"]["skip-mode adapter, skip mode (exact)"]["num_examples"] == 10
    assert merged["train_seconds"]["full-model"] == pytest.approx(90.0)
    table = markdown([{**merged, "shallow": "s"}], "s")
    assert "| -1.00 (seeds: -3.00, +1.00) |" in table
    single = run(0, 0.80, 0.77)
    assert mean_over_seeds([single]) is single and "seeds:" not in markdown([{**single, "shallow": "s"}], "s")


def test_the_seed_flag_is_set_in_the_training_flags():
    assert seeded(["--max-length", "128", "--seed", "0", "--no-progress"], 3) == ["--max-length", "128", "--seed", "3",
                                                                                 "--no-progress"]
