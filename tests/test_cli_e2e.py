"""`bench run` end to end at a tiny size: MLflow records, the leaderboard, reruns that
redo nothing, --force, and user errors as one message with a non-zero exit."""

from __future__ import annotations

import json

import pytest

from medssl_bench import cli
from medssl_bench.errors import TrainingError

TINY = [
    "dataset.size=16", "dataset.n_unlabeled=4", "dataset.n_train=4", "dataset.n_val=2",
    "dataset.n_test=2", "backbone.filters=[4,8]", "task.hidden=8",
    "pretrain.epochs=1", "pretrain.iterations_per_epoch=1", "pretrain.batch_size=2",
    "finetune.epochs=1", "finetune.warmup_epochs=0", "finetune.iterations_per_epoch=1",
    "protocol.seeds=[0,1]", "protocol.fractions=[50,100]",
]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def _run(*extra):
    return cli.main(["run", "--protocol", "data-efficiency", "--task", "rotation3d",
                     "--device", "cpu", "--set", *TINY, *extra])


def _runs(db):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, max_results=1000)


def test_run_leaderboard_rerun_force(workdir, capsys):
    assert _run() == 0
    out = capsys.readouterr().out  # not a terminal: plain progress lines, no bars
    assert "pretrain rotation3d epoch 1/1: loss " in out and "pretrained rotation3d in " in out
    assert "rotation3d 50% seed 0 epoch 1/1: loss " in out
    db = workdir / "mlflow.db"
    assert db.exists(), "the default tracking store is sqlite:///mlflow.db in the working dir"
    runs = _runs(db)
    finetunes = [r for r in runs if r.data.tags.get("medssl_bench.kind") == "finetune"]
    assert len(finetunes) == 2 * 2 * 2  # (rotation3d, scratch) x seeds x fractions
    assert all(r.info.status == "FINISHED" for r in runs)
    child = finetunes[0]
    assert child.data.tags["mlflow.parentRunId"]
    assert child.data.params["finetune.epochs"] == "1"
    assert "torch.version" in child.data.tags and "val_dice_mean" in child.data.metrics
    arts = {a.path for a in __import__("mlflow").tracking.MlflowClient(
        f"sqlite:///{db}").list_artifacts(child.info.run_id)}
    assert {"result.json", "config.json"} <= arts
    assert list((workdir / ".medssl_bench" / "cache" / "pretrain").glob("*.safetensors"))

    capsys.readouterr()
    assert cli.main(["leaderboard", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    keys = {"protocol", "dataset", "task", "backbone", "fraction", "metric", "mean", "std", "n"}
    assert all(keys <= set(r) for r in rows)
    got = {(r["task"], r["fraction"]): r["n"] for r in rows}
    assert got == {(t, f): 2 for t in ("rotation3d", "scratch") for f in (50.0, 100.0)}
    for fmt in ("markdown", "csv", "table"):
        assert cli.main(["leaderboard", "--format", fmt]) == 0
    assert "rotation3d" in capsys.readouterr().out

    # A rerun trains nothing and adds no runs.
    assert _run() == 0
    out = capsys.readouterr().out
    assert "Reusing pretrained rotation3d" in out and "9 reused" in out
    assert len(_runs(db)) == len(runs)

    # --force redoes everything, and the leaderboard still counts each result once.
    assert _run("--force") == 0
    capsys.readouterr()
    cli.main(["leaderboard", "--format", "json"])
    rows = json.loads(capsys.readouterr().out)
    assert {r["n"] for r in rows} == {2}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--task", "rotaton3d"], "Did you mean 'rotation3d'"),
        (["--task", "rotation3d", "--set", "finetune.lr=-1"], "finetune.lr"),
        (["--task", "rotation3d", "--dataset", "medmnist3d", "--set", "dataset.path=/no/such.npz"],
         "/no/such.npz"),
        (["--task", "rotation3d", "--backbone", "unet2d"], "Unknown backbone 'unet2d'"),
    ],
)
def test_user_errors_are_one_message(workdir, capsys, argv, message):
    code = cli.main(["run", "--protocol", "data-efficiency", "--device", "cpu", *argv])
    err = capsys.readouterr().err
    assert code != 0
    assert message in err.replace("\n", " ")
    assert "Traceback" not in err


def test_failed_finetune_is_recorded_and_sweep_goes_on(workdir, capsys, monkeypatch):
    import medssl_bench.units as runners

    real = runners.finetune

    def flaky(*args, **kwargs):
        if kwargs.get("label", "").startswith("scratch 50%"):
            raise TrainingError("loss became nan (planted)")
        return real(*args, **kwargs)

    monkeypatch.setattr(runners, "finetune", flaky)
    assert _run() == 1
    captured = capsys.readouterr()
    assert "planted" in captured.err
    runs = _runs(workdir / "mlflow.db")
    statuses = sorted(r.info.status for r in runs if r.data.tags.get("medssl_bench.kind") == "finetune")
    assert statuses.count("FAILED") == 2 and statuses.count("FINISHED") == 6
    # the rerun retries only the failed ones
    monkeypatch.setattr(runners, "finetune", real)
    assert _run() == 0
    assert "2 ran" in capsys.readouterr().out


def test_dry_run_prints_the_plan_and_what_a_rerun_would_reuse(workdir, capsys):
    """--dry-run: every unit with its key, in plan order (scratch beside the task at each
    label subset), nothing trained, no store created; after a real run, all reused."""
    assert _run("--dry-run") == 0
    out = capsys.readouterr().out
    assert not (workdir / "mlflow.db").exists() and not (workdir / ".medssl_bench").exists()
    lines = [line for line in out.splitlines() if " seed " in line]
    order = [(line.split("seed ")[1][0], "scratch" if "scratch" in line else "rotation3d")
             for line in lines]
    # seed 0 (both fractions, scratch first in each) before seed 1
    assert order == [("0", "scratch"), ("0", "rotation3d")] * 2 + [
        ("1", "scratch"), ("1", "rotation3d")] * 2
    assert out.count(" run ") + out.count(" run\n") >= 9 and "10 units" in out
    assert _run() == 0
    capsys.readouterr()
    assert _run("--dry-run") == 0
    out = capsys.readouterr().out
    assert "1 none; 9 reuse" in out and "reuse cached encoder" in out  # 8 results + encoder


def test_failed_pretraining_skips_its_finetunes_and_says_why(workdir, capsys, monkeypatch):
    import medssl_bench.units as units

    def broken(*args, **kwargs):
        raise TrainingError("loss became nan (planted)")

    monkeypatch.setattr(units, "pretrain", broken)
    assert _run() == 1
    captured = capsys.readouterr()
    assert "planted" in captured.err
    assert "FAILED pretraining rotation3d on phantom3d: loss became nan" in captured.out
    assert "4 skipped" in captured.out and "4 ran" in captured.out  # scratch still ran
