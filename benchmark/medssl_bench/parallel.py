"""Parallel executors built on submitit: ``local`` (K worker processes on this machine, one
GPU each when there are GPUs) and ``slurm`` (one Slurm job per unit, arrays where units are
alike). Neither schedules more than this: submit the units whose dependencies are done, at
most ``workers`` at a time, wait, repeat; submitit starts, watches and collects the jobs.

A job runs one unit by its key (:func:`run_job`): it rebuilds the run context in the worker
(the same resolved run, tracking URI, cache folder and ``--force``), recovers the results of
the units it depends on from the store and the cache (a fine-tune finds its pretraining
finished and reuses the cached encoder), then runs the unit through
:func:`medssl_bench.executor.run_unit`. Its outcomes and result record come back to the
parent for the summary table. Exactly-once holds through the leases of the tracking store
(:mod:`medssl_bench.leases`), not through this process: a worker that dies (SIGKILL, OOM, a
node lost) leaves a run whose lease dies with it; the parent reaps it and submits the unit
again, up to ``max_retries`` times (a pretraining resumes from its last checkpoint).

Workers write to one tracking store at the same time, which SQLite cannot serve: they need
an MLflow server on a database server (:func:`check_shared_store`).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from medssl_bench.config import PluginConfig
from medssl_bench.context import Outcome, RunContext
from medssl_bench.errors import BenchError, ConfigError
from medssl_bench.executor import reap, record_failure, run_unit
from medssl_bench.hookspecs import hookimpl
from medssl_bench.interfaces import Executor
from medssl_bench.leases import JOB_ENV, RunningElsewhere
from medssl_bench.plan import FinetuneUnit, Plan, PretrainUnit, Unit
from medssl_bench.spec import ResolvedRun
from medssl_bench.tracking import sqlite_path

SERVER_SETUP = (
    "mlflow server --backend-store-uri postgresql://USER@DBHOST/mlflow "
    "--artifacts-destination file:///shared/mlartifacts --host 0.0.0.0 --port 5000")


def check_shared_store(uri: str, writers: int, executor: str) -> None:
    """Refuse an SQLite store for more than one writer, before anything is created: SQLite
    takes one writer at a time, and parallel workers on it wait, time out or lose runs."""
    if writers <= 1 or (sqlite_path(uri) is None and not uri.startswith("sqlite:")):
        return
    raise ConfigError(
        f"The {executor} executor runs up to {writers} workers at once, and the SQLite "
        f"tracking store {uri} takes one writer at a time. Parallel workers need an MLflow "
        f"tracking server on a database server: start one, e.g. `{SERVER_SETUP}` (PostgreSQL; "
        "README: Parallel sweeps), then pass `--tracking-uri http://HOST:5000` to every "
        "`bench` command. (With --workers 1 SQLite works.)")


# --------------------------------------------------------------------------- the worker


@dataclass
class JobSpec:
    """What a worker needs to run one unit: the parent's resolved run and settings, the unit
    (plain data: names, numbers, keys) and the units it depends on."""

    run: ResolvedRun
    uri: str
    cache_dir: str
    force: bool
    device: str
    unit: Unit
    deps: tuple[Unit, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    #: The run's ``--init weights:NAME`` values (imported weights, read from ``cache_dir``).
    inits: tuple[str, ...] = ()
    #: CPU threads of the worker's torch (None: torch's default, every core). K workers on
    #: a CPU each take their share: torch's OpenMP threads spin while waiting, so K workers
    #: with every core each run many times slower than with their share.
    threads: int | None = None


def _job_id() -> str:
    try:
        import submitit

        return str(submitit.JobEnvironment().job_id)
    except Exception:  # not under submitit (a direct call in a test)
        return ""


def unit_processes(run: ResolvedRun, unit: Unit) -> int:
    """How many processes train ``unit`` together: its stage's ``world_size`` (``--set
    pretrain.world_size=4``: a 4-process DDP pretraining in one job), 1 for a stage without
    one (probes)."""
    return int(getattr(run.configs.get(unit.stage), "world_size", 1))


def _join_job_group(device: Any) -> Any:
    """This task's place in its job's process group (submitit runs one task per process of
    a multi-process job): torchrun's environment from submitit's job environment, then the
    distributed runtime on it. The rendezvous is the job's first host, on a port derived
    from the job id (tasks of one job agree on it; concurrent jobs differ)."""
    import zlib

    import submitit

    from medssl_bench.distributed import DistributedRuntime

    env = submitit.JobEnvironment()
    os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks),
                      LOCAL_RANK=str(env.local_rank), LOCAL_WORLD_SIZE=str(env.num_tasks
                                                                           // env.num_nodes))
    # assigned, not defaulted: submitit and sbatch pass the submitting shell's environment
    # on, and a MASTER_PORT from there would be shared by every concurrent job
    os.environ["MASTER_ADDR"] = env.hostnames[0] if env.hostnames else "127.0.0.1"
    os.environ["MASTER_PORT"] = str(15000 + zlib.crc32(str(env.job_id).encode()) % 15000)
    return DistributedRuntime.from_env(device)


def _leave_job_group(runtime: Any) -> None:
    """A DDP job's processes all finished the unit: leave the process group together."""
    if runtime is not None:
        from medssl_bench.distributed import shutdown

        shutdown()


