"""Sweeps that survive: pickle-free checkpoints, exact pretraining resume, runs of dead
processes marked KILLED, SQLite lock retries, and a real `bench run` subprocess killed with
SIGKILL twice (mid-pretraining, then after the first fine-tune) and rerun to completion."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from bench_helpers import TINY, all_runs, start_bench

from medssl_bench.checkpoint import load_checkpoint, save_checkpoint
from medssl_bench.errors import DataError
from medssl_bench.tracking import TAG_PID, RetryingClient, Tracker


def test_checkpoint_round_trip_without_pickle(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"epoch": 3, "history": [{"loss": 1.0}], "model": model.state_dict(),
             "optimizer": opt.state_dict(), "rng": torch.get_rng_state()}
    path = save_checkpoint(state, tmp_path / "c.safetensors")
    assert path.read_bytes()[:8]  # a safetensors header, not a pickle
    back = load_checkpoint(path)
    assert back["epoch"] == 3 and back["history"] == [{"loss": 1.0}]
    assert isinstance(back["optimizer"]["param_groups"][0]["betas"], tuple)
    assert set(back["optimizer"]["state"]) == {0, 1}
    fresh = torch.optim.Adam(model.parameters(), lr=1e-3)
    fresh.load_state_dict(back["optimizer"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="Delete it"):
        load_checkpoint(tmp_path / "bad.safetensors")


def test_resumed_pretraining_equals_uninterrupted(registry):
    from medssl_bench.engine import PretrainConfig, pretrain

    dataset = registry.get("dataset", "phantom3d")(
        registry.get("dataset", "phantom3d").Config(size=16, n_unlabeled=4))
    data = dataset.load()
    backbone_cls = registry.get("backbone", "unet3d")
    backbone = backbone_cls(backbone_cls.Config(filters=[4, 8]))
    task_cls = registry.get("task", "rotation3d")
    cfg = PretrainConfig(epochs=2, batch_size=2, iterations_per_epoch=1)
    device = torch.device("cpu")
    straight = pretrain(task_cls(task_cls.Config(hidden=8)), backbone, data.unlabeled, data.info,
                        cfg, device, 0)
    saved = {}

    def keep_first(state):
        if state["epoch"] == 1:
            saved["path"] = save_checkpoint(state, Path(os.environ.get("TMPDIR", "/tmp"))
                                            / f"resume-{os.getpid()}.safetensors")

    pretrain(task_cls(task_cls.Config(hidden=8)), backbone, data.unlabeled, data.info,
             cfg.model_copy(update={"epochs": 1}), device, 0, on_checkpoint=keep_first)
    saved["state"] = load_checkpoint(saved["path"])
    assert saved["state"]["device_type"] == "cpu"
    resumed = pretrain(task_cls(task_cls.Config(hidden=8)), backbone, data.unlabeled, data.info,
                       cfg, device, 0, resume=load_checkpoint(saved["path"]))
    saved["path"].unlink()
    for k, v in straight.weights["encoder"].items():
        assert torch.allclose(v, resumed.weights["encoder"][k]), k
    assert len(resumed.history) == 2

    # A checkpoint from another device type (a CUDA generator's 16-byte state, or an
    # explicit device_type): resumes with weights and epoch, the batch stream reseeded.
    cuda_written = dict(saved["state"], device_type="cuda")
    older_format = dict(saved["state"], generator=torch.zeros(16, dtype=torch.uint8))
    del older_format["device_type"]
    for state in (cuda_written, older_format):
        epochs_run = []
        again = pretrain(task_cls(task_cls.Config(hidden=8)), backbone, data.unlabeled,
                         data.info, cfg, device, 0, resume=state,
                         on_epoch=lambda logs, epoch, seen=epochs_run: seen.append(epoch))
        assert epochs_run == [1]  # resumed after epoch 1: only the second epoch trained
        assert len(again.history) == 2 and again.history[0] == resumed.history[0]


def test_retrying_client_waits_out_locks():
    calls = []

    class Flaky:
        def log_batch(self, *args, **kwargs):
            calls.append(1)
            if len(calls) < 3:
                raise RuntimeError("(sqlite3.OperationalError) database is locked")
            return "ok"

        def other(self):
            raise ValueError("real error")

    client = RetryingClient(Flaky(), budget=5)
    assert client.log_batch() == "ok" and client.retries == 2
    with pytest.raises(ValueError):
        client.other()


def test_runs_of_dead_processes_are_marked_killed(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = tracker.experiment_id("test")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = tracker.start(exp, "orphan", "k1", "finetune", {}, {})
    tracker.client.set_tag(orphan, TAG_PID, str(dead.pid))
    mine = tracker.start(exp, "mine", "k2", "finetune", {}, {})
    assert tracker.reap_dead() == [orphan]
    assert tracker.client.get_run(orphan).info.status == "KILLED"
    assert tracker.client.get_run(mine).info.status == "RUNNING"
    assert tracker.running_elsewhere(exp, "k2") is None  # our own run is not "elsewhere"


# --------------------------------------------------------------------------- SIGKILL


def _count(db: Path, sql: str) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return con.execute(sql).fetchone()[0]
    except sqlite3.Error:
        return 0


FINISHED_FINETUNES = ("select count(*) from runs r join tags t on r.run_uuid = t.run_uuid where "
                      "t.key = 'medssl_bench.kind' and t.value = 'finetune' and r.status = 'FINISHED'")


def _start(workdir: Path, argv: list[str], log: Path) -> subprocess.Popen:
    """`bench ARGV`, each epoch stretched to 0.4 s so that a kill lands inside a unit."""
    return start_bench(workdir, argv, log, MEDSSL_BENCH_TEST_EPOCH_DELAY="0.4")


def _kill_when(proc: subprocess.Popen, condition, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"bench run ended (rc {proc.returncode}) before the kill:\n{log.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting to kill:\n{log.read_text()}")
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_sigkill_twice_then_rerun_finishes_exactly_once(tmp_path):
    argv = ["run", "--protocol", "data-efficiency", "--task", "rotation3d,jigsaw3d",
            "--device", "cpu", "--set", *TINY, "pretrain.epochs=4", "protocol.seeds=[0,1]"]
    db = tmp_path / "mlflow.db"
    ckpts = tmp_path / ".medssl_bench" / "cache" / "pretrain"

    # 1. killed mid-pretraining, once an epoch checkpoint exists
    first = _start(tmp_path, argv, tmp_path / "run1.log")
    _kill_when(first, lambda: any(ckpts.glob("*.ckpt.safetensors")), tmp_path / "run1.log")
    # 2. rerun (resumes the pretraining), killed once a fine-tune has finished
    second = _start(tmp_path, argv, tmp_path / "run2.log")
    _kill_when(second, lambda: _count(db, FINISHED_FINETUNES) >= 1, tmp_path / "run2.log")
    # 3. rerun to the end
    third = _start(tmp_path, argv, tmp_path / "run3.log")
    assert third.wait(timeout=300) == 0, (tmp_path / "run3.log").read_text()
    assert "Resuming pretrain rotation3d" in (tmp_path / "run2.log").read_text()

    runs = all_runs(f"sqlite:///{db}")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert [r for r in runs if r.info.status == "KILLED"]
    finished = [r for r in runs if r.data.tags.get("medssl_bench.kind") == "finetune"
                and r.info.status == "FINISHED"]
    keys = [r.data.tags["medssl_bench.run_key"] for r in finished]
    assert len(keys) == len(set(keys)) == 3 * 2  # (rotation3d, jigsaw3d, scratch) x 2 seeds
    resumed = [r for r in runs if r.data.tags.get("resumed_from_epoch")]
    assert resumed and int(resumed[0].data.tags["resumed_from_epoch"]) >= 1
    assert not list(ckpts.glob("*.ckpt.safetensors"))  # removed once pretraining finished

    from medssl_bench import leaderboard

    rows = leaderboard.aggregate(leaderboard.collect(Tracker(f"sqlite:///{db}")))
    assert {r.n for r in rows} == {2} and len(rows) == 3


WRITER = """
import sys
from medssl_bench.tracking import Tracker
tracker = Tracker(sys.argv[1])
exp = tracker.experiment_id("concurrency")
for i in range(12):
    run = tracker.start(exp, f"w{sys.argv[2]}-{i}", f"{sys.argv[2]}-{i}", "finetune", {}, {"i": i})
    for step in range(3):
        tracker.log_metrics(run, {"val_x": step}, step)
    tracker.set_tags(run, {"value": i})
    tracker.finish(run)
