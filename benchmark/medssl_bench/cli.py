"""The ``bench`` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from rich.console import Console

from medssl_bench import __version__, data_check
from medssl_bench.errors import BenchError, ConfigError

# timm's model zoo (hrnet) uses torch.jit.interface, deprecated since torch 2.14: a warning
# on every command that no user can act on
warnings.filterwarnings("ignore", message=r"`torch\.jit\.interface` is deprecated",
                        category=FutureWarning)

#: Console width when the output is not a terminal (a pipe, a file, a scheduler's log):
#: wide enough that no table cell is cut to rich's 80-column default. Tables only take the
#: width their content needs, so short ones stay short.
WIDE = 1000


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # a closed or unusual stream
        return False


def make_console(stderr: bool = False) -> Console:
    """A console for stdout (or stderr): the terminal's width on a terminal, :data:`WIDE`
    otherwise, so `bench leaderboard > lb.txt` keeps every cell whole."""
    tty = _isatty(sys.stderr if stderr else sys.stdout)
    return Console(stderr=stderr, soft_wrap=True, width=None if tty else WIDE)


console = make_console()
err_console = make_console(stderr=True)


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--protocol", help="Protocol name, e.g. data-efficiency (or run.protocol in "
                   "--config).")
    p.add_argument("--task", help="Proxy task name, e.g. rotation3d (see `bench "
                   "plugins`); several as rotation3d,jigsaw3d, or all (every pretraining task of "
                   "the dataset's dims). Each pretrains once; scratch runs once.")
    p.add_argument("--backbone", help="Backbone name (default: unet3d for 3D datasets, timm2d "
                   "for 2D ones).")
    p.add_argument("--dataset", help="Dataset name (default phantom3d, built in, no download).")
    p.add_argument("--pretrain-dataset", help="transfer protocol: the dataset whose unlabeled pool "
                   "pretraining reads (configure it with --set pretrain_dataset.key=value).")
    p.add_argument("--config", help="YAML file with sections run/task/backbone/dataset/protocol/"
                   "pretrain/finetune.")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[],
                   metavar="KEY=VALUE", help="Override a setting, e.g. --set pretrain.epochs=5 "
                   "dataset.path=/data/x.npz protocol.fractions=[10,100].")
    p.add_argument("--preset", choices=["quick", "paper"], default=None,
                   help="quick: a whole protocol in minutes on a CPU (the default, unless the "
                   "--config file sets run.preset); paper: the papers' settings, for a GPU.")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda.")
    p.add_argument("--init", action="append", default=[], metavar="weights:NAME",
                   help="Also fine-tune from weights imported with `bench weights import`, as "
                   "the leaderboard entry weights:NAME beside the tasks and scratch (without "
                   "--task: beside scratch only).")
    p.add_argument("--executor", default=None,
                   help="How the plan's units run: inprocess (default: one after another in this "
                   "process); `bench plugins` lists the installed executors, `--set executor.KEY="
                   "VALUE` configures one.")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default sqlite:///mlflow.db in the working directory; "
                   "a few parallel sweeps may share it, many writers want an MLflow server: "
                   "http://host:5000). A plain path ending in .db/.sqlite means "
                   "sqlite:///<absolute path>.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench",
        description="medssl-bench: does a self-supervised proxy task help your medical-imaging "
        "task, and by how much? Pretrain, fine-tune on label fractions beside scratch, compare.",
    )
    parser.add_argument("--version", action="version", version=f"medssl-bench {__version__}")
    parser.add_argument("--debug", action="store_true", help="Show tracebacks for errors.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="Run a protocol (pretrain, fine-tune, evaluate, log to MLflow).")
    _add_run_arguments(run)
    run.add_argument("--force", action="store_true",
                     help="Redo pretraining and fine-tunes even when finished results exist.")
    run.add_argument("--dry-run", action="store_true",
                     help="Print the plan (every unit of work, its run key, what it waits for and "
                     "whether it would run, resume or be reused) and stop; nothing trains.")
    run.add_argument("--cache-dir", default=None,
                     help="Where pretrained encoders are cached (default .medssl_bench/cache).")
    run.add_argument("--workers", type=int, default=None, metavar="K",
                     help="Run up to K units at once (--executor local unless another is named; "
                     "the same as --set executor.workers=K). More than one needs a tracking "
                     "server (--tracking-uri http://host:port), not SQLite.")
    run.add_argument("--wait", action="store_true",
                     help="When units of this sweep are still running in other live processes "
                     "(an earlier bench run, Slurm jobs): follow them until they end, then "
                     "finish the sweep. Without it bench run says where they run and exits 5.")
    from medssl_bench import launch

    launch.add_arguments(run)

    status = sub.add_parser("status", help="Where a sweep stands: each unit done, running "
                            "(where, since when), failed (why) or pending. Takes bench run's "
                            "arguments; creates nothing.")
    _add_run_arguments(status)
    status.add_argument("--json", action="store_true", help="Print JSON instead of a table.")

    val = sub.add_parser("validate", help="Check a run's plugins and configs without running it.")
    _add_run_arguments(val)

    plugins = sub.add_parser("plugins", help="List installed tasks, backbones, datasets, protocols.")
    plugins.add_argument("--json", action="store_true", help="Print JSON instead of a table.")

    schema = sub.add_parser("schema", help="Print the JSON schema of a plugin's Config.")
    schema.add_argument("kind", choices=["task", "backbone", "dataset", "protocol", "executor",
                                         "pretrain", "finetune"])
    schema.add_argument("name", nargs="?", help="Plugin name (not needed for pretrain/finetune).")

    board = sub.add_parser("leaderboard", help="Rank finished results from MLflow.")
    board.add_argument("--protocol", help="Only this protocol; 'all': every protocol side by "
                       "side per dataset, with their rank correlations.")
    board.add_argument("--dataset", help="Only this dataset.")
    board.add_argument("--task", help="Only this task (scratch is always kept).")
    board.add_argument("--spec-version", type=int, help="Only results of this spec version.")
    board.add_argument("--format", choices=["table", "markdown", "csv", "json"], default="table")
    board.add_argument("--summary", action="store_true", help="JSON: an object with rows, "
                       "mean_ranks, annotation_saving and published instead of a list of rows.")
    board.add_argument("--tracking-uri", default=None,
                       help="MLflow tracking URI (default sqlite:///mlflow.db; a plain .db path "
                       "works too).")

    report = sub.add_parser("report", help="Plots (data-efficiency and convergence curves) and "
                            "a JSON/Markdown summary, written to a folder and logged to MLflow.")
    report.add_argument("--out", default="bench-report", help="Output folder (default bench-report).")
    report.add_argument("--protocol", help="Only this protocol; 'all': adds every protocol side "
                        "by side per dataset, with their rank correlations.")
    report.add_argument("--dataset", help="Only this dataset.")
    report.add_argument("--task", help="Only these tasks (comma-separated; scratch is kept).")
    report.add_argument("--spec-version", type=int, help="Only results of this spec version.")
    report.add_argument("--target", type=float, help="Convergence target share of scratch's final "
                        "score (default: the protocol's, 0.95).")
    report.add_argument("--error-bars", choices=["std", "ci"], default="std")
    report.add_argument("--no-mlflow", action="store_true", help="Do not log the report to MLflow.")
    report.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default sqlite:///mlflow.db; a plain .db path "
                        "works too).")
    data_check.add_parser(sub)
    from medssl_bench import weights_cli

    weights_cli.add_parser(sub)
    return parser


def _tracking_uri(args: argparse.Namespace) -> str:
    from medssl_bench.tracking import DEFAULT_TRACKING_URI

    return args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _resolve(args: argparse.Namespace):
    """What `bench run` and `bench validate` share, so they accept and refuse the same runs:
    the resolved run (plugins, configs and their cross-checks) and the device."""
    from medssl_bench.config import parse_overrides
    from medssl_bench.device import resolve_device
    from medssl_bench.plugins import get_registry
    from medssl_bench.spec import resolve_run

    registry = get_registry()
    task = args.task
    if not task and args.init and not _config_names_task(args.config):
        task = registry.baseline_task().name  # --init alone: the imports beside the baseline
    run = resolve_run(
        registry, args.protocol, task, args.backbone, args.dataset, args.preset or "auto",
        args.config, parse_overrides(args.overrides), args.pretrain_dataset, args.executor,
    )
    device = resolve_device(args.device)
    return registry, run, device


def _config_names_task(path: str | None) -> bool:
    from medssl_bench.config import load_yaml

    return bool(path and ((load_yaml(path) or {}).get("run") or {}).get("task"))


def _inits(args: argparse.Namespace, plugins: dict[str, Any], cache_dir: Path) -> list[Any]:
    """``--init weights:NAME``: the imported weights, checked against the run's backbone."""
    from medssl_bench.imports import resolve_inits

    return resolve_inits(args.init, cache_dir, plugins["backbone"]) if args.init else []


