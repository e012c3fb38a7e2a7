"""Plans: what a protocol asks to be run, as units of work with run keys and dependencies.

A protocol turns its config into a :class:`Plan` (``Protocol.plan(ctx)``); an executor
(:mod:`medssl_bench.executor`) runs it. A unit holds names, numbers and keys only (no
tensors, no plugin instances), so a plan can be printed (``bench run --dry-run``), compared,
and handed to another process.

Run keys hash everything that determines a result (:mod:`medssl_bench.identity`); they are
computed here, once, and are the same keys 0.1 computed, so stored results stay reusable.

:class:`SweepPlanner` builds the plans of the sweep-shaped protocols (data-efficiency,
transfer, convergence, and third-party ones): every task pretrains once per corpus, then
fine-tunes over label fractions x seeds beside the baseline task. Fine-tunes are ordered seed
by seed and fraction by fraction with the baseline first in each group, so a sweep cut short
still holds comparable results (the baseline beside each task at the same label subset).
Frozen-encoder protocols (linear-probe, knn) plan :class:`ProbeUnit`s in place of the
fine-tunes (``sweep(..., probe=Probe(...))``): the same label subsets, order and baseline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator

from medssl_bench.config import NEUTRAL, PluginConfig
from medssl_bench.engine import label_subset
from medssl_bench.errors import BenchError
from medssl_bench.identity import ids_hash, key_of, semantic
from medssl_bench.imports import ImportedWeights
from medssl_bench.probe import PROBE_KNN
from medssl_bench.store import entry_label

if TYPE_CHECKING:
    from medssl_bench.context import RunContext
    from medssl_bench.interfaces import Dataset, DataSplits, ProxyTask

#: The field 0.1 hashed into the key of a run without pretraining; kept so keys stay valid.
_NO_PRETRAINING_FIELD = "scratch"


@dataclass(frozen=True, kw_only=True)
class Unit:
    """One unit of work: its run key, what it is called, what it needs first."""

    key: str
    task: str
    what: str
    depends_on: tuple[str, ...] = ()

    @property
    def stage(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class PretrainUnit(Unit):
    """Pretrain ``task`` on the unlabeled pool of the run's ``corpus`` dataset (the role
    ``dataset`` or ``pretrain_dataset``); for a task that does not pretrain (the baseline),
    only the parent run its fine-tunes hang under."""

    corpus: str = "dataset"
    corpus_label: str = ""
    pretrains: bool = True
    run_name: str = ""
    #: Imported weights (``--init weights:NAME``): the unit loads them from the weights
    #: store instead of pretraining.
    weights: str = ""

    @property
    def stage(self) -> str:
        return "pretrain"


@dataclass(frozen=True, kw_only=True)
class FinetuneUnit(Unit):
    """Fine-tune from the weights of the pretraining ``depends_on[0]`` on a label subset,
    validate, test, and record the result."""

    fraction: float
    seed: int
    indices: tuple[int, ...]
    subset_ids: tuple[str, ...]
    pretrain_dataset: str | None
    metric: str
    setup: str
    task_setup: str
    dataset_ref: str
    label: str
    baseline: bool = False
    target: float | None = None

    @property
    def stage(self) -> str:
        return "finetune"

    @property
    def pretraining(self) -> str:
        return self.depends_on[0]


@dataclass(frozen=True)
class Probe:
    """How a frozen encoder is evaluated: which probe and the settings it needs.

    ``logistic``: a logistic regression on standardised features, its inverse regularisation
    ``C`` chosen on the validation split from ``c_grid``; ``knn``: cosine k-NN with ``k``
    neighbours voting ``exp(similarity / temperature)`` (solo-learn). ``pooling``:
    ``deepest`` (global average of the deepest level) or ``all`` (every level's, concatenated).
    """

    kind: str
    pooling: str = "deepest"
    k: int = 20
    temperature: float = 0.07
    c_grid: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)

    def settings(self) -> dict[str, Any]:
        """What determines the probe's result (its run key and setup hash hold these)."""
        if self.kind == PROBE_KNN:
            return {"kind": self.kind, "pooling": self.pooling, "k": self.k,
                    "temperature": self.temperature}
        return {"kind": self.kind, "pooling": self.pooling, "c_grid": list(self.c_grid)}


@dataclass(frozen=True, kw_only=True)
class ProbeUnit(FinetuneUnit):
    """Probe the frozen encoder of the pretraining ``depends_on[0]`` on a label subset: its
    features of the labelled splits (extracted once, cached), a logistic regression or a
    k-NN on the subset's features, tested on the test split; the same identity fields as a
    fine-tune, so probes rank beside their baseline like fine-tunes do."""

    probe: str
    pooling: str = "deepest"
    k: int = 20
    temperature: float = 0.07
    c_grid: tuple[float, ...] = ()

    @property
    def stage(self) -> str:
        return "probe"


@dataclass
class Plan:
    """The units of one ``bench run``, in the order an in-process executor runs them (every
    unit after the units it depends on)."""

    protocol: str
    units: list[Unit] = field(default_factory=list)

    def __iter__(self) -> Iterator[Unit]:
        return iter(self.units)

    def __len__(self) -> int:
        return len(self.units)

    def add(self, unit: Unit) -> Unit:
        known = {u.key for u in self.units}
        missing = [k for k in unit.depends_on if k not in known]
        if missing:
            raise ValueError(f"unit {unit.what!r} depends on units not in the plan: {missing}")
        if unit.key not in known:  # the same pretraining needed twice is planned once
            self.units.append(unit)
        return unit

    def get(self, key: str) -> Unit:
        return next(u for u in self.units if u.key == key)

    def of_stage(self, stage: str) -> list[Unit]:
        return [u for u in self.units if u.stage == stage]


# --------------------------------------------------------------------------- sweeps


class SweepConfig(PluginConfig):
    """Settings every sweep-shaped protocol shares: label fractions x seeds, metric, baseline."""

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


def dataset_ref(dataset: Dataset, data: DataSplits) -> str:
    """What published rows match against: ``name:file-stem`` for file-backed datasets
    (``medmnist3d:adrenalmnist3d``), or a plugin-given ``extra["reference"]``."""
    extra = data.info.extra or {}
    if extra.get("reference"):
        return str(extra["reference"])
    if extra.get("file"):
        return f"{dataset.name}:{Path(str(extra['file'])).name.split('.')[0]}"
    return dataset.name


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


class SweepPlanner:
    """Builds a sweep's units and their keys for one run context (see the module docstring).

    ``config`` is the protocol's: a :class:`SweepConfig`, or any config with its
    ``seeds``, ``pretrain_seed``, ``metric`` and ``include_scratch`` (pass ``fractions`` to
    :meth:`sweep` then)."""

    def __init__(self, ctx: RunContext, config: Any) -> None:
        self.ctx = ctx
        self.config = config
        self.backbone = ctx.plugins["backbone"]
        self.pretrain_cfg = ctx.run.configs["pretrain"]
        self.finetune_cfg = ctx.run.configs["finetune"]
        self.spec = ctx.run.spec

    # ------------------------------------------------------------------ identity
    def versions(self, task: ProxyTask, dataset: Dataset) -> dict[str, str]:
        reg = self.ctx.registry
        return {"task": task_version(reg, task),
                "backbone": reg.distribution_version("backbone", self.backbone.name),
                "dataset": reg.distribution_version("dataset", dataset.name)}

    def _backbone(self) -> list[Any]:
        return [self.backbone.name, semantic(self.backbone.config)]

    @staticmethod
    def _dataset(dataset: Dataset, data: DataSplits) -> list[Any]:
        return [dataset.name, semantic(dataset.config), data.split_hash]

    def pretrain_key(self, task: ProxyTask, dataset: Dataset, data: DataSplits) -> str:
        if isinstance(task, ImportedWeights):  # the same file gives the same key, any dataset
            return key_of({"imported_weights": [task.config.weights, task.config.sha256],
                           "backbone": self._backbone(),
                           "versions": {"backbone": self.versions(task, dataset)["backbone"]}})
        if not task.pretrains:
            return key_of({_NO_PRETRAINING_FIELD: True, "backbone": self._backbone(),
                           "dataset": self._dataset(dataset, data),
                           "versions": self.versions(task, dataset)})
        return key_of({
            "task": [task.name, semantic(task.config)],
            "backbone": self._backbone(),
            "dataset": self._dataset(dataset, data),
            "pretrain": semantic(self.pretrain_cfg),
            "seed": self.config.pretrain_seed,
            "versions": self.versions(task, dataset),
        })

    def setup_hash(self, dataset: Dataset, data: DataSplits) -> str:
        """What a task and its baseline share: the leaderboard only pools and ranks results
        with the same setup (a quick and a paper run never share a row)."""
        return key_of({
            "protocol": semantic(self.config, frozenset({"pretrain_seed"})),
            "dataset": self._dataset(dataset, data),
            "backbone": self._backbone(),
            "finetune": semantic(self.finetune_cfg),
        }, 10)

    def probe_setup_hash(self, dataset: Dataset, data: DataSplits, probe: Probe) -> str:
        """:meth:`setup_hash` of a probe: the probe's settings in place of the fine-tuning."""
        return key_of({
            "protocol": semantic(self.config, frozenset({"pretrain_seed"})),
            "dataset": self._dataset(dataset, data),
            "backbone": self._backbone(),
            "probe": self.probe_settings(probe),
        }, 10)

    def probe_settings(self, probe: Probe) -> dict[str, Any]:
        """The probe's settings plus what of the fine-tuning config changes its features."""
        cfg = self.finetune_cfg
        return {**probe.settings(), "channel_adaptation": cfg.channel_adaptation,
                "amp": cfg.amp}

    def task_setup_hash(self, task: ProxyTask) -> str:
        """What differs between two runs of one task that share a setup."""
        if not task.pretrains:
            return "-"
        if isinstance(task, ImportedWeights):
            return key_of({"imported_weights": task.config.sha256}, 10)
        return key_of({"task": semantic(task.config), "pretrain": semantic(self.pretrain_cfg),
                       "seed": self.config.pretrain_seed}, 10)

    def finetune_key(self, task: ProxyTask, dataset: Dataset, data: DataSplits,
                     pretrain_key: str, fraction: float, seed: int, ids: Sequence[str]) -> str:
        return key_of({
            "protocol": [self.spec.name, self.spec.version, semantic(self.config)],
            "pretrain_key": pretrain_key,
            "task": task.name,
            "dataset": self._dataset(dataset, data),
            "backbone": self._backbone(),
            "finetune": semantic(self.finetune_cfg),
            "versions": self.versions(task, dataset),
            "fraction": fraction, "seed": seed, "subset": ids_hash(list(ids)),
        })

    def probe_key(self, task: ProxyTask, dataset: Dataset, data: DataSplits,
                  pretrain_key: str, fraction: float, seed: int, ids: Sequence[str],
                  probe: Probe) -> str:
        """Like :meth:`finetune_key`, with the probe's settings in place of the fine-tuning
        config (a ``probe`` entry: never equal to a fine-tune's key)."""
        return key_of({
            "protocol": [self.spec.name, self.spec.version, semantic(self.config)],
            "pretrain_key": pretrain_key,
            "task": task.name,
            "dataset": self._dataset(dataset, data),
            "backbone": self._backbone(),
            "probe": self.probe_settings(probe),
            "versions": self.versions(task, dataset),
            "fraction": fraction, "seed": seed, "subset": ids_hash(list(ids)),
        })

    # ------------------------------------------------------------------ units
    def metric(self, dataset: Dataset, data: DataSplits) -> str:
        if self.config.metric == "auto":
            return data.info.main_metric
        if self.config.metric not in data.info.metrics:
            raise BenchError(f"protocol.metric {self.config.metric!r} is not reported by dataset "
                             f"{dataset.name!r}; choose one of {', '.join(data.info.metrics)}.")
        return self.config.metric

    def pretraining(self, task: ProxyTask, corpus: str) -> PretrainUnit:
        """The unit that pretrains ``task`` on the run's ``corpus`` role (or, for a task that
        does not pretrain, the parent run of its fine-tunes)."""
        ctx = self.ctx
        dataset, data = ctx.plugins[corpus], ctx.data(corpus)
        if isinstance(task, ImportedWeights):
            return PretrainUnit(key=self.pretrain_key(task, dataset, data), task=task.name,
                                what=f"load {task.name}", corpus=corpus, corpus_label="",
                                run_name=f"{task.name} (imported)", weights=task.config.weights)
        label = corpus_label(dataset, ctx.plugins["dataset"])
        what = f"pretrain {task.name}" + (f" on {label}" if corpus != "dataset" else "")
        return PretrainUnit(key=self.pretrain_key(task, dataset, data), task=task.name,
                            what=what if task.pretrains else f"{task.name} (no pretraining)",
                            corpus=corpus, corpus_label=label, pretrains=task.pretrains,
                            run_name=f"pretrain {task.name}" if task.pretrains
                            else f"{task.name} (no pretraining)")

    def finetune(self, task: ProxyTask, pretraining: PretrainUnit, fraction: float, seed: int,
                 always_name_corpus: bool = False,
                 indices: Sequence[int] | None = None) -> FinetuneUnit:
        """Fine-tune ``task`` from ``pretraining`` on ``fraction`` percent of the labeled
        training split chosen by ``seed`` (nested subsets, identical for every task), or on
        the training cases ``indices`` when given (``fraction`` then says what share they are)."""
        ctx = self.ctx
        dataset, data = ctx.plugins["dataset"], ctx.data("dataset")
        if indices is None:
            indices = label_subset(len(data.train), fraction / 100, seed, data.train_groups)
        indices = sorted(indices)
        ids = [data.train_ids[i] if data.train_ids else str(i) for i in indices]
        pre = (pretraining.corpus_label or None) if task.pretrains else None
        what = f"{task.name} {fraction:g}% seed {seed}"
        if pre and pre != dataset.name:
            what = f"{task.name} (pretrained on {pre}) {fraction:g}% seed {seed}"
        return FinetuneUnit(
            key=self.finetune_key(task, dataset, data, pretraining.key, fraction, seed, ids),
            task=task.name, what=what, depends_on=(pretraining.key,),
            fraction=fraction, seed=seed, indices=tuple(indices), subset_ids=tuple(ids),
            pretrain_dataset=pre, metric=self.metric(dataset, data),
            setup=self.setup_hash(dataset, data), task_setup=self.task_setup_hash(task),
            dataset_ref=dataset_ref(dataset, data),
            label=entry_label(task.name, pre, dataset.name, always_name_corpus),
            baseline=task.baseline, target=getattr(self.config, "target", None),
        )

    def probe(self, task: ProxyTask, pretraining: PretrainUnit, fraction: float, seed: int,
              probe: Probe, always_name_corpus: bool = False,
              indices: Sequence[int] | None = None) -> ProbeUnit:
        """Probe the frozen encoder of ``pretraining`` on the label subset :meth:`finetune`
        would fine-tune on (same fraction, seed and cases)."""
        unit = self.finetune(task, pretraining, fraction, seed, always_name_corpus, indices)
        dataset, data = self.ctx.plugins["dataset"], self.ctx.data("dataset")
        values = {f.name: getattr(unit, f.name) for f in fields(unit)}
        values.update(
            key=self.probe_key(task, dataset, data, pretraining.key, fraction, seed,
                               unit.subset_ids, probe),
            what=f"{unit.what} ({probe.kind} probe)",
            setup=self.probe_setup_hash(dataset, data, probe),
            probe=probe.kind, pooling=probe.pooling, k=probe.k,
            temperature=probe.temperature, c_grid=tuple(probe.c_grid),
        )
        return ProbeUnit(**values)

    def sweep(self, corpora: Sequence[str], always_name_corpus: bool = False,
              fractions: Sequence[float] | None = None, probe: Probe | None = None,
              subset: Callable[[float, int], Sequence[int]] | None = None) -> Plan:
        """Every task pretrains once per corpus role in ``corpora``, then fine-tunes on the
        run's dataset over fractions (default ``config.fractions``) x seeds; the baseline runs
        once beside them. With ``probe``, each fine-tune is a :class:`ProbeUnit` of the
        frozen encoder instead (same label subsets, same order). ``subset(fraction, seed)``,
        when given, chooses the training cases of each label subset (few-shot: N per class)
        in place of :func:`medssl_bench.engine.label_subset`."""
        ctx = self.ctx
        plan = Plan(self.spec.name)
        methods = [t for t in ctx.tasks() if not t.baseline]
        entries: list[tuple[ProxyTask, PretrainUnit]] = []
        if self.config.include_scratch or len(methods) < len(ctx.tasks()):
            baseline = ctx.baseline_task()
            entries.append((baseline, self.pretraining(baseline, "dataset")))
        entries += [(task, self.pretraining(task, corpus)) for task in methods for corpus in corpora]
        entries += [(init, self.pretraining(init, "dataset")) for init in ctx.inits]
        for _, unit in entries:
            plan.add(unit)
        for seed in self.config.seeds:
            for fraction in self.config.fractions if fractions is None else fractions:
                indices = None if subset is None else subset(fraction, seed)
                for task, unit in entries:
                    plan.add(self.finetune(task, unit, fraction, seed, always_name_corpus,
                                           indices) if probe is None else
                             self.probe(task, unit, fraction, seed, probe, always_name_corpus,
                                        indices))
        return plan


def task_version(registry: Any, task: ProxyTask) -> str:
    """What versions a task's results: its distribution, or imported weights' sha256."""
    if isinstance(task, ImportedWeights):
        return f"imported:{task.config.sha256}"
    return registry.distribution_version("task", task.name)
