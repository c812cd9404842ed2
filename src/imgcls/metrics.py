"""Classification metrics: pure functions on probabilities (N, C) and integer targets (N,)."""

from __future__ import annotations

from typing import Any

import numpy as np


def topk_accuracy(probs: np.ndarray, targets: np.ndarray, k: int) -> float:
    """Share of rows whose target is among the k highest scores (k is capped at C)."""
    if len(targets) == 0:
        return float("nan")
    k = min(k, probs.shape[1])
    topk = np.argpartition(-probs, kth=k - 1, axis=1)[:, :k]
    return float(np.mean(np.any(topk == targets[:, None], axis=1)))


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, n_bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Guo et al. 2017)."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == targets
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def classification_metrics(probs: np.ndarray, targets: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Everything `imgcls evaluate` reports, as a JSON-ready dict."""
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    num_classes = len(class_names)
    labels = list(range(num_classes))
    preds = probs.argmax(axis=1)
    p, r, f, s = precision_recall_fscore_support(targets, preds, labels=labels, zero_division=0)
    present = s > 0  # balanced accuracy and macro-F1 over the classes that occur in the targets
    eps = 1e-12
    return {
        "num_samples": int(len(targets)),
        "accuracy": float(np.mean(preds == targets)) if len(targets) else float("nan"),
        "top5_accuracy": topk_accuracy(probs, targets, 5),
        "balanced_accuracy": float(balanced_accuracy_score(targets, preds)) if len(targets) else float("nan"),
        "macro_f1": float(f1_score(targets, preds, labels=[c for c in labels if present[c]], average="macro", zero_division=0)),
        "log_loss": float(-np.mean(np.log(probs[np.arange(len(targets)), targets] + eps))) if len(targets) else float("nan"),
        "ece": expected_calibration_error(probs, targets) if len(targets) else float("nan"),
        "per_class": {
            name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": confusion_matrix(targets, preds, labels=labels).tolist(),
    }


def most_confused(confusion: np.ndarray, class_names: list[str], top: int = 10) -> list[tuple[str, str, int]]:
    """(true, predicted, count) for the largest off-diagonal cells, largest first."""
    cm = np.asarray(confusion).copy()
    np.fill_diagonal(cm, 0)
    flat = np.argsort(-cm, axis=None)[:top]
    out = []
    for idx in flat:
        i, j = np.unravel_index(idx, cm.shape)
        if cm[i, j] > 0:
            out.append((class_names[i], class_names[j], int(cm[i, j])))
    return out


def format_confusion_matrix(confusion: np.ndarray, class_names: list[str]) -> str:
    """Plain-text confusion matrix: rows are true classes, columns predicted."""
    cm = np.asarray(confusion)
    names = [n[:12] for n in class_names]
    w = max(5, max(len(n) for n in names), len(str(cm.max())) + 1)
    head = " " * (w + 1) + " ".join(f"{n:>{w}}" for n in names)
    rows = [f"{n:>{w}} " + " ".join(f"{v:>{w}d}" for v in row) for n, row in zip(names, cm)]
    return "true \\ predicted\n" + head + "\n" + "\n".join(rows)
