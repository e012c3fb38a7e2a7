"""``bench report``: PNG plots and a JSON/Markdown summary of finished results.

Each result records the figures its protocol offers; the report draws those:

- Data-efficiency curves (Taleb et al. Fig. 3): test metric against label fraction, one line
  per task (and pretraining corpus), the baseline (scratch) dashed, error bars = std or 95 %
  CI over seeds, published reference values at 100 % as crosses.
- Convergence curves (Taleb et al. Fig. 5): validation metric against epoch, pretrained vs
  the baseline, mean over seeds with a ±std band, the target (95 % of its final) dotted.

Files go to a folder and, unless disabled, to an MLflow run of the ``medssl-bench/reports``
experiment, so plots live next to the runs they summarise. matplotlib uses the Agg backend:
no display is needed.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from medssl_bench import leaderboard
from medssl_bench.analysis import ConvergenceRow, convergence_table
from medssl_bench.interfaces import FIGURE_CONVERGENCE, FIGURE_DATA_EFFICIENCY
from medssl_bench.store import REPORT_EXPERIMENT, ResultStore, as_store
from medssl_bench.tracking import EXPERIMENT_PREFIX, Tracker


def _slug(*parts: Any) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(str(p) for p in parts)).strip("-")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_data_efficiency(rows: list[leaderboard.Row], published: list[dict[str, Any]],
                         path: Path, error_bars: str = "std") -> Path:
    """One section's curve: metric vs label fraction, one line per entry."""
    plt = _pyplot()
    first = rows[0]
    lines: dict[str, list[leaderboard.Row]] = defaultdict(list)
    for r in rows:
        lines[r.label].append(r)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for label, points in sorted(lines.items(), key=lambda kv: (kv[1][0].baseline, kv[0])):
        points.sort(key=lambda r: r.fraction)
        x = [r.fraction for r in points]
        y = [r.mean for r in points]
        if error_bars == "ci":
            err = [0.0 if math.isnan(r.ci_high) else r.ci_high - r.mean for r in points]
        else:
            err = [r.std for r in points]
        scratch = points[0].baseline
        ax.errorbar(x, y, yerr=err, label=f"{label} (n={max(r.n for r in points)})", capsize=3,
                    marker="o", linestyle="--" if scratch else "-",
                    color="0.35" if scratch else None, linewidth=1.6)
    for p in published:
        ax.scatter([100], [p["value"]], marker="x", s=40, zorder=5,
                   label=f"{p['method']} ({p['source'].split(',')[0]})")
    fractions = sorted({r.fraction for r in rows})
    ax.set_xticks(fractions)
    ax.set_xticklabels([f"{f:g}" for f in fractions])
    ax.set_xlabel("labeled training data (%)")
    ax.set_ylabel(f"test {first.metric}")
    ax.set_title(f"{first.protocol} v{first.spec_version}: {first.dataset}, {first.backbone}\n"
                 f"error bars: {'95% CI' if error_bars == 'ci' else 'std'} over seeds", fontsize=10)
    return _save(plt, fig, ax, path)


