"""The shared tracking store: results go to an MLflow server backed by a real PostgreSQL
server; a server unreachable at start is one message with nothing written locally; a server
that goes away mid-run is retried with backoff, then the unit fails clearly, finished units
stay recorded, and a rerun finishes the sweep with every unit recorded once."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from medssl_bench.errors import TrackingUnavailable
from medssl_bench.tracking import RetryingClient, Tracker

TINY = ["dataset.size=16", "dataset.n_unlabeled=4", "dataset.n_train=2", "dataset.n_val=2",
        "dataset.n_test=2", "backbone.filters=[4,8]", "task.hidden=8",
        "pretrain.iterations_per_epoch=1", "pretrain.batch_size=2", "finetune.epochs=1",
        "finetune.warmup_epochs=0", "finetune.iterations_per_epoch=1", "protocol.fractions=[100]"]


def _bench(cwd: Path, argv: list[str], env: dict[str, str] | None = None,
           timeout: float = 300) -> subprocess.CompletedProcess:
    full = {**os.environ, "BENCH_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONUNBUFFERED": "1",
            **(env or {})}
    full.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "medssl_bench.cli", *argv], cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=timeout)


def _finetune_keys(uri: str, status: str = "FINISHED") -> list[str]:
    tracker = Tracker(uri)
    ids = [e.experiment_id for e in tracker.experiments()]
    runs = tracker.client.search_runs(ids, max_results=1000) if ids else []
    return [r.data.tags["medssl_bench.run_key"] for r in runs
            if r.data.tags.get("medssl_bench.kind") == "finetune" and r.info.status == status]


def test_a_sweep_records_its_results_in_postgres_through_the_server(tmp_path, mlflow_server,
                                                                     postgres):
    import psycopg2

    argv = ["run", "--protocol", "data-efficiency", "--task", "rotation3d", "--device", "cpu",
            "--tracking-uri", mlflow_server.uri, "--set", *TINY, "pretrain.epochs=1",
            "protocol.seeds=[0]"]
    done = _bench(tmp_path, argv)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (tmp_path / "mlflow.db").exists()  # nothing went to a local SQLite store
    # the rows are in PostgreSQL itself, not only visible through the server
    with psycopg2.connect(host="127.0.0.1", port=postgres.port, user=postgres.user,
                          dbname=postgres.database) as conn, conn.cursor() as cur:
        cur.execute("select count(*) from runs r join tags t on r.run_uuid = t.run_uuid "
                    "where t.key = 'medssl_bench.kind' and t.value = 'finetune' "
                    "and r.status = 'FINISHED'")
        assert cur.fetchone()[0] >= 2  # rotation3d and scratch
    board = _bench(tmp_path, ["leaderboard", "--tracking-uri", mlflow_server.uri,
                              "--format", "json"])
    assert board.returncode == 0, board.stderr
    assert '"rotation3d"' in board.stdout and '"scratch"' in board.stdout


def test_an_unreachable_server_at_start_is_one_message_and_writes_nothing(tmp_path):
    from servers import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    done = _bench(tmp_path, ["run", "--protocol", "data-efficiency", "--task", "rotation3d",
                             "--device", "cpu", "--tracking-uri", uri, "--set", *TINY],
                  timeout=120)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "error:" in errors[0], done.stderr
    assert uri in errors[0] and "cannot connect" in errors[0]
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, no mlruns, no cache folder


class _Flaky:
    """An MlflowClient stand-in whose calls fail like a server that is down until
    ``up_after`` calls were made (the messages are MLflow's, verbatim in form)."""

    def __init__(self, up_after: int, message: str) -> None:
        self.calls, self.up_after, self.message = 0, up_after, message

    def search_experiments(self, **kwargs):
        self.calls += 1
        if self.calls <= self.up_after:
            raise RuntimeError(self.message)
        return ["ok"]


REFUSED = ("API request to http://127.0.0.1:5000/api/2.0/mlflow/experiments/search failed with "
           "exception HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded "
           "with url: /api/2.0/mlflow/experiments/search (Caused by NewConnectionError("
           "'<urllib3.connection.HTTPConnection>: Failed to establish a new connection: "
           "[Errno 111] Connection refused'))")


def test_calls_are_retried_while_the_server_is_down_then_fail_with_one_message():
    flaky = _Flaky(3, REFUSED)
    client = RetryingClient(flaky, server_budget=60, uri="http://127.0.0.1:5000")
    assert client.search_experiments() == ["ok"] and client.retries == 3

    gone = RetryingClient(_Flaky(10**9, REFUSED), server_budget=0.3, uri="http://h:1")
    with pytest.raises(TrackingUnavailable) as exc:
        gone.search_experiments()
    text = str(exc.value)
    assert "http://h:1" in text and "unreachable" in text and "rerun" in text
    assert "Max retries" not in text and "\n" not in text

    other = RetryingClient(_Flaky(1, "RESOURCE_DOES_NOT_EXIST: no run"), server_budget=60)
    with pytest.raises(RuntimeError, match="RESOURCE_DOES_NOT_EXIST"):
        other.search_experiments()  # not a connection problem: raised at once
    assert other.retries == 0


def test_a_server_restart_mid_run_is_waited_out(mlflow_server):
    tracker = Tracker(mlflow_server.uri)
    experiment = tracker.experiment_id("restart-check")
    mlflow_server.stop()
    restarted = threading.Thread(target=mlflow_server.start)
    timer = threading.Timer(2.0, restarted.start)
    timer.start()
    try:
        run_id = tracker.start(experiment, "after-restart", "restart-key", "finetune", {}, {})
    finally:
        timer.join()
        restarted.join()
    assert tracker.client.retries > 0
    assert tracker.client.get_run(run_id).info.status == "RUNNING"
    tracker.finish(run_id)


def test_a_server_gone_mid_run_fails_clearly_keeps_what_finished_and_a_rerun_completes(
        tmp_path, postgres):
    """A sweep of four fine-tunes; the server is stopped once the first is recorded. The
    run retries for its (short) budget, then ends with one message and exit code 4; the
    finished fine-tune stays recorded; with the server back a rerun records the rest, each
    once, and nothing is left RUNNING."""
    from servers import MlflowServer

    server = MlflowServer(postgres.uri.rsplit("/", 1)[0] + "/gone", tmp_path / "artifacts")
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=postgres.port, user=postgres.user,
                            dbname="postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute('CREATE DATABASE "gone"')
    conn.close()
    server.start()
    argv = ["run", "--protocol", "data-efficiency", "--task", "rotation3d", "--device", "cpu",
            "--tracking-uri", server.uri, "--set", *TINY, "pretrain.epochs=1",
            "protocol.seeds=[0,1]"]
    env = {**os.environ, "BENCH_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONUNBUFFERED": "1",
           "BENCH_TRACKING_SERVER_RETRY_SECONDS": "4", "MEDSSL_BENCH_TEST_EPOCH_DELAY": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = tmp_path / "run1.log"
    try:
        proc = subprocess.Popen([sys.executable, "-m", "medssl_bench.cli", *argv], cwd=tmp_path,
                                env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while not _finetune_keys(server.uri):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        server.stop()
        assert proc.wait(timeout=120) == TrackingUnavailable.exit_code, log.read_text()
        text = log.read_text()
        assert "stayed unreachable" in text and "rerun the same command" in text
        assert "Traceback" not in text

        server.start()
        kept = _finetune_keys(server.uri)
        assert kept  # what finished before the server went away is recorded
        rerun = _bench(tmp_path, argv)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        keys = _finetune_keys(server.uri)
        assert set(kept) <= set(keys)
        assert len(keys) == len(set(keys)) == 2 * 2  # (rotation3d, scratch) x 2 seeds
        assert not _finetune_keys(server.uri, "RUNNING")
    finally:
        server.stop()
