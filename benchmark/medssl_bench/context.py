"""The run context: what planning and executing one ``bench run`` share (the resolved run,
plugin instances, device, tracking store, cache folder, output), and the datasets it loads,
each once."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medssl_bench.engine import Progress
from medssl_bench.errors import BenchError
from medssl_bench.interfaces import DataSplits, ProxyTask
from medssl_bench.plugins import Registry
from medssl_bench.runtime import Runtime
from medssl_bench.spec import ResolvedRun
from medssl_bench.store import ResultStore

#: The dataset roles a run can have: the fine-tuning dataset and (transfer) the corpus.
ROLE_NOTES = {"dataset": "", "pretrain_dataset": " (pretraining)"}


@dataclass
class Outcome:
    """What happened to one unit of work."""

    what: str
    status: str  # "ran", "reused", "failed", "skipped"
    detail: str = ""
    task: str = ""
    stage: str = "finetune"  # or "pretrain", "probe"


@dataclass
class RunContext:
    """Everything a protocol's planning and an executor need, prepared by the CLI (or a test)."""

    registry: Registry
    run: ResolvedRun
    plugins: dict[str, Any]
    device: torch.device
    #: Where results go; None only for a dry run on a store that does not exist yet.
    store: ResultStore | None
    cache_dir: Path
    force: bool = False
    #: Follow units held by other live processes until they are released (``--wait``)
    #: instead of leaving them to those processes.
    wait: bool = False
    progress: Progress = field(default_factory=Progress)
    echo: Any = print
    outcomes: list[Outcome] = field(default_factory=list)
    #: What units of this run share in memory (the probes' features by cache file), so a
    #: --force run recomputes a shared thing once, not once per unit.
    memo: dict[str, Any] = field(default_factory=dict)
    #: Imported weights to fine-tune from beside the tasks (``--init weights:NAME``):
    #: :class:`medssl_bench.imports.ImportedWeights`, planned as their own entries.
    inits: list[ProxyTask] = field(default_factory=list)
    #: How trainings run: one process on ``device`` unless given (DDP: a
    #: :class:`medssl_bench.distributed.DistributedRuntime`, with a store every rank shares).
    runtime: Runtime | None = None
    _data: dict[str, DataSplits] = field(default_factory=dict, repr=False)
    _baseline: ProxyTask | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.runtime is None:
            self.runtime = Runtime.local(self.device)

    @property
    def distributed(self) -> bool:
        """Whether several processes run this plan together (DDP): a unit that fails on
        any of them ends the run, since the others cannot go on without it."""
        return self.runtime is not None and self.runtime.world_size > 1

    # ------------------------------------------------------------------ plugins
    def tasks(self) -> list[ProxyTask]:
        """The tasks the user asked for (``--task a,b``), in order."""
        return list(self.plugins.get("tasks") or [self.plugins["task"]])

    def baseline_task(self) -> ProxyTask:
        """The task every sweep runs beside the others: the one that declares itself the
        baseline (``ProxyTask.baseline``), taken from ``--task`` when named there."""
        if self._baseline is None:
            named = [t for t in self.tasks() if t.baseline]
            self._baseline = named[0] if named else self.registry.baseline_task()()
        return self._baseline

    def task(self, name: str) -> ProxyTask:
        for task in [*self.tasks(), self.baseline_task(), *self.inits]:
            if task.name == name:
                return task
        raise KeyError(name)

    # ------------------------------------------------------------------ data
    def data(self, role: str = "dataset") -> DataSplits:
        """The loaded splits of the run's ``role`` dataset (loaded on first use)."""
        if role not in self._data:
            self._data[role] = self._load(role)
        return self._data[role]

    def _load(self, role: str) -> DataSplits:
        dataset = self.plugins[role]
        note = ROLE_NOTES.get(role, f" ({role})")
        if role == "dataset" and "pretrain_dataset" in self.plugins:
            note = " (fine-tuning)"
        t0 = time.perf_counter()
        data = dataset.load()

        def size(split: Any) -> str:
            try:
                return str(len(split))
            except BenchError:  # a pretraining-only corpus (LUNA16) has no labeled splits
                return "no"

        self.echo(f"Dataset {dataset.name}{note}: {size(data.unlabeled)} unlabeled, "
                  f"{size(data.train)} train, {size(data.val)} val, {size(data.test)} test "
                  f"({time.perf_counter() - t0:.1f}s)")
        if role == "dataset":
            if (data.info.extra or {}).get("pretraining_only"):
                raise BenchError(f"Dataset {dataset.name!r} is a pretraining corpus without "
                                 f"labels: use it as --pretrain-dataset {dataset.name} with "
                                 "--protocol transfer and fine-tune on a labeled --dataset.")
            # Fail before pretraining (possibly hours) rather than in every fine-tune after it.
            for name in ("train", "val", "test"):
                if len(getattr(data, name)) == 0:
                    raise BenchError(f"Dataset {dataset.name!r} has an empty {name} split; it "
                                     "needs at least one labeled case there (check its split "
                                     "settings).")
        return data
