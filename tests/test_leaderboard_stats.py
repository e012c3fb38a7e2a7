"""Leaderboard statistics against scipy on known inputs; ranking, annotation saving,
spec-version separation and published reference rows. No training, no MLflow: records are
built as the result store reads them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from medssl_bench import leaderboard as lb
from medssl_bench.errors import BenchError
from medssl_bench.store import ResultRecord

VALUES = {
    ("rotation3d", 10): [0.50, 0.55, 0.53],
    ("rotation3d", 100): [0.70, 0.72, 0.71],
    ("jigsaw3d", 10): [0.40, 0.42, 0.47],
    ("jigsaw3d", 100): [0.69, 0.73, 0.70],
    ("scratch", 10): [0.30, 0.35, 0.31],
    ("scratch", 100): [0.60, 0.66, 0.63],
}


def _results(version: int = 1, protocol: str = "data-efficiency", values=VALUES,
             dataset_ref: str = "phantom3d", metric: str = "dice_mean"):
    out = []
    for (task, fraction), vals in values.items():
        for seed, v in enumerate(vals):
            out.append(_record(protocol=protocol, spec_version=version, task=task,
                               fraction=float(fraction), metric=metric, seed=seed, value=v,
                               dataset_ref=dataset_ref))
    return out


def _record(**fields) -> ResultRecord:
    """A finished fine-tune on phantom3d with unet3d; scratch is the baseline."""
    task = fields["task"]
    base = {"protocol": "data-efficiency", "spec_version": 1, "dataset": "phantom3d",
            "backbone": "unet3d", "metric": "dice_mean", "dataset_ref": "phantom3d",
            "pretrain_dataset": None if task == "scratch" else "phantom3d",
            "baseline": task == "scratch", "run_key": f"{task}-{fields.get('seed')}"}
    return ResultRecord(**(base | fields))


def _row(rows, task, fraction):
    return next(r for r in rows if r.task == task and r.fraction == fraction)


def test_mean_std_ci_and_paired_tests_match_scipy():
    """Same seeds = same label subsets: task and scratch are compared pairwise."""
    rows = lb.aggregate(_results())
    for (task, fraction), vals in VALUES.items():
        row = _row(rows, task, fraction)
        arr = np.array(vals)
        assert row.n == 3
        assert row.mean == pytest.approx(arr.mean())
        assert row.std == pytest.approx(arr.std(ddof=1))
        low, high = stats.t.interval(0.95, len(arr) - 1, loc=arr.mean(), scale=stats.sem(arr))
        assert (row.ci_low, row.ci_high) == (pytest.approx(low), pytest.approx(high))
        if task != "scratch":
            scratch = np.array(VALUES[("scratch", fraction)])
            assert row.p_vs_scratch == pytest.approx(stats.ttest_rel(arr, scratch).pvalue)
            assert row.p_test == "paired"
            diff = arr - scratch
            assert row.delta_vs_scratch == pytest.approx(diff.mean())
            low, high = stats.t.interval(0.95, 2, loc=diff.mean(), scale=stats.sem(diff))
            assert (row.delta_ci_low, row.delta_ci_high) == (pytest.approx(low), pytest.approx(high))
    best = _row(rows, "rotation3d", 10)
    assert best.rank == 1 and best.p_vs_best is None
    jig = _row(rows, "jigsaw3d", 10)
    assert jig.rank == 2
    assert jig.p_vs_best == pytest.approx(
        stats.ttest_rel(VALUES[("jigsaw3d", 10)], VALUES[("rotation3d", 10)]).pvalue)
    assert _row(rows, "scratch", 10).rank == 3


def test_unpaired_seeds_fall_back_to_welch():
    results = _results()
    for r in results:
        if r.task == "scratch":
            r.seed += 10  # no seed in common: nothing to pair
    rows = lb.aggregate(results)
    row = _row(rows, "rotation3d", 10)
    a, b = np.array(VALUES[("rotation3d", 10)]), np.array(VALUES[("scratch", 10)])
    assert row.p_test == "welch"
    assert row.p_vs_scratch == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    assert row.delta_vs_scratch == pytest.approx(a.mean() - b.mean())
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (row.delta_ci_low, row.delta_ci_high) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert "(welch)" in lb.as_markdown(rows)


def test_p_value_formatting_marks_not_significant():
    assert lb.fmt_p(0.2) == "0.200 n.s."
    assert lb.fmt_p(0.01) == "0.010"
    assert lb.fmt_p(None) == "-"
    md = lb.as_markdown(lb.aggregate(_results()))
    assert "n.s." in md and "Mean rank across fractions" in md


def test_mean_rank_across_fractions():
    ranks = {d["label"]: d["mean_rank"] for d in lb.mean_ranks(lb.aggregate(_results()))}
    # rotation3d: 1st at 10 %, 2nd at 100 % (jigsaw3d 0.7067 < rotation 0.71? no: 0.71 > 0.7067)
    assert ranks["rotation3d"] == 1.0
    assert ranks["jigsaw3d"] == 2.0
    assert ranks["scratch"] == 3.0


def test_interpolated_annotation_saving():
    assert lb.interpolate_fraction([10, 25, 50, 100], [0.5, 0.6, 0.7, 0.8], 0.65) == pytest.approx(37.5)
    assert lb.interpolate_fraction([10, 100], [0.7, 0.8], 0.6) == 10  # already there: upper bound
    assert lb.interpolate_fraction([10, 100], [0.3, 0.5], 0.6) is None
    savings = {s["label"]: s for s in lb.annotation_saving(lb.aggregate(_results()))}
    scratch_full = np.mean(VALUES[("scratch", 100)])
    rot = savings["rotation3d"]
    m10, m100 = np.mean(VALUES[("rotation3d", 10)]), np.mean(VALUES[("rotation3d", 100)])
    expected = 10 + (scratch_full - m10) * 90 / (m100 - m10)
    assert rot["reached"] and rot["fraction_needed"] == pytest.approx(expected)
    assert rot["saving"] == pytest.approx(1 - expected / 100)
    worse = dict(VALUES)
    worse[("jigsaw3d", 100)] = [0.50, 0.52, 0.51]
    savings = {s["label"]: s for s in lb.annotation_saving(lb.aggregate(_results(values=worse)))}
    assert savings["jigsaw3d"]["reached"] is False and savings["jigsaw3d"]["fraction_needed"] is None
    assert "not reached" in lb.as_markdown(lb.aggregate(_results(values=worse)))


def test_spec_versions_are_never_ranked_together():
    results = _results(1) + _results(2)
    rows = lb.aggregate(results)
    assert {r.n for r in rows} == {3}  # not pooled across versions
    for version in (1, 2):
        ranks = sorted(r.rank for r in rows if r.spec_version == version and r.fraction == 10)
        assert ranks == [1, 2, 3]
    assert lb.mixed_versions(results) == {"data-efficiency": [1, 2]}
    with pytest.raises(BenchError, match="spec versions"):
        lb.check_single_version(results)
    lb.check_single_version(lb.filter_results(results, spec_version=2))


def test_json_rows_and_summary():
    rows = lb.aggregate(_results())
    data = json.loads(lb.as_json(rows))
    assert isinstance(data, list)
    need = {"protocol", "dataset", "task", "backbone", "fraction", "metric", "mean", "std", "n",
            "ci_low", "ci_high", "p_vs_best", "p_vs_scratch"}
    assert all(need <= set(r) for r in data)
    summary = json.loads(lb.as_json(rows, with_summary=True))
    assert {"rows", "mean_ranks", "annotation_saving", "published"} <= set(summary)


def test_transfer_labels_distinguish_corpora():
    assert lb.task_label("rotation3d", "A", "B", "transfer") == "rotation3d (pretrained on A)"
    assert lb.task_label("rotation3d", "B", "B", "transfer") == "rotation3d (pretrained on B)"
    assert lb.task_label("rotation3d", "B", "B", "data-efficiency") == "rotation3d"
    assert lb.task_label("scratch", "", "B", "transfer") == "scratch"


def test_published_rows_match_dataset_ref_and_metric():
    published = lb.published_rows()
    assert all({"source", "dataset", "split", "metric", "protocol", "value"} <= set(p)
               for p in published)
    values = {("rotation3d", 100): [0.8, 0.82], ("scratch", 100): [0.78, 0.79]}
    rows = lb.aggregate(_results(values=values, dataset_ref="medmnist3d:adrenalmnist3d",
                                 metric="auc"))
    refs = lb.matching_published(rows)
    assert refs and all(r["ref_dataset"] == "medmnist3d:adrenalmnist3d" for r in refs)
    resnet = next(r for r in refs if r["method"] == "ResNet-18 + 3D")
    assert resnet["value"] == pytest.approx(0.827) and "MedMNIST" in resnet["source"]
    assert not lb.matching_published(lb.aggregate(_results(values=values, metric="acc",
                                                           dataset_ref="phantom3d")))
    assert "ResNet-18 + 3D" in lb.as_markdown(rows)


def test_single_seed_has_no_interval():
    rows = lb.aggregate(_results(values={("scratch", 100): [0.5]}))
    assert rows[0].n == 1 and math.isnan(rows[0].ci_low) and rows[0].p_vs_scratch is None


def test_results_of_different_setups_never_pool():
    """A quick and a paper run of one task (different fine-tuning settings) in one store are
    separate rows in separate sections; one task with two pretraining configs is two rows."""
    from medssl_bench.leaderboard import aggregate

    base = dict(task="rotation3d", fraction=100.0)
    results = [_record(**base, **fields) for fields in (
        {"setup": "quick", "task_setup": "a", "seed": 0, "value": 0.30},
        {"setup": "quick", "task_setup": "a", "seed": 1, "value": 0.32},
        {"setup": "paper", "task_setup": "a", "seed": 0, "value": 0.80},
        {"setup": "paper", "task_setup": "a", "seed": 1, "value": 0.82},
        {"setup": "paper", "task_setup": "b", "seed": 0, "value": 0.70},
        {"setup": "paper", "task_setup": "b", "seed": 1, "value": 0.72},
    )]
    rows = aggregate(results)
    assert sorted((r.setup, r.n, round(r.mean, 2)) for r in rows) == [
        ("paper", 2, 0.71), ("paper", 2, 0.81), ("quick", 2, 0.31)]
    assert len({r.section for r in rows}) == 2
    paper_labels = {r.label for r in rows if r.setup == "paper"}
    assert len(paper_labels) == 2 and all("[" in label for label in paper_labels)


# --------------------------------------------------------------------------- walkthrough fixes

QUICKSTART = {  # rotation3d last at every fraction, one noisy 50 % mean above scratch@100
    ("rotation3d", 10): [0.10, 0.12, 0.11],
    ("rotation3d", 25): [0.15, 0.17, 0.16],
    ("rotation3d", 50): [0.2339, 0.2539, 0.2439],
    ("rotation3d", 100): [0.1623, 0.1823, 0.1723],
    ("scratch", 10): [0.13, 0.15, 0.14],
    ("scratch", 25): [0.19, 0.21, 0.20],
    ("scratch", 50): [0.25, 0.27, 0.26],
    ("scratch", 100): [0.2307, 0.2507, 0.2407],
}


def test_annotation_saving_is_not_claimed_from_a_noisy_point():
    """Below scratch at 100 %: not reached, whatever one intermediate mean says."""
    rows = lb.aggregate(_results(values=QUICKSTART))
    (rot,) = lb.annotation_saving(rows)
    assert rot["reached"] is False and rot["fraction_needed"] is None and rot["saving"] is None
    assert rot["delta_at_100"] == pytest.approx(0.1723 - 0.2407)
    assert rot["p_at_100"] is not None and rot["p_test_at_100"] == "paired"
    md = lb.as_markdown(rows)
    assert "saves" not in md and "not reached (up to 100%)" in md
    assert "-0.0684 (p " in md  # the difference at 100 % with its test, next to the claim


def test_annotation_saving_counts_from_where_the_curve_stays_above():
    # above at 25 %, below at 50 %, above again at 100 %: interpolate between 50 and 100 only
    assert lb.interpolate_fraction([10, 25, 50, 100], [0.5, 0.7, 0.6, 0.8], 0.65) == \
        pytest.approx(62.5)
    assert lb.interpolate_fraction([10, 25, 50, 100], [0.7, 0.5, 0.7, 0.8], 0.6) == \
        pytest.approx(25 + 0.1 * 25 / 0.2)
    assert lb.interpolate_fraction([10, 50, 100], [0.7, 0.8, 0.5], 0.6) is None  # ends below
    assert lb.interpolate_fraction([10, 50], [0.7, 0.8], 0.6) == 10  # upper bound
    assert lb.interpolate_fraction([10, 100], [0.6, 0.7], 0.6) == 10  # "at or above"
    assert lb.interpolate_fraction([], [], 0.6) is None


def test_single_value_differences_carry_no_test_label():
    values = {("rotation3d", 100): [0.7], ("scratch", 100): [0.6012]}
    rows = lb.aggregate(_results(values=values))
    rot = _row(rows, "rotation3d", 100)
    assert rot.p_vs_scratch is None and rot.p_test == ""
    assert rot.delta_vs_scratch == pytest.approx(0.0988)
    assert lb.fmt_delta(rot) == "+0.0988"
    md = lb.as_markdown(rows)
    assert "(welch)" not in md and "(paired)" not in md
    assert "no test possible" in lb.stats_legend(rows) and "paired" not in lb.stats_legend(rows)
    caption = lb.as_rich_tables(rows)[0].caption
    assert "no test possible" in caption and "Welch" not in caption
    # one side with one value, the other with three: still no test
    values = {("rotation3d", 100): [0.7], ("scratch", 100): [0.6, 0.61, 0.62]}
    rot = _row(lb.aggregate(_results(values=values)), "rotation3d", 100)
    assert rot.p_test == "" and rot.p_vs_scratch is None


def test_legend_names_only_the_tests_used():
    legend = lb.stats_legend(lb.aggregate(_results()))
    assert "paired t-test" in legend and "Welch" not in legend and "no test" not in legend


def test_single_fraction_has_no_annotation_saving():
    values = {("rotation3d", 100): [0.7, 0.72], ("scratch", 100): [0.6, 0.62]}
    rows = lb.aggregate(_results(protocol="convergence", values=values))
    assert lb.annotation_saving(rows) == []
    assert "Annotation saving" not in lb.as_markdown(rows)
    assert len(lb.as_rich_tables(rows)) == 1  # no "across fractions" table for one fraction
    # several fractions, but one entry run at a single fraction: that entry gets none
    values = {**VALUES, ("genesis3d", 100): [0.7, 0.72, 0.71]}
    labels = {s["label"] for s in lb.annotation_saving(lb.aggregate(_results(values=values)))}
    assert labels == {"rotation3d", "jigsaw3d"}


def test_a_filter_that_matches_nothing_says_what_exists():
    results = _results()
    assert lb.select(results, protocol="data-efficiency") == results
    assert lb.select([], protocol="data-efficiency") == []  # nothing run yet
    with pytest.raises(BenchError, match="Did you mean 'data-efficiency'") as typo:
        lb.select(results, protocol="data-effciency")
    assert typo.value.exit_code == 2 and "data-efficiency" in str(typo.value)
    with pytest.raises(lb.NoMatchingResults, match="--dataset phantom2d") as none:
        lb.select(results, dataset="phantom2d")  # a real dataset, just not run
    assert none.value.exit_code == 1 and "phantom3d" in str(none.value)
    with pytest.raises(lb.NoMatchingResults, match="--protocol transfer"):
        lb.select(results, protocol="transfer")
    with pytest.raises(lb.NoMatchingResults, match=r"--spec-version 7.*\b1\b"):
        lb.select(results, spec_version=7)
    # the task filter keeps scratch, so scratch alone is no match for a task that is absent
    with pytest.raises(lb.NoMatchingResults, match="--task genesis3d.*jigsaw3d, rotation3d"):
        lb.select(results, task="genesis3d")
    with pytest.raises(BenchError, match="Did you mean 'rotation3d'"):
        lb.select(results, task="rotatoin3d")
    assert {r.task for r in lb.select(results, task="rotation3d,genesis3d")} == \
        {"rotation3d", "scratch"}
    with pytest.raises(BenchError, match="Unknown protocol"):  # a typo even in an empty store
        lb.select([], protocol="data-effciency")


def test_a_lower_is_better_metric_ranks_ascending_and_flips_the_annotation_saving():
    """A distance (hd95, mm): the smallest mean ranks first, and an entry saves annotations
    from the fraction where it stays at or below scratch's 100 % value."""
    values = {("rotation3d", 10): [9.0, 9.5, 9.2], ("rotation3d", 100): [4.0, 4.2, 4.1],
              ("jigsaw3d", 10): [12.0, 12.5, 12.2], ("jigsaw3d", 100): [7.0, 7.2, 7.1],
              ("scratch", 10): [14.0, 14.5, 14.2], ("scratch", 100): [6.0, 6.2, 6.1]}
    results = [_record(**{**r.model_dump(), "higher_is_better": False})
               for r in _results(values=values, metric="hd95")]
    rows = lb.aggregate(results)
    assert [r.task for r in rows if r.fraction == 10] == ["rotation3d", "jigsaw3d", "scratch"]
    assert [r.task for r in rows if r.fraction == 100] == ["rotation3d", "scratch", "jigsaw3d"]
    assert _row(rows, "rotation3d", 100).p_vs_best is None  # the best entry: lowest mean
    assert _row(rows, "scratch", 100).p_vs_best is not None
    assert {d["label"]: d["mean_rank"] for d in lb.mean_ranks(rows)} == {
        "rotation3d": 1.0, "jigsaw3d": 2.5, "scratch": 2.5}
    savings = {s["label"]: s for s in lb.annotation_saving(rows)}
    m10, m100 = np.mean(values[("rotation3d", 10)]), np.mean(values[("rotation3d", 100)])
    target = np.mean(values[("scratch", 100)])
    expected = 10 + (target - m10) * 90 / (m100 - m10)  # where the line crosses 6.1 mm
    assert savings["rotation3d"]["reached"]
    assert savings["rotation3d"]["fraction_needed"] == pytest.approx(expected)
    assert savings["jigsaw3d"]["reached"] is False  # above (worse than) scratch at 100 %
    assert lb.interpolate_fraction([10, 100], [9.0, 4.0], 6.0, higher_is_better=False) == \
        pytest.approx(64)
    assert lb.interpolate_fraction([10, 100], [5.0, 4.0], 6.0, higher_is_better=False) == 10
    assert lb.interpolate_fraction([10, 100], [5.0, 7.0], 6.0, higher_is_better=False) is None


