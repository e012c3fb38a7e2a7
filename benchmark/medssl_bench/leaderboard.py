"""The leaderboard: finished fine-tunes from MLflow, aggregated over seeds.

Per (task, pretraining corpus, fraction): mean, std, n, 95 % t confidence interval, the
difference to scratch with its 95 % interval, t-tests against the best entry and against
scratch at that fraction (Models Genesis reports t-tests over trials), a rank per fraction and
the mean rank across fractions, the annotation saving of Models Genesis (see
:func:`interpolate_fraction`), and published reference rows where dataset and metric match.

Comparisons are paired where the design pairs them: a seed fixes the label subset (and the
fine-tuning initialisation), so a task and scratch at the same seed saw the same labels, and
the difference per seed removes the subset-to-subset variance that dominates at small
fractions. With at least two seeds in common the paired t-test (and a CI of the mean
difference) is used; otherwise Welch's t-test on the two samples. ``p_test`` says which, and
is empty when either side has a single value: then only the difference of the means is
shown, no test is possible.

Results are only ever ranked inside one (protocol, spec version, dataset, backbone, metric):
a spec version bump means the numbers stopped being comparable, so each version is its own
section and never shares a ranking with another.
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np
import yaml
from scipy import stats

from medssl_bench.errors import BenchError, did_you_mean
from medssl_bench.tracking import Tracker

GROUP_KEYS = ("protocol", "spec_version", "dataset", "pretrain_dataset", "task", "backbone",
              "fraction", "metric", "setup", "task_setup")
#: Entries ranked against each other: everything but task/pretraining corpus and fraction.
#: ``setup`` hashes the settings a task shares with its scratch baseline (fine-tuning,
#: dataset and backbone configs), so results of different settings never pool or rank.
SECTION_KEYS = ("protocol", "spec_version", "dataset", "backbone", "metric", "setup")
ALPHA = 0.05


def group_key(result: dict[str, Any], keys: tuple[str, ...]) -> tuple:
    """The grouping fields of a result; runs recorded before setups were tagged have none."""
    return tuple(result.get(k, "") if k in ("setup", "task_setup") else result[k] for k in keys)


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
    #: Mean difference to scratch (paired over common seeds where possible) and its 95 % CI.
    delta_vs_scratch: float | None = None
    delta_ci_low: float | None = None
    delta_ci_high: float | None = None
    #: "paired" or "welch": the test behind p_vs_scratch; "" when none is possible (n < 2).
    p_test: str = ""

    @property
    def section(self) -> tuple:
        return tuple(getattr(self, k) for k in SECTION_KEYS)


def task_label(task: str, pretrain_dataset: str, dataset: str, protocol: str) -> str:
    """``rotation3d (pretrained on A)`` when the corpus is not obvious from the row."""
    if task == "scratch" or not pretrain_dataset:
        return task
    if pretrain_dataset != dataset or protocol == "transfer":
        return f"{task} (pretrained on {pretrain_dataset})"
    return task


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
        task = tags.get("task", "?")
        pretrain_dataset = tags.get("pretrain_dataset", tags.get("dataset", "?"))
        out.append({
            "protocol": tags.get("protocol", "?"),
            "spec_version": int(tags.get("spec_version", 0)),
            "dataset": tags.get("dataset", "?"),
            "pretrain_dataset": "" if task == "scratch" or pretrain_dataset == "-" else pretrain_dataset,
            "task": task,
            "backbone": tags.get("backbone", "?"),
            "fraction": float(tags.get("fraction", "nan")),
            "metric": tags.get("metric", "?"),
            "seed": int(tags.get("seed", -1)),
            "value": float(tags["value"]),
            "dataset_ref": tags.get("dataset_ref", tags.get("dataset", "?")),
            "target": float(tags["target"]) if "target" in tags else None,
            "run_id": run.info.run_id,
            "setup": tags.get("setup", ""),
            "task_setup": tags.get("task_setup", ""),
        })
    return out


def filter_results(results: list[dict[str, Any]], protocol: str | None = None,
                   dataset: str | None = None, task: str | None = None,
                   spec_version: int | None = None) -> list[dict[str, Any]]:
    """Filter; scratch is always kept with a task filter (it is the reference)."""
    if protocol:
        results = [r for r in results if r["protocol"] == protocol]
    if dataset:
        results = [r for r in results if r["dataset"] == dataset]
    if task:
        wanted = {t.strip() for t in task.split(",")}
        results = [r for r in results if r["task"] in wanted | {"scratch"}]
    if spec_version is not None:
        results = [r for r in results if r["spec_version"] == spec_version]
    return results


class NoMatchingResults(BenchError):
    """The store has finished results, but the filters select none of them."""

    exit_code = 1


def _registered(kind: str) -> set[str] | None:
    """Installed plugin names of ``kind``; None when the registry cannot be built."""
    try:
        from medssl_bench.plugins import get_registry

        return set(get_registry().names(kind))
    except Exception:  # the hint is optional; never fail the leaderboard for it
        return None


def select(results: list[dict[str, Any]], protocol: str | None = None,
           dataset: str | None = None, task: str | None = None,
           spec_version: int | None = None) -> list[dict[str, Any]]:
    """:func:`filter_results`, refusing a filter that selects nothing.

    An empty store gives an empty list (nothing run yet). A filter that matches no result
    raises: :class:`NoMatchingResults` (exit 1) naming the filter and the values that do have
    results, or a plain :class:`BenchError` (exit 2) when the name is not even an installed
    plugin (a typo), with a did-you-mean hint. A task filter always keeps scratch, so it
    counts as matching only when one of the named tasks other than scratch has results.
    """
    wanted_tasks = {t.strip() for t in task.split(",")} - {"scratch"} if task else set()
    checks: list[tuple[str, str, str, Any]] = []  # (option, field, plugin kind, value)
    if protocol:
        checks.append(("--protocol", "protocol", "protocol", protocol))
    if dataset:
        checks.append(("--dataset", "dataset", "dataset", dataset))
    if spec_version is not None:
        checks.append(("--spec-version", "spec_version", "", spec_version))
    checks += [("--task", "task", "task", t) for t in sorted(wanted_tasks)]
    present = {field_: {r[field_] for r in results} for _, field_, _, _ in checks}
    for option, field_, kind, value in checks:  # typos first, even in an empty store
        if kind and value not in present[field_]:
            known = _registered(kind)
            if known is not None and value not in known:
                have = present[field_]
                where = (f"Finished results exist for {kind}: {', '.join(sorted(have))}." if have
                         else f"Installed {kind}s: {', '.join(sorted(known))}.")
                raise BenchError(f"Unknown {kind} {value!r} ({option})."
                                 f"{did_you_mean(value, known | have)} {where}")
    if not results:
        return []
    selected = filter_results(results, protocol, dataset, task, spec_version)
    matched = (any(r["task"] in wanted_tasks for r in selected) if wanted_tasks
               else bool(selected))
    if matched:
        return selected
    # Which filter empties the selection: apply them one by one, in the order above.
    steps = [(option, field_, value) for option, field_, _, value in checks if option != "--task"]
    if wanted_tasks:
        steps.append(("--task", "task", ",".join(sorted(wanted_tasks))))
    narrowed = results
    applied: list[str] = []
    for option, field_, value in steps:
        kind = {"protocol": "protocol", "dataset": "dataset"}.get(field_, "")
        after = [r for r in narrowed
                 if (r["task"] in wanted_tasks if option == "--task" else r[field_] == value)]
        if not after:
            have = sorted({r[field_] for r in narrowed} - {"scratch"})
            within = f" (with {', '.join(applied)})" if applied else ""
            known = _registered(kind) if kind else None  # a real name: no "did you mean"
            hint = "" if known and value in known else did_you_mean(str(value), map(str, have))
            raise NoMatchingResults(
                f"No finished results match {option} {value}{within}.{hint} "
                f"Results exist for {field_.replace('_', ' ')}: "
                f"{', '.join(map(str, have)) or 'none'}.")
        narrowed = after
        applied.append(f"{option} {value}")
    raise AssertionError("unreachable: the filters together selected nothing")


def mixed_versions(results: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Protocols whose results come from several spec versions (ranked separately)."""
    versions: dict[str, set[int]] = defaultdict(set)
    for r in results:
        versions[r["protocol"]].add(r["spec_version"])
    return {p: sorted(v) for p, v in versions.items() if len(v) > 1}


