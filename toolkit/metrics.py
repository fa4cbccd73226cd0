"""Classification metrics from gathered predictions (scikit-learn does the maths)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, precision_recall_fscore_support


def classification_metrics(labels: np.ndarray, preds: np.ndarray, num_labels: int) -> dict[str, float]:
    """F1/precision/recall of the positive class (label 1) for binary tasks, macro for N classes."""
    average = "binary" if num_labels == 2 else "macro"
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, preds, average=average, labels=list(range(num_labels)) if average == "macro" else None,
        zero_division=0,
    )
    return {
        "f1": float(f1),
        "accuracy": float(accuracy_score(labels, preds)),
        "precision": float(precision),
        "recall": float(recall),
    }
