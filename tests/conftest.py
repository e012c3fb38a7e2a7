"""Shared fixtures: a registry without third-party autoload, tiny plugins, tiny images."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("BENCH_DISABLE_PLUGIN_AUTOLOAD", "1")
# Tests read the CLI's plain output: a CI image that forces colour or a terminal (rich reads
# these when the consoles are created at import) must not turn it into escape codes.
for _name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "CLICOLOR_FORCE"):
    os.environ.pop(_name, None)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def registry():
    from medssl_bench.plugins import build_registry

    return build_registry(autoload=False)


@pytest.fixture
def tiny_backbone(registry):
    """A narrow 3-level U-Net: fast enough for per-plugin contract tests."""
    cls = registry.get("backbone", "unet3d")
    return cls(cls.Config(filters=[8, 16, 32], width=1.0))


@pytest.fixture
def cpu_generator():
    return torch.Generator().manual_seed(0)


# --------------------------------------------------------------------------- servers
# A real PostgreSQL server and an MLflow tracking server on it (tests/servers.py), started
# once per session for the tests of the shared tracking store and parallel sweeps. Skipped
# where PostgreSQL is not installed, except under BENCH_REQUIRE_SERVERS=1 (.ci/run), where
# that is a failure.


@pytest.fixture(scope="session")
def postgres():
    from servers import REQUIRE_ENV, PostgresServer, ServerUnavailable

    try:
        server = PostgresServer().start()
    except ServerUnavailable as exc:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {exc}")
        pytest.skip(str(exc))
    yield server
    server.remove()


@pytest.fixture(scope="session")
def mlflow_server(postgres, tmp_path_factory):
    """An MLflow tracking server backed by the session's PostgreSQL server (the setup MLflow
    documents for concurrent clients); tests use ``mlflow_server.uri`` (http://127.0.0.1:P)."""
    from servers import MlflowServer

    server = MlflowServer(postgres.uri, tmp_path_factory.mktemp("mlflow-server") / "artifacts")
    server.start()
    yield server
    server.stop()


# --------------------------------------------------------------------------- SQLite stores
@pytest.fixture(scope="session", autouse=True)
def _new_sqlite_stores_are_copies(tmp_path_factory):
    """MLflow builds a new SQLite store by running its 68 schema migrations, about a second
    each time, and a hundred-odd tests of this process start from a new store. Here the
    first one is built by MLflow as usual and copied aside the moment its migrations end;
    each later new store is a copy of that (SQLite's backup API: the same tables, indexes
    and schema revision; MLflow then goes on as with one it built). Stores made by `bench`
    subprocesses (the kill, server and CLI tests) are built by MLflow, as users' are."""
    import sqlite3
    from contextlib import closing

    import mlflow.store.db.utils as db_utils

    build = db_utils._initialize_tables
    template = tmp_path_factory.mktemp("sqlite-store") / "mlflow.db"

    def initialize(engine) -> None:
        database = engine.url.database if engine.dialect.name == "sqlite" else None
        if not database or database == ":memory:":
            build(engine)
            return
        if not template.exists():
            build(engine)
            with closing(sqlite3.connect(database)) as src, \
                    closing(sqlite3.connect(template)) as dst:
                src.backup(dst)
            return
        raw = engine.raw_connection()
        try:
            with closing(sqlite3.connect(template)) as src:
                src.backup(raw.driver_connection)
        finally:
            raw.close()

    db_utils._initialize_tables = initialize
    yield
    db_utils._initialize_tables = build
