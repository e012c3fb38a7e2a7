"""Frozen-encoder evaluation: features of a frozen encoder, and the probes read on them.

- :func:`encode`: one pass of a frozen encoder (eval mode, no gradients, bf16 autocast on
  CUDA) over a labelled split, pooled to one vector per image: the deepest level's global
  average (``deepest``, :func:`medssl_bench.interfaces.global_pool`) or every level's,
  concatenated (``all``).
- :func:`logistic_probe`: a scikit-learn logistic regression on standardised features, its
  ``C`` chosen on the validation split by the protocol's metric.
- :func:`knn_scores`: cosine k-NN with temperature-weighted votes, as solo-learn computes it
  (``exp(similarity / T)`` summed per class over the ``k`` nearest training cases).

Everything here is a pure function of tensors; :func:`medssl_bench.units.run_probe` caches
the features and records the results.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from torch.utils.data import Dataset as TorchDataset

from medssl_bench.engine import pad_to_multiple
from medssl_bench.interfaces import Encoder, global_pool
from medssl_bench.metrics import classification_metrics
from medssl_bench.runtime import Runtime

POOLINGS = ("deepest", "all")
#: The probes (:class:`medssl_bench.plan.Probe` ``kind``).
PROBE_LOGISTIC = "logistic"
PROBE_KNN = "knn"  # the name of a probe, which the knn protocol shares
PROBES = (PROBE_LOGISTIC, PROBE_KNN)


def pool(features: list[Tensor], pooling: str) -> Tensor:
    """One vector per image from an encoder's multi-scale features."""
    if pooling == "deepest":
        return global_pool(features)
    if pooling == "all":
        return torch.cat([f.flatten(2).mean(-1) for f in features], dim=1)
    raise ValueError(f"pooling {pooling!r}: choose one of {', '.join(POOLINGS)}")


@torch.no_grad()
def encode(encoder: Encoder, dataset: TorchDataset, runtime: Runtime, multiple: int,
           pooling: str = "deepest", batch_size: int = 4) -> tuple[Tensor, Tensor]:
    """Pooled features ``(N, D)`` (float32, CPU) and labels ``(N,)`` of ``dataset``. Under
    DDP each process encodes its share of the batches one process would (``Runtime.shard``)
    and every process gets all of them, in case order."""
    encoder.eval()
    cases = runtime.shard(len(dataset), batch_size)  # type: ignore[arg-type]
    source = dataset if runtime.world_size == 1 else Subset(dataset, cases)
    feats, labels = [], []
    for images, targets in DataLoader(source, batch_size=batch_size, shuffle=False):
        images, _ = pad_to_multiple(runtime.to_device(images), multiple)
        with runtime.autocast():
            out = encoder(images)
        feats.append(pool([f.float() for f in out], pooling).cpu())
        labels.append(torch.as_tensor(targets).reshape(-1).long())
    if runtime.world_size > 1:
        parts = [part for part in runtime.gather((cases, feats, labels)) if part[0]]
        order = torch.tensor([case for part in parts for case in part[0]]).argsort()
        feats = [torch.cat([torch.cat(part[1]) for part in parts])[order]]
        labels = [torch.cat([torch.cat(part[2]) for part in parts])[order]]
    return torch.cat(feats), torch.cat(labels)


def _full_scores(proba: np.ndarray, seen: Sequence[int], num_classes: int) -> np.ndarray:
    """Probabilities over all ``num_classes`` from a model that saw only ``seen`` classes."""
    out = np.zeros((proba.shape[0], num_classes))
    out[:, list(seen)] = proba
    return out


def _score(values: dict[str, float], metric: str, lower_is_better: bool) -> float:
    value = values.get(metric, math.nan)
    return -value if lower_is_better else value


def logistic_probe(
    train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, test_x: Tensor,
    num_classes: int, c_grid: Sequence[float], metric: str = "auc",
    lower_is_better: bool = False, seed: int = 0,
) -> tuple[np.ndarray, float, list[dict[str, float]]]:
    """Test scores ``(N_test, num_classes)`` of the logistic regression whose ``C`` scores
    best on validation, that ``C``, and the search (``{"C", "val_<metric>", ...}`` per C).

    Features are standardised on the training features. A subset holding a single class
    (a tiny label fraction) has nothing to separate: every case gets that class (AUC 0.5 or
    undefined). A ``C`` whose validation metric is undefined (a one-class validation split)
    loses to any defined one; when all are undefined the middle of the grid is kept.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    xs, ys = train_x.numpy().astype(np.float64), train_y.numpy()
    classes = sorted(set(ys.tolist()))
    if len(classes) < 2:
        const = np.zeros((len(test_x), num_classes))
        const[:, classes[0]] = 1.0
        return const, math.nan, []
    scaler = StandardScaler().fit(xs)
    xs = scaler.transform(xs)
    xv = scaler.transform(val_x.numpy().astype(np.float64))
    xt = scaler.transform(test_x.numpy().astype(np.float64))
    grid = list(c_grid)
    history, best, models = [], None, []
    for c in grid:
        model = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(xs, ys)
        models.append(model)
        val = classification_metrics(_full_scores(model.predict_proba(xv), model.classes_,
                                                  num_classes), val_y.numpy())
        history.append({"C": float(c), **{f"val_{k}": v for k, v in val.items()}})
        score = _score(val, metric, lower_is_better)
        if not math.isnan(score) and (best is None or score > best[0]):
            best = (score, len(models) - 1)
    chosen = best[1] if best is not None else len(grid) // 2
    model = models[chosen]
    scores = _full_scores(model.predict_proba(xt), model.classes_, num_classes)
    return scores, float(grid[chosen]), history


def knn_scores(train_x: Tensor, train_y: Tensor, query_x: Tensor, num_classes: int,
               k: int = 20, temperature: float = 0.07) -> np.ndarray:
    """Class scores ``(N_query, num_classes)`` of a cosine k-NN (solo-learn's weighted k-NN):
    each of the ``k`` most similar training cases (cosine similarity ``s``) votes
    ``exp(s / temperature)`` for its class; the votes are normalised to sum to one."""
    train = torch.nn.functional.normalize(train_x.double(), dim=1)
    query = torch.nn.functional.normalize(query_x.double(), dim=1)
    sim = query @ train.T
    k = min(k, train.shape[0])
    top, idx = sim.topk(k, dim=1)
    weights = (top / temperature).exp()
    onehot = torch.nn.functional.one_hot(train_y[idx], num_classes).double()
    votes = (onehot * weights[..., None]).sum(1)
    return (votes / votes.sum(1, keepdim=True)).numpy()


def knn_probe(labelled: TorchDataset, queries: TorchDataset, info: Any, runtime: Runtime,
              multiple: int, k: int = 20, temperature: float = 0.07,
              batch_size: int = 4) -> Callable[[Encoder], dict[str, float]]:
    """A k-NN probe for ``pretrain(probe=...)``: the encoder's pooled features of
    ``labelled`` vote (:func:`knn_scores`) for the classes of ``queries``; returns the
    dataset's metrics as ``probe_<metric>``. The encoder is left in eval mode (the loop puts
    it back in train mode at the next epoch)."""

    def probe(encoder: Encoder) -> dict[str, float]:
        train_x, train_y = encode(encoder, labelled, runtime, multiple, batch_size=batch_size)
        query_x, query_y = encode(encoder, queries, runtime, multiple, batch_size=batch_size)
        scores = knn_scores(train_x, train_y, query_x, info.num_classes, k, temperature)
        metrics = classification_metrics(scores, query_y.numpy())
        return {f"probe_{name}": value for name, value in metrics.items()}

    return probe
