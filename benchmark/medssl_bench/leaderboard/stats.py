"""Leaderboard statistics: records aggregated over seeds into rows, t-tests against the
best entry and the baseline, ranks per fraction and across fractions, annotation saving."""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from medssl_bench.store import ResultRecord

GROUP_KEYS = ("protocol", "spec_version", "dataset", "pretrain_dataset", "task", "backbone",
              "fraction", "metric", "setup", "task_setup")
#: Entries ranked against each other: everything but task/pretraining corpus and fraction.
#: ``setup`` hashes the settings a task shares with its baseline (fine-tuning,
#: dataset and backbone configs), so results of different settings never pool or rank.
SECTION_KEYS = ("protocol", "spec_version", "dataset", "backbone", "metric", "setup")
ALPHA = 0.05


def _field(record: ResultRecord, key: str) -> Any:
    if key == "pretrain_dataset":  # the baseline pretrains on nothing: ""
        return record.pretrain_dataset or ""
    return getattr(record, key)


def group_key(record: ResultRecord, keys: tuple[str, ...]) -> tuple:
    """The grouping fields of a record (``pretrain_dataset`` "" for the baseline; runs
    recorded before setups were tagged have "" setups)."""
    return tuple(_field(record, k) for k in keys)


def section_of(record: ResultRecord) -> tuple:
    """The section (:data:`SECTION_KEYS`) a record is ranked in, as :attr:`Row.section`."""
    return group_key(record, SECTION_KEYS)


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
    setup: str
    task_setup: str
    mean: float
    std: float
    n: int
    ci_low: float
    ci_high: float
    p_vs_best: float | None
    p_vs_scratch: float | None
    label: str = ""
    rank: int = 0
    dataset_ref: str = ""
    values: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    #: Mean difference to the baseline (paired over common seeds where possible) and its
    #: 95 % CI (the row minus the baseline, whatever the metric's direction).
    delta_vs_scratch: float | None = None
    delta_ci_low: float | None = None
    delta_ci_high: float | None = None
    #: "paired" or "welch": the test behind p_vs_scratch; "" when none is possible (n < 2).
    p_test: str = ""
    #: The entry is the baseline the others are compared with (scratch).
    baseline: bool = False
    #: The metric's direction: False ranks ascending (a distance, an error).
    higher_is_better: bool = True
    #: The task's method family ("" for the baseline and records that do not say).
    family: str = ""

    @property
    def section(self) -> tuple:
        return tuple(getattr(self, k) for k in SECTION_KEYS)


def mean_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Two-sided t confidence interval of the mean (NaN with fewer than two values)."""
    if len(values) < 2:
        return math.nan, math.nan
    if values.std(ddof=1) == 0:
        return float(values.mean()), float(values.mean())
    half = stats.t.ppf(0.5 + level / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


def t_test(a: np.ndarray, b: np.ndarray, paired: bool) -> tuple[float | None, float, float]:
    """Two-sided t-test of ``a`` against ``b`` (paired, or Welch's): its p-value (None when
    undefined, e.g. no variance) and the 95 % CI of the mean difference (collapsed onto the
    difference when there is no variance at all)."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # near-identical values
        result = stats.ttest_rel(a, b) if paired else stats.ttest_ind(a, b, equal_var=False)
        ci = result.confidence_interval(0.95)
    p = None if result.pvalue is None or math.isnan(result.pvalue) else float(result.pvalue)
    if math.isnan(ci.low):
        delta = float((a - b).mean() if paired else a.mean() - b.mean())
        return p, delta, delta
    return p, float(ci.low), float(ci.high)


def compare(row: Row, other: Row) -> tuple[float | None, str, float, float, float]:
    """``row`` against ``other``: (p, "paired"|"welch", mean difference, its 95 % CI).

    Paired over the seeds both have (each seed once in each) when there are at least two;
    otherwise Welch on all values, with the difference of the means and a Welch interval; with
    a single value on either side no test at all (p None, test "", no interval).
    """
    mine = dict(zip(row.seeds, row.values, strict=False))  # rows built without seeds: Welch
    theirs = dict(zip(other.seeds, other.values, strict=False))
    common = sorted(set(mine) & set(theirs))
    unique = len(mine) == len(row.values) and len(theirs) == len(other.values)
    if unique and len(common) >= 2:
        a = np.array([mine[s] for s in common])
        b = np.array([theirs[s] for s in common])
        p, low, high = t_test(a, b, paired=True)
        return p, "paired", float((a - b).mean()), low, high
    a, b = np.array(row.values), np.array(other.values)
    delta = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:  # a single value on one side: a difference, but no test
        return None, "", delta, math.nan, math.nan
    p, low, high = t_test(a, b, paired=False)
    return p, "welch", delta, low, high


