"""Leaderboard output: rich tables (one per section, with summaries), markdown, csv and
json (rows, or rows with the summaries)."""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from dataclasses import asdict
from typing import Any

from medssl_bench.leaderboard.agreement import Correlation, ProtocolView, protocol_views
from medssl_bench.leaderboard.published import matching_published
from medssl_bench.leaderboard.stats import (
    ALPHA,
    SECTION_KEYS,
    Row,
    annotation_saving,
    family_ranks,
    mean_ranks,
)


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def row_dicts(rows: list[Row]) -> list[dict[str, Any]]:
    return [{k: _clean(v) for k, v in asdict(r).items()} for r in rows]


def summary(rows: list[Row]) -> dict[str, Any]:
    """Everything beyond the per-fraction rows: ranks, annotation saving, published rows."""
    return {"mean_ranks": mean_ranks(rows), "family_ranks": family_ranks(rows),
            "annotation_saving": annotation_saving(rows), "published": matching_published(rows)}


def as_json(rows: list[Row], with_summary: bool = False, side_by_side: bool = False) -> str:
    """A list of row objects; with ``with_summary`` an object ``{rows, mean_ranks, ...}``.
    With ``side_by_side`` (``--protocol all``): the list of :func:`protocol_views` as dicts,
    or, with ``with_summary``, the summary object with them under ``protocols``."""
    if with_summary:
        extra = {"protocols": views_dicts(protocol_views(rows))} if side_by_side else {}
        return json.dumps({"rows": row_dicts(rows), **summary(rows), **extra}, indent=2,
                          default=_clean)
    if side_by_side:
        return json.dumps(views_dicts(protocol_views(rows)), indent=2, default=_clean)
    return json.dumps(row_dicts(rows), indent=2)


