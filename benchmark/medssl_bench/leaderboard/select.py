"""Which records the leaderboard shows: reading them from the store, filtering, and the
messages when a filter selects nothing (a typo, or a name without results)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from medssl_bench.errors import BenchError, did_you_mean
from medssl_bench.leaderboard.agreement import ALL_PROTOCOLS
from medssl_bench.store import ResultRecord, ResultStore, as_store
from medssl_bench.tracking import Tracker


def collect(source: ResultStore | Tracker) -> list[ResultRecord]:
    """Every finished fine-tune's record in the store (newest first, one per run key)."""
    return as_store(source).results()


def filter_results(results: list[ResultRecord], protocol: str | None = None,
                   dataset: str | None = None, task: str | None = None,
                   spec_version: int | None = None) -> list[ResultRecord]:
    """Filter; the baseline is always kept with a task filter (it is the reference)."""
    if protocol:
        results = [r for r in results if r.protocol == protocol]
    if dataset:
        results = [r for r in results if r.dataset == dataset]
    if task:
        wanted = {t.strip() for t in task.split(",")}
        results = [r for r in results if r.task in wanted or r.baseline]
    if spec_version is not None:
        results = [r for r in results if r.spec_version == spec_version]
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


def _baseline_tasks(results: list[ResultRecord]) -> set[str]:
    """Names of baseline tasks: those of baseline records, and installed tasks declaring
    the role (so ``--task scratch`` means "no filter" even in an empty store)."""
    names = {r.task for r in results if r.baseline}
    try:
        from medssl_bench.plugins import get_registry

        registry = get_registry()
        names |= {n for n in registry.names("task")
                  if getattr(registry.get("task", n), "baseline", False)}
    except Exception:  # optional, as in _registered
        pass
    return names


def select(results: list[ResultRecord], protocol: str | None = None,
           dataset: str | None = None, task: str | None = None,
           spec_version: int | None = None) -> list[ResultRecord]:
    """:func:`filter_results`, refusing a filter that selects nothing.

    An empty store gives an empty list (nothing run yet). A filter that matches no result
    raises: :class:`NoMatchingResults` (exit 1) naming the filter and the values that do have
    results, or a plain :class:`BenchError` (exit 2) when the name is not even an installed
    plugin (a typo), with a did-you-mean hint. A task filter always keeps the baseline, so it
    counts as matching only when one of the named tasks other than the baseline has results.
    """
    wanted_tasks = ({t.strip() for t in task.split(",")} - _baseline_tasks(results) if task
                    else set())
    checks: list[tuple[str, str, str, Any]] = []  # (option, field, plugin kind, value)
    if protocol:
        checks.append(("--protocol", "protocol", "protocol", protocol))
    if dataset:
        checks.append(("--dataset", "dataset", "dataset", dataset))
    if spec_version is not None:
        checks.append(("--spec-version", "spec_version", "", spec_version))
    checks += [("--task", "task", "task", t) for t in sorted(wanted_tasks)]
    present = {field_: {getattr(r, field_) for r in results} for _, field_, _, _ in checks}
    for option, field_, kind, value in checks:  # typos first, even in an empty store
        if kind and value not in present[field_]:
            known = _registered(kind)
            if known is not None and value not in known:
                have = present[field_]
                where = (f"Finished results exist for {kind}: {', '.join(sorted(have))}." if have
                         else f"Installed {kind}s: {', '.join(sorted(known))}.")
                also = {ALL_PROTOCOLS} if kind == "protocol" else set()  # the CLI's side by side
                raise BenchError(f"Unknown {kind} {value!r} ({option})."
                                 f"{did_you_mean(value, known | have | also)} {where}")
    if not results:
        return []
    selected = filter_results(results, protocol, dataset, task, spec_version)
    matched = (any(r.task in wanted_tasks for r in selected) if wanted_tasks
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
                 if (r.task in wanted_tasks if option == "--task" else getattr(r, field_) == value)]
        if not after:
            have = sorted({getattr(r, field_) for r in narrowed
                           if not (field_ == "task" and r.baseline)})
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


def mixed_versions(results: list[ResultRecord]) -> dict[str, list[int]]:
    """Protocols whose results come from several spec versions (ranked separately)."""
    versions: dict[str, set[int]] = defaultdict(set)
    for r in results:
        versions[r.protocol].add(r.spec_version)
    return {p: sorted(v) for p, v in versions.items() if len(v) > 1}


def check_single_version(results: list[ResultRecord]) -> None:
    """For callers that must produce one ranking (e.g. one plot): refuse mixed versions."""
    mixed = mixed_versions(results)
    if mixed:
        p, v = next(iter(mixed.items()))
        raise BenchError(
            f"Results of protocol {p!r} come from spec versions {v}; results of different spec "
            f"versions are never ranked together. Pick one with --spec-version {v[-1]}.")