def run_job(spec: JobSpec) -> dict[str, Any]:
    """The body of one job, in the worker process: run ``spec.unit`` and report back
    ``{"status": "ok"|"failed"|"elsewhere", "outcomes": [...], "record": {...}|None}``."""
    from medssl_bench.cli import PlainProgress, make_console
    from medssl_bench.device import configure_backend, resolve_device
    from medssl_bench.plugins import get_registry
    from medssl_bench.spec import instantiate
    from medssl_bench.store import ResultRecord, ResultStore
    from medssl_bench.tracking import Tracker

    os.environ.update(spec.env)
    job = _job_id()
    if job:
        os.environ[JOB_ENV] = job  # every run this worker starts names its job
    console = make_console()
    echo = console.print
    registry = get_registry()
    plugins = instantiate(registry, spec.run)
    device = resolve_device(spec.device)
    configure_backend(device)
    import torch

    if spec.threads:
        torch.set_num_threads(spec.threads)
    runtime = None
    if unit_processes(spec.run, spec.unit) > 1:  # one of the job's DDP processes
        from medssl_bench import distributed

        runtime = _join_job_group(device)
        device = runtime.device
        console.quiet = not runtime.is_main
        store: Any = distributed.MainStore(
            runtime, ResultStore(Tracker(spec.uri), str(device)) if runtime.is_main else None)
        distributed.ACTIVE_STORE.append(store)
    else:
        store = ResultStore(Tracker(spec.uri), str(device))
    ctx = RunContext(registry=registry, run=spec.run, plugins=plugins, device=device,
                     store=store, cache_dir=Path(spec.cache_dir), force=False,
                     progress=PlainProgress(lambda line: console.print(line, markup=False)),
                     echo=echo, runtime=runtime)
    if spec.inits:
        from medssl_bench.imports import resolve_inits

        ctx.inits = list(resolve_inits(list(spec.inits), ctx.cache_dir, plugins["backbone"]))
    unit = spec.unit
    threads = f", {torch.get_num_threads()} CPU threads" if device.type == "cpu" else ""
    echo(f"job {job or '-'}: {unit.what} ({unit.key}) on {device}{threads}")
    done: dict[str, Any] = {}
    try:
        for dep in spec.deps:  # finished before this job was submitted: found, not rerun
            done[dep.key] = run_unit(ctx, dep, done)
        ctx.outcomes.clear()
        ctx.force = spec.force
        result = run_unit(ctx, unit, done)
        _leave_job_group(runtime)  # a peer failing now fails this process too: below
    except RunningElsewhere as exc:  # every process of a DDP job learns it (broadcast)
        ctx.outcomes.append(Outcome(unit.what, "skipped", str(exc), unit.task, unit.stage))
        _leave_job_group(runtime)
        return {"status": "elsewhere", "outcomes": [asdict(o) for o in ctx.outcomes],
                "record": None, "detail": str(exc)}
    except Exception as exc:  # the parent records it and goes on
        if runtime is not None:  # under DDP: the run's first failure, naming its rank
            from medssl_bench.distributed import fail_process

            exc = BenchError(fail_process(exc))
        record_failure(ctx, unit, exc)
        return {"status": "failed", "outcomes": [asdict(o) for o in ctx.outcomes],
                "record": None, "detail": ctx.outcomes[-1].detail}
    elsewhere = [o for o in ctx.outcomes if o.status == "skipped"
                 and o.detail.startswith("running elsewhere")]
    failed = [o for o in ctx.outcomes if o.status == "failed"]
    status = "elsewhere" if elsewhere else "failed" if failed else "ok"
    record = result.model_dump(mode="json") if isinstance(result, ResultRecord) else None
    return {"status": status, "outcomes": [asdict(o) for o in ctx.outcomes], "record": record,
            "detail": (elsewhere or failed)[0].detail if status != "ok" else ""}


