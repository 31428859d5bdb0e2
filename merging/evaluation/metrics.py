"""Returns classification scores (accuracy, macro-F1) as plain floats in [0, 1]."""

from __future__ import annotations

import torch


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Returns the fraction of predictions equal to their label."""
    if len(labels) == 0:
        raise ValueError("accuracy of an empty split is undefined")
    return float((predictions == labels).float().mean())


def macro_f1(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Returns the unweighted mean over classes present in labels or predictions of per-class F1."""
    if len(labels) == 0:
        raise ValueError("macro-F1 of an empty split is undefined")
    classes = torch.unique(torch.cat([labels, predictions]))
    f1s = []
    for c in classes:
        tp = float(((predictions == c) & (labels == c)).sum())
        fp = float(((predictions == c) & (labels != c)).sum())
        fn = float(((predictions != c) & (labels == c)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(f1s) / len(f1s)


METRICS = {"accuracy": accuracy, "macro_f1": macro_f1}


def score(metric: str, predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Returns `metric` ("accuracy" or "macro_f1") of predictions against labels."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {sorted(METRICS)}")
    return METRICS[metric](predictions, labels)