def _check_inits_planned(ctx: Any, plan: Any) -> None:
    """A protocol that plans its own units (not through SweepPlanner.sweep) may not know
    imported weights: refuse rather than run without the entry the user asked for."""
    planned = {getattr(u, "weights", "") for u in plan}
    lost = [i.name for i in ctx.inits if i.provenance.name not in planned]
    if lost:
        raise ConfigError(f"Protocol {ctx.run.spec.name!r} does not plan imported weights "
                          f"({', '.join(lost)}); drop --init or use a sweep protocol such as "
                          "data-efficiency.")


def _warn(run: Any, device: Any) -> None:
    """One yellow line per legal but probably unintended choice, at the start of a run."""
    warnings = list(run.warnings)
    if device.type == "cpu" and run.preset == "paper":
        warnings.append("the paper preset on the CPU will take very long (days or more: the "
                        "papers' epochs at full image size). Use --device cuda on a GPU "
                        "machine, or --preset quick for a trial run.")
    for text in warnings:
        err_console.print(f"[yellow]warning:[/yellow] {text}", highlight=False)


def cmd_validate(args: argparse.Namespace) -> int:
    from medssl_bench.spec import check_data_paths, check_source_paths, instantiate
    from medssl_bench.tracking import absolute_uri

    registry, run, device = _resolve(args)
    check_data_paths(run)
    plugins = instantiate(registry, run)
    check_source_paths(plugins)
    from medssl_bench.weights_cli import cache_dir

    _inits(args, plugins, cache_dir(None))
    absolute_uri(_tracking_uri(args))  # refuses what bench run refuses, creates nothing
    console.print_json(json.dumps(run.as_dict()))
    _warn(run, device)
    console.print("[green]valid[/green]")
    return 0


