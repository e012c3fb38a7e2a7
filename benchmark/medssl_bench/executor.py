"""Executors run plans. The built-in ``inprocess`` executor runs the units one after another
in this process; a parallel or cluster executor is one more plugin (``bench_register_executors``)
that schedules the same units through :mod:`medssl_bench.units`, so skipping finished work,
resuming interrupted pretraining and recording failures behave the same everywhere.

Every executor:
- marks runs left RUNNING by dead processes as KILLED before it starts;
- leaves a unit that another live process holds (its lease, :mod:`medssl_bench.leases`) to
  that process, or with ``ctx.wait`` waits until it is released (:func:`wait_released`);
- runs a unit only after the units it depends on; when one of those failed, records the unit
  as skipped, naming the failed dependency, and goes on with the rest;
- returns the result records of the fine-tunes it ran.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from medssl_bench.config import PluginConfig
from medssl_bench.context import Outcome, RunContext
from medssl_bench.errors import BenchError, TrackingUnavailable
from medssl_bench.hookspecs import hookimpl
from medssl_bench.interfaces import Executor
from medssl_bench.leases import RunningElsewhere
from medssl_bench.plan import FinetuneUnit, Plan, PretrainUnit, ProbeUnit, Unit
from medssl_bench.units import run_finetune, run_pretrain, run_probe


def reap(ctx: RunContext) -> None:
    reaped = ctx.store.reap_dead()
    if reaped:
        ctx.echo(f"Marked {len(reaped)} run(s) left RUNNING by a killed process as KILLED.")


#: Unit class -> its runner, most specific class first (the first ``isinstance`` match runs):
#: a new kind of unit is one entry here. A runner takes the context, the unit and the
#: results of the units it depends on (key -> result).
RUNNERS: dict[type[Unit], Callable[[RunContext, Any, dict[str, Any]], Any]] = {
    PretrainUnit: lambda ctx, unit, done: run_pretrain(ctx, unit),
    ProbeUnit: lambda ctx, unit, done: run_probe(ctx, unit, done[unit.pretraining]),
    FinetuneUnit: lambda ctx, unit, done: run_finetune(ctx, unit, done[unit.pretraining]),
}


def run_unit(ctx: RunContext, unit: Unit, done: dict[str, Any]) -> Any:
    """Run one unit whose dependencies are in ``done`` (key -> their results)."""
    for kind, runner in RUNNERS.items():
        if isinstance(unit, kind):
            return runner(ctx, unit, done)
    raise TypeError(f"no runner for unit {unit!r}")


def wait_released(ctx: RunContext, unit: Unit, poll: float | None = None) -> None:
    """Wait while another live process holds ``unit`` (``--wait``): until its run ends, or
    its lease dies (then it is reaped here and the unit runs in this process)."""
    import time

    from medssl_bench.leases import heartbeat_seconds

    poll = poll if poll is not None else min(10.0, heartbeat_seconds())
    shown = False
    while True:
        holder = ctx.store.holder_elsewhere(ctx.run.spec.name, unit.key)
        if holder is None:
            ctx.store.reap_key(ctx.run.spec.name, unit.key, "its lease died")
            return
        if not shown:
            ctx.echo(f"waiting for {unit.what}: running on {holder.where()}")
            shown = True
        time.sleep(poll)


def record_failure(ctx: RunContext, unit: Unit, exc: Exception) -> None:
    """One failed unit: an outcome with the error, and one red line (the sweep goes on)."""
    import traceback

    detail = str(exc) if isinstance(exc, BenchError) else traceback.format_exc(limit=3)
    what, shown = unit.what, unit.what
    if isinstance(unit, PretrainUnit):  # always name the corpus of a failed pretraining
        what = f"pretrain {unit.task} on {unit.corpus_label}"
        shown = f"pretraining {unit.task} on {unit.corpus_label}"
    ctx.outcomes.append(Outcome(what, "failed", detail, unit.task, unit.stage))
    ctx.echo(f"[red]FAILED[/red] {shown}: {exc}")


class InProcess(Executor):
    """Run the plan's units one after another in this process."""

    name = "inprocess"
    default = True

    class Config(PluginConfig):
        pass

    def execute(self, plan: Plan, ctx: RunContext) -> list[Any]:
        reap(ctx)
        done: dict[str, Any] = {}
        failed: dict[str, str] = {}  # key -> what failed (itself or a dependency)
        records = []
        for unit in plan:
            blocked = next((failed[k] for k in unit.depends_on if k in failed), None)
            if blocked is not None:
                failed[unit.key] = blocked
                ctx.outcomes.append(Outcome(unit.what, "skipped", f"{blocked} failed",
                                            unit.task, unit.stage))
                continue
            try:
                if ctx.wait:
                    wait_released(ctx, unit)
                done[unit.key] = run_unit(ctx, unit, done)
            except RunningElsewhere as exc:  # another live process runs it: not ours
                failed[unit.key] = f"{unit.what} ({exc})"
                ctx.outcomes.append(Outcome(unit.what, "skipped", str(exc), unit.task,
                                            unit.stage))
                continue
            except TrackingUnavailable as exc:  # the store is gone: so is the sweep
                record_failure(ctx, unit, exc)
                raise
            except Exception as exc:  # one unit's failure must not end the sweep
                if ctx.distributed:  # ... unless the processes of a DDP run lost step
                    raise
                failed[unit.key] = unit.what
                record_failure(ctx, unit, exc)
                continue
            if isinstance(unit, FinetuneUnit) and done[unit.key] is not None:
                records.append(done[unit.key])
        return records


@hookimpl
def bench_register_executors(register):
    register(InProcess)