# --------------------------------------------------------------------------- the parent


def _is_light(ctx: RunContext, unit: Unit) -> bool:
    """A unit the parent runs itself, at no cost: a pretraining that trains nothing (the
    baseline's parent run) or whose encoder is cached, a fine-tune already finished."""
    from medssl_bench.units import cache_path

    if ctx.force:
        return isinstance(unit, PretrainUnit) and not unit.pretrains
    if isinstance(unit, PretrainUnit):
        return not unit.pretrains or cache_path(ctx, unit).exists()
    return ctx.store.find(ctx.run.spec.name, unit.key) is not None


class SubmititExecutor(Executor):
    """What the submitit executors share: the loop over ready units, the worker's spec,
    retries of dead workers, following units another live process holds (they run there;
    their dependants run here once they finished, or here after all if its lease dies).
    Subclasses make the submitit executor and its per-job parameters."""

    class Config(PluginConfig):
        workers: int = Field(default=2, ge=1, description="How many units run at once "
                             "(`bench run --workers K`).")
        max_retries: int = Field(default=2, ge=0, description="How often a unit whose worker "
                                 "died (killed, out of memory, node lost) is submitted again.")
        poll_seconds: float = Field(default=2.0, gt=0, description="How often the parent "
                                    "looks at its jobs.")
        folder: str = Field(default=".medssl_bench/submitit", description="Where submitit "
                            "keeps each job's pickled call, result and logs (stdout/stderr).")
        time_limit_minutes: float = Field(default=7 * 24 * 60, gt=0, description="A job "
                                          "running longer is stopped (and retried).")

    def writers(self) -> int:
        return self.config.workers

    # -- what subclasses provide
    def make_executor(self, ctx: RunContext) -> Any:
        raise NotImplementedError

    def submit(self, executor: Any, ctx: RunContext, specs: list[JobSpec]) -> list[Any]:
        """Submit ``specs`` (units ready together); their jobs, in order."""
        raise NotImplementedError

    def worker_device(self, ctx: RunContext) -> str:
        return "cuda" if ctx.device.type == "cuda" else "cpu"

    def worker_threads(self, ctx: RunContext, unit: Unit) -> int | None:
        """CPU threads of each process of ``unit``'s job (None: torch's default)."""
        return None

    # -- the loop
    def execute(self, plan: Plan, ctx: RunContext) -> list[Any]:
        check_shared_store(ctx.store.uri, self.writers(), self.name)
        reap(ctx)
        sweep = _Sweep(plan)
        executor = self.make_executor(ctx)
        try:
            while sweep.pending or sweep.running or sweep.waiting:
                self._release_waiting(ctx, sweep)
                ready = self._ready(ctx, sweep)
                free = self.config.workers - len(sweep.running)
                if ready and free > 0:
                    now = ready[:free]
                    sweep.pending[:0] = ready[free:]
                    specs = [self._spec(ctx, u, sweep.by_key) for u in now]
                    jobs = self.submit(executor, ctx, specs)
                    for unit, job in zip(now, jobs, strict=True):
                        sweep.running[unit.key] = (job, unit)
                        ctx.echo(f"submitted {unit.what} (job {job.job_id})")
                    continue  # look for more ready units before waiting
                sweep.pending[:0] = ready
                finished = [k for k, (job, _) in sweep.running.items() if job.done()]
                for key in finished:
                    job, unit = sweep.running.pop(key)
                    self._collect(ctx, sweep, job, unit)
                if not finished:
                    time.sleep(self.config.poll_seconds)
        except BaseException:
            for job, unit in sweep.running.values():  # no orphans: each closes its run KILLED
                ctx.echo(f"cancelling {unit.what} (job {job.job_id})")
                try:
                    job.cancel(check=False)
                except Exception:  # best effort on the way out
                    pass
            raise
        return sweep.records

    def _release_waiting(self, ctx: RunContext, sweep: _Sweep) -> None:
        """Units another process held go back into the queue once it let go: finished (the
        job finds the result), or its lease died (the job reaps and reruns it)."""
        for key, unit in list(sweep.waiting.items()):
            if ctx.store.holder_elsewhere(ctx.run.spec.name, key) is None:
                del sweep.waiting[key]
                sweep.pending.insert(0, unit)

    def _ready(self, ctx: RunContext, sweep: _Sweep) -> list[Unit]:
        """Take the pending units whose dependencies are done out of the queue: those held by
        another live process wait for it, light ones run here; the rest, to submit."""
        ready = []
        for unit in list(sweep.pending):
            blocked = next((sweep.failed[k] for k in unit.depends_on if k in sweep.failed),
                           None)
            if blocked is not None:
                sweep.pending.remove(unit)
                sweep.failed[unit.key] = blocked
                ctx.outcomes.append(Outcome(unit.what, "skipped", f"{blocked} failed",
                                            unit.task, unit.stage))
                continue
            if not all(k in sweep.done for k in unit.depends_on):
                continue
            sweep.pending.remove(unit)
            holder = ctx.store.holder_elsewhere(ctx.run.spec.name, unit.key)
            if holder is not None:  # another live process runs it: follow, submit nothing
                self._wait_for(ctx, sweep, unit, f"running elsewhere: {holder.where()}")
            elif _is_light(ctx, unit):
                self._inline(ctx, sweep, unit)
            else:
                ready.append(unit)
        return ready

    def _wait_for(self, ctx: RunContext, sweep: _Sweep, unit: Unit, detail: str) -> None:
        ctx.echo(f"{unit.what} is {detail}: following it")
        sweep.waiting[unit.key] = unit

    def _spec(self, ctx: RunContext, unit: Unit, by_key: dict[str, Unit]) -> JobSpec:
        return JobSpec(run=ctx.run, uri=ctx.store.uri, cache_dir=str(ctx.cache_dir.resolve()),
                       force=ctx.force, device=self.worker_device(ctx), unit=unit,
                       deps=tuple(by_key[k] for k in unit.depends_on),
                       inits=tuple(init.name for init in ctx.inits),
                       threads=self.worker_threads(ctx, unit))

    def _inline(self, ctx: RunContext, sweep: _Sweep, unit: Unit) -> None:
        try:
            sweep.done[unit.key] = run_unit(ctx, unit, sweep.done)
        except RunningElsewhere as exc:
            self._wait_for(ctx, sweep, unit, str(exc))
        except Exception as exc:  # recorded, the sweep goes on
            sweep.failed[unit.key] = unit.what
            record_failure(ctx, unit, exc)
        else:
            if isinstance(unit, FinetuneUnit) and sweep.done[unit.key] is not None:
                sweep.records.append(sweep.done[unit.key])

    def _collect(self, ctx: RunContext, sweep: _Sweep, job: Any, unit: Unit) -> None:
        """A job has ended: take its outcomes and record, or (no result: the worker died)
        reap its run and submit the unit again, up to ``max_retries`` times."""
        from medssl_bench.store import ResultRecord

        try:
            out = _job_report(job)
        except Exception as exc:  # the worker died: reap, then retry
            n = sweep.attempts[unit.key] = sweep.attempts.get(unit.key, 0) + 1
            why = f"worker job {job.job_id} ended without a result ({_first_line(exc)})"
            reaped = ctx.store.reap_key(ctx.run.spec.name, unit.key, why, job=str(job.job_id))
            if n <= self.config.max_retries:
                ctx.echo(f"[yellow]{unit.what}[/yellow]: {why}; "
                         f"{'its run marked KILLED, ' if reaped else ''}running it again "
                         f"(retry {n} of {self.config.max_retries})")
                sweep.pending.insert(0, unit)
            else:
                sweep.failed[unit.key] = unit.what
                record_failure(ctx, unit, BenchError(
                    f"{why}; gave up after {self.config.max_retries} retries. Its log: "
                    f"{Path(self.config.folder)} (job {job.job_id})."))
            return
        if out["status"] == "elsewhere":  # lost the claim to another live process: follow
            self._wait_for(ctx, sweep, unit, out["detail"])
            return
        ctx.outcomes.extend(Outcome(**o) for o in out["outcomes"])
        if out["status"] == "ok":
            sweep.done[unit.key] = None
            if out["record"] is not None:
                sweep.records.append(ResultRecord.model_validate(out["record"]))
            shown = out["outcomes"][-1] if out["outcomes"] else {}
            ctx.echo(f"{unit.what}: {shown.get('status', 'done')} "
                     f"{shown.get('detail', '')} (job {job.job_id})")
        else:
            sweep.failed[unit.key] = unit.what
            ctx.echo(f"[red]FAILED[/red] {unit.what} (job {job.job_id}): {out['detail']}")