def _logs_text(logs: dict[str, float] | Any) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in logs.items())


class RichProgress:
    """Renders the training loop's events (:mod:`medssl_bench.events`) as rich progress
    bars: one bar per epoch with the epoch's mean logs so far, refreshed at most every
    ``refresh`` seconds (reading them synchronises with the GPU)."""

    def __init__(self, progress, refresh: float = 0.5, clock=time.monotonic) -> None:
        self.progress, self.refresh, self.clock = progress, refresh, clock
        self.bars: dict[str, Any] = {}  # training -> its current epoch's bar
        self.shown = -math.inf

    def __call__(self, event: Any) -> None:
        from medssl_bench.events import EpochEnded, EpochStarted, StepEnded

        if isinstance(event, EpochStarted):
            self.bars[event.what] = self.progress.add_task(event.description, total=event.steps,
                                                           info="")
        elif isinstance(event, StepEnded) and event.what in self.bars:
            fields = {}
            if self.clock() - self.shown >= self.refresh:
                fields["info"] = _logs_text(event.running())
                self.shown = self.clock()
            self.progress.update(self.bars[event.what], advance=1, **fields)
        elif isinstance(event, EpochEnded) and event.what in self.bars:
            self.progress.remove_task(self.bars.pop(event.what))


class PlainProgress:
    """Progress for logs (nohup, SLURM, a pipe): no bars, which a non-terminal never shows,
    but one plain line at most every ``interval`` seconds (and always for the last epoch of
    a training) with the epoch, its mean losses and the training's time so far, mid-epoch
    when an epoch is long; after a pretraining's last epoch a ``pretrained <task> in N s``
    line. Without these a paper run logs nothing for hours between "Dataset ..." and the
    first fine-tune result. Renders the training loop's events (:mod:`medssl_bench.events`)."""

    def __init__(self, echo, interval: float = 30.0, clock=time.monotonic) -> None:
        self.echo, self.interval, self.clock = echo, interval, clock
        self.last = clock()
        self.epochs: dict[str, Any] = {}  # training -> its current EpochStarted

    def __call__(self, event: Any) -> None:
        from medssl_bench.events import EpochEnded, EpochStarted, StepEnded, TrainingEnded

        if isinstance(event, EpochStarted):
            self.epochs[event.what] = event
        elif isinstance(event, StepEnded):
            started = self.epochs.get(event.what)
            mid_epoch = event.step < event.steps  # EpochEnded reports the epoch's end
            if started and mid_epoch and self.clock() - self.last >= self.interval:
                self._line(f"{started.description} step {event.step}/{event.steps}",
                           event.running(), event.seconds)
        elif isinstance(event, EpochEnded):
            self.epochs.pop(event.what, None)
            if event.last or self.clock() - self.last >= self.interval:
                self._line(event.description, event.logs, event.seconds)
        elif isinstance(event, TrainingEnded) and event.stage == "pretrain":
            self.echo(f"pretrained {event.what} in {event.seconds:.0f} s")

    def _line(self, where: str, logs: Any, seconds: float) -> None:
        self.echo(f"{where}: {_logs_text(logs) or 'no steps'} ({seconds:.0f} s)")
        self.last = self.clock()


