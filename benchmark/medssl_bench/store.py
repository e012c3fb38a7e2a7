"""The result store: the one module that knows how a result is recorded in MLflow.

A fine-tune's result is a :class:`ResultRecord` (versioned: ``schema_version``). The store
maps it to an MLflow run and back:

- **tags** (written when the run starts, so a failed run is still identified; read back by
  one search call, so reading needs no artifacts and no plugin registry): every scalar field
  of :class:`ResultIdentity` under its own name (``task``, ``fraction``, ``seed``,
  ``baseline``, ``label``, ...; ``pretrain_dataset`` is ``-`` for the baseline), ``figures``
  and ``versions`` as JSON, the run key as ``medssl_bench.run_key``, the schema version as
  ``medssl_bench.schema_version``, the git commit as ``git.sha``; when the fine-tune
  finishes, ``value`` (the main test metric) and ``best_epoch``.
- **metrics**: ``test_<name>`` per test metric, ``test_main`` (the value) and ``seconds``
  once finished; per epoch the engine's logs (``val_<metric>``, ``elapsed_seconds``, ...),
  read back as curves by :meth:`ResultStore.history`.
- **artifacts**: ``result.json`` (the whole record, with the fields too bulky for tags:
  :data:`DETAIL_FIELDS`) and ``config.json`` (the resolved run).

Runs written by medssl-bench 0.1 carry no schema version; they are read by the 0.1 rules
(:func:`legacy_fields`): the baseline is the run whose ``pretrain_dataset`` tag is ``-``,
the entry label follows the 0.1 naming, the figures follow the protocol's name and every
metric was higher-is-better.

Nothing else in medssl-bench names a tag: the protocol runner writes through
:class:`ResultStore`, the leaderboard, the report and the analysis read typed records from it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from medssl_bench.errors import TrackingUnavailable
from medssl_bench.interfaces import FIGURE_CONVERGENCE, FIGURE_DATA_EFFICIENCY
from medssl_bench.leases import Holder
from medssl_bench.tracking import (
    TAG_KEY,
    Tracker,
    environment_tags,
)

#: The version of the record schema this medssl-bench writes. 0 is what 0.1 wrote (no
#: version tag, read by :func:`legacy_fields`); 1 added the schema version, baseline,
#: metric direction, entry label, figures and the setup/identity hashes as tags.
SCHEMA_VERSION = 1

TAG_SCHEMA = "medssl_bench.schema_version"
TAG_VALUE = "value"
TAG_BEST_EPOCH = "best_epoch"
TAG_ERROR = "error"
TAG_REUSED = "reused_cache"
TAG_RESUMED = "resumed_from_epoch"
TAG_GIT_SHA = "git.sha"
TAG_DEVICE = "device"
#: Identity tags of a pretraining (parent) run.
PRETRAIN_TAGS = ("task", "backbone", "dataset", "protocol", "spec_version")
#: Fields written as JSON text (the others as plain strings).
JSON_FIELDS = ("figures", "versions")
#: Fields kept in ``result.json`` only: too bulky for tags. A record read back by
#: :meth:`ResultStore.results` has them empty; :meth:`ResultStore.record` reads them.
DETAIL_FIELDS = ("subset_ids", "configs", "val_history", "epoch_seconds")
#: The experiment ``bench report`` logs its files to.
REPORT_EXPERIMENT = "reports"
KIND_PRETRAIN = "pretrain"
KIND_FINETUNE = "finetune"
KIND_REPORT = "report"


class ResultIdentity(BaseModel):
    """What a fine-tune is of: everything known before it runs (its tags)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    protocol: str
    spec_version: int
    dataset: str
    task: str
    backbone: str
    pretrain_dataset: str | None = Field(default=None, description="Differs from dataset in "
                                         "transfer; None for the baseline.")
    dataset_ref: str = Field(default="", description="What published reference rows match "
                             "against, e.g. medmnist3d:adrenalmnist3d.")
    fraction: float = Field(description="Percent of the labeled training split used.")
    seed: int
    n_labeled: int | None = None
    subset_hash: str = Field(default="", description="Hash of the label subset's case ids.")
    subset_ids: list[str] = Field(default_factory=list)
    split_hash: str = ""
    metric: str = Field(description="The main metric the protocol ranks by.")
    run_key: str
    pretrain_key: str | None = None
    setup: str = Field(default="", description="Hash of what a task shares with its baseline "
                       "(protocol, dataset, backbone, fine-tuning): only equal setups rank together.")
    task_setup: str = Field(default="", description="Hash of the task's own settings "
                            "(task and pretraining configs); '-' for the baseline.")
    baseline: bool = Field(default=False, description="The baseline every entry is compared "
                           "with (its task declares the role; scratch is the built-in one).")
    higher_is_better: bool = Field(default=True, description="The main metric's direction.")
    family: str = Field(default="", description="The task's method family (restoration, "
                        "masked-modelling, contrastive, pretext-classification); empty for the "
                        "baseline and for records written before families were recorded.")
    label: str = Field(default="", description="How the leaderboard names the entry, e.g. "
                       "'rotation3d (pretrained on luna16)'; empty: the task name.")
    figures: list[str] = Field(default_factory=lambda: [FIGURE_DATA_EFFICIENCY],
                               description="Report figures the protocol offers.")
    target: float | None = Field(default=None, description="Convergence target: the share of "
                                 "the baseline's final validation score to reach.")
    configs: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    git_sha: str | None = None
    device: str = ""

    @model_validator(mode="after")
    def _label_defaults_to_task(self) -> ResultIdentity:
        if not self.label:
            self.label = self.task
        return self


