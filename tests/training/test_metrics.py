"""Metrics of training/metrics.py against hand-computed values."""
from __future__ import annotations

import pytest

from training.metrics import (classification_metrics, majority_baseline, majority_label,
                              ner_majority_baseline, ner_metrics, per_label_f1)


def test_classification_metrics_hand_computed():
    gold = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "a", "b", "b", "a", "a"]
    # a: tp 2, predicted 4, gold 3 -> F1 4/7; b: tp 1, predicted 2, gold 2 -> 1/2; c never predicted -> 0
    metrics = classification_metrics(gold, pred)
    assert metrics["accuracy"] == pytest.approx(3 / 6)
    assert metrics["macro_f1"] == pytest.approx((4 / 7 + 1 / 2 + 0) / 3)
    assert metrics["num_examples"] == 6
    assert per_label_f1(gold, pred) == pytest.approx({"a": 4 / 7, "b": 1 / 2, "c": 0.0})


def test_macro_f1_ignores_labels_only_predicted():
    # "z" is never gold: it is an error for "a" but not a class of its own
    metrics = classification_metrics(["a", "a", "b"], ["a", "z", "b"])
    # a: tp 1, predicted 1, gold 2 -> 2/3; b: 1
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 1) / 2)
    assert metrics["accuracy"] == pytest.approx(2 / 3)


def test_classification_metrics_perfect_and_invalid():
    expected = {"accuracy": 1.0, "macro_f1": 1.0, "num_examples": 2}
    assert classification_metrics(["x", "y"], ["x", "y"]) == expected
    with pytest.raises(ValueError):
        classification_metrics(["x"], ["x", "y"])
    with pytest.raises(ValueError):
        classification_metrics([], [])


def test_ner_metrics_spans_with_partial_miss():
    gold = [["B-D", "I-D", "O", "B-G"], ["O", "B-D", "I-D", "I-D"]]
    pred = [["B-D", "I-D", "O", "B-D"], ["O", "B-D", "I-D", "O"]]
    # gold entities: (D,0-1) (G,3) (D,1-3) = 3; predicted: (D,0-1) (D,3) (D,1-2) = 3
    # correct: only (D,0-1): the partial span (D,1-2) and the wrong type (D,3) both miss
    metrics = ner_metrics(gold, pred)
    assert metrics["precision"] == pytest.approx(1 / 3)
    assert metrics["recall"] == pytest.approx(1 / 3)
    assert metrics["f1"] == pytest.approx(1 / 3)
    assert metrics["num_examples"] == 2


def test_ner_metrics_unequal_precision_recall():
    gold = [["B-D", "I-D", "O", "B-D", "O"]]
    pred = [["B-D", "I-D", "O", "O", "O"]]
    metrics = ner_metrics(gold, pred)
    assert metrics["precision"] == pytest.approx(1.0)
    assert metrics["recall"] == pytest.approx(0.5)
    assert metrics["f1"] == pytest.approx(2 / 3)


def test_ner_metrics_invalid():
    with pytest.raises(ValueError):
        ner_metrics([["O", "O"]], [["O"]])
    with pytest.raises(ValueError):
        ner_metrics([["O"]], [])


def test_majority_baseline():
    assert majority_label(["b", "a", "b", "a", "c"]) == "a"  # tie -> smallest label
    metrics = majority_baseline(["x", "y", "y"], ["y", "x", "y", "z"])
    # always "y": accuracy 2/4; F1 y = 2*2/(4+2) = 2/3, x 0, z 0
    assert metrics["accuracy"] == pytest.approx(0.5)
    assert metrics["macro_f1"] == pytest.approx((2 / 3) / 3)
    assert metrics["num_examples"] == 4


def test_ner_majority_baseline_is_all_zero(recwarn):
    metrics = ner_majority_baseline([["B-D", "I-D", "O"], ["O"]])
    assert metrics == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "num_examples": 2}
    assert not [w for w in recwarn if "Undefined" in type(w.message).__name__]