def cmd_run(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from medssl_bench import distributed, launch
    from medssl_bench.context import RunContext
    from medssl_bench.device import configure_backend
    from medssl_bench.spec import instantiate
    from medssl_bench.store import ResultStore
    from medssl_bench.tracking import Tracker, absolute_uri
    from medssl_bench.units import preflight

    if launch.wanted(args):
        return launch.launch(args, args.argv)
    _workers_flag(args)
    runtime = None
    if distributed.launched():  # one process of several (torchrun)
        world = os.environ["WORLD_SIZE"]
        args.overrides = [*args.overrides, f"pretrain.world_size={world}",
                          f"finetune.world_size={world}"]
    registry, run, device = _resolve(args)
    plugins = instantiate(registry, run)
    if distributed.launched():
        _check_distributed_executor(registry, run, plugins)
        runtime = distributed.DistributedRuntime.from_env(device)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, distributed.on_sigterm)
        device = runtime.device
        console.quiet = not runtime.is_main  # one process speaks; errors from any
    configure_backend(device)
    uri = _tracking_uri(args)
    if not args.dry_run:  # parallel workers on SQLite: refused before a file is created
        from medssl_bench.parallel import check_shared_store

        check_shared_store(absolute_uri(uri), plugins["executor"].writers(),
                           run.names["executor"])
    # a dry run reads the store (what is finished) but never creates one
    if runtime is not None:  # rank 0 alone opens the store; the others ask it
        store: Any = distributed.MainStore(runtime, ResultStore(Tracker(uri), str(device))
                                           if runtime.is_main else None)
        distributed.ACTIVE_STORE.append(store)
    else:
        store = ResultStore.existing(uri) if args.dry_run else ResultStore(Tracker(uri),
                                                                          str(device))
    cache_dir = Path(args.cache_dir or os.environ.get("BENCH_CACHE_DIR") or ".medssl_bench/cache")
    inits = _inits(args, plugins, cache_dir)
    console.print(
        f"[bold]bench run[/bold] protocol={run.names['protocol']} (v{run.spec.version}) "
        f"task={','.join([*run.task_names, *(i.name for i in inits)])} backbone={run.names['backbone']} "
        f"dataset={run.names['dataset']} "
        + (f"pretrain_dataset={run.names['pretrain_dataset']} " if "pretrain_dataset" in run.names
           else "") +
        f"preset={run.preset} device={device} tracking={store.uri if store else absolute_uri(uri)}"
    )
    _warn(run, device)
    # the stream itself, not rich's is_terminal (FORCE_COLOR/TTY_COMPATIBLE would put live
    # bars into a log file)
    bars = _isatty(console.file)
    with (Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"), console=console, transient=True,
    ) if bars else contextlib.nullcontext()) as bar:
        rich_progress: Any = (RichProgress(bar) if bars else
                              PlainProgress(lambda line: console.print(line, markup=False,
                                                                       highlight=False)))
        ctx = RunContext(
            registry=registry, run=run, plugins=plugins, device=device, store=store,
            cache_dir=cache_dir, force=args.force, wait=args.wait,
            progress=rich_progress,
            echo=console.print, runtime=runtime,
        )
        ctx.inits = inits
        plan = plugins["protocol"].plan(ctx)
        _check_inits_planned(ctx, plan)
        preflight(ctx, plan)
        if args.dry_run:
            console.print(_plan_table(ctx, plan))
            return 0
        _check_not_running(ctx, plan, args.wait)
        records = plugins["executor"].execute(plan, ctx)
        plugins["protocol"].summarize(ctx, records)
    counts: dict[str, int] = {}
    for outcome in ctx.outcomes:
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
    console.print(_summary_table(ctx.outcomes))
    console.print(
        "Summary: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        + f". Results: `bench leaderboard --tracking-uri {store.uri}`; "
        + (f"browse: {store.uri}" if store.uri.startswith("http") else
           f"browse: `mlflow ui --backend-store-uri {store.uri}`.")
    )
    failed = [o for o in ctx.outcomes if o.status == "failed"]
    for o in failed:
        err_console.print(f"[red]failed[/red] {o.what}: {o.detail}")
    return 1 if failed else 0


