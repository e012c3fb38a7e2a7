"""The leaderboard: finished fine-tunes from MLflow, aggregated over seeds."""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

from medssl_bench.tracking import Tracker

GROUP_KEYS = ("protocol", "spec_version", "dataset", "pretrain_dataset", "task", "backbone",
              "fraction", "metric")


@dataclass
class Row:
    protocol: str
    spec_version: int
    dataset: str
    pretrain_dataset: str
    task: str
    backbone: str
    fraction: float
    metric: str
    mean: float
    std: float
    n: int
    ci_low: float
    ci_high: float
    p_vs_scratch: float | None
    values: list[float]


def collect(tracker: Tracker) -> list[dict[str, Any]]:
    """One dict per finished fine-tune: grouping fields, seed, run key and main value."""
    out = []
    seen: set[str] = set()
    for run in sorted(tracker.finetune_runs(), key=lambda r: r.info.start_time, reverse=True):
        tags = run.data.tags
        key = tags.get("medssl_bench.run_key", run.info.run_id)
        if key in seen or "value" not in tags:  # a duplicate of a newer run, or incomplete
            continue
        seen.add(key)
        out.append({
            "protocol": tags.get("protocol", "?"),
            "spec_version": int(tags.get("spec_version", 0)),
            "dataset": tags.get("dataset", "?"),
            "pretrain_dataset": tags.get("pretrain_dataset", tags.get("dataset", "?")),
            "task": tags.get("task", "?"),
            "backbone": tags.get("backbone", "?"),
            "fraction": float(tags.get("fraction", "nan")),
            "metric": tags.get("metric", "?"),
            "seed": int(tags.get("seed", -1)),
            "value": float(tags["value"]),
        })
    return out


def _ci(values: np.ndarray) -> tuple[float, float]:
    if len(values) < 2:
        return math.nan, math.nan
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


def _welch(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 2 or len(b) < 2:
        return None
    p = stats.ttest_ind(a, b, equal_var=False).pvalue
    return None if math.isnan(p) else float(p)


def aggregate(results: list[dict[str, Any]]) -> list[Row]:
    """Mean, std, n and 95 % CI per group; Welch p-value against scratch at that fraction."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in results:
        groups[tuple(r[k] for k in GROUP_KEYS)].append(r["value"])
    rows = []
    for key, values in groups.items():
        fields = dict(zip(GROUP_KEYS, key, strict=True))
        arr = np.array(values, dtype=float)
        scratch_key = tuple("scratch" if k == "task" else fields[k] for k in GROUP_KEYS)
        p = None
        if fields["task"] != "scratch" and scratch_key in groups:
            p = _welch(arr, np.array(groups[scratch_key]))
        low, high = _ci(arr)
        rows.append(Row(**fields, mean=float(arr.mean()),
                        std=float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, n=len(arr),
                        ci_low=low, ci_high=high, p_vs_scratch=p, values=[float(v) for v in arr]))
    rows.sort(key=lambda r: (r.protocol, r.spec_version, r.dataset, r.pretrain_dataset,
                             r.backbone, r.fraction, -r.mean))
    return rows


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def as_json(rows: list[Row]) -> str:
    return json.dumps([{k: _clean(v) for k, v in asdict(r).items()} for r in rows], indent=2)


COLUMNS = ("protocol", "dataset", "task", "backbone", "fraction", "metric", "mean", "std", "n",
           "ci_low", "ci_high", "p_vs_scratch")


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:g}" if value.is_integer() else f"{value:.4f}"
    return str(value)


def as_csv(rows: list[Row]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(COLUMNS)
    for r in rows:
        writer.writerow([_clean(getattr(r, c)) for c in COLUMNS])
    return buf.getvalue()


def as_markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(getattr(r, c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def as_rich_table(rows: list[Row]):
    from rich.table import Table

    table = Table(title="medssl-bench leaderboard (test split, mean over seeds)")
    for c in ("protocol", "dataset", "backbone", "fraction", "task", "metric", "mean ± std", "n",
              "95% CI", "p vs scratch"):
        table.add_column(c, justify="right" if c in ("fraction", "n") else "left")
    previous = None
    for r in rows:
        group = (r.protocol, r.dataset, r.backbone, r.fraction)
        if previous is not None and group != previous:
            table.add_section()
        previous = group
        p = "-" if r.p_vs_scratch is None else (
            f"{r.p_vs_scratch:.3f}" + ("" if r.p_vs_scratch <= 0.05 else " n.s."))
        task = f"[bold]{r.task}[/bold]" if r.task != "scratch" else "[dim]scratch[/dim]"
        table.add_row(f"{r.protocol} v{r.spec_version}", r.dataset, r.backbone, f"{r.fraction:g}%",
                      task, r.metric, f"{r.mean:.4f} ± {r.std:.4f}", str(r.n),
                      f"[{_fmt(r.ci_low)}, {_fmt(r.ci_high)}]", p)
    return table