def aggregate(results: list[ResultRecord]) -> list[Row]:
    """Mean, std, n, 95 % CI per group; p-values against the best entry and against the
    baseline at the same fraction (paired over seeds where possible, see the package
    docstring), the difference to the baseline with its CI; rank per fraction (1 = best: the
    highest mean, or the lowest for a lower-is-better metric)."""
    groups: dict[tuple, list[tuple[int, float]]] = defaultdict(list)
    refs: dict[tuple, str] = {}
    entry: dict[tuple, ResultRecord] = {}
    for r in results:
        key = group_key(r, GROUP_KEYS)
        groups[key].append((r.seed, r.value))
        refs[key] = r.dataset_ref or r.dataset
        entry.setdefault(key, r)
    rows = []
    for key, entries in groups.items():
        entries.sort()
        fields = dict(zip(GROUP_KEYS, key, strict=True))
        arr = np.array([v for _, v in entries], dtype=float)
        low, high = mean_ci(arr)
        rows.append(Row(**fields, mean=float(arr.mean()),
                        std=float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, n=len(arr),
                        ci_low=low, ci_high=high, p_vs_best=None, p_vs_scratch=None,
                        label=entry[key].label, dataset_ref=refs[key],
                        values=[float(v) for v in arr], seeds=[s for s, _ in entries],
                        baseline=entry[key].baseline,
                        higher_is_better=entry[key].higher_is_better,
                        family=entry[key].family))
    setups: dict[tuple, set[str]] = defaultdict(set)
    for row in rows:
        setups[(*row.section, row.label)].add(row.task_setup)
    for row in rows:  # one task run with two configs: tell the rows apart
        if len(setups[(*row.section, row.label)]) > 1:
            row.label = f"{row.label} [{row.task_setup[:6]}]"
    by_fraction: dict[tuple, list[Row]] = defaultdict(list)
    for row in rows:
        by_fraction[(*row.section, row.fraction)].append(row)
    for entries in by_fraction.values():
        entries.sort(key=lambda r: -r.mean if r.higher_is_better else r.mean)
        best = entries[0]
        base = next((r for r in entries if r.baseline), None)
        for rank, row in enumerate(entries, 1):
            row.rank = rank
            if row is not best:
                row.p_vs_best = compare(row, best)[0]
            if base is not None and row is not base:
                (row.p_vs_scratch, row.p_test, row.delta_vs_scratch, row.delta_ci_low,
                 row.delta_ci_high) = compare(row, base)
    rows.sort(key=lambda r: (r.protocol, r.spec_version, r.dataset, r.backbone, r.metric,
                             r.fraction, r.rank))
    return rows


def mean_ranks(rows: list[Row]) -> list[dict[str, Any]]:
    """Ranking across fractions: each entry's mean rank over the fractions it was run at."""
    ranks: dict[tuple, list[int]] = defaultdict(list)
    means: dict[tuple, list[float]] = defaultdict(list)
    families: dict[tuple, str] = {}
    for r in rows:
        key = (*r.section, r.label)
        ranks[key].append(r.rank)
        means[key].append(r.mean)
        families[key] = r.family
    out = []
    for key, values in ranks.items():
        section = dict(zip(SECTION_KEYS, key[:-1], strict=True))
        out.append({**section, "label": key[-1], "mean_rank": float(np.mean(values)),
                    "fractions": len(values), "mean_of_means": float(np.mean(means[key])),
                    "family": families[key]})
    out.sort(key=lambda d: (*(d[k] for k in SECTION_KEYS), d["mean_rank"]))
    return out