def _check_distributed_executor(registry: Any, run: Any, plugins: dict[str, Any]) -> None:
    """Under DDP every process runs the plan's units itself, together: only the default
    executor does that (the others hand units to worker processes outside the group)."""
    default = registry.default("executor")
    if run.names["executor"] != default or plugins["executor"].writers() > 1:
        raise ConfigError(f"--nproc-per-node/torchrun runs every unit across the processes "
                          f"with the {default!r} executor; drop --executor "
                          f"{run.names['executor']} and --workers (a sweep of DDP units "
                          "in parallel is not supported).")


def _workers_flag(args: argparse.Namespace) -> None:
    """``--workers K``: ``executor.workers=K``, with the local executor unless one is named."""
    if args.workers is None:
        return
    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: give 1 or more.")
    args.executor = args.executor or "local"
    args.overrides = [*args.overrides, f"executor.workers={args.workers}"]


def _check_not_running(ctx: Any, plan: Any, wait: bool) -> None:
    """A rerun while units of the same sweep are held by live processes (an earlier run
    still going, Slurm jobs): say where, and stop (exit 5) rather than duplicate or wait
    forever; with ``--wait`` the executor follows them."""
    from medssl_bench.errors import StillRunning
    from medssl_bench.status import unit_states

    held = [s for s in unit_states(ctx.store, plan, ctx.run.spec.name) if s.state == "running"]
    # lease liveness is judged on each host: under DDP every process takes rank 0's view
    held = ctx.runtime.from_main(lambda: held)
    if not held:
        return
    lines = "\n".join(f"  {s.unit.what}: {s.holder.where()}" for s in held)
    if wait:
        console.print(f"{len(held)} unit(s) still running elsewhere; following them (--wait):\n"
                      + lines, markup=False, highlight=False)
        return
    raise StillRunning(
        f"{len(held)} unit(s) of this sweep are still running in other live processes:\n{lines}"
        "\nNothing was started (that would duplicate them). Rerun with --wait to follow them "
        "and finish the sweep, or watch with `bench status` (same arguments).")


def cmd_status(args: argparse.Namespace) -> int:
    """``bench status``: plan the sweep and show each unit's state from the store."""
    from rich.table import Table

    from medssl_bench.context import RunContext
    from medssl_bench.spec import instantiate
    from medssl_bench.status import counts, unit_states
    from medssl_bench.store import ResultStore

    registry, run, device = _resolve(args)
    plugins = instantiate(registry, run)
    store = ResultStore.existing(_tracking_uri(args))  # None: nothing run there yet
    quiet = (lambda *a, **k: None) if args.json else (
        lambda text: err_console.print(text, highlight=False))
    ctx = RunContext(registry=registry, run=run, plugins=plugins, device=device, store=store,
                     cache_dir=Path(os.environ.get("BENCH_CACHE_DIR") or ".medssl_bench/cache"),
                     echo=quiet)
    plan = plugins["protocol"].plan(ctx)
    states = unit_states(store, plan, run.spec.name)
    totals = counts(states)
    if args.json:
        print(json.dumps({"protocol": run.spec.name, "counts": totals,
                          "units": [s.as_dict() for s in states]}, indent=2))
        return 0
    colour = {"done": "green", "running": "cyan", "failed": "red", "pending": "yellow"}
    table = Table(title=f"Sweep status: {len(states)} units ({run.spec.name})")
    for column in ("#", "stage", "unit", "state", "where / why", "run key"):
        table.add_column(column, justify="right" if column == "#" else "left")
    for i, s in enumerate(states, 1):
        where = s.detail
        if s.state == "running" and s.holder is not None:
            where = s.holder.where()
        table.add_row(str(i), s.unit.stage, s.unit.what,
                      f"[{colour[s.state]}]{s.state}[/{colour[s.state]}]", where, s.unit.key)
    table.caption = ", ".join(f"{n} {state}" for state, n in totals.items())
    console.print(table)
    return 0