def check_single_version(results: list[dict[str, Any]]) -> None:
    """For callers that must produce one ranking (e.g. one plot): refuse mixed versions."""
    mixed = mixed_versions(results)
    if mixed:
        p, v = next(iter(mixed.items()))
        raise BenchError(
            f"Results of protocol {p!r} come from spec versions {v}; results of different spec "
            f"versions are never ranked together. Pick one with --spec-version {v[-1]}.")


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


def aggregate(results: list[dict[str, Any]]) -> list[Row]:
    """Mean, std, n, 95 % CI per group; p-values against the best entry and against scratch
    at the same fraction (paired over seeds where possible, see the module docstring), the
    difference to scratch with its CI; rank per fraction (1 = best)."""
    groups: dict[tuple, list[tuple[int, float]]] = defaultdict(list)
    refs: dict[tuple, str] = {}
    for r in results:
        key = group_key(r, GROUP_KEYS)
        groups[key].append((int(r.get("seed", -1)), r["value"]))
        refs[key] = r.get("dataset_ref", r["dataset"])
    rows = []
    for key, entries in groups.items():
        entries.sort()
        fields = dict(zip(GROUP_KEYS, key, strict=True))
        arr = np.array([v for _, v in entries], dtype=float)
        low, high = mean_ci(arr)
        rows.append(Row(**fields, mean=float(arr.mean()),
                        std=float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, n=len(arr),
                        ci_low=low, ci_high=high, p_vs_best=None, p_vs_scratch=None,
                        label=task_label(fields["task"], fields["pretrain_dataset"],
                                         fields["dataset"], fields["protocol"]),
                        dataset_ref=refs[key], values=[float(v) for v in arr],
                        seeds=[s for s, _ in entries]))
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
        entries.sort(key=lambda r: -r.mean)
        best = entries[0]
        scratch = next((r for r in entries if r.task == "scratch"), None)
        for rank, row in enumerate(entries, 1):
            row.rank = rank
            if row is not best:
                row.p_vs_best = compare(row, best)[0]
            if scratch is not None and row is not scratch:
                (row.p_vs_scratch, row.p_test, row.delta_vs_scratch, row.delta_ci_low,
                 row.delta_ci_high) = compare(row, scratch)
    rows.sort(key=lambda r: (r.protocol, r.spec_version, r.dataset, r.backbone, r.metric,
                             r.fraction, r.rank))
    return rows


