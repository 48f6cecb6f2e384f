"""Evaluation metrics: classification (accuracy, macro-F1) and NER (entity-level span P/R/F1).

Classification metrics are plain Python. NER metrics use seqeval (default mode, i.e. the
conlleval-compatible span extraction, which reads IOB2): an entity counts as correct only if its
type, start and end all match; a partially found span is one false positive and one false negative.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


def _check_pairs(gold: Sequence, pred: Sequence) -> None:
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    if not gold:
        raise ValueError("no examples to evaluate")


def per_label_f1(gold: Sequence[str], pred: Sequence[str]) -> dict[str, float]:
    """F1 of each gold label (union of gold labels, sorted); a label never predicted has F1 0.

    Predictions of labels absent from gold are errors (false negatives of the gold label) but
    get no entry of their own.
    """
    _check_pairs(gold, pred)
    true_pos: Counter = Counter()
    pred_count: Counter = Counter(pred)
    gold_count: Counter = Counter(gold)
    for g, p in zip(gold, pred):
        if g == p:
            true_pos[g] += 1
    # F1 = 2 tp / (2 tp + fp + fn) = 2 tp / (predicted + gold); gold >= 1 for every label here
    return {label: 2 * true_pos[label] / (pred_count[label] + gold_count[label])
            for label in sorted(gold_count)}


def classification_metrics(gold: Sequence[str], pred: Sequence[str]) -> dict:
    """{"accuracy", "macro_f1" (unweighted mean of per_label_f1), "num_examples"}."""
    f1s = per_label_f1(gold, pred)
    correct = sum(1 for g, p in zip(gold, pred) if g == p)
    return {"accuracy": correct / len(gold), "macro_f1": sum(f1s.values()) / len(f1s),
            "num_examples": len(gold)}


def ner_metrics(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict:
    """{"precision", "recall", "f1", "num_examples" (sentences)}: micro-averaged entity spans.

    A ratio with a zero denominator (no predicted, or no gold, entity) is 0.
    """
    from seqeval.metrics import f1_score, precision_score, recall_score

    _check_pairs(gold, pred)
    for i, (g, p) in enumerate(zip(gold, pred)):
        if len(g) != len(p):
            raise ValueError(f"sentence {i}: {len(g)} gold tags but {len(p)} predicted tags")
    gold_lists = [list(s) for s in gold]
    pred_lists = [list(s) for s in pred]
    return {
        "precision": float(precision_score(gold_lists, pred_lists, zero_division=0)),
        "recall": float(recall_score(gold_lists, pred_lists, zero_division=0)),
        "f1": float(f1_score(gold_lists, pred_lists, zero_division=0)),
        "num_examples": len(gold_lists),
    }


def majority_label(train_labels: Sequence[str]) -> str:
    """The most frequent training label; ties go to the smallest label (sorted order)."""
    counts = Counter(train_labels)
    if not counts:
        raise ValueError("no training labels")
    return min(counts, key=lambda label: (-counts[label], label))


def majority_baseline(train_labels: Sequence[str], test_labels: Sequence[str]) -> dict:
    """classification_metrics of always predicting the most frequent training label."""
    label = majority_label(train_labels)
    return classification_metrics(list(test_labels), [label] * len(test_labels))


def ner_majority_baseline(test_tags: Sequence[Sequence[str]]) -> dict:
    """ner_metrics of predicting 'O' for every word (the majority tag): all zeros by construction."""
    return ner_metrics(test_tags, [["O"] * len(sentence) for sentence in test_tags])