"""


def test_parallel_writers_on_one_sqlite_store_lose_nothing(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    Tracker(uri).experiment_id("concurrency")  # create the schema once, as a first sweep would
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, uri, str(w)], stderr=subprocess.PIPE)
             for w in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err.decode()[-2000:]
    tracker = Tracker(uri)
    runs = tracker.finetune_runs()
    assert len(runs) == 36 and len({r.data.tags["medssl_bench.run_key"] for r in runs}) == 36
    assert all(len(tracker.client.get_metric_history(r.info.run_id, "val_x")) == 3 for r in runs[:5])


def test_sigterm_closes_the_run_in_progress_as_killed(tmp_path):
    """`kill` (SIGTERM) unwinds like Ctrl-C: exit 130 and nothing left RUNNING in MLflow."""
    argv = ["run", "--protocol", "data-efficiency", "--task", "rotation3d", "--device", "cpu",
            "--set", *TINY, "pretrain.epochs=30"]
    db = tmp_path / "mlflow.db"
    log = tmp_path / "run.log"
    proc = _start(tmp_path, argv, log)
    running = ("select count(*) from runs where status = 'RUNNING'")
    deadline = time.monotonic() + 240
    while _count(db, running) < 1:
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130, log.read_text()
    assert _count(db, running) == 0
    assert _count(db, "select count(*) from runs where status = 'KILLED'") >= 1