def test_grouped_by_method_family():
    """Each family's rank is the mean of its entries' mean ranks; its best entry is named;
    the baseline (no family) is not a family."""
    means = {"rotation3d": 0.7, "jigsaw3d": 0.5, "genesis3d": 0.6, "scratch": 0.4}
    families = {"rotation3d": "pretext-classification", "jigsaw3d": "pretext-classification",
                "genesis3d": "restoration", "scratch": ""}
    records = [_record(task=t, fraction=f, seed=s, value=m + 0.01 * s, family=families[t],
                       run_key=f"{t}-{f}-{s}")
               for t, m in means.items() for f in (50, 100) for s in (0, 1)]
    rows = lb.aggregate(records)
    fams = {d["family"]: d for d in lb.family_ranks(rows)}
    assert set(fams) == {"pretext-classification", "restoration"}
    # ranks per fraction: rotation3d 1, genesis3d 2, jigsaw3d 3, scratch 4
    assert fams["pretext-classification"]["mean_rank"] == pytest.approx(2.0)
    assert fams["pretext-classification"]["entries"] == 2
    assert fams["pretext-classification"]["best_entry"] == "rotation3d"
    assert fams["restoration"]["mean_rank"] == pytest.approx(2.0)
    assert "Mean rank by method family" in lb.as_markdown(rows)
