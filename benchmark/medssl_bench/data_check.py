"""``bench data check``: read every case of a dataset and list all problems at once.

A run stops at the first bad file (one clear DataError); before a long run a user wants the
whole list instead, plus what the good cases look like (counts, shapes, spacings, label
values). A dataset plugin opts in with a ``check()`` method returning a report with
``problems`` and ``good`` case metadata (the volume datasets do); for any other dataset the
check falls back to ``load()`` and reports its error, if any.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any

from medssl_bench.errors import ConfigError, DataError


def add_parser(sub: Any) -> None:
    """Add ``data check`` to the CLI's subcommands."""
    data = sub.add_parser("data", help="Inspect a dataset before running (bench data check).")
    actions = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    check = actions.add_parser("check", help="Read every case, list every problem at once, and "
                               "summarise the good cases (counts, shapes, spacings, labels).")
    check.add_argument("--dataset", required=True, help="Dataset name, e.g. msd (see `bench plugins`).")
    check.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[],
                       metavar="KEY=VALUE",
                       help="Dataset settings, e.g. --set dataset.root=/data/Task07_Pancreas.")
    check.add_argument("--json", action="store_true", help="Print the report as JSON.")


def _dataset(name: str, overrides: list[str]) -> Any:
    from medssl_bench.config import parse_overrides, validate_section
    from medssl_bench.plugins import get_registry

    values = parse_overrides(overrides)
    other = sorted(set(values) - {"dataset"})
    if other:
        raise ConfigError(f"bench data check only takes dataset settings (--set dataset.KEY=VALUE); "
                          f"got {', '.join(other)}.")
    cls = get_registry().get("dataset", name)
    return cls(validate_section(cls.Config, values.get("dataset") or {}, "dataset"))


def _range(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"


def build_report(dataset: Any) -> dict[str, Any]:
    """A JSON-ready report: problems, counts and summaries of the good cases."""
    if not hasattr(dataset, "check"):
        # datasets without a per-file check (fundus, medmnist3d, slices, phantoms): loading
        # them validates every file; report the split sizes it produced
        root = str(getattr(dataset.config, "root", None) or getattr(dataset.config, "path", "")
                   or "")
        try:
            data = dataset.load()
        except DataError as exc:
            return {"dataset": dataset.name, "root": root, "problems": [str(exc)],
                    "splits": {}, "good": 0}
        splits = {name: len(getattr(data, name)) for name in ("train", "val", "test", "unlabeled")}
        return {"dataset": dataset.name, "root": root, "problems": [], "splits": splits,
                "good": splits["train"] + splits["val"] + splits["test"]}
    report = dataset.check()
    good = report.good
    labels: Counter[int] = Counter(v for m in good for v in m.label_values)
    return {
        "dataset": report.dataset,
        "root": report.root,
        "problems": list(report.problems),
        "cases": report.n_labeled + report.n_unlabeled,
        "labeled": report.n_labeled,
        "unlabeled": report.n_unlabeled,
        "good": len(good),
        "channels": dict(Counter(str(m.channels) for m in good)),
        "shapes": dict(Counter("x".join(map(str, m.shape)) for m in good).most_common()),
        "spacing_mm": ["x".join(_range([m.spacing[a] for m in good]) for a in range(3))] if good else [],
        "label_values": {str(v): n for v, n in sorted(labels.items())},
    }


def print_report(report: dict[str, Any], console: Any) -> None:
    problems = report["problems"]
    console.print(f"[bold]bench data check[/bold] dataset={report['dataset']} "
                  f"root={report.get('root', '')}", highlight=False)
    if "splits" in report:
        sizes = report["splits"]
        if sizes:
            console.print(f"labeled: train {sizes['train']}, val {sizes['val']}, test "
                          f"{sizes['test']}; pretraining pool: {sizes['unlabeled']}",
                          highlight=False)
    else:
        console.print(f"cases: {report['cases']} ({report.get('labeled', 0)} labeled, "
                      f"{report.get('unlabeled', 0)} unlabeled); good: {report['good']}",
                      highlight=False)
    if report.get("shapes"):
        console.print("shapes: " + ", ".join(f"{s} ({n})" for s, n in report["shapes"].items()),
                      highlight=False)
        console.print("channels: " + ", ".join(f"{c} ({n})" for c, n in report["channels"].items()),
                      highlight=False)
        console.print(f"spacing (mm, range per axis): {report['spacing_mm'][0]}", highlight=False)
    if report.get("label_values"):
        console.print("label values (cases holding each): " + ", ".join(
            f"{v} ({n})" for v, n in report["label_values"].items()), highlight=False)
    if problems:
        console.print(f"[bold red]{len(problems)} problem(s):[/bold red]")
        for i, problem in enumerate(problems, 1):
            console.print(f"  {i}. {problem}", highlight=False, soft_wrap=True)
    else:
        console.print("[green]no problems found[/green]")


def run(args: argparse.Namespace, console: Any) -> int:
    """``bench data check``; exit status 1 when any problem was found."""
    report = build_report(_dataset(args.dataset, args.overrides))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report, console)
    return 1 if report["problems"] else 0
