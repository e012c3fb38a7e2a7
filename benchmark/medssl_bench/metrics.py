"""Downstream metrics: Dice for segmentation, AUC and accuracy for classification (as the
MedMNIST evaluator computes them), and quadratic weighted kappa for ordinal grades
(diabetic retinopathy, the Kaggle/APTOS metric)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import Tensor


def dice_per_case(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """Dice of each foreground class per case, shape ``(N, num_classes - 1)``.

    A class absent from both prediction and reference scores 1 (nothing to find, nothing
    found), so lesion-free cases reward not hallucinating a lesion.
    """
    n = pred.shape[0]
    pred = pred.reshape(n, -1)
    target = target.reshape(n, -1)
    scores = []
    for c in range(1, num_classes):
        p, t = pred == c, target == c
        inter = (p & t).sum(1).float()
        total = p.sum(1).float() + t.sum(1).float()
        scores.append(torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total)))
    return torch.stack(scores, dim=1)


def segmentation_metrics(dice: Tensor, class_names: tuple[str, ...]) -> dict[str, float]:
    """``dice_<class>`` per foreground class and ``dice_mean`` from per-case scores."""
    per_class = dice.mean(0)
    out = {f"dice_{name}": float(v) for name, v in zip(class_names[1:], per_class, strict=True)}
    out["dice_mean"] = float(per_class.mean())
    return out


def classification_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """AUC (binary: positive-class score; multi-class: mean one-vs-rest) and accuracy.

    ``scores`` are class probabilities ``(N, K)``. AUC is NaN when the labels hold a single
    class (it is undefined there); multi-class AUC averages the classes present.
    """
    from sklearn.metrics import roc_auc_score  # imported here: seconds at every worker's start

    labels = labels.astype(int)
    k = scores.shape[1]
    acc = float((scores.argmax(1) == labels).mean())
    present = [i for i in range(k) if 0 < (labels == i).sum() < len(labels)]
    if k == 2:
        auc = float(roc_auc_score(labels, scores[:, 1])) if len(present) == 2 else math.nan
    elif present:
        # MedMNIST averages one-vs-rest AUC over all classes; a class absent from a small
        # split has no AUC, so the mean runs over the classes present (not NaN for all).
        auc = float(np.mean([roc_auc_score(labels == i, scores[:, i]) for i in present]))
    else:
        auc = math.nan
    return {"auc": auc, "acc": acc, "kappa": quadratic_kappa(scores.argmax(1), labels, k)}


def quadratic_kappa(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Quadratic weighted Cohen's kappa (scikit-learn) of predicted against true classes.

    Reported for every classification dataset (it equals plain kappa for two classes);
    ordinal-grade datasets rank by it. NaN when it is undefined (one class everywhere).
    """
    from sklearn.metrics import cohen_kappa_score

    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns (and returns NaN) when undefined
        value = cohen_kappa_score(labels.astype(int), pred.astype(int),
                                  labels=list(range(num_classes)), weights="quadratic")
    return float(value)
