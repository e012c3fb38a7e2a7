"""The shared tracking store: results go to an MLflow server backed by a real PostgreSQL
server; a server unreachable at start is one message with nothing written locally; a server
restarted mid-run is waited out; a server that goes away for longer is retried with backoff,
then the unit fails clearly, finished units stay recorded, and a rerun finishes the sweep
with every unit recorded once."""

from __future__ import annotations

import threading

import pytest
from bench_helpers import SWEEP, TINY, all_runs, bench, poll, start_bench

from medssl_bench import cli
from medssl_bench.errors import TrackingUnavailable
from medssl_bench.tracking import TAG_KEY, TAG_KIND, RetryingClient, Tracker

#: this module's sweeps on the session's server, told apart from other modules' by the seed
SEED = 14


def _finetune_runs(uri: str, status: str = "FINISHED") -> list:
    """This module's fine-tunes in ``status`` (they hang under a pretraining run that carries
    the dataset seed)."""
    runs = all_runs(uri, "data-efficiency")
    ours = {r.info.run_id for r in runs if r.data.params.get("dataset.seed") == str(SEED)}
    return [r for r in runs if r.data.tags.get(TAG_KIND) == "finetune"
            and r.info.status == status and r.data.tags.get("mlflow.parentRunId") in ours]


def _finetune_keys(uri: str, status: str = "FINISHED") -> list[str]:
    return [r.data.tags[TAG_KEY] for r in _finetune_runs(uri, status)]


def test_an_unreachable_server_at_start_is_one_message_and_writes_nothing(tmp_path):
    from servers import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    done = bench(tmp_path, [*SWEEP, "--tracking-uri", uri, "--set", *TINY], timeout=120)
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


def test_a_server_restarted_mid_run_is_waited_out_and_one_gone_longer_fails_clearly(
        tmp_path, mlflow_server, postgres, capsys, monkeypatch):
    """A sweep of four fine-tunes on the PostgreSQL-backed server; the server is stopped once
    the first is recorded. The run retries for its (short) budget, then ends with one message
    and exit code 4. A client call made while the server is down is waited out when it comes
    back within the budget (a restart). The finished fine-tune stays recorded; a rerun
    records the rest, each once, nothing is left RUNNING, nothing went to a local store, and
    the rows are in PostgreSQL itself, not only visible through the server."""
    import psycopg2

    argv = [*SWEEP, "--tracking-uri", mlflow_server.uri, "--set", *TINY, "pretrain.epochs=1",
            f"dataset.seed={SEED}", "protocol.seeds=[0,1]"]
    tracker = Tracker(mlflow_server.uri)  # opened while the server is up
    experiment = tracker.experiment_id("restart-check")
    log = tmp_path / "run1.log"
    proc = start_bench(tmp_path, argv, log, BENCH_TRACKING_SERVER_RETRY_SECONDS="4",
                       MEDSSL_BENCH_TEST_EPOCH_DELAY="1")
    try:
        poll(lambda: proc.poll() is not None or _finetune_keys(mlflow_server.uri),
             "a fine-tune recorded")
        assert proc.poll() is None, log.read_text()
        mlflow_server.stop()
        assert proc.wait(timeout=120) == TrackingUnavailable.exit_code, log.read_text()
        text = log.read_text()
        assert "stayed unreachable" in text and "rerun the same command" in text
        assert "Traceback" not in text

        # the server comes back 2 s into a call: the call is retried until it answers
        restarted = threading.Thread(target=mlflow_server.start)
        timer = threading.Timer(2.0, restarted.start)
        timer.start()
        try:
            run_id = tracker.start(experiment, "after-restart", "restart-key", "pretrain", {},
                                   {})
        finally:
            timer.join()
            restarted.join()
        assert tracker.client.retries > 0
        assert tracker.client.get_run(run_id).info.status == "RUNNING"
        tracker.finish(run_id)

        kept = _finetune_keys(mlflow_server.uri)
        assert kept  # what finished before the server went away is recorded
        rerun = bench(tmp_path, argv)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    finally:
        if proc.poll() is None:
            proc.kill()
        if not mlflow_server.healthy():  # later tests share the server
            mlflow_server.start()
    keys = _finetune_keys(mlflow_server.uri)
    assert set(kept) <= set(keys)
    assert len(keys) == len(set(keys)) == 2 * 2  # (rotation3d, scratch) x 2 seeds
    assert not _finetune_keys(mlflow_server.uri, "RUNNING")
    assert not (tmp_path / "mlflow.db").exists()  # nothing went to a local SQLite store
    # MLflow's "View run ... at: http://..." lines would clutter the output of parallel runs
    assert "View run" not in rerun.stdout and "View experiment" not in rerun.stdout
    ids = sorted(r.info.run_id for r in _finetune_runs(mlflow_server.uri))
    with psycopg2.connect(host="127.0.0.1", port=postgres.port, user=postgres.user,
                          dbname=postgres.database) as conn, conn.cursor() as cur:
        cur.execute("select run_uuid from runs where status = 'FINISHED' and run_uuid in %s",
                    (tuple(ids),))
        assert sorted(row[0] for row in cur.fetchall()) == ids
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert cli.main(["leaderboard", "--tracking-uri", mlflow_server.uri, "--format",
                     "json"]) == 0
    board = capsys.readouterr().out
    assert '"rotation3d"' in board and '"scratch"' in board
