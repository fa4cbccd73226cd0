"""Classification metrics from gathered predictions (scikit-learn does the maths)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, precision_recall_fscore_support


def f1_average(num_labels: int) -> str:
    """What the headline `f1` means, written next to it in metrics.json."""
    return "binary: class 1" if num_labels == 2 else "macro: unweighted mean over classes"


def classification_metrics(labels: np.ndarray, preds: np.ndarray, num_labels: int,
                           label_names: list[str] | None = None) -> dict[str, float]:
    """Binary: F1/precision/recall of the positive class (label 1) and accuracy.

    N classes: accuracy; macro F1 as the headline `f1` (each class counts the same, so a rare class
    is not hidden by a frequent one), macro precision/recall, weighted F1, and per class
    `precision[name]`, `recall[name]`, `f1[name]`.
    """
    if num_labels == 2:
        precision, recall, f1, _ = precision_recall_fscore_support(labels, preds, average="binary", zero_division=0)
        return {"f1": float(f1), "accuracy": float(accuracy_score(labels, preds)),
                "precision": float(precision), "recall": float(recall)}
    ids = list(range(num_labels))
    names = list(label_names) if label_names and len(label_names) == num_labels else [str(i) for i in ids]
    precision, recall, f1, _ = precision_recall_fscore_support(labels, preds, average="macro", labels=ids,
                                                               zero_division=0)
    weighted = precision_recall_fscore_support(labels, preds, average="weighted", labels=ids, zero_division=0)[2]
    per_p, per_r, per_f, _ = precision_recall_fscore_support(labels, preds, average=None, labels=ids, zero_division=0)
    metrics = {"f1": float(f1), "accuracy": float(accuracy_score(labels, preds)), "precision": float(precision),
               "recall": float(recall), "f1_weighted": float(weighted)}
    for name, p, r, f in zip(names, per_p, per_r, per_f):
        metrics.update({f"precision[{name}]": float(p), f"recall[{name}]": float(r), f"f1[{name}]": float(f)})
    return metrics


def training_metrics(state, peak_flops: float | None, world_size: int) -> dict:
    """Throughput of a finished training (a loop.TrainState): rates, padding, model FLOPs and MFU."""
    runtime = state.train_runtime_s
    return {
        "train_runtime_s": runtime,
        "train_samples_per_s": state.samples_seen / runtime if runtime else 0.0,
        "train_samples": state.samples_seen,
        "train_tokens_per_s": state.tokens_seen / runtime if runtime else 0.0,
        "train_padding_fraction": 1 - state.tokens_seen / state.padded_tokens_seen if state.padded_tokens_seen else 0.0,
        "train_model_tflops": state.model_flops / 1e12,
        "mfu": state.model_flops / runtime / (peak_flops * world_size) if peak_flops and runtime else None,
    }