def mean_ranks(rows: list[Row]) -> list[dict[str, Any]]:
    """Ranking across fractions: each entry's mean rank over the fractions it was run at."""
    ranks: dict[tuple, list[int]] = defaultdict(list)
    means: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        key = (*r.section, r.label)
        ranks[key].append(r.rank)
        means[key].append(r.mean)
    out = []
    for key, values in ranks.items():
        section = dict(zip(SECTION_KEYS, key[:-1], strict=True))
        out.append({**section, "label": key[-1], "mean_rank": float(np.mean(values)),
                    "fractions": len(values), "mean_of_means": float(np.mean(means[key]))})
    out.sort(key=lambda d: (*(d[k] for k in SECTION_KEYS), d["mean_rank"]))
    return out


def annotation_saving(rows: list[Row]) -> list[dict[str, Any]]:
    """Models Genesis' annotation saving: the label fraction a pretrained entry needs to match
    scratch trained on all labels (100 %), by :func:`interpolate_fraction` (robust to a noisy
    mean at one fraction: the entry has to stay at or above the target from that fraction on,
    up to the largest fraction it was run at).

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
        full = next((r for r in entries if r.task == "scratch" and r.fraction == 100), None)
        if full is None:
            continue
        curves: dict[str, list[Row]] = defaultdict(list)
        for r in entries:
            if r.task != "scratch":
                curves[r.label].append(r)
        for label, curve in curves.items():
            if len(curve) < 2:
                continue
            curve.sort(key=lambda r: r.fraction)
            needed = interpolate_fraction([r.fraction for r in curve], [r.mean for r in curve],
                                          full.mean)
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


def interpolate_fraction(fractions: list[float], means: list[float], target: float) -> float | None:
    """The label fraction from which the curve through (fraction, mean), fractions ascending,
    stays at or above ``target``.

    The fraction counted is the smallest measured one from which the mean is at or above
    ``target`` at *every* larger measured fraction; the result is interpolated linearly
    between it and the measured fraction just below it (whose mean is below ``target``).
    A mean above ``target`` at one fraction followed by one below it is noise, not a saving:
    it is ignored. None ("not reached") when the mean at the largest fraction is below
    ``target``, e.g. an entry below scratch at 100 %; the smallest measured fraction (an
    upper bound) when every mean is at or above ``target``.
    """
    if not means or means[-1] < target:
        return None
    i = len(means) - 1
    while i > 0 and means[i - 1] >= target:
        i -= 1
    if i == 0:
        return float(fractions[0])
    f0, m0, f1, m1 = fractions[i - 1], means[i - 1], fractions[i], means[i]
    return float(f0 + (target - m0) * (f1 - f0) / (m1 - m0))


# --------------------------------------------------------------------------- published rows


@lru_cache(maxsize=1)
def published_rows() -> list[dict[str, Any]]:
    """Reference numbers shipped in ``published.yaml`` (source, dataset, split, metric, ...)."""
    text = (resources.files("medssl_bench") / "published.yaml").read_text()
    return list(yaml.safe_load(text)["rows"])


def matching_published(rows: list[Row]) -> list[dict[str, Any]]:
    """Published rows whose dataset and metric match a measured section (each labelled)."""
    wanted: dict[tuple[str, str], set[tuple]] = defaultdict(set)
    for r in rows:
        wanted[(r.dataset_ref, r.metric)].add(r.section)
    out = []
    for p in published_rows():
        for section in sorted(wanted.get((p["dataset"], p["metric"]), ()), key=str):
            out.append({**dict(zip(SECTION_KEYS, section, strict=True)), **{
                "reference": True, "method": p["method"], "source": p["source"],
                "split": p["split"], "ref_protocol": p["protocol"], "value": p["value"],
                "std": p.get("std"), "ref_dataset": p["dataset"]}})
    return out


# --------------------------------------------------------------------------- output


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def row_dicts(rows: list[Row]) -> list[dict[str, Any]]:
    return [{k: _clean(v) for k, v in asdict(r).items()} for r in rows]


def summary(rows: list[Row]) -> dict[str, Any]:
    """Everything beyond the per-fraction rows: ranks, annotation saving, published rows."""
    return {"mean_ranks": mean_ranks(rows), "annotation_saving": annotation_saving(rows),
            "published": matching_published(rows)}


def as_json(rows: list[Row], with_summary: bool = False) -> str:
    """A list of row objects; with ``with_summary`` an object ``{rows, mean_ranks, ...}``."""
    if with_summary:
        return json.dumps({"rows": row_dicts(rows), **summary(rows)}, indent=2, default=_clean)
    return json.dumps(row_dicts(rows), indent=2)


COLUMNS = ("protocol", "spec_version", "dataset", "backbone", "fraction", "rank", "label", "task",
           "pretrain_dataset", "metric", "mean", "std", "n", "ci_low", "ci_high",
           "delta_vs_scratch", "delta_ci_low", "delta_ci_high", "p_vs_best", "p_vs_scratch",
           "p_test")


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:g}" if value.is_integer() else f"{value:.4f}"
    return str(value)


def fmt_p(p: float | None) -> str:
    """A p-value, with ``n.s.`` when it is above 0.05."""
    if p is None:
        return "-"
    return f"{p:.3f}" + (" n.s." if p > ALPHA else "")


def fmt_delta(row: Row) -> str:
    """``+0.0412 [0.0101, 0.0723] (paired)``: the difference to scratch, its 95 % CI and the
    test; the bare difference when no test is possible (a single value on either side)."""
    if row.delta_vs_scratch is None:
        return "-"
    text = f"{row.delta_vs_scratch:+.4f}"
    if row.delta_ci_low is not None and not math.isnan(row.delta_ci_low):
        text += f" [{row.delta_ci_low:+.4f}, {row.delta_ci_high:+.4f}]"
    return f"{text} ({row.p_test})" if row.p_test else text


_TEST_NOTES = {
    "paired": "paired = paired t-test over the seeds both have (a seed fixes the label subset)",
    "welch": "welch = Welch's t-test (seeds differ)",
    "": "a difference without a test label: one side has a single value, no test possible",
}


def stats_legend(rows: list[Row]) -> str:
    """What the tests behind ``vs scratch`` and the p columns are, for those that occur."""
    used = [t for t in _TEST_NOTES
            if any(r.task != "scratch" and r.delta_vs_scratch is not None and r.p_test == t
                   for r in rows)]
    text = "vs scratch: mean difference to scratch [95% CI] (test)"
    if used:
        text += "; p: two-sided t-tests, " + "; ".join(_TEST_NOTES[t] for t in used)
    return text


def as_csv(rows: list[Row]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(COLUMNS)
    for r in rows:
        writer.writerow([_clean(getattr(r, c)) for c in COLUMNS])
    return buf.getvalue()


def _saving_text(s: dict[str, Any]) -> str:
    if not s["reached"]:
        return f"not reached (up to {max(s['fractions']):g}%)"
    bound = "<= " if s.get("at_most") else ""
    return f"{bound}{s['fraction_needed']:.1f}% of labels (saves {bound.replace('<', '>')}" \
           f"{100 * s['saving']:.0f}%)"


def _at_100_text(s: dict[str, Any]) -> str:
    """The entry against scratch at 100 %: ``+0.0123 (p 0.412 n.s., paired)``."""
    delta = s.get("delta_at_100")
    if delta is None:
        return "-"
    if s.get("p_at_100") is None:
        return f"{delta:+.4f} (no test)"
    return f"{delta:+.4f} (p {fmt_p(s['p_at_100'])}, {s['p_test_at_100']})"


def as_markdown(rows: list[Row]) -> str:
    cols = ("protocol", "dataset", "backbone", "fraction", "rank", "label", "metric", "mean",
            "std", "n", "ci_low", "ci_high", "vs scratch", "p_vs_best", "p_vs_scratch")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = getattr(r, c, None)
            if c == "protocol":
                v = f"{r.protocol} v{r.spec_version}"
            if c == "vs scratch":
                v = fmt_delta(r)
            cells.append(fmt_p(v) if c.startswith("p_vs") else _fmt(v))
        lines.append("| " + " | ".join(cells) + " |")
    if rows:
        lines += ["", stats_legend(rows) + "."]
    extra = summary(rows)
    if extra["mean_ranks"]:
        lines += ["", "Mean rank across fractions", "",
                  "| protocol | dataset | backbone | metric | entry | mean rank | fractions |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {d['protocol']} v{d['spec_version']} | {d['dataset']} | {d['backbone']} | "
                  f"{d['metric']} | {d['label']} | {d['mean_rank']:.2f} | {d['fractions']} |"
                  for d in extra["mean_ranks"]]
    if extra["annotation_saving"]:
        lines += ["", "Annotation saving (labels needed to match scratch at 100 %: the smallest "
                  "fraction from which the entry stays at or above it, interpolated)", "",
                  "| protocol | dataset | backbone | metric | entry | scratch 100% | needed | "
                  "vs scratch at 100% |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {s['protocol']} v{s['spec_version']} | {s['dataset']} | {s['backbone']} | "
                  f"{s['metric']} | {s['label']} | {s['scratch_100']:.4f} | {_saving_text(s)} | "
                  f"{_at_100_text(s)} |"
                  for s in extra["annotation_saving"]]
    if extra["published"]:
        lines += ["", "Published reference rows (same dataset and metric; read split/protocol)", "",
                  "| dataset | metric | method | value | source | split |", "|---|---|---|---|---|---|"]
        lines += [f"| {p['ref_dataset']} | {p['metric']} | {p['method']} | {_fmt(p['value'])}"
                  + (f" ± {p['std']:g}" if p.get("std") else "") + f" | {p['source']} | {p['split']} |"
                  for p in extra["published"]]
    return "\n".join(lines) + "\n"


def as_rich_tables(rows: list[Row]) -> list[Any]:
    """One table per (protocol, spec version, dataset, backbone, metric) section, plus the
    summaries: mean rank, annotation saving, published reference rows."""
    from rich.table import Table

    extra = summary(rows)
    sections: dict[tuple, list[Row]] = defaultdict(list)
    for r in rows:
        sections[r.section].append(r)
    tables = []
    for section, entries in sections.items():
        protocol, version, dataset, backbone, metric, _setup = section
        table = Table(title=f"{protocol} v{version} · {dataset} · {backbone} · test {metric} "
                      "(mean over seeds)")
        table.caption = stats_legend(entries)
        for c in ("fraction", "rank", "entry", "mean ± std", "n", "95% CI", "vs scratch",
                  "p vs best", "p vs scratch"):
            table.add_column(c, justify="right" if c in ("fraction", "rank", "n") else "left")
        previous = None
        for r in entries:
            if previous is not None and r.fraction != previous:
                table.add_section()
            previous = r.fraction
            entry = f"[bold]{r.label}[/bold]" if r.task != "scratch" else "[dim]scratch[/dim]"
            spread = f"{r.mean:.4f} ± {r.std:.4f}" if r.n > 1 else f"{r.mean:.4f}"
            table.add_row(f"{r.fraction:g}%", str(r.rank), entry, spread,
                          str(r.n), f"[{_fmt(r.ci_low)}, {_fmt(r.ci_high)}]", fmt_delta(r),
                          fmt_p(r.p_vs_best), fmt_p(r.p_vs_scratch))
        refs = [p for p in extra["published"]
                if tuple(p[k] for k in SECTION_KEYS) == section]
        if refs:
            table.add_section()
            for p in refs:
                value = f"{p['value']:.4f}" + (f" ± {p['std']:.4f}" if p.get("std") else "")
                table.add_row("100%*", "ref", f"[italic]{p['method']}[/italic] ({p['source']})",
                              value, "-", "-", "-", "-", p["split"])
        tables.append(table)
        ranks = [d for d in extra["mean_ranks"] if tuple(d[k] for k in SECTION_KEYS) == section]
        savings = [s for s in extra["annotation_saving"]
                   if tuple(s[k] for k in SECTION_KEYS) == section]
        if len({r.fraction for r in entries}) > 1 or savings:
            summ = Table(title=f"{protocol} v{version} · {dataset} · across fractions")
            columns = ["entry", "mean rank", "fractions"]
            if savings:
                columns += ["annotation saving", "vs scratch at 100%"]
                summ.caption = ("annotation saving: labels needed to match scratch at 100%, from "
                                "the smallest fraction from which the entry stays at or above it")
            for c in columns:
                summ.add_column(c)
            by_label = {s["label"]: s for s in savings}
            for d in ranks:
                s = by_label.get(d["label"])
                cells = [d["label"], f"{d['mean_rank']:.2f}", str(d["fractions"])]
                if savings:
                    cells += [_saving_text(s), _at_100_text(s)] if s else ["-", "-"]
                summ.add_row(*cells)
            tables.append(summ)
    return tables


def as_rich_table(rows: list[Row]):
    """Back-compatible single renderable (a group of the section tables)."""
    from rich.console import Group

    return Group(*as_rich_tables(rows))