class ResultRecord(ResultIdentity):
    """The result of one fine-tune: everything needed to trust, rank and reproduce it.

    Logged as ``result.json`` on every finished fine-tune run, and as tags and metrics (see
    the module docstring); ``run_id`` is filled when a record is read back.
    """

    value: float
    test_metrics: dict[str, float] = Field(default_factory=dict)
    val_history: list[dict[str, float]] = Field(default_factory=list)
    best_epoch: int | None = None
    seconds: float | None = None
    epoch_seconds: list[float] = Field(default_factory=list, description="Wall time at the end "
                                       "of each fine-tuning epoch (convergence protocol).")
    run_id: str | None = None

    def summary(self) -> ResultRecord:
        """This record without :data:`DETAIL_FIELDS`: what :meth:`ResultStore.results` reads."""
        return self.model_copy(update={name: type(getattr(self, name))()
                                       for name in DETAIL_FIELDS})


# --------------------------------------------------------------------------- 0.1 records


def entry_label(task: str, pretrain_dataset: str | None, dataset: str,
                always_name_corpus: bool) -> str:
    """A leaderboard entry's label: ``rotation3d (pretrained on A)`` when the corpus is not
    the fine-tuning dataset (or the protocol compares corpora, ``always_name_corpus``), the
    task name otherwise (no ``pretrain_dataset``: the baseline)."""
    if pretrain_dataset and (pretrain_dataset != dataset or always_name_corpus):
        return f"{task} (pretrained on {pretrain_dataset})"
    return task


def legacy_label(task: str, pretrain_dataset: str, dataset: str, protocol: str) -> str:
    """The entry label of a 0.1 record: 0.1 named the corpus in every result of its
    ``transfer`` protocol."""
    return entry_label(task, pretrain_dataset, dataset, protocol == "transfer")


def legacy_fields(protocol: str, task: str, dataset: str,
                  pretrain_dataset: str | None) -> dict[str, Any]:
    """What a 0.1 record lacks, by the rules 0.1 applied (``pretrain_dataset`` None: the
    baseline, which 0.1 tagged ``-``)."""
    return {
        "schema_version": 0,
        "baseline": pretrain_dataset is None,
        "higher_is_better": True,
        "label": legacy_label(task, pretrain_dataset or "", dataset, protocol),
        "figures": [FIGURE_CONVERGENCE if protocol == "convergence" else FIGURE_DATA_EFFICIENCY],
    }


def record_from_json(data: Mapping[str, Any], run_id: str | None = None) -> ResultRecord:
    """A record from its ``result.json`` (any schema version, 0.1 included)."""
    data = dict(data)
    if "schema_version" not in data:  # written by 0.1
        data |= legacy_fields(data["protocol"], data["task"], data["dataset"],
                              data.get("pretrain_dataset"))
    if run_id is not None:
        data["run_id"] = run_id
    return ResultRecord.model_validate(data)


# --------------------------------------------------------------------------- tags


