"""Tracking URIs: plain paths, SQLite stores in missing directories, short errors for stores
that cannot be opened. No training."""

from __future__ import annotations

import time

import pytest

from medssl_bench.errors import BenchError
from medssl_bench.tracking import Tracker, absolute_uri, short_error, sqlite_path


def test_plain_sqlite_paths_become_sqlite_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_uri(str(tmp_path / "mlflow.db")) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert absolute_uri("runs.sqlite") == f"sqlite:///{tmp_path / 'runs.sqlite'}"
    assert absolute_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert absolute_uri(f"sqlite:///{tmp_path}/a.db") == f"sqlite:///{tmp_path}/a.db"
    for uri in ("http://host:5000", "https://host", "postgresql://u@h/db", "databricks"):
        assert absolute_uri(uri) == uri
    assert sqlite_path(absolute_uri("mlflow.db")) == tmp_path / "mlflow.db"
    assert sqlite_path("http://host:5000") is None


@pytest.mark.parametrize("uri", ["store", "mlruns", ".", "file:///tmp/mlruns"])
def test_other_plain_paths_get_one_message_naming_the_sqlite_uri(tmp_path, monkeypatch, uri):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BenchError, match="sqlite:///") as exc:
        absolute_uri(uri)
    assert "\n" not in str(exc.value) and "MLFLOW_ALLOW_FILE_STORE" not in str(exc.value)
    with pytest.raises(BenchError, match="sqlite:///"):
        Tracker(uri)
    assert list(tmp_path.iterdir()) == []


def test_sqlite_store_in_a_missing_directory_is_refused(tmp_path):
    missing = tmp_path / "no" / "such" / "dir"
    for uri in (f"sqlite:///{missing}/mlflow.db", str(missing / "mlflow.db")):
        with pytest.raises(BenchError, match=f"does not exist: {missing}"):
            Tracker(uri)
    assert not (tmp_path / "no").exists()


def test_existing_does_not_create_a_store(tmp_path):
    assert Tracker.existing(f"sqlite:///{tmp_path / 'mlflow.db'}") is None
    assert not (tmp_path / "mlflow.db").exists()
    Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert Tracker.existing(str(tmp_path / "mlflow.db")) is not None


def test_store_errors_are_one_short_line():
    urllib3 = ("API request to http://localhost:1/api/2.0/mlflow/experiments/search failed with "
               "exception HTTPConnectionPool(host='localhost', port=1): Max retries exceeded with "
               "url: /api/2.0/mlflow/experiments/search (Caused by NewConnectionError(\"HTTP"
               "Connection(host='localhost', port=1): Failed to establish a new connection: "
               "[Errno 111] Connection refused\"))")
    assert short_error(RuntimeError(urllib3)) == "cannot connect (Connection refused)"
    assert "scheme" in short_error(RuntimeError("got unsupported URI 'foo://bar' for model ..."))
    assert short_error(RuntimeError("First sentence. Second one.")) == "First sentence."
    assert len(short_error(RuntimeError("x" * 1000))) == 200


def test_an_unreachable_server_fails_fast_with_one_line():
    start = time.monotonic()
    with pytest.raises(BenchError) as exc:
        Tracker("http://localhost:1")
    assert time.monotonic() - start < 60  # MLflow's default retries take minutes
    text = str(exc.value)
    assert "Max retries" not in text and "HTTPConnectionPool" not in text and "\n" not in text
    assert "cannot connect" in text


def test_validate_refuses_the_tracking_uris_run_refuses(tmp_path, monkeypatch, capsys):
    from medssl_bench import cli

    monkeypatch.chdir(tmp_path)
    argv = ["validate", "--protocol", "data-efficiency", "--task", "rotation3d", "--device", "cpu"]
    assert cli.main([*argv, "--tracking-uri", "mlruns"]) == 2
    assert "sqlite:///" in capsys.readouterr().err
    assert cli.main([*argv, "--tracking-uri", f"sqlite:///{tmp_path}/missing/x.db"]) == 2
    assert cli.main([*argv, "--tracking-uri", str(tmp_path / "ok.db")]) == 0
    assert list(tmp_path.iterdir()) == []  # validating creates nothing


def test_interrupts_in_a_store_write_wait_for_its_end_whatever_thread_receives_them():
    """SIGTERM sent to the process while a write is deferred (another thread alive and not
    blocking signals, as the lease heartbeat and torch's workers are) is delivered after the
    block, once; the block itself runs to its end. A thread's signal mask alone let it land
    inside SQLAlchemy and leave SQLite locked for every later write (CI, once)."""
    import os
    import signal
    import threading

    from medssl_bench.tracking import _interrupts_deferred

    got: list[str] = []

    def handler(signum, frame):
        got.append("handled")
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, daemon=True)  # a thread that takes signals
    other.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            with _interrupts_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)  # a delivered signal would run the handler here
                got.append("block ended")
        assert got == ["block ended", "handled"]
        assert signal.getsignal(signal.SIGTERM) is handler  # restored
    finally:
        stop.set()
        signal.signal(signal.SIGTERM, previous)
