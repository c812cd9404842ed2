"""imgcls.metrics on hand-made inputs whose answers are worked out by hand in the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest

from imgcls.metrics import classification_metrics, expected_calibration_error, format_confusion_matrix, most_confused, topk_accuracy


def test_topk_accuracy():
    probs = np.array(
        [
            [0.70, 0.20, 0.10],  # target 0: top-1
            [0.10, 0.60, 0.30],  # target 2: second
            [0.20, 0.30, 0.50],  # target 0: third
            [0.05, 0.15, 0.80],  # target 2: top-1
        ]
    )
    targets = np.array([0, 2, 0, 2])
    assert topk_accuracy(probs, targets, 1) == 0.5
    assert topk_accuracy(probs, targets, 2) == 0.75
    assert topk_accuracy(probs, targets, 3) == 1.0
    assert topk_accuracy(probs, targets, 5) == 1.0  # k is capped at the number of classes
    assert math.isnan(topk_accuracy(np.zeros((0, 3)), np.zeros(0, dtype=int), 1))


def test_ece_one_bin():
    # four predictions at confidence 0.9, three right: |0.75 - 0.9| = 0.15
    probs = np.array([[0.9, 0.1]] * 4)
    assert expected_calibration_error(probs, np.array([0, 0, 0, 1])) == pytest.approx(0.15)


def test_ece_two_bins_weighted_by_share():
    # bin of 0.6: 2 of 2 right (|1 - 0.6| = 0.4); bin of 0.9: 1 of 2 right (|0.5 - 0.9| = 0.4); each half the rows
    probs = np.array([[0.6, 0.4], [0.4, 0.6], [0.9, 0.1], [0.1, 0.9]])
    targets = np.array([0, 1, 0, 0])
    assert expected_calibration_error(probs, targets) == pytest.approx(0.4)
    # one wide bin puts all four together: accuracy 0.75, mean confidence 0.75
    assert expected_calibration_error(probs, targets, n_bins=1) == pytest.approx(0.0)


def test_ece_perfect_confidence_one():
    probs = np.eye(3)  # confidence exactly 1.0 falls in the last bin, not past it
    assert expected_calibration_error(probs, np.array([0, 1, 2])) == 0.0
    assert expected_calibration_error(probs, np.array([1, 2, 0])) == 1.0


def _hand_case(extra_class: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    # targets a a b b c c, predictions a b b b c a; the predicted class gets 0.6, the others 0.2
    targets = np.array([0, 0, 1, 1, 2, 2])
    preds = [0, 1, 1, 1, 2, 0]
    probs = np.full((6, 4 if extra_class else 3), 0.2)
    if extra_class:
        probs[:, 3] = 0.0  # class d: never the target, never predicted
    probs[np.arange(6), preds] = 0.6
    return probs, targets, ["a", "b", "c", "d"] if extra_class else ["a", "b", "c"]


@pytest.mark.parametrize("extra_class", [False, True])
def test_classification_metrics_hand_case(extra_class):
    probs, targets, names = _hand_case(extra_class)
    m = classification_metrics(probs, targets, names)
    assert set(m) == {
        "num_samples",
        "accuracy",
        "top5_accuracy",
        "balanced_accuracy",
        "macro_f1",
        "log_loss",
        "ece",
        "per_class",
        "confusion_matrix",
    }
    assert m["num_samples"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["top5_accuracy"] == 1.0
    # recalls a 1/2, b 2/2, c 1/2
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)
    # precisions a 1/2, b 2/3, c 1/1 -> F1 a 0.5, b 0.8, c 2/3; macro over the classes present (not d)
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["log_loss"] == pytest.approx(-(4 * math.log(0.6) + 2 * math.log(0.2)) / 6, rel=1e-6)
    assert m["ece"] == pytest.approx(abs(4 / 6 - 0.6))  # every row at confidence 0.6
    assert m["per_class"]["a"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert m["per_class"]["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert m["per_class"]["c"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    expected_cm = [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    if extra_class:
        assert m["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
        expected_cm = [row + [0] for row in expected_cm] + [[0, 0, 0, 0]]
    assert m["confusion_matrix"] == expected_cm
    assert list(m["per_class"]) == names  # in class order, JSON-ready plain types
    assert all(type(v) in (int, float) for pc in m["per_class"].values() for v in pc.values())


CM = np.array([[5, 3, 0], [1, 4, 2], [0, 7, 6]])


def test_most_confused_largest_off_diagonal_first():
    assert most_confused(CM, ["a", "b", "c"]) == [("c", "b", 7), ("a", "b", 3), ("b", "c", 2), ("b", "a", 1)]  # zeros left out
    assert most_confused(CM, ["a", "b", "c"], top=2) == [("c", "b", 7), ("a", "b", 3)]
    assert most_confused(np.diag([3, 4]), ["x", "y"]) == []
    assert CM[2, 2] == 6  # the input is not changed (the diagonal is zeroed on a copy)


def test_format_confusion_matrix_text():
    text = format_confusion_matrix(CM, ["a", "b", "c"])
    assert text == ("true \\ predicted\n          a     b     c\n    a     5     3     0\n    b     1     4     2\n    c     0     7     6")
    long = format_confusion_matrix(np.array([[12345, 0], [1, 2]]), ["a_very_long_class_name", "b"])
    lines = long.splitlines()
    assert "a_very_long_" in lines[1] and "a_very_long_c" not in long  # names cut at 12 characters
    assert len({len(line) for line in lines[1:]}) == 1  # columns line up
    assert lines[2].split() == ["a_very_long_", "12345", "0"]
