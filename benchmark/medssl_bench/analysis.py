"""Convergence analysis (Taleb et al. Fig. 5): validation metric per epoch of pretrained and
scratch fine-tunes, and the epochs and wall time each needs to reach a share (95 % by
default) of scratch's final validation score.

The per-epoch values come from MLflow metric histories (``val_<metric>`` and
``elapsed_seconds``, logged by every fine-tune), so the analysis needs no extra artifacts
and works on runs of any protocol; the ``convergence`` protocol is the one that sets
``target``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from medssl_bench.leaderboard import collect, filter_results, group_key, task_label
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

    def describe(self) -> str:
        reach = ("not reached" if self.epochs_to_target is None else
                 f"epoch {self.epochs_to_target} ({self.seconds_to_target:.1f}s)")
        return (f"Convergence {self.label} @ {self.fraction:g}%: {100 * self.target:g}% of scratch's "
                f"final val {self.metric} ({self.target_value:.4f}) reached at {reach}; final "
                f"{self.final:.4f}")

    def as_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v)
                for k, v in asdict(self).items()}


def histories(tracker: Tracker, run_id: str, metric: str) -> tuple[list[float], list[float]]:
    """(val metric per epoch, elapsed seconds per epoch) of one fine-tune run."""
    def series(key: str) -> list[float]:
        points = tracker.client.get_metric_history(run_id, key)
        by_step = {p.step: p.value for p in sorted(points, key=lambda p: p.timestamp)}
        return [by_step[s] for s in sorted(by_step)]

    return series(f"val_{metric}"), series("elapsed_seconds")


def _stack(curves: list[list[float]]) -> np.ndarray:
    length = min(len(c) for c in curves)
    return np.array([c[:length] for c in curves], dtype=float)


def convergence_table(
    tracker: Tracker,
    protocol: str | None = "convergence",
    dataset: str | None = None,
    target: float | None = None,
    results: list[dict[str, Any]] | None = None,
) -> list[ConvergenceRow]:
    """One row per (curve group, task, pretraining corpus) that has a scratch reference."""
    results = filter_results(results if results is not None else collect(tracker),
                             protocol=protocol, dataset=dataset)
    groups: dict[tuple, dict[tuple[str, str], list[dict[str, Any]]]] = defaultdict(
        lambda: defaultdict(list))
    for r in results:
        groups[group_key(r, CURVE_KEYS)][(r["task"], r["pretrain_dataset"])].append(r)
    rows: list[ConvergenceRow] = []
    for key, entries in groups.items():
        fields = dict(zip(CURVE_KEYS, key, strict=True))
        loaded = {}
        for entry_key, runs in entries.items():
            pairs = [histories(tracker, r["run_id"], fields["metric"]) for r in runs]
            pairs = [(v, s) for v, s in pairs if v]
            if pairs:
                loaded[entry_key] = pairs
        scratch = next((v for (t, _), v in loaded.items() if t == "scratch"), None)
        if scratch is None:
            continue
        share = target if target is not None else next(
            (r["target"] for runs in entries.values() for r in runs if r.get("target")), 0.95)
        scratch_final = float(np.mean([v[-1] for v, _ in scratch]))
        goal = share * scratch_final
        for (task, pre), pairs in loaded.items():
            values = _stack([v for v, _ in pairs])
            mean = values.mean(0)
            secs = [s for _, s in pairs if s]
            seconds = _stack(secs).mean(0) if secs else np.full(len(mean), math.nan)
            hit = next((i for i, m in enumerate(mean) if m >= goal), None)
            rows.append(ConvergenceRow(
                **fields, task=task, pretrain_dataset=pre,
                label=task_label(task, pre, fields["dataset"], fields["protocol"]),
                target=share, scratch_final=scratch_final, target_value=goal,
                final=float(mean[-1]), epochs_to_target=None if hit is None else hit + 1,
                seconds_to_target=None if hit is None or hit >= len(seconds)
                else float(seconds[hit]),
                epochs=len(mean), n=len(pairs), curve_mean=[float(x) for x in mean],
                curve_std=[float(x) for x in values.std(0, ddof=1)] if len(pairs) > 1
                else [0.0] * len(mean),
                seconds_mean=[float(x) for x in seconds],
            ))
    rows.sort(key=lambda r: (*(getattr(r, k) for k in CURVE_KEYS), r.task == "scratch", r.label))
    return rows
