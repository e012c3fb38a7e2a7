"""Built-in protocol runners.

- ``data-efficiency``: pretrain once on the dataset's unlabeled pool, fine-tune on nested
  label fractions over seeds beside the scratch baseline, test on the held-out split.
- ``transfer``: pretrain on corpus A (``--pretrain-dataset``), fine-tune on dataset B, beside
  pretraining on B itself and scratch.
- ``convergence``: the same sweep, read per epoch: how fast does each start reach a share of
  scratch's final validation score (see :mod:`medssl_bench.analysis`).

Every runner sweeps all requested tasks (``--task a,b`` / ``all``), runs scratch once, keeps
going when one pretraining or fine-tune fails, and survives SIGKILL: runs of dead processes
are marked KILLED first, finished fine-tunes are skipped, an interrupted pretraining resumes
from its last epoch checkpoint (:mod:`medssl_bench.checkpoint`).
"""

from __future__ import annotations

import math
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator

from medssl_bench.checkpoint import load_checkpoint, save_checkpoint
from medssl_bench.config import NEUTRAL, PluginConfig
from medssl_bench.engine import (
    FinetuneConfig,
    PretrainConfig,
    Progress,
    check_input_size,
    finetune,
    label_subset,
    pad_to_multiple,
    pretrain,
    subset,
)
from medssl_bench.errors import BenchError, ConfigError, TrainingError  # noqa: F401 (tests patch it here)
from medssl_bench.hookspecs import hookimpl
from medssl_bench.identity import ids_hash, key_of, semantic
from medssl_bench.interfaces import (
    FIGURE_CONVERGENCE,
    Backbone,
    Dataset,
    DataSplits,
    Protocol,
    ProxyTask,
)
from medssl_bench.plugins import Registry
from medssl_bench.spec import ResolvedRun
from medssl_bench.store import ResultIdentity, ResultRecord, ResultStore
from medssl_bench.tracking import Tracker
from medssl_bench.weights import load_weights, save_weights


@dataclass
class Outcome:
    """What happened to one unit of work in a sweep."""

    what: str
    status: str  # "ran", "reused", "failed", "skipped"
    detail: str = ""
    task: str = ""
    stage: str = "finetune"  # or "pretrain"


#: Seconds to sleep after every epoch (pretraining and fine-tuning): a test hook that makes
#: the kill-and-resume test deterministic on busy machines. Unset in normal use.
EPOCH_DELAY_ENV = "MEDSSL_BENCH_TEST_EPOCH_DELAY"


def _test_delay() -> None:
    delay = float(os.environ.get(EPOCH_DELAY_ENV, "0") or 0)
    if delay > 0:
        time.sleep(delay)


def dataset_ref(dataset: Dataset, data: DataSplits) -> str:
    """What published rows match against: ``name:file-stem`` for file-backed datasets
    (``medmnist3d:adrenalmnist3d``), or a plugin-given ``extra["reference"]``."""
    extra = data.info.extra or {}
    if extra.get("reference"):
        return str(extra["reference"])
    if extra.get("file"):
        return f"{dataset.name}:{Path(str(extra['file'])).name.split('.')[0]}"
    return dataset.name


@dataclass
class RunContext:
    """Everything a protocol runner needs, prepared by the CLI (or a test)."""

    registry: Registry
    run: ResolvedRun
    plugins: dict[str, Any]
    device: torch.device
    tracker: Tracker
    cache_dir: Path
    force: bool = False
    progress: Progress = field(default_factory=Progress)
    echo: Any = print
    outcomes: list[Outcome] = field(default_factory=list)


def plugin_version(registry: Registry, kind: str, name: str) -> str:
    record = registry.record(kind, name)
    return f"{record.distribution}=={record.version}"


