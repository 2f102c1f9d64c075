"""Classification metrics (numpy only) and a confusion-matrix figure.

Conventions, fixed once here so that no caller can swap them:

* every function takes ``(y_true, y_pred)`` in that order (as scikit-learn does);
* the confusion matrix has **rows = true class, columns = predicted class**;
* precision of class k = ``cm[k, k] / cm[:, k].sum()`` (of the images *predicted* k, how many are k),
  recall of class k = ``cm[k, k] / cm[k, :].sum()`` (of the images that *are* k, how many were found).

A ratio whose denominator is zero is reported as 0.0 (scikit-learn's ``zero_division=0``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nanomorph.atomic import atomic_path


def _as_labels(y_true: Any, y_pred: Any, n_classes: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    t = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(y_pred, dtype=np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} labels, y_pred {p.size}")
    if t.size and (t.min() < 0 or p.min() < 0):
        raise ValueError("class indices must be >= 0")
    if n_classes is None:
        n_classes = int(max(t.max(initial=-1), p.max(initial=-1)) + 1)
    elif t.size and max(t.max(), p.max()) >= n_classes:
        raise ValueError(f"class index {max(t.max(), p.max())} out of range for {n_classes} classes")
    return t, p, n_classes


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros_like(num)
    np.divide(num, den, out=out, where=den > 0)
    return out


def confusion_matrix(y_true: Any, y_pred: Any, n_classes: int | None = None) -> np.ndarray:
    """Counts ``cm[i, j]`` = number of images of true class i predicted as class j (int64, C×C)."""
    t, p, c = _as_labels(y_true, y_pred, n_classes)
    cm = np.zeros((c, c), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    return cm


def accuracy(y_true: Any, y_pred: Any) -> float:
    """Fraction of correct predictions (0.0 for no samples)."""
    t, p, _ = _as_labels(y_true, y_pred, None)
    return float((t == p).mean()) if t.size else 0.0


def per_class_precision_recall(
    y_true: Any, y_pred: Any, n_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall, F1 and support (number of true images) as arrays of length C."""
    cm = confusion_matrix(y_true, y_pred, n_classes)
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0)  # column sums: how often each class was predicted
    support = cm.sum(axis=1)  # row sums: how many images truly are each class
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    return precision, recall, f1, support


def balanced_accuracy(y_true: Any, y_pred: Any, n_classes: int | None = None) -> float:
    """Mean recall over the classes present in ``y_true`` (Brodersen et al., ICPR 2010).

    Equal to accuracy on balanced data; a classifier that always predicts the majority class scores
    1/C however imbalanced the data are.
    """
    _, recall, _, support = per_class_precision_recall(y_true, y_pred, n_classes)
    present = support > 0
    return float(recall[present].mean()) if present.any() else 0.0


def macro_f1(y_true: Any, y_pred: Any, n_classes: int | None = None) -> float:
    """Unweighted mean F1 over the classes that occur in ``y_true`` or ``y_pred``.

    Matches ``sklearn.metrics.f1_score(average="macro", zero_division=0)`` without an explicit
    ``labels`` argument.
    """
    cm = confusion_matrix(y_true, y_pred, n_classes)
    _, _, f1, _ = per_class_precision_recall(y_true, y_pred, cm.shape[0])
    seen = (cm.sum(axis=0) + cm.sum(axis=1)) > 0
    return float(f1[seen].mean()) if seen.any() else 0.0


def classification_report(y_true: Any, y_pred: Any, class_names: Sequence[str]) -> dict[str, Any]:
    """All the numbers ``metrics.json`` holds for one evaluation split.

    Returns:
        ``{"accuracy", "balanced_accuracy", "macro_f1", "n", "per_class": {name: {"precision",
        "recall", "f1", "support"}}, "confusion_matrix": [[...]] (rows true, columns predicted)}``.
    """
    n_classes = len(class_names)
    cm = confusion_matrix(y_true, y_pred, n_classes)
    precision, recall, f1, support = per_class_precision_recall(y_true, y_pred, n_classes)
    return {
        "accuracy": accuracy(y_true, y_pred),
        "balanced_accuracy": balanced_accuracy(y_true, y_pred, n_classes),
        "macro_f1": macro_f1(y_true, y_pred, n_classes),
        "n": int(cm.sum()),
        "per_class": {
            name: {
                "precision": float(precision[k]),
                "recall": float(recall[k]),
                "f1": float(f1[k]),
                "support": int(support[k]),
            }
            for k, name in enumerate(class_names)
        },
        "confusion_matrix": cm.tolist(),
        "confusion_matrix_axes": "rows = true class, columns = predicted class",
    }


def plot_confusion_matrix(
    cm: Any, class_names: Sequence[str], path: str | Path, title: str = "Confusion matrix (test)"
) -> Path:
    """Writes a confusion-matrix PNG: colour = row-normalised fraction (recall), text = counts.

    Rows are the true class, columns the predicted class (axes are labelled so).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(cm, dtype=np.int64)
    frac = _safe_div(counts, counts.sum(axis=1, keepdims=True))
    n = len(class_names)
    side = max(3.5, 0.7 * n + 2.0)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    ax.set_xticks(range(n), labels=list(class_names), rotation=45, ha="right")
    ax.set_yticks(range(n), labels=list(class_names))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                str(counts[i, j]),
                ha="center",
                va="center",
                color="white" if frac[i, j] > 0.5 else "black",
                fontsize=9,
            )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return Path(path)