def _plan_table(ctx: Any, plan: Any):
    """``bench run --dry-run``: every unit, its key, what it waits for, what would happen."""
    from rich.table import Table

    from medssl_bench.units import unit_status

    whats = {u.key: u.what for u in plan}
    table = Table(title=f"Plan: {len(plan)} units ({plan.protocol})")
    for column in ("#", "stage", "unit", "run key", "after", "would"):
        table.add_column(column, justify="right" if column == "#" else "left")
    counts: dict[str, int] = {}
    for i, unit in enumerate(plan, 1):
        status = unit_status(ctx, unit)
        counts[status.split(" ")[0]] = counts.get(status.split(" ")[0], 0) + 1
        table.add_row(str(i), unit.stage, unit.what, unit.key,
                      ", ".join(whats[k] for k in unit.depends_on) or "-", status)
    table.caption = "; ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return table


def _summary_table(outcomes: list[Any]):
    """Per task and stage: how many units ran, were reused, failed or were skipped."""
    from rich.table import Table

    statuses = ("ran", "reused", "failed", "skipped")
    counts: dict[tuple[str, str], dict[str, int]] = {}
    for o in outcomes:
        row = counts.setdefault((o.task or "?", o.stage), dict.fromkeys(statuses, 0))
        row[o.status] = row.get(o.status, 0) + 1
    table = Table(title="Sweep summary")
    for c in ("task", "stage", *statuses):
        table.add_column(c, justify="left" if c in ("task", "stage") else "right")
    for (task, stage), row in counts.items():
        table.add_row(task, stage, *(f"[red]{row[s]}[/red]" if s == "failed" and row[s]
                                     else str(row[s]) for s in statuses))
    return table


def cmd_plugins(args: argparse.Namespace) -> int:
    from rich.table import Table

    from medssl_bench.plugins import get_registry

    registry = get_registry()
    rows = [r.as_dict() for r in registry.records()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title="medssl-bench plugins")
    for column in ("name", "kind", "distribution", "version", "status"):
        table.add_column(column, no_wrap=True)
    table.add_column("summary", overflow="fold", ratio=1)
    for r in rows:
        status = "[green]ok[/green]" if r["status"] == "ok" else "[red]failed[/red]"
        table.add_row(r["name"], r["kind"], r["distribution"], r["version"], status,
                      r["summary"] or r["error"])
    console.print(table)
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from medssl_bench.engine import FinetuneConfig, PretrainConfig
    from medssl_bench.plugins import get_registry

    if args.kind in ("pretrain", "finetune"):
        model: Any = PretrainConfig if args.kind == "pretrain" else FinetuneConfig
    else:
        if not args.name:
            raise ConfigError(f"`bench schema {args.kind}` needs a plugin name, e.g. "
                              f"`bench schema {args.kind} NAME`; `bench plugins` lists them.")
        model = get_registry().get(args.kind, args.name).Config
    print(json.dumps(model.model_json_schema(), indent=2))
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from medssl_bench import leaderboard
    from medssl_bench.store import ResultStore

    store = ResultStore.existing(_tracking_uri(args))  # None: no store file, nothing run yet
    side_by_side = args.protocol == leaderboard.ALL_PROTOCOLS
    results = leaderboard.select(store.results() if store else [],
                                 None if side_by_side else args.protocol,
                                 args.dataset, args.task, args.spec_version)
    mixed = leaderboard.mixed_versions(results)
    for protocol, versions in mixed.items():
        err_console.print(f"note: {protocol} has results of spec versions {versions}; each version "
                          "is ranked in its own section (never together). --spec-version N "
                          "shows one.")
    rows = leaderboard.aggregate(results)
    if side_by_side and args.format != "json":
        return _print_side_by_side(args.format, rows)
    if args.format == "json":
        print(leaderboard.as_json(rows, with_summary=args.summary, side_by_side=side_by_side))
    elif args.format == "csv":
        print(leaderboard.as_csv(rows), end="")
    elif args.format == "markdown":
        print(leaderboard.as_markdown(rows), end="")
    else:
        if not rows:
            console.print("No finished results yet. Run one: "
                          "`bench run --protocol data-efficiency --task rotation3d`")
            return 0
        for table in leaderboard.as_rich_tables(rows):
            console.print(table)
    return 0