def views_dicts(views: list[ProtocolView]) -> list[dict[str, Any]]:
    """The views as JSON-ready dicts (NaN as null)."""
    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return _clean(value)

    return [clean(v.as_dict()) for v in views]


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
            if any(not r.baseline and r.delta_vs_scratch is not None and r.p_test == t
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
    if extra["family_ranks"]:
        lines += ["", "Mean rank by method family (the mean of its entries' mean ranks)", "",
                  "| protocol | dataset | backbone | metric | family | mean rank | entries | best "
                  "entry |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {d['protocol']} v{d['spec_version']} | {d['dataset']} | {d['backbone']} | "
                  f"{d['metric']} | {d['family']} | {d['mean_rank']:.2f} | {d['entries']} | "
                  f"{d['best_entry']} |" for d in extra["family_ranks"]]
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
            entry = f"[dim]{r.label}[/dim]" if r.baseline else f"[bold]{r.label}[/bold]"
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
        families = [d for d in extra["family_ranks"]
                    if tuple(d[k] for k in SECTION_KEYS) == section]
        if families:
            fam = Table(title=f"{protocol} v{version} · {dataset} · by method family")
            for c in ("family", "mean rank", "entries", "best entry"):
                fam.add_column(c)
            for d in families:
                fam.add_row(d["family"], f"{d['mean_rank']:.2f}", str(d["entries"]),
                            d["best_entry"])
            tables.append(fam)
    return tables


def as_rich_table(rows: list[Row]):
    """Back-compatible single renderable (a group of the section tables)."""
    from rich.console import Group

    return Group(*as_rich_tables(rows))


# --------------------------------------------------------------------------- side by side


def fmt_cell(view_row: Any, column: str) -> str:
    """``0.7100 ± 0.0100 (n=3)``; ``-`` where the protocol has no result for the entry."""
    cell = view_row.cells.get(column)
    if cell is None:
        return "-"
    spread = f"{cell.mean:.4f} ± {cell.std:.4f}" if cell.n > 1 else f"{cell.mean:.4f}"
    return f"{spread} (n={cell.n})"


def fmt_correlation(c: Correlation) -> str:
    """``data-efficiency vs knn at 10%: Spearman +0.80 (p 0.104), Kendall +0.60 (p 0.233), 5
    entries`` (``over mean ranks`` for the correlation of the mean ranks); ``-`` and the
    reason when there is none."""
    head = f"{c.a} vs {c.b} " + ("over mean ranks: " if c.fraction is None
                                 else f"at {c.scope}: ")
    if c.spearman is None and c.kendall is None:
        return head + f"Spearman -, Kendall - ({c.reason})"

    def one(name: str, value: float | None, p: float | None) -> str:
        if value is None:
            return f"{name} -"
        if p is None:
            return f"{name} {value:+.2f}"
        return f"{name} {value:+.2f} (p {'<0.001' if p < 0.001 else f'{p:.3f}'})"

    return (head + one("Spearman", c.spearman, c.spearman_p) + ", "
            + one("Kendall", c.kendall, c.kendall_p) + f", {c.n} entries")


SIDE_BY_SIDE_NOTE = ("cells: mean ± std over seeds (n); entries matched across protocols by "
                     "(dataset, backbone, metric, entry, fraction), not by setup (each "
                     "protocol's config is part of its setup); rank correlations over the "
                     "entries both protocols ranked, at one fraction or over mean ranks")


def _view_title(v: ProtocolView) -> str:
    return f"{v.dataset} · {v.backbone} · test {v.metric}: protocols side by side"


def views_markdown(views: list[ProtocolView]) -> str:
    """Each view as a markdown table, its rank correlations listed under it."""
    lines: list[str] = []
    for v in views:
        if lines:
            lines.append("")
        lines += [f"**{_view_title(v)}**", "",
                  "| entry | fraction | " + " | ".join(v.columns) + " |",
                  "|" + "---|" * (len(v.columns) + 2)]
        for r in v.rows:
            lines.append(f"| {r.label} | {r.fraction:g}% | "
                         + " | ".join(fmt_cell(r, c) for c in v.columns) + " |")
        lines += ["", "Rank correlation between protocols:" if v.correlations
                  else "Rank correlation between protocols: - (a single protocol)", ""]
        lines += [f"- {fmt_correlation(c)}" for c in v.correlations]
    if views:
        lines += ["", SIDE_BY_SIDE_NOTE + "."]
    return "\n".join(lines) + "\n"


def views_csv(views: list[ProtocolView]) -> str:
    """One line per (view, entry, fraction, protocol column) with a result (long format; the
    correlations are in the json ``--summary`` and the other formats)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(("dataset", "backbone", "metric", "label", "fraction", "protocol", "mean",
                     "std", "n"))
    for v in views:
        for r in v.rows:
            for c in v.columns:
                cell = r.cells.get(c)
                if cell is not None:
                    writer.writerow((v.dataset, v.backbone, v.metric, r.label, r.fraction, c,
                                     cell.mean, cell.std, cell.n))
    return buf.getvalue()


def views_rich_tables(views: list[ProtocolView]) -> list[Any]:
    """One rich table per view, its rank correlations as the caption under it."""
    from rich.table import Table

    tables = []
    for v in views:
        table = Table(title=_view_title(v), caption_justify="left")
        table.add_column("entry")
        table.add_column("fraction", justify="right")
        for c in v.columns:
            table.add_column(c)
        previous = None
        for r in v.rows:
            if previous is not None and r.fraction != previous:
                table.add_section()
            previous = r.fraction
            entry = f"[dim]{r.label}[/dim]" if r.baseline else f"[bold]{r.label}[/bold]"
            table.add_row(entry, f"{r.fraction:g}%", *(fmt_cell(r, c) for c in v.columns))
        caption = ["rank correlation between protocols:"]
        caption += [fmt_correlation(c) for c in v.correlations] or ["- (a single protocol)"]
        table.caption = "\n".join([*caption, SIDE_BY_SIDE_NOTE])
        tables.append(table)
    return tables
