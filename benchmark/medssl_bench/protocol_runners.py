"""Built-in protocol runners. ``data-efficiency``: pretrain once on the dataset's unlabeled
pool, fine-tune on nested label fractions over seeds beside the scratch baseline, test on
the held-out split."""

from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator

from medssl_bench.config import PluginConfig
from medssl_bench.engine import (
    FinetuneConfig,
    PretrainConfig,
    Progress,
    finetune,
    label_subset,
    pretrain,
    subset,
)
from medssl_bench.errors import BenchError, TrainingError
from medssl_bench.hookspecs import hookimpl
from medssl_bench.identity import ids_hash, key_of
from medssl_bench.interfaces import Backbone, Dataset, DataSplits, Protocol, ProxyTask
from medssl_bench.plugins import Registry
from medssl_bench.results import ResultRecord
from medssl_bench.spec import ResolvedRun
from medssl_bench.tracking import Tracker, environment_tags
from medssl_bench.weights import load_weights, save_weights


@dataclass
class Outcome:
    """What happened to one unit of work in a sweep."""

    what: str
    status: str  # "ran", "reused", "failed"
    detail: str = ""


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
        self.experiment = ctx.tracker.experiment_id(ctx.run.spec.name)
        self.env_tags = environment_tags(str(ctx.device))

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
            "task": [task.name, task.config.model_dump(mode="json")],
            "backbone": [self.backbone.name, self.backbone.config.model_dump(mode="json")],
            "dataset": [dataset.name, dataset.config.model_dump(mode="json"), data.split_hash],
            "pretrain": self.pretrain_cfg.model_dump(mode="json"),
            "seed": self.protocol_cfg.pretrain_seed,
            "versions": self.versions(task, dataset),
        })

    # ------------------------------------------------------------------ pretraining
    def pretrained(self, task: ProxyTask, dataset: Dataset, data: DataSplits) -> tuple[Any, str, str]:
        """(weights or None, pretrain key, parent run id): train once, then reuse."""
        ctx = self.ctx
        key = self.pretrain_key(task, dataset, data) if task.pretrains else key_of(
            {"scratch": True, "backbone": self.backbone.name, "dataset": dataset.name,
             "split": data.split_hash})
        params = {"task": task.config.model_dump(mode="json"),
                  "backbone": self.backbone.config.model_dump(mode="json"),
                  "dataset": dataset.config.model_dump(mode="json")}
        if task.pretrains:
            params["pretrain"] = self.pretrain_cfg.model_dump(mode="json")
        tags = {**self.env_tags, "task": task.name, "backbone": self.backbone.name,
                "dataset": dataset.name, "protocol": self.run.spec.name,
                "spec_version": self.run.spec.version}
        cache = ctx.cache_dir / "pretrain" / f"{key}.safetensors"
        parent = ctx.tracker.find(self.experiment, key)
        if not task.pretrains:
            if parent is None:
                run_id = ctx.tracker.start(self.experiment, f"{task.name} (no pretraining)", key,
                                           "pretrain", tags, params)
                ctx.tracker.finish(run_id)
                return None, key, run_id
            return None, key, parent.info.run_id
        if cache.exists() and not ctx.force:
            weights = load_weights(cache)
            if parent is None:
                run_id = ctx.tracker.start(self.experiment, f"pretrain {task.name}", key,
                                           "pretrain", tags, params)
                ctx.tracker.set_tags(run_id, {"reused_cache": str(cache)})
                ctx.tracker.finish(run_id)
            else:
                run_id = parent.info.run_id
            ctx.outcomes.append(Outcome(f"pretrain {task.name}", "reused", str(cache)))
            ctx.echo(f"Reusing pretrained {task.name} encoder from {cache}")
            return weights, key, run_id
        run_id = ctx.tracker.start(self.experiment, f"pretrain {task.name}", key, "pretrain",
                                   tags, params)
        try:
            result = pretrain(
                task, self.backbone, data.unlabeled, data.info, self.pretrain_cfg, ctx.device,
                self.protocol_cfg.pretrain_seed,
                on_epoch=lambda logs, epoch: ctx.tracker.log_metrics(run_id, logs, epoch),
                progress=ctx.progress,
            )
            save_weights(result.weights, cache, {"pretrain_key": key, "task": task.name})
            ctx.tracker.log_file(run_id, cache, "weights")
            ctx.tracker.log_metrics(run_id, {"pretrain_seconds": result.seconds})
        except BaseException as exc:
            ctx.tracker.set_tags(run_id, {"error": f"{type(exc).__name__}: {exc}"})
            ctx.tracker.finish(run_id, "FAILED" if isinstance(exc, Exception) else "KILLED")
            raise
        ctx.tracker.finish(run_id)
        ctx.outcomes.append(Outcome(f"pretrain {task.name}", "ran", f"{result.seconds:.0f}s"))
        return result.weights, key, run_id

    # ------------------------------------------------------------------ fine-tuning
    def finetune_one(
        self, task: ProxyTask, dataset: Dataset, data: DataSplits, weights: Any,
        pretrain_key: str, parent_id: str, fraction: float, seed: int,
        pretrain_dataset: str | None = None,
    ) -> ResultRecord | None:
        ctx = self.ctx
        info = data.info
        metric = info.main_metric if self.protocol_cfg.metric == "auto" else self.protocol_cfg.metric
        indices = label_subset(len(data.train), fraction / 100, seed)
        ids = [data.train_ids[i] if data.train_ids else str(i) for i in indices]
        what = f"{task.name} {fraction:g}% seed {seed}"
        key = key_of({
            "protocol": [self.run.spec.name, self.run.spec.version,
                         self.protocol_cfg.model_dump(mode="json", exclude={"seeds", "fractions"})],
            "pretrain_key": pretrain_key,
            "task": task.name,
            "dataset": [dataset.name, dataset.config.model_dump(mode="json"), data.split_hash],
            "backbone": [self.backbone.name, self.backbone.config.model_dump(mode="json")],
            "finetune": self.finetune_cfg.model_dump(mode="json"),
            "fraction": fraction, "seed": seed, "subset": ids_hash(ids),
        })
        if not ctx.force and ctx.tracker.find(self.experiment, key) is not None:
            ctx.outcomes.append(Outcome(what, "reused"))
            return None
        tags = {**self.env_tags, "task": task.name, "backbone": self.backbone.name,
                "dataset": dataset.name, "protocol": self.run.spec.name,
                "spec_version": self.run.spec.version, "fraction": fraction, "seed": seed,
                "metric": metric, "pretrain_dataset": pretrain_dataset or dataset.name}
        params = {"fraction": fraction, "seed": seed, "n_labeled": len(indices),
                  "finetune": self.finetune_cfg.model_dump(mode="json"),
                  "protocol": self.protocol_cfg.model_dump(mode="json")}
        run_id = ctx.tracker.start(self.experiment, what, key, "finetune", tags, params, parent_id)
        try:
            result = finetune(
                self.backbone, info, subset(data.train, indices), data.val, data.test,
                weights, self.finetune_cfg, ctx.device, seed,
                on_epoch=lambda logs, epoch: ctx.tracker.log_metrics(run_id, logs, epoch),
                progress=ctx.progress, label=what,
            )
            value = result.test_metrics.get(metric, math.nan)
            record = ResultRecord(
                protocol=self.run.spec.name, spec_version=self.run.spec.version,
                dataset=dataset.name, task=task.name, backbone=self.backbone.name,
                pretrain_dataset=pretrain_dataset, fraction=fraction, seed=seed,
                n_labeled=len(indices), subset_hash=ids_hash(ids), subset_ids=ids,
                split_hash=data.split_hash, metric=metric, value=value,
                test_metrics=result.test_metrics, val_history=result.val_history,
                best_epoch=result.best_epoch, run_key=key, pretrain_key=pretrain_key,
                configs=self.run.as_dict() | {"task": task.config.model_dump(mode="json")},
                versions=self.versions(task, dataset) | {
                    k: v for k, v in self.env_tags.items() if "version" in k or k == "git.sha"},
                device=str(ctx.device), seconds=result.seconds,
            )
            ctx.tracker.log_metrics(run_id, {f"test_{k}": v for k, v in result.test_metrics.items()}
                                    | {"test_main": value, "seconds": result.seconds})
            ctx.tracker.log_json(run_id, record.model_dump(mode="json"), "result.json")
            ctx.tracker.log_json(run_id, self.run.as_dict(), "config.json")
            ctx.tracker.set_tags(run_id, {"value": value})
        except Exception as exc:
            ctx.tracker.set_tags(run_id, {"error": f"{type(exc).__name__}: {exc}"[:4000]})
            ctx.tracker.finish(run_id, "FAILED")
            detail = str(exc) if isinstance(exc, BenchError) else traceback.format_exc(limit=3)
            ctx.outcomes.append(Outcome(what, "failed", detail))
            ctx.echo(f"[red]FAILED[/red] {what}: {exc}")
            return None
        except BaseException:
            ctx.tracker.finish(run_id, "KILLED")
            raise
        ctx.tracker.finish(run_id)
        ctx.outcomes.append(Outcome(what, "ran", f"{metric}={value:.4f}"))
        ctx.echo(f"{what}: test {metric} = {value:.4f} ({result.seconds:.0f}s)")
        return record