def _job_report(job: Any) -> dict[str, Any]:
    """What a job reported: its rank 0's report; for a multi-process job whose rank 0 has
    none (its :class:`~medssl_bench.distributed.PeerWatch` ended it after another rank
    failed), the first failing rank's report, so the failure is recorded with its message
    instead of retried as a dead worker. Raises when neither exists (the job died)."""
    reports, error = [], None
    for task in range(getattr(job, "num_tasks", 1)):
        try:  # task by task: ``job.results()`` raises when any task has no result
            reports.append((task, job.task(task).result()))
        except Exception as exc:
            error = error or exc
    for task, report in reports:
        if task == 0 or report.get("status") == "failed":
            return report
    raise error if error is not None else RuntimeError(f"job {job.job_id} reported nothing")


@dataclass
class _Sweep:
    """The parent's view of a sweep in progress."""

    plan: Plan
    pending: list[Unit] = field(default_factory=list)
    done: dict[str, Any] = field(default_factory=dict)  # key -> result (None: ran in a job)
    failed: dict[str, str] = field(default_factory=dict)  # key -> what failed (or its dep)
    waiting: dict[str, Unit] = field(default_factory=dict)  # held by another live process
    attempts: dict[str, int] = field(default_factory=dict)
    running: dict[str, tuple[Any, Unit]] = field(default_factory=dict)
    records: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pending = list(self.plan)
        self.by_key = {u.key: u for u in self.plan}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


