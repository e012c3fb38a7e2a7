"""Real servers for the tests of parallel sweeps: a PostgreSQL server and an MLflow tracking
server backed by it, on localhost, started from the binaries this machine has (nothing
mocked). Used by the pytest fixtures in ``conftest.py`` and by ``benchmarks/sweep_chaos.py``
(which restarts the MLflow server in the middle of a sweep).

PostgreSQL refuses to run as root; as root (CI containers) its commands run as the
``postgres`` system user (or ``nobody``) through ``runuser``, in a data folder handed to
that user. ``BENCH_REQUIRE_SERVERS=1`` (set by ``.ci/run``) turns a machine without
PostgreSQL into a failure instead of a skip.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REQUIRE_ENV = "BENCH_REQUIRE_SERVERS"


class ServerUnavailable(RuntimeError):
    """This machine cannot start the server (no binaries); the message says how to get them."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin() -> Path:
    """The folder of PostgreSQL's server programs (initdb, pg_ctl, postgres)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)
    if candidates:
        return candidates[0].parent
    raise ServerUnavailable(
        "PostgreSQL's server programs (initdb, pg_ctl) are not installed: "
        "`apt-get install postgresql` (Debian/Ubuntu) or your system's package; "
        ".ci/run installs them in CI.")


def _server_user() -> str | None:
    """The user PostgreSQL runs as when we are root (it refuses root); None otherwise."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise ServerUnavailable("running as root and no 'postgres' or 'nobody' user to run "
                            "PostgreSQL as")


def _wait_for(check, what: str, timeout: float, proc: subprocess.Popen | None = None,
              log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} did not start within {timeout:.0f} s\n{tail}")


class PostgresServer:
    """A throwaway PostgreSQL cluster on 127.0.0.1 with trust auth and one database."""

    def __init__(self, root: Path | None = None, database: str = "mlflow",
                 user: str = "bench") -> None:
        self.bin = postgres_bin()
        self.run_as = _server_user()
        # not under pytest's tmp folder: its parents are private to root (0700)
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="bench-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.database, self.user = database, user
        self.port = free_port()

    @property
    def uri(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.database}"

    def _cmd(self, *args: str) -> list[str]:
        return ["runuser", "-u", self.run_as, "--", *args] if self.run_as else list(args)

    def start(self, timeout: float = 60) -> PostgresServer:
        if self.run_as:
            shutil.chown(self.root, self.run_as)
            self.root.chmod(0o700)
        if not self.data.exists():
            subprocess.run(self._cmd(str(self.bin / "initdb"), "-D", str(self.data), "-U",
                                     self.user, "--auth=trust", "-E", "UTF8", "--no-sync"),
                           check=True, capture_output=True)
        subprocess.run(self._cmd(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w",
            "-t", str(int(timeout)), "-o",
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off "
            "-c max_connections=200", "start"), check=True, capture_output=True)
        self._create_database()
        return self

    def _create_database(self) -> None:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user,
                                dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{self.database}"')
        conn.close()

    def stop(self) -> None:
        if self.data.exists():
            subprocess.run(self._cmd(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m",
                                     "fast", "-w", "stop"), capture_output=True)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class MlflowServer:
    """``mlflow server`` with a database backend store and proxied artifacts, on 127.0.0.1;
    :meth:`restart` keeps its port (clients keep their URI)."""

    def __init__(self, backend_uri: str, artifacts: Path, port: int | None = None,
                 workers: int = 2) -> None:
        self.backend_uri, self.artifacts = backend_uri, Path(artifacts)
        self.port = port or free_port()
        self.workers = workers
        self.log = self.artifacts.parent / f"mlflow-server-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def start(self, timeout: float = 120) -> MlflowServer:
        self.artifacts.mkdir(parents=True, exist_ok=True)
        mlflow = Path(sys.executable).with_name("mlflow")
        cmd = [str(mlflow) if mlflow.exists() else "mlflow", "server",
               "--backend-store-uri", self.backend_uri,
               "--artifacts-destination", self.artifacts.as_uri(),
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers)]
        env = {**os.environ, "MLFLOW_TRACKING_URI": ""}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        _wait_for(self.healthy, f"mlflow server on port {self.port}", timeout, self.proc,
                  self.log)
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def restart(self, down_seconds: float = 0.0) -> None:
        self.stop()
        time.sleep(down_seconds)
        self.start()


@contextlib.contextmanager
def tracking_server(root: Path) -> Iterator[tuple[PostgresServer, MlflowServer]]:
    """PostgreSQL, then an MLflow server on it; both stopped (and PostgreSQL's folder
    removed) afterwards."""
    pg = PostgresServer().start()
    server = None
    try:
        server = MlflowServer(pg.uri, Path(root) / "mlartifacts").start()
        yield pg, server
    finally:
        if server is not None:
            server.stop()
        pg.remove()