class DataEfficiency(Protocol):
    """Pretrain on the unlabeled pool, fine-tune on nested label fractions beside scratch."""

    name = "data-efficiency"

    class Config(PluginConfig):
        fractions: list[float] = Field(
            default=[5, 10, 25, 50, 100], min_length=1,
            description="Percent of the labeled training split to fine-tune on (Taleb et al.).")
        seeds: list[int] = Field(default=[0, 1, 2], min_length=1,
                                 description="Fine-tuning seeds (label subset and initialisation).")
        pretrain_seed: int = Field(default=0, description="Seed of the single pretraining.")
        metric: str = Field(default="auto", description="Metric to rank by; auto = the dataset's "
                            "main metric (mean Dice for segmentation, AUC for classification).")
        include_scratch: bool = Field(default=True, description="Run the scratch baseline too.")

        @field_validator("fractions")
        @classmethod
        def _fractions_in_range(cls, values: list[float]) -> list[float]:
            for v in values:
                if not 0 < v <= 100:
                    raise ValueError(f"fraction {v} must be a percentage in (0, 100]")
            return sorted(set(values))

    def run(self, ctx: RunContext) -> list[ResultRecord]:
        sweep = Sweep(ctx)
        dataset: Dataset = ctx.plugins["dataset"]
        task: ProxyTask = ctx.plugins["task"]
        t0 = time.perf_counter()
        data = dataset.load()
        ctx.echo(f"Dataset {dataset.name}: {len(data.unlabeled)} unlabeled, {len(data.train)} train, "
                 f"{len(data.val)} val, {len(data.test)} test ({time.perf_counter() - t0:.1f}s)")
        tasks = [task]
        if self.config.include_scratch and task.pretrains:
            tasks.append(ctx.registry.get("task", "scratch")())
        if self.config.metric != "auto" and self.config.metric not in data.info.metrics:
            raise BenchError(f"protocol.metric {self.config.metric!r} is not reported by dataset "
                             f"{dataset.name!r}; choose one of {', '.join(data.info.metrics)}.")
        records: list[ResultRecord] = []
        for current in tasks:
            try:
                weights, key, parent = sweep.pretrained(current, dataset, data)
            except TrainingError as exc:
                ctx.outcomes.append(Outcome(f"pretrain {current.name}", "failed", str(exc)))
                ctx.echo(f"[red]FAILED[/red] pretraining {current.name}: {exc}")
                continue
            for seed in self.config.seeds:
                for fraction in self.config.fractions:
                    record = sweep.finetune_one(current, dataset, data, weights, key, parent,
                                                fraction, seed)
                    if record is not None:
                        records.append(record)
        return records


@hookimpl
def bench_register_protocols(register):
    register(DataEfficiency)
