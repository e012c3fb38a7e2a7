"""`bench leaderboard` / `bench report` around the results: filters that match nothing, empty
directories, tracking URIs. Fake finished fine-tunes in a real SQLite store; no training."""

from __future__ import annotations

import pytest

from medssl_bench import cli
from medssl_bench.tracking import Tracker


def _store(db, values):
    """Finished fine-tune runs as a sweep records them: (task, fraction) -> value per seed."""
    tracker = Tracker(f"sqlite:///{db}")
    exp = tracker.experiment_id("data-efficiency")
    for (task, fraction), vals in values.items():
        for seed, value in enumerate(vals):
            tags = {"task": task, "protocol": "data-efficiency", "spec_version": 1,
                    "dataset": "phantom3d", "pretrain_dataset": "-" if task == "scratch"
                    else "phantom3d", "backbone": "unet3d", "fraction": fraction,
                    "metric": "dice_mean", "seed": seed, "value": value}
            run = tracker.start(exp, f"{task}-{fraction}-{seed}", f"{task}-{fraction}-{seed}",
                                "finetune", tags, {})
            tracker.finish(run)
    return tracker


VALUES = {("rotation3d", 50): [0.24, 0.25], ("rotation3d", 100): [0.17, 0.18],
          ("scratch", 50): [0.26, 0.27], ("scratch", 100): [0.24, 0.245]}


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _store(tmp_path / "mlflow.db", VALUES)
    return tmp_path


def test_filters_that_match_nothing_name_what_exists(store, capsys):
    assert cli.main(["leaderboard", "--protocol", "data-effciency"]) == 2
    err = capsys.readouterr().err
    assert "Did you mean 'data-efficiency'" in err and "No finished results yet" not in err
    assert cli.main(["leaderboard", "--dataset", "phantom2d"]) == 1
    err = capsys.readouterr().err
    assert "No finished results match --dataset phantom2d" in err and "phantom3d" in err
    assert cli.main(["leaderboard", "--format", "json", "--task", "genesis3d"]) == 1
    assert "rotation3d" in capsys.readouterr().err
    assert cli.main(["report", "--out", "rep", "--no-mlflow", "--protocol", "transfer"]) == 1
    assert "data-efficiency" in capsys.readouterr().err
    assert not (store / "rep").exists()
    assert cli.main(["leaderboard", "--protocol", "data-efficiency"]) == 0
    out = capsys.readouterr().out
    assert "not reached" in out and "saves" not in out  # rotation3d stays below scratch@100


@pytest.mark.parametrize("command", [["leaderboard"], ["leaderboard", "--format", "json"],
                                     ["report", "--out", "rep"]])
def test_an_empty_directory_gets_no_store_created(tmp_path, monkeypatch, capsys, command):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cli.main(command) == 0
    out = capsys.readouterr().out
    assert "No finished results" in out or out.strip() == "[]"
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, no report folder
    # a typo'd filter is a typo even before anything has run, for both commands
    assert cli.main([*command, "--protocol", "data-effciency"]) == 2
    assert "data-efficiency" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_plain_db_path_is_an_sqlite_store(store, capsys):
    assert cli.main(["leaderboard", "--format", "csv", "--tracking-uri",
                     str(store / "mlflow.db")]) == 0
    assert "rotation3d" in capsys.readouterr().out
    assert cli.main(["leaderboard", "--tracking-uri", str(store)]) == 2
    err = capsys.readouterr().err
    assert f"sqlite:///{store / 'mlflow.db'}" in err and "MLFLOW_ALLOW_FILE_STORE" not in err