def _save(plt: Any, fig: Any, ax: Any, path: Path) -> Path:
    """The common finish of every figure: grid, legend, saved as ``path``, closed."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_convergence(rows: list[ConvergenceRow], path: Path) -> Path:
    """Validation metric per epoch for each entry of one group, with the target line."""
    plt = _pyplot()
    first = rows[0]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for r in sorted(rows, key=lambda r: (r.baseline, r.label)):
        epochs = list(range(1, len(r.curve_mean) + 1))
        scratch = r.baseline
        reach = "not reached" if r.epochs_to_target is None else f"epoch {r.epochs_to_target}"
        line, = ax.plot(epochs, r.curve_mean, marker="o", markersize=3,
                        linestyle="--" if scratch else "-", color="0.35" if scratch else None,
                        label=f"{r.label} (n={r.n}; target: {reach})")
        low = [m - s for m, s in zip(r.curve_mean, r.curve_std, strict=True)]
        high = [m + s for m, s in zip(r.curve_mean, r.curve_std, strict=True)]
        ax.fill_between(epochs, low, high, alpha=0.15, color=line.get_color())
    ax.axhline(first.target_value, color="k", linestyle=":", linewidth=1,
               label=f"{100 * first.target:g}% of scratch's final ({first.target_value:.4g})")
    ax.set_xlabel("fine-tuning epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel(f"validation {first.metric}")
    ax.set_title(f"{first.protocol} v{first.spec_version}: {first.dataset}, {first.backbone}, "
                 f"{first.fraction:g}% labels", fontsize=10)
    return _save(plt, fig, ax, path)


def _convergence_markdown(rows: list[ConvergenceRow]) -> str:
    lines = ["| protocol | dataset | fraction | entry | target | epochs to target | "
             "seconds to target | final | n |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r.protocol} v{r.spec_version} | {r.dataset} | {r.fraction:g}% | {r.label} | "
            f"{r.target_value:.4f} ({100 * r.target:g}% of {r.scratch_final:.4f}) | "
            f"{r.epochs_to_target if r.epochs_to_target is not None else 'not reached'} | "
            f"{'-' if r.seconds_to_target is None else f'{r.seconds_to_target:.1f}'} | "
            f"{r.final:.4f} | {r.n} |")
    return "\n".join(lines) + "\n"


def write_report(
    store: ResultStore | Tracker,
    out: Path,
    protocol: str | None = None,
    dataset: str | None = None,
    task: str | None = None,
    spec_version: int | None = None,
    target: float | None = None,
    error_bars: str = "std",
    log_to_mlflow: bool = True,
    echo: Any = print,
) -> list[Path]:
    """Write plots, ``report.json`` and ``report.md`` to ``out``; the paths written (none when
    nothing was run yet). Filters that match no result raise, as in ``bench leaderboard``
    (:func:`leaderboard.select`). Each result's figures (declared by its protocol) say
    which plots it appears in. ``protocol="all"``: every protocol, and a section with them
    side by side per dataset and their rank correlations (``protocols`` in report.json)."""
    store = as_store(store)
    side_by_side = protocol == leaderboard.ALL_PROTOCOLS  # every protocol, plus the views
    if side_by_side:
        protocol = None
    results = leaderboard.select(store.results(), protocol, dataset, task, spec_version)
    if not results:
        return []
    out.mkdir(parents=True, exist_ok=True)
    rows = leaderboard.aggregate(results)
    summary = leaderboard.summary(rows)
    written: list[Path] = []
    sections: dict[tuple, list[leaderboard.Row]] = defaultdict(list)
    for r in rows:
        sections[r.section].append(r)
    figures: dict[tuple, set[str]] = defaultdict(set)
    for r in results:
        figures[leaderboard.section_of(r)].update(r.figures)
    for section, entries in sections.items():
        if FIGURE_DATA_EFFICIENCY not in figures[section]:  # e.g. read per epoch, below
            continue
        refs = [p for p in summary["published"]
                if tuple(p[k] for k in leaderboard.SECTION_KEYS) == section]
        path = out / f"{FIGURE_DATA_EFFICIENCY}_{_slug(*section)}.png"
        written.append(plot_data_efficiency(entries, refs, path, error_bars))
    convergence = convergence_table(store, protocol=None, target=target,
                                    results=[r for r in results if FIGURE_CONVERGENCE in r.figures])
    groups: dict[tuple, list[ConvergenceRow]] = defaultdict(list)
    for c in convergence:
        groups[(c.protocol, c.spec_version, c.dataset, c.backbone, c.fraction, c.metric)].append(c)
    for key, entries in groups.items():
        path = out / f"{FIGURE_CONVERGENCE}_{_slug(*key)}.png"
        written.append(plot_convergence(entries, path))
    data = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": leaderboard.row_dicts(rows),
            **summary, FIGURE_CONVERGENCE: [c.as_dict() for c in convergence]}
    views = leaderboard.protocol_views(rows) if side_by_side else []
    if side_by_side:
        data["protocols"] = leaderboard.views_dicts(views)
    json_path = out / "report.json"
    json_path.write_text(json.dumps(data, indent=2, default=str))
    md_path = out / "report.md"
    md = "# medssl-bench report\n\n## Leaderboard\n\n" + leaderboard.as_markdown(rows)
    if side_by_side:
        md += "\n## Protocols side by side\n\n" + leaderboard.views_markdown(views)
    if convergence:
        md += "\n## Convergence\n\n" + _convergence_markdown(convergence)
    md += "\n## Plots\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in written) + "\n"
    md_path.write_text(md)
    written += [json_path, md_path]
    if log_to_mlflow:
        run_id = store.log_report(written, leaderboard.ALL_PROTOCOLS if side_by_side
                                  else protocol, dataset)
        echo(f"Logged the report to MLflow experiment {EXPERIMENT_PREFIX}{REPORT_EXPERIMENT} "
             f"(run {run_id}).")
    return written
