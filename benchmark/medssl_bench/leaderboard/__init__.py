"""The leaderboard: finished fine-tunes (typed :class:`~medssl_bench.store.ResultRecord`\\ s
read from the result store), aggregated over seeds.

Per (task, pretraining corpus, fraction): mean, std, n, 95 % t confidence interval, the
difference to the baseline (scratch) with its 95 % interval, t-tests against the best entry
and against the baseline at that fraction (Models Genesis reports t-tests over trials), a rank
per fraction and the mean rank across fractions, the annotation saving of Models Genesis (see
:func:`interpolate_fraction`), and published reference rows where dataset and metric match.

Comparisons are paired where the design pairs them: a seed fixes the label subset (and the
fine-tuning initialisation), so a task and the baseline at the same seed saw the same labels,
and the difference per seed removes the subset-to-subset variance that dominates at small
fractions. With at least two seeds in common the paired t-test (and a CI of the mean
difference) is used; otherwise Welch's t-test on the two samples. ``p_test`` says which, and
is empty when either side has a single value: then only the difference of the means is
shown, no test is possible.

Results are only ever ranked inside one (protocol, spec version, dataset, backbone, metric):
a spec version bump means the numbers stopped being comparable, so each version is its own
section and never shares a ranking with another. A metric the dataset declares
lower-is-better ranks ascending.

One module per job: :mod:`.select` (which records, and the messages when a filter matches
none), :mod:`.stats` (aggregation, tests, ranks, annotation saving), :mod:`.agreement`
(``--protocol all``: protocols side by side and their rank correlations), :mod:`.published`
(reference rows), :mod:`.render` (table, markdown, csv, json).
"""

from medssl_bench.leaderboard.agreement import (
    ALL_PROTOCOLS,
    MIN_COMMON,
    Cell,
    Correlation,
    ProtocolView,
    ViewRow,
    correlate,
    protocol_views,
)
from medssl_bench.leaderboard.published import matching_published, published_rows
from medssl_bench.leaderboard.render import (
    COLUMNS,
    as_csv,
    as_json,
    as_markdown,
    as_rich_table,
    as_rich_tables,
    fmt_delta,
    fmt_p,
    row_dicts,
    stats_legend,
    summary,
    views_csv,
    views_dicts,
    views_markdown,
    views_rich_tables,
)
from medssl_bench.leaderboard.select import (
    NoMatchingResults,
    check_single_version,
    collect,
    filter_results,
    mixed_versions,
    select,
)
from medssl_bench.leaderboard.stats import (
    ALPHA,
    GROUP_KEYS,
    SECTION_KEYS,
    Row,
    aggregate,
    annotation_saving,
    compare,
    family_ranks,
    group_key,
    interpolate_fraction,
    mean_ci,
    mean_ranks,
    section_of,
    t_test,
)
from medssl_bench.store import legacy_label as task_label  # the 0.1 label rule, for 0.1 callers

__all__ = [
    "ALL_PROTOCOLS",
    "ALPHA",
    "COLUMNS",
    "GROUP_KEYS",
    "MIN_COMMON",
    "SECTION_KEYS",
    "Cell",
    "Correlation",
    "NoMatchingResults",
    "ProtocolView",
    "Row",
    "ViewRow",
    "aggregate",
    "annotation_saving",
    "as_csv",
    "as_json",
    "as_markdown",
    "as_rich_table",
    "as_rich_tables",
    "check_single_version",
    "collect",
    "compare",
    "correlate",
    "family_ranks",
    "filter_results",
    "fmt_delta",
    "fmt_p",
    "group_key",
    "interpolate_fraction",
    "matching_published",
    "mean_ci",
    "mean_ranks",
    "mixed_versions",
    "protocol_views",
    "published_rows",
    "row_dicts",
    "section_of",
    "select",
    "stats_legend",
    "summary",
    "t_test",
    "task_label",
    "views_csv",
    "views_dicts",
    "views_markdown",
    "views_rich_tables",
]
