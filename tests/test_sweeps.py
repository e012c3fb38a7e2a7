"""Parallel sweeps: `--executor local --workers 2` and the slurm executor through submitit's
local cluster against an MLflow server on PostgreSQL record every unit exactly once, with
the results of the in-process executor; a worker killed with SIGKILL mid-pretraining is
reaped and its unit rerun (resumed) and recorded once; a rerun while the sweep is alive
says where its units run and exits 5, and `--wait` follows them to the end; `bench status`
shows done, running, failed and pending units; SQLite with parallel workers is refused."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
from bench_helpers import SWEEP, all_runs, bench, finished, poll, start_bench
from bench_helpers import TINY as ONE_STEP

from medssl_bench import cli
from medssl_bench.tracking import EXPERIMENT_PREFIX, TAG_KEY, TAG_KIND, Tracker

TINY = [*ONE_STEP, "pretrain.epochs=1", "protocol.seeds=[0]"]


def _sweep_runs(uri: str, seed: int) -> list:
    """The runs of the sweep on ``dataset.seed=seed`` (tests share one server and tell
    their sweeps apart by that seed): pretrainings carry it as a param, fine-tunes hang
    under their pretraining."""
    runs = all_runs(uri, "data-efficiency")
    by_id = {r.info.run_id: r for r in runs}

    def seed_of(run) -> str | None:
        if "dataset.seed" in run.data.params:
            return run.data.params["dataset.seed"]
        parent = by_id.get(run.data.tags.get("mlflow.parentRunId", ""))
        return None if parent is None else parent.data.params.get("dataset.seed")

    return [r for r in runs if seed_of(r) == str(seed)]


def _values(runs: list) -> dict[str, float]:
    done = finished(runs, "finetune")
    assert all(len(v) == 1 for v in done.values()), "a fine-tune recorded twice"
    return {k: float(v[0].data.tags["value"]) for k, v in done.items()}


KILLED_SWEEP = [*TINY, "dataset.seed=13", "pretrain.epochs=3"]


@pytest.fixture(scope="module")
def serial_values(tmp_path_factory):
    """The fine-tunes' results of the killed sweep run undisturbed by the in-process
    executor (its own SQLite store): what the parallel sweep must reproduce."""
    folder = tmp_path_factory.mktemp("serial")
    uri = f"sqlite:///{folder / 'alone.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MEDSSL_BENCH_TEST_EPOCH_DELAY", raising=False)
        assert cli.main([*SWEEP, "--tracking-uri", uri, "--set", *KILLED_SWEEP]) == 0
    return _values(_sweep_runs(uri, 13))


@pytest.mark.slow
def test_the_slurm_executor_runs_a_sweep_through_submitits_local_cluster(tmp_path,
                                                                         mlflow_server):
    tiny = [*TINY, "dataset.seed=12", "protocol.seeds=[0,1]"]
    jobs = tmp_path / "jobs"
    done = bench(tmp_path, [*SWEEP, "--executor", "slurm", "--tracking-uri",
                            mlflow_server.uri, "--set", *tiny, "executor.cluster=local",
                            "executor.workers=3", f"executor.folder={jobs}",
                            "executor.poll_seconds=0.3"])
    assert done.returncode == 0, done.stdout + done.stderr
    runs = _sweep_runs(mlflow_server.uri, 12)
    assert len(_values(runs)) == 4  # scratch and rotation3d, seeds 0 and 1, once each
    assert not [r for r in runs if r.info.status != "FINISHED"]
    # every unit that trained ran as a submitit job: its pickled call, result and log
    assert "2 finetune units as one job array" in done.stdout  # scratch, seeds 0 and 1
    logs = sorted(p.name for p in jobs.rglob("*_log.out"))
    assert len(logs) == 5, logs  # the pretraining and four fine-tunes
    assert any("rotation3d 100% seed 1" in p.read_text() for p in jobs.rglob("*_log.out"))
    # MLflow's "View run ... at: http://..." lines, one pair per run ended, are silenced
    for text in (done.stdout, *(p.read_text() for p in jobs.rglob("*_log.out"))):
        assert "View run" not in text and "View experiment" not in text


def test_slurm_job_parameters_become_the_sbatch_script(registry, tmp_path, monkeypatch):
    """The config keys reach sbatch through submitit's own script writer (no Slurm here:
    an `srun` that does nothing stands in for submitit's check that it is on a cluster;
    nothing is submitted)."""
    import submitit

    srun = tmp_path / "bin" / "srun"
    srun.parent.mkdir()
    srun.write_text("#!/bin/sh\nexit 0\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{srun.parent}:{os.environ['PATH']}")

    from medssl_bench.plan import FinetuneUnit, PretrainUnit

    cls = registry.get("executor", "slurm")
    executor = cls(cls.Config(partition="gpu", account="lab", gpus_per_job=1,
                              cpus_per_job=6, mem_gb=48, time_limit_minutes=300,
                              sbatch={"constraint": "a100"}, setup=["module load cuda"]))
    pre = PretrainUnit(key="p", task="rotation3d", what="pretrain rotation3d")
    fine = FinetuneUnit(key="f", task="rotation3d", what="ft", depends_on=("p",), fraction=100,
                        seed=0, indices=(0,), subset_ids=("a",), pretrain_dataset=None,
                        metric="dice", setup="", task_setup="", dataset_ref="", label="")
    scripts = {}
    for unit in (pre, fine):
        slurm = submitit.AutoExecutor(folder=tmp_path / "jobs", cluster="slurm")
        slurm.update_parameters(**executor.job_parameters(unit, 4 if unit is pre else 1))
        scripts[unit.key] = slurm._executor._make_submission_file_text("python -m x", "u")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --time=300",
                 "#SBATCH --cpus-per-task=6", "#SBATCH --mem=48GB",
                 "#SBATCH --constraint=a100", "module load cuda"):
        assert line in scripts["p"] and line in scripts["f"], line
    assert "#SBATCH --gpus-per-node=4" in scripts["p"]
    assert "#SBATCH --gpus-per-node=1" in scripts["f"]


@pytest.mark.slow
def test_local_workers_survive_a_killed_worker_and_a_rerun_while_alive(
        tmp_path, mlflow_server, serial_values):
    """`--executor local --workers 2` (implied by --workers); once the pretraining has
    checkpointed an epoch: a second `bench run` exits 5 naming the worker; a third with
    --wait follows; the worker is killed with SIGKILL; the first run reaps its run and
    reruns the pretraining (resumed from its checkpoint); both runs end 0 with every unit
    recorded exactly once and the results of the in-process executor."""
    argv = [*SWEEP, "--workers", "2", "--tracking-uri", mlflow_server.uri, "--set",
            *KILLED_SWEEP,
            "executor.poll_seconds=0.3"]
    gate = tmp_path / "hold-epochs"
    gate.touch()  # units stop at the end of each epoch (checkpoint written) while it exists
    held = {"MEDSSL_BENCH_TEST_EPOCH_GATE": str(gate)}
    first = start_bench(tmp_path, argv, **held)
    follower = None
    try:
        def pretraining_with_an_epoch():
            for r in _sweep_runs(mlflow_server.uri, 13):
                if (r.info.status == "RUNNING" and "pretrain_loss" in r.data.metrics
                        and r.data.tags.get("task") == "rotation3d"
                        and r.data.tags.get(TAG_KIND) == "pretrain"):
                    return r
            return None

        run = poll(pretraining_with_an_epoch, "a checkpointed pretraining epoch")
        worker = int(run.data.tags["medssl_bench.pid"])
        again = bench(tmp_path, argv, **held)
        assert again.returncode == 5, again.stdout + again.stderr
        assert "still running" in again.stderr and f"pid {worker}" in again.stderr
        assert "pretrain rotation3d" in again.stderr and "--wait" in again.stderr
        follower = start_bench(tmp_path, [*argv, "--wait"], **held)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(follower.stdout), daemon=True)
        reader.start()
        poll(lambda: any("following them (--wait)" in line for line in lines),
             "the --wait run following the live units")
        os.kill(worker, signal.SIGKILL)
        gate.unlink()
        out, _ = first.communicate(timeout=400)
        assert first.returncode == 0, out
        follower.wait(timeout=400)
        reader.join(timeout=30)
        followed = "".join(lines)
        assert follower.returncode == 0, followed
    finally:
        for proc in (first, follower):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert "running it again" in out, out
    assert "pretrain rotation3d" in followed.split("following them (--wait)")[1]
    runs = _sweep_runs(mlflow_server.uri, 13)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    pretrains = finished(runs, "pretrain")
    assert all(len(v) == 1 for v in pretrains.values()) and len(pretrains) == 2
    killed = [r for r in runs if r.info.status == "KILLED"]
    assert killed and all("gone" in r.data.tags.get("medssl_bench.reaped", "") for r in killed)
    rotation = next(v[0] for v in pretrains.values() if v[0].data.tags.get("task") ==
                    "rotation3d")
    assert rotation.data.tags.get("resumed_from_epoch")  # resumed from its checkpoint
    assert _values(runs) == pytest.approx(serial_values, abs=1e-6)
    assert len(serial_values) == 2  # scratch and rotation3d
    # each of the 2 CPU workers ran torch with its share of this machine's cores
    logs = "".join(p.read_text() for p in (tmp_path / ".medssl_bench" / "submitit").rglob(
        "*_log.out"))
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    assert f"on cpu, {share} CPU threads" in logs, logs[-2000:]


# --------------------------------------------------------------------------- status, SQLite


def _status(tmp_path, uri: str, capsys, *extra: str) -> str:
    capsys.readouterr()
    assert cli.main(["status", "--protocol", "data-efficiency", "--task", "rotation3d",
                     "--tracking-uri", uri, "--set", *TINY, *extra]) == 0
    return capsys.readouterr().out


def test_status_shows_done_running_failed_and_pending_and_a_rerun_names_the_runner(
        tmp_path, monkeypatch, capsys):
    from medssl_bench import leases

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    fresh = json.loads(_status(tmp_path, uri, capsys, "--json"))
    assert fresh["counts"] == {"done": 0, "running": 0, "failed": 0, "pending": 4}
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # status created nothing
    units = fresh["units"]
    tracker = Tracker(uri)
    exp = tracker.experiment_id("data-efficiency")
    assert EXPERIMENT_PREFIX + "data-efficiency" in [e.name for e in tracker.experiments()]
    done = tracker.start(exp, "u0", units[0]["key"], "pretrain", {}, {})
    tracker.finish(done)
    # unit 1 runs on another node, heartbeating
    tracker.client.create_run(exp, tags={
        TAG_KEY: units[1]["key"], TAG_KIND: "pretrain", "medssl_bench.host": "node7",
        "medssl_bench.pid": "4242", leases.TAG_HEARTBEAT: f"{time.time():.3f}",
        leases.TAG_LEASE_TTL: "900", leases.TAG_HELD: "1"})
    failed = tracker.start(exp, "u2", units[2]["key"], "finetune", {}, {})
    tracker.client.set_tag(failed, "error", "TrainingError: loss is NaN at epoch 0")
    tracker.finish(failed, "FAILED")
    shown = json.loads(_status(tmp_path, uri, capsys, "--json"))
    states = [u["state"] for u in shown["units"]]
    assert states == ["done", "running", "failed", "pending"]
    assert shown["counts"] == {"done": 1, "running": 1, "failed": 1, "pending": 1}
    running = shown["units"][1]
    assert running["host"] == "node7" and running["pid"] == "4242" and running["since"]
    assert running["heartbeat"]
    assert "loss is NaN" in shown["units"][2]["detail"]
    table = _status(tmp_path, uri, capsys)
    assert "node7 pid 4242" in table and "loss is NaN" in table and "1 pending" in table

    # a rerun of the sweep while node7 holds a unit: says where, exits 5, starts nothing
    before = len(tracker.client.search_runs([exp], max_results=100))
    capsys.readouterr()
    code = cli.main([*SWEEP, "--tracking-uri", uri, "--set", *TINY])
    err = capsys.readouterr().err
    assert code == 5 and "still running" in err and "node7 pid 4242" in err and "--wait" in err
    assert len(tracker.client.search_runs([exp], max_results=100)) == before


def test_sqlite_with_parallel_workers_is_refused_naming_the_server_setup(
        tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for extra in (["--workers", "2"], ["--executor", "slurm", "--set", "executor.cluster=local"]):
        code = cli.main([*SWEEP, *extra, "--set", *TINY])
        err = capsys.readouterr().err
        assert code == 2
        lines = [line for line in err.splitlines() if line.strip()]
        assert lines[0].startswith("error:") and "SQLite" in err
        assert "mlflow server --backend-store-uri postgresql://" in err
        assert "--artifacts-destination" in err and "--tracking-uri http://" in err
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, no cache
