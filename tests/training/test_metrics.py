"""training.metrics against hand-computed examples."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from training import metrics

# 3 classes. true: 0 0 0 0 1 1 2 2 ; pred: 0 0 1 2 1 1 1 2
Y_TRUE = [0, 0, 0, 0, 1, 1, 2, 2]
Y_PRED = [0, 0, 1, 2, 1, 1, 1, 2]


def test_confusion_matrix_rows_are_true_columns_predicted() -> None:
    cm = metrics.confusion_matrix(Y_TRUE, Y_PRED, 3)
    expected = np.array([[2, 1, 1], [0, 2, 0], [0, 1, 1]])
    np.testing.assert_array_equal(cm, expected)
    # swapping the arguments transposes it: the order matters
    np.testing.assert_array_equal(metrics.confusion_matrix(Y_PRED, Y_TRUE, 3), expected.T)


def test_precision_and_recall_orientation() -> None:
    precision, recall, f1, support = metrics.per_class_precision_recall(Y_TRUE, Y_PRED, 3)
    # class 1: predicted 4 times, 2 right -> precision 0.5; 2 true, both found -> recall 1.0
    assert precision[1] == pytest.approx(0.5)
    assert recall[1] == pytest.approx(1.0)
    # class 0: predicted twice, both right -> precision 1.0; 4 true, 2 found -> recall 0.5
    assert precision[0] == pytest.approx(1.0)
    assert recall[0] == pytest.approx(0.5)
    assert precision[2] == pytest.approx(0.5) and recall[2] == pytest.approx(0.5)
    assert f1[0] == pytest.approx(2 / 3) and f1[1] == pytest.approx(2 / 3) and f1[2] == pytest.approx(0.5)
    np.testing.assert_array_equal(support, [4, 2, 2])


def test_summary_numbers() -> None:
    assert metrics.accuracy(Y_TRUE, Y_PRED) == pytest.approx(5 / 8)
    assert metrics.balanced_accuracy(Y_TRUE, Y_PRED, 3) == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert metrics.macro_f1(Y_TRUE, Y_PRED, 3) == pytest.approx((2 / 3 + 2 / 3 + 0.5) / 3)


def test_majority_classifier_on_imbalanced_data() -> None:
    y_true = [0] * 9 + [1]
    y_pred = [0] * 10
    assert metrics.accuracy(y_true, y_pred) == pytest.approx(0.9)
    assert metrics.balanced_accuracy(y_true, y_pred) == pytest.approx(0.5)
    # class 1 never predicted: precision 0 (zero division -> 0), f1 0
    p, r, _, _ = metrics.per_class_precision_recall(y_true, y_pred, 2)
    assert p[1] == 0.0 and r[1] == 0.0
    assert metrics.macro_f1(y_true, y_pred) == pytest.approx((2 * 0.9 / 1.9) / 2)


def test_bad_input_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="y_true has 2 labels"):
        metrics.accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="out of range"):
        metrics.confusion_matrix([0, 3], [0, 1], 3)


def test_report_and_png(tmp_path) -> None:
    rep = metrics.classification_report(Y_TRUE, Y_PRED, ["disk", "rod", "ring"])
    assert rep["per_class"]["rod"]["precision"] == pytest.approx(0.5)
    assert rep["per_class"]["rod"]["recall"] == pytest.approx(1.0)
    assert rep["n"] == 8 and rep["confusion_matrix"][0] == [2, 1, 1]
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert 0.0 <= rep[key] <= 1.0
    png = metrics.plot_confusion_matrix(rep["confusion_matrix"], ["disk", "rod", "ring"], tmp_path / "cm.png")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 100
