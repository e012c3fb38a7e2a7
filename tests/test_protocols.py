"""Protocol specs, paper recipes, multi-task resolution, and the transfer and convergence
protocols end to end at a tiny size (16^3 volumes, a two-level U-Net, one step per epoch)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from medssl_bench import cli
from medssl_bench.errors import ConfigError
from medssl_bench.spec import available_specs, load_spec, resolve_run

RECIPES = sorted((Path(__file__).resolve().parents[1] / "protocols" / "recipes").glob("*.yaml"))
TINY_RUN = ["backbone.filters=[4,8]", "task.hidden=8", "pretrain.epochs=1",
            "pretrain.iterations_per_epoch=1", "pretrain.batch_size=2", "finetune.epochs=1",
            "finetune.warmup_epochs=0", "finetune.iterations_per_epoch=1", "protocol.seeds=[0]",
            "protocol.fractions=[100]"]
TINY_PHANTOM = ["size=16", "n_unlabeled=4", "n_train=2", "n_val=2", "n_test=2"]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def _finetunes(db: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    ids = [e.experiment_id for e in client.search_experiments()]
    return [r for r in client.search_runs(ids, max_results=1000)
            if r.data.tags.get("medssl_bench.kind") == "finetune"]


# --------------------------------------------------------------------------- specs, recipes


@pytest.mark.parametrize("name", ["data-efficiency", "transfer", "convergence"])
def test_protocol_specs_validate(registry, name):
    assert name in available_specs()
    spec = load_spec(name)
    assert spec.name == name and spec.version >= 1
    cls = registry.get("protocol", name)
    for preset in (None, "quick", "paper"):
        values = {**spec.protocol, **(spec.presets.get(preset, {}).get("protocol", {})
                                      if preset else {})}
        cls.Config.model_validate(values)
    assert load_spec("convergence").protocol["target"] == 0.95


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipes_resolve_without_touching_data(registry, recipe, monkeypatch):
    for name in registry.names("dataset"):
        cls = registry.get("dataset", name)
        monkeypatch.setattr(cls, "load", lambda self: pytest.fail("resolve_run loaded data"),
                            raising=False)
    run = resolve_run(registry, "", "", preset="paper", config_file=str(recipe))
    assert run.spec.name in ("data-efficiency", "transfer")
    for section in ("protocol", "pretrain", "finetune", "dataset", "backbone", "task"):
        assert section in run.configs
    if run.spec.name == "transfer":
        assert "pretrain_dataset" in run.configs
    # the placeholder roots (/data/...) are kept as given: nothing looks at the disk
    written = yaml.safe_load(recipe.read_text())
    roots = {s: written[s]["root"] for s in ("dataset", "pretrain_dataset") if "root" in written.get(s, {})}
    assert roots, f"{recipe.name} names no dataset root to replace"
    for section, root in roots.items():
        assert run.configs[section].root == root


def test_recipe_set_count():
    assert {p.stem for p in RECIPES} >= {"taleb2020-pancreas", "taleb2020-brats",
                                         "taleb2020-retinopathy", "models-genesis"}


def test_multi_task_resolution(registry):
    run = resolve_run(registry, "data-efficiency", "rotation3d,jigsaw3d",
                      overrides={"task": {"hidden": 8, "jigsaw3d": {"grid": 2}}})
    assert run.task_names == ["rotation3d", "jigsaw3d"]
    assert run.task_configs["rotation3d"].hidden == 8
    assert run.task_configs["jigsaw3d"].grid == 2
    every = resolve_run(registry, "data-efficiency", "all")
    assert "scratch" not in every.task_names and "rotation2d" not in every.task_names
    assert {"rotation3d", "jigsaw3d"} <= set(every.task_names)
    with pytest.raises(ConfigError, match="no task of this sweep"):
        resolve_run(registry, "data-efficiency", "rotation3d,jigsaw3d",
                    overrides={"task": {"no_such_setting": 1}})
    with pytest.raises(ConfigError, match="twice"):
        resolve_run(registry, "data-efficiency", "rotation3d,rotation3d")


def test_pretrain_dataset_section_is_validated(registry):
    run = resolve_run(registry, "transfer", "rotation3d", pretrain_dataset="phantom3d",
                      overrides={"pretrain_dataset": {"channels": 2}})
    assert run.configs["pretrain_dataset"].channels == 2
    assert run.configs["pretrain_dataset"].size == 32  # the quick preset applies to it too
    with pytest.raises(ConfigError, match="pretrain_dataset.no_field"):
        resolve_run(registry, "transfer", "rotation3d", pretrain_dataset="phantom3d",
                    overrides={"pretrain_dataset": {"no_field": 1}})
    with pytest.raises(ConfigError, match="--pretrain-dataset"):
        resolve_run(registry, "transfer", "rotation3d", overrides={"pretrain_dataset": {"size": 16}})


def test_transfer_without_pretrain_dataset_is_one_message(workdir, capsys):
    code = cli.main(["run", "--protocol", "transfer", "--task", "rotation3d", "--device", "cpu",
                     "--set", *TINY_RUN, *[f"dataset.{x}" for x in TINY_PHANTOM]])
    err = capsys.readouterr().err
    assert code != 0 and "--pretrain-dataset" in err and "Traceback" not in err


# --------------------------------------------------------------------------- end to end


def test_transfer_between_channel_counts(workdir, capsys):
    """phantom3d with 1 channel (another seed) -> phantom3d with 2 channels, beside B -> B
    and scratch; the first layer is adapted by duplication."""
    code = cli.main([
        "run", "--protocol", "transfer", "--task", "rotation3d", "--pretrain-dataset", "phantom3d",
        "--device", "cpu", "--set", *TINY_RUN, *[f"dataset.{x}" for x in TINY_PHANTOM],
        "dataset.channels=2", *[f"pretrain_dataset.{x}" for x in TINY_PHANTOM],
        "pretrain_dataset.channels=1", "pretrain_dataset.seed=7"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Channels differ" in out
    runs = _finetunes(workdir / "mlflow.db")
    assert all(r.info.status == "FINISHED" for r in runs)
    corpora = sorted(r.data.tags["pretrain_dataset"] for r in runs)
    assert corpora == sorted(["-", "phantom3d", "phantom3d(channels=1,seed=7)"])
    record_sources = set()
    for r in runs:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
        path = client.download_artifacts(r.info.run_id, "result.json", str(workdir))
        record_sources.add(json.loads(Path(path).read_text())["pretrain_dataset"])
    assert record_sources == {None, "phantom3d", "phantom3d(channels=1,seed=7)"}
    assert cli.main(["leaderboard", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    labels = {r["label"] for r in rows}
    assert labels == {"scratch", "rotation3d (pretrained on phantom3d)",
                      "rotation3d (pretrained on phantom3d(channels=1,seed=7))"}


def _medmnist(path: Path, size: int = 16) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 6), ("val", 4), ("test", 4)):
        labels = np.arange(n) % 2
        images = rng.integers(0, 120, (n, size, size, size), dtype=np.uint8)
        images[labels == 1, size // 4: 3 * size // 4] += 100  # a learnable signal
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = labels.reshape(-1, 1)
    np.savez(path, **arrays)
    return path


def test_transfer_phantom_to_medmnist_with_published_rows(workdir, capsys):
    npz = _medmnist(workdir / "adrenalmnist3d.npz")
    code = cli.main([
        "run", "--protocol", "transfer", "--task", "rotation3d", "--pretrain-dataset", "phantom3d",
        "--dataset", "medmnist3d", "--device", "cpu", "--set", *TINY_RUN,
        f"dataset.path={npz}", "protocol.include_same_dataset=false",
        *[f"pretrain_dataset.{x}" for x in TINY_PHANTOM]])
    out = capsys.readouterr().out
    assert code == 0, out
    runs = _finetunes(workdir / "mlflow.db")
    assert len(runs) == 2 and {r.data.tags["dataset_ref"] for r in runs} == {
        "medmnist3d:adrenalmnist3d"}
    assert cli.main(["leaderboard", "--format", "markdown"]) == 0
    md = capsys.readouterr().out
    assert "rotation3d (pretrained on phantom3d)" in md
    assert "ResNet-18 + 3D" in md and "MedMNIST v2" in md  # published AUC rows, labelled
    assert cli.main(["leaderboard", "--format", "json", "--summary"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["published"] and all(p["metric"] == "auc" for p in summary["published"])


def test_convergence_protocol_and_report(workdir, capsys):
    code = cli.main(["run", "--protocol", "convergence", "--task", "rotation3d", "--device", "cpu",
                     "--set", *TINY_RUN, "finetune.epochs=3",
                     *[f"dataset.{x}" for x in TINY_PHANTOM]])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Convergence rotation3d" in out and "Convergence scratch" in out
    runs = _finetunes(workdir / "mlflow.db")
    assert all(r.data.tags["target"] == "0.95" for r in runs)
    from medssl_bench.store import SCHEMA_VERSION, ResultStore

    store = ResultStore.existing(str(workdir / "mlflow.db"))
    records = store.results()  # what the runner wrote, read back from the tags
    assert {(r.task, r.baseline, r.label, tuple(r.figures)) for r in records} == {
        ("rotation3d", False, "rotation3d", ("convergence",)),
        ("scratch", True, "scratch", ("convergence",))}
    assert all(r.schema_version == SCHEMA_VERSION and r.target == 0.95 and r.higher_is_better
               and r.subset_hash and r.split_hash and r.versions for r in records)
    for r in records:  # the tags and result.json agree
        assert store.record(r.run_id).summary() == r
    assert cli.main(["report", "--out", "rep"]) == 0
    pngs = sorted(p.name for p in (workdir / "rep").glob("*.png"))
    assert any(p.startswith("convergence_") for p in pngs)
    assert not any(p.startswith("data_efficiency_") for p in pngs)  # read per epoch, not fraction
    data = json.loads((workdir / "rep" / "report.json").read_text())
    conv = {c["task"]: c for c in data["convergence"]}
    assert set(conv) == {"rotation3d", "scratch"}
    assert conv["scratch"]["epochs"] == 3 and len(conv["scratch"]["curve_mean"]) == 3
    assert conv["scratch"]["epochs_to_target"] is not None  # scratch reaches its own final
    assert "epochs_to_target" in conv["rotation3d"] and "seconds_to_target" in conv["rotation3d"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("medssl-bench/reports")
    report_run = client.search_runs([exp.experiment_id])[0]
    arts = {a.path for a in client.list_artifacts(report_run.info.run_id, "report")}
    assert any(a.endswith(".png") for a in arts)
