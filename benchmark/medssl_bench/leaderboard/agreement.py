"""Protocols side by side (``--protocol all``): for one dataset, each entry's numbers under
every protocol that has results for it, and whether the protocols agree on the ranking.

A view is one (dataset, backbone, metric): only results whose backbone and metric match are
put side by side. Its rows are (entry label, label fraction); its columns are the protocols
present (a protocol with results of several spec versions, or of several shared settings,
gets one column per version or setting: those are never pooled). A cell is the mean ± std
over seeds and n, as in the per-protocol leaderboard (:func:`.stats.aggregate`).

Entries are matched across protocols by (dataset, backbone, metric, label, fraction), the
baseline (scratch) included, never by ``Row.setup``: the setup hashes the protocol's own
config (a linear probe's solver, k-NN's k), so it differs between protocols by design.

Under the table: Spearman's rho and Kendall's tau-b (``scipy.stats``) between each pair of
columns over the entries both ranked, at each fraction both were run at (over the entries'
means: a rank correlation of the means is that of their ranks), and over each entry's mean
rank across the fractions its protocol ran (:func:`.stats.mean_ranks`), which also pairs
protocols run at different fractions (few-shot's N cases against data-efficiency's
percentages). Fewer than :data:`MIN_COMMON` common entries give no correlation ("-") and say
why; so do entries whose values are all tied in one column.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from itertools import combinations
from typing import Any

from scipy import stats

from medssl_bench.leaderboard.stats import Row, mean_ranks

#: The ``--protocol`` value that asks for this view (every protocol, side by side).
ALL_PROTOCOLS = "all"
#: A rank correlation over fewer entries than this is not shown (with 2 entries it is ±1).
MIN_COMMON = 3
VIEW_KEYS = ("dataset", "backbone", "metric")


@dataclass
class Cell:
    """One entry at one fraction under one protocol: mean ± std over seeds, n."""

    mean: float
    std: float
    n: int


@dataclass
class ViewRow:
    label: str
    fraction: float
    baseline: bool
    #: column name -> cell; a column without results for this entry and fraction is absent.
    cells: dict[str, Cell] = field(default_factory=dict)


@dataclass
class Correlation:
    """Spearman and Kendall between two columns over the entries both ranked."""

    a: str
    b: str
    #: The fraction both ranked the entries at; None: over each entry's mean rank.
    fraction: float | None
    n: int
    entries: list[str] = field(default_factory=list)
    spearman: float | None = None
    spearman_p: float | None = None
    kendall: float | None = None
    kendall_p: float | None = None
    #: Why there is no correlation ("" when there is one).
    reason: str = ""

    @property
    def scope(self) -> str:
        return "mean rank" if self.fraction is None else f"{self.fraction:g}%"


@dataclass
class ProtocolView:
    dataset: str
    backbone: str
    metric: str
    higher_is_better: bool
    columns: list[str]
    rows: list[ViewRow]
    correlations: list[Correlation]

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for c, obj in zip(data["correlations"], self.correlations, strict=True):
            c["scope"] = obj.scope
        return data


def _column_names(rows: list[Row]) -> dict[tuple, str]:
    """(protocol, spec_version, setup) -> column name: the protocol, with ``vN`` when it has
    several spec versions in the view and ``[setup]`` when several settings."""
    keys = sorted({(r.protocol, r.spec_version, r.setup) for r in rows})
    versions: dict[str, set[int]] = defaultdict(set)
    setups: dict[tuple, set[str]] = defaultdict(set)
    for p, v, s in keys:
        versions[p].add(v)
        setups[(p, v)].add(s)
    names = {}
    for p, v, s in keys:
        name = p + (f" v{v}" if len(versions[p]) > 1 else "")
        names[(p, v, s)] = name + (f" [{s[:6]}]" if len(setups[(p, v)]) > 1 else "")
    return names


def _nan_to_none(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def correlate(a: list[float], b: list[float]) -> tuple[float | None, float | None,
                                                     float | None, float | None, str]:
    """(spearman, its p, kendall tau-b, its p, reason): None and a reason when there are fewer
    than :data:`MIN_COMMON` values or one side is all ties (no ranking to compare)."""
    if len(a) < MIN_COMMON:
        return None, None, None, None, (f"only {len(a)} common entr{'y' if len(a) == 1 else 'ies'}"
                                        f"; a rank correlation needs at least {MIN_COMMON}")
    if len(set(a)) == 1 or len(set(b)) == 1:
        return None, None, None, None, "all tied in one protocol: no ranking to compare"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rho = stats.spearmanr(a, b)
        tau = stats.kendalltau(a, b)
    return (_nan_to_none(rho.statistic), _nan_to_none(rho.pvalue),
            _nan_to_none(tau.statistic), _nan_to_none(tau.pvalue), "")


def _pair(a: str, b: str, fraction: float | None, values_a: dict[str, float],
          values_b: dict[str, float]) -> Correlation:
    common = sorted(set(values_a) & set(values_b))
    rho, rho_p, tau, tau_p, reason = correlate([values_a[e] for e in common],
                                               [values_b[e] for e in common])
    return Correlation(a, b, fraction, len(common), common, rho, rho_p, tau, tau_p, reason)


def protocol_views(rows: list[Row]) -> list[ProtocolView]:
    """One :class:`ProtocolView` per (dataset, backbone, metric) of ``rows`` (the output of
    :func:`.stats.aggregate` over every protocol's results)."""
    by_view: dict[tuple, list[Row]] = defaultdict(list)
    for r in rows:
        by_view[tuple(getattr(r, k) for k in VIEW_KEYS)].append(r)
    views = []
    for (dataset, backbone, metric), entries in sorted(by_view.items()):
        names = _column_names(entries)
        # the protocol with the most results first (the full sweep), then by name
        size = Counter(names[(r.protocol, r.spec_version, r.setup)] for r in entries)
        columns = sorted(set(names.values()), key=lambda c: (-size[c], c))
        higher = entries[0].higher_is_better
        table: dict[tuple, ViewRow] = {}
        # column -> fraction -> label -> mean (ranking direction: higher is better)
        means: dict[str, dict[float, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
        for r in entries:
            column = names[(r.protocol, r.spec_version, r.setup)]
            row = table.setdefault((r.label, r.fraction), ViewRow(r.label, r.fraction, r.baseline))
            row.cells[column] = Cell(r.mean, r.std, r.n)
            means[column][r.fraction][r.label] = r.mean if higher else -r.mean
        # each entry's mean rank within its own protocol's section (lower = better)
        ranks: dict[str, dict[str, float]] = defaultdict(dict)
        for d in mean_ranks(entries):
            column = names[(d["protocol"], d["spec_version"], d["setup"])]
            ranks[column][d["label"]] = -d["mean_rank"]  # negated: higher = better, as means
        correlations = []
        for a, b in combinations(columns, 2):
            for fraction in sorted(set(means[a]) & set(means[b])):
                correlations.append(_pair(a, b, fraction, means[a][fraction],
                                          means[b][fraction]))
            correlations.append(_pair(a, b, None, ranks[a], ranks[b]))
        view_rows = sorted(table.values(), key=lambda v: (v.fraction, v.baseline, v.label))
        views.append(ProtocolView(dataset, backbone, metric, higher, columns, view_rows,
                                  correlations))
    return views