def family_ranks(rows: list[Row]) -> list[dict[str, Any]]:
    """The leaderboard grouped by method family: per section and family, the mean of its
    entries' mean ranks (:func:`mean_ranks`), how many entries it has and its best entry.
    Entries without a family (the baseline, records that do not say) are left out."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for d in mean_ranks(rows):
        if d["family"]:
            groups[(*(d[k] for k in SECTION_KEYS), d["family"])].append(d)
    out = []
    for key, entries in groups.items():
        best = min(entries, key=lambda d: d["mean_rank"])
        out.append({**dict(zip(SECTION_KEYS, key[:-1], strict=True)), "family": key[-1],
                    "mean_rank": float(np.mean([d["mean_rank"] for d in entries])),
                    "entries": len(entries), "best_entry": best["label"]})
    out.sort(key=lambda d: (*(d[k] for k in SECTION_KEYS), d["mean_rank"]))
    return out


def annotation_saving(rows: list[Row]) -> list[dict[str, Any]]:
    """Models Genesis' annotation saving: the label fraction a pretrained entry needs to match
    the baseline (scratch) trained on all labels (100 %), by :func:`interpolate_fraction`
    (robust to a noisy mean at one fraction: the entry has to stay at least as good as the
    target from that fraction on, up to the largest fraction it was run at; "at least as
    good" is "at or below" for a lower-is-better metric).

    Per entry: ``fraction_needed`` and ``saving`` (None and ``reached`` False when the entry
    does not stay at scratch's 100 % score, e.g. when it is below it at 100 % itself),
    ``at_most`` when already matched at the smallest fraction (an upper bound), and the
    entry's difference to scratch at 100 % with its p-value and test (``delta_at_100``,
    ``p_at_100``, ``p_test_at_100``; None when the entry was not run at 100 %). Entries run at
    a single fraction get none: one point is no curve (e.g. the convergence protocol).
    """
    sections: dict[tuple, list[Row]] = defaultdict(list)
    for r in rows:
        sections[r.section].append(r)
    out = []
    for section, entries in sections.items():
        full = next((r for r in entries if r.baseline and r.fraction == 100), None)
        if full is None:
            continue
        curves: dict[str, list[Row]] = defaultdict(list)
        for r in entries:
            if not r.baseline:
                curves[r.label].append(r)
        for label, curve in curves.items():
            if len(curve) < 2:
                continue
            curve.sort(key=lambda r: r.fraction)
            needed = interpolate_fraction([r.fraction for r in curve], [r.mean for r in curve],
                                          full.mean, full.higher_is_better)
            at_100 = next((r for r in curve if r.fraction == 100), None)
            out.append({
                **dict(zip(SECTION_KEYS, section, strict=True)), "label": label,
                "task": curve[0].task, "pretrain_dataset": curve[0].pretrain_dataset,
                "scratch_100": full.mean, "fraction_needed": needed,
                "saving": None if needed is None else 1 - needed / 100,
                "reached": needed is not None,
                # already matched at the smallest measured fraction: an upper bound only
                "at_most": needed is not None and needed == curve[0].fraction,
                "fractions": [r.fraction for r in curve],
                "delta_at_100": None if at_100 is None else at_100.delta_vs_scratch,
                "p_at_100": None if at_100 is None else at_100.p_vs_scratch,
                "p_test_at_100": None if at_100 is None else at_100.p_test,
            })
    return out


def interpolate_fraction(fractions: list[float], means: list[float], target: float,
                         higher_is_better: bool = True) -> float | None:
    """The label fraction from which the curve through (fraction, mean), fractions ascending,
    stays at or above ``target`` (at or below it when not ``higher_is_better``).

    The fraction counted is the smallest measured one from which the mean is at or above
    ``target`` at *every* larger measured fraction; the result is interpolated linearly
    between it and the measured fraction just below it (whose mean is below ``target``).
    A mean above ``target`` at one fraction followed by one below it is noise, not a saving:
    it is ignored. None ("not reached") when the mean at the largest fraction is below
    ``target``, e.g. an entry below scratch at 100 %; the smallest measured fraction (an
    upper bound) when every mean is at or above ``target``.
    """
    if not higher_is_better:  # the same curve mirrored: "at or below" becomes "at or above"
        means, target = [-m for m in means], -target
    if not means or means[-1] < target:
        return None
    i = len(means) - 1
    while i > 0 and means[i - 1] >= target:
        i -= 1
    if i == 0:
        return float(fractions[0])
    f0, m0, f1, m1 = fractions[i - 1], means[i - 1], fractions[i], means[i]
    return float(f0 + (target - m0) * (f1 - f0) / (m1 - m0))