class Sweep:
    """Shared machinery of protocol runners: cached pretraining, tracked fine-tunes."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.run = ctx.run
        self.backbone: Backbone = ctx.plugins["backbone"]
        self.pretrain_cfg: PretrainConfig = ctx.run.configs["pretrain"]
        self.finetune_cfg: FinetuneConfig = ctx.run.configs["finetune"]
        self.protocol_cfg = ctx.run.configs["protocol"]
        self.store = ResultStore(ctx.tracker, str(ctx.device))
        self.protocol = ctx.run.spec.name
        self.store.experiment(self.protocol)
        reaped = self.store.reap_dead()
        if reaped:
            ctx.echo(f"Marked {len(reaped)} run(s) left RUNNING by a killed process as KILLED.")

    # ------------------------------------------------------------------ identity
    def versions(self, task: ProxyTask, dataset: Dataset) -> dict[str, str]:
        reg = self.ctx.registry
        return {
            "task": plugin_version(reg, "task", task.name),
            "backbone": plugin_version(reg, "backbone", self.backbone.name),
            "dataset": plugin_version(reg, "dataset", dataset.name),
        }

    def pretrain_key(self, task: ProxyTask, dataset: Dataset, data: DataSplits) -> str:
        return key_of({
            "task": [task.name, semantic(task.config)],
            "backbone": [self.backbone.name, semantic(self.backbone.config)],
            "dataset": [dataset.name, semantic(dataset.config), data.split_hash],
            "pretrain": semantic(self.pretrain_cfg),
            "seed": self.protocol_cfg.pretrain_seed,
            "versions": self.versions(task, dataset),
        })

    def setup_hash(self, dataset: Dataset, data: DataSplits) -> str:
        """What a task and its scratch baseline share: the leaderboard only pools and ranks
        results with the same setup (a quick and a paper run never share a row)."""
        return key_of({
            "protocol": semantic(self.protocol_cfg, frozenset({"pretrain_seed"})),
            "dataset": [dataset.name, semantic(dataset.config), data.split_hash],
            "backbone": [self.backbone.name, semantic(self.backbone.config)],
            "finetune": semantic(self.finetune_cfg),
        }, 10)

    def task_setup_hash(self, task: ProxyTask) -> str:
        """What differs between two runs of one task that share a setup."""
        if not task.pretrains:
            return "-"
        return key_of({"task": semantic(task.config), "pretrain": semantic(self.pretrain_cfg),
                       "seed": self.protocol_cfg.pretrain_seed}, 10)

    # ------------------------------------------------------------------ pretraining
    def pretrained(self, task: ProxyTask, dataset: Dataset, data: DataSplits) -> tuple[Any, str, str]:
        """(weights or None, pretrain key, parent run id): train once, then reuse."""
        ctx = self.ctx
        key = self.pretrain_key(task, dataset, data) if task.pretrains else key_of(
            {"scratch": True, "backbone": [self.backbone.name, semantic(self.backbone.config)],
             "dataset": [dataset.name, semantic(dataset.config), data.split_hash],
             "versions": self.versions(task, dataset)})
        params = {"task": task.config.model_dump(mode="json"),
                  "backbone": self.backbone.config.model_dump(mode="json"),
                  "dataset": dataset.config.model_dump(mode="json")}
        if task.pretrains:
            params["pretrain"] = self.pretrain_cfg.model_dump(mode="json")
        store = self.store

        def start(name: str) -> str:
            return store.start_pretrain(self.protocol, self.run.spec.version, name, key,
                                        task=task.name, backbone=self.backbone.name,
                                        dataset=dataset.name, params=params)

        cache = ctx.cache_dir / "pretrain" / f"{key}.safetensors"
        parent = store.find(self.protocol, key)
        if not task.pretrains:
            if parent is None:
                run_id = start(f"{task.name} (no pretraining)")
                store.finish(run_id)
                return None, key, run_id
            return None, key, parent
        if cache.exists() and not ctx.force:
            weights = load_weights(cache)
            if parent is None:
                run_id = start(f"pretrain {task.name}")
                store.mark_reused(run_id, cache)
                store.finish(run_id)
            else:
                run_id = parent
            ctx.outcomes.append(Outcome(f"pretrain {task.name} on {dataset.name}", "reused",
                                        str(cache), task.name, "pretrain"))
            ctx.echo(f"Reusing pretrained {task.name} encoder from {cache}")
            return weights, key, run_id
        checkpoint = cache.with_name(f"{key}.ckpt.safetensors")
        resume = self._resume_state(checkpoint)
        run_id = start(f"pretrain {task.name}")
        label = f"pretrain {task.name}" + (
            f" on {corpus_label(dataset, ctx.plugins['dataset'])}"
            if dataset is not ctx.plugins.get("dataset") else "")
        try:
            if resume is not None:
                store.mark_resumed(run_id, resume["epoch"])
                for epoch, logs in enumerate(resume["history"]):
                    store.log_epoch(run_id, logs, epoch)
                ctx.echo(f"Resuming {label} from its epoch-{resume['epoch']} checkpoint")
                # checkpoints from before device_type was stored: a CUDA generator's state
                # is 16 bytes, a CPU one's 5056
                written_on = resume.get("device_type") or (
                    "cuda" if resume["generator"].numel() == 16 else "cpu")
                if written_on != ctx.device.type:
                    ctx.echo(f"[yellow]The checkpoint was written on {written_on}, this run is on "
                             f"{ctx.device.type}[/yellow]: weights, optimizer and epoch carry "
                             "over; the random batch stream restarts (results will differ from "
                             "an uninterrupted run).")

            def on_checkpoint(state: dict[str, Any]) -> None:
                save_checkpoint(state, checkpoint)
                _test_delay()

            result = pretrain(
                task, self.backbone, data.unlabeled, data.info, self.pretrain_cfg, ctx.device,
                self.protocol_cfg.pretrain_seed,
                on_epoch=lambda logs, epoch: store.log_epoch(run_id, logs, epoch),
                progress=ctx.progress, resume=resume, on_checkpoint=on_checkpoint,
            )
            save_weights(result.weights, cache, {"pretrain_key": key, "task": task.name})
            checkpoint.unlink(missing_ok=True)
            store.log_pretrained(run_id, cache, result.seconds)
        except BaseException as exc:
            store.fail(run_id, exc)
            raise
        store.finish(run_id)
        detail = f"{result.seconds:.0f}s" + (f", resumed at epoch {resume['epoch']}" if resume else "")
        ctx.outcomes.append(Outcome(label, "ran", detail, task.name, "pretrain"))
        return result.weights, key, run_id

    def _resume_state(self, checkpoint: Path) -> dict[str, Any] | None:
        """The last epoch checkpoint of an interrupted pretraining, unless --force."""
        if not checkpoint.exists():
            return None
        if self.ctx.force:
            checkpoint.unlink()
            return None
        try:
            return load_checkpoint(checkpoint)
        except BenchError as exc:
            self.ctx.echo(f"[yellow]Ignoring a damaged checkpoint[/yellow]: {exc}")
            checkpoint.unlink(missing_ok=True)
            return None

    # ------------------------------------------------------------------ fine-tuning
    def finetune_one(
        self, task: ProxyTask, dataset: Dataset, data: DataSplits, weights: Any,
        pretrain_key: str, parent_id: str, fraction: float, seed: int,
        pretrain_dataset: str | None = None,
    ) -> ResultRecord | None:
        ctx = self.ctx
        info = data.info
        metric = info.main_metric if self.protocol_cfg.metric == "auto" else self.protocol_cfg.metric
        indices = label_subset(len(data.train), fraction / 100, seed, data.train_groups)
        ids = [data.train_ids[i] if data.train_ids else str(i) for i in indices]
        what = f"{task.name} {fraction:g}% seed {seed}"
        key = key_of({
            "protocol": [self.run.spec.name, self.run.spec.version,
                         semantic(self.protocol_cfg)],
            "pretrain_key": pretrain_key,
            "task": task.name,
            "dataset": [dataset.name, semantic(dataset.config), data.split_hash],
            "backbone": [self.backbone.name, semantic(self.backbone.config)],
            "finetune": semantic(self.finetune_cfg),
            "versions": self.versions(task, dataset),
            "fraction": fraction, "seed": seed, "subset": ids_hash(ids),
        })
        if pretrain_dataset and pretrain_dataset != dataset.name:
            what = f"{task.name} (pretrained on {pretrain_dataset}) {fraction:g}% seed {seed}"
        store = self.store
        if not ctx.force and store.find(self.protocol, key) is not None:
            ctx.outcomes.append(Outcome(what, "reused", task=task.name))
            return None
        if store.running_elsewhere(self.protocol, key):
            ctx.outcomes.append(Outcome(what, "skipped", "running in another live process",
                                        task.name))
            return None
        protocol = ctx.registry.get("protocol", self.protocol)
        label = task.name  # the 0.1 rule: name the corpus when the row does not tell it
        if pretrain_dataset and (pretrain_dataset != dataset.name
                                 or protocol.uses_pretrain_dataset):
            label = f"{task.name} (pretrained on {pretrain_dataset})"
        identity = ResultIdentity(
            protocol=self.protocol, spec_version=self.run.spec.version,
            dataset=dataset.name, task=task.name, backbone=self.backbone.name,
            pretrain_dataset=pretrain_dataset, dataset_ref=dataset_ref(dataset, data),
            fraction=fraction, seed=seed, n_labeled=len(indices), subset_hash=ids_hash(ids),
            subset_ids=ids, split_hash=data.split_hash, metric=metric, run_key=key,
            pretrain_key=pretrain_key, setup=self.setup_hash(dataset, data),
            task_setup=self.task_setup_hash(task), baseline=task.baseline,
            higher_is_better=metric not in data.info.lower_is_better, label=label,
            figures=list(protocol.figures), target=getattr(self.protocol_cfg, "target", None),
            configs=self.run.as_dict() | {"task": task.config.model_dump(mode="json")},
            versions=self.versions(task, dataset) | store.versions, git_sha=store.git_sha,
            device=str(ctx.device),
        )
        params = {"fraction": fraction, "seed": seed, "n_labeled": len(indices),
                  "finetune": self.finetune_cfg.model_dump(mode="json"),
                  "protocol": self.protocol_cfg.model_dump(mode="json")}
        run_id = store.start_finetune(identity, what, params, parent_id)
        t0 = time.perf_counter()

        epoch_seconds: list[float] = []

        def on_epoch(logs: dict[str, float], epoch: int) -> None:
            # wall time per epoch feeds the convergence protocol's time-to-target
            epoch_seconds.append(time.perf_counter() - t0)
            store.log_epoch(run_id, {**logs, "elapsed_seconds": epoch_seconds[-1]}, epoch)
            _test_delay()

        try:
            result = finetune(
                self.backbone, info, subset(data.train, indices), data.val, data.test,
                weights, self.finetune_cfg, ctx.device, seed,
                on_epoch=on_epoch, progress=ctx.progress, label=what, select_metric=metric,
            )
            value = result.test_metrics.get(metric, math.nan)
            record = ResultRecord(
                **identity.model_dump(), value=value, test_metrics=result.test_metrics,
                val_history=result.val_history, best_epoch=result.best_epoch,
                epoch_seconds=list(epoch_seconds), seconds=result.seconds,
            )
            store.finish_finetune(run_id, record, self.run.as_dict())
        except Exception as exc:
            store.fail(run_id, exc)
            detail = str(exc) if isinstance(exc, BenchError) else traceback.format_exc(limit=3)
            ctx.outcomes.append(Outcome(what, "failed", detail, task.name))
            ctx.echo(f"[red]FAILED[/red] {what}: {exc}")
            return None
        except BaseException as exc:
            store.fail(run_id, exc)
            raise
        ctx.outcomes.append(Outcome(what, "ran", f"{metric}={value:.4f}", task.name))
        ctx.echo(f"{what}: test {metric} = {value:.4f} ({result.seconds:.0f}s)")
        return record


class SweepConfig(PluginConfig):
    """Settings every built-in protocol shares: label fractions x seeds, metric, scratch."""

    fractions: list[float] = Field(
        default=[5, 10, 25, 50, 100], min_length=1, json_schema_extra=NEUTRAL,
        description="Percent of the labeled training split to fine-tune on (Taleb et al.).")
    seeds: list[int] = Field(default=[0, 1, 2], min_length=1, json_schema_extra=NEUTRAL,
                             description="Fine-tuning seeds (label subset and initialisation).")
    pretrain_seed: int = Field(default=0, description="Seed of the single pretraining.")
    metric: str = Field(default="auto", description="Metric to rank by; auto = the dataset's "
                        "main metric (mean Dice for segmentation, AUC for classification).")
    include_scratch: bool = Field(default=True, json_schema_extra=NEUTRAL,
                                  description="Run the scratch baseline too.")

    @field_validator("fractions")
    @classmethod
    def _fractions_in_range(cls, values: list[float]) -> list[float]:
        for v in values:
            if not 0 < v <= 100:
                raise ValueError(f"fraction {v} must be a percentage in (0, 100]")
        return sorted(set(values))


def corpus_label(source: Dataset, target: Dataset) -> str:
    """How results name the pretraining corpus: its plugin name, or when A and B are the same
    plugin configured differently, the name with the settings that differ (``phantom3d(seed=5)``)."""
    if source.name != target.name:
        return source.name
    a, b = source.config.model_dump(mode="json"), target.config.model_dump(mode="json")
    diff = [f"{k}={a[k]}" for k in sorted(a) if a[k] != b.get(k)]
    if not diff:
        return source.name
    text = ",".join(diff)
    return f"{source.name}({text if len(text) <= 60 else key_of(a, 8)})"


def load_data(ctx: RunContext, dataset: Dataset, role: str = "") -> DataSplits:
    t0 = time.perf_counter()
    data = dataset.load()

    def size(split: Any) -> str:
        try:
            return str(len(split))
        except BenchError:  # a pretraining-only corpus (LUNA16) has no labeled splits
            return "no"

    ctx.echo(f"Dataset {dataset.name}{role}: {size(data.unlabeled)} unlabeled, {size(data.train)} "
             f"train, {size(data.val)} val, {size(data.test)} test "
             f"({time.perf_counter() - t0:.1f}s)")
    if not role.endswith("(pretraining)"):
        if (data.info.extra or {}).get("pretraining_only"):
            raise BenchError(f"Dataset {dataset.name!r} is a pretraining corpus without labels: "
                             f"use it as --pretrain-dataset {dataset.name} with --protocol "
                             "transfer and fine-tune on a labeled --dataset.")
        # Fail before pretraining (possibly hours) rather than in every fine-tune after it.
        for name in ("train", "val", "test"):
            if len(getattr(data, name)) == 0:
                raise BenchError(f"Dataset {dataset.name!r} has an empty {name} split; it needs "
                                 "at least one labeled case there (check its split settings).")
    return data


def preflight(ctx: RunContext, jobs: list[tuple[ProxyTask, Dataset, DataSplits, str]],
              data: DataSplits) -> None:
    """Check every task against its corpus (and the backbone against both datasets) before
    anything trains: build its heads and one proxy batch from a blank image. A setting that
    cannot work ends the run here with one message, not after hours of other work."""
    backbone: Backbone = ctx.plugins["backbone"]
    check_input_size(backbone, tuple(data.info.image_size))
    for task, src, src_data, _ in jobs:
        if not task.pretrains:
            continue
        info = src_data.info
        try:
            task.check_input(tuple(info.image_size), info.channels)
            check_input_size(backbone, tuple(info.image_size))
            encoder = backbone.build_encoder(info.channels)
            task.build_heads(backbone, encoder)
            blank = torch.zeros((1, info.channels, *info.image_size))
            blank, _ = pad_to_multiple(blank, backbone.size_multiple())
            task.make_batch(blank, torch.Generator().manual_seed(0))
        except BenchError:
            raise
        except Exception as exc:
            raise ConfigError(
                f"Task {task.name!r} cannot run on {src.name!r} images of size "
                f"{tuple(info.image_size)} with backbone {backbone.name!r} as configured "
                f"({type(exc).__name__}: {exc}). Change the task's or backbone's settings "
                f"(`bench schema task {task.name}`) or the image size."
            ) from None


def run_sweep(
    ctx: RunContext,
    config: SweepConfig,
    dataset: Dataset,
    data: DataSplits,
    sources: list[tuple[Dataset, DataSplits, str]],
) -> list[ResultRecord]:
    """Every task pretrains once per source corpus, then fine-tunes on ``dataset`` over
    fractions x seeds; scratch runs once. A failed pretraining skips that task's fine-tunes
    only. ``sources`` are (dataset, its data, the label results record as pretrain_dataset)."""
    sweep = Sweep(ctx)
    if config.metric != "auto" and config.metric not in data.info.metrics:
        raise BenchError(f"protocol.metric {config.metric!r} is not reported by dataset "
                         f"{dataset.name!r}; choose one of {', '.join(data.info.metrics)}.")
    tasks: list[ProxyTask] = list(ctx.plugins.get("tasks") or [ctx.plugins["task"]])
    pretraining = [t for t in tasks if t.pretrains]
    with_scratch = config.include_scratch or len(pretraining) < len(tasks)
    jobs: list[tuple[ProxyTask, Dataset, DataSplits, str]] = [
        (task, *source) for task in pretraining for source in sources]
    if with_scratch:
        jobs.append((ctx.registry.get("task", "scratch")(), dataset, data, dataset.name))
    preflight(ctx, jobs, data)
    records: list[ResultRecord] = []
    for task, src, src_data, src_label in jobs:
        try:
            weights, key, parent = sweep.pretrained(task, src, src_data)
        except Exception as exc:  # one task's failure must not end the sweep
            detail = str(exc) if isinstance(exc, BenchError) else traceback.format_exc(limit=3)
            ctx.outcomes.append(Outcome(f"pretrain {task.name} on {src_label}", "failed", detail,
                                        task.name, "pretrain"))
            ctx.echo(f"[red]FAILED[/red] pretraining {task.name} on {src_label}: {exc}")
            continue
        for seed in config.seeds:
            for fraction in config.fractions:
                record = sweep.finetune_one(task, dataset, data, weights, key, parent, fraction,
                                            seed, src_label if task.pretrains else None)
                if record is not None:
                    records.append(record)
    return records


class DataEfficiency(Protocol):
    """Pretrain on the unlabeled pool, fine-tune on nested label fractions beside scratch."""

    name = "data-efficiency"
    uses_pretrain_dataset = False

    class Config(SweepConfig):
        pass

    def run(self, ctx: RunContext) -> list[ResultRecord]:
        dataset: Dataset = ctx.plugins["dataset"]
        data = load_data(ctx, dataset)
        return run_sweep(ctx, self.config, dataset, data, [(dataset, data, dataset.name)])


class Transfer(Protocol):
    """Pretrain on corpus A, fine-tune on dataset B; beside pretraining on B and scratch."""

    name = "transfer"
    uses_pretrain_dataset = True

    class Config(SweepConfig):
        include_same_dataset: bool = Field(
            default=True, json_schema_extra=NEUTRAL,
            description="Also pretrain on the target dataset's own unlabeled pool "
            "(the data-efficiency set-up), so the table shows A -> B next to B -> B.")

    def run(self, ctx: RunContext) -> list[ResultRecord]:
        dataset: Dataset = ctx.plugins["dataset"]
        source: Dataset = ctx.plugins["pretrain_dataset"]  # resolve_run made sure of it
        data = load_data(ctx, dataset, " (fine-tuning)")
        source_data = load_data(ctx, source, " (pretraining)")
        if source_data.info.channels != data.info.channels:
            ctx.echo(f"Channels differ ({source.name}: {source_data.info.channels}, {dataset.name}: "
                     f"{data.info.channels}): the first layer is adapted by "
                     f"{ctx.run.configs['finetune'].channel_adaptation}.")
        sources = [(source, source_data, corpus_label(source, dataset))]
        if self.config.include_same_dataset:
            sources.append((dataset, data, dataset.name))
        return run_sweep(ctx, self.config, dataset, data, sources)


class Convergence(Protocol):
    """Validation metric per epoch, pretrained vs scratch: epochs and time to reach a share
    of scratch's final score (Taleb et al. Fig. 5)."""

    name = "convergence"
    uses_pretrain_dataset = False
    figures = (FIGURE_CONVERGENCE,)

    class Config(SweepConfig):
        fractions: list[float] = Field(default=[100], min_length=1, description="Label fractions "
                                       "(percent); convergence is usually read at 100 %.")
        target: float = Field(default=0.95, gt=0, le=1.5, json_schema_extra=NEUTRAL,
                              description="Share of scratch's final "
                              "validation score a run must reach (0.95 = 95 %).")

    def run(self, ctx: RunContext) -> list[ResultRecord]:
        from medssl_bench.analysis import convergence_table

        dataset: Dataset = ctx.plugins["dataset"]
        data = load_data(ctx, dataset)
        records = run_sweep(ctx, self.config, dataset, data, [(dataset, data, dataset.name)])
        try:
            rows = convergence_table(ResultStore(ctx.tracker), protocol=self.name,
                                     dataset=dataset.name)
        except Exception as exc:  # a summary must never lose the finished runs
            ctx.echo(f"[yellow]No convergence summary[/yellow]: {exc}")
            return records
        for row in rows:
            ctx.echo(row.describe())
        return records


@hookimpl
def bench_register_protocols(register):
    register(DataEfficiency)
    register(Transfer)
    register(Convergence)
