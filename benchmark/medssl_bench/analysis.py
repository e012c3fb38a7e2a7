"""Convergence analysis (Taleb et al. Fig. 5): validation metric per epoch of pretrained and
scratch fine-tunes, and the epochs and wall time each needs to reach a share (95 % by
default) of scratch's final validation score.

The per-epoch values come from the result store's metric histories (``val_<metric>`` and
``elapsed_seconds``, logged by every fine-tune), so the analysis needs no extra artifacts
and works on runs of any protocol; protocols whose results offer the convergence figure
set ``target``. For a lower-is-better metric the target is reached at or below scratch's
final value divided by the share (0.95: within about 5 % of it).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from medssl_bench.interfaces import FIGURE_CONVERGENCE
from medssl_bench.leaderboard import filter_results, group_key
from medssl_bench.store import ResultRecord, ResultStore, as_store
from medssl_bench.tracking import Tracker

CURVE_KEYS = ("protocol", "spec_version", "dataset", "backbone", "fraction", "metric", "setup")


@dataclass
class ConvergenceRow:
    protocol: str
    spec_version: int
    dataset: str
    backbone: str
    fraction: float
    metric: str
    setup: str
    task: str
    pretrain_dataset: str
    label: str
    target: float
    scratch_final: float
    target_value: float
    final: float
    epochs_to_target: int | None
    seconds_to_target: float | None
    epochs: int
    n: int
    curve_mean: list[float] = field(default_factory=list)
    curve_std: list[float] = field(default_factory=list)
    seconds_mean: list[float] = field(default_factory=list)
    #: The baseline entry (scratch) the target is a share of.
    baseline: bool = False

    def describe(self) -> str:
        reach = ("not reached" if self.epochs_to_target is None else
                 f"epoch {self.epochs_to_target} ({self.seconds_to_target:.1f}s)")
        return (f"Convergence {self.label} @ {self.fraction:g}%: {100 * self.target:g}% of scratch's "
                f"final val {self.metric} ({self.target_value:.4f}) reached at {reach}; final "
                f"{self.final:.4f}")

    def as_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v)
                for k, v in asdict(self).items()}


def histories(store: ResultStore, run_id: str, metric: str) -> tuple[list[float], list[float]]:
    """(val metric per epoch, elapsed seconds per epoch) of one fine-tune run."""
    return store.history(run_id, f"val_{metric}"), store.history(run_id, "elapsed_seconds")


def _stack(curves: list[list[float]]) -> np.ndarray:
    length = min(len(c) for c in curves)
    return np.array([c[:length] for c in curves], dtype=float)


def convergence_table(
    store: ResultStore | Tracker,
    protocol: str | None = None,
    dataset: str | None = None,
    target: float | None = None,
    results: list[ResultRecord] | None = None,
) -> list[ConvergenceRow]:
    """One row per (curve group, task, pretraining corpus) that has a baseline reference.

    ``results`` (default: the store's results whose protocol offers the convergence figure,
    or all of ``protocol``'s) are filtered by ``protocol`` and ``dataset`` when given.
    """
    store = as_store(store)
    if results is None:
        results = store.results(protocol)
        if protocol is None:
            results = [r for r in results if FIGURE_CONVERGENCE in r.figures]
    results = filter_results(results, protocol=protocol, dataset=dataset)
    groups: dict[tuple, dict[tuple[str, str], list[ResultRecord]]] = defaultdict(
        lambda: defaultdict(list))
    for r in results:
        groups[group_key(r, CURVE_KEYS)][(r.task, r.pretrain_dataset or "")].append(r)
    rows: list[ConvergenceRow] = []
    for key, entries in groups.items():
        fields = dict(zip(CURVE_KEYS, key, strict=True))
        loaded = {}
        for entry_key, runs in entries.items():
            pairs = [histories(store, r.run_id, fields["metric"]) for r in runs if r.run_id]
            pairs = [(v, s) for v, s in pairs if v]
            if pairs:
                loaded[entry_key] = pairs
        first = {entry_key: runs[0] for entry_key, runs in entries.items()}
        scratch = next((v for k, v in loaded.items() if first[k].baseline), None)
        if scratch is None:
            continue
        share = target if target is not None else next(
            (r.target for runs in entries.values() for r in runs if r.target), 0.95)
        scratch_final = float(np.mean([v[-1] for v, _ in scratch]))
        higher = next(iter(first.values())).higher_is_better
        goal = share * scratch_final if higher else scratch_final / share
        for (task, pre), pairs in loaded.items():
            values = _stack([v for v, _ in pairs])
            mean = values.mean(0)
            secs = [s for _, s in pairs if s]
            seconds = _stack(secs).mean(0) if secs else np.full(len(mean), math.nan)
            hit = next((i for i, m in enumerate(mean) if (m >= goal if higher else m <= goal)),
                       None)
            record = first[(task, pre)]
            rows.append(ConvergenceRow(
                **fields, task=task, pretrain_dataset=pre, label=record.label,
                baseline=record.baseline,
                target=share, scratch_final=scratch_final, target_value=goal,
                final=float(mean[-1]), epochs_to_target=None if hit is None else hit + 1,
                seconds_to_target=None if hit is None or hit >= len(seconds)
                else float(seconds[hit]),
                epochs=len(mean), n=len(pairs), curve_mean=[float(x) for x in mean],
                curve_std=[float(x) for x in values.std(0, ddof=1)] if len(pairs) > 1
                else [0.0] * len(mean),
                seconds_mean=[float(x) for x in seconds],
            ))
    rows.sort(key=lambda r: (*(getattr(r, k) for k in CURVE_KEYS), r.baseline, r.label))
    return rows
