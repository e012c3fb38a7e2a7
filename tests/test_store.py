"""The result store: a record written through it reads back equal (from tags and metrics,
one search), 0.1 records read by the 0.1 rules, and the leaderboard, the report and the
analysis take the baseline from the record (the task's declared role), not from a name."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from medssl_bench import leaderboard as lb
from medssl_bench.analysis import convergence_table
from medssl_bench.config import PluginConfig
from medssl_bench.hookspecs import hookimpl
from medssl_bench.interfaces import FIGURE_CONVERGENCE, ProxyTask
from medssl_bench.plugins import build_registry
from medssl_bench.store import (
    SCHEMA_VERSION,
    ResultIdentity,
    ResultRecord,
    ResultStore,
    legacy_label,
    record_from_json,
)
from medssl_bench.tracking import Tracker


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory):
    """An empty store, created once (creating the MLflow schema takes seconds)."""
    db = tmp_path_factory.mktemp("empty") / "mlflow.db"
    Tracker(f"sqlite:///{db}")  # opening it creates the schema, no experiment
    return db


@pytest.fixture
def store(tmp_path, empty_db):
    shutil.copy(empty_db, tmp_path / "mlflow.db")
    return ResultStore(Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}"), device="cpu")


def _identity(**fields) -> ResultIdentity:
    base = dict(protocol="data-efficiency", spec_version=1, dataset="phantom3d",
                task="rotation3d", backbone="unet3d", pretrain_dataset="phantom3d",
                dataset_ref="phantom3d", fraction=50.0, seed=0, n_labeled=2,
                subset_hash="abc", subset_ids=["case-1", "case-2"], split_hash="def",
                metric="dice_mean", run_key="key-1", pretrain_key="pre-1", setup="s1",
                task_setup="t1", label="rotation3d", configs={"finetune": {"epochs": 2}},
                versions={"task": "medssl-bench==0.1"}, git_sha="0123abc", device="cpu")
    return ResultIdentity(**(base | fields))


def _write(store: ResultStore, identity: ResultIdentity, value: float,
           curve: list[float] = ()) -> ResultRecord:
    parent = store.start_pretrain(identity.protocol, identity.spec_version, "pretrain",
                                  f"pre-{identity.run_key}", task=identity.task,
                                  backbone=identity.backbone, dataset=identity.dataset, params={})
    store.finish(parent)
    run_id = store.start_finetune(identity, identity.run_key, {"seed": identity.seed}, parent)
    for epoch, v in enumerate(curve):
        store.log_epoch(run_id, {f"val_{identity.metric}": v, "elapsed_seconds": epoch + 1.0},
                        epoch)
    record = ResultRecord(**identity.model_dump(), value=value,
                          test_metrics={identity.metric: value, "dice_organ": value / 2},
                          val_history=[{identity.metric: v} for v in curve], best_epoch=1,
                          seconds=3.5, epoch_seconds=[1.0, 2.0])
    store.finish_finetune(run_id, record, {"run": {"preset": "quick"}})
    return record.model_copy(update={"run_id": run_id})


def test_a_record_round_trips_through_the_store(store):
    written = _write(store, _identity(target=0.95, figures=[FIGURE_CONVERGENCE],
                                      higher_is_better=False), 0.4321)
    assert written.schema_version == SCHEMA_VERSION
    (read,) = store.results()
    assert read == written.summary()  # tags and metrics: everything but the bulky fields
    assert read.subset_ids == [] and read.configs == {}
    assert store.record(read.run_id) == written  # result.json: everything
    baseline = _write(store, _identity(task="scratch", pretrain_dataset=None, baseline=True,
                                       task_setup="-", run_key="key-2", label="scratch",
                                       pretrain_key=None), 0.3)
    assert store.results()[0] == baseline.summary()  # newest first; None fields stay None
    assert store.results("transfer") == []  # no such experiment: nothing (and none created)
    assert store.find("transfer", "key-1") is None and not store.running_elsewhere("transfer", "k")
    assert store.tracker.client.get_experiment_by_name("medssl-bench/transfer") is None
    assert store.find("data-efficiency", "key-1") == written.run_id
    assert {r.run_key for r in store.results("data-efficiency")} == {"key-1", "key-2"}


def test_a_rerun_replaces_the_older_run_of_its_key(store):
    _write(store, _identity(), 0.1)
    newer = _write(store, _identity(), 0.2)
    assert [r.value for r in store.results()] == [newer.value]


def test_history_is_per_epoch(store):
    record = _write(store, _identity(), 0.3, curve=[0.1, 0.2, 0.3])
    assert store.history(record.run_id, "val_dice_mean") == [0.1, 0.2, 0.3]
    assert store.history(record.run_id, "elapsed_seconds") == [1.0, 2.0, 3.0]


def test_a_0_1_result_json_reads_by_the_0_1_rules():
    data = dict(protocol="transfer", spec_version=1, dataset="b", task="rotation3d",
                backbone="unet3d", pretrain_dataset="b", dataset_ref="b", fraction=100.0,
                seed=0, n_labeled=4, subset_hash="h", subset_ids=["1"], split_hash="s",
                metric="dice_mean", value=0.5, test_metrics={"dice_mean": 0.5},
                val_history=[{"dice_mean": 0.5}], best_epoch=0, run_key="k", pretrain_key="p",
                configs={}, versions={}, device="cpu", seconds=1.0, epoch_seconds=[1.0])
    record = record_from_json(data)  # every 0.1 field, no schema version
    assert record.schema_version == 0 and not record.baseline and record.higher_is_better
    assert record.label == "rotation3d (pretrained on b)" and record.figures == ["data_efficiency"]
    scratch = record_from_json(data | {"task": "scratch", "pretrain_dataset": None,
                                       "protocol": "convergence"})
    assert scratch.baseline and scratch.label == "scratch" and scratch.figures == ["convergence"]
    assert legacy_label("rotation3d", "b", "b", "data-efficiency") == "rotation3d"


# --------------------------------------------------------------------------- the baseline role


class Reference(ProxyTask):
    """A baseline of a third party: fine-tunes from no pretraining, named otherwise."""

    name = "reference3d"
    spatial_dims = 3
    pretrains = False
    baseline = True

    class Config(PluginConfig):
        pass


class ReferencePlugin:
    @hookimpl
    def bench_register_tasks(self, register):
        register(Reference)


def test_a_baseline_not_named_scratch_is_the_baseline(store, monkeypatch):
    registry = build_registry([ReferencePlugin()], autoload=False)
    monkeypatch.setattr("medssl_bench.plugins.get_registry", lambda: registry)
    means = {("rotation3d", 50): 0.6, ("rotation3d", 100): 0.8,
             ("reference3d", 50): 0.5, ("reference3d", 100): 0.7}
    for (name, fraction), mean in means.items():
        cls = registry.get("task", name)
        for seed, delta in enumerate((-0.01, 0.0, 0.02)):
            _write(store, _identity(
                task=name, fraction=float(fraction), seed=seed, baseline=cls.baseline,
                pretrain_dataset=None if cls.baseline else "phantom3d", label=name,
                run_key=f"{name}-{fraction}-{seed}", protocol="convergence",
                figures=[FIGURE_CONVERGENCE], target=0.95),
                mean + delta, curve=[mean / 2, mean + delta])
    records = lb.collect(store)
    assert {r.task for r in records if r.baseline} == {"reference3d"}
    rows = lb.aggregate(records)
    ref100 = next(r for r in rows if r.task == "reference3d" and r.fraction == 100)
    rot100 = next(r for r in rows if r.task == "rotation3d" and r.fraction == 100)
    assert ref100.baseline and ref100.p_vs_scratch is None and ref100.delta_vs_scratch is None
    assert rot100.delta_vs_scratch == pytest.approx(0.1) and rot100.p_test == "paired"
    (saving,) = lb.annotation_saving(rows)
    assert saving["label"] == "rotation3d" and saving["scratch_100"] == pytest.approx(ref100.mean)
    # a task filter keeps the baseline; naming the baseline alone selects just it
    assert {r.task for r in lb.select(records, task="rotation3d")} == {"rotation3d", "reference3d"}
    assert {r.task for r in lb.select(records, task="reference3d")} == {"reference3d"}
    with pytest.raises(lb.NoMatchingResults, match=r"--task genesis3d\..*exist for task: rotation3d\.$"):
        lb.select(records, task="genesis3d")
    conv = [c for c in convergence_table(store) if c.fraction == 100]
    assert [(c.task, c.baseline) for c in conv] == [("rotation3d", False), ("reference3d", True)]
    assert conv[0].target_value == pytest.approx(0.95 * np.mean([0.69, 0.70, 0.72]))
    assert conv[0].epochs_to_target == 2 and conv[1].epochs_to_target == 2