class LocalWorkers(SubmititExecutor):
    """Run independent units in K worker processes on this machine (submitit's local
    executor), one GPU each when there are GPUs."""

    name = "local"

    class Config(SubmititExecutor.Config):
        devices: list[int] | None = Field(default=None, description="GPU indices handed out "
                                          "one per running worker (its CUDA_VISIBLE_DEVICES); "
                                          "default: every GPU this process sees (none on a "
                                          "CPU run).")

    def make_executor(self, ctx: RunContext) -> Any:
        import submitit

        self._devices = self._gpu_list(ctx)
        for stage in ("pretrain", "finetune"):
            tasks = int(getattr(ctx.run.configs.get(stage), "world_size", 1))
            if self._devices and tasks > len(self._devices):
                raise ConfigError(f"{stage}.world_size={tasks}: a unit trains with {tasks} "
                                  f"processes, one GPU each, but the local executor has "
                                  f"{len(self._devices)} GPUs ({self._devices}); lower "
                                  f"{stage}.world_size or give more GPUs (executor.devices).")
        self._in_use: dict[int, int] = dict.fromkeys(self._devices, 0)
        self._job_gpu: dict[str, list[int]] = {}
        executor = submitit.LocalExecutor(folder=Path(self.config.folder) / "%j")
        executor.update_parameters(timeout_min=self.config.time_limit_minutes)
        return executor

    def _gpu_list(self, ctx: RunContext) -> list[int]:
        if ctx.device.type != "cuda":
            return []
        if self.config.devices is not None:
            return list(self.config.devices)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        if visible.strip():
            try:
                return [int(v) for v in visible.split(",") if v.strip()]
            except ValueError:
                raise ConfigError(f"CUDA_VISIBLE_DEVICES={visible!r} names GPUs by UUID: give "
                                  "--set executor.devices=[0,1] (indices).") from None
        import torch

        return list(range(torch.cuda.device_count()))

    def worker_threads(self, ctx: RunContext, unit: Unit) -> int | None:
        """On a CPU run, this machine's cores shared out between the workers (and between
        the processes of a DDP unit)."""
        if ctx.device.type == "cuda":
            return None
        share = len(os.sched_getaffinity(0)) // self.config.workers
        return max(1, share // unit_processes(ctx.run, unit))

    def submit(self, executor: Any, ctx: RunContext, specs: list[JobSpec]) -> list[Any]:
        jobs = []
        for spec in specs:
            tasks = unit_processes(ctx.run, spec.unit)
            gpus: list[int] = []
            if self._devices:  # the least used GPUs (more workers than GPUs share them)
                gpus = sorted(self._devices, key=lambda d: self._in_use[d])[:tasks]
                for gpu in gpus:
                    self._in_use[gpu] += 1
            executor.update_parameters(tasks_per_node=tasks, visible_gpus=gpus,
                                       gpus_per_node=len(gpus))
            job = executor.submit(run_job, spec)
            self._job_gpu[str(job.job_id)] = gpus
            jobs.append(job)
        return jobs

    def _collect(self, ctx: RunContext, sweep: _Sweep, job: Any, unit: Unit) -> None:
        for gpu in self._job_gpu.pop(str(job.job_id), []):  # the job's GPUs are free again
            self._in_use[gpu] -= 1
        super()._collect(ctx, sweep, job, unit)


class SlurmJobs(SubmititExecutor):
    """Submit units as Slurm jobs through submitit (arrays where units are alike);
    fine-tunes are submitted once the pretraining they start from has finished."""

    name = "slurm"

    class Config(SubmititExecutor.Config):
        workers: int = Field(default=16, ge=1, description="How many jobs are queued or "
                             "running at once (`bench run --workers K`).")
        cluster: Literal["slurm", "local", "debug"] = Field(
            default="slurm", description="slurm: submit with sbatch. local or debug: "
            "submitit's stand-ins (local processes; debug: in this process), for tests on a "
            "machine without Slurm; the same submitit code path otherwise.")
        partition: str | None = Field(default=None, description="Slurm partition (-p).")
        account: str | None = Field(default=None, description="Slurm account (-A).")
        qos: str | None = Field(default=None, description="Slurm QOS (--qos).")
        gpus_per_job: int = Field(default=1, ge=0, description="GPUs per process of a job: "
                                  "a unit trained by N processes (--set pretrain.world_size=N, "
                                  "DDP) runs as one job of N tasks with N x gpus_per_job GPUs.")
        cpus_per_job: int = Field(default=8, ge=1, description="CPUs per job (data loading).")
        mem_gb: float = Field(default=64, gt=0, description="Memory per job in GB.")
        time_limit_minutes: float = Field(default=24 * 60, gt=0, description="Slurm time "
                                          "limit per job (--time), in minutes.")
        sbatch: dict[str, str] = Field(default_factory=dict, description="Extra sbatch "
                                       "options, e.g. {constraint: a100, exclude: node3}.")
        setup: list[str] = Field(default_factory=list, description="Shell lines run in the "
                                 "job before the unit (module load ..., source venv/bin/"
                                 "activate).")
        array: bool = Field(default=True, description="Submit units that are ready together "
                            "and alike (same stage) as one job array.")

    def writers(self) -> int:
        return 1 if self.config.cluster == "debug" else self.config.workers

    def make_executor(self, ctx: RunContext) -> Any:
        import submitit

        processes = max(int(getattr(ctx.run.configs.get(stage), "world_size", 1))
                        for stage in ("pretrain", "finetune"))
        if self.config.cluster == "debug" and processes > 1:
            raise ConfigError(f"executor.cluster=debug runs each job inside this process; a "
                              f"unit of {processes} processes (world_size) needs "
                              "executor.cluster=slurm or local.")
        return submitit.AutoExecutor(folder=Path(self.config.folder) / "%j",
                                     cluster=self.config.cluster)

    def job_parameters(self, unit: Unit, processes: int = 1) -> dict[str, Any]:
        """The resources of ``unit``'s job: one task per process that trains it (a DDP
        pretraining with ``pretrain.world_size=N``: N tasks, N x ``gpus_per_job`` GPUs, on
        one node; each task joins the job's process group)."""
        c = self.config
        params: dict[str, Any] = {"timeout_min": int(c.time_limit_minutes),
                                  "gpus_per_node": c.gpus_per_job * processes,
                                  "cpus_per_task": c.cpus_per_job, "mem_gb": c.mem_gb,
                                  "nodes": 1, "tasks_per_node": processes,
                                  "name": f"bench-{unit.stage}"}
        if c.cluster == "slurm":
            params |= {"slurm_partition": c.partition, "slurm_account": c.account,
                       "slurm_qos": c.qos, "slurm_setup": list(c.setup),
                       "slurm_array_parallelism": c.workers,
                       "slurm_additional_parameters": dict(c.sbatch)}
            params = {k: v for k, v in params.items() if v is not None}
        return params

    def worker_threads(self, ctx: RunContext, unit: Unit) -> int | None:
        """A task's CPUs (torch would otherwise count the node's cores)."""
        return self.config.cpus_per_job

    def worker_device(self, ctx: RunContext) -> str:
        # on a cluster the parent (a login node) may have no GPU; the jobs ask for theirs
        if self.config.cluster == "slurm":
            return "auto"
        return super().worker_device(ctx)

    def submit(self, executor: Any, ctx: RunContext, specs: list[JobSpec]) -> list[Any]:
        groups: dict[str, list[int]] = {}
        for i, spec in enumerate(specs):
            groups.setdefault(spec.unit.stage if self.config.array else str(i), []).append(i)
        jobs: list[Any] = [None] * len(specs)
        for members in groups.values():
            unit = specs[members[0]].unit
            executor.update_parameters(**self.job_parameters(unit,
                                                             unit_processes(ctx.run, unit)))
            if len(members) > 1:  # one array job (map_array) for alike units
                array = executor.map_array(run_job, [specs[i] for i in members])
                ctx.echo(f"{len(members)} {specs[members[0]].unit.stage} units as one job "
                         "array")
                for i, job in zip(members, array, strict=True):
                    jobs[i] = job
            else:
                jobs[members[0]] = executor.submit(run_job, specs[members[0]])
        return jobs


@hookimpl
def bench_register_executors(register):
    register(LocalWorkers)
    register(SlurmJobs)