def _encode(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def identity_tags(identity: ResultIdentity) -> dict[str, str]:
    """The tags of a fine-tune run: its identity (see the module docstring)."""
    tags: dict[str, str] = {}
    for name in ResultIdentity.model_fields:
        value = getattr(identity, name)
        if name in DETAIL_FIELDS:
            continue
        if name == "pretrain_dataset" and value is None:
            tags[name] = "-"
        elif value is None:
            continue
        elif name == "run_key":
            tags[TAG_KEY] = value
        elif name == "schema_version":
            tags[TAG_SCHEMA] = str(value)
        elif name == "git_sha":
            tags[TAG_GIT_SHA] = value
        else:
            tags[name] = _encode(value)
    return tags


def outcome_tags(record: ResultRecord) -> dict[str, str]:
    """The tags a finished fine-tune adds."""
    tags = {TAG_VALUE: str(record.value)}
    if record.best_epoch is not None:
        tags[TAG_BEST_EPOCH] = str(record.best_epoch)
    return tags


def record_from_run(run: Any) -> ResultRecord:
    """A record from a finished fine-tune run's tags, params and metrics (no artifacts).

    Raises ``KeyError`` for a run without a ``value`` tag (not finished), and ``ValueError``
    (pydantic's ``ValidationError``) for tags that do not form a record.
    """
    tags: Mapping[str, str] = run.data.tags
    metrics: Mapping[str, float] = run.data.metrics
    params: Mapping[str, str] = run.data.params
    protocol = tags.get("protocol", "?")
    task = tags.get("task", "?")
    dataset = tags.get("dataset", "?")
    pretrain = tags.get("pretrain_dataset", dataset)
    raw: dict[str, Any] = {
        name: tags[name] for name in ResultIdentity.model_fields
        if name in tags and name not in DETAIL_FIELDS
    }
    raw |= {name: json.loads(raw[name]) for name in JSON_FIELDS if name in raw}
    raw |= {
        "protocol": protocol, "task": task, "dataset": dataset,
        "backbone": tags.get("backbone", "?"), "metric": tags.get("metric", "?"),
        "spec_version": tags.get("spec_version", 0), "fraction": tags.get("fraction", "nan"),
        "seed": tags.get("seed", -1), "dataset_ref": tags.get("dataset_ref", dataset),
        "pretrain_dataset": None if pretrain == "-" else pretrain,
        "run_key": tags.get(TAG_KEY, run.info.run_id), "git_sha": tags.get(TAG_GIT_SHA),
        "device": tags.get(TAG_DEVICE, ""),
        "value": tags[TAG_VALUE], "best_epoch": tags.get(TAG_BEST_EPOCH),
        "test_metrics": {k.removeprefix("test_"): v for k, v in metrics.items()
                         if k.startswith("test_") and k != "test_main"},
        "seconds": metrics.get("seconds"), "run_id": run.info.run_id,
    }
    if "n_labeled" not in raw and "n_labeled" in params:
        raw["n_labeled"] = params["n_labeled"]
    if TAG_SCHEMA in tags:
        raw["schema_version"] = tags[TAG_SCHEMA]
    else:  # written by 0.1
        raw |= legacy_fields(protocol, task, dataset, raw["pretrain_dataset"])
        raw["versions"] = {k: v for k, v in tags.items() if "version" in k or k == TAG_GIT_SHA}
    return ResultRecord.model_validate(raw)


# --------------------------------------------------------------------------- the store


class ResultStore:
    """Results in an MLflow tracking store: writing runs (for protocol runners and
    executors) and reading typed records (for the leaderboard, the report, the analysis).

    ``device`` (when writing): every run started records the environment it ran in
    (medssl-bench, torch and Python versions, the device, the git commit).
    """

    def __init__(self, tracker: Tracker, device: str | None = None) -> None:
        self.tracker = tracker
        self.env: dict[str, str] = environment_tags(device) if device is not None else {}
        self._experiments: dict[str, str] = {}

    @classmethod
    def existing(cls, uri: str) -> ResultStore | None:
        """A store for reading; None when ``uri`` is an SQLite file that does not exist yet
        (nothing run there), which is not created (:meth:`Tracker.existing`)."""
        tracker = Tracker.existing(uri)
        return None if tracker is None else cls(tracker)

    @property
    def uri(self) -> str:
        return self.tracker.uri

    @property
    def versions(self) -> dict[str, str]:
        """The environment's versions (and git commit) for a record's ``versions``."""
        return {k: v for k, v in self.env.items() if "version" in k or k == TAG_GIT_SHA}

    @property
    def git_sha(self) -> str | None:
        return self.env.get(TAG_GIT_SHA)

    # ------------------------------------------------------------------ runs of a protocol
    def experiment(self, protocol: str) -> str:
        """The MLflow experiment of ``protocol`` (created when missing)."""
        if protocol not in self._experiments:
            self._experiments[protocol] = self.tracker.experiment_id(protocol)
        return self._experiments[protocol]

    def _existing_experiment(self, protocol: str) -> str | None:
        """The experiment of ``protocol`` if it exists (creates nothing)."""
        if protocol not in self._experiments:
            exp = self.tracker.find_experiment(protocol)
            if exp is None:
                return None
            self._experiments[protocol] = exp
        return self._experiments[protocol]

    def find(self, protocol: str, key: str) -> str | None:
        """The id of a FINISHED run of ``protocol`` with run key ``key``; None if none.
        Creates nothing (a dry run may ask)."""
        exp = self._existing_experiment(protocol)
        run = None if exp is None else self.tracker.find(exp, key)
        return None if run is None else run.info.run_id

    def running_elsewhere(self, protocol: str, key: str) -> bool:
        """Whether another live process is running ``key`` right now (a parallel sweep)."""
        exp = self._existing_experiment(protocol)
        return exp is not None and self.tracker.running_elsewhere(exp, key) is not None

    def holder_elsewhere(self, protocol: str, key: str) -> Holder | None:
        """Who else holds ``key``'s lease right now (host, pid, since, heartbeat), or None."""
        exp = self._existing_experiment(protocol)
        run = None if exp is None else self.tracker.running_elsewhere(exp, key)
        return None if run is None else Holder.of(run)

    def unit_runs(self, protocol: str, key: str) -> list[Any]:
        """Every run with run key ``key`` (any status), newest first; creates nothing."""
        exp = self._existing_experiment(protocol)
        if exp is None:
            return []
        runs = self.tracker.client.search_runs(
            [exp], filter_string=f"tags.`{TAG_KEY}` = '{key}'", max_results=100)
        return sorted(runs, key=lambda r: r.info.start_time or 0, reverse=True)

    def runs_by_key(self, protocol: str) -> dict[str, list[Any]]:
        """Every run of ``protocol`` with a run key, by key, newest first; creates nothing
        (``bench status`` reads a whole sweep with it)."""
        exp = self._existing_experiment(protocol)
        by_key: dict[str, list[Any]] = {}
        token = None
        while exp is not None:
            page = self.tracker.client.search_runs([exp], max_results=1000, page_token=token)
            for run in page:
                key = run.data.tags.get(TAG_KEY)
                if key:
                    by_key.setdefault(key, []).append(run)
            token = page.token
            if not token:
                break
        for runs in by_key.values():
            runs.sort(key=lambda r: r.info.start_time or 0, reverse=True)
        return by_key

    def reap_key(self, protocol: str, key: str, why: str, job: str | None = None) -> list[str]:
        """Mark RUNNING runs of ``key`` KILLED whose lease is dead, or (``job``) that belong
        to that job, which the scheduler says has ended: the unit runs again; their ids."""
        from medssl_bench.leases import TAG_JOB, lease_state

        exp = self._existing_experiment(protocol)
        reaped = []
        for run in [] if exp is None else self.tracker.running_with(exp, key):
            dead = lease_state(run)
            if dead or (job and run.data.tags.get(TAG_JOB) == job):
                self.tracker.reap(run, dead or why)
                reaped.append(run.info.run_id)
        return reaped

    def reap_dead(self) -> list[str]:
        """Mark runs left RUNNING by dead processes of this host KILLED; their ids."""
        return self.tracker.reap_dead()

    # ------------------------------------------------------------------ writing
    def start_pretrain(self, protocol: str, spec_version: int, name: str, key: str, *,
                       task: str, backbone: str, dataset: str,
                       params: Mapping[str, Any]) -> str:
        """Start the parent run of a pretraining (or of the baseline's fine-tunes); its id."""
        tags = {**self.env, TAG_SCHEMA: str(SCHEMA_VERSION),
                **dict(zip(PRETRAIN_TAGS, (task, backbone, dataset, protocol, spec_version),
                           strict=True))}
        return self.tracker.start(self.experiment(protocol), name, key, KIND_PRETRAIN, tags,
                                  params)

    def mark_reused(self, run_id: str, cache: Path | str) -> None:
        """The pretraining run stands for weights found in the cache."""
        self.tracker.set_tags(run_id, {TAG_REUSED: str(cache)})

    def mark_resumed(self, run_id: str, epoch: int) -> None:
        """The pretraining resumed from the checkpoint of ``epoch``."""
        self.tracker.set_tags(run_id, {TAG_RESUMED: epoch})

    def log_pretrained(self, run_id: str, weights: Path, seconds: float) -> None:
        """A finished pretraining's weights (artifact ``weights/``) and its time."""
        self.tracker.log_file(run_id, weights, "weights")
        self.tracker.log_metrics(run_id, {"pretrain_seconds": seconds})

    def start_finetune(self, identity: ResultIdentity, name: str, params: Mapping[str, Any],
                       parent_id: str | None = None) -> str:
        """Start a fine-tune run tagged with ``identity`` (under the pretraining
        ``parent_id``); its id."""
        tags = {**self.env, **identity_tags(identity)}
        return self.tracker.start(self.experiment(identity.protocol), name, identity.run_key,
                                  KIND_FINETUNE, tags, params, parent_id)

    def log_epoch(self, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Per-epoch (or one-off) metrics of a run."""
        self.tracker.log_metrics(run_id, metrics, step)

    def finish_finetune(self, run_id: str, record: ResultRecord,
                        config: Mapping[str, Any]) -> None:
        """Record a fine-tune's result (test metrics, ``result.json``, ``config.json``, the
        ``value`` tag) and close its run as FINISHED."""
        self.tracker.log_metrics(run_id, {f"test_{k}": v for k, v in record.test_metrics.items()}
                                 | {"test_main": record.value, "seconds": record.seconds})
        self.tracker.log_json(run_id, record.model_dump(mode="json", exclude={"run_id"}),
                              "result.json")
        self.tracker.log_json(run_id, dict(config), "config.json")
        self.tracker.set_tags(run_id, outcome_tags(record))
        self.tracker.finish(run_id)

    def fail(self, run_id: str, exc: BaseException) -> None:
        """Close a run that raised: FAILED for an error, KILLED for an interrupt (Ctrl-C,
        SIGTERM), with the error as a tag. Not when the store itself is unreachable: the run
        stays RUNNING until a later ``bench run`` reaps it (its owner is gone by then)."""
        self.tracker.heartbeat.release(run_id)
        if isinstance(exc, TrackingUnavailable):
            return
        self.tracker.set_tags(run_id, {TAG_ERROR: f"{type(exc).__name__}: {exc}"[:4000]})
        self.tracker.finish(run_id, "FAILED" if isinstance(exc, Exception) else "KILLED")

    def finish(self, run_id: str) -> None:
        """Close a run as FINISHED."""
        self.tracker.finish(run_id)

    def log_report(self, files: list[Path], protocol: str | None, dataset: str | None) -> str:
        """A run of the reports experiment holding ``files``; its id."""
        experiment = self.tracker.experiment_id(REPORT_EXPERIMENT)
        run_id = self.tracker.start(experiment, "report", f"report-{time.time_ns()}", KIND_REPORT,
                                    {"protocol": protocol or "*", "dataset": dataset or "*"}, {})
        for path in files:
            self.tracker.log_file(run_id, path, "report")
        self.tracker.finish(run_id)
        return run_id

    # ------------------------------------------------------------------ reading
    def results(self, protocol: str | None = None) -> list[ResultRecord]:
        """Every finished fine-tune's record (of ``protocol`` only, when given), newest
        first, one per run key (a rerun with ``--force`` replaces the older run), read from
        tags and metrics in one paged search. Records have no :data:`DETAIL_FIELDS`; a run
        whose tags do not form a record (not written by medssl-bench) is left out."""
        if protocol is None:
            ids = None
        else:
            exp = self._existing_experiment(protocol)
            if exp is None:
                return []
            ids = [exp]
        out = []
        seen: set[str] = set()
        runs = self.tracker.finetune_runs(ids)
        for run in sorted(runs, key=lambda r: r.info.start_time, reverse=True):
            if TAG_VALUE not in run.data.tags:  # incomplete
                continue
            try:
                record = record_from_run(run)
            except ValueError:  # pydantic's ValidationError, or a JSON tag edited by hand
                continue
            if record.run_key in seen:  # a duplicate of a newer run
                continue
            seen.add(record.run_key)
            out.append(record)
        return out

    def record(self, run_id: str) -> ResultRecord:
        """The full record of one finished fine-tune, from its ``result.json``."""
        from mlflow.artifacts import load_dict

        run = self.tracker.client.get_run(run_id)
        data = load_dict(f"{run.info.artifact_uri.rstrip('/')}/result.json")
        return record_from_json(data, run_id)

    def history(self, run_id: str, key: str) -> list[float]:
        """The values of metric ``key`` of a run per step (epoch), in step order (the last
        value logged at a step, when a resumed run logged it twice)."""
        points = self.tracker.client.get_metric_history(run_id, key)
        by_step = {p.step: p.value for p in sorted(points, key=lambda p: p.timestamp)}
        return [by_step[s] for s in sorted(by_step)]


def as_store(source: ResultStore | Tracker) -> ResultStore:
    """A store for ``source`` (a tracker is wrapped)."""
    return source if isinstance(source, ResultStore) else ResultStore(source)


__all__ = [
    "DETAIL_FIELDS", "SCHEMA_VERSION", "ResultIdentity", "ResultRecord", "ResultStore",
    "as_store", "legacy_fields", "legacy_label", "record_from_json", "record_from_run",
]
