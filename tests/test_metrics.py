"""Metrics against hand-computed values and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from medssl_bench.metrics import classification_metrics, dice_per_case, segmentation_metrics


def test_dice_known_values():
    target = torch.tensor([[0, 1, 1, 1, 2, 2]])
    pred = torch.tensor([[0, 1, 1, 0, 2, 0]])
    dice = dice_per_case(pred, target, 3)
    assert dice[0, 0].item() == pytest.approx(2 * 2 / (2 + 3))
    assert dice[0, 1].item() == pytest.approx(2 * 1 / (1 + 2))
    empty = dice_per_case(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long), 3)
    assert empty.tolist() == [[1.0, 1.0]]
    m = segmentation_metrics(dice, ("background", "organ", "lesion"))
    assert m["dice_mean"] == pytest.approx((0.8 + 2 / 3) / 2)


def test_auc_binary_and_multiclass_like_medmnist():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 50)
    scores = rng.random((50, 2))
    scores /= scores.sum(1, keepdims=True)
    got = classification_metrics(scores, labels)
    assert got["auc"] == pytest.approx(roc_auc_score(labels, scores[:, 1]))
    assert got["acc"] == pytest.approx((scores.argmax(1) == labels).mean())
    labels3 = rng.integers(0, 3, 60)
    scores3 = rng.random((60, 3))
    expected = np.mean([roc_auc_score(labels3 == i, scores3[:, i]) for i in range(3)])
    assert classification_metrics(scores3, labels3)["auc"] == pytest.approx(expected)
    assert np.isnan(classification_metrics(scores, np.zeros(50, dtype=int))["auc"])


def test_multiclass_auc_over_present_classes():
    rng = np.random.default_rng(1)
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1])  # class 2 absent from this small split
    scores = rng.random((8, 3))
    expected = np.mean([roc_auc_score(labels == i, scores[:, i]) for i in (0, 1)])
    assert classification_metrics(scores, labels)["auc"] == pytest.approx(expected)