def _print_side_by_side(fmt: str, rows: list) -> int:
    """``bench leaderboard --protocol all``: one view per dataset (and backbone, metric)."""
    from medssl_bench import leaderboard

    views = leaderboard.protocol_views(rows)
    if fmt == "csv":
        print(leaderboard.views_csv(views), end="")
    elif fmt == "markdown":
        print(leaderboard.views_markdown(views), end="")
    elif not views:
        console.print("No finished results yet. Run one: "
                      "`bench run --protocol data-efficiency --task rotation3d`")
    else:
        for table in leaderboard.views_rich_tables(views):
            console.print(table)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from medssl_bench import report
    from medssl_bench.store import ResultStore

    store = ResultStore.existing(_tracking_uri(args))  # None: no store file, nothing run yet
    if store is None:  # still answer a typo'd filter as the leaderboard does
        from medssl_bench import leaderboard

        leaderboard.select([], None if args.protocol == leaderboard.ALL_PROTOCOLS
                           else args.protocol, args.dataset, args.task, args.spec_version)
    written = report.write_report(
        store, Path(args.out), protocol=args.protocol, dataset=args.dataset, task=args.task,
        spec_version=args.spec_version, target=args.target, error_bars=args.error_bars,
        log_to_mlflow=not args.no_mlflow, echo=console.print,
    ) if store else []
    if not written:
        console.print("No finished results to report yet. Run one: "
                      "`bench run --protocol data-efficiency --task rotation3d`")
        return 0
    console.print(f"Report written to {args.out}/: " + ", ".join(p.name for p in written))
    return 0


COMMANDS = {
    "run": cmd_run,
    "validate": cmd_validate,
    "status": cmd_status,
    "plugins": cmd_plugins,
    "schema": cmd_schema,
    "leaderboard": cmd_leaderboard,
    "report": cmd_report,
    "data": lambda args: data_check.run(args, console),
    "weights": lambda args: _weights(args),
}


def _weights(args: argparse.Namespace) -> int:
    from medssl_bench import weights_cli

    return weights_cli.run(args, console)


def _rank_failed(exc: BaseException, debug: bool) -> int:
    """One process of a distributed run failed (or was stopped because another did): the
    rank that failed first says so, naming itself; the others stay quiet."""
    from medssl_bench import distributed

    message = distributed.fail_process(exc)
    if distributed.is_own(message):
        if debug:
            err_console.print_exception()
        err_console.print(f"[bold red]error:[/bold red] {message}", highlight=False)
    return exc.exit_code if isinstance(exc, BenchError) and distributed.is_own(message) else 1


def _terminate(signum, frame) -> None:
    """SIGTERM (a scheduler's cancel, `kill`) unwinds like Ctrl-C, so the run in progress is
    closed as KILLED in MLflow instead of left RUNNING."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted before or after the subcommand
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    args.debug, args.argv = debug, argv
    try:
        try:
            code = COMMANDS[args.command](args)
            if "torch.distributed" in sys.modules:  # under DDP: every process, together
                from medssl_bench import distributed

                distributed.shutdown()  # a peer failing meanwhile fails this one: below
            return code
        except BaseException as exc:
            import torch.distributed as dist

            if isinstance(exc, SystemExit) or not (dist.is_available() and dist.is_initialized()):
                raise
            return _rank_failed(exc, args.debug)
    except BenchError as exc:
        if args.debug:
            raise
        err_console.print(f"[bold red]error:[/bold red] {exc}", highlight=False)
        return exc.exit_code
    except KeyboardInterrupt:
        err_console.print("interrupted; finished results are kept, rerun the same command to resume")
        return 130
    except BrokenPipeError:  # `bench leaderboard --format json | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
        return 0


def entry() -> int:
    """The ``bench`` command's entry (console scripts, ``python -m medssl_bench``): :func:`main`,
    then SIGINT and SIGTERM ignored while the process exits. An interrupt still pending when
    ``main`` has decided its exit code (a deferred one is delivered at the next bytecode)
    would otherwise turn exit 130 into a death by SIGINT (seen once in CI)."""
    try:
        code = main()
    except KeyboardInterrupt:  # landed after main's own handler
        code = 130
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return code


if __name__ == "__main__":
    sys.exit(entry())
